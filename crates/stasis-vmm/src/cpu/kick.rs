//! Getting a vCPU thread out of `KVM_RUN` promptly.
//!
//! The requester sets a flag and sends [`kick_signal`] to the vCPU thread.
//! The signal handler sets `immediate_exit` in that thread's `kvm_run`, so
//! `KVM_RUN` returns `EINTR` whether the signal lands while the guest runs
//! or just before the thread enters `KVM_RUN`. A port or MMIO instruction
//! that exited to userspace is only finished by the next `KVM_RUN`, so a
//! vCPU thread that must park right after such an exit first re-enters
//! `KVM_RUN` with `immediate_exit` set: KVM completes the instruction and
//! returns `EINTR` (see `vcpu.rs`). No instruction is lost or repeated.

use std::cell::Cell;
use std::ptr::null_mut;

use kvm_bindings::kvm_run;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    // Const-initialised: reading it in a signal handler runs no lazy init.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run, set by
        // `set_current_kvm_run` and cleared before the mapping goes away;
        // a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler (once per process).
pub fn install_handler() -> std::io::Result<()> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.errno()))
        .to_owned()
        .map_err(std::io::Error::from_raw_os_error)
}

/// Records the calling vCPU thread's `kvm_run` for the signal handler.
/// Pass null before the vCPU is dropped.
pub fn set_current_kvm_run(run: *mut kvm_run) {
    KVM_RUN_PTR.with(|p| p.set(run));
}
