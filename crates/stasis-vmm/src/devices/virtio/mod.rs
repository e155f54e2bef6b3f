//! virtio devices on the virtio-mmio transport: disks ([`block`]), network
//! interfaces ([`net`]), entropy ([`rng`]) and consoles ([`console`]).
//!
//! # Placement
//!
//! Device *n* of a VM (disks first, then network interfaces, entropy
//! sources and consoles, each in configuration order) sits in virtio-mmio
//! slot *n*: its register window is at
//! [`crate::layout::VIRTIO_MMIO_BASE`]` + n * 0x1000` and its interrupt on
//! [`crate::layout::VIRTIO_GSIS`]`[n]`. The VMM describes each slot in the
//! ACPI DSDT (`LNRO0005`) and appends `virtio_mmio.device=4K@ADDR:GSI` to
//! the kernel command line.
//!
//! # Threads, locking, and where requests complete
//!
//! Each device is an [`mmio::MmioTransport`] (registers, queues, interrupt)
//! owning its device model, behind one mutex that the MMIO bus locks for
//! every register access. Queues are worked on by the device's **I/O
//! thread** ([`io_thread`], named `KIND-ID`), never by a vCPU: KVM signals
//! one eventfd per queue when the guest writes its index to `QueueNotify`
//! (an ioeventfd, so the vCPU does not even leave the guest), and the
//! thread takes the device mutex for one batch of at most [`BATCH`]
//! requests (and [`BATCH_BYTES`] of disk data) at a time: a disk request
//! is read, executed with `pread`/`pwrite` (`fdatasync` for a flush) and
//! put in the used ring; so are transmitted packets, console output and
//! entropy. The same thread polls a network device's tap and moves
//! received frames into buffers. A `QueueNotify` that still arrives as an
//! MMIO exit (a KVM without ioeventfd) only wakes the thread.
//!
//! # Pausing and snapshots
//!
//! Every I/O thread is a [`crate::quiesce::Quiesce`] part: asked to
//! quiesce, it finishes its current batch (every request in it completed,
//! the rest still in the available ring) and parks, and the transport is
//! marked paused; frames wait in the tap's kernel queue. From then until
//! resume nothing writes guest memory or device state, so capture and the
//! memory copy see one consistent instant. After every park, and when a
//! restored VM starts, the thread looks at every queue once: requests made
//! available before a snapshot have no notification left to announce them.
//! A VM starts with its I/O threads parked; [`crate::Vm::start`] resumes
//! them.
//!
//! # Interrupts
//!
//! Each transport has an eventfd registered as an irqfd on its GSI (edge
//! triggered: each write is one edge). `InterruptStatus` bit 0 is set when
//! used buffers were added and the driver did not suppress interrupts
//! (`VRING_AVAIL_F_NO_INTERRUPT`); bit 1 (configuration change) is set when
//! the device needs a reset. A restored transport whose saved interrupt
//! status is non-zero raises one more edge when the VM starts (after the
//! irqchip state is restored), so an interrupt the guest had not yet seen
//! is not lost (a spurious one is harmless to virtio drivers).
//!
//! # Saved state
//!
//! One section per device, named after its kind (`virtio-blk`,
//! `virtio-net`, `virtio-rng`, `virtio-console`) with the device id as
//! instance, holding the transport ([`state::VirtioMmioState`]: slot,
//! negotiated features, status, interrupt status, config space, and each
//! queue's size, readiness, ring addresses and next_avail/next_used) and
//! what the device needs of its backend (see [`state`]).

pub mod block;
pub mod console;
pub mod io_thread;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod state;
mod tap;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;

pub use mmio::MmioTransport;
pub use state::VirtioDeviceState;

/// Device type of a network card.
pub const TYPE_NET: u32 = 1;
/// Device type of a block device.
pub const TYPE_BLOCK: u32 = 2;
/// Device type of a console.
pub const TYPE_CONSOLE: u32 = 3;
/// Device type of an entropy source.
pub const TYPE_RNG: u32 = 4;

/// `VIRTIO_F_VERSION_1`: the modern (virtio 1.x) interface. Always offered
/// and required of the driver.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_RING_INDIRECT_DESC`: indirect descriptor tables (handled by
/// `virtio-queue`); offered by every device.
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;

/// `VRING_AVAIL_F_NO_INTERRUPT` in the available ring's flags.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// `InterruptStatus` bit: used buffers were added.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Errors creating or restoring a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The backend (image file, tap, output) could not be opened.
    #[error("{kind} '{id}': {message}")]
    Backend {
        /// `virtio-blk`, `virtio-net`, ...
        kind: &'static str,
        /// The device id.
        id: String,
        /// What went wrong.
        message: String,
    },
    /// The saved state does not fit the device.
    #[error("saved state of {kind} '{id}' does not fit the device: {message}")]
    State {
        /// `virtio-blk`, `virtio-net`, ...
        kind: &'static str,
        /// The device id.
        id: String,
        /// What does not fit.
        message: String,
    },
    /// A resource of the VMM (eventfd, thread) could not be had.
    #[error("{kind} '{id}': {what}: {source}")]
    Host {
        /// `virtio-blk`, `virtio-net`, ...
        kind: &'static str,
        /// The device id.
        id: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// The interrupt line of one transport: `InterruptStatus` and the irqfd.
pub struct Interrupt {
    status: u32,
    evt: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `evt` (an irqfd).
    pub fn new(evt: EventFd) -> Self {
        Self { status: 0, evt }
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Sets `bits` in `InterruptStatus` and raises one edge.
    pub fn raise(&mut self, bits: u32) {
        self.status |= bits;
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio interrupt eventfd write failed: {e}");
        }
    }

    /// `InterruptACK`: clears `bits`.
    pub fn ack(&mut self, bits: u32) {
        self.status &= !bits;
    }

    fn set_status(&mut self, status: u32) {
        self.status = status;
    }
}

/// What a device model gets when it works on its queues: the queues, guest
/// memory and the interrupt line.
pub struct DeviceContext<'a> {
    /// The device's queues, in the device type's order.
    pub queues: &'a mut [Queue],
    /// Guest memory.
    pub mem: &'a GuestRam,
    /// The transport's interrupt.
    pub irq: &'a mut Interrupt,
}

impl DeviceContext<'_> {
    /// Tells the driver that queue `index` has new used buffers, unless it
    /// asked for no interrupts (`VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn signal_used(&mut self, index: usize) {
        let q = &self.queues[index];
        // The used index was just written; the driver clears
        // NO_INTERRUPT, fences, then reads the used index. Without this
        // fence our read of the flag could pass our write of the index, and
        // both sides would miss each other's update: a lost interrupt.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let flags: u16 = self
            .mem
            .load::<u16>(
                GuestAddress(q.avail_ring()),
                std::sync::atomic::Ordering::Acquire,
            )
            .map(u16::from_le)
            .unwrap_or(0);
        if flags & VRING_AVAIL_F_NO_INTERRUPT == 0 {
            self.irq.raise(INT_VRING);
        }
    }
}

/// Limits warnings that a guest can cause at will (bad register accesses,
/// malformed requests), so that a misbehaving guest cannot fill the host's
/// logs: the first [`GuestWarnings::LIMIT`] are warnings, the rest debug.
#[derive(Debug, Default)]
pub struct GuestWarnings(std::sync::atomic::AtomicU32);

impl GuestWarnings {
    /// Warnings logged at warning level per device.
    pub const LIMIT: u32 = 20;

    /// Logs `what` for device `kind` `id`.
    pub fn warn(&self, kind: &str, id: &str, what: std::fmt::Arguments) {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n < Self::LIMIT {
            tracing::warn!("{kind} '{id}': {what}");
        } else if n == Self::LIMIT {
            tracing::warn!(
                "{kind} '{id}': {what} (further guest-caused warnings of this device at debug level)"
            );
        } else {
            tracing::debug!("{kind} '{id}': {what}");
        }
    }
}

/// A disk's image as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskImage {
    /// The disk's id.
    pub id: String,
    /// The image the guest writes.
    pub path: PathBuf,
    /// Its format.
    pub format: stasis_disk::DiskFormat,
    /// Offered read-only.
    pub readonly: bool,
    /// The size the guest sees.
    pub size: u64,
}

/// What a checkpoint does to one disk, under the paused device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskCheckpointOp {
    /// Take the qcow2 internal snapshot of this name.
    TakeInternal(String),
    /// Write out everything the image's backend caches (its metadata).
    Flush,
    /// Delete the qcow2 internal snapshot of this name.
    DeleteInternal(String),
    /// Flush and close the image and give up its lock (the VM ended; a
    /// rollback in the same process opens the image again).
    Close,
    /// Freeze the image and go on writing a new overlay at this path.
    Overlay(PathBuf),
}

/// A virtio device model behind an [`MmioTransport`]. Every method runs
/// with the transport's mutex held.
pub trait VirtioDevice: Send {
    /// The virtio device type (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// The section name and log prefix: `virtio-blk`, ...
    fn kind(&self) -> &'static str;
    /// The user's id for this device.
    fn id(&self) -> &str;
    /// The maximum size of each queue; their number is the length.
    fn queue_max_sizes(&self) -> &'static [u16];
    /// Device-specific feature bits offered (the transport adds
    /// [`VIRTIO_F_VERSION_1`] and [`VIRTIO_F_RING_INDIRECT_DESC`]).
    fn features(&self) -> u64;
    /// The device-specific configuration space.
    fn config(&self) -> &[u8];
    /// A driver write into the configuration space; ignored by default
    /// (no device here has writable configuration fields).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "{} '{}': ignored config write of {} bytes at {offset:#x}",
            self.kind(),
            self.id(),
            data.len()
        );
    }
    /// The driver set `DRIVER_OK` (or a device that was live was restored).
    fn activate(&mut self, ctx: &mut DeviceContext) {
        let _ = ctx;
    }
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// The driver notified queue `index` (the transport checked that the
    /// device is live and the queue ready): work on at most [`BATCH`]
    /// requests and return whether more may be waiting.
    fn process_queue(&mut self, index: usize, ctx: &mut DeviceContext) -> bool;
    /// The device's worker thread saw its backend become ready (only for
    /// devices with a [`VirtioDevice::worker`]).
    fn backend_ready(&mut self, ctx: &mut DeviceContext) {
        let _ = ctx;
    }
    /// The transport was paused (`false`) or resumed (`true`).
    fn set_running(&mut self, running: bool) {
        let _ = running;
    }
    /// What a worker thread must poll, if the device needs one.
    fn worker(&self) -> Option<WorkerSpec> {
        None
    }
    /// The device-specific part of the saved state.
    fn save_backend(&self) -> state::BackendState;
    /// Makes what the guest already wrote to the backend durable (a disk
    /// image's `fdatasync`), so that a snapshot's memory never claims disk
    /// writes that a host crash could lose. Nothing by default.
    fn sync_backend(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// Gives up (`release`) or takes back the backend's host lock (a disk
    /// image's `flock`), so that a migration's destination on a shared
    /// path can open it at switchover. Nothing by default.
    fn hand_over_backend(&self, release: bool) -> std::io::Result<()> {
        let _ = release;
        Ok(())
    }

    /// A disk's image as it is now (checkpoints move disks onto new
    /// overlays); `None` for devices that are not disks.
    fn disk_image(&self) -> Option<DiskImage> {
        None
    }

    /// A disk's part of a checkpoint, under the paused device; `None` for
    /// devices that are not disks.
    fn checkpoint_disk(&mut self, op: &DiskCheckpointOp) -> Option<std::io::Result<()>> {
        let _ = op;
        None
    }

    /// The backend's host descriptor for a local upgrade to hand over
    /// to the new process, and the name it is known by (a tap). `None`
    /// for backends the new process opens itself (disk images are opened
    /// by path once their lock is released).
    fn handover_file(&self) -> Option<std::io::Result<(String, std::fs::File)>> {
        None
    }

    /// Makes the network learn where the guest is now (a migration's
    /// destination, after switchover): a network card sends a frame from
    /// the guest's MAC. Nothing by default.
    fn announce(&self) {}
}

/// The most requests a device works on in one go before it lets the I/O
/// thread look at its control state (and the transport's mutex go): what
/// bounds how long a quiesce waits for a device.
pub const BATCH: usize = 32;
/// The most data a block device moves in one batch.
pub const BATCH_BYTES: u64 = 8 << 20;

/// What a device's I/O thread polls besides its queues: a backend fd while
/// `want` is set, and always the `wake` eventfd.
pub struct WorkerSpec {
    /// The backend's fd (the tap).
    pub fd: RawFd,
    /// Whether the device wants to hear that `fd` is readable.
    pub want: Arc<AtomicBool>,
    /// Written whenever `want` changes or the worker must look again.
    pub wake: Arc<EventFd>,
}

/// One virtio device of a VM: its transport (also on the MMIO bus) and its
/// I/O thread.
pub struct VirtioSlot {
    /// The device.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Its I/O thread (parked until the VM starts).
    pub io: Arc<io_thread::IoThread>,
}

impl VirtioSlot {
    /// Wraps `transport` and starts its I/O thread, which waits on
    /// `queue_evts` (one eventfd per queue, signalled by KVM on a
    /// QueueNotify write) and on the device's backend.
    pub fn new(transport: MmioTransport, queue_evts: Vec<EventFd>) -> Result<Self, VirtioError> {
        let (kind, id) = (
            transport.device().kind(),
            transport.device().id().to_string(),
        );
        let transport = Arc::new(Mutex::new(transport));
        let io = io_thread::IoThread::spawn(transport.clone(), queue_evts).map_err(|source| {
            VirtioError::Host {
                kind,
                id,
                what: "cannot start the I/O thread",
                source,
            }
        })?;
        Ok(Self {
            transport,
            io: Arc::new(io),
        })
    }

    /// Stops the I/O thread (the VM is ending).
    pub fn shutdown(&self) {
        self.io.stop();
    }
}

/// Opens the backend of every virtio device `config` lists, in slot order
/// (see [`stasis_config::VmConfig::virtio_devices`]): disk images, taps,
/// console outputs. Done before anything else of a VM is created, so a
/// missing image or tap creates no VM. For a restore, `saved` holds the
/// saved states: a network device keeps its saved MAC address, and a disk
/// image must still have its saved size.
pub fn open_devices(
    config: &stasis_config::VmConfig,
    saved: Option<&[VirtioDeviceState]>,
) -> Result<Vec<Box<dyn VirtioDevice>>, VirtioError> {
    use stasis_config::VirtioDeviceRef as D;
    let mut out: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in config.virtio_devices() {
        let state = saved.and_then(|s| s.iter().find(|s| s.id() == d.id()));
        let dev: Box<dyn VirtioDevice> = match d {
            D::Disk(disk) => {
                let b = block::Block::open(disk)?;
                if let Some(VirtioDeviceState::Blk(s)) = state {
                    let (size, now) = (s.size, b.size());
                    if now != size {
                        return Err(VirtioError::Backend {
                            kind: "virtio-blk",
                            id: disk.id.clone(),
                            message: format!(
                                "disk image {} is {now} bytes; the snapshot was taken with {size}",
                                disk.path.display()
                            ),
                        });
                    }
                }
                Box::new(b)
            }
            D::Net(net) => {
                let mac = match state {
                    Some(VirtioDeviceState::Net(s)) => {
                        s.mac.parse().map_err(|e: String| VirtioError::State {
                            kind: "virtio-net",
                            id: net.id.clone(),
                            message: e,
                        })?
                    }
                    _ => net
                        .mac
                        .unwrap_or_else(|| stasis_config::MacAddr::derived(&config.name, &net.id)),
                };
                Box::new(net::Net::open(&net.id, &net.tap, mac)?)
            }
            D::Rng(r) => Box::new(rng::Rng::new(&r.id)),
            D::Console(c) => Box::new(console::Console::open(&c.id, &c.output)?),
        };
        out.push(dev);
    }
    Ok(out)
}

/// Keeps a tap descriptor handed over by a local upgrade's source for the
/// network card on tap `name` (see [`tap::inherit`]).
pub fn inherit_tap(name: &str, file: std::fs::File) -> Result<(), String> {
    tap::inherit(name, file)
}

/// Checks that the tap `name` exists and can be attached (it is opened
/// and closed again), or was handed over by a local upgrade's source.
pub fn probe_tap(name: &str) -> Result<(), String> {
    if tap::is_inherited(name) {
        return Ok(());
    }
    tap::Tap::open(name).map(drop)
}

/// The `virtio_mmio.device=` kernel parameters for `count` devices (one
/// per slot, for kernels built with `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
pub fn cmdline_devices(count: usize) -> String {
    (0..count)
        .filter_map(crate::layout::virtio_mmio_slot)
        .map(|(base, gsi)| format!("virtio_mmio.device=4K@{base:#x}:{gsi}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A fresh queue of `max` entries (a power of two no larger than 32768).
fn new_queue(max: u16) -> Queue {
    Queue::new(max).expect("device queue sizes are powers of two")
}

#[cfg(test)]
pub(crate) mod testutil;
