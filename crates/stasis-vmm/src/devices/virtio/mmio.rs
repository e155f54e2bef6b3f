//! The virtio-mmio transport, version 2 (virtio 1.x, spec section 4.2.2):
//! registers, feature negotiation, queue setup, status and interrupts.
//!
//! Register accesses are 32 bits wide and little-endian; other widths are
//! ignored (reads return zeros). The device-specific configuration space at
//! 0x100 may be read with any width.

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::state::{QueueSnapshot, VirtioMmioState};
use super::{
    new_queue, DeviceContext, Interrupt, VirtioDevice, VirtioError, INT_CONFIG,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::devices::bus::BusDevice;
use crate::layout;
use crate::memory::GuestRam;

/// "virt", little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern register layout.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id: "STAS" read as little-endian bytes.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"STAS");

/// Register offsets (virtio 1.x, 4.2.2).
#[allow(missing_docs)]
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.x, 2.1).
#[allow(missing_docs)]
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// What one round of [`MmioTransport::process_pending_counted`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// At least one request completed.
    pub worked: bool,
    /// A queue has requests left.
    pub more: bool,
}

/// One virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    queues: Vec<Queue>,
    irq: Interrupt,
    slot: usize,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    paused: bool,
    /// A restored interrupt to raise again on the first resume (after the
    /// irqchip state is back, which would otherwise swallow it).
    reraise: bool,
    /// Rate limit for guest-caused warnings.
    warnings: super::GuestWarnings,
    /// Queues notified and not yet (fully) worked on, one bit per queue.
    pending: u32,
    /// The queues' notification eventfds, written when a `QueueNotify`
    /// arrives as an MMIO exit rather than through KVM's ioeventfd.
    notify_fds: Vec<EventFd>,
}

impl MmioTransport {
    /// A transport in reset state for `device` in `slot`, raising its
    /// interrupt through `irq` (an eventfd registered as irqfd for the
    /// slot's GSI). It starts paused (see [`MmioTransport::resume`]).
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestRam, irq: EventFd, slot: usize) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&m| new_queue(m))
            .collect();
        Self {
            device,
            mem,
            queues,
            irq: Interrupt::new(irq),
            slot,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            paused: true,
            reraise: false,
            warnings: Default::default(),
            pending: 0,
            notify_fds: Vec::new(),
        }
    }

    /// A transport for `device` in the saved state `s` (still paused). A
    /// device that was live is activated again, and an interrupt the guest
    /// had not acknowledged is raised once more when it is first resumed.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        irq: EventFd,
        slot: usize,
        s: &VirtioMmioState,
    ) -> Result<Self, VirtioError> {
        let mut t = Self::new(device, mem, irq, slot);
        let err = |message: String| VirtioError::State {
            kind: t.device.kind(),
            id: t.device.id().to_string(),
            message,
        };
        let (base, gsi) = layout::virtio_mmio_slot(slot).expect("slot within the layout");
        if s.slot as usize != slot || s.base != base || s.gsi != gsi {
            return Err(err(format!(
                "saved in slot {} ({:#x}, GSI {}), configured in slot {slot} ({base:#x}, GSI {gsi})",
                s.slot, s.base, s.gsi
            )));
        }
        if s.device_type != t.device.device_type() {
            return Err(err(format!(
                "saved device type {} is not {}",
                s.device_type,
                t.device.device_type()
            )));
        }
        let offered = t.device_features();
        if s.device_features != offered {
            return Err(err(format!(
                "saved device features {:#x} differ from this device's {offered:#x}",
                s.device_features
            )));
        }
        if s.driver_features & !offered != 0 {
            return Err(err(format!(
                "driver features {:#x} include some the device does not offer",
                s.driver_features
            )));
        }
        if s.config != t.device.config() {
            return Err(err(format!(
                "configuration space differs (saved {:02x?}, now {:02x?})",
                s.config,
                t.device.config()
            )));
        }
        if s.queues.len() != t.queues.len() {
            return Err(err(format!(
                "{} saved queues for a device with {}",
                s.queues.len(),
                t.queues.len()
            )));
        }
        for (i, (saved, q)) in s.queues.iter().zip(t.queues.iter_mut()).enumerate() {
            if saved.max_size != q.max_size() {
                return Err(err(format!(
                    "queue {i}: saved maximum size {} is not {}",
                    saved.max_size,
                    q.max_size()
                )));
            }
            *q = saved
                .to_queue()
                .map_err(|e| err(format!("queue {i}: {e}")))?;
        }
        t.device_features_sel = s.device_features_sel;
        t.driver_features_sel = s.driver_features_sel;
        t.driver_features = s.driver_features;
        t.queue_sel = s.queue_sel;
        t.status = s.status;
        t.config_generation = s.config_generation;
        t.irq.set_status(s.interrupt_status);
        if t.is_live() {
            let mut ctx = DeviceContext {
                queues: &mut t.queues,
                mem: &t.mem,
                irq: &mut t.irq,
            };
            t.device.activate(&mut ctx);
        }
        t.reraise = s.interrupt_status != 0;
        Ok(t)
    }

    /// The transport's state.
    pub fn save(&self) -> VirtioMmioState {
        let (base, gsi) = layout::virtio_mmio_slot(self.slot).expect("slot within the layout");
        VirtioMmioState {
            slot: self.slot as u32,
            base,
            gsi,
            device_type: self.device.device_type(),
            device_features: self.device_features(),
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.irq.status(),
            config_generation: self.config_generation,
            config: self.device.config().to_vec(),
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
        }
    }

    /// See [`super::VirtioDevice::sync_backend`].
    pub fn sync_backend(&self) -> std::io::Result<()> {
        self.device.sync_backend()
    }

    /// See [`super::VirtioDevice::announce`].
    pub fn announce(&self) {
        self.device.announce()
    }

    /// See [`super::VirtioDevice::handover_file`].
    pub fn handover_file(&self) -> Option<std::io::Result<(String, std::fs::File)>> {
        self.device.handover_file()
    }

    /// See [`super::VirtioDevice::disk_image`].
    pub fn disk_image(&self) -> Option<super::DiskImage> {
        self.device.disk_image()
    }

    /// See [`super::VirtioDevice::checkpoint_disk`].
    pub fn checkpoint_disk(&mut self, op: &super::DiskCheckpointOp) -> Option<std::io::Result<()>> {
        self.device.checkpoint_disk(op)
    }

    /// See [`super::VirtioDevice::hand_over_backend`].
    pub fn hand_over_backend(&self, release: bool) -> std::io::Result<()> {
        self.device.hand_over_backend(release)
    }

    /// The device and transport state as one snapshot section.
    pub fn save_device(&self) -> super::VirtioDeviceState {
        super::VirtioDeviceState::new(self.device.id(), self.save(), self.device.save_backend())
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Every feature offered: the device's plus the transport's.
    pub fn device_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC
    }

    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The `Status` register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Stops the device touching guest memory until [`Self::resume`].
    /// Called with the vCPUs parked; returns with no request in progress.
    pub fn pause(&mut self) {
        if !self.paused {
            self.paused = true;
            self.device.set_running(false);
        }
    }

    /// Lets the device work again.
    pub fn resume(&mut self) {
        if self.paused {
            self.paused = false;
            self.device.set_running(true);
        }
        if std::mem::take(&mut self.reraise) {
            let status = self.irq.status();
            self.irq.raise(status);
        }
    }

    /// Whether the transport is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn is_live(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::DEVICE_NEEDS_RESET == 0
    }

    /// The worker thread's entry: the backend may have something.
    pub fn backend_ready(&mut self) {
        if self.paused || !self.is_live() {
            return;
        }
        let mut ctx = DeviceContext {
            queues: &mut self.queues,
            mem: &self.mem,
            irq: &mut self.irq,
        };
        self.device.backend_ready(&mut ctx);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_NUM => self.selected_queue().map_or(0, |q| u32::from(q.size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::QUEUE_DESC_LOW => self.selected_queue().map_or(0, |q| q.desc_table() as u32),
            reg::QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table() >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => self.selected_queue().map_or(0, |q| q.avail_ring() as u32),
            reg::QUEUE_DRIVER_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.avail_ring() >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => self.selected_queue().map_or(0, |q| q.used_ring() as u32),
            reg::QUEUE_DEVICE_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.used_ring() >> 32) as u32),
            reg::INTERRUPT_STATUS => self.irq.status(),
            reg::STATUS => self.status,
            // No shared memory regions: a length of -1 says so.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(
                    "{} '{}': read of unknown register {offset:#x}",
                    self.device.kind(),
                    self.device.id()
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    self.warn(&format!(
                        "DriverFeatures written in status {:#x}; ignored",
                        self.status
                    ));
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    // Feature words past 1 hold no bits we offer.
                    _ if v != 0 => self.warn("features accepted beyond word 1"),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_register(offset, v),
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.irq.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => self.warn(&format!("write of {v:#x} to unknown register {offset:#x}")),
        }
    }

    fn write_queue_register(&mut self, offset: u64, v: u32) {
        if self.status & status::DRIVER_OK != 0 {
            self.warn(&format!(
                "queue register {offset:#x} written while the device is live; ignored"
            ));
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            let msg = format!("queue register {offset:#x} written for missing queue {sel}");
            self.warn(&msg);
            return;
        };
        let ready = q.ready();
        match offset {
            reg::QUEUE_READY => q.set_ready(v == 1),
            // The driver must not change a queue it has enabled.
            _ if ready => {
                let msg = format!("queue {sel} register {offset:#x} written while ready; ignored");
                self.warn(&msg);
            }
            reg::QUEUE_NUM => {
                if v > u32::from(q.max_size()) || q.try_set_size(v as u16).is_err() {
                    let msg = format!("queue {sel}: invalid size {v}");
                    self.warn(&msg);
                }
            }
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => unreachable!("only queue registers are routed here"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            self.warn(&format!(
                "status {v:#x} clears bits of {old:#x} (only a reset may); ignored"
            ));
            return;
        }
        let mut v = v;
        let added = v & !old;
        if added & status::FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.device_features();
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                self.warn(&format!(
                    "driver features {:#x} refused (offered {:#x}; VIRTIO_F_VERSION_1 is required)",
                    self.driver_features,
                    self.device_features()
                ));
                v &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if v & status::FEATURES_OK == 0 {
                self.warn("DRIVER_OK without FEATURES_OK; ignored");
                return;
            }
            self.status = v;
            self.activate();
            return;
        }
        self.status = v;
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                self.warn(&format!(
                    "queue {i} lies outside guest memory; device needs reset"
                ));
                self.status |= status::DEVICE_NEEDS_RESET;
                self.config_generation = self.config_generation.wrapping_add(1);
                self.irq.raise(INT_CONFIG);
                return;
            }
        }
        let mut ctx = DeviceContext {
            queues: &mut self.queues,
            mem: &self.mem,
            irq: &mut self.irq,
        };
        self.device.activate(&mut ctx);
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.irq.set_status(0);
    }

    /// The eventfds through which a `QueueNotify` MMIO write wakes the I/O
    /// thread (the same ones KVM signals for an ioeventfd), by queue.
    pub fn set_notify_fds(&mut self, fds: Vec<EventFd>) {
        self.notify_fds = fds;
    }

    /// A `QueueNotify` that arrived as an MMIO exit: the queue is pending,
    /// and the I/O thread is woken to work on it.
    fn notify(&mut self, index: u32) {
        if !self.is_live() {
            self.warn(&format!(
                "queue {index} notified in status {:#x}; ignored",
                self.status
            ));
            return;
        }
        match self.queues.get(index as usize) {
            Some(q) if q.ready() => {}
            _ => {
                self.warn(&format!("notify for missing or disabled queue {index}"));
                return;
            }
        }
        self.pending |= 1 << index;
        if let Some(e) = self.notify_fds.get(index as usize) {
            let _ = e.write(1);
        }
    }

    /// Marks queues (a bit per queue) as notified, as the I/O thread does
    /// for the ioeventfds KVM signalled.
    pub fn mark_pending(&mut self, queues: u32) {
        self.pending |= queues;
    }

    /// Marks every queue as notified (after a park or a restore).
    pub fn mark_all_pending(&mut self) {
        self.pending |= (1u32 << self.queues.len().min(31)) - 1;
    }

    /// Works on the pending queues, one batch each; returns whether any has
    /// work left (the I/O thread then comes back without waiting).
    pub fn process_pending(&mut self) -> bool {
        self.process_pending_counted().more
    }

    /// [`MmioTransport::process_pending`], also saying whether any request
    /// completed.
    pub fn process_pending_counted(&mut self) -> Progress {
        if !self.is_live() || self.paused {
            // Nothing to do until the driver is ready; a paused transport
            // keeps its pending queues for the resume.
            if !self.is_live() {
                self.pending = 0;
            }
            return Progress::default();
        }
        let mut more = 0u32;
        let mut worked = false;
        for i in 0..self.queues.len() {
            if self.pending & (1 << i) == 0 || !self.queues[i].ready() {
                continue;
            }
            let before = self.queues[i].next_used();
            let mut ctx = DeviceContext {
                queues: &mut self.queues,
                mem: &self.mem,
                irq: &mut self.irq,
            };
            if self.device.process_queue(i, &mut ctx) {
                more |= 1 << i;
            }
            worked |= self.queues[i].next_used() != before;
        }
        self.pending = more;
        Progress {
            worked,
            more: more != 0,
        }
    }

    /// Asks the driver to notify (`true`) or not (`false`,
    /// `VRING_USED_F_NO_NOTIFY`: the I/O thread is polling the rings)
    /// for every ready queue. Turning notifications back on returns whether
    /// a queue already has new requests (made available before the driver
    /// could see the change), which must then be worked on.
    pub fn set_notifications(&mut self, on: bool) -> bool {
        if !self.is_live() {
            return false;
        }
        let mut waiting = false;
        for q in self.queues.iter_mut().filter(|q| q.ready()) {
            let r = if on {
                q.enable_notification(&self.mem)
            } else {
                q.disable_notification(&self.mem).map(|()| false)
            };
            match r {
                Ok(w) => waiting |= w,
                // The rings lie outside memory: the device is broken
                // anyway; the next request will say so.
                Err(e) => tracing::debug!("virtio notification flags: {e}"),
            }
        }
        waiting
    }

    fn warn(&self, what: &str) {
        self.warnings
            .warn(self.device.kind(), self.device.id(), format_args!("{what}"));
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            let config = self.device.config();
            let start = (offset - reg::CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = config.get(start + i).copied().unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.warn(&format!(
                "{}-byte read at {offset:#x}: registers are 32-bit",
                data.len()
            ));
            data.fill(0);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.warn(&format!(
                "{}-byte write at {offset:#x}: registers are 32-bit; ignored",
                data.len()
            ));
            return;
        }
        let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        self.write_register(offset, v);
    }
}

#[cfg(test)]
mod tests;
