//! The memory image: guest RAM laid out in `memory.img`, copied chunk by
//! chunk (zero pages left as holes, a crc32c per 2 MiB chunk).
//!
//! [`MemoryImage`] lets chunks be copied in any order, by several threads
//! at once, each exactly once: a stop-copy snapshot copies them in
//! parallel batches while the guest is paused; a background snapshot copies
//! them while the guest runs, a chunk the guest is about to write first.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::File;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::chain::SnapshotChain;
use crate::crc;
use crate::error::{Error, Result};
use crate::manifest::{MemoryLayout, MemoryRegion};
use crate::page_map::{PageMap, PageSource};
use crate::progress::Progress;
use crate::{CHUNK_SIZE, MEMORY_FILE, PAGE_SIZE, REGION_ALIGN};

/// Chunks handed to a worker thread at a time (8 × 2 MiB = 16 MiB); also
/// the largest single `pwrite`.
const BATCH_CHUNKS: usize = 8;

/// One guest RAM region to copy into the memory image.
///
/// Its bytes are read only while a chunk of it is copied, and only that
/// chunk's bytes: for guest memory, either the VM is paused for the whole
/// copy ([`SnapshotWriter::write_memory`]) or each chunk is protected from
/// writes while it is copied ([`MemoryImage::copy_chunks`]), or the image
/// will not be a consistent copy. No reference to the whole region is
/// held, so the rest of it may change meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct MemoryRegionSource<'a> {
    name: &'a str,
    gpa: u64,
    ptr: *const u8,
    len: usize,
    _data: PhantomData<&'a [u8]>,
}

// SAFETY: a source only describes memory; reading it is what `bytes`
// governs, under the contract of `from_raw` (or of a shared slice for
// `new`), whichever thread does it.
unsafe impl Send for MemoryRegionSource<'_> {}
// SAFETY: as above; `bytes` takes `&self` and only reads.
unsafe impl Sync for MemoryRegionSource<'_> {}

impl<'a> MemoryRegionSource<'a> {
    /// A region named `name` (e.g. `"ram0"`) at guest physical address
    /// `gpa` whose contents are `data` (length a multiple of 4 KiB).
    pub fn new(name: &'a str, gpa: u64, data: &'a [u8]) -> MemoryRegionSource<'a> {
        MemoryRegionSource {
            name,
            gpa,
            ptr: data.as_ptr(),
            len: data.len(),
            _data: PhantomData,
        }
    }

    /// Like [`MemoryRegionSource::new`], from a host mapping of guest memory.
    ///
    /// # Safety
    ///
    /// `ptr .. ptr + len` must be mapped and readable for the whole lifetime
    /// `'a`, and each chunk of it must not be written by anyone (vCPUs,
    /// devices, other threads) while the writer copies that chunk.
    pub unsafe fn from_raw(
        name: &'a str,
        gpa: u64,
        ptr: *const u8,
        len: usize,
    ) -> MemoryRegionSource<'a> {
        MemoryRegionSource {
            name,
            gpa,
            ptr,
            len,
            _data: PhantomData,
        }
    }

    /// Bytes `off .. off + len` of the region, for the copy of a chunk
    /// (during which they do not change).
    fn bytes(&self, off: usize, len: usize) -> &[u8] {
        assert!(
            off <= self.len && len <= self.len - off,
            "outside the region"
        );
        // SAFETY: inside the region (checked), which `new` or the caller
        // of `from_raw` keeps mapped and readable for 'a; the copy of a
        // chunk is the only reader of these bytes and nobody writes them
        // meanwhile (the type's contract).
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    /// The region's name.
    pub fn name(&self) -> &str {
        self.name
    }

    /// The region's guest physical address.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// The region's size in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the region is empty (which `write_memory` rejects).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Figures from [`SnapshotWriter::write_memory`].
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryWriteStats {
    /// Number of regions.
    pub regions: usize,
    /// Guest bytes scanned (sum of region sizes).
    pub guest_bytes: u64,
    /// Bytes actually written (non-zero pages).
    pub bytes_written: u64,
    /// Pages written.
    pub nonzero_pages: u64,
    /// Pages left as holes.
    pub zero_pages: u64,
    /// Length of the memory file (holes included).
    pub file_size: u64,
    /// Worker threads used.
    pub threads: usize,
    /// Wall time of the copy (no fsync; that is in `commit`).
    pub elapsed: Duration,
}

impl MemoryWriteStats {
    /// Guest memory scanned per second, in MB/s (10⁶ bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.guest_bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Checks the regions and places them in the file: in order, each at the
/// next multiple of 2 MiB. The chunk list is sized but not filled.
pub(crate) fn plan_layout(regions: &[MemoryRegionSource<'_>]) -> Result<MemoryLayout> {
    let mut names = HashSet::new();
    let mut placed = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    let mut file_size = 0u64;
    for r in regions {
        let bad = |detail: String| Error::BadRegion {
            name: r.name.to_string(),
            detail,
        };
        if r.name.is_empty() || r.name.chars().any(char::is_control) {
            return Err(bad(
                "region names must be non-empty, without control characters".into(),
            ));
        }
        if !names.insert(r.name) {
            return Err(bad("name used twice".into()));
        }
        if r.is_empty() || r.len() % PAGE_SIZE != 0 {
            return Err(bad(format!(
                "size {:#x} is not a non-zero multiple of {PAGE_SIZE}",
                r.len()
            )));
        }
        if r.gpa % PAGE_SIZE != 0 || r.gpa.checked_add(r.len()).is_none() {
            return Err(bad(format!(
                "guest address {:#x} is not page aligned or the region wraps",
                r.gpa
            )));
        }
        placed.push(MemoryRegion {
            name: r.name.to_string(),
            gpa: r.gpa,
            size: r.len(),
            file_offset: offset,
        });
        file_size = offset + r.len();
        offset = file_size.div_ceil(REGION_ALIGN) * REGION_ALIGN;
    }
    let mut by_gpa: Vec<&MemoryRegion> = placed.iter().collect();
    by_gpa.sort_by_key(|r| r.gpa);
    for w in by_gpa.windows(2) {
        if w[0].gpa + w[0].size > w[1].gpa {
            return Err(Error::BadRegion {
                name: w[1].name.clone(),
                detail: format!("overlaps region '{}' in guest physical memory", w[0].name),
            });
        }
    }
    Ok(MemoryLayout {
        page_size: PAGE_SIZE,
        chunk_size: CHUNK_SIZE,
        file: MEMORY_FILE.to_string(),
        file_size,
        regions: placed,
        chunk_crc32c: vec![0; file_size.div_ceil(CHUNK_SIZE) as usize],
        nonzero_pages: 0,
        page_map: None,
    })
}

/// One checksum chunk of the file: region bytes, then zero padding.
#[derive(Clone, Debug)]
pub(crate) struct ChunkTask {
    /// Chunk index in the file.
    index: usize,
    /// Region index.
    region: usize,
    /// Offset of the chunk's data within the region.
    data_off: usize,
    /// Bytes of region data in the chunk.
    data_len: usize,
    /// Zero padding after the data, up to the chunk's end.
    pad: u64,
}

/// Lists every chunk. Regions start on 2 MiB boundaries, which are chunk
/// boundaries, so each chunk holds the data of exactly one region followed
/// by that region's padding, if any.
pub(crate) fn plan_chunks(layout: &MemoryLayout) -> Vec<ChunkTask> {
    let mut tasks = Vec::with_capacity(layout.chunk_crc32c.len());
    for (ri, r) in layout.regions.iter().enumerate() {
        let mut off = 0u64;
        while off < r.size {
            let chunk_start = r.file_offset + off;
            let chunk_end = (chunk_start + CHUNK_SIZE).min(layout.file_size);
            let data_len = (r.size - off).min(CHUNK_SIZE);
            tasks.push(ChunkTask {
                index: (chunk_start / CHUNK_SIZE) as usize,
                region: ri,
                data_off: off as usize,
                data_len: data_len as usize,
                pad: chunk_end - chunk_start - data_len,
            });
            off += data_len;
        }
    }
    tasks
}

/// Groups consecutive chunks of one region into batches of up to
/// `BATCH_CHUNKS`; returns index ranges into the task list.
fn plan_batches(tasks: &[ChunkTask]) -> Vec<std::ops::Range<usize>> {
    let mut batches = Vec::new();
    let mut start = 0;
    for i in 1..=tasks.len() {
        if i == tasks.len() || i - start == BATCH_CHUNKS || tasks[i].region != tasks[start].region {
            if i > start {
                batches.push(start..i);
            }
            start = i;
        }
    }
    batches
}

#[derive(Default)]
struct WorkerResult {
    chunk_crcs: Vec<(usize, u32)>,
    nonzero_pages: u64,
    bytes_written: u64,
}

/// Writes the pages of one region that are stored, in runs (one `pwrite`
/// per run of consecutive stored pages), and checksums each chunk over the
/// file's bytes (pages left as holes count as zeros, through
/// [`crc::append_zeros`]). Shared by full and diff copies, which differ
/// only in which pages they store.
struct PageWriter<'a, 's> {
    file: &'a File,
    path: &'a Path,
    src: &'a MemoryRegionSource<'s>,
    placed: &'a MemoryRegion,
    /// Start of the open run of stored pages.
    run: Option<usize>,
    /// Checksum of the chunk so far, and zero bytes not yet added to it.
    crc: u32,
    zeros: u64,
}

impl<'a, 's> PageWriter<'a, 's> {
    fn new(
        file: &'a File,
        path: &'a Path,
        src: &'a MemoryRegionSource<'s>,
        placed: &'a MemoryRegion,
    ) -> Self {
        PageWriter {
            file,
            path,
            src,
            placed,
            run: None,
            crc: 0,
            zeros: 0,
        }
    }

    /// The page at region offset `off` is stored (it holds `page`).
    fn store(&mut self, off: usize, page: &[u8], out: &mut WorkerResult) {
        if self.zeros > 0 {
            self.crc = crc::append_zeros(self.crc, self.zeros);
            self.zeros = 0;
        }
        self.crc = crc::append(self.crc, page);
        out.nonzero_pages += 1;
        self.run.get_or_insert(off);
    }

    /// The page at region offset `off` is a hole.
    fn hole(&mut self, off: usize, out: &mut WorkerResult) -> Result<()> {
        self.zeros += PAGE_SIZE;
        self.flush(off, out)
    }

    /// Ends chunk `t`: its checksum, padding included.
    fn end_chunk(&mut self, t: &ChunkTask, out: &mut WorkerResult) {
        out.chunk_crcs
            .push((t.index, crc::append_zeros(self.crc, self.zeros + t.pad)));
        self.crc = 0;
        self.zeros = 0;
    }

    /// Writes the open run, which ends at region offset `end`.
    fn flush(&mut self, end: usize, out: &mut WorkerResult) -> Result<()> {
        let Some(start) = self.run.take() else {
            return Ok(());
        };
        let at = self.placed.file_offset + start as u64;
        self.file
            .write_all_at(self.src.bytes(start, end - start), at)
            .map_err(|e| Error::Io {
                context: format!("writing {} at offset {at:#x}", self.path.display()),
                source: e,
            })?;
        out.bytes_written += (end - start) as u64;
        Ok(())
    }
}

/// Scans one batch page by page: checksums each chunk, leaves zero pages
/// as holes and writes each run of non-zero pages with one `pwrite`.
fn copy_batch(
    file: &File,
    path: &Path,
    src: &MemoryRegionSource<'_>,
    placed: &MemoryRegion,
    tasks: &[ChunkTask],
    out: &mut WorkerResult,
) -> Result<()> {
    let page = PAGE_SIZE as usize;
    let mut w = PageWriter::new(file, path, src, placed);
    for t in tasks {
        for off in (t.data_off..t.data_off + t.data_len).step_by(page) {
            let p = src.bytes(off, page);
            if crc::is_zero(p) {
                w.hole(off, out)?;
            } else {
                w.store(off, p, out);
            }
        }
        w.end_chunk(t, out);
    }
    match tasks.last() {
        Some(last) => w.flush(last.data_off + last.data_len, out),
        None => Ok(()),
    }
}

/// Where one chunk's guest bytes are: `len` bytes at `offset` into region
/// `region` (the chunk's zero padding after a region's end is not guest
/// memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Index of the region (in the order given to the writer).
    pub region: usize,
    /// Offset of the chunk's first byte within the region.
    pub offset: u64,
    /// Guest bytes in the chunk (2 MiB except at a region's end).
    pub len: u64,
}

/// The memory image being written: the file, its layout, and which chunks
/// are copied. Shared between the threads that copy (`Arc`); handed back
/// to [`SnapshotWriter::finish_memory`](crate::SnapshotWriter::finish_memory).
#[derive(Debug)]
pub struct MemoryImage {
    file: File,
    path: PathBuf,
    layout: MemoryLayout,
    tasks: Vec<ChunkTask>,
    crcs: Vec<AtomicU32>,
    copied: Vec<AtomicBool>,
    nonzero_pages: AtomicU64,
    bytes_written: AtomicU64,
    progress: Arc<Progress>,
    diff: Option<DiffBase>,
}

/// A diff snapshot's parent and where each page went.
#[derive(Debug)]
struct DiffBase {
    chain: Arc<SnapshotChain>,
    /// First page index of each region in the page map.
    first_page: Vec<u64>,
    /// One [`PageSource`] per page.
    pages: Vec<AtomicU8>,
}

thread_local! {
    /// A chunk of the parent's memory, for comparing (one per copying
    /// thread, reused).
    static PARENT_CHUNK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl MemoryImage {
    pub(crate) fn new(
        file: File,
        path: PathBuf,
        layout: MemoryLayout,
        progress: Arc<Progress>,
        parent: Option<Arc<SnapshotChain>>,
    ) -> MemoryImage {
        let diff = parent.map(|chain| {
            let mut first_page = Vec::new();
            let mut total = 0;
            for r in &layout.regions {
                first_page.push(total);
                total += r.size / PAGE_SIZE;
            }
            DiffBase {
                chain,
                first_page,
                pages: (0..total)
                    .map(|_| AtomicU8::new(PageSource::Zero as u8))
                    .collect(),
            }
        });
        let tasks = plan_chunks(&layout);
        debug_assert!(tasks.iter().enumerate().all(|(i, t)| t.index == i));
        let n = tasks.len();
        MemoryImage {
            file,
            path,
            layout,
            tasks,
            crcs: (0..n).map(|_| AtomicU32::new(0)).collect(),
            copied: (0..n).map(|_| AtomicBool::new(false)).collect(),
            nonzero_pages: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            progress,
            diff,
        }
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> usize {
        self.tasks.len()
    }

    /// Where chunk `chunk`'s guest bytes are.
    pub fn chunk_span(&self, chunk: usize) -> ChunkSpan {
        let t = &self.tasks[chunk];
        ChunkSpan {
            region: t.region,
            offset: t.data_off as u64,
            len: t.data_len as u64,
        }
    }

    /// The chunk holding byte `offset` of region `region`, if any.
    pub fn chunk_at(&self, region: usize, offset: u64) -> Option<usize> {
        let r = self.layout.regions.get(region)?;
        if offset >= r.size {
            return None;
        }
        Some(((r.file_offset + offset) / CHUNK_SIZE) as usize)
    }

    /// Groups of consecutive chunks of one region (up to 16 MiB each): the
    /// units a parallel copy hands to its threads.
    pub fn batches(&self) -> Vec<std::ops::Range<usize>> {
        plan_batches(&self.tasks)
    }

    /// Whether chunk `chunk` has been copied.
    pub fn is_copied(&self, chunk: usize) -> bool {
        self.copied[chunk].load(Ordering::Acquire)
    }

    /// Copies chunks `chunks` (consecutive, of one region) from `regions`
    /// (the regions given to the writer, in the same order): non-zero pages
    /// are written, zero pages stay holes, and each chunk's checksum is
    /// recorded. Each chunk must be copied exactly once; while it is being
    /// copied its guest bytes must not change.
    pub fn copy_chunks(
        &self,
        regions: &[MemoryRegionSource<'_>],
        chunks: std::ops::Range<usize>,
    ) -> Result<()> {
        let tasks = self.tasks.get(chunks.clone()).filter(|t| !t.is_empty());
        let Some(tasks) = tasks else {
            return Err(Error::Usage(format!("no chunks {chunks:?} to copy")));
        };
        let region_index = tasks[0].region;
        if tasks.iter().any(|t| t.region != region_index) {
            return Err(Error::Usage(format!("chunks {chunks:?} span regions")));
        }
        let placed = &self.layout.regions[region_index];
        let region = match regions.get(region_index) {
            Some(r) if r.name == placed.name && r.len() == placed.size => r,
            _ => {
                return Err(Error::Usage(format!(
                    "region {} does not match the image's layout",
                    placed.name
                )))
            }
        };
        for i in chunks.clone() {
            if self.copied[i].swap(true, Ordering::AcqRel) {
                return Err(Error::Usage(format!("memory chunk {i} copied twice")));
            }
        }
        let mut out = WorkerResult::default();
        match &self.diff {
            None => copy_batch(&self.file, &self.path, region, placed, tasks, &mut out)?,
            Some(d) => {
                for t in tasks {
                    copy_chunk_diff(&self.file, &self.path, region, placed, t, d, &mut out)?;
                }
            }
        }
        for (i, c) in out.chunk_crcs {
            self.crcs[i].store(c, Ordering::Release);
        }
        self.nonzero_pages
            .fetch_add(out.nonzero_pages, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(out.bytes_written, Ordering::Relaxed);
        self.progress
            .add(tasks.iter().map(|t| t.data_len as u64).sum());
        Ok(())
    }

    /// Starts writing chunks `chunks` (already copied) to the disk without
    /// waiting for it (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so that
    /// a long copy overlaps with the disk and the final fsync has little
    /// left to do. Advisory: an error is only logged (the fsync in
    /// `commit` is what makes the data durable).
    pub fn start_writeback(&self, chunks: std::ops::Range<usize>) {
        let (Some(first), Some(last)) = (
            self.tasks.get(chunks.start),
            self.tasks.get(chunks.end.wrapping_sub(1)),
        ) else {
            return;
        };
        let placed = &self.layout.regions[first.region];
        let start = placed.file_offset + first.data_off as u64;
        let end =
            self.layout.regions[last.region].file_offset + (last.data_off + last.data_len) as u64;
        // SAFETY: sync_file_range only reads its integer arguments; the fd
        // is the image's, open for the lifetime of `self`.
        let ret = unsafe {
            libc::sync_file_range(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                start as i64,
                end.saturating_sub(start) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if ret != 0 {
            tracing::debug!(
                "sync_file_range on {}: {}",
                self.path.display(),
                std::io::Error::last_os_error()
            );
        }
    }

    /// The file, its completed layout, the bytes written and (diff) the
    /// page map, once every chunk is copied.
    pub(crate) fn finish(self) -> Result<(File, MemoryLayout, u64, Option<PageMap>)> {
        if let Some(i) = self.copied.iter().position(|c| !c.load(Ordering::Acquire)) {
            return Err(Error::Usage(format!(
                "memory chunk {i} of {} was never copied",
                self.copied.len()
            )));
        }
        let mut layout = self.layout;
        for (slot, crc) in layout.chunk_crc32c.iter_mut().zip(&self.crcs) {
            *slot = crc.load(Ordering::Acquire);
        }
        layout.nonzero_pages = self.nonzero_pages.into_inner();
        let map = self.diff.map(|d| {
            let mut map = PageMap::new(d.pages.len() as u64);
            for (i, s) in d.pages.iter().enumerate() {
                let src = match s.load(Ordering::Acquire) {
                    1 => PageSource::Here,
                    2 => PageSource::Parent,
                    _ => PageSource::Zero,
                };
                map.set(i as u64, src);
            }
            map
        });
        Ok((self.file, layout, self.bytes_written.into_inner(), map))
    }

    /// The layout (checksums not yet filled in).
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stats of a finished copy.
    pub(crate) fn stats(
        layout: &MemoryLayout,
        regions: usize,
        bytes_written: u64,
        threads: usize,
        elapsed: Duration,
    ) -> MemoryWriteStats {
        let guest_bytes: u64 = layout.regions.iter().map(|r| r.size).sum();
        MemoryWriteStats {
            regions,
            guest_bytes,
            bytes_written,
            nonzero_pages: layout.nonzero_pages,
            zero_pages: guest_bytes / PAGE_SIZE - layout.nonzero_pages,
            file_size: layout.file_size,
            threads,
            elapsed,
        }
    }
}

/// Copies one chunk of a diff snapshot: a zero page is a hole marked
/// "zero", a page equal to the parent's is a hole marked "in the parent",
/// any other page is written and marked "here". The checksum covers the
/// file's bytes (holes as zeros).
fn copy_chunk_diff(
    file: &File,
    path: &Path,
    src: &MemoryRegionSource<'_>,
    placed: &MemoryRegion,
    t: &ChunkTask,
    diff: &DiffBase,
    out: &mut WorkerResult,
) -> Result<()> {
    let page = PAGE_SIZE as usize;
    PARENT_CHUNK.with(|buf| -> Result<()> {
        let mut parent = buf.borrow_mut();
        parent.resize(t.data_len, 0);
        diff.chain
            .read_range(t.region, t.data_off as u64, &mut parent[..t.data_len])?;
        let first = diff.first_page[t.region] + (t.data_off / page) as u64;
        let mut w = PageWriter::new(file, path, src, placed);
        for k in 0..t.data_len / page {
            let off = t.data_off + k * page;
            let p = src.bytes(off, page);
            let state = if crc::is_zero(p) {
                PageSource::Zero
            } else if p == &parent[k * page..(k + 1) * page] {
                PageSource::Parent
            } else {
                PageSource::Here
            };
            diff.pages[(first + k as u64) as usize].store(state as u8, Ordering::Release);
            if state == PageSource::Here {
                w.store(off, p, out);
            } else {
                w.hole(off, out)?;
            }
        }
        w.end_chunk(t, out);
        w.flush(t.data_off + t.data_len, out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_aligns_regions() {
        let a = vec![0u8; 4096 * 3];
        let b = vec![0u8; 3 << 20];
        let l = plan_layout(&[
            MemoryRegionSource::new("ram0", 0, &a),
            MemoryRegionSource::new("ram1", 1 << 32, &b),
        ])
        .unwrap();
        assert_eq!(l.regions[0].file_offset, 0);
        assert_eq!(l.regions[1].file_offset, 2 << 20);
        assert_eq!(l.file_size, (2 << 20) + (3 << 20));
        assert_eq!(l.chunk_crc32c.len(), 3);
        let tasks = plan_chunks(&l);
        assert_eq!(tasks.len(), 3);
        assert_eq!(tasks[0].pad, (2 << 20) - 4096 * 3);
        assert_eq!(tasks[2].pad, 0);
        assert_eq!(tasks[2].data_len, 1 << 20);
    }

    #[test]
    fn bad_regions_rejected() {
        let a = vec![0u8; 8192];
        let odd = vec![0u8; 100];
        assert!(plan_layout(&[MemoryRegionSource::new("x", 0, &odd)]).is_err());
        assert!(plan_layout(&[MemoryRegionSource::new("x", 1, &a)]).is_err());
        let e = plan_layout(&[
            MemoryRegionSource::new("x", 0, &a),
            MemoryRegionSource::new("y", 4096, &a),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        assert!(plan_layout(&[
            MemoryRegionSource::new("x", 0, &a),
            MemoryRegionSource::new("x", 1 << 20, &a),
        ])
        .is_err());
    }

    /// Chunks copied in any order, from a shared image, give the same file
    /// and checksums as the parallel stop-copy path; a chunk cannot be
    /// copied twice or left out.
    #[test]
    fn chunks_in_any_order_match_write_memory() {
        let base = std::env::temp_dir().join(format!("stasis-image-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let mut ram = vec![0u8; 5 << 20];
        for (i, b) in ram.iter_mut().enumerate() {
            if (i / 4096) % 3 != 0 {
                *b = (i % 251) as u8;
            }
        }
        let small = vec![1u8; 8192];
        let regions = [
            MemoryRegionSource::new("ram0", 0, &ram),
            MemoryRegionSource::new("ram1", 1 << 32, &small),
        ];
        let mut a = crate::SnapshotWriter::create(&base.join("a")).unwrap();
        let sa = a.write_memory(&regions).unwrap();
        let mut b = crate::SnapshotWriter::create(&base.join("b")).unwrap();
        let start = std::time::Instant::now();
        let image = b.begin_memory(&regions).unwrap();
        assert_eq!(image.chunk_count(), 4);
        assert_eq!(image.chunk_at(0, (4 << 20) + 5), Some(2));
        assert_eq!(image.chunk_at(1, 0), Some(3));
        assert_eq!(image.chunk_at(1, 8192), None);
        assert_eq!(
            image.chunk_span(2),
            ChunkSpan {
                region: 0,
                offset: 4 << 20,
                len: 1 << 20
            }
        );
        for i in (0..4).rev() {
            image.copy_chunks(&regions, i..i + 1).unwrap();
        }
        assert!(image.copy_chunks(&regions, 1..2).is_err());
        let sb = b.finish_memory(image, start).unwrap();
        assert_eq!(sa.bytes_written, sb.bytes_written);
        assert_eq!(sa.nonzero_pages, sb.nonzero_pages);
        let ca = a.commit(Default::default()).unwrap();
        let cb = b.commit(Default::default()).unwrap();
        let ra = crate::SnapshotReader::open(&ca.dir).unwrap();
        let rb = crate::SnapshotReader::open(&cb.dir).unwrap();
        assert_eq!(ra.body().memory, rb.body().memory);
        assert!(rb.verify(|_, _| ()).unwrap().is_ok());

        let mut c = crate::SnapshotWriter::create(&base.join("c")).unwrap();
        let image = c.begin_memory(&regions).unwrap();
        image.copy_chunks(&regions, 0..2).unwrap();
        let e = c.finish_memory(image, start).unwrap_err();
        assert!(
            e.to_string().contains("chunk 2 of 4 was never copied"),
            "{e}"
        );
        assert!(c.commit(Default::default()).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
