//! Every way a VM ends gives its own message and exit status.

mod common;
use common::*;
use std::time::Duration;

fn action(tag: &str, what: &str, code: i32, message: &str) {
    let cmdline = format!("console=ttyS0 workload=action do={what} after_ms=50");
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            cmdline: &cmdline,
            ..Default::default()
        },
    );
    let st = vm.wait_exit(Duration::from_secs(60));
    let err = vm.stderr();
    assert!(
        vm.lines()
            .iter()
            .any(|l| l.starts_with(&format!("ACTION do={what}"))),
        "guest never announced the action\n{}",
        vm.lines().join("\n")
    );
    assert_eq!(st.code(), Some(code), "stderr: {err}");
    assert!(err.contains(message), "expected {message:?} in: {err}");
    assert!(err.contains(&format!("(exit status {code})")), "{err}");
}

#[test]
fn keyboard_controller_reset() {
    action(
        "ex-reset",
        "reset",
        3,
        "guest requested a reset (via i8042)",
    );
}

#[test]
fn acpi_poweroff() {
    action("ex-off", "shutdown", 0, "guest powered off");
}

#[test]
fn acpi_reset_register() {
    action(
        "ex-acpireset",
        "acpi-reset",
        3,
        "guest requested a reset (via ACPI reset register)",
    );
}

#[test]
fn triple_fault() {
    action("ex-triple", "triple-fault", 4, "triple fault on vCPU 0");
}

#[test]
fn kvm_internal_error() {
    action(
        "ex-internal",
        "mmio-exec",
        5,
        "KVM internal error on vCPU 0",
    );
}

fn signal(tag: &str, sig: i32, code: i32, name: &str) {
    let mut vm = VmProcess::start(tag, VmOpts::default());
    vm.wait_tagged("HB", 2, Duration::from_secs(60));
    vm.signal(sig);
    let st = vm.wait_exit(Duration::from_secs(20));
    let err = vm.stderr();
    assert_eq!(st.code(), Some(code), "stderr: {err}");
    assert!(
        err.contains(&format!("received {name} (exit status {code})")),
        "{err}"
    );
    assert!(!vm.socket().exists(), "API socket left behind after {name}");
}

#[test]
fn sigterm_ends_the_vm_cleanly() {
    signal("ex-term", libc::SIGTERM, 143, "SIGTERM");
}

#[test]
fn sigint_ends_the_vm_cleanly() {
    signal("ex-int", libc::SIGINT, 130, "SIGINT");
}
