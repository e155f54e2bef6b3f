//! Background (copy-on-write) snapshots: guest memory is copied while the
//! guest runs, and is still exactly the memory of the instant it was
//! paused.
//!
//! How: before the pause, every guest RAM region is registered with a
//! userfaultfd in write-protect mode. Inside the pause (after the vCPU and
//! device state are read) the whole of RAM is write-protected, populated or
//! not (`UFFD_FEATURE_WP_UNPOPULATED`), which costs a page-table walk, not
//! a copy. The guest then runs again, and two threads copy memory into the
//! image, 2 MiB chunk by chunk, each chunk exactly once:
//!
//! - the **writer** (the snapshot's own thread) walks the chunks in order,
//!   claims each one not yet claimed, copies it, and removes its
//!   protection;
//! - the **fault handler** waits for write-protect faults. A write to a
//!   protected page, by a vCPU (through KVM), by a device thread (a block
//!   read landing in a guest buffer, a used ring update) or by the kernel
//!   on the VMM's behalf, blocks the writing thread in the kernel and
//!   reports the address. The handler claims that chunk, copies it first,
//!   removes its protection (which wakes the writer), and counts it as
//!   copied early. A chunk the writer is copying at that moment needs
//!   nothing: its protection goes once the copy is done, and that wakes
//!   the thread.
//!
//! Neither thread takes any lock of the VM or its devices, so a device
//! thread blocked on a protected page while holding its device lock cannot
//! deadlock against them. Whatever goes wrong (a failed write, a cancel),
//! the protection of every region is removed before this returns, so the
//! guest never stays blocked.
//!
//! Only anonymous RAM can be write-protected this way (the kernel refuses
//! it on private file mappings, which a lazily restored VM's RAM is);
//! [`unavailable_reason`] says why a VM cannot take a background snapshot.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stasis_snapshot::{MemoryImage, MemoryRegionSource, Progress};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;
use crate::uffd::{
    Userfaultfd, FEATURE_PAGEFAULT_FLAG_WP, FEATURE_WP_UNPOPULATED, REGISTER_MODE_WP,
};

/// A chunk nobody has started copying.
const FREE: u8 = 0;
/// A chunk being copied.
const CLAIMED: u8 = 1;
/// A chunk copied and no longer protected.
const DONE: u8 = 2;

/// Why the VM's RAM cannot be copied in the background, if it cannot.
pub fn unavailable_reason(mem: &GuestRam) -> Option<String> {
    if crate::memory::is_private_file_mapping(mem) {
        return Some(
            "guest RAM is mapped from a snapshot's memory file (a lazy restore), and the kernel \
             write-protects only anonymous and shared memory"
                .to_string(),
        );
    }
    match Userfaultfd::offered_features() {
        Err(e) => Some(format!("userfaultfd is not available: {e}")),
        Ok(f) if f & FEATURE_WP_UNPOPULATED == 0 => Some(
            "this kernel's userfaultfd cannot write-protect unpopulated memory (Linux 6.4+)"
                .to_string(),
        ),
        Ok(_) => None,
    }
}

/// One region's host mapping.
#[derive(Clone, Copy, Debug)]
struct HostRange {
    start: u64,
    len: u64,
}

/// Guest RAM registered for write protection, not yet protected. Made
/// before the pause (registering is what may fail, and it does not change
/// how the guest runs).
#[derive(Debug)]
pub struct WriteProtection {
    uffd: Userfaultfd,
    ranges: Vec<HostRange>,
    protected: bool,
}

impl WriteProtection {
    /// Registers every region of `mem`.
    pub fn register(mem: &GuestRam) -> std::io::Result<WriteProtection> {
        let uffd = Userfaultfd::new(FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_UNPOPULATED)?;
        let ranges: Vec<HostRange> = mem
            .iter()
            .map(|r| HostRange {
                start: r.as_ptr() as u64,
                len: r.len(),
            })
            .collect();
        let mut wp = WriteProtection {
            uffd,
            ranges: Vec::new(),
            protected: false,
        };
        for r in ranges {
            wp.uffd.register(r.start, r.len, REGISTER_MODE_WP)?;
            wp.ranges.push(r);
        }
        Ok(wp)
    }

    /// Write-protects all of RAM. Call while the VM is paused. Returns how
    /// long it took.
    pub fn protect(&mut self) -> std::io::Result<Duration> {
        let start = Instant::now();
        self.protected = true;
        for r in &self.ranges {
            self.uffd.write_protect(r.start, r.len, true)?;
        }
        Ok(start.elapsed())
    }

    /// Removes all protection and the registration; threads waiting on a
    /// fault are woken.
    fn release(&mut self) {
        for r in &self.ranges {
            if self.protected {
                if let Err(e) = self.uffd.write_protect(r.start, r.len, false) {
                    tracing::error!("cannot remove write protection from guest RAM: {e}");
                }
            }
            if let Err(e) = self.uffd.unregister(r.start, r.len) {
                tracing::error!("cannot unregister guest RAM from userfaultfd: {e}");
            }
        }
        self.protected = false;
        self.ranges.clear();
    }
}

impl Drop for WriteProtection {
    fn drop(&mut self) {
        self.release();
    }
}

/// Figures of a background copy.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackgroundStats {
    /// From the resume to the last chunk copied.
    pub elapsed: Duration,
    /// Chunks copied by the fault handler because the guest (or a device)
    /// was writing them.
    pub early_chunks: u64,
    /// Their guest bytes.
    pub early_bytes: u64,
    /// Write-protect faults handled.
    pub faults: u64,
}

/// The copy state shared by the writer and the fault handler.
struct Copier<'a> {
    wp: &'a WriteProtection,
    regions: &'a [MemoryRegionSource<'a>],
    image: &'a MemoryImage,
    claims: Vec<AtomicU8>,
    progress: &'a Progress,
    first_error: Mutex<Option<stasis_snapshot::Error>>,
}

impl Copier<'_> {
    fn claim(&self, chunk: usize) -> bool {
        self.claims[chunk]
            .compare_exchange(FREE, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Copies claimed chunks `run` (one region), then lifts their
    /// protection whatever the copy's outcome: a guest must never stay
    /// blocked on a snapshot that failed.
    fn copy_run(&self, run: std::ops::Range<usize>) -> bool {
        let result = self.image.copy_chunks(self.regions, run.clone());
        let first = self.image.chunk_span(run.start);
        let last = self.image.chunk_span(run.end - 1);
        let host = self.wp.ranges[first.region];
        let (start, end) = (first.offset, last.offset + last.len);
        if let Err(e) = self
            .wp
            .uffd
            .write_protect(host.start + start, end - start, false)
        {
            tracing::error!("cannot lift write protection after a copy: {e}");
        }
        for i in run {
            self.claims[i].store(DONE, Ordering::Release);
        }
        match result {
            Ok(()) => true,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    fn fail(&self, e: stasis_snapshot::Error) {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }

    fn failed(&self) -> bool {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The region and chunk holding host address `addr`.
    fn chunk_of(&self, addr: u64) -> Option<usize> {
        let (region, r) = self
            .wp
            .ranges
            .iter()
            .enumerate()
            .find(|(_, r)| addr >= r.start && addr < r.start + r.len)?;
        self.image.chunk_at(region, addr - r.start)
    }

    /// The writer: every batch of chunks in order (the same batches as a
    /// stop-copy snapshot: up to 16 MiB of one region), each in runs of
    /// the chunks the fault handler has not claimed.
    fn write_all(&self) {
        for batch in self.image.batches() {
            if self.failed() {
                return;
            }
            if let Err(e) = self.progress.check() {
                self.fail(e);
                return;
            }
            // Once per batch, as in stop-copy, and before claiming: a test
            // holding the writer here holds no chunk the guest may write.
            stasis_failpoint::hit("writer.memory_batch");
            let mut i = batch.start;
            while i < batch.end {
                if !self.claim(i) {
                    i += 1;
                    continue;
                }
                let mut end = i + 1;
                while end < batch.end && self.claim(end) {
                    end += 1;
                }
                if !self.copy_run(i..end) {
                    return;
                }
                // The disk works while the copy goes on: the fsync at the
                // end then waits for the last runs only.
                self.image.start_writeback(i..end);
                i = end;
            }
        }
    }

    /// The fault handler: until `stop` fires, serves write-protect faults
    /// by copying the faulting chunk first.
    fn serve_faults(&self, stop: &EventFd, stats: &mut BackgroundStats) {
        let mut faults = Vec::with_capacity(16);
        let mut fds = [
            libc::pollfd {
                fd: self.wp.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: two valid pollfds that live across the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ret < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("poll on the userfaultfd failed: {e}");
                return;
            }
            if let Err(e) = self.wp.uffd.read_faults(&mut faults) {
                tracing::error!("reading userfaultfd messages failed: {e}");
                return;
            }
            for f in &faults {
                stats.faults += 1;
                let Some(chunk) = self.chunk_of(f.address) else {
                    tracing::error!("write-protect fault outside guest RAM at {:#x}", f.address);
                    continue;
                };
                if self.claim(chunk) {
                    let len = self.image.chunk_span(chunk).len;
                    self.copy_run(chunk..chunk + 1);
                    stats.early_chunks += 1;
                    stats.early_bytes += len;
                    self.progress.add_early(len);
                } else if self.claims[chunk].load(Ordering::Acquire) == DONE {
                    // Raced with the writer, which already lifted the
                    // protection; make sure the thread is awake.
                    let _ = self.wp.uffd.wake(f.address & !4095, 4096);
                }
                // CLAIMED: the writer lifts the protection when done.
            }
            if fds[1].revents & libc::POLLIN != 0 {
                return;
            }
        }
    }
}

/// Signals the fault handler to stop when dropped.
struct StopOnDrop<'a>(&'a EventFd);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.write(1);
    }
}

/// Copies all of guest memory into `image` while the guest runs. `wp` must
/// have protected all of RAM while the VM was paused (and the VM resumed
/// since). Every region's protection is lifted before this returns,
/// whatever the outcome.
pub fn copy_in_background(
    mut wp: WriteProtection,
    regions: &[MemoryRegionSource<'_>],
    image: &MemoryImage,
    progress: &Progress,
) -> Result<BackgroundStats, stasis_snapshot::Error> {
    let start = Instant::now();
    let copier = Copier {
        wp: &wp,
        regions,
        image,
        claims: (0..image.chunk_count())
            .map(|_| AtomicU8::new(FREE))
            .collect(),
        progress,
        first_error: Mutex::new(None),
    };
    let stop = EventFd::new(libc::EFD_CLOEXEC).map_err(|e| stasis_snapshot::Error::Io {
        context: "creating an eventfd for the fault handler".to_string(),
        source: e,
    })?;
    let mut stats = std::thread::scope(|s| {
        let handler = std::thread::Builder::new()
            .name("snapshot-faults".to_string())
            .spawn_scoped(s, || {
                let mut stats = BackgroundStats::default();
                copier.serve_faults(&stop, &mut stats);
                stats
            });
        let handler = match handler {
            Ok(h) => h,
            Err(e) => {
                copier.fail(stasis_snapshot::Error::Io {
                    context: "starting the fault handler thread".to_string(),
                    source: e,
                });
                return BackgroundStats::default();
            }
        };
        // The handler stops however the writer ends, a panic included
        // (then `wp` lifts all protection as the panic unwinds).
        let stop_handler = StopOnDrop(&stop);
        copier.write_all();
        drop(stop_handler);
        handler.join().unwrap_or_default()
    });
    let error = copier
        .first_error
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    // Lift every protection left (all of it after a failure) and unregister.
    wp.release();
    if let Some(e) = error {
        return Err(e);
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}
