//! The vCPU threads: one host thread per vCPU running `KVM_RUN`, exits
//! dispatched to the device buses, and the park/unpark protocol behind
//! pause, resume and stop.

use std::os::unix::thread::JoinHandleExt;
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

#[derive(Debug)]
struct ControlState {
    request: Request,
    /// Threads parked in response to `Pause`.
    parked: usize,
    /// Threads that have left their run loop for good.
    exited: usize,
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

    /// Called by a vCPU thread before each `KVM_RUN`: parks while paused.
    /// Returns false when the thread must stop.
    fn wait_runnable(&self) -> bool {
        let mut st = self.state.lock().expect("control lock");
        if st.request == Request::Pause {
            st.parked += 1;
            self.changed.notify_all();
            while st.request == Request::Pause {
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

fn run_loop(mut vcpu: VcpuFd, index: u32, ctx: VcpuContext) {
    kick::set_current_kvm_run(vcpu.get_kvm_run());
    loop {
        // Clear a kick before looking at the request, so a kick that
        // arrives after the check still interrupts the next KVM_RUN.
        vcpu.set_kvm_immediate_exit(0);
        if !ctx.control.wait_runnable() {
            break;
        }
        match handle_one_run(&mut vcpu, index, &ctx) {
            Ok(()) => {}
            Err(reason) => {
                ctx.exit.report(reason);
                break;
            }
        }
    }
    kick::set_current_kvm_run(std::ptr::null_mut());
    ctx.control.mark_exited();
}

/// Runs the vCPU until its next exit and handles it. `Err` carries a
/// reason that ends the VM.
fn handle_one_run(vcpu: &mut VcpuFd, index: u32, ctx: &VcpuContext) -> Result<(), ExitReason> {
    match vcpu.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            if !ctx.pio.read(u64::from(port), data) {
                tracing::trace!("vcpu{index}: unclaimed port read {port:#x}");
            }
            Ok(())
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            if !ctx.pio.write(u64::from(port), data) && port != 0x80 {
                tracing::trace!("vcpu{index}: unclaimed port write {port:#x}");
            }
            Ok(())
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if !ctx.mmio.read(addr, data) {
                tracing::debug!("vcpu{index}: unclaimed MMIO read {addr:#x}");
            }
            Ok(())
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            if !ctx.mmio.write(addr, data) {
                tracing::debug!("vcpu{index}: unclaimed MMIO write {addr:#x}");
            }
            Ok(())
        }
        Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) => Ok(()),
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
            let data: Vec<String> = internal.data[..n].iter().map(|d| format!("{d:#x}")).collect();
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
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(e) => Err(ExitReason::VcpuError {
            vcpu: index,
            detail: format!("KVM_RUN failed: {e}"),
        }),
    }
}
