//! Guest memory of a snapshot chain read one block at a time, every stored
//! chunk checked against its checksum as it is read.
//!
//! A restore that fills guest memory while the guest already runs reads
//! each block when it needs it (a fault, or the background filler's turn)
//! and checks what it read then, instead of reading the whole image once
//! before the guest may start. A block is [`FILL_BLOCK`] bytes of one
//! region (the region's last block may be shorter); each member of the
//! chain contributes what its page map says it holds, the newest last.

use std::os::unix::fs::FileExt;

use crate::chain::SnapshotChain;
use crate::crc;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::page_map::PageSource;
use crate::reader::SnapshotReader;
use crate::PAGE_SIZE;

/// The unit in which restores fill guest memory: one 2 MiB huge page.
pub const FILL_BLOCK: u64 = 2 << 20;

fn io_error(reader: &SnapshotReader, at: u64, source: std::io::Error) -> Error {
    Error::Io {
        context: format!(
            "reading {} at offset {at:#x}",
            reader.memory_file_path().display()
        ),
        source,
    }
}

/// Reads chunk `index` of `reader`'s memory file into `buf` (cleared and
/// sized to the chunk) and, if `verify`, checks it. A chunk that is a hole
/// in the file is not read.
fn read_chunk(reader: &SnapshotReader, index: u64, buf: &mut [u8], verify: bool) -> Result<()> {
    let mem = &reader.body().memory;
    let start = index * mem.chunk_size;
    let file = reader.memory_file();
    let has_data = match fsutil::seek_data(file, start) {
        Ok(None) => false,
        Ok(Some(d)) => d < start + buf.len() as u64,
        Err(_) => true,
    };
    let computed = if has_data {
        file.read_exact_at(buf, start)
            .map_err(|e| io_error(reader, start, e))?;
        verify.then(|| crc::append(0, buf))
    } else {
        buf.fill(0);
        verify.then(|| crc::append_zeros(0, buf.len() as u64))
    };
    if let Some(computed) = computed {
        let recorded = mem.chunk_crc32c.get(index as usize).copied();
        if recorded != Some(computed) {
            let end = start + buf.len() as u64;
            return Err(Error::ChunkChecksum {
                path: reader.memory_file_path(),
                chunk: reader.describe_chunk(index, start, end, recorded.unwrap_or(0), computed),
            });
        }
    }
    Ok(())
}

/// The length of chunk `index` of `reader`'s memory file.
fn chunk_len(reader: &SnapshotReader, index: u64) -> u64 {
    let mem = &reader.body().memory;
    let start = index * mem.chunk_size;
    (start + mem.chunk_size)
        .min(mem.file_size)
        .saturating_sub(start)
}

impl SnapshotChain {
    /// Whether [`SnapshotChain::read_block`] can check every chunk it reads
    /// within one block: every member's chunks are at most
    /// [`FILL_BLOCK`] bytes (stasis writes 2 MiB chunks). Otherwise the
    /// memory must be verified whole before use.
    pub fn checks_by_block(&self) -> bool {
        self.members()
            .all(|m| m.body().memory.chunk_size <= FILL_BLOCK)
    }

    /// The blocks of region `region`: `(offset, length)` pairs.
    pub fn blocks(&self, region: usize) -> impl Iterator<Item = (u64, u64)> {
        let size = self.base().regions()[region].size;
        (0..size.div_ceil(FILL_BLOCK)).map(move |i| {
            let offset = i * FILL_BLOCK;
            (offset, FILL_BLOCK.min(size - offset))
        })
    }

    /// Whether the block of region `region` at `offset`, `len` bytes long,
    /// holds no data in any member (it reads as zeros and need not be
    /// read). The base's checksums of those chunks are checked to be those
    /// of zeros: a hole where data was recorded is damage.
    pub fn block_is_zero(&self, region: usize, offset: u64, len: u64) -> Result<bool> {
        let base = self.base();
        let mem = &base.body().memory;
        let start = base.regions()[region].file_offset + offset;
        let end = start + len;
        // A chunk reaching past the block (the short last block of a
        // region) also covers bytes of no block: leave it to `read_block`.
        let last = (end - 1) / mem.chunk_size;
        if !start.is_multiple_of(mem.chunk_size)
            || last * mem.chunk_size + chunk_len(base, last) > end
        {
            return Ok(false);
        }
        match fsutil::seek_data(base.memory_file(), start) {
            Ok(Some(d)) if d < end => return Ok(false),
            Ok(_) => {}
            Err(_) => return Ok(false),
        }
        let first = self.first_page(region) + offset / PAGE_SIZE;
        let pages = len.div_ceil(PAGE_SIZE);
        for (_, map) in self.layers() {
            if let Some(map) = map {
                if (first..first + pages).any(|p| map.get(p) == PageSource::Here) {
                    return Ok(false);
                }
            }
        }
        let mut index = start / mem.chunk_size;
        while index * mem.chunk_size < end {
            let n = chunk_len(base, index);
            let zeros = crc::append_zeros(0, n);
            let recorded = mem.chunk_crc32c.get(index as usize).copied();
            if recorded != Some(zeros) {
                let cs = index * mem.chunk_size;
                return Err(Error::ChunkChecksum {
                    path: base.memory_file_path(),
                    chunk: base.describe_chunk(index, cs, cs + n, recorded.unwrap_or(0), zeros),
                });
            }
            index += 1;
        }
        Ok(true)
    }

    /// Reads the block of region `region` at `offset` into `dst` (its
    /// length is the block's) as the newest snapshot describes it: the
    /// base's bytes, then each diff's pages over them, oldest first. With
    /// `verify`, every chunk read is checked against its checksum first
    /// and a mismatch is [`Error::ChunkChecksum`] naming the file and the
    /// chunk. `scratch` is reused between calls (at most one chunk).
    pub fn read_block(
        &self,
        region: usize,
        offset: u64,
        dst: &mut [u8],
        scratch: &mut Vec<u8>,
        verify: bool,
    ) -> Result<()> {
        let layers = self.layers();
        for (i, (reader, map)) in layers.iter().enumerate().rev() {
            let is_base = i == layers.len() - 1;
            let r = &reader.regions()[region];
            let start = r.file_offset + offset;
            let end = start + dst.len() as u64;
            let chunk = reader.body().memory.chunk_size;
            let first = self.first_page(region) + offset / PAGE_SIZE;
            let mut index = start / chunk;
            while index * chunk < end {
                let cs = index * chunk;
                let ce = cs + chunk_len(reader, index);
                index += 1;
                // The part of this chunk inside the block, as dst offsets.
                let (a, b) = (
                    (cs.max(start) - start) as usize,
                    (ce.min(end) - start) as usize,
                );
                if a >= b {
                    continue;
                }
                let wanted = |p: u64| match map {
                    None => PageSource::Here,
                    Some(m) => m.get(first + p),
                };
                let pages = (a as u64 / PAGE_SIZE)..(b as u64).div_ceil(PAGE_SIZE);
                if !is_base {
                    // A diff: clear what it says is zero; read the chunk
                    // only if it stores pages of this block.
                    let mut any = false;
                    for p in pages.clone() {
                        match wanted(p) {
                            PageSource::Zero => {
                                let (x, y) = page_span(p, dst.len());
                                dst[x..y].fill(0);
                            }
                            PageSource::Here => any = true,
                            PageSource::Parent => {}
                        }
                    }
                    if !any {
                        continue;
                    }
                }
                let whole = cs >= start && ce <= end;
                if is_base && whole {
                    read_chunk(reader, index - 1, &mut dst[a..b], verify)?;
                    continue;
                }
                scratch.resize((ce - cs) as usize, 0);
                read_chunk(reader, index - 1, scratch, verify)?;
                let skip = (start.max(cs) - cs) as usize;
                for p in pages {
                    if wanted(p) == PageSource::Here {
                        let (x, y) = page_span(p, dst.len());
                        let (x, y) = (x.max(a), y.min(b));
                        dst[x..y].copy_from_slice(&scratch[skip + x - a..skip + y - a]);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Byte range of page `p` in a block of `len` bytes.
fn page_span(p: u64, len: usize) -> (usize, usize) {
    let x = (p * PAGE_SIZE) as usize;
    (x, (x + PAGE_SIZE as usize).min(len))
}
