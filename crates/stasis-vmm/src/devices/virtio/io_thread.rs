//! The I/O thread of one virtio device: it waits for the guest's queue
//! notifications (ioeventfds KVM signals without leaving the guest), for
//! its backend (a tap with frames to receive) and for requests of the VMM,
//! and works on the device in bounded batches with the transport's mutex
//! held only for one batch at a time.
//!
//! One thread per device rather than one event loop for all: devices never
//! wait for each other (a slow disk does not delay a network card), a
//! device's thread is its natural unit to quiesce, and a VM has few
//! devices. Between two batches the thread looks at its control state, so
//! a quiesce request is honoured within one batch ([`super::BATCH`]
//! requests at most): a guest that keeps its queue full cannot hold off a
//! pause.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::{MmioTransport, WorkerSpec};
use crate::quiesce::Quiesce;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Quiesce,
    Stop,
}

#[derive(Debug)]
struct State {
    request: Request,
    parked: bool,
}

/// What the VMM and the thread share.
struct Control {
    state: Mutex<State>,
    changed: Condvar,
    /// Wakes the thread from `poll` when the request changes.
    wake: EventFd,
}

/// A device's I/O thread; stopped and joined on [`IoThread::stop`] or drop.
pub struct IoThread {
    name: String,
    control: Arc<Control>,
    transport: Arc<Mutex<MmioTransport>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the thread polls besides its control eventfd.
struct Sources {
    /// One ioeventfd per queue (index = queue).
    queues: Vec<EventFd>,
    /// The device's backend and its wake-up eventfd, if it has one.
    backend: Option<WorkerSpec>,
}

impl IoThread {
    /// Starts the thread for `transport`, named after the device, parked
    /// (a VM starts quiesced; [`Quiesce::resume`] lets it run).
    pub fn spawn(
        transport: Arc<Mutex<MmioTransport>>,
        queue_evts: Vec<EventFd>,
    ) -> std::io::Result<Self> {
        let (name, backend) = {
            let t = transport.lock().expect("virtio transport lock");
            (
                format!("{}-{}", t.device().kind(), t.device().id()),
                t.device().worker(),
            )
        };
        let control = Arc::new(Control {
            state: Mutex::new(State {
                request: Request::Quiesce,
                parked: false,
            }),
            changed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let sources = Sources {
            queues: queue_evts,
            backend,
        };
        let thread = {
            let (control, transport) = (control.clone(), transport.clone());
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::DeviceIo);
                    io_loop(&control, &transport, &sources)
                })?
        };
        Ok(Self {
            name,
            control,
            transport,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn set(&self, r: Request) {
        self.control.state.lock().expect("io thread lock").request = r;
        self.control.changed.notify_all();
        let _ = self.control.wake.write(1);
    }

    /// Stops the thread and waits for it (the VM is ending).
    pub fn stop(&self) {
        self.set(Request::Stop);
        if let Some(t) = self.thread.lock().expect("io thread lock").take() {
            let _ = t.join();
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Quiesce for IoThread {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn request_quiesce(&self) {
        self.set(Request::Quiesce);
    }

    fn wait_quiesced(&self) {
        let mut st = self.control.state.lock().expect("io thread lock");
        // A thread that has stopped is as quiet as it gets.
        while !st.parked && st.request == Request::Quiesce && !self.finished() {
            st = self
                .control
                .changed
                .wait_timeout(st, std::time::Duration::from_millis(100))
                .expect("io thread lock")
                .0;
        }
        drop(st);
        // The transport's own paused flag: nothing but register accesses
        // from (parked) vCPUs touches it until resumed.
        self.transport
            .lock()
            .expect("virtio transport lock")
            .pause();
    }

    fn resume(&self) {
        self.transport
            .lock()
            .expect("virtio transport lock")
            .resume();
        self.set(Request::Run);
    }
}

impl IoThread {
    fn finished(&self) -> bool {
        self.thread
            .try_lock()
            .map(|t| t.as_ref().is_none_or(JoinHandle::is_finished))
            .unwrap_or(false)
    }
}

/// What the thread does after its gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Go on.
    Run,
    /// Go on, after a park.
    Resumed,
    /// Leave.
    Stop,
}

/// Parks while quiesced.
fn gate(control: &Control) -> Gate {
    let mut st = control.state.lock().expect("io thread lock");
    let mut parked = false;
    if st.request == Request::Quiesce {
        parked = true;
        st.parked = true;
        control.changed.notify_all();
        while st.request == Request::Quiesce {
            st = control.changed.wait(st).expect("io thread lock");
        }
        st.parked = false;
        control.changed.notify_all();
    }
    match (st.request, parked) {
        (Request::Stop, _) => Gate::Stop,
        (_, true) => Gate::Resumed,
        (_, false) => Gate::Run,
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// How long the thread keeps polling the rings after its last completed
/// request, with the driver's notifications off, before it turns them on
/// and sleeps: requests that follow within this time cost neither a
/// notification exit in the guest nor a wake-up here.
const POLL_WINDOW: Duration = Duration::from_micros(50);

fn io_loop(control: &Control, transport: &Mutex<MmioTransport>, src: &Sources) {
    // After every park (and at the start, which follows a restore as
    // often as a boot), look at every queue once: requests the guest made
    // available before a snapshot have no notification left to announce
    // them.
    let mut rescan = true;
    let mut more = false;
    // While polling: notifications are off and every round looks at every
    // queue, until `poll_until`.
    let mut polling = false;
    let mut poll_until = Instant::now();
    loop {
        if control.state.lock().expect("io thread lock").request != Request::Run && polling {
            // Parked state holds the driver's notifications on, so that
            // whatever runs the guest next (a resume, a restore) hears it.
            transport
                .lock()
                .expect("virtio transport lock")
                .set_notifications(true);
            polling = false;
        }
        match gate(control) {
            Gate::Stop => return,
            Gate::Resumed => rescan = true,
            Gate::Run => {}
        }
        if polling && Instant::now() >= poll_until && !more {
            // Quiet for the whole window: notifications on, then look once
            // more (a request made just before the flag changed has no
            // notification coming).
            polling = false;
            if transport
                .lock()
                .expect("virtio transport lock")
                .set_notifications(true)
            {
                rescan = true;
            }
        }
        stasis_failpoint::hit("io_thread.batch");
        let want_backend = src
            .backend
            .as_ref()
            .is_some_and(|b| b.want.load(Ordering::SeqCst));
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(src.queues.len() + 3);
        fds.push(pollfd(control.wake.as_raw_fd()));
        if let Some(b) = &src.backend {
            fds.push(pollfd(b.wake.as_raw_fd()));
        }
        let first_queue = fds.len();
        fds.extend(src.queues.iter().map(|e| pollfd(e.as_raw_fd())));
        let backend_slot = fds.len();
        if let (true, Some(b)) = (want_backend, &src.backend) {
            fds.push(pollfd(b.fd));
        }
        // With work left from the last batch, or while polling, only look;
        // else sleep.
        let timeout = if more || rescan || polling { 0 } else { -1 };
        // SAFETY: `fds` is a valid, initialised array of pollfd of the
        // given length that outlives the call; every fd stays open while
        // the thread runs (the eventfds are owned by `control`, `src` and
        // the device, which the transport keeps alive).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("virtio I/O thread: poll failed: {e}; the thread stops");
            return;
        }
        if fds[0].revents != 0 {
            let _ = control.wake.read();
            continue; // look at the request first
        }
        if let Some(b) = &src.backend {
            if fds[1].revents != 0 {
                let _ = b.wake.read();
            }
        }
        let mut notified = 0u32;
        for (i, f) in fds[first_queue..backend_slot].iter().enumerate() {
            if f.revents != 0 {
                let _ = src.queues[i].read();
                notified |= 1 << i;
            }
        }
        let backend_ready = fds.get(backend_slot).is_some_and(|f| f.revents != 0);
        let mut t = transport.lock().expect("virtio transport lock");
        if std::mem::take(&mut rescan) || polling {
            t.mark_all_pending();
        }
        t.mark_pending(notified);
        let progress = t.process_pending_counted();
        more = progress.more;
        if backend_ready {
            t.backend_ready();
        }
        if progress.worked {
            poll_until = Instant::now() + POLL_WINDOW;
            if !polling {
                t.set_notifications(false);
                polling = true;
            }
        } else if polling {
            std::hint::spin_loop();
        }
    }
}
