//! virtio-blk driven through a real split queue in guest memory.

use std::os::unix::fs::MetadataExt;

use stasis_config::DiskConfig;
use virtio_bindings::virtio_blk as b;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::testutil::*;

const HDR: u64 = 0x20_0000;
const DATA: u64 = 0x30_0000;
const STATUS: u64 = 0x2f_0000;

struct Rig {
    mem: GuestRam,
    t: MmioTransport,
    _irq: EventFd,
    next_desc: u16,
}

impl Rig {
    fn new(img: &TempFile, readonly: bool) -> (Self, MockSplitQueue<'static, GuestRam>) {
        let mem: &'static GuestRam = Box::leak(Box::new(memory()));
        let disk = DiskConfig {
            id: "root".into(),
            path: img.0.clone(),
            readonly,
            format: None,
        };
        let (mut t, irq) = transport(Box::new(Block::open(&disk).unwrap()), mem);
        let vq = MockSplitQueue::create(mem, ring_addr(0), 64);
        let features = VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD;
        init(&mut t, features, &[&vq], 64);
        (
            Self {
                mem: mem.clone(),
                t,
                _irq: irq,
                next_desc: 0,
            },
            vq,
        )
    }

    /// Submits a request and returns (status, used length).
    fn request(
        &mut self,
        vq: &MockSplitQueue<GuestRam>,
        kind: u32,
        sector: u64,
        data: &[Buf],
    ) -> (u8, u32) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut bufs = vec![ro(HDR, 16)];
        bufs.extend_from_slice(data);
        bufs.push(wo(STATUS, 1));
        let first = self.next_desc;
        self.next_desc = (self.next_desc + bufs.len() as u16) % 48;
        offer(vq, first, &bufs);
        let before = used_idx(vq);
        wr(&mut self.t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(
            used_idx(vq),
            before.wrapping_add(1),
            "request not completed"
        );
        let (head, len) = used(vq, before % 64);
        assert_eq!(head, u32::from(first));
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }
}

fn file_bytes(img: &TempFile, off: usize, len: usize) -> Vec<u8> {
    std::fs::read(&img.0).unwrap()[off..off + len].to_vec()
}

#[test]
fn constants_match_the_spec_headers() {
    assert_eq!(VIRTIO_BLK_F_SEG_MAX, 1 << b::VIRTIO_BLK_F_SEG_MAX);
    assert_eq!(VIRTIO_BLK_F_RO, 1 << b::VIRTIO_BLK_F_RO);
    assert_eq!(VIRTIO_BLK_F_FLUSH, 1 << b::VIRTIO_BLK_F_FLUSH);
    assert_eq!(VIRTIO_BLK_F_DISCARD, 1 << b::VIRTIO_BLK_F_DISCARD);
    assert_eq!(VIRTIO_BLK_T_IN, b::VIRTIO_BLK_T_IN);
    assert_eq!(VIRTIO_BLK_T_OUT, b::VIRTIO_BLK_T_OUT);
    assert_eq!(VIRTIO_BLK_T_FLUSH, b::VIRTIO_BLK_T_FLUSH);
    assert_eq!(VIRTIO_BLK_T_GET_ID, b::VIRTIO_BLK_T_GET_ID);
    assert_eq!(VIRTIO_BLK_T_DISCARD, b::VIRTIO_BLK_T_DISCARD);
    assert_eq!(u32::from(VIRTIO_BLK_S_OK), b::VIRTIO_BLK_S_OK);
    assert_eq!(u32::from(VIRTIO_BLK_S_IOERR), b::VIRTIO_BLK_S_IOERR);
    assert_eq!(u32::from(VIRTIO_BLK_S_UNSUPP), b::VIRTIO_BLK_S_UNSUPP);
    assert_eq!(ID_BYTES as u32, b::VIRTIO_BLK_ID_BYTES);
    // Our config space covers the fields up to write_zeroes_may_unmap.
    let off = std::mem::offset_of!(b::virtio_blk_config, max_secure_erase_sectors);
    assert_eq!(CONFIG_SIZE, off);
    let c = config_space(1234);
    let off = |f: usize| c[f..f + 4].to_vec();
    assert_eq!(
        off(std::mem::offset_of!(b::virtio_blk_config, seg_max)),
        SEG_MAX.to_le_bytes()
    );
    assert_eq!(
        off(std::mem::offset_of!(b::virtio_blk_config, max_discard_seg)),
        MAX_DISCARD_SEG.to_le_bytes()
    );
    assert_eq!(
        off(std::mem::offset_of!(
            b::virtio_blk_config,
            discard_sector_alignment
        )),
        DISCARD_SECTOR_ALIGNMENT.to_le_bytes()
    );
}

#[test]
fn features_and_capacity() {
    let img = TempFile::patterned(1 << 20);
    let disk = DiskConfig {
        id: "d".into(),
        path: img.0.clone(),
        readonly: false,
        format: None,
    };
    let blk = Block::open(&disk).unwrap();
    assert_eq!(blk.capacity(), 2048);
    assert_eq!(
        blk.features(),
        VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD
    );
    assert_eq!(blk.config()[..8], 2048u64.to_le_bytes());
    drop(blk);
    let ro = Block::open(&DiskConfig {
        readonly: true,
        format: None,
        ..disk
    })
    .unwrap();
    assert_ne!(ro.features() & VIRTIO_BLK_F_RO, 0);
}

#[test]
fn read_write_flush_get_id() {
    let img = TempFile::patterned(1 << 20);
    let (mut rig, vq) = Rig::new(&img, false);

    // Read 2 sectors at sector 3 into two data buffers.
    let (st, len) = rig.request(
        &vq,
        VIRTIO_BLK_T_IN,
        3,
        &[wo(DATA, 512), wo(DATA + 0x1000, 512)],
    );
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1025));
    assert_eq!(
        read_mem(&rig.mem, DATA, 512),
        file_bytes(&img, 3 * 512, 512)
    );
    assert_eq!(
        read_mem(&rig.mem, DATA + 0x1000, 512),
        file_bytes(&img, 4 * 512, 512)
    );

    // Write 3 sectors at sector 10 from guest memory.
    let pattern: Vec<u8> = (0..1536).map(|i| (i * 7 % 256) as u8).collect();
    rig.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let (st, len) = rig.request(&vq, VIRTIO_BLK_T_OUT, 10, &[ro(DATA, 1536)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(file_bytes(&img, 10 * 512, 1536), pattern);
    // Neighbours are untouched.
    assert_eq!(file_bytes(&img, 9 * 512, 512), {
        let t = TempFile::patterned(1 << 20);
        file_bytes(&t, 9 * 512, 512)
    });

    let (st, len) = rig.request(&vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1));

    let (st, len) = rig.request(&vq, VIRTIO_BLK_T_GET_ID, 0, &[wo(DATA, 20)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 21));
    let id = read_mem(&rig.mem, DATA, 20);
    assert_eq!(&id[..4], b"root");
    assert!(id[4..].iter().all(|&b| b == 0));
}

#[test]
fn large_request_spans_chunks() {
    let img = TempFile::patterned(4 << 20);
    let (mut rig, vq) = Rig::new(&img, false);
    let len = 3 << 20;
    let (st, used_len) = rig.request(&vq, VIRTIO_BLK_T_IN, 8, &[wo(0x40_0000, len)]);
    assert_eq!((st, used_len), (VIRTIO_BLK_S_OK, len + 1));
    assert_eq!(
        read_mem(&rig.mem, 0x40_0000, len as usize),
        file_bytes(&img, 8 * 512, len as usize)
    );
}

#[test]
fn bad_requests_fail_without_touching_the_image() {
    let img = TempFile::patterned(64 * 1024);
    let before = std::fs::read(&img.0).unwrap();
    let (mut rig, vq) = Rig::new(&img, false);
    // Beyond the end.
    let (st, _) = rig.request(&vq, VIRTIO_BLK_T_OUT, 127, &[ro(DATA, 1024)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    let (st, _) = rig.request(&vq, VIRTIO_BLK_T_IN, u64::MAX / 256, &[wo(DATA, 512)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    // Not whole sectors.
    let (st, _) = rig.request(&vq, VIRTIO_BLK_T_OUT, 0, &[ro(DATA, 100)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    // Unknown request type.
    let (st, len) = rig.request(&vq, 99, 0, &[]);
    assert_eq!((st, len), (VIRTIO_BLK_S_UNSUPP, 1));
    // Discard with flags set (unmap belongs to write-zeroes).
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    seg[12..16].copy_from_slice(&1u32.to_le_bytes());
    rig.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    let (st, _) = rig.request(&vq, VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 16)]);
    assert_eq!(st, VIRTIO_BLK_S_UNSUPP);
    assert_eq!(std::fs::read(&img.0).unwrap(), before);
}

#[test]
fn read_only_disk_refuses_writes() {
    let img = TempFile::patterned(64 * 1024);
    let before = std::fs::read(&img.0).unwrap();
    let (mut rig, vq) = Rig::new(&img, true);
    rig.mem
        .write_slice(&[0xaa; 512], GuestAddress(DATA))
        .unwrap();
    let (st, len) = rig.request(&vq, VIRTIO_BLK_T_OUT, 0, &[ro(DATA, 512)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_IOERR, 1));
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    rig.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    let (st, _) = rig.request(&vq, VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 16)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    // Reads and flushes work.
    let (st, _) = rig.request(&vq, VIRTIO_BLK_T_IN, 0, &[wo(DATA, 512)]);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(read_mem(&rig.mem, DATA, 512), before[..512]);
    let (st, _) = rig.request(&vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(std::fs::read(&img.0).unwrap(), before);
}

#[test]
fn discard_punches_holes() {
    let img = TempFile::patterned(1 << 20);
    let blocks_before = std::fs::metadata(&img.0).unwrap().blocks();
    let (mut rig, vq) = Rig::new(&img, false);
    // Two segments: 64 KiB at 128 KiB, 64 KiB at 512 KiB.
    let mut segs = [0u8; 32];
    segs[0..8].copy_from_slice(&256u64.to_le_bytes());
    segs[8..12].copy_from_slice(&128u32.to_le_bytes());
    segs[16..24].copy_from_slice(&1024u64.to_le_bytes());
    segs[24..28].copy_from_slice(&128u32.to_le_bytes());
    rig.mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    let (st, len) = rig.request(&vq, VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 32)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1));
    let data = std::fs::read(&img.0).unwrap();
    assert_eq!(data.len(), 1 << 20, "size is kept");
    // Either the file system punched the hole (zeros) or it cannot, in
    // which case the data stays: both are allowed; most punch.
    let meta = std::fs::metadata(&img.0).unwrap();
    if meta.blocks() < blocks_before {
        assert!(data[128 << 10..192 << 10].iter().all(|&b| b == 0));
        assert!(data[512 << 10..576 << 10].iter().all(|&b| b == 0));
    }
    assert_eq!(data[127 << 10], ((127 << 10) % 251) as u8);
    // Beyond the end fails.
    segs[16..24].copy_from_slice(&2047u64.to_le_bytes());
    rig.mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    let (st, _) = rig.request(&vq, VIRTIO_BLK_T_DISCARD, 0, &[ro(DATA, 32)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
}

#[test]
fn image_is_locked_against_a_second_writer() {
    let img = TempFile::patterned(4096);
    let rw = DiskConfig {
        id: "a".into(),
        path: img.0.clone(),
        readonly: false,
        format: None,
    };
    let ro = DiskConfig {
        readonly: true,
        format: None,
        ..rw.clone()
    };
    let first = Block::open(&rw).unwrap();
    let e = Block::open(&rw).err().unwrap().to_string();
    assert!(e.contains("in use by another VM"), "{e}");
    assert!(Block::open(&ro).is_err());
    drop(first);
    let r1 = Block::open(&ro).unwrap();
    let _r2 = Block::open(&ro).unwrap();
    assert!(Block::open(&rw).is_err());
    drop(r1);
    let missing = DiskConfig {
        path: "/nonexistent/x.img".into(),
        ..rw
    };
    let e = Block::open(&missing).err().unwrap().to_string();
    assert!(
        e.starts_with("virtio-blk 'a': cannot open disk image /nonexistent/x.img"),
        "{e}"
    );
}

#[test]
fn requests_are_done_once_across_a_snapshot() {
    let img = TempFile::patterned(64 * 1024);
    let (mut rig, vq) = Rig::new(&img, false);
    let (st, _) = rig.request(&vq, VIRTIO_BLK_T_IN, 0, &[wo(DATA, 512)]);
    assert_eq!(st, VIRTIO_BLK_S_OK);
    // A write made available but not yet notified when the VM is paused.
    rig.mem
        .write_slice(&[0x5a; 512], GuestAddress(DATA))
        .unwrap();
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    hdr[8..16].copy_from_slice(&5u64.to_le_bytes());
    rig.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    offer(&vq, 10, &[ro(HDR, 16), ro(DATA, 512), wo(STATUS, 1)]);
    rig.t.pause();
    let saved = rig.t.save_device();
    let crate::devices::virtio::VirtioDeviceState::Blk(s) = &saved else {
        panic!("not a disk state")
    };
    assert_eq!((s.size, s.readonly), (64 * 1024, false));
    assert_eq!(s.path, img.0);
    let json = stasis_snapshot::encode_section(s).unwrap();
    let s: crate::devices::virtio::state::VirtioBlkState =
        stasis_snapshot::decode_json(&json).unwrap();
    // The old VM goes away (and with it the image lock).
    let mem = rig.mem.clone();
    drop(rig);

    let disk = DiskConfig {
        id: "root".into(),
        path: img.0.clone(),
        readonly: false,
        format: None,
    };
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::restore(
        Box::new(Block::open(&disk).unwrap()),
        mem.clone(),
        evt,
        0,
        &s.transport,
    )
    .unwrap();
    t.resume();
    assert_ne!(file_bytes(&img, 5 * 512, 512), vec![0x5a; 512]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(&vq), 2);
    assert_eq!(used(&vq, 1), (10, 1));
    assert_eq!(file_bytes(&img, 5 * 512, 512), vec![0x5a; 512]);
    // Notifying again does nothing twice.
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(used_idx(&vq), 2);
}

#[test]
fn any_framing_of_header_data_and_status_works() {
    let img = TempFile::patterned(1 << 20);
    let (rig, vq) = Rig::new(&img, false);
    let mut t = rig.t;
    // A read of 2 sectors at sector 5: the header split over two
    // descriptors, the data and the status byte sharing one, the data
    // starting in another.
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    hdr[8..16].copy_from_slice(&5u64.to_le_bytes());
    rig.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    let bufs = [
        ro(HDR, 3),
        ro(HDR + 3, 13),
        wo(DATA, 100),
        wo(DATA + 0x1000, 925),
    ];
    offer(&vq, 0, &bufs);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    let (head, len) = used(&vq, 0);
    assert_eq!((head, len), (0, 1025));
    let mut got = read_mem(&rig.mem, DATA, 100);
    got.extend(read_mem(&rig.mem, DATA + 0x1000, 924));
    assert_eq!(got, file_bytes(&img, 5 * 512, 1024));
    let status: u8 = rig.mem.read_obj(GuestAddress(DATA + 0x1000 + 924)).unwrap();
    assert_eq!(status, VIRTIO_BLK_S_OK);

    // A write of 1 sector whose header and data share a descriptor.
    let pattern: Vec<u8> = (0..512).map(|i| (i * 13 % 251) as u8).collect();
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    hdr[8..16].copy_from_slice(&9u64.to_le_bytes());
    let mut req = hdr.to_vec();
    req.extend_from_slice(&pattern);
    rig.mem.write_slice(&req, GuestAddress(DATA)).unwrap();
    offer(&vq, 8, &[ro(DATA, 16 + 512), wo(STATUS, 1)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    let (head, len) = used(&vq, 1);
    assert_eq!((head, len), (8, 1));
    assert_eq!(
        rig.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(file_bytes(&img, 9 * 512, 512), pattern);
}

#[test]
fn a_readable_descriptor_after_a_writable_one_is_refused() {
    let img = TempFile::patterned(64 * 1024);
    let before = std::fs::read(&img.0).unwrap();
    let (rig, vq) = Rig::new(&img, false);
    let mut t = rig.t;
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    rig.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    offer(&vq, 0, &[ro(HDR, 16), wo(STATUS, 1), ro(DATA, 512)]);
    wr(&mut t, reg::QUEUE_NOTIFY, 0);
    let (head, len) = used(&vq, 0);
    assert_eq!((head, len), (0, 0));
    assert_eq!(std::fs::read(&img.0).unwrap(), before);
}
