//! Reading guest memory block by block with every chunk checked as it is
//! read (what background restores do), and the working-set file.

mod common;

use std::path::Path;

use common::*;
use stasis_snapshot::{
    read_working_set, write_working_set, Error, SnapshotChain, SnapshotReader, WorkingSet,
    FILL_BLOCK, WORKING_SET_FILE,
};

/// 9 MiB of guest memory (the last block is 1 MiB): blocks 0 and 2 hold
/// data, block 1 is all zeros, the rest a mix.
fn memory() -> Vec<u8> {
    let mut m = vec![0u8; 9 << 20];
    for (i, page) in m.chunks_mut(4096).enumerate() {
        let in_zero_block = (512..1024).contains(&i);
        if !in_zero_block && i % 3 != 0 {
            page.fill((i % 200 + 1) as u8);
        }
    }
    m
}

fn write(dir: &Path, mem: &[u8], parent: Option<(&Path, &str)>) {
    write_member(dir, mem, 0x100000, parent);
}

/// Every block of region 0 read with `read_block`, concatenated.
fn by_blocks(chain: &SnapshotChain) -> Vec<u8> {
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    for (offset, len) in chain.blocks(0) {
        let mut buf = vec![0xAAu8; len as usize];
        if chain.block_is_zero(0, offset, len).unwrap() {
            buf.fill(0);
        } else {
            chain
                .read_block(0, offset, &mut buf, &mut scratch, true)
                .unwrap();
        }
        out.extend_from_slice(&buf);
    }
    out
}

#[test]
fn blocks_compose_the_memory_of_a_snapshot_and_of_a_chain() {
    let t = TempDir::new("blocks-compose");
    let (a, b) = (t.join("a"), t.join("b"));
    let mut mem = memory();
    write(&a, &mem, None);
    let chain = SnapshotChain::open(&a).unwrap();
    assert!(chain.checks_by_block());
    let blocks: Vec<(u64, u64)> = chain.blocks(0).collect();
    assert_eq!(blocks.len(), 5);
    assert_eq!(blocks[4], (4 * FILL_BLOCK, 1 << 20));
    assert!(chain.block_is_zero(0, FILL_BLOCK, FILL_BLOCK).unwrap());
    assert!(!chain.block_is_zero(0, 0, FILL_BLOCK).unwrap());
    assert_eq!(by_blocks(&chain), mem);

    // A diff: pages rewritten, a data page zeroed, a page in the zero
    // block filled (so that block is no longer zero).
    mem[3 * 4096..4 * 4096].fill(0xEE);
    mem[(4 << 20) + 4096..(4 << 20) + 8192].fill(0);
    mem[(1 << 20) * 3 + 5..(1 << 20) * 3 + 9].copy_from_slice(b"diff");
    write(&b, &mem, Some((&a, "../a")));
    let chain = SnapshotChain::open(&b).unwrap();
    assert_eq!(chain.len(), 2);
    assert!(!chain.block_is_zero(0, FILL_BLOCK, FILL_BLOCK).unwrap());
    assert_eq!(by_blocks(&chain), mem);
}

#[test]
fn a_damaged_chunk_is_named_when_its_block_is_read() {
    let t = TempDir::new("blocks-bad");
    let a = t.join("a");
    write(&a, &memory(), None);
    // Chunk 2 (the third 2 MiB of the file) damaged.
    flip_byte(&a.join("memory.img"), (2 << 21) + 77);
    let chain = SnapshotChain::open(&a).unwrap();
    let mut scratch = Vec::new();
    let mut buf = vec![0u8; FILL_BLOCK as usize];
    chain
        .read_block(0, 0, &mut buf, &mut scratch, true)
        .expect("chunk 0 is intact");
    let e = chain
        .read_block(0, 2 * FILL_BLOCK, &mut buf, &mut scratch, true)
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, Error::ChunkChecksum { .. }), "{text}");
    assert!(text.contains("memory.img: memory chunk 2 "), "{text}");
    assert!(text.contains("guest physical 0x500000..0x700000"), "{text}");
    // Not checked when asked not to.
    chain
        .read_block(0, 2 * FILL_BLOCK, &mut buf, &mut scratch, false)
        .unwrap();
}

#[test]
fn a_hole_where_data_was_recorded_is_damage() {
    let t = TempDir::new("blocks-hole");
    let a = t.join("a");
    write(&a, &memory(), None);
    // Punch out block 2's data: the file reads zeros there, but the
    // manifest recorded the checksum of data.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(a.join("memory.img"))
        .unwrap();
    use std::os::unix::io::AsRawFd;
    // SAFETY: fallocate on an open file descriptor we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (2 * FILL_BLOCK) as i64,
            FILL_BLOCK as i64,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let chain = SnapshotChain::open(&a).unwrap();
    let e = chain
        .block_is_zero(0, 2 * FILL_BLOCK, FILL_BLOCK)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("memory chunk 2 ") && e.contains("checksum mismatch"),
        "{e}"
    );
}

#[test]
fn a_working_set_round_trips_and_bad_ones_are_ignored_with_a_reason() {
    let t = TempDir::new("blocks-ws");
    let a = t.join("a");
    write(&a, &memory(), None);
    let r = SnapshotReader::open(&a).unwrap();
    assert_eq!(read_working_set(&r).unwrap(), None);
    let set = WorkingSet {
        block_size: FILL_BLOCK,
        blocks: vec![0x100000 + 4 * FILL_BLOCK, 0x100000, 0x100000 + FILL_BLOCK],
    };
    write_working_set(&r, &set).unwrap();
    assert_eq!(read_working_set(&r).unwrap(), Some(set.clone()));
    // No temporary file left behind.
    assert_eq!(
        std::fs::read_dir(&a)
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.'))
            .count(),
        0
    );
    let path = a.join(WORKING_SET_FILE);
    let good = std::fs::read(&path).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("checksum mismatch", {
            let mut b = good.clone();
            b[33] ^= 1;
            b
        }),
        ("not a stasis working set", {
            let mut b = good.clone();
            b[0] = b'X';
            b
        }),
        ("version 9", {
            let mut b = good.clone();
            b[8] = 9;
            let n = b.len() - 4;
            let crc = crc32c::crc32c(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            b
        }),
        ("not the size of a working set", good[..20].to_vec()),
        ("not the size of a working set", {
            let mut b = good.clone();
            b.extend(std::iter::repeat_n(0u8, 8 * 100));
            b
        }),
        ("another snapshot", {
            let mut b = good.clone();
            b[12] ^= 0xFF;
            let n = b.len() - 4;
            let crc = crc32c::crc32c(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            b
        }),
        ("is not the start of a block", {
            let mut b = good.clone();
            b[32..40].copy_from_slice(&0x100001u64.to_le_bytes());
            let n = b.len() - 4;
            let crc = crc32c::crc32c(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            b
        }),
    ];
    for (want, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let e = read_working_set(&r).unwrap_err();
        assert!(e.contains(want) && e.ends_with("ignored"), "{want}: {e}");
    }
    // A symlink or a FIFO in its place is refused, never followed or
    // waited on.
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
    assert!(read_working_set(&r).is_err());
    std::fs::remove_file(&path).unwrap();
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = read_working_set(&r).unwrap_err();
    assert!(e.contains("not a regular file"), "{e}");
}
