//! Pause, resume, status, list and stop through the CLI and through curl
//! while a guest runs; no guest progress is lost or repeated.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Pauses with `pause`, checks that nothing moves for a while, resumes with
/// `resume`, and checks the heartbeat continues with the next sequence
/// number and a larger counter.
fn pause_resume_cycle(vm: &mut VmProcess, pause: &dyn Fn(&VmProcess), resume: &dyn Fn(&VmProcess)) {
    vm.wait_tagged("HB", 3, T);
    pause(vm);
    let frozen = vm.lines();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(vm.lines(), frozen, "guest produced output while paused");
    let last = frozen
        .iter()
        .rev()
        .find(|l| l.starts_with("HB "))
        .unwrap()
        .clone();
    resume(vm);
    let n = vm.tagged("HB").len();
    let hb = vm.wait_tagged("HB", n + 2, T);
    let next = &hb[n..];
    let idx = hb.iter().position(|l| *l == last).unwrap();
    let after = &hb[idx + 1];
    assert_eq!(
        num(after, "seq"),
        num(&last, "seq") + 1,
        "heartbeat sequence not continuous across pause: {last} -> {after}"
    );
    assert!(
        num(after, "counter") > num(&last, "counter"),
        "{last} -> {after}"
    );
    assert!(num(&next[1], "counter") > num(&next[0], "counter"));
}

fn vm_opts() -> VmOpts<'static> {
    VmOpts {
        cmdline: "console=ttyS0 workload=heartbeat hb_ms=50",
        ..Default::default()
    }
}

#[test]
fn pause_and_resume_through_the_cli() {
    let mut vm = VmProcess::start("ctl-cli", vm_opts());
    vm.wait_socket();
    let name = vm.name.clone();
    pause_resume_cycle(
        &mut vm,
        &|vm| {
            let out = vm.cli(&["pause", &name]);
            assert!(out.status.success(), "{}", err_text(&out));
            let out = vm.cli(&["status", &name]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(text.contains("state:       paused"), "{text}");
        },
        &|vm| {
            let out = vm.cli(&["resume", &name]);
            assert!(out.status.success(), "{}", err_text(&out));
            assert!(String::from_utf8_lossy(&out.stdout).contains("running"));
        },
    );
    let out = vm.cli(&["stop", &name]);
    assert!(out.status.success(), "{}", err_text(&out));
    let st = vm.wait_exit(Duration::from_secs(20));
    assert_eq!(st.code(), Some(0));
    assert!(
        vm.stderr().contains("stopped on request (exit status 0)"),
        "{}",
        vm.stderr()
    );
}

fn curl(vm: &VmProcess, method: &str, path: &str) -> (u16, serde_json::Value) {
    let out = Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(vm.socket())
        .args(["-X", method, "-w", "\n%{http_code}"])
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl is needed for this test (apt-get install curl)");
    assert!(out.status.success(), "curl failed: {}", err_text(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), serde_json::from_str(body).unwrap())
}

#[test]
fn pause_and_resume_through_curl() {
    let mut vm = VmProcess::start("ctl-curl", vm_opts());
    vm.wait_socket();
    let (code, info) = curl(&vm, "GET", "/v1/vm");
    assert_eq!(code, 200);
    assert_eq!(info["name"], vm.name.as_str());
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 1);
    pause_resume_cycle(
        &mut vm,
        &|vm| {
            let (code, body) = curl(vm, "PUT", "/v1/vm/pause");
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["state"], "paused");
            assert_eq!(curl(vm, "GET", "/v1/vm").1["state"], "paused");
        },
        &|vm| {
            let (code, body) = curl(vm, "PUT", "/v1/vm/resume");
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["state"], "running");
        },
    );
    let (code, body) = curl(&vm, "GET", "/v1/nope");
    assert_eq!(code, 404, "{body}");
    let (code, _) = curl(&vm, "PUT", "/v1/vm/shutdown");
    assert_eq!(code, 200);
    assert_eq!(vm.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn repeated_pause_resume_loses_nothing() {
    let mut vm = VmProcess::start("ctl-many", vm_opts());
    vm.wait_socket();
    let name = vm.name.clone();
    for _ in 0..5 {
        assert!(vm.cli(&["pause", &name]).status.success());
        // PUT is idempotent: pausing a paused VM (or resuming a running one) succeeds.
        assert!(vm.cli(&["pause", &name]).status.success());
        assert!(vm.cli(&["resume", &name]).status.success());
        assert!(vm.cli(&["resume", &name]).status.success());
    }
    let n = vm.tagged("HB").len();
    let hb = vm.wait_tagged("HB", n + 3, T);
    for w in hb.windows(2) {
        assert_eq!(
            num(&w[1], "seq"),
            num(&w[0], "seq") + 1,
            "{} -> {}",
            w[0],
            w[1]
        );
        assert!(num(&w[1], "counter") > num(&w[0], "counter"));
    }
}

#[test]
fn list_and_status_find_vms_by_name() {
    let mut vm = VmProcess::start("ctl-list", vm_opts());
    vm.wait_socket();
    let out = vm.cli(&["list"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success());
    let row = text
        .lines()
        .find(|l| l.starts_with(&vm.name))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("running"), "{row}");
    let out = vm.cli(&["status", &vm.name, "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["pid"], vm.child.id());
    assert_eq!(info["memory_mib"], 64);
    let out = vm.cli(&["status", "no-such-vm"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out).contains("no VM named no-such-vm"),
        "{}",
        err_text(&out)
    );
}

#[test]
fn second_vm_with_the_same_name_is_refused() {
    let mut vm = VmProcess::start("ctl-dup", vm_opts());
    vm.wait_socket();
    // Its own copy of the kernel: the first VM may still be loading its
    // copy when the socket appears.
    let other = Scratch::new("ctl-dup-kernel");
    let k = guest(other.path());
    let out = vm.cli(&["run", "--name", &vm.name, "--kernel", k.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(err_text(&out).contains("already"), "{}", err_text(&out));
    // The first VM is unaffected.
    let n = vm.tagged("HB").len();
    vm.wait_tagged("HB", n + 1, T);
}
