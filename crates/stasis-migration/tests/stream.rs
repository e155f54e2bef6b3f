//! A whole conversation through the framing and messages, and streams
//! that are damaged, cut short, foreign or hostile: each refused with an
//! error naming what is wrong, never a panic or an allocation the stream
//! only claims.

use std::io::Cursor;

use stasis_migration::{
    negotiate, BatchBuilder, Error, FrameKind, FrameReader, FrameWriter, Hello, Message, Refusal,
    Section, VmDescription, Welcome, MAX_BATCH_PAGES, MAX_PAYLOAD, PAGE_SIZE, PREAMBLE,
    PROTOCOL_VERSION,
};

fn page(fill: u8) -> [u8; PAGE_SIZE] {
    [fill; PAGE_SIZE]
}

/// The source's half of a warm migration of 3 pages and one section.
fn sample_stream() -> Vec<u8> {
    let mut w = FrameWriter::start(Vec::new()).unwrap();
    let send = |w: &mut FrameWriter<Vec<u8>>, m: Message| {
        let (k, p) = m.encode().unwrap();
        w.write(k, &p).unwrap();
    };
    send(
        &mut w,
        Message::Hello(Hello {
            protocol_min: 1,
            protocol_max: PROTOCOL_VERSION,
            software: "stasis test".into(),
        }),
    );
    send(
        &mut w,
        Message::VmDescription(VmDescription {
            vm_config: serde_json::json!({"name": "vm1", "memory_mib": 64}),
            cpu: serde_json::json!({"vendor": "AuthenticAMD"}),
            memory_bytes: 64 << 20,
            connections: 1,
        }),
    );
    let mut b = BatchBuilder::new();
    b.add(0x1000, &page(7));
    b.add(0x2000, &page(0));
    b.add(0x10_0000, &page(9));
    w.write(FrameKind::MemoryBatch, &b.take_payload()).unwrap();
    let s = Section {
        name: "vcpu",
        instance: "0",
        version: 3,
        optional: false,
        bytes: b"registers",
    };
    w.write(FrameKind::Section, &s.encode().unwrap()).unwrap();
    send(&mut w, Message::StateDone);
    w.into_inner()
}

/// Reads every frame and decodes it; the first error, if any.
fn read_all(bytes: &[u8]) -> Result<usize, Error> {
    let mut r = FrameReader::start(Cursor::new(bytes))?;
    let mut n = 0;
    while let Some(f) = r.next_frame()? {
        Message::decode(&f)?;
        n += 1;
    }
    Ok(n)
}

#[test]
fn a_conversation_round_trips() {
    let bytes = sample_stream();
    let mut r = FrameReader::start(Cursor::new(&bytes)).unwrap();
    let f = r.next_frame().unwrap().unwrap();
    let Message::Hello(h) = Message::decode(&f).unwrap() else {
        panic!("not a hello");
    };
    assert_eq!(
        negotiate(h.protocol_min, h.protocol_max).unwrap(),
        PROTOCOL_VERSION
    );
    let f = r.next_frame().unwrap().unwrap();
    assert!(
        matches!(Message::decode(&f).unwrap(), Message::VmDescription(d) if d.memory_bytes == 64 << 20)
    );
    let f = r.next_frame().unwrap().unwrap();
    let Message::MemoryBatch(b) = Message::decode(&f).unwrap() else {
        panic!("not a batch");
    };
    let pages: Vec<_> = b.pages().collect();
    assert_eq!(pages.len(), 3);
    assert_eq!((pages[0].gpa, pages[0].data), (0x1000, Some(&page(7)[..])));
    assert_eq!(
        (pages[1].gpa, pages[1].data),
        (0x2000, None),
        "zero page elided"
    );
    assert_eq!(
        (pages[2].gpa, pages[2].data),
        (0x10_0000, Some(&page(9)[..]))
    );
    // Two data pages travel, the zero page as an entry only.
    assert_eq!(f.payload.len(), 4 + 3 * 8 + 2 * PAGE_SIZE);
    let f = r.next_frame().unwrap().unwrap();
    let Message::Section(s) = Message::decode(&f).unwrap() else {
        panic!("not a section");
    };
    assert_eq!(
        (s.name, s.instance, s.version, s.optional, s.bytes),
        ("vcpu", "0", 3, false, &b"registers"[..])
    );
    assert_eq!(
        Message::decode(&r.next_frame().unwrap().unwrap()).unwrap(),
        Message::StateDone
    );
    assert!(r.next_frame().unwrap().is_none(), "a clean end");
    assert_eq!(r.bytes_read(), bytes.len() as u64);

    // The destination's answers.
    let mut w = FrameWriter::start(Vec::new()).unwrap();
    for m in [
        Message::Welcome(Welcome {
            protocol: 1,
            software: "stasis test".into(),
            session: None,
        }),
        Message::Accept,
        Message::Resumed,
        Message::Refuse(Refusal {
            reason: "this host lacks avx512f".into(),
        }),
    ] {
        let (k, p) = m.encode().unwrap();
        w.write(k, &p).unwrap();
    }
    assert_eq!(read_all(&w.into_inner()).unwrap(), 4);
}

#[test]
fn a_full_batch_fits_a_frame() {
    let mut b = BatchBuilder::new();
    let mut full = false;
    for i in 0..MAX_BATCH_PAGES as u64 {
        full = b.add(i * 4096, &page(1));
    }
    assert!(full);
    let p = b.take_payload();
    assert!(p.len() <= MAX_PAYLOAD as usize);
    assert!(b.is_empty());
    let mut w = FrameWriter::start(Vec::new()).unwrap();
    w.write(FrameKind::MemoryBatch, &p).unwrap();
    assert_eq!(read_all(&w.into_inner()).unwrap(), 1);
}

#[test]
fn foreign_streams_are_named() {
    let e = read_all(b"GET / HTTP/1.1\r\n\r\n").unwrap_err().to_string();
    assert_eq!(e, "not a stasis migration stream (it began with GET / HT)");
    let e = read_all(b"STAS").unwrap_err().to_string();
    assert_eq!(e, "the stream ended inside the preamble");
}

#[test]
fn every_cut_is_a_clean_end_or_names_where_it_was_cut() {
    let bytes = sample_stream();
    let boundaries = {
        // Offsets where a frame ends.
        let mut v = vec![PREAMBLE.len()];
        let mut at = PREAMBLE.len();
        while at < bytes.len() {
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            at += 8 + len + 4;
            v.push(at);
        }
        v
    };
    for cut in PREAMBLE.len()..bytes.len() {
        match read_all(&bytes[..cut]) {
            Ok(_) => assert!(boundaries.contains(&cut), "cut at {cut} read as complete"),
            Err(e) => assert!(matches!(e, Error::Truncated { .. }), "cut at {cut}: {e}"),
        }
    }
}

#[test]
fn every_flipped_byte_is_refused() {
    let bytes = sample_stream();
    for i in PREAMBLE.len()..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= bit;
            // A length flipped upwards may leave the stream short: that is
            // a refusal too. Nothing may decode as if it were intact.
            assert!(read_all(&b).is_err(), "byte {i} ^ {bit:#x} went through");
        }
    }
}

#[test]
fn hostile_headers_cost_an_error_not_memory() {
    let mut s = PREAMBLE.to_vec();
    // A 4 GiB payload claimed: refused from the header alone.
    s.extend_from_slice(&[6, 0, 0, 0]);
    s.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = read_all(&s).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "memory-batch frame of 4294967295 bytes is larger than the {MAX_PAYLOAD}-byte limit"
        )
    );
    let mut s = PREAMBLE.to_vec();
    s.extend_from_slice(&[99, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        read_all(&s).unwrap_err().to_string(),
        "unknown frame kind 99"
    );
    let mut s = PREAMBLE.to_vec();
    s.extend_from_slice(&[5, 2, 0, 0, 0, 0, 0, 0]);
    let e = read_all(&s).unwrap_err().to_string();
    assert!(
        e.starts_with("bad frame header: accept frame with flags 0x02"),
        "{e}"
    );
    // The writer refuses what the reader would.
    let mut w = FrameWriter::start(Vec::new()).unwrap();
    assert!(w
        .write(FrameKind::MemoryBatch, &vec![0; MAX_PAYLOAD as usize + 1])
        .is_err());
}

/// A frame with `payload`, checksummed correctly: what a hostile sender
/// that knows the format can send.
fn frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let mut w = FrameWriter::start(Vec::new()).unwrap();
    w.write(kind, payload).unwrap();
    w.into_inner()
}

#[test]
fn well_framed_nonsense_is_refused_by_name() {
    let cases: Vec<(FrameKind, Vec<u8>, &str)> = vec![
        (FrameKind::MemoryBatch, vec![], "memory-batch frame: 0 bytes, shorter than its page count"),
        (FrameKind::MemoryBatch, 0u32.to_le_bytes().to_vec(), "memory-batch frame: 0 pages (1..=1024)"),
        (FrameKind::MemoryBatch, 5000u32.to_le_bytes().to_vec(), "memory-batch frame: 5000 pages (1..=1024)"),
        (FrameKind::MemoryBatch, {
            let mut p = 2u32.to_le_bytes().to_vec();
            p.extend_from_slice(&0x1000u64.to_le_bytes());
            p
        }, "memory-batch frame: 12 bytes cannot hold the entries of 2 pages"),
        (FrameKind::MemoryBatch, {
            let mut p = 1u32.to_le_bytes().to_vec();
            p.extend_from_slice(&0x1005u64.to_le_bytes());
            p
        }, "memory-batch frame: page 0 (guest physical 0x1000) has kind 5, not 0 (data) or 1 (zeros)"),
        (FrameKind::MemoryBatch, {
            let mut p = 1u32.to_le_bytes().to_vec();
            p.extend_from_slice(&0x1000u64.to_le_bytes());
            p.extend_from_slice(&[1; 100]);
            p
        }, "memory-batch frame: 112 bytes, but 1 pages of which 1 carry data make 4108"),
        (FrameKind::Section, vec![3, 0, b'a'], "section frame: 3 bytes, cut short"),
        (FrameKind::Section, {
            let mut p = vec![0, 0, 1, 0, b'0'];
            p.extend_from_slice(&[1, 0, 0, 0, 0]);
            p
        }, "section frame: section name of 0 bytes (1..=64)"),
        (FrameKind::Section, {
            let mut p = vec![2, 0, 0x1b, b'['];
            p.extend_from_slice(&[1, 0, b'0', 1, 0, 0, 0, 0]);
            p
        }, "section frame: section name \"\\u{1b}[\" has control characters"),
        (FrameKind::Section, {
            let mut p = vec![1, 0, b'a', 1, 0, b'0'];
            p.extend_from_slice(&[1, 0, 0, 0, 0x80]);
            p
        }, "section frame: flags 0x80: only bit 0 (optional) is defined"),
        (FrameKind::Hello, b"{\"protocol_min\": \"one\"}".to_vec(), "hello frame: invalid type: string \"one\", expected u32"),
        (FrameKind::Accept, b"x".to_vec(), "accept frame: 1 bytes where none belong"),
    ];
    for (kind, payload, want) in cases {
        let e = read_all(&frame(kind, &payload)).unwrap_err().to_string();
        assert!(e.starts_with(want), "{kind}: expected {want:?}, got {e:?}");
    }
}

#[test]
fn a_files_offer_round_trips_and_files_ready_carries_nothing() {
    use stasis_migration::{FilesOffer, MemoryFile};
    let offer = FilesOffer {
        memory: vec![MemoryFile {
            gpa: 0,
            size: 1 << 30,
            offset: 0,
        }],
        taps: vec!["tap0".into()],
    };
    assert_eq!(offer.count(), 2);
    let mut w = FrameWriter::start(Vec::new()).unwrap();
    let (k, p) = Message::Files(offer.clone()).encode().unwrap();
    assert_eq!(k, FrameKind::Files);
    w.write(k, &p).unwrap();
    w.write(FrameKind::FilesReady, b"x").unwrap();
    let bytes = w.into_inner();
    let mut r = FrameReader::start(Cursor::new(&bytes)).unwrap();
    let f = r.next_frame().unwrap().unwrap();
    assert_eq!(Message::decode(&f).unwrap(), Message::Files(offer));
    let f = r.next_frame().unwrap().unwrap();
    let e = Message::decode(&f).unwrap_err().to_string();
    assert!(
        e.contains("files-ready frame: 1 bytes where none belong"),
        "{e}"
    );
}

#[test]
fn a_compressed_batch_round_trips_and_hostile_ones_are_refused() {
    use stasis_migration::{CompressedBatch, MemoryBatch};
    let mut b = BatchBuilder::new();
    b.add(0x1000, &page(7));
    b.add(0x2000, &page(0));
    b.add(0x3000, &page(9));
    let mut scratch = Vec::new();
    let mut w = FrameWriter::start(Vec::new()).unwrap();
    b.send_zstd(&mut w, &mut scratch).unwrap();
    let bytes = w.into_inner();
    let mut r = FrameReader::start(Cursor::new(&bytes)).unwrap();
    let f = r.next_frame().unwrap().unwrap();
    assert!(
        f.payload.len() < 2 * 4096,
        "compressed: {}",
        f.payload.len()
    );
    let Message::MemoryBatchZstd(c) = Message::decode(&f).unwrap() else {
        panic!("not a compressed batch");
    };
    let mut out = Vec::new();
    c.decompress(&mut out).unwrap();
    let batch = MemoryBatch::decode(&out).unwrap();
    let pages: Vec<_> = batch.pages().collect();
    assert_eq!(pages.len(), 3);
    assert_eq!(pages[1].data, None);
    assert_eq!(pages[2].data.unwrap(), &page(9)[..]);

    // Hostile: a length over the frame limit, a length that is not what
    // the data decompresses to, data that is not zstd.
    let e = CompressedBatch::decode(&u32::MAX.to_le_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("claims 4294967295 bytes uncompressed"), "{e}");
    // A reused buffer larger than the claim must not let more through.
    let mut big = Vec::with_capacity(1 << 20);
    let more = format!(
        "it decompresses to {} bytes, {} announced",
        c.len,
        c.len + 1
    );
    for (len, what) in [
        (c.len - 1, "it does not decompress"),
        (c.len + 1, more.as_str()),
    ] {
        let hostile = CompressedBatch { len, data: c.data };
        let e = hostile.decompress(&mut big).unwrap_err().to_string();
        assert!(e.contains(what), "{len}: {e}");
    }
    let garbage = CompressedBatch {
        len: 100,
        data: b"not zstd at all",
    };
    let e = garbage.decompress(&mut out).unwrap_err().to_string();
    assert!(
        e.contains("memory-batch-zstd frame: it does not decompress"),
        "{e}"
    );
}

#[test]
fn page_ranges_round_trip_and_bad_ones_are_named() {
    let ranges = vec![(0x1000, 0x3000), (0x1_0000_0000, 0x1000)];
    for m in [
        Message::StalePages(ranges.clone()),
        Message::PageRequest(ranges.clone()),
        Message::PageRequest(Vec::new()),
        Message::PostcopyDone,
        Message::PostcopyComplete,
    ] {
        let (k, p) = m.encode().unwrap();
        let mut w = FrameWriter::start(Vec::new()).unwrap();
        w.write(k, &p).unwrap();
        let bytes = w.into_inner();
        let mut r = FrameReader::start(Cursor::new(&bytes)).unwrap();
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(Message::decode(&f).unwrap(), m);
    }
    let raw = |start: u64, len: u64| {
        let mut p = start.to_le_bytes().to_vec();
        p.extend_from_slice(&len.to_le_bytes());
        p
    };
    for (payload, want) in [
        (raw(0x1001, 0x1000), "not a non-empty run of whole pages"),
        (raw(0x1000, 0), "not a non-empty run of whole pages"),
        (
            raw(u64::MAX - 0xfff, 0x2000),
            "not a non-empty run of whole pages",
        ),
        (vec![0; 15], "not a whole number of 16-byte ranges"),
    ] {
        let mut w = FrameWriter::start(Vec::new()).unwrap();
        w.write(FrameKind::StalePages, &payload).unwrap();
        let bytes = w.into_inner();
        let mut r = FrameReader::start(Cursor::new(&bytes)).unwrap();
        let f = r.next_frame().unwrap().unwrap();
        let e = Message::decode(&f).unwrap_err().to_string();
        assert!(e.contains("stale-pages frame") && e.contains(want), "{e}");
    }
}
