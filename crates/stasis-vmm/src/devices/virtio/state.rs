//! The saved state of virtio devices: one snapshot section per device,
//! named after its kind, instance = the device id.
//!
//! | section | holds |
//! |---|---|
//! | `virtio-blk` | transport + image path, size in bytes, read-only |
//! | `virtio-net` | transport + tap name, MAC address |
//! | `virtio-rng` | transport |
//! | `virtio-console` | transport + output destination |
//!
//! `virtio-queue`'s `QueueState` has no serde support (and our format must
//! not change when the crate does), so [`QueueSnapshot`] mirrors it field
//! by field.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use stasis_snapshot::SectionState;
use virtio_queue::{Queue, QueueState, QueueT};

/// One virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The largest size the device offers (`QueueNumMax`).
    pub max_size: u16,
    /// The size the driver chose (`QueueNum`).
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use (never, today).
    pub event_idx: bool,
}

impl QueueSnapshot {
    /// The state of `q`.
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// Rebuilds the queue, checking sizes and alignments.
    pub fn to_queue(&self) -> Result<Queue, String> {
        let q = Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("{e}"))?;
        debug_assert_eq!(q.max_size(), self.max_size);
        Ok(q)
    }
}

/// The virtio-mmio transport of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    /// The slot: register window `0xd000_0000 + slot * 0x1000`.
    pub slot: u32,
    /// Register window base (derived from the slot; kept for readers).
    pub base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// The virtio device type.
    pub device_type: u32,
    /// Features the device offered.
    pub device_features: u64,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `Status`.
    pub status: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// The configuration space as the driver saw it.
    #[serde(with = "stasis_snapshot::hex_bytes")]
    pub config: Vec<u8>,
    /// The queues, in device order.
    pub queues: Vec<QueueSnapshot>,
}

/// What a device needs of its backend besides the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendState {
    /// A disk.
    Block {
        /// The image file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// Offered read-only.
        readonly: bool,
    },
    /// A network interface.
    Net {
        /// The tap.
        tap: String,
        /// The MAC address.
        mac: String,
    },
    /// An entropy source.
    Rng,
    /// A console.
    Console {
        /// Where output went (`stdout`, `file:PATH`, ...).
        output: String,
    },
}

/// Section `virtio-blk`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkState {
    /// The device id (also the instance name).
    pub id: String,
    /// The transport.
    pub transport: VirtioMmioState,
    /// The image file at snapshot time.
    pub path: PathBuf,
    /// Its size in bytes; a restore refuses an image of another size.
    pub size: u64,
    /// Offered read-only.
    pub readonly: bool,
}

/// Section `virtio-net`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    /// The device id.
    pub id: String,
    /// The transport.
    pub transport: VirtioMmioState,
    /// The tap at snapshot time.
    pub tap: String,
    /// The MAC address the guest knows (kept across restores, even when
    /// it was derived from a VM name that the restore changes).
    pub mac: String,
}

/// Section `virtio-rng`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioRngState {
    /// The device id.
    pub id: String,
    /// The transport.
    pub transport: VirtioMmioState,
}

/// Section `virtio-console`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioConsoleState {
    /// The device id.
    pub id: String,
    /// The transport.
    pub transport: VirtioMmioState,
    /// Where output went at snapshot time (informational).
    pub output: String,
}

impl SectionState for VirtioBlkState {
    const NAME: &'static str = "virtio-blk";
    const VERSION: u32 = 1;
}

impl SectionState for VirtioNetState {
    const NAME: &'static str = "virtio-net";
    const VERSION: u32 = 1;
}

impl SectionState for VirtioRngState {
    const NAME: &'static str = "virtio-rng";
    const VERSION: u32 = 1;
}

impl SectionState for VirtioConsoleState {
    const NAME: &'static str = "virtio-console";
    const VERSION: u32 = 1;
}

/// The saved state of one virtio device, whatever its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioDeviceState {
    /// A disk.
    Blk(VirtioBlkState),
    /// A network interface.
    Net(VirtioNetState),
    /// An entropy source.
    Rng(VirtioRngState),
    /// A console.
    Console(VirtioConsoleState),
}

impl VirtioDeviceState {
    /// Combines a transport's and a device's state.
    pub fn new(id: &str, transport: VirtioMmioState, backend: BackendState) -> Self {
        let id = id.to_string();
        match backend {
            BackendState::Block {
                path,
                size,
                readonly,
            } => Self::Blk(VirtioBlkState {
                id,
                transport,
                path,
                size,
                readonly,
            }),
            BackendState::Net { tap, mac } => Self::Net(VirtioNetState {
                id,
                transport,
                tap,
                mac,
            }),
            BackendState::Rng => Self::Rng(VirtioRngState { id, transport }),
            BackendState::Console { output } => Self::Console(VirtioConsoleState {
                id,
                transport,
                output,
            }),
        }
    }

    /// The device id.
    pub fn id(&self) -> &str {
        match self {
            Self::Blk(s) => &s.id,
            Self::Net(s) => &s.id,
            Self::Rng(s) => &s.id,
            Self::Console(s) => &s.id,
        }
    }

    /// The section name.
    pub fn section_name(&self) -> &'static str {
        match self {
            Self::Blk(_) => VirtioBlkState::NAME,
            Self::Net(_) => VirtioNetState::NAME,
            Self::Rng(_) => VirtioRngState::NAME,
            Self::Console(_) => VirtioConsoleState::NAME,
        }
    }

    /// The transport's state.
    pub fn transport(&self) -> &VirtioMmioState {
        match self {
            Self::Blk(s) => &s.transport,
            Self::Net(s) => &s.transport,
            Self::Rng(s) => &s.transport,
            Self::Console(s) => &s.transport,
        }
    }

    /// Adds this device's section to a snapshot.
    pub fn write_to(
        &self,
        sink: &mut dyn stasis_snapshot::SectionSink,
    ) -> stasis_snapshot::Result<()> {
        use stasis_snapshot::add_section;
        match self {
            Self::Blk(s) => add_section(sink, &s.id, false, s),
            Self::Net(s) => add_section(sink, &s.id, false, s),
            Self::Rng(s) => add_section(sink, &s.id, false, s),
            Self::Console(s) => add_section(sink, &s.id, false, s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_snapshot_round_trips_and_checks() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(128);
        q.set_desc_table_address(Some(0x10_0000), Some(0));
        q.set_avail_ring_address(Some(0x10_1000), Some(0));
        q.set_used_ring_address(Some(0x10_2000), Some(1));
        q.set_ready(true);
        q.set_next_avail(7);
        q.set_next_used(5);
        let s = QueueSnapshot::of(&q);
        assert_eq!(s.used_ring, 0x1_0010_2000);
        let back = s.to_queue().unwrap();
        assert_eq!(QueueSnapshot::of(&back), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<QueueSnapshot>(&json).unwrap(), s);
        let bad = QueueSnapshot { size: 100, ..s };
        assert!(bad.to_queue().is_err());
        let bad = QueueSnapshot {
            desc_table: 0x10_0008,
            ..s
        };
        assert!(bad.to_queue().is_err());
    }
}
