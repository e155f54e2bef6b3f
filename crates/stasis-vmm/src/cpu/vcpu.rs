//! The vCPU threads: one host thread per vCPU running `KVM_RUN`, exits
//! dispatched to the device buses, and the park/unpark protocol behind
//! pause, resume and stop.

use std::collections::VecDeque;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::channel;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::kick;
use super::regs;
use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSink};

/// What the VMM wants the vCPU threads to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// Work for a parked vCPU thread, run on its own vCPU fd.
type VcpuCommand = Box<dyn FnOnce(&mut VcpuFd) + Send>;

struct ControlState {
    request: Request,
    /// Threads parked in response to `Pause`.
    parked: usize,
    /// Threads that have left their run loop for good.
    exited: usize,
    /// Per-vCPU queues of commands to run while parked.
    mailboxes: Vec<VecDeque<VcpuCommand>>,
}

impl std::fmt::Debug for ControlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlState")
            .field("request", &self.request)
            .field("parked", &self.parked)
            .field("exited", &self.exited)
            .finish_non_exhaustive()
    }
}

/// Shared between the VMM and its vCPU threads: the current request and how
/// many threads have acted on it.
#[derive(Debug)]
pub struct RunControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    /// Mirrors `state.request == Run` for the vCPU fast path.
    requested_run: std::sync::atomic::AtomicBool,
}

impl Default for RunControl {
    fn default() -> Self {
        Self {
            state: Mutex::new(ControlState {
                request: Request::Run,
                parked: 0,
                exited: 0,
                mailboxes: Vec::new(),
            }),
            changed: Condvar::new(),
            requested_run: std::sync::atomic::AtomicBool::new(true),
        }
    }
}

impl RunControl {
    fn set(&self, r: Request) {
        self.state.lock().expect("control lock").request = r;
        self.requested_run
            .store(r == Request::Run, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Whether the VMM wants the vCPUs out of the guest (cheap: no lock).
    fn stop_or_pause_requested(&self) -> bool {
        !self.requested_run.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `pred` holds or `timeout` passes; returns whether it holds.
    fn wait_for(&self, timeout: Duration, pred: impl Fn(&ControlState) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().expect("control lock");
        while !pred(&st) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self.changed.wait_timeout(st, left).expect("control lock").0;
        }
        true
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while paused,
    /// running any commands posted for it meanwhile. Returns false when the
    /// thread must stop.
    fn wait_runnable(&self, index: usize, vcpu: &mut VcpuFd) -> bool {
        let mut st = self.state.lock().expect("control lock");
        if st.request == Request::Pause {
            st.parked += 1;
            self.changed.notify_all();
            while st.request == Request::Pause {
                if let Some(cmd) = st.mailboxes.get_mut(index).and_then(|m| m.pop_front()) {
                    drop(st);
                    cmd(vcpu);
                    st = self.state.lock().expect("control lock");
                    continue;
                }
                st = self.changed.wait(st).expect("control lock");
            }
            st.parked -= 1;
            self.changed.notify_all();
        }
        st.request != Request::Stop
    }

    fn mark_exited(&self) {
        self.state.lock().expect("control lock").exited += 1;
        self.changed.notify_all();
    }
}

/// Everything a vCPU thread needs besides its vCPU.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where to report that the VM must end.
    pub exit: ExitSink,
    /// Pause/stop requests.
    pub control: Arc<RunControl>,
}

/// The running vCPU threads of a VM.
pub struct VcpuThreads {
    threads: Vec<JoinHandle<()>>,
    control: Arc<RunControl>,
}

/// A vCPU thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VcpuThreadError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(std::io::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the thread for vCPU {index}: {source}")]
    Spawn {
        /// The vCPU.
        index: usize,
        /// The error.
        source: std::io::Error,
    },
    /// A command was posted to vCPUs that are not paused.
    #[error("vCPU state can only be read while the VM is paused")]
    NotPaused,
    /// A vCPU thread ended before answering a command.
    #[error("vCPU {0} has exited")]
    Gone(usize),
    /// Not every vCPU reached the requested state in time.
    #[error("{waiting} of {total} vCPUs did not stop running within {timeout_ms} ms")]
    Timeout {
        /// How many are still running.
        waiting: usize,
        /// How many there are.
        total: usize,
        /// How long we waited.
        timeout_ms: u128,
    },
}

impl VcpuThreads {
    /// Starts one thread per vCPU, named `vcpu<N>`.
    pub fn start(vcpus: Vec<VcpuFd>, ctx: VcpuContext) -> Result<Self, VcpuThreadError> {
        kick::install_handler().map_err(VcpuThreadError::Signal)?;
        let mut threads = Vec::with_capacity(vcpus.len());
        let control = ctx.control.clone();
        control.state.lock().expect("control lock").mailboxes =
            (0..vcpus.len()).map(|_| VecDeque::new()).collect();
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let ctx = ctx.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || run_loop(vcpu, index as u32, ctx))
                .map_err(|source| VcpuThreadError::Spawn { index, source })?;
            threads.push(t);
        }
        Ok(Self { threads, control })
    }

    fn kick_all(&self) {
        for t in &self.threads {
            // SAFETY: the pthread_t belongs to a thread we have not joined
            // yet, so it is valid; pthread_kill only queues a signal.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick::kick_signal()) };
        }
    }

    /// Brings every vCPU out of `KVM_RUN` and parks it; returns once all
    /// are parked (or have exited).
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuThreadError> {
        self.control.set(Request::Pause);
        self.kick_all();
        let total = self.threads.len();
        if self
            .control
            .wait_for(timeout, |s| s.parked + s.exited >= total)
        {
            Ok(())
        } else {
            let st = self.control.state.lock().expect("control lock");
            Err(VcpuThreadError::Timeout {
                waiting: total - st.parked - st.exited,
                total,
                timeout_ms: timeout.as_millis(),
            })
        }
    }

    /// Runs `f` on every parked vCPU's own thread (KVM state ioctls belong
    /// on the vCPU's thread) and returns the results in vCPU order. The VM
    /// must be paused.
    pub fn run_on_each<R: Send + 'static>(
        &self,
        f: impl Fn(u32, &mut VcpuFd) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>, VcpuThreadError> {
        let f = Arc::new(f);
        let (tx, rx) = channel();
        let n = self.threads.len();
        {
            let mut st = self.control.state.lock().expect("control lock");
            if st.exited > 0 {
                return Err(VcpuThreadError::Gone(n));
            }
            if st.request != Request::Pause || st.parked < n {
                return Err(VcpuThreadError::NotPaused);
            }
            for (i, mailbox) in st.mailboxes.iter_mut().enumerate() {
                let (f, tx) = (f.clone(), tx.clone());
                mailbox.push_back(Box::new(move |vcpu: &mut VcpuFd| {
                    let _ = tx.send((i, f(i as u32, vcpu)));
                }));
            }
        }
        drop(tx);
        self.control.changed.notify_all();
        let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
        for (i, r) in rx.iter() {
            out[i] = Some(r);
        }
        out.into_iter()
            .enumerate()
            .map(|(i, r)| r.ok_or(VcpuThreadError::Gone(i)))
            .collect()
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.control.set(Request::Run);
    }

    /// Stops every vCPU thread and waits for them.
    pub fn stop(self) {
        self.control.set(Request::Stop);
        self.kick_all();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Marks a vCPU thread as gone when it leaves its loop, also by panic:
/// commands still queued for it are dropped with their senders, so a
/// waiting `run_on_each` sees it as gone instead of hanging.
struct ExitedGuard<'a>(&'a RunControl, usize);

impl Drop for ExitedGuard<'_> {
    fn drop(&mut self) {
        kick::set_current_kvm_run(std::ptr::null_mut());
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = st.mailboxes.get_mut(self.1) {
            m.clear();
        }
        drop(st);
        self.0.mark_exited();
    }
}

fn run_loop(mut vcpu: VcpuFd, index: u32, ctx: VcpuContext) {
    kick::set_current_kvm_run(vcpu.get_kvm_run());
    let _exited = ExitedGuard(&ctx.control, index as usize);
    let mut pending = Handled::Done;
    loop {
        if pending == Handled::PendingIo && ctx.control.stop_or_pause_requested() {
            // Finish the port/MMIO instruction before parking, so that the
            // state a snapshot reads is consistent (KVM completes it at the
            // start of KVM_RUN, then returns EINTR because of
            // immediate_exit; string I/O may need more than one round).
            vcpu.set_kvm_immediate_exit(1);
        } else {
            // Clear a kick before looking at the request, so a kick that
            // arrives after the check still interrupts the next KVM_RUN.
            vcpu.set_kvm_immediate_exit(0);
            if !ctx.control.wait_runnable(index as usize, &mut vcpu) {
                break;
            }
        }
        match handle_one_run(&mut vcpu, index, &ctx) {
            Ok(h) => pending = h,
            Err(reason) => {
                ctx.exit.report(reason);
                break;
            }
        }
    }
}

/// What a handled exit leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// A port or MMIO access: KVM completes the instruction (writes the
    /// read value, advances RIP) only on the next `KVM_RUN`.
    PendingIo,
    /// Nothing pending (including `EINTR` from a kick).
    Done,
}

/// Runs the vCPU until its next exit and handles it. `Err` carries a
/// reason that ends the VM.
fn handle_one_run(vcpu: &mut VcpuFd, index: u32, ctx: &VcpuContext) -> Result<Handled, ExitReason> {
    match vcpu.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            if !ctx.pio.read(u64::from(port), data) {
                tracing::trace!("vcpu{index}: unclaimed port read {port:#x}");
            }
            Ok(Handled::PendingIo)
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            if !ctx.pio.write(u64::from(port), data) && port != 0x80 {
                tracing::trace!("vcpu{index}: unclaimed port write {port:#x}");
            }
            Ok(Handled::PendingIo)
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if !ctx.mmio.read(addr, data) {
                tracing::debug!("vcpu{index}: unclaimed MMIO read {addr:#x}");
            }
            Ok(Handled::PendingIo)
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            if !ctx.mmio.write(addr, data) {
                tracing::debug!("vcpu{index}: unclaimed MMIO write {addr:#x}");
            }
            Ok(Handled::PendingIo)
        }
        Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => Ok(Handled::Done),
        Ok(VcpuExit::Shutdown) => Err(ExitReason::TripleFault {
            vcpu: index,
            detail: regs::describe(vcpu),
        }),
        Ok(VcpuExit::InternalError) => {
            let run = vcpu.get_kvm_run();
            // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
            // `internal` member of the union is the one KVM filled in.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let n = (internal.ndata as usize).min(internal.data.len());
            let data: Vec<String> = internal.data[..n]
                .iter()
                .map(|d| format!("{d:#x}"))
                .collect();
            Err(ExitReason::KvmInternalError {
                vcpu: index,
                suberror: internal.suberror,
                detail: format!("{}; data [{}]", regs::describe(vcpu), data.join(", ")),
            })
        }
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Err(ExitReason::GuestPoweroff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Err(ExitReason::GuestReset {
                source: "KVM system event",
            }),
            other => Err(ExitReason::VcpuError {
                vcpu: index,
                detail: format!("system event {other}"),
            }),
        },
        Ok(VcpuExit::FailEntry(reason, cpu)) => Err(ExitReason::VcpuError {
            vcpu: index,
            detail: format!("KVM_EXIT_FAIL_ENTRY: hardware reason {reason:#x} on host CPU {cpu}"),
        }),
        Ok(other) => Err(ExitReason::VcpuError {
            vcpu: index,
            detail: format!("unexpected exit {other:?}"),
        }),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(Handled::Done),
        Err(e) => Err(ExitReason::VcpuError {
            vcpu: index,
            detail: format!("KVM_RUN failed: {e}"),
        }),
    }
}
