//! What happens when a thread of the VMM panics: the VM ends at once with
//! exit status [`EXIT_INTERNAL_ERROR`] and a message naming the thread and
//! the panic, and the API socket is removed. A panic is a bug in stasis;
//! running on with a vCPU or device thread gone, or with locks that the
//! panic poisoned, would be a half-alive VM whose state no snapshot can be
//! trusted with, so the process does not try.

use std::path::PathBuf;
use std::sync::Mutex;

/// Exit status when the VMM itself failed (a panic).
pub const EXIT_INTERNAL_ERROR: i32 = 7;

/// The VM to name, and files to remove, when a panic ends the process.
static CURRENT: Mutex<Option<(String, Vec<PathBuf>)>> = Mutex::new(None);

/// Installs the panic hook (once) and records which VM this process runs
/// and which files to remove if a panic ends it.
pub fn install(vm_name: &str, remove_on_exit: Vec<PathBuf>) {
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((vm_name.to_string(), remove_on_exit));
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(on_panic)));
}

fn on_panic(info: &std::panic::PanicHookInfo<'_>) {
    let thread = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_string();
    let msg = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    let at = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    // Whoever holds the lock is another panicking thread: it exits.
    let current = CURRENT.try_lock().ok().and_then(|g| g.clone());
    let name = current
        .as_ref()
        .map(|(n, _)| format!("VM '{n}'"))
        .unwrap_or_else(|| "the VMM".into());
    eprintln!(
        "stasis: {name} ended: internal error: thread '{thread}' panicked{at}: {msg} (exit status {EXIT_INTERNAL_ERROR})"
    );
    // A backtrace reads the executable's symbols: not from a thread whose
    // filter forbids opening files.
    let may_open = !matches!(
        stasis_sandbox::current_kind(),
        Some(stasis_sandbox::ThreadKind::Vcpu | stasis_sandbox::ThreadKind::Signals)
    ) || stasis_sandbox::mode() != Some(stasis_sandbox::Mode::Kill);
    if std::env::var_os("RUST_BACKTRACE").is_some() {
        if may_open {
            eprintln!("{}", std::backtrace::Backtrace::force_capture());
        } else {
            eprintln!("stasis: (no backtrace from a {thread} thread: its seccomp filter forbids reading the executable)");
        }
    }
    for p in current.map(|(_, f)| f).unwrap_or_default() {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(EXIT_INTERNAL_ERROR);
}

/// Ends the process at once from any thread, as a panic would, but for a
/// failure that is not a bug (restored memory found damaged while the
/// guest runs): names the VM, removes its files, exits with `code`.
pub fn fatal_exit(message: &str, code: i32) -> ! {
    let current = CURRENT.lock().ok().and_then(|g| g.clone());
    let name = current
        .as_ref()
        .map(|(n, _)| format!("VM '{n}'"))
        .unwrap_or_else(|| "the VM".into());
    eprintln!("stasis: {name} ended: {message} (exit status {code})");
    for p in current.map(|(_, f)| f).unwrap_or_default() {
        let _ = std::fs::remove_file(p);
    }
    std::process::exit(code);
}
