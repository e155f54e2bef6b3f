//! virtio-net driven through real split queues, with a datagram socket
//! pair standing in for the tap (each datagram is one frame, as on a tap).

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_net as n;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::testutil::*;
use crate::devices::virtio::VirtioSlot;
use crate::memory::GuestRam;
use crate::quiesce::Quiesce;

struct SockIo(UnixDatagram);

impl AsRawFd for SockIo {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl FrameIo for SockIo {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.0.send(frame)
    }
    fn name(&self) -> String {
        "sock".into()
    }
}

const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 1, 2, 3]);

fn net(mem: &GuestRam) -> (MmioTransport, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let dev = Net::with_io("eth0", Arc::new(SockIo(a)), MAC).unwrap();
    let (t, _irq) = transport(Box::new(dev), mem);
    (t, b)
}

fn queues(mem: &GuestRam) -> (MockSplitQueue<'_, GuestRam>, MockSplitQueue<'_, GuestRam>) {
    (
        MockSplitQueue::create(mem, ring_addr(0), 16),
        MockSplitQueue::create(mem, ring_addr(1), 16),
    )
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(3).wrapping_add(seed))
        .collect()
}

#[test]
fn constants_and_config() {
    assert_eq!(VIRTIO_NET_F_MAC, 1 << n::VIRTIO_NET_F_MAC);
    assert_eq!(NET_HDR_LEN, std::mem::size_of::<n::virtio_net_hdr_v1>());
    let mem = memory();
    let (mut t, _peer) = net(&mem);
    assert_eq!(rd(&mut t, reg::DEVICE_ID), 1);
    let mut mac = [0u8; 6];
    t.read(reg::CONFIG, &mut mac);
    assert_eq!(mac, MAC.0);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        rd(&mut t, reg::DEVICE_FEATURES),
        (VIRTIO_NET_F_MAC | crate::devices::virtio::VIRTIO_F_RING_INDIRECT_DESC) as u32
    );
}

#[test]
fn transmit_strips_the_header() {
    let mem = memory();
    let (mut t, peer) = net(&mem);
    let (rx, tx) = queues(&mem);
    init(&mut t, VIRTIO_NET_F_MAC, &[&rx, &tx], 16);
    let f = frame(60, 1);
    let mut buf = vec![0u8; NET_HDR_LEN];
    buf.extend_from_slice(&f);
    mem.write_slice(&buf, GuestAddress(0x20_0000)).unwrap();
    // Header and frame split across two descriptors.
    offer(
        &tx,
        0,
        &[ro(0x20_0000, 20), ro(0x20_0014, (buf.len() - 20) as u32)],
    );
    wr(&mut t, reg::QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(used_idx(&tx), 1);
    assert_eq!(used(&tx, 0), (0, 0));
    let mut got = [0u8; 2048];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
    // A buffer shorter than the header is dropped but completed.
    offer(&tx, 2, &[ro(0x20_0000, 4)]);
    wr(&mut t, reg::QUEUE_NOTIFY, TX_QUEUE as u32);
    assert_eq!(used_idx(&tx), 2);
}

#[test]
fn receive_fills_buffers_with_header() {
    let mem = memory();
    let (mut t, peer) = net(&mem);
    let (rx, tx) = queues(&mem);
    init(&mut t, VIRTIO_NET_F_MAC, &[&rx, &tx], 16);
    let f1 = frame(100, 7);
    let f2 = frame(1514, 9);
    peer.send(&f1).unwrap();
    peer.send(&f2).unwrap();
    // No buffers yet: nothing happens, and the device stops polling.
    t.backend_ready();
    assert_eq!(used_idx(&rx), 0);
    offer(&rx, 0, &[wo(0x30_0000, 1526)]);
    offer(&rx, 1, &[wo(0x31_0000, 12), wo(0x31_1000, 1514)]);
    wr(&mut t, reg::QUEUE_NOTIFY, RX_QUEUE as u32);
    t.backend_ready();
    assert_eq!(used_idx(&rx), 2);
    assert_eq!(used(&rx, 0), (0, 112));
    assert_eq!(used(&rx, 1), (1, 1526));
    let hdr = read_mem(&mem, 0x30_0000, 12);
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "num_buffers = 1");
    assert_eq!(read_mem(&mem, 0x30_000c, 100), f1);
    assert_eq!(read_mem(&mem, 0x31_1000, 1514), f2);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 1);
}

#[test]
fn frame_too_big_for_the_buffer_is_dropped() {
    let mem = memory();
    let (mut t, peer) = net(&mem);
    let (rx, tx) = queues(&mem);
    init(&mut t, VIRTIO_NET_F_MAC, &[&rx, &tx], 16);
    peer.send(&frame(1000, 1)).unwrap();
    peer.send(&frame(50, 2)).unwrap();
    offer(&rx, 0, &[wo(0x30_0000, 512)]);
    t.backend_ready();
    // The big frame is gone; the small one used the same buffer.
    assert_eq!(used_idx(&rx), 1);
    assert_eq!(used(&rx, 0), (0, 62));
    assert_eq!(read_mem(&mem, 0x30_000c, 50), frame(50, 2));
}

#[test]
fn io_thread_delivers_frames_and_stops_while_quiesced() {
    let mem = memory();
    let (mut t, peer) = net(&mem);
    let rx = MockSplitQueue::create(&mem, ring_addr(0), 16);
    let tx = MockSplitQueue::create(&mem, ring_addr(1), 16);
    init(&mut t, VIRTIO_NET_F_MAC, &[&rx, &tx], 16);
    for i in 0..4u16 {
        offer(&rx, i, &[wo(0x30_0000 + u64::from(i) * 0x1000, 2048)]);
    }
    let slot = VirtioSlot::new(t, Vec::new()).unwrap();
    let quiesce = || {
        slot.io.request_quiesce();
        slot.io.wait_quiesced();
    };
    let wait_used = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while used_idx(&rx) < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        used_idx(&rx)
    };
    // Quiesced from the start: nothing is delivered.
    peer.send(&frame(64, 1)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_idx(&rx), 0);
    slot.io.resume();
    assert_eq!(wait_used(1), 1);
    // Quiesced (as for a snapshot): the thread leaves guest memory alone.
    quiesce();
    peer.send(&frame(64, 2)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(used_idx(&rx), 1);
    let saved = slot.transport.lock().unwrap().save();
    assert_eq!(saved.queues[RX_QUEUE].next_used, 1);
    slot.io.resume();
    assert_eq!(wait_used(2), 2);
    assert_eq!(read_mem(&mem, 0x30_100c, 64), frame(64, 2));
    // Out of buffers after two more; a notify after new buffers resumes.
    for s in 3..6 {
        peer.send(&frame(64, s)).unwrap();
    }
    assert_eq!(wait_used(4), 4);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(used_idx(&rx), 4);
    offer(&rx, 4, &[wo(0x38_0000, 2048)]);
    wr(
        &mut slot.transport.lock().unwrap(),
        reg::QUEUE_NOTIFY,
        RX_QUEUE as u32,
    );
    assert_eq!(wait_used(5), 5);
    assert_eq!(read_mem(&mem, 0x38_000c, 64), frame(64, 5));
    slot.shutdown();
}

#[test]
fn missing_tap_is_named() {
    let e = Net::open("eth0", "stasis-no-tap", MAC)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with("virtio-net 'eth0': tap device 'stasis-no-tap' does not exist"),
        "{e}"
    );
    let e = Net::open("eth0", "lo", MAC).err().unwrap().to_string();
    assert!(e.contains("not a tap device"), "{e}");
}
