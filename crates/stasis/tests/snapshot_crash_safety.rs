//! A snapshot that fails or is killed half way never destroys the previous
//! one at the same path, and a failed snapshot leaves the VM running.

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

/// A VM whose memory workload has written 448 MiB, so that a snapshot of
/// it takes a while.
fn busy_vm(tag: &str) -> VmProcess {
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            memory: "512M",
            cmdline: "console=ttyS0 workload=memory mem_mib=448",
            ..Default::default()
        },
    );
    vm.wait_tagged("MEM", 1, Duration::from_secs(300));
    vm.wait_socket();
    vm
}

/// `stasis snapshot` of `vm` into `dir`, running in the background.
fn snapshot_in_background(vm: &VmProcess, dir: &Path) -> std::process::Child {
    std::process::Command::new(stasis_bin())
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

#[test]
fn killing_the_vmm_mid_snapshot_leaves_the_previous_snapshot_intact() {
    let mut vm = busy_vm("cs-kill");
    let snaps = Scratch::new("cs-kill-snap");
    let dir = snaps.join("snap");
    vm.snapshot(&dir, false);
    let before = fingerprint(&dir);

    let mut pending = snapshot_in_background(&vm, &dir);
    std::thread::sleep(Duration::from_millis(40));
    vm.signal(libc::SIGKILL);
    vm.wait_exit(Duration::from_secs(10));
    let client = pending.wait().unwrap();

    // Whatever moment the kill hit, the path holds one complete, valid
    // snapshot: the old one (killed before the rename) or the new one.
    let out = stasis(&["verify", dir.to_str().unwrap()], &vm.runtime_dir);
    assert!(out.status.success(), "snapshot damaged: {}", err_text(&out));
    let after = fingerprint(&dir);
    if !client.success() {
        assert_eq!(after, before, "a killed snapshot changed the previous one");
    }
    // And it restores.
    let mut r = restore_process("cs-kill-r", &dir, &vm.runtime_dir, &[]);
    let mem = r.wait_tagged("MEM", 1, Duration::from_secs(300));
    assert_eq!(num(&mem[0], "bad"), 0, "{}", mem[0]);
    // The next snapshot to the same path cleans up what the killed one left.
    r.wait_socket();
    r.snapshot(&dir, true);
    r.wait_exit(T);
    let leftovers: Vec<String> = std::fs::read_dir(snaps.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "snap")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn resume_is_refused_while_a_snapshot_runs() {
    let mut vm = busy_vm("cs-busy");
    let snaps = Scratch::new("cs-busy-snap");
    let dir = snaps.join("snap");
    let mut pending = snapshot_in_background(&vm, &dir);
    // While the snapshot holds the VM, resume (which would let the guest
    // run during the memory copy) is refused with a clear message.
    let mut refused = None;
    while pending.try_wait().unwrap().is_none() {
        let out = vm.cli(&["resume", &vm.name]);
        if !out.status.success() {
            refused = Some(err_text(&out));
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(pending.wait().unwrap().success(), "snapshot failed");
    let msg = refused.expect("no resume was attempted while the snapshot ran");
    assert!(msg.contains("a snapshot of the VM is in progress"), "{msg}");
    let out = stasis(&["verify", dir.to_str().unwrap()], &vm.runtime_dir);
    assert!(out.status.success(), "{}", err_text(&out));
    // Afterwards the VM runs and pause works again.
    let n = vm.tagged("MEM").len();
    vm.wait_tagged("MEM", n + 1, Duration::from_secs(120));
    assert!(vm.cli(&["pause", &vm.name]).status.success());
}
