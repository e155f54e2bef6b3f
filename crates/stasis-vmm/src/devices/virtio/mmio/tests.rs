//! Register logic, feature negotiation, queue setup, interrupts and
//! save/restore of the transport, driven through its registers.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1 as BIT_VERSION_1,
};
use virtio_bindings::virtio_ids;
use virtio_bindings::virtio_mmio as m;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Bytes;

use super::*;
use crate::devices::virtio::block::{self, Block};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::testutil::*;
use crate::devices::virtio::{INT_VRING, TYPE_RNG};

fn rng(mem: &GuestRam) -> (MmioTransport, EventFd) {
    transport(Box::new(Rng::new("rng0")), mem)
}

#[test]
fn constants_match_the_spec_headers() {
    assert_eq!(reg::MAGIC_VALUE, u64::from(m::VIRTIO_MMIO_MAGIC_VALUE));
    assert_eq!(reg::VERSION, u64::from(m::VIRTIO_MMIO_VERSION));
    assert_eq!(reg::DEVICE_ID, u64::from(m::VIRTIO_MMIO_DEVICE_ID));
    assert_eq!(reg::VENDOR_ID, u64::from(m::VIRTIO_MMIO_VENDOR_ID));
    assert_eq!(
        reg::DEVICE_FEATURES,
        u64::from(m::VIRTIO_MMIO_DEVICE_FEATURES)
    );
    assert_eq!(
        reg::DEVICE_FEATURES_SEL,
        u64::from(m::VIRTIO_MMIO_DEVICE_FEATURES_SEL)
    );
    assert_eq!(
        reg::DRIVER_FEATURES,
        u64::from(m::VIRTIO_MMIO_DRIVER_FEATURES)
    );
    assert_eq!(
        reg::DRIVER_FEATURES_SEL,
        u64::from(m::VIRTIO_MMIO_DRIVER_FEATURES_SEL)
    );
    assert_eq!(reg::QUEUE_SEL, u64::from(m::VIRTIO_MMIO_QUEUE_SEL));
    assert_eq!(reg::QUEUE_NUM_MAX, u64::from(m::VIRTIO_MMIO_QUEUE_NUM_MAX));
    assert_eq!(reg::QUEUE_NUM, u64::from(m::VIRTIO_MMIO_QUEUE_NUM));
    assert_eq!(reg::QUEUE_READY, u64::from(m::VIRTIO_MMIO_QUEUE_READY));
    assert_eq!(reg::QUEUE_NOTIFY, u64::from(m::VIRTIO_MMIO_QUEUE_NOTIFY));
    assert_eq!(
        reg::INTERRUPT_STATUS,
        u64::from(m::VIRTIO_MMIO_INTERRUPT_STATUS)
    );
    assert_eq!(reg::INTERRUPT_ACK, u64::from(m::VIRTIO_MMIO_INTERRUPT_ACK));
    assert_eq!(reg::STATUS, u64::from(m::VIRTIO_MMIO_STATUS));
    assert_eq!(
        reg::QUEUE_DESC_LOW,
        u64::from(m::VIRTIO_MMIO_QUEUE_DESC_LOW)
    );
    assert_eq!(
        reg::QUEUE_DESC_HIGH,
        u64::from(m::VIRTIO_MMIO_QUEUE_DESC_HIGH)
    );
    assert_eq!(
        reg::QUEUE_DRIVER_LOW,
        u64::from(m::VIRTIO_MMIO_QUEUE_AVAIL_LOW)
    );
    assert_eq!(
        reg::QUEUE_DRIVER_HIGH,
        u64::from(m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH)
    );
    assert_eq!(
        reg::QUEUE_DEVICE_LOW,
        u64::from(m::VIRTIO_MMIO_QUEUE_USED_LOW)
    );
    assert_eq!(
        reg::QUEUE_DEVICE_HIGH,
        u64::from(m::VIRTIO_MMIO_QUEUE_USED_HIGH)
    );
    assert_eq!(reg::SHM_SEL, u64::from(m::VIRTIO_MMIO_SHM_SEL));
    assert_eq!(reg::SHM_LEN_LOW, u64::from(m::VIRTIO_MMIO_SHM_LEN_LOW));
    assert_eq!(reg::SHM_BASE_HIGH, u64::from(m::VIRTIO_MMIO_SHM_BASE_HIGH));
    assert_eq!(
        reg::CONFIG_GENERATION,
        u64::from(m::VIRTIO_MMIO_CONFIG_GENERATION)
    );
    assert_eq!(reg::CONFIG, u64::from(m::VIRTIO_MMIO_CONFIG));
    assert_eq!(INT_VRING, m::VIRTIO_MMIO_INT_VRING);
    assert_eq!(super::INT_CONFIG, m::VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(status::ACKNOWLEDGE, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(status::DRIVER, VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(status::DRIVER_OK, VIRTIO_CONFIG_S_DRIVER_OK);
    assert_eq!(status::FEATURES_OK, VIRTIO_CONFIG_S_FEATURES_OK);
    assert_eq!(status::DEVICE_NEEDS_RESET, VIRTIO_CONFIG_S_NEEDS_RESET);
    assert_eq!(status::FAILED, VIRTIO_CONFIG_S_FAILED);
    assert_eq!(VIRTIO_F_VERSION_1, 1 << BIT_VERSION_1);
    // VIRTIO_RING_F_INDIRECT_DESC is bit 28 (virtio 1.x, 6.3).
    assert_eq!(VIRTIO_F_RING_INDIRECT_DESC, 1 << 28);
    use crate::devices::virtio::{TYPE_BLOCK, TYPE_CONSOLE, TYPE_NET};
    assert_eq!(TYPE_NET, virtio_ids::VIRTIO_ID_NET);
    assert_eq!(TYPE_BLOCK, virtio_ids::VIRTIO_ID_BLOCK);
    assert_eq!(TYPE_CONSOLE, virtio_ids::VIRTIO_ID_CONSOLE);
    assert_eq!(TYPE_RNG, virtio_ids::VIRTIO_ID_RNG);
}

#[test]
fn identification_registers() {
    let mem = memory();
    let (mut t, _) = rng(&mem);
    assert_eq!(rd(&mut t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(rd(&mut t, reg::VERSION), 2);
    assert_eq!(rd(&mut t, reg::DEVICE_ID), TYPE_RNG);
    assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), 0);
    // No shared memory regions.
    assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(rd(&mut t, reg::SHM_LEN_HIGH), u32::MAX);
    // Registers are 32-bit: narrower or unaligned reads give zeros.
    let mut b = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.read(reg::MAGIC_VALUE + 1, &mut b);
    assert_eq!(b, [0; 4]);
    // Unknown registers read as zero.
    assert_eq!(rd(&mut t, 0x0e0), 0);
}

#[test]
fn feature_negotiation() {
    let mem = memory();
    let (mut t, _) = rng(&mem);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1 << 28);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);

    // Features written before DRIVER are ignored.
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    wr(&mut t, reg::DRIVER_FEATURES, 1);
    assert_eq!(t.driver_features(), 0);

    let ad = status::ACKNOWLEDGE | status::DRIVER;
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    wr(&mut t, reg::STATUS, ad);
    // Without VERSION_1 the device refuses FEATURES_OK.
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    wr(&mut t, reg::DRIVER_FEATURES, 1 << 28);
    wr(&mut t, reg::STATUS, ad | status::FEATURES_OK);
    assert_eq!(rd(&mut t, reg::STATUS), ad);
    // A feature the device does not offer is refused too.
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    wr(&mut t, reg::DRIVER_FEATURES, 1 | 2);
    wr(&mut t, reg::STATUS, ad | status::FEATURES_OK);
    assert_eq!(rd(&mut t, reg::STATUS), ad);
    // A subset with VERSION_1 is accepted.
    wr(&mut t, reg::DRIVER_FEATURES, 1);
    wr(&mut t, reg::STATUS, ad | status::FEATURES_OK);
    assert_eq!(rd(&mut t, reg::STATUS), ad | status::FEATURES_OK);
    assert_eq!(t.driver_features(), VIRTIO_F_VERSION_1 | (1 << 28));
    // Once FEATURES_OK is set the features are frozen.
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    wr(&mut t, reg::DRIVER_FEATURES, 0);
    assert_eq!(t.driver_features(), VIRTIO_F_VERSION_1 | (1 << 28));
    // Status bits cannot be cleared except by a reset.
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(rd(&mut t, reg::STATUS), ad | status::FEATURES_OK);
    // DRIVER_OK without FEATURES_OK is ignored.
    let (mut t2, _) = rng(&mem);
    wr(&mut t2, reg::STATUS, ad | status::DRIVER_OK);
    assert_eq!(rd(&mut t2, reg::STATUS), 0);
}

#[test]
fn queue_registers() {
    let mem = memory();
    let (mut t, _) = rng(&mem);
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 256);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    // A queue that does not exist has size 0.
    wr(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
    wr(&mut t, reg::QUEUE_NUM, 16);
    wr(&mut t, reg::QUEUE_SEL, 0);
    // Sizes must be powers of two no larger than the maximum.
    wr(&mut t, reg::QUEUE_NUM, 100);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM), 256);
    wr(&mut t, reg::QUEUE_NUM, 512);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM), 256);
    wr(&mut t, reg::QUEUE_NUM, 64);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM), 64);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
    wr(&mut t, reg::QUEUE_DESC_HIGH, 0x1);
    wr(&mut t, reg::QUEUE_DRIVER_LOW, 0x2000);
    wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x3000);
    assert_eq!(rd(&mut t, reg::QUEUE_DESC_LOW), 0x1000);
    assert_eq!(rd(&mut t, reg::QUEUE_DESC_HIGH), 1);
    // Misaligned addresses are refused.
    wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x3002);
    assert_eq!(rd(&mut t, reg::QUEUE_DEVICE_LOW), 0x3000);
    wr(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
    // A ready queue cannot be changed.
    wr(&mut t, reg::QUEUE_NUM, 32);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM), 64);
    let s = t.save();
    assert_eq!(s.queues[0].desc_table, 0x1_0000_1000);
    assert_eq!(s.queues[0].avail_ring, 0x2000);
    assert_eq!(s.queues[0].size, 64);
    assert!(s.queues[0].ready);
}

#[test]
fn requests_interrupts_and_ack() {
    let mem = memory();
    let (mut t, irq) = rng(&mem);
    let vq = MockSplitQueue::create(&mem, ring_addr(0), 16);
    init(&mut t, 0, &[&vq], 16);
    // Notify before anything is offered: nothing happens.
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(&vq), 0);
    assert!(irq.read().is_err());

    offer(&vq, 0, &[wo(0x10_0000, 64)]);
    offer(&vq, 1, &[wo(0x10_1000, 32), wo(0x10_2000, 32)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(&vq), 2);
    assert_eq!(used(&vq, 0), (0, 64));
    assert_eq!(used(&vq, 1), (1, 64));
    assert!(read_mem(&mem, 0x10_0000, 64).iter().any(|&b| b != 0));
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
    assert_eq!(irq.read().unwrap(), 1);
    wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);

    // With VRING_AVAIL_F_NO_INTERRUPT the device completes silently.
    mem.write_obj(1u16.to_le(), vq.avail_addr()).unwrap();
    offer(&vq, 3, &[wo(0x10_3000, 8)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(&vq), 3);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    assert!(irq.read().is_err());

    // Notifying a queue that does not exist is ignored.
    wr(&mut t, reg::QUEUE_NOTIFY, 5);
}

#[test]
fn notify_before_driver_ok_is_ignored_and_reset_clears() {
    let mem = memory();
    let (mut t, _) = rng(&mem);
    let vq = MockSplitQueue::create(&mem, ring_addr(0), 16);
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    setup_queue(&mut t, 0, &vq, 16);
    offer(&vq, 0, &[wo(0x10_0000, 8)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(&vq), 0);

    init(&mut t, 0, &[&vq], 16);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(&vq), 1);
    // Queue registers are frozen while the device is live.
    wr(&mut t, reg::QUEUE_SEL, 0);
    wr(&mut t, reg::QUEUE_READY, 0);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);

    wr(&mut t, reg::STATUS, 0);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(t.driver_features(), 0);
    let s = t.save();
    assert_eq!(s.queues[0].next_avail, 0);
    assert_eq!(s.queues[0].next_used, 0);
}

#[test]
fn queue_outside_memory_needs_reset() {
    let mem = memory();
    let (mut t, irq) = rng(&mem);
    let ad = status::ACKNOWLEDGE | status::DRIVER;
    wr(&mut t, reg::STATUS, ad);
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    wr(&mut t, reg::DRIVER_FEATURES, 1);
    wr(&mut t, reg::STATUS, ad | status::FEATURES_OK);
    wr(&mut t, reg::QUEUE_SEL, 0);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0x4000_0000);
    wr(&mut t, reg::QUEUE_DRIVER_LOW, 0x4000_1000);
    wr(&mut t, reg::QUEUE_DEVICE_LOW, 0x4000_2000);
    wr(&mut t, reg::QUEUE_READY, 1);
    wr(
        &mut t,
        reg::STATUS,
        ad | status::FEATURES_OK | status::DRIVER_OK,
    );
    let st = rd(&mut t, reg::STATUS);
    assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), 1);
    assert_eq!(irq.read().unwrap(), 1);
    // A device that needs a reset processes nothing.
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
}

#[test]
fn config_space_reads_any_width() {
    let mem = memory();
    let img = TempFile::patterned(8 << 20);
    let disk = stasis_config::DiskConfig {
        id: "d".into(),
        path: img.0.clone(),
        readonly: false,
        format: None,
    };
    let (mut t, _) = transport(Box::new(Block::open(&disk).unwrap()), &mem);
    let capacity = (8u64 << 20) / 512;
    let mut b8 = [0u8; 8];
    t.read(reg::CONFIG, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), capacity);
    assert_eq!(rd(&mut t, reg::CONFIG), capacity as u32);
    assert_eq!(rd(&mut t, reg::CONFIG + 4), 0);
    let mut b1 = [0u8; 1];
    t.read(reg::CONFIG + 1, &mut b1);
    assert_eq!(b1[0], (capacity >> 8) as u8);
    assert_eq!(rd(&mut t, reg::CONFIG + 0x0c), block::SEG_MAX);
    assert_eq!(rd(&mut t, reg::CONFIG + 0x24), block::MAX_DISCARD_SECTORS);
    assert_eq!(rd(&mut t, reg::CONFIG + 0x28), block::MAX_DISCARD_SEG);
    assert_eq!(
        rd(&mut t, reg::CONFIG + 0x2c),
        block::DISCARD_SECTOR_ALIGNMENT
    );
    // Beyond the device's fields the space reads as zeros.
    assert_eq!(rd(&mut t, reg::CONFIG + 0x200), 0);
    // Writes are ignored.
    wr(&mut t, reg::CONFIG, 0);
    assert_eq!(rd(&mut t, reg::CONFIG), capacity as u32);
}

#[test]
fn save_restore_round_trip() {
    let mem = memory();
    let (mut t, _irq) = rng(&mem);
    let vq = MockSplitQueue::create(&mem, ring_addr(0), 16);
    init(&mut t, 0, &[&vq], 16);
    offer(&vq, 0, &[wo(0x10_0000, 8)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    // Offered but not yet notified when the snapshot is taken.
    offer(&vq, 1, &[wo(0x10_1000, 8)]);
    wr(&mut t, reg::QUEUE_SEL, 0);
    t.pause();
    let s = t.save();
    assert_eq!(s.interrupt_status, INT_VRING);
    assert_eq!(s.queues[0].next_avail, 1);
    assert_eq!(s.queues[0].next_used, 1);
    assert_eq!(s.status & status::DRIVER_OK, status::DRIVER_OK);
    // Through the section encoding, as a snapshot stores it.
    let json = serde_json::to_vec(&s).unwrap();
    let s2: crate::devices::virtio::state::VirtioMmioState = serde_json::from_slice(&json).unwrap();
    assert_eq!(s2, s);

    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq2 = evt.try_clone().unwrap();
    let mut r =
        MmioTransport::restore(Box::new(Rng::new("rng0")), mem.clone(), evt, 0, &s2).unwrap();
    assert!(r.is_paused());
    assert_eq!(r.save(), s);
    // The unacknowledged interrupt is raised again once the VM runs.
    assert!(irq2.read().is_err());
    r.resume();
    assert_eq!(irq2.read().unwrap(), 1);
    r.pause();
    r.resume();
    assert!(irq2.read().is_err());
    assert_eq!(rd(&mut r, reg::STATUS), s.status);
    assert_eq!(rd(&mut r, reg::INTERRUPT_STATUS), INT_VRING);
    // The request made available before the snapshot is done once, after.
    wr(&mut r, reg::QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(&vq), 2);
    assert_eq!(used(&vq, 1), (1, 8));
    wr(&mut r, reg::QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(&vq), 2);
}

#[test]
fn restore_refuses_state_that_does_not_fit() {
    let mem = memory();
    let (t, _) = rng(&mem);
    let s = t.save();
    let restore = |s: &VirtioMmioState, slot: usize| {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        MmioTransport::restore(Box::new(Rng::new("rng0")), mem.clone(), evt, slot, s)
            .err()
            .map(|e| e.to_string())
    };
    assert_eq!(restore(&s, 0), None);
    let e = restore(&s, 1).unwrap();
    assert!(e.contains("saved in slot 0"), "{e}");
    let e = restore(
        &VirtioMmioState {
            device_type: 2,
            ..s.clone()
        },
        0,
    )
    .unwrap();
    assert!(e.contains("device type"), "{e}");
    let e = restore(
        &VirtioMmioState {
            driver_features: 1 << 40,
            ..s.clone()
        },
        0,
    )
    .unwrap();
    assert!(e.contains("does not offer"), "{e}");
    let e = restore(
        &VirtioMmioState {
            config: vec![1],
            ..s.clone()
        },
        0,
    )
    .unwrap();
    assert!(e.contains("configuration space"), "{e}");
    let e = restore(
        &VirtioMmioState {
            queues: vec![],
            ..s.clone()
        },
        0,
    )
    .unwrap();
    assert!(e.contains("saved queues"), "{e}");
    let mut bad = s.clone();
    bad.queues[0].size = 3;
    let e = restore(&bad, 0).unwrap();
    assert!(e.contains("queue 0"), "{e}");
}
