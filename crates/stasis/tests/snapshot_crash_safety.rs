//! A snapshot that fails or is killed half way never destroys the previous
//! one at the same path, and a failed snapshot leaves the VM running.
//!
//! Kills land where they are meant to, not by luck: a failpoint
//! (`STASIS_FAILPOINTS`, crates/stasis-failpoint) stops the writer inside
//! the phase under test and says so on the VMM's stderr, and only then is
//! the VMM killed.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn fingerprint(dir: &Path) -> BTreeMap<String, u32> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                crc32c::crc32c(&std::fs::read(e.path()).unwrap()),
            )
        })
        .collect()
}

fn hb_vm(tag: &str) -> VmProcess {
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            cmdline: "console=ttyS0 workload=heartbeat hb_ms=50",
            ..Default::default()
        },
    );
    vm.wait_tagged("HB", 2, T);
    vm.wait_socket();
    vm
}

fn still_running(vm: &mut VmProcess) {
    let n = vm.tagged("HB").len();
    vm.wait_tagged("HB", n + 2, T);
    let out = vm.cli(&["status", &vm.name, "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["state"], "running");
}

/// Guest memory of the memory-workload VMs, and the memory batches a
/// snapshot of it copies (16 MiB each; one RAM region).
const MEMORY_MIB: u64 = 128;
const BATCHES: u64 = MEMORY_MIB / 16;

/// A VM whose memory workload has written and checks 96 MiB, with
/// failpoints `failpoints`.
fn memory_vm(tag: &str, failpoints: &str) -> VmProcess {
    let memory = format!("{MEMORY_MIB}M");
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            memory: &memory,
            cmdline: "console=ttyS0 workload=memory mem_mib=96",
            env: vec![("STASIS_FAILPOINTS".into(), failpoints.into())],
            ..Default::default()
        },
    );
    vm.wait_tagged("MEM", 1, Duration::from_secs(300));
    vm.wait_socket();
    vm
}

/// Waits until the VMM says it is held at failpoint `name`.
fn wait_held(vm: &mut VmProcess, name: &str) {
    let line = format!("STASIS-FAILPOINT {name}");
    let deadline = std::time::Instant::now() + T;
    while !vm.stderr().contains(&line) {
        if let Ok(Some(st)) = vm.child.try_wait() {
            vm.fail(&format!("the VMM ended ({st}) before reaching {name}"));
        }
        assert!(std::time::Instant::now() < deadline, "never held at {name}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Directories next to `dir` other than `dir` itself.
fn leftovers(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap();
    std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != name)
        .map(|n| n.to_string_lossy().into_owned())
        .collect()
}

/// `stasis snapshot` of `vm` into `dir`, running in the background.
fn snapshot_in_background(vm: &VmProcess, dir: &Path) -> std::process::Child {
    stasis_cmd()
        .env("STASIS_RUNTIME_DIR", &vm.runtime_dir)
        .args(["snapshot", &vm.name, dir.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn missing_parent_directory_fails_and_the_vm_runs_on() {
    let mut vm = hb_vm("cs-parent");
    let target = vm.scratch.join("no/such/dir/snap");
    let out = vm.cli(&["snapshot", &vm.name, target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out).contains("parent directory"),
        "{}",
        err_text(&out)
    );
    still_running(&mut vm);
}

#[test]
fn an_unrelated_directory_is_never_overwritten() {
    let mut vm = hb_vm("cs-unrelated");
    let target = vm.scratch.join("precious");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("thesis.txt"), b"do not lose me").unwrap();
    let out = vm.cli(&["snapshot", &vm.name, target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out).contains("refusing to overwrite"),
        "{}",
        err_text(&out)
    );
    assert_eq!(
        std::fs::read(target.join("thesis.txt")).unwrap(),
        b"do not lose me"
    );
    still_running(&mut vm);
}

#[test]
fn a_new_snapshot_replaces_an_old_one_atomically() {
    let mut vm = hb_vm("cs-replace");
    let snaps = Scratch::new("cs-replace-snap");
    let dir = snaps.join("snap");
    let first = vm.snapshot(&dir, false);
    assert_eq!(first["replaced_existing"], false);
    let before = fingerprint(&dir);
    let second = vm.snapshot(&dir, false);
    assert_eq!(second["replaced_existing"], true);
    assert_ne!(fingerprint(&dir), before, "the snapshot was not replaced");
    // No temporary directories are left behind.
    let leftovers: Vec<String> = std::fs::read_dir(snaps.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "snap")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    still_running(&mut vm);
}

/// Takes a first snapshot at a path, then kills the VMM while a second one
/// to the same path is held at `failpoint`: the first must be there,
/// unchanged and valid, and restore; the next snapshot to the path cleans
/// up what the killed one left. `fp` lets the first snapshot through.
fn kill_while_held(tag: &str, fp: &str, failpoint: &str) {
    let mut vm = memory_vm(tag, fp);
    let snaps = Scratch::new(&format!("{tag}-snap"));
    let dir = snaps.join("snap");
    vm.snapshot(&dir, false);
    let before = fingerprint(&dir);

    let mut pending = snapshot_in_background(&vm, &dir);
    wait_held(&mut vm, failpoint);
    // The killed writer's files are there, beside the snapshot.
    assert!(
        leftovers(&dir).iter().any(|n| n.starts_with(".snap.tmp-")),
        "{:?}",
        leftovers(&dir)
    );
    vm.signal(libc::SIGKILL);
    vm.wait_exit(Duration::from_secs(10));
    assert!(!pending.wait().unwrap().success());

    let out = stasis(&["verify", dir.to_str().unwrap()], &vm.runtime_dir);
    assert!(out.status.success(), "snapshot damaged: {}", err_text(&out));
    assert_eq!(
        fingerprint(&dir),
        before,
        "a killed snapshot changed the previous one"
    );
    let mut r = restore_process(&format!("{tag}-r"), &dir, &vm.runtime_dir, &[]);
    let n = r.tagged("MEM").len();
    let mem = r.wait_tagged("MEM", n + 1, Duration::from_secs(300));
    assert_eq!(
        num(mem.last().unwrap(), "bad"),
        0,
        "{}",
        mem.last().unwrap()
    );
    r.wait_socket();
    r.snapshot(&dir, true);
    r.wait_exit(T);
    assert_eq!(leftovers(&dir), Vec::<String>::new());
}

#[test]
fn killing_the_vmm_during_the_memory_copy_leaves_the_previous_snapshot_intact() {
    // The first snapshot's batches and the second's first one pass; the
    // second's next batch holds the writer inside its memory copy.
    kill_while_held(
        "cs-kill-copy",
        &format!(
            "writer.memory_batch={}*sleep(0);writer.memory_batch=hold",
            BATCHES + 1
        ),
        "writer.memory_batch",
    );
}

#[test]
fn killing_the_vmm_just_before_the_rename_leaves_the_previous_snapshot_intact() {
    // The second snapshot is complete and durable in its temporary
    // directory, one step from replacing the first.
    kill_while_held(
        "cs-kill-rename",
        "writer.before_rename=1*sleep(0);writer.before_rename=hold",
        "writer.before_rename",
    );
}

#[test]
fn resume_is_refused_while_a_snapshot_runs() {
    // Reading the device state takes 3 s: the snapshot holds the paused
    // VM for that long.
    let mut vm = memory_vm("cs-busy", "capture.after_irqchip=1*sleep(3000)");
    let snaps = Scratch::new("cs-busy-snap");
    let dir = snaps.join("snap");
    let mut pending = snapshot_in_background(&vm, &dir);
    let client = stasis_api::ApiClient::at(vm.socket());
    let deadline = std::time::Instant::now() + T;
    loop {
        let jobs = client.jobs().unwrap();
        if jobs
            .iter()
            .any(|j| j.phase == "saving vCPU and device state")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{jobs:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // While the snapshot holds the VM, resume (which would let the guest
    // run during the memory copy) is refused with a clear message.
    let out = vm.cli(&["resume", &vm.name]);
    assert!(!out.status.success());
    let msg = err_text(&out);
    assert!(msg.contains("a snapshot of the VM is in progress"), "{msg}");
    assert!(pending.wait().unwrap().success(), "snapshot failed");
    let out = stasis(&["verify", dir.to_str().unwrap()], &vm.runtime_dir);
    assert!(out.status.success(), "{}", err_text(&out));
    // Afterwards the VM runs and pause works again.
    let n = vm.tagged("MEM").len();
    vm.wait_tagged("MEM", n + 1, Duration::from_secs(120));
    assert!(vm.cli(&["pause", &vm.name]).status.success());
}
