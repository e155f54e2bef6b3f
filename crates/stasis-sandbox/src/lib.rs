//! Seccomp filters for stasis, one allow-list per kind of thread.
//!
//! Every thread of a VMM belongs to a [`ThreadKind`]. When its setup is
//! done it calls [`enter`], which installs the allow-list of its kind
//! (built with the `seccompiler` crate) on that thread. A system call
//! outside the list traps: the `SIGSYS` handler of this crate writes
//! `stasis: seccomp: thread 'vcpu0' (vCPU) made a forbidden system call:
//! syslog (103)` to standard error and ends the process with `SIGSYS`.
//!
//! Filters stack: a thread created by a filtered thread keeps its
//! creator's filter and adds its own, so a kind that creates threads has
//! a list that covers its children's (see [`lists`]).
//!
//! The mode is chosen once per process with [`configure`]: `kill` (the
//! default of `stasis run`, `restore` and `receive`), `log` (violations
//! are allowed and logged by the kernel, `dmesg` shows `audit: type=1326`
//! lines, for finding what a list lacks) or `off`. Until [`configure`] is
//! called, [`enter`] does nothing (libraries and their tests run
//! unfiltered).

#![warn(missing_docs)]

mod confine;
mod lists;
mod names;
mod sigsys;

use std::sync::OnceLock;

pub use confine::{
    check_writable, prepare as prepare_landlock, writable_dirs, Confinement, FsPolicy,
};
pub use names::syscall_name;

/// What kind of work a thread does; each kind has its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Runs one vCPU (`KVM_RUN` and its exits).
    Vcpu,
    /// Serves a device: a virtio queue thread, the serial socket.
    DeviceIo,
    /// Serves the control API (and starts jobs).
    Api,
    /// A job: writes a snapshot or checkpoint, migrates, fills memory.
    Job,
    /// Waits for termination signals.
    Signals,
    /// The main thread, once the VM runs.
    Main,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vcpu,
        ThreadKind::DeviceIo,
        ThreadKind::Api,
        ThreadKind::Job,
        ThreadKind::Signals,
        ThreadKind::Main,
    ];

    /// Its name in messages and in `STASIS_SECCOMP_PROBE`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::DeviceIo => "device I/O",
            ThreadKind::Api => "API",
            ThreadKind::Job => "job",
            ThreadKind::Signals => "signals",
            ThreadKind::Main => "main",
        }
    }

    fn probe_name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceIo => "device-io",
            ThreadKind::Api => "api",
            ThreadKind::Job => "job",
            ThreadKind::Signals => "signals",
            ThreadKind::Main => "main",
        }
    }
}

/// How filters act on a system call outside their list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The process ends with a message naming the thread and the call.
    Kill,
    /// The call goes through and the kernel logs it (for debugging).
    Log,
    /// No filters at all.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("--seccomp {s}: expected kill, log or off")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Kill => "kill",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

/// Why a filter could not be installed.
#[derive(Debug)]
pub struct SandboxError(String);

impl std::fmt::Display for SandboxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SandboxError {}

static MODE: OnceLock<Mode> = OnceLock::new();

/// The environment variable of the test hook: the first thread of the
/// kind it names (`vcpu`, `device-io`, `api`, `job`, `signals`, `main`)
/// makes a forbidden system call as soon as its filter is in place.
pub const PROBE_ENV: &str = "STASIS_SECCOMP_PROBE";

/// Chooses the mode for this process (the first call wins) and, for
/// `kill`, installs the `SIGSYS` handler. Call it before any thread
/// exists, so every thread shares the handler.
pub fn configure(mode: Mode) -> Result<(), SandboxError> {
    let mode = *MODE.get_or_init(|| mode);
    if mode == Mode::Kill {
        sigsys::install().map_err(|e| SandboxError(format!("cannot handle SIGSYS: {e}")))?;
    }
    Ok(())
}

/// The kind of filter the calling thread installed, if any.
pub fn current_kind() -> Option<ThreadKind> {
    sigsys::current()
}

/// The mode chosen, if any.
pub fn mode() -> Option<Mode> {
    MODE.get().copied()
}

/// Confines the calling thread: the Landlock ruleset prepared with
/// [`prepare_landlock`], if any, then the allow-list of `kind`, if a mode
/// other than `off` was configured. The thread's name (as `/proc` shows
/// it) and kind are remembered for the `SIGSYS` message.
pub fn enter(kind: ThreadKind) -> Result<(), SandboxError> {
    // Once per thread and kind: a rolled-back VM's main thread comes here
    // again, and stacked filters have a total size limit.
    if sigsys::installed(kind) {
        return Ok(());
    }
    sigsys::remember(kind);
    confine::restrict_thread()?;
    let mode = match MODE.get() {
        None | Some(Mode::Off) => return Ok(()),
        Some(m) => *m,
    };
    let program = lists::program(kind, mode)
        .map_err(|e| SandboxError(format!("cannot build the {} filter: {e}", kind.name())))?;
    seccompiler::apply_filter(program).map_err(|e| {
        SandboxError(format!(
            "cannot install the {} seccomp filter: {e}",
            kind.name()
        ))
    })?;
    probe(kind);
    Ok(())
}

/// [`enter`], logging a failure instead of returning it (for threads that
/// have no way to report one): a thread without its filter still runs
/// under the filters it inherited.
pub fn enter_or_warn(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        tracing::error!("{e}");
    }
}

/// The test hook of [`PROBE_ENV`].
fn probe(kind: ThreadKind) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let wanted = std::env::var(PROBE_ENV).ok();
    if wanted.as_deref() == Some(kind.probe_name())
        && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        // SAFETY: syslog(SYSLOG_ACTION_SIZE_BUFFER) only asks for the
        // kernel log's size; no list allows it, so the filter acts on it.
        unsafe {
            libc::syscall(
                libc::SYS_syslog,
                10,
                std::ptr::null_mut::<libc::c_char>(),
                0,
            )
        };
    }
}
