//! Test helpers: guest memory, a driver that programs a transport through
//! its registers as a guest would, and split queues in guest memory built
//! with `virtio_queue::mock::MockSplitQueue`.

use std::path::PathBuf;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{reg, status, MmioTransport};
use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::memory::GuestRam;

/// 16 MiB of guest memory at 0.
pub fn memory() -> GuestRam {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

/// Where the queues' rings go: queue `i` at `0x10000 + i * 0x10000`.
pub fn ring_addr(i: usize) -> GuestAddress {
    GuestAddress(0x1_0000 + i as u64 * 0x1_0000)
}

/// A transport for `device` in slot 0, resumed, with a handle on its
/// interrupt eventfd.
pub fn transport(device: Box<dyn VirtioDevice>, mem: &GuestRam) -> (MmioTransport, EventFd) {
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = evt.try_clone().unwrap();
    let mut t = MmioTransport::new(device, mem.clone(), evt, 0);
    t.resume();
    (t, irq)
}

/// Reads a 32-bit register.
pub fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit register.
pub fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
    if off == reg::QUEUE_NOTIFY {
        // What the device's I/O thread does when woken: work on the queue
        // batch by batch until nothing is left.
        while t.process_pending() {}
    }
}

/// Points queue `i` at `vq`'s rings and enables it.
pub fn setup_queue(t: &mut MmioTransport, i: u32, vq: &MockSplitQueue<GuestRam>, size: u16) {
    wr(t, reg::QUEUE_SEL, i);
    wr(t, reg::QUEUE_NUM, u32::from(size));
    let addrs = [
        (reg::QUEUE_DESC_LOW, vq.desc_table_addr().0),
        (reg::QUEUE_DRIVER_LOW, vq.avail_addr().0),
        (reg::QUEUE_DEVICE_LOW, vq.used_addr().0),
    ];
    for (low, a) in addrs {
        wr(t, low, a as u32);
        wr(t, low + 4, (a >> 32) as u32);
    }
    wr(t, reg::QUEUE_READY, 1);
}

/// The virtio 1.x initialisation sequence (3.1.1) up to `DRIVER_OK`,
/// accepting `features` (plus `VIRTIO_F_VERSION_1`) and setting up one
/// queue per entry of `queues`.
pub fn init(t: &mut MmioTransport, features: u64, queues: &[&MockSplitQueue<GuestRam>], size: u16) {
    wr(t, reg::STATUS, 0);
    wr(t, reg::STATUS, status::ACKNOWLEDGE);
    wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    let f = features | VIRTIO_F_VERSION_1;
    wr(t, reg::DRIVER_FEATURES_SEL, 0);
    wr(t, reg::DRIVER_FEATURES, f as u32);
    wr(t, reg::DRIVER_FEATURES_SEL, 1);
    wr(t, reg::DRIVER_FEATURES, (f >> 32) as u32);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    wr(t, reg::STATUS, s);
    assert_eq!(rd(t, reg::STATUS), s, "features refused");
    for (i, vq) in queues.iter().enumerate() {
        setup_queue(t, i as u32, vq, size);
    }
    wr(t, reg::STATUS, s | status::DRIVER_OK);
    assert_eq!(rd(t, reg::STATUS), s | status::DRIVER_OK);
}

/// A buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A device-readable buffer.
pub fn ro(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

/// A device-writable buffer.
pub fn wo(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

/// Offers one chain made of `bufs`, its descriptors at table index
/// `first` onwards, and makes it available.
pub fn offer(vq: &MockSplitQueue<GuestRam>, first: u16, bufs: &[Buf]) {
    let descs: Vec<RawDescriptor> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let mut flags = if b.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                first + i as u16 + 1
            } else {
                0
            };
            RawDescriptor::from(SplitDescriptor::new(b.addr, b.len, flags, next))
        })
        .collect();
    vq.add_desc_chains(&descs, first).unwrap();
}

/// The used ring's index.
pub fn used_idx(vq: &MockSplitQueue<GuestRam>) -> u16 {
    vq.used().idx().load()
}

/// Used ring entry `i`: (chain head, bytes written).
pub fn used(vq: &MockSplitQueue<GuestRam>, i: u16) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i as usize).unwrap().load();
    (e.id(), e.len())
}

/// Reads `len` bytes of guest memory.
pub fn read_mem(mem: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A temporary file removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A file of `len` bytes, byte `i` = `i % 251`.
    pub fn patterned(len: usize) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "stasis-virtio-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, data).unwrap();
        Self(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
