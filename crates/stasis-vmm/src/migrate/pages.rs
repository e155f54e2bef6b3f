//! Guest pages into memory batches on the source and back into guest RAM
//! on the destination.

use std::io::Write;

use stasis_migration::{BatchBuilder, FrameKind, FrameWriter, MemoryBatch, PAGE_SIZE};
use stasis_snapshot::Progress;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::MigrateError;
use crate::memory::GuestRam;

/// A RAM region: guest-physical start, host address, length.
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    host: *mut u8,
    len: u64,
}

fn regions(mem: &GuestRam) -> Vec<Region> {
    mem.iter()
        .map(|r| Region {
            gpa: r.start_addr().0,
            host: r.as_ptr(),
            len: r.len(),
        })
        .collect()
}

/// The host address of the page at `gpa`, if all of it is guest RAM.
fn host_page(regions: &[Region], gpa: u64) -> Option<*mut u8> {
    regions.iter().find_map(|r| {
        let off = gpa.checked_sub(r.gpa)?;
        (off.checked_add(PAGE_SIZE as u64)? <= r.len).then(|| {
            // SAFETY: `off + PAGE_SIZE <= len`: inside the region's mapping.
            unsafe { r.host.add(off as usize) }
        })
    })
}

/// Sends guest pages, batched, to a migration stream.
pub struct PageSender<'m> {
    regions: Vec<Region>,
    batch: BatchBuilder,
    /// Compress batches with zstd, through this buffer.
    compress: Option<Vec<u8>>,
    /// Zero pages other senders sent for this one ([`Self::add_counts`]).
    other_zero_pages: u64,
    _mem: &'m GuestRam,
    /// Pages sent since the counters were last taken.
    pub pages: u64,
    /// Of them, pages of zeros.
    pub zero_pages: u64,
}

impl<'m> PageSender<'m> {
    /// A sender of `mem`'s pages.
    pub fn new(mem: &'m GuestRam) -> Self {
        Self {
            regions: regions(mem),
            batch: BatchBuilder::new(),
            compress: None,
            other_zero_pages: 0,
            _mem: mem,
            pages: 0,
            zero_pages: 0,
        }
    }

    /// Sends batches zstd-compressed (protocol version 2).
    pub fn compressed(mut self) -> Self {
        self.compress = Some(Vec::new());
        self
    }

    /// Counts pages another sender sent on this one's behalf (a further
    /// connection's share).
    pub fn add_counts(&mut self, pages: u64, zero_pages: u64) {
        self.pages += pages;
        self.other_zero_pages += zero_pages;
        self.zero_pages += zero_pages;
    }

    /// The guest RAM it sends from.
    pub fn memory(&self) -> &'m GuestRam {
        self._mem
    }

    /// Whether it compresses batches.
    pub fn is_compressed(&self) -> bool {
        self.compress.is_some()
    }

    /// Every page of guest RAM as `(gpa, len)` ranges.
    pub fn all_ranges(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.gpa, r.len)).collect()
    }

    /// Sends the pages of `len` bytes at `gpa` (page aligned, inside RAM).
    /// The guest may be running: a page it changes after being read here
    /// shows in the dirty log and goes again.
    pub fn send_range<W: Write>(
        &mut self,
        w: &mut FrameWriter<W>,
        gpa: u64,
        len: u64,
        progress: &Progress,
    ) -> Result<(), MigrateError> {
        let mut at = gpa;
        while at < gpa + len {
            let host = host_page(&self.regions, at)
                .ok_or_else(|| MigrateError::Local(format!("page {at:#x} is not guest RAM")))?;
            self.pages += 1;
            let full = self.batch.add_with(at, |dst| {
                // SAFETY: `host` is a whole page of guest RAM, mapped while
                // `_mem` is borrowed, and `dst` is a page of the batch. A
                // vCPU or device may write the page meanwhile; those bytes
                // are copied as they are and the page is sent again from the
                // dirty log.
                unsafe { std::ptr::copy_nonoverlapping(host, dst.as_mut_ptr(), PAGE_SIZE) }
            });
            self.zero_pages = self.other_zero_pages + self.batch.zero_pages();
            if full {
                self.flush(w)?;
                progress.check()?;
            }
            progress.add(PAGE_SIZE as u64);
            at += PAGE_SIZE as u64;
        }
        Ok(())
    }

    /// Sends what is batched.
    pub fn flush<W: Write>(&mut self, w: &mut FrameWriter<W>) -> Result<(), MigrateError> {
        match &mut self.compress {
            Some(scratch) => self.batch.send_zstd(w, scratch)?,
            None => self.batch.send(w)?,
        }
        Ok(())
    }
}

/// Writes received pages into guest RAM.
pub struct PageReceiver<'m> {
    regions: Vec<Region>,
    _mem: &'m GuestRam,
    /// Pages received.
    pub pages: u64,
}

impl<'m> PageReceiver<'m> {
    /// A receiver into `mem` (fresh memory: zeros).
    pub fn new(mem: &'m GuestRam) -> Self {
        Self {
            regions: regions(mem),
            _mem: mem,
            pages: 0,
        }
    }

    /// Places every page of `batch`; a page outside guest RAM is refused.
    pub fn apply(&mut self, batch: &MemoryBatch<'_>) -> Result<(), MigrateError> {
        for p in batch.pages() {
            let host = host_page(&self.regions, p.gpa).ok_or_else(|| {
                MigrateError::Protocol(stasis_migration::Error::Decode {
                    kind: FrameKind::MemoryBatch.name().into(),
                    message: format!("page {:#x} is outside guest RAM", p.gpa),
                })
            })?;
            // SAFETY: `host` is a whole page of guest RAM, which nothing
            // else uses until the VM is built from it.
            let dst = unsafe { std::slice::from_raw_parts_mut(host, PAGE_SIZE) };
            match p.data {
                Some(d) => dst.copy_from_slice(d),
                // Fresh memory is zeros; a page sent with data in an earlier
                // round and zeros now is cleared (reading an untouched page
                // allocates nothing).
                None => {
                    if !stasis_migration::is_zero(dst) {
                        dst.fill(0);
                    }
                }
            }
            self.pages += 1;
        }
        Ok(())
    }
}

/// Populates fresh guest RAM on a thread of its own while batches arrive
/// (`MADV_POPULATE_WRITE`, 32 MiB at a time), so that the receiving thread
/// does not pay the host's first touch of each page; stopped (and joined)
/// when dropped.
pub struct Prefault {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// `MADV_POPULATE_WRITE` (Linux 5.14).
const MADV_POPULATE_WRITE: i32 = 23;
const PREFAULT_CHUNK: u64 = 32 << 20;

impl Prefault {
    /// Starts populating `mem`; on a kernel without the advice it stops at
    /// once (the pages are then touched as they arrive).
    pub fn start(mem: &GuestRam) -> Prefault {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        // Addresses as integers: the thread never outlives `mem`'s use
        // (the Prefault is dropped, and joined, before the memory goes).
        let ranges: Vec<(usize, u64)> = regions(mem)
            .iter()
            .map(|r| (r.host as usize, r.len))
            .collect();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("migrate-prefault".into())
            .spawn(move || {
                for (host, len) in ranges {
                    let mut off = 0;
                    while off < len && !flag.load(Ordering::Relaxed) {
                        let n = PREFAULT_CHUNK.min(len - off);
                        // SAFETY: a range of guest RAM, mapped until the
                        // owner of this Prefault joins it; populating
                        // writes nothing the guest or the receiver sees.
                        let r = unsafe {
                            libc::madvise(
                                (host + off as usize) as *mut libc::c_void,
                                n as usize,
                                MADV_POPULATE_WRITE,
                            )
                        };
                        if r != 0 {
                            return;
                        }
                        off += n;
                    }
                }
            })
            .ok();
        Prefault { stop, thread }
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
