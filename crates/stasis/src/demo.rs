//! `stasis demo`: the main job on the built-in default. Boots the heartbeat
//! guest that ships inside the binary, shows its counter running, pauses it
//! (the counter stops), resumes it (the counter goes on from where it was),
//! and stops it.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stasis_api::ApiServer;
use stasis_config::{SerialConfig, VmConfig};
use stasis_vmm::Vm;

use crate::api_glue::VmApi;
use crate::cli::DemoArgs;
use crate::run::{api_socket_path, EXIT_START_FAILED};
use crate::signals;

/// Follows a growing file line by line.
struct Tail {
    reader: BufReader<std::fs::File>,
    partial: String,
}

impl Tail {
    fn open(path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Self {
            reader: BufReader::new(std::fs::File::open(path)?),
            partial: String::new(),
        })
    }

    /// Complete lines that arrived since the last call.
    fn lines(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let mut s = String::new();
            match self.reader.read_line(&mut s) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    self.partial.push_str(&s);
                    if self.partial.ends_with('\n') {
                        out.push(std::mem::take(&mut self.partial).trim_end().to_string());
                    }
                }
            }
        }
        out
    }
}

fn counter_of(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("counter="))
        .and_then(|v| v.parse().ok())
}

/// Prints guest lines for `d`; returns the last heartbeat counter seen.
fn show(tail: &mut Tail, d: Duration, last: &mut Option<u64>) -> usize {
    let end = Instant::now() + d;
    let mut n = 0;
    while Instant::now() < end {
        for l in tail.lines() {
            println!("  guest | {l}");
            if let Some(c) = counter_of(&l) {
                *last = Some(c);
            }
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    n
}

/// Runs the demo; returns the exit status.
pub fn demo(args: DemoArgs) -> i32 {
    signals::block_termination_signals();
    match run_demo(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("stasis demo: {e}");
            EXIT_START_FAILED
        }
    }
}

fn run_demo(args: &DemoArgs) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("stasis-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let result = demo_in(&dir, args);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo_in(dir: &std::path::Path, args: &DemoArgs) -> Result<(), String> {
    let kernel = stasis_guestkit::write_guest(dir).map_err(|e| format!("cannot write the guest: {e}"))?;
    let serial = dir.join("serial.log");
    std::fs::File::create(&serial).map_err(|e| e.to_string())?;
    let mut cfg = VmConfig::new(format!("demo-{}", std::process::id()), kernel);
    cfg.vcpus = args.vcpus;
    cfg.memory_mib = 64;
    cfg.cmdline = format!(
        "console=ttyS0 workload=heartbeat hb_ms=250{}",
        if args.vcpus > 1 { " smp=1" } else { "" }
    );
    cfg.serial = SerialConfig::File {
        path: serial.clone(),
    };
    cfg.validate().map_err(|e| e.to_string())?;

    let socket = api_socket_path(&cfg)?;
    let server = ApiServer::bind(&socket).map_err(|e| e.to_string())?;
    let mut vm = Vm::create(&cfg).map_err(|e| e.to_string())?;
    let control = vm.control();
    let handle = server
        .serve(Arc::new(VmApi {
            control: control.clone(),
            socket: socket.display().to_string(),
        }))
        .map_err(|e| e.to_string())?;
    signals::forward_termination_signals(control.exit_sink());
    let started = Instant::now();
    vm.start().map_err(|e| e.to_string())?;
    println!(
        "stasis demo: booted the built-in heartbeat guest as VM '{}' ({} vCPU, {} MiB, {} boot)",
        cfg.name,
        cfg.vcpus,
        cfg.memory_mib,
        control.description().boot_protocol
    );
    println!("stasis demo: try `stasis status {}` from another shell", cfg.name);
    let mut tail = Tail::open(&serial).map_err(|e| e.to_string())?;
    let mut last = None;
    let secs = Duration::from_secs(args.seconds.max(1));
    show(&mut tail, secs, &mut last);
    let before = last;

    let t = Instant::now();
    control.pause().map_err(|e| e.to_string())?;
    println!(
        "stasis demo: paused all vCPUs in {:.1} ms; waiting {} s",
        t.elapsed().as_secs_f64() * 1e3,
        secs.as_secs()
    );
    let during = show(&mut tail, secs, &mut last);
    println!("stasis demo: {during} guest lines while paused; resuming");
    control.resume().map_err(|e| e.to_string())?;
    show(&mut tail, secs, &mut last);
    control.request_stop();
    let reason = vm.wait();
    handle.shutdown();
    match (before, last) {
        (Some(a), Some(b)) if b > a => println!(
            "stasis demo: the heartbeat counter went on from {a} to {b} across the pause; {reason} after {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        _ => return Err(format!("the guest's heartbeat did not advance as expected ({reason})")),
    }
    Ok(())
}
