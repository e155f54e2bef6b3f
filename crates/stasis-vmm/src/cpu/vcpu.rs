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
        }
    }
}

impl RunControl {
    fn set(&self, r: Request) {
        self.state.lock().expect("control lock").request = r;
        self.changed.notify_all();
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

    /// Called by a vCPU thread before each `KVM_RUN`, with whether its
    /// last exit left a port or MMIO instruction for KVM to finish. Under
    /// the lock, so a pause cannot slip in between the decision and the
    /// park: with an unfinished instruction and a pause or stop requested,
    /// it answers [`Gate::CompleteIo`] (run once more, with
    /// `immediate_exit`, so KVM finishes it); otherwise it parks while
    /// paused, running any commands posted for it meanwhile.
    fn gate(&self, index: usize, vcpu: &mut VcpuFd, pending: Handled) -> Gate {
        let mut st = self.state.lock().expect("control lock");
        if st.request != Request::Run && pending == Handled::PendingIo {
            return Gate::CompleteIo;
        }
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
        if st.request == Request::Stop {
            Gate::Stop
        } else {
            Gate::Run
        }
    }

    fn mark_exited(&self) {
        self.state.lock().expect("control lock").exited += 1;
        self.changed.notify_all();
    }
}

/// What a vCPU thread does next (see [`RunControl::gate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Enter the guest.
    Run,
    /// Enter `KVM_RUN` with `immediate_exit` set, so KVM completes the
    /// last port or MMIO instruction and returns at once.
    CompleteIo,
    /// Leave the run loop.
    Stop,
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

/// How often a pause that is still waiting kicks the vCPUs again.
const REKICK: Duration = Duration::from_millis(10);
/// After how long a pause that is still waiting says so.
const SLOW_PAUSE: Duration = Duration::from_secs(1);

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
                .spawn(move || {
                    stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Vcpu);
                    run_loop(vcpu, index as u32, ctx)
                })
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

    /// Asks every vCPU to leave `KVM_RUN` and park (returns at once; see
    /// [`VcpuThreads::wait_parked`]).
    pub fn request_pause(&self) {
        self.control.set(Request::Pause);
        self.kick_all();
    }

    /// Waits until every vCPU is parked (or has exited). A busy host may
    /// delay a vCPU's return from `KVM_RUN`, so this never gives up: it
    /// kicks the vCPUs again every [`REKICK`] and warns once a vCPU has
    /// kept it waiting for [`SLOW_PAUSE`].
    pub fn wait_parked(&self) {
        let total = self.threads.len();
        let started = Instant::now();
        let mut warned = false;
        while !self
            .control
            .wait_for(REKICK, |s| s.parked + s.exited >= total)
        {
            self.kick_all();
            if !warned && started.elapsed() >= SLOW_PAUSE {
                warned = true;
                let st = self.control.state.lock().expect("control lock");
                tracing::warn!(
                    "{} of {total} vCPUs still in the guest {} ms after the pause request; waiting",
                    total - st.parked - st.exited,
                    started.elapsed().as_millis()
                );
            }
        }
    }

    /// Brings every vCPU out of `KVM_RUN` and parks it; returns once all
    /// are parked (or have exited).
    pub fn pause(&self) {
        self.request_pause();
        self.wait_parked();
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

impl crate::quiesce::Quiesce for VcpuThreads {
    fn name(&self) -> String {
        "vCPUs".into()
    }
    fn request_quiesce(&self) {
        self.request_pause();
    }
    fn wait_quiesced(&self) {
        self.wait_parked();
    }
    fn resume(&self) {
        VcpuThreads::resume(self);
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
        // Clear a kick before looking at the request, so a kick that
        // arrives after the check still interrupts the next KVM_RUN.
        vcpu.set_kvm_immediate_exit(0);
        stasis_failpoint::hit("vcpu.before_gate");
        match ctx.control.gate(index as usize, &mut vcpu, pending) {
            Gate::Run => {}
            // Finish the port/MMIO instruction before parking, so that the
            // state a snapshot reads is consistent (KVM completes it at the
            // start of KVM_RUN, then returns EINTR because of
            // immediate_exit; string I/O may need more than one round).
            Gate::CompleteIo => vcpu.set_kvm_immediate_exit(1),
            Gate::Stop => break,
        }
        match handle_one_run(&mut vcpu, index, &ctx) {
            Ok(h) => pending = h,
            Err(reason) => {
                ctx.exit.report(reason);
                break;
            }
        }
        stasis_failpoint::hit("vcpu.exit");
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
