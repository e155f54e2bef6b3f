//! Landlock: a VM writes state only into the directories it was given
//! (`--state-dir`, by default its first disk's directory or its own
//! state directory). stasis refuses a target elsewhere before it tries,
//! and Landlock stops the attempt when stasis's own check is skipped
//! (the test hook `STASIS_TEST_SKIP_WRITE_CHECK`).

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

fn start(tag: &str, s: &Scratch, state: Option<&Path>, env: &[(&str, &str)]) -> VmProcess {
    let mut extra = vec!["--rng".to_string(), "id=r0".to_string()];
    if let Some(d) = state {
        extra.extend(["--state-dir".to_string(), d.display().to_string()]);
    }
    let _ = s;
    let mut env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // No default from the environment: only what this test gives.
    env.push(("STASIS_STATE_DIR".into(), String::new()));
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            memory: "32M",
            cmdline: "console=ttyS0 workload=heartbeat hb_ms=50",
            extra,
            env,
            ..Default::default()
        },
    );
    vm.wait_tagged("HB", 2, Duration::from_secs(60));
    vm.wait_socket();
    vm
}

fn snapshot(vm: &VmProcess, dir: &Path) -> std::process::Output {
    vm.cli(&["snapshot", &vm.name, dir.to_str().unwrap()])
}

#[test]
fn a_snapshot_outside_the_state_directories_is_refused_before_it_starts() {
    let s = Scratch::new("landlock-refuse");
    let state = s.join("state");
    let elsewhere = s.join("elsewhere");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let vm = start("landlock-refuse", &s, Some(&state), &[]);
    let out = snapshot(&vm, &state.join("snap"));
    assert!(out.status.success(), "{}", err_text(&out));
    let out = snapshot(&vm, &elsewhere.join("snap"));
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    let err = err_text(&out);
    assert!(
        err.contains(&format!(
            "snapshot target {} is outside the directories this VM may write",
            elsewhere.join("snap").display()
        )),
        "{err}"
    );
    assert!(err.contains("--state-dir"), "{err}");
    assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
    // A checkpoint store outside is refused the same way.
    let out = vm.cli(&[
        "checkpoint",
        &vm.name,
        "c1",
        "--store",
        elsewhere.join("store").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(err_text(&out).contains("is outside the directories this VM may write"));
    // The VM runs on.
    let mut vm = vm;
    vm.wait_tagged("HB", 4, Duration::from_secs(60));
}

#[test]
fn landlock_stops_a_write_that_stasis_did_not_refuse() {
    let s = Scratch::new("landlock-enforce");
    let state = s.join("state");
    let elsewhere = s.join("elsewhere");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let vm = start(
        "landlock-enforce",
        &s,
        Some(&state),
        &[("STASIS_TEST_SKIP_WRITE_CHECK", "1")],
    );
    let out = snapshot(&vm, &elsewhere.join("snap"));
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("Permission denied"),
        "{}",
        err_text(&out)
    );
    assert!(
        std::fs::read_dir(&elsewhere).unwrap().next().is_none(),
        "something was written outside"
    );
    // The runtime directory takes the API socket, and nothing else.
    let before: Vec<_> = std::fs::read_dir(&vm.runtime_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let out = snapshot(&vm, &vm.runtime_dir.join("snap"));
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("Permission denied"),
        "{}",
        err_text(&out)
    );
    let after: Vec<_> = std::fs::read_dir(&vm.runtime_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        before, after,
        "something was written in the runtime directory"
    );
    // Inside still works: the failure was Landlock's, not a broken VM.
    let out = snapshot(&vm, &state.join("snap"));
    assert!(out.status.success(), "{}", err_text(&out));
}

#[test]
fn without_state_dir_a_vm_writes_only_into_its_own_state_directory() {
    let s = Scratch::new("landlock-default");
    let vm = start("landlock-default", &s, None, &[]);
    let own = vm.runtime_dir.join(format!("{}.state", vm.name));
    assert!(own.is_dir(), "no {}", own.display());
    let out = snapshot(&vm, &own.join("snap"));
    assert!(out.status.success(), "{}", err_text(&out));
    let out = snapshot(&vm, &s.join("snap"));
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains(&format!("({})", own.canonicalize().unwrap().display())),
        "{}",
        err_text(&out)
    );
}

#[test]
fn require_sandbox_refuses_to_run_unconfined() {
    require_kvm();
    let s = Scratch::new("landlock-require");
    let kernel = guest(s.path());
    let out = stasis_cmd()
        .env("STASIS_RUNTIME_DIR", s.join("run"))
        .args(["run", "--name", "unconfined", "--memory", "32M", "--kernel"])
        .arg(&kernel)
        .args(["--seccomp", "off", "--require-sandbox"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("--require-sandbox and --seccomp=off contradict each other"),
        "{}",
        err_text(&out)
    );
    assert!(!s.join("run/unconfined.sock").exists());
}

#[test]
fn a_migrated_vm_is_confined_on_its_destination_too() {
    use common::migration::{key_file, migrate, receiver};
    let s = Scratch::new("landlock-receive");
    let state = s.join("state");
    let elsewhere = s.join("elsewhere");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    // The key lies outside the VMs' state directories: `stasis migrate`
    // reads it for the confined VMM.
    let keys = s.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = key_file(&keys, "key", 7);
    let key = key.to_str().unwrap();
    let mut src = start("landlock-src", &s, Some(&state), &[]);
    let dst = receiver(
        "landlock-dst",
        None,
        "127.0.0.1",
        &["--psk", key, "--state-dir", state.to_str().unwrap()],
        &[],
    );
    let out = migrate(&src, &dst.address, &["--psk", key]);
    assert!(out.status.success(), "{}", err_text(&out));
    src.wait_exit(Duration::from_secs(60));
    let mut arrived = dst.named(&src.name);
    arrived.vm.wait_tagged("HB", 2, Duration::from_secs(60));
    let out = snapshot(&arrived.vm, &elsewhere.join("snap"));
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("is outside the directories this VM may write"),
        "{}",
        err_text(&out)
    );
    let out = snapshot(&arrived.vm, &state.join("snap"));
    assert!(out.status.success(), "{}", err_text(&out));
}

#[test]
fn a_confined_vm_rolls_back_with_its_output_file_elsewhere() {
    // The state directory is the disk's; the serial log is in another
    // directory, created by the VM: a rollback opens it again.
    let s = Scratch::new("landlock-rollback");
    let disks = s.join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let disk = disks.join("d0.img");
    sparse_file(&disk, 16 << 20);
    let mut vm = VmProcess::start(
        "landlock-rollback",
        VmOpts {
            memory: "32M",
            cmdline: "console=ttyS0 workload=heartbeat hb_ms=50",
            extra: vec!["--disk".into(), format!("id=d0,path={}", disk.display())],
            env: vec![("STASIS_STATE_DIR".into(), String::new())],
            ..Default::default()
        },
    );
    vm.wait_tagged("HB", 2, Duration::from_secs(60));
    vm.wait_socket();
    let out = vm.cli(&["checkpoint", &vm.name, "c1", "--external"]);
    assert!(out.status.success(), "{}", err_text(&out));
    assert!(disks.join(format!("{}.checkpoints", vm.name)).is_dir());
    let before = vm.tagged("HB").len();
    let out = vm.cli(&["rollback", &vm.name, "c1"]);
    assert!(out.status.success(), "{}", err_text(&out));
    vm.wait_tagged("HB", before + 3, Duration::from_secs(60));
    assert!(
        vm.stderr().contains("restored from a snapshot"),
        "{}",
        vm.stderr()
    );
    assert!(vm.child.try_wait().unwrap().is_none(), "{}", vm.stderr());
}
