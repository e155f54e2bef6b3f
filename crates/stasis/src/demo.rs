//! `stasis demo`: the main job on the built-in default. Boots the heartbeat
//! guest that ships inside the binary, shows its counter running, pauses
//! and resumes it, takes a live background (copy-on-write) snapshot as a
//! job through the control API, a diff snapshot against that one,
//! suspends it to a snapshot (the VM ends),
//! restores a new VM from the snapshot alone, shows the counter going
//! on from where it was, live-migrates it to another stasis process, and
//! has a third take it over locally (its RAM, a memory file, handed over);
//! then checkpoints a VM with a qcow2 disk twice and rolls it back to the
//! first checkpoint, its disk as it was then.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stasis_api::{ApiClient, ApiServer, JobState};
use stasis_config::{SerialConfig, VmConfig};
use stasis_vmm::persist::restore::{self, RestoreMode, RestoreOverrides};
use stasis_vmm::persist::save::{self, SnapshotOptions};
use stasis_vmm::Vm;

mod checkpoints;
mod hostile;

use crate::api_glue::VmApi;
use crate::cli::DemoArgs;
use crate::run::{api_socket_path, EXIT_START_FAILED};
use crate::signals;

/// Takes a diff snapshot against `parent` through the API and says how
/// much it stored.
fn diff_snapshot(
    socket: &std::path::Path,
    parent: &std::path::Path,
    dir: &std::path::Path,
) -> Result<(), String> {
    let r = ApiClient::at(socket)
        .take_snapshot(&stasis_api::SnapshotRequest {
            path: dir.display().to_string(),
            stop: false,
            detach: false,
            mode: None,
            disk_mode: None,
            parent: Some(parent.display().to_string()),
        })
        .map_err(|e| format!("diff snapshot failed: {e}"))?;
    println!(
        "stasis demo: diff snapshot against it ({}): {} stored of {} of guest memory, only the pages that changed (guest paused {:.2} ms)",
        r.parent.as_deref().unwrap_or("?"),
        stasis_snapshot::format_bytes(r.memory_written_bytes),
        stasis_snapshot::format_bytes(r.memory_bytes),
        r.pause_ms
    );
    Ok(())
}

/// Starts a snapshot of the running VM as a job and follows it to the end.
fn live_snapshot_job(socket: &std::path::Path, dir: &std::path::Path) -> Result<(), String> {
    let client = ApiClient::at(socket);
    let accepted = client
        .snapshot_detached(&dir.display().to_string(), false)
        .map_err(|e| e.to_string())?;
    let mut phases: Vec<String> = Vec::new();
    let job = loop {
        let job = client.job(accepted.job).map_err(|e| e.to_string())?;
        if phases.last() != Some(&job.phase) {
            phases.push(job.phase.clone());
        }
        if job.state != JobState::Running {
            break job;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let report: stasis_api::SnapshotResponse = match (&job.state, job.result) {
        (JobState::Succeeded, Some(r)) => serde_json::from_value(r).map_err(|e| e.to_string())?,
        _ => {
            return Err(format!(
                "live snapshot job {} {}: {}",
                job.id,
                job.state.as_str(),
                job.error.unwrap_or_default()
            ))
        }
    };
    println!(
        "stasis demo: live snapshot as job {} ({}): {}; guest paused {:.2} ms (quiesced in {:.2} ms) and kept running",
        accepted.job,
        accepted.location,
        phases.join(" -> "),
        report.pause_ms,
        report.quiesce_ms
    );
    if report.mode == "background" {
        println!(
            "stasis demo: {} snapshot: RAM write-protected in {:.2} ms inside the pause, then {} copied in {:.1} ms while the guest ran ({} first because the guest wrote them)",
            report.mode,
            report.protect_ms,
            stasis_snapshot::format_bytes(report.memory_bytes),
            report.background_copy_ms,
            stasis_snapshot::format_bytes(report.early_copied_bytes),
        );
    } else {
        println!(
            "stasis demo: {} snapshot{}",
            report.mode,
            report
                .mode_note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Restores the snapshot `snap` in this process (memory filled in the
/// background) and starts it; the VM and its configuration.
fn start_restored(
    snap: &std::path::Path,
    overrides: &RestoreOverrides,
    signals: &signals::SignalTarget,
) -> Result<(Vm, VmConfig), String> {
    let plan = restore::prepare(snap, overrides).map_err(|e| e.to_string())?;
    let loaded = restore::load_memory(
        &plan,
        &restore::LoadOptions {
            mode: RestoreMode::Background,
            ..Default::default()
        },
        &mut |_, _| {},
    )
    .map_err(|e| e.to_string())?;
    let config = plan.config.clone();
    let mut vm = plan.build_vm(loaded).map_err(|e| e.to_string())?;
    signals.set(vm.control().exit_sink());
    vm.start().map_err(|e| e.to_string())?;
    Ok((vm, config))
}

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
    let kernel =
        stasis_guestkit::write_guest(dir).map_err(|e| format!("cannot write the guest: {e}"))?;
    let serial = dir.join("serial.log");
    std::fs::File::create(&serial).map_err(|e| e.to_string())?;
    let mut cfg = VmConfig::new(format!("demo-{}", std::process::id()), kernel);
    cfg.vcpus = args.vcpus;
    cfg.cpu = args.cpu;
    cfg.memory_mib = 64;
    // RAM in a memory file: the local upgrade at the end hands it over.
    cfg.memory_backend = stasis_config::MemoryBackend::Memfd;
    cfg.cmdline = format!(
        "console=ttyS0 workload=heartbeat hb_ms=250{}",
        if args.vcpus > 1 { " smp=1" } else { "" }
    );
    cfg.serial = SerialConfig::File {
        path: serial.clone(),
    };
    cfg.validate().map_err(|e| e.to_string())?;
    let secs = Duration::from_secs(args.seconds.max(1));

    // 1. Boot.
    let socket = api_socket_path(&cfg)?;
    let server = ApiServer::bind(&socket).map_err(|e| e.to_string())?;
    crate::panics::install(&cfg.name, vec![socket.clone()]);
    let mut vm = Vm::create(&cfg).map_err(|e| e.to_string())?;
    let control = vm.control();
    let signals = signals::forward_termination_signals(control.exit_sink());
    vm.start().map_err(|e| e.to_string())?;
    let handle = server
        .serve(Arc::new(VmApi {
            control: control.clone(),
            socket: socket.display().to_string(),
            jobs: Default::default(),
        }))
        .map_err(|e| e.to_string())?;
    println!(
        "stasis demo: booted the built-in heartbeat guest as VM '{}' ({} vCPU, {} MiB, {} boot)",
        cfg.name,
        cfg.vcpus,
        cfg.memory_mib,
        control.description().boot_protocol
    );
    let d = control.description();
    println!(
        "stasis demo: CPU model {} on {}: the guest sees {} CPU features{}",
        cfg.cpu_spec(),
        d.cpu_vendor,
        d.cpu.features.len(),
        if d.cpu.added_by_host.is_empty() {
            String::new()
        } else {
            format!(
                " ({} of them added by this host's KVM, which cannot hide them)",
                d.cpu.added_by_host.len()
            )
        }
    );
    println!(
        "stasis demo: try `stasis status {}` from another shell",
        cfg.name
    );
    let mut tail = Tail::open(&serial).map_err(|e| e.to_string())?;
    let mut last = None;
    show(&mut tail, secs, &mut last);

    // 2. Pause and resume.
    let t = Instant::now();
    control.pause().map_err(|e| e.to_string())?;
    let paused_in = t.elapsed();
    let during = show(&mut tail, Duration::from_millis(1000), &mut last);
    control.resume().map_err(|e| e.to_string())?;
    println!(
        "stasis demo: paused all vCPUs in {:.1} ms; {during} guest lines in 1 s of pause; resumed",
        paused_in.as_secs_f64() * 1e3
    );
    show(&mut tail, secs, &mut last);

    // 3. A live snapshot as a job, through the control API, as `stasis
    // snapshot --detach` and `stasis jobs` do it.
    live_snapshot_job(&socket, &dir.join("live-snapshot"))?;
    show(&mut tail, Duration::from_millis(500), &mut last);
    diff_snapshot(
        &socket,
        &dir.join("live-snapshot"),
        &dir.join("diff-snapshot"),
    )?;

    // 4. Suspend to a snapshot: the VM ends once it is on disk.
    let snap = dir.join("snapshot");
    let report = save::snapshot(
        &control,
        &snap,
        &SnapshotOptions {
            stop: true,
            ..Default::default()
        },
    )
    .map_err(|e| format!("snapshot failed: {e}"))?;
    let reason = vm.wait();
    handle.shutdown();
    show(&mut tail, Duration::from_millis(300), &mut last);
    let before = last.ok_or("the guest printed no heartbeat before the snapshot")?;
    println!(
        "stasis demo: snapshot written to {} (guest paused {:.1} ms, {} of {} MiB written); VM ended: {reason}",
        report.path.display(),
        report.pause_ms,
        stasis_snapshot::format_bytes(report.memory_written_bytes),
        report.memory_bytes >> 20,
    );

    // 5. Can this host run it? The same check `stasis check` makes.
    let check = restore::check_snapshot(&snap, false).map_err(|e| e.to_string())?;
    if check.check.report.is_ok() {
        println!(
            "stasis demo: `stasis check`: this host can run the snapshot (CPU model {}, {} features, TSC {})",
            cfg.cpu,
            check.guest_cpu.as_ref().map(|g| g.features.len()).unwrap_or(0),
            match check.check.report.tsc {
                Some(stasis_cpu::TscPlan::Same { .. }) | None => "same rate",
                Some(stasis_cpu::TscPlan::Scale { .. }) => "scaled by KVM",
                Some(stasis_cpu::TscPlan::Mismatch { .. }) => "differs",
            }
        );
    } else {
        return Err(format!(
            "this host cannot run the snapshot it just took: {}",
            check.check.report.message()
        ));
    }

    // A snapshot is untrusted input: a crafted copy is refused by name.
    hostile::crafted_snapshot_refused(&snap, dir)?;

    // 6. Restore it, as a new VM, from the snapshot alone.
    let restored_serial = dir.join("serial-restored.log");
    std::fs::File::create(&restored_serial).map_err(|e| e.to_string())?;
    let overrides = RestoreOverrides {
        name: Some(format!("{}-restored", cfg.name)),
        serial: Some(SerialConfig::File {
            path: restored_serial.clone(),
        }),
        ..Default::default()
    };
    let t = Instant::now();
    let (vm, plan_config) = start_restored(&snap, &overrides, &signals)?;
    let control = vm.control();
    println!(
        "stasis demo: restored VM '{}' from the snapshot in {:.1} ms",
        plan_config.name,
        t.elapsed().as_secs_f64() * 1e3
    );
    // Its memory is filled behind it (background restore).
    control.wait_memory_resident()?;
    if let Some(f) = control.memory_fill() {
        println!(
            "stasis demo: ... running at once; its memory was filled behind it and all resident {:.1} ms after the restore began ({} MiB read and checked; 2 MiB blocks filled at the guest's first touch: {})",
            f.resident_ms.unwrap_or(0.0),
            f.filled_bytes >> 20,
            f.fault_fills,
        );
    }
    // The line the guest was printing when it was suspended ends here.
    let mut tail = Tail::open(&restored_serial).map_err(|e| e.to_string())?;
    let mut after = None;
    show(&mut tail, secs, &mut after);
    let restored = match after {
        Some(b) if b > before => {
            println!(
                "stasis demo: the heartbeat counter went on from {before} to {b} across the snapshot and restore"
            );
            b
        }
        _ => return Err("the restored guest's heartbeat did not continue".into()),
    };

    // 7. Live-migrate it to another stasis process (`stasis receive` on
    // loopback), as `stasis migrate` does.
    let migrated_serial = dir.join("serial-migrated.log");
    std::fs::File::create(&migrated_serial).map_err(|e| e.to_string())?;
    let mut receiver = Receiver::spawn(dir, &migrated_serial, "tcp:127.0.0.1:0")?;
    let report = migrate_to(&control, &receiver.address)?;
    let reason = vm.wait();
    println!(
        "stasis demo: live-migrated it to a new stasis process (pid {}) at {}: guest paused {:.1} ms, {} rounds, {} sent in {:.1} ms; here: {reason}",
        receiver.child.id(),
        report.destination,
        report.downtime_ms,
        report.rounds.len(),
        stasis_snapshot::format_bytes(report.bytes_sent),
        report.total_ms
    );
    let mut tail = Tail::open(&migrated_serial).map_err(|e| e.to_string())?;
    let mut migrated = None;
    show(&mut tail, secs, &mut migrated);
    let migrated = match migrated {
        Some(m) if m > restored => {
            println!(
                "stasis demo: the heartbeat counter went on from {restored} to {m} in the other process"
            );
            // It runs there now: every thread of that process is up.
            hostile::show_filtered_threads(receiver.child.id())?;
            m
        }
        _ => return Err("the migrated guest's heartbeat did not continue".into()),
    };

    // 8. A local upgrade: a third stasis process takes the VM over
    // through a UNIX socket (`stasis migrate NAME unix:PATH`); its RAM,
    // a memory file, is handed over, not copied.
    let upgraded_serial = dir.join("serial-upgraded.log");
    std::fs::File::create(&upgraded_serial).map_err(|e| e.to_string())?;
    let listen = format!("unix:{}", dir.join("upgrade.sock").display());
    let mut upgraded = Receiver::spawn(dir, &upgraded_serial, &listen)?;
    let report = local_upgrade(&plan_config.name, &upgraded.address)?;
    let old = receiver.child.wait().map_err(|e| e.to_string())?;
    println!(
        "stasis demo: upgraded it in place: a new stasis process (pid {}) took it over through {} ({}): guest paused {:.1} ms, {} sent; the old process ended ({old})",
        upgraded.child.id(),
        report.destination,
        if report.mode == "local" { "its memory handed over, not copied" } else { "its memory copied" },
        report.downtime_ms,
        stasis_snapshot::format_bytes(report.bytes_sent),
    );
    let mut tail = Tail::open(&upgraded_serial).map_err(|e| e.to_string())?;
    let mut last = None;
    show(&mut tail, secs, &mut last);
    upgraded.stop(&plan_config.name)?;
    match last {
        Some(u) if u > migrated => println!(
            "stasis demo: the heartbeat counter went on from {migrated} to {u} in the upgraded process; it was stopped"
        ),
        _ => return Err("the upgraded guest's heartbeat did not continue".into()),
    }

    // 9. Checkpoints that include a disk, and a rollback.
    checkpoints::demo(dir, &cfg.kernel, &signals)?;
    Ok(())
}

/// Asks the VM `name` (through its API, as `stasis migrate` does) to hand
/// itself over to the receiver at `address`.
fn local_upgrade(
    name: &str,
    address: &str,
) -> Result<stasis_vmm::migrate::MigrationReport, String> {
    let client = ApiClient::for_vm(name).map_err(|e| e.to_string())?;
    let request = stasis_api::MigrateRequest {
        destination: address.to_string(),
        ..Default::default()
    };
    let v = client
        .migrate(&request)
        .map_err(|e| format!("local upgrade failed: {e}"))?;
    serde_json::from_value(v).map_err(|e| format!("the upgrade's report cannot be read: {e}"))
}

/// A `stasis receive` child listening on `listen` (`--insecure` on
/// loopback TCP; a UNIX socket needs nothing).
struct Receiver {
    child: std::process::Child,
    address: String,
}

impl Receiver {
    fn spawn(
        dir: &std::path::Path,
        serial: &std::path::Path,
        listen: &str,
    ) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let kind = listen.split(':').next().unwrap_or("receiver");
        let log = dir.join(format!("receiver-{kind}.log"));
        let mut child = std::process::Command::new(exe)
            .args(["receive", "--listen", listen])
            .args(if listen.starts_with("tcp:") {
                &["--insecure"][..]
            } else {
                &[]
            })
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start stasis receive: {e}"))?;
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(a) = text
                .lines()
                .find_map(|l| l.strip_prefix("stasis: waiting for a migration on "))
            {
                return Ok(Self {
                    child,
                    address: a.trim().to_string(),
                });
            }
            if Instant::now() > end || matches!(child.try_wait(), Ok(Some(_))) {
                let _ = child.kill();
                return Err(format!("stasis receive did not start: {text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the VM it runs (through its API) and waits for it.
    fn stop(&mut self, name: &str) -> Result<(), String> {
        let stopped = ApiClient::for_vm(name).and_then(|c| c.shutdown());
        if let Err(e) = stopped {
            let _ = self.child.kill();
            return Err(format!("cannot stop the migrated VM: {e}"));
        }
        self.child.wait().map_err(|e| e.to_string())?;
        Ok(())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Live-migrates the VM to `address` without authentication (loopback).
fn migrate_to(
    control: &stasis_vmm::VmControl,
    address: &str,
) -> Result<stasis_vmm::migrate::MigrationReport, String> {
    use stasis_vmm::migrate::{source, MigrationAddress};
    let to: MigrationAddress = address.parse()?;
    let stream = to.connect().map_err(|e| format!("{to}: {e}"))?;
    let read_half = stream.try_clone().map_err(|e| e.to_string())?;
    let (r, w) = stasis_migration::secure(
        read_half,
        stream,
        stasis_migration::Role::Source,
        &stasis_migration::Auth::None,
    )
    .map_err(|e| e.to_string())?;
    let options = source::MigrateOptions {
        destination: to.to_string(),
        ..Default::default()
    };
    source::migrate(
        control,
        std::io::BufReader::new(r),
        std::io::BufWriter::with_capacity(1 << 20, w),
        &options,
    )
    .map_err(|e| format!("migration failed: {e}"))
}
