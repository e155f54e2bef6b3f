//! The client subcommands: `list`, `status`, `pause`, `resume`, `stop`.

use std::time::{Duration, Instant};

use stasis_api::{runtime, ApiClient, VmInfo};

use crate::cli::NameArg;

/// Exit status when the VM cannot be reached or refuses the request.
pub const EXIT_CLIENT_FAILED: i32 = 1;

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("stasis: {e}");
    EXIT_CLIENT_FAILED
}

fn client(name: &str) -> Result<ApiClient, String> {
    ApiClient::for_vm(name).map_err(|e| e.to_string())
}

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `stasis list`.
pub fn list() -> i32 {
    let sockets = match runtime::list_vm_sockets() {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return fail(format!(
                "cannot list {}: {e}",
                runtime::runtime_dir().display()
            ))
        }
    };
    println!(
        "{:<24} {:<9} {:>5} {:>8} {:>8} {:>8}",
        "NAME", "STATE", "VCPUS", "MEMORY", "PID", "UPTIME"
    );
    for s in sockets {
        match ApiClient::at(&s.path).get_vm() {
            Ok(i) => println!(
                "{:<24} {:<9} {:>5} {:>7}M {:>8} {:>8}",
                i.name,
                i.state.as_str(),
                i.vcpus,
                i.memory_mib,
                i.pid,
                human_duration(i.uptime_ms)
            ),
            Err(_) => println!("{:<24} {:<9}", s.name, "stale"),
        }
    }
    0
}

fn print_info(i: &VmInfo) {
    println!("name:        {}", i.name);
    println!("state:       {}", i.state.as_str());
    println!("pid:         {}", i.pid);
    println!("vcpus:       {}", i.vcpus);
    println!("memory:      {} MiB", i.memory_mib);
    if let Some(f) = &i.memory_fill {
        match (&f.error, f.resident) {
            (Some(e), _) => println!("             restore failed: {e}"),
            (None, true) => println!(
                "             restored in the background, resident after {:.1} ms ({} MiB filled, {} blocks for guest faults)",
                f.resident_us.unwrap_or(0) as f64 / 1e3,
                f.filled_bytes >> 20,
                f.fault_fills
            ),
            (None, false) => println!(
                "             being filled in the background: {} of {} MiB ({} blocks for guest faults so far)",
                f.filled_bytes >> 20,
                f.total_bytes >> 20,
                f.fault_fills
            ),
        }
    }
    println!("kernel:      {}", i.kernel);
    println!("boot:        {}", i.boot_protocol);
    if let Some(c) = &i.cpu {
        println!(
            "cpu:         {} ({}, {} features, XCR0 mask {:#x}, TSC {} kHz)",
            c.model,
            c.vendor,
            c.features.len(),
            c.xcr0,
            c.tsc_khz
        );
        if !c.added_by_host.is_empty() {
            println!(
                "             the host's KVM also shows: {}",
                c.added_by_host.join(" ")
            );
        }
    }
    println!("api socket:  {}", i.api_socket);
    println!("uptime:      {}", human_duration(i.uptime_ms));
    println!("stasis:      {}", i.stasis_version);
    for d in &i.devices {
        println!("device:      {} {} ({})", d.kind, d.id, d.backend);
    }
}

/// `stasis status NAME`.
pub fn status(arg: &NameArg) -> i32 {
    let info = match client(&arg.name).and_then(|c| c.get_vm().map_err(|e| e.to_string())) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    if arg.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).expect("VmInfo serializes")
        );
    } else {
        print_info(&info);
    }
    0
}

/// `stasis pause NAME`, `resume NAME`.
pub fn action(arg: &NameArg, verb: &str) -> i32 {
    let result = client(&arg.name).and_then(|c| {
        match verb {
            "pause" => c.pause(),
            "resume" => c.resume(),
            _ => c.shutdown(),
        }
        .map_err(|e| e.to_string())
    });
    match result {
        Ok(r) if arg.json => {
            println!("{}", serde_json::to_string_pretty(&r).expect("serializes"));
            0
        }
        Ok(r) => {
            match r.quiesce_us {
                Some(us) => println!(
                    "VM '{}': {} ({}; quiesced in {:.2} ms)",
                    arg.name,
                    r.state.as_str(),
                    r.message,
                    us as f64 / 1e3
                ),
                None => println!("VM '{}': {} ({})", arg.name, r.state.as_str(), r.message),
            }
            0
        }
        Err(e) => fail(e),
    }
}

/// `stasis stop NAME`: asks the VM to stop and waits (up to 10 s) until its
/// socket is gone, i.e. the VMM has exited.
pub fn stop(arg: &NameArg) -> i32 {
    let code = action(arg, "stop");
    if code != 0 {
        return code;
    }
    let Ok(path) = runtime::socket_path_for(&arg.name) else {
        return code;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if path.exists() {
        return fail(format!("VM '{}' did not exit within 10 s", arg.name));
    }
    0
}
