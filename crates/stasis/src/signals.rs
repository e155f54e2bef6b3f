//! SIGTERM, SIGINT and SIGHUP end the VM cleanly: they are blocked in every
//! thread and collected by one thread with `sigwait`, which reports them
//! like any other reason to stop.

use stasis_vmm::exit::{ExitReason, ExitSink};

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks the termination signals in the calling thread and every thread
/// it creates afterwards. Call before creating any thread.
pub fn block_termination_signals() {
    let set = termination_set();
    // SAFETY: `set` is a valid signal set; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Where termination signals go: the VM currently running. One thread
/// per process collects the signals; a process that runs VMs one after
/// another (the demo) points it at each in turn.
#[derive(Clone, Default)]
pub struct SignalTarget(std::sync::Arc<std::sync::Mutex<Option<ExitSink>>>);

impl SignalTarget {
    /// Sends the next signals to `sink`.
    pub fn set(&self, sink: ExitSink) {
        *self.0.lock().expect("signal target lock") = Some(sink);
    }
}

/// Starts the one thread that takes the (blocked) termination signals and
/// hands each to `on_signal`.
fn spawn_signal_thread(on_signal: impl Fn(libc::c_int) + Send + 'static) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Signals);
            signal_loop(on_signal)
        })
        .expect("spawn the signal thread");
}

/// Hands each termination signal to `on_signal`, for good.
fn signal_loop(on_signal: impl Fn(libc::c_int)) -> ! {
    loop {
        let set = termination_set();
        let mut sig: libc::c_int = 0;
        // SAFETY: valid set and out-pointer; the signals are blocked in
        // all threads, so sigwait is the only consumer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            on_signal(sig);
        }
    }
}

/// Starts the thread that turns a termination signal into an exit reason
/// for `sink`; returns the handle to redirect it.
///
/// The thread is started once per process; later calls (a VM rolled back
/// to a checkpoint runs in the same process) only point it at the new VM.
pub fn forward_termination_signals(sink: ExitSink) -> SignalTarget {
    static TARGET: std::sync::OnceLock<SignalTarget> = std::sync::OnceLock::new();
    let mut first = false;
    let target = TARGET
        .get_or_init(|| {
            first = true;
            SignalTarget::default()
        })
        .clone();
    target.set(sink);
    if first {
        let shared = target.clone();
        spawn_signal_thread(move |sig| {
            if let Some(sink) = shared.0.lock().expect("signal target lock").as_ref() {
                sink.report(ExitReason::Signal(sig));
            }
        });
    }
    target
}

/// For client commands that wait on a VM: counts SIGINT and SIGTERM
/// instead of dying of them, so that the first one can cancel what the
/// command waits for. Call before creating any thread.
pub fn count_interrupts() -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    block_termination_signals();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    spawn_signal_thread(move |_| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    count
}
