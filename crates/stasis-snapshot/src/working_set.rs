//! A snapshot's working set: the blocks of guest memory a restored guest
//! touched first, in the order it touched them. One restore records it,
//! later restores of the same snapshot fill those blocks first.
//!
//! It is an optional file beside the snapshot, `working-set.bin`, with its
//! own version and checksum (FORMAT.md §7), bound to the snapshot by the
//! manifest's body checksum. It is a hint: a snapshot restores without
//! one, and one that is damaged, foreign or of another version is ignored
//! with a warning, never trusted for anything but the order of reads.
//!
//! ```text
//! offset size
//!      0    8  magic "STASISWS"
//!      8    4  version (1), little endian like every field
//!     12    4  CRC-32C of the snapshot's manifest body
//!     16    8  block size in bytes (2 MiB)
//!     24    8  number of blocks N
//!     32  8·N  guest physical address of each block, in touch order
//!  32+8N    4  CRC-32C of everything before
//! ```

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use crate::reader::SnapshotReader;

/// The file name, inside the snapshot directory.
pub const WORKING_SET_FILE: &str = "working-set.bin";
const MAGIC: &[u8; 8] = b"STASISWS";
/// The version this build writes and reads.
pub const WORKING_SET_VERSION: u32 = 1;
const HEADER: usize = 32;

/// Guest memory blocks in the order a guest touched them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// Size of each block in bytes.
    pub block_size: u64,
    /// Guest physical address of each block (a multiple of
    /// `block_size`), first touched first, no duplicates.
    pub blocks: Vec<u64>,
}

fn snapshot_blocks(reader: &SnapshotReader, block_size: u64) -> u64 {
    reader
        .regions()
        .iter()
        .map(|r| r.size.div_ceil(block_size))
        .sum()
}

/// Reads the working set stored beside the snapshot: `Ok(None)` if there
/// is none, `Err` (a message for a warning) if there is one that cannot be
/// used. Every block must lie in a region of the snapshot; the file is
/// read only up to the size such a working set can have.
pub fn read_working_set(reader: &SnapshotReader) -> Result<Option<WorkingSet>, String> {
    let path = reader.dir().join(WORKING_SET_FILE);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let bad = |what: &str| format!("{}: {what}; ignored", path.display());
    let md = file.metadata().map_err(|e| bad(&e.to_string()))?;
    if !md.is_file() {
        return Err(bad("not a regular file"));
    }
    let block_size = crate::FILL_BLOCK;
    let max_blocks = snapshot_blocks(reader, block_size);
    let max_len = HEADER as u64 + 8 * max_blocks + 4;
    if md.len() > max_len || md.len() < HEADER as u64 + 4 {
        return Err(bad(&format!(
            "{} bytes, not the size of a working set of this snapshot",
            md.len()
        )));
    }
    let mut bytes = Vec::with_capacity(md.len() as usize);
    file.take(max_len)
        .read_to_end(&mut bytes)
        .map_err(|e| bad(&e.to_string()))?;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    if &bytes[..8] != MAGIC {
        return Err(bad("not a stasis working set"));
    }
    let version = u32_at(8);
    if version != WORKING_SET_VERSION {
        return Err(bad(&format!(
            "version {version}, this stasis reads version {WORKING_SET_VERSION}"
        )));
    }
    let body_end = bytes.len() - 4;
    if crc32c::crc32c(&bytes[..body_end]) != u32_at(body_end) {
        return Err(bad("checksum mismatch"));
    }
    if u32_at(12) != reader.manifest().body_crc32c {
        return Err(bad(
            "recorded for another snapshot (or an earlier one at this path)",
        ));
    }
    if u64_at(16) != block_size {
        return Err(bad(&format!(
            "block size {} (expected {block_size})",
            u64_at(16)
        )));
    }
    let count = u64_at(24);
    if count > max_blocks || HEADER as u64 + 8 * count != body_end as u64 {
        return Err(bad(&format!("{count} blocks do not fit its length")));
    }
    let mut seen = std::collections::HashSet::new();
    let mut blocks = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let gpa = u64_at(HEADER + 8 * i);
        let inside = reader
            .regions()
            .iter()
            .any(|r| gpa >= r.gpa && gpa - r.gpa < r.size && (gpa - r.gpa) % block_size == 0);
        if !inside {
            return Err(bad(&format!(
                "block {gpa:#x} is not the start of a block of guest memory"
            )));
        }
        if seen.insert(gpa) {
            blocks.push(gpa);
        }
    }
    Ok(Some(WorkingSet { block_size, blocks }))
}

/// Stores `set` beside the snapshot (replacing one there): written to a
/// temporary file, made durable, then renamed into place, so a crash
/// leaves the old file or the new one.
pub fn write_working_set(reader: &SnapshotReader, set: &WorkingSet) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(HEADER + 8 * set.blocks.len() + 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&WORKING_SET_VERSION.to_le_bytes());
    bytes.extend_from_slice(&reader.manifest().body_crc32c.to_le_bytes());
    bytes.extend_from_slice(&set.block_size.to_le_bytes());
    bytes.extend_from_slice(&(set.blocks.len() as u64).to_le_bytes());
    for b in &set.blocks {
        bytes.extend_from_slice(&b.to_le_bytes());
    }
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let dir = reader.dir();
    let tmp = dir.join(format!(".{WORKING_SET_FILE}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(WORKING_SET_FILE))?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
