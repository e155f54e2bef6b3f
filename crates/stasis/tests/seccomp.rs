//! Seccomp: every thread of a running VM is filtered, and a forbidden
//! system call from any kind of thread ends the VMM with a message naming
//! the thread, its kind and the call. The forbidden call is made through
//! the test hook `STASIS_SECCOMP_PROBE=KIND` (the first thread of that
//! kind calls `syslog`, which no list allows, once its filter is in).

mod common;
use common::*;
use std::time::{Duration, Instant};

/// A VM with every kind of thread but jobs: two vCPUs, a virtio device's
/// I/O thread, the API, the signal thread, the main thread.
fn start(tag: &str, extra: &[&str], env: &[(&str, &str)]) -> VmProcess {
    let mut args: Vec<String> = vec!["--rng".into(), "id=r0".into()];
    args.extend(extra.iter().map(|a| a.to_string()));
    VmProcess::start(
        tag,
        VmOpts {
            vcpus: 2,
            memory: "32M",
            cmdline: "console=ttyS0 workload=heartbeat hb_ms=50",
            extra: args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
    )
}

/// `Seccomp:` and thread name of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.ok()?.path().join("status")).ok()?;
            let get = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            Some((get("Name:"), get("Seccomp:")))
        })
        .collect()
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    let mut vm = start("seccomp-all", &[], &[]);
    vm.wait_tagged("HB", 2, Duration::from_secs(60));
    vm.wait_socket();
    // A job and an API connection exist while a snapshot is written.
    let s = Scratch::new("seccomp-all-snap");
    vm.snapshot(&s.join("snap"), false);
    let all = threads(vm.child.id());
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["vcpu0", "vcpu1", "stasis-api", "signals"] {
        assert!(names.contains(&want), "no {want} thread: {names:?}");
    }
    assert!(all.len() >= 6, "{all:?}");
    for (name, mode) in &all {
        assert_eq!(mode, "2", "thread {name} is not filtered: {all:?}");
    }
    // The VM still works under its filters.
    vm.cli(&["pause", &vm.name]);
    vm.cli(&["resume", &vm.name]);
    vm.wait_tagged("HB", 4, Duration::from_secs(60));
    // A SIGSYS another process sends is not taken for a forbidden call.
    // SAFETY: kill takes plain integers.
    assert_eq!(unsafe { libc::kill(vm.child.id() as i32, libc::SIGSYS) }, 0);
    let status = vm.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(159), "{}", vm.stderr());
    let err = vm.stderr();
    assert!(
        err.contains(&format!(
            "SIGSYS sent by process {} (not a forbidden system call)",
            std::process::id()
        )),
        "{err}"
    );
    assert!(!err.contains("made a forbidden system call"), "{err}");
}

#[test]
fn a_forbidden_call_from_each_kind_of_thread_ends_the_vmm_naming_it() {
    for (kind, label) in [
        ("vcpu", "(vCPU)"),
        ("device-io", "(device I/O)"),
        ("api", "(API)"),
        ("signals", "(signals)"),
        ("main", "(main)"),
        ("job", "(job)"),
    ] {
        let mut vm = start(
            &format!("seccomp-{kind}"),
            &[],
            &[("STASIS_SECCOMP_PROBE", kind)],
        );
        if kind == "job" {
            // The first job-kind thread may be the one that drops KVM's
            // probe VM at start, or the snapshot's job: either way a
            // thread of that kind makes the call.
            vm.wait_socket();
            let s = Scratch::new("seccomp-job-snap");
            let _ = vm.cli(&["snapshot", &vm.name, s.join("snap").to_str().unwrap()]);
        }
        let status = vm.wait_exit(Duration::from_secs(60));
        let err = vm.stderr();
        assert_eq!(status.code(), Some(159), "{kind}: {status}: {err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("stasis: seccomp: thread '"))
            .unwrap_or_else(|| panic!("{kind}: no seccomp message: {err}"));
        assert!(
            line.contains(&format!(
                "{label} made a forbidden system call: syslog (103); the VMM ends"
            )),
            "{kind}: {line}"
        );
    }
}

#[test]
fn log_mode_lets_the_call_through_and_off_says_so_loudly() {
    let mut vm = start(
        "seccomp-log",
        &["--seccomp", "log"],
        &[("STASIS_SECCOMP_PROBE", "vcpu")],
    );
    vm.wait_tagged("HB", 4, Duration::from_secs(60));
    assert!(vm.child.try_wait().unwrap().is_none(), "{}", vm.stderr());
    assert!(threads(vm.child.id()).iter().all(|(_, m)| m == "2"));

    let mut vm = start(
        "seccomp-off",
        &["--seccomp", "off"],
        &[("STASIS_SECCOMP_PROBE", "vcpu")],
    );
    vm.wait_tagged("HB", 2, Duration::from_secs(60));
    let end = Instant::now() + Duration::from_secs(10);
    while !vm.stderr().contains("seccomp filters are off") {
        assert!(Instant::now() < end, "{}", vm.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(threads(vm.child.id()).iter().all(|(_, m)| m == "0"));
}
