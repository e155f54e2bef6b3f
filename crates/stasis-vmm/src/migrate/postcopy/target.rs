//! The destination's side of post-copy (see [`super`]): the stale pages
//! are dropped from guest RAM, which is registered with a userfaultfd for
//! missing pages before anything touches it; a `postcopy-faults` thread
//! asks the source for the pages faulted on (and sends a keepalive each
//! second, so the source knows the link lives), and a `postcopy-pages`
//! thread puts each page in place (`UFFDIO_COPY`, which wakes whoever
//! waits for it) until the source says every stale page was sent.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stasis_migration::{FrameReader, FrameWriter, Message, PAGE_SIZE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{Commit, StaleSet, REQUEST_CHUNK};
use crate::memory::GuestRam;
use crate::migrate::MigrateError;
use crate::uffd::{self, Userfaultfd};

/// Called when post-copy fails, with the message and whether the source
/// had been told the VM runs here (then the VM is lost; before, the
/// source keeps it). The hook ends the process: a VM whose pages stopped
/// coming must not run.
pub type LostHook = Arc<dyn Fn(String, bool) + Send + Sync>;

/// A RAM region as plain numbers (the threads outlive no borrow: guest
/// RAM lives as long as the VM, which the process ends with).
#[derive(Debug, Clone, Copy)]
struct Region {
    gpa: u64,
    host: u64,
    len: u64,
}

/// Guest RAM prepared for post-copy: stale pages dropped, registered for
/// missing-page faults. Start it before anything touches guest memory.
pub struct Target {
    uffd: Arc<Userfaultfd>,
    regions: Vec<Region>,
    stale: Arc<StaleSet>,
}

fn local(e: impl std::fmt::Display) -> MigrateError {
    MigrateError::Local(format!("post-copy: {e}"))
}

impl Target {
    /// Registers `mem` for missing-page faults and drops the pages of
    /// `stale` (anonymous RAM: `MADV_DONTNEED`; a memory file: a hole
    /// punched), so that touching one waits for it to arrive.
    pub fn prepare(mem: &GuestRam, stale: StaleSet) -> Result<Target, MigrateError> {
        let uffd = Userfaultfd::new(0).map_err(local)?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let region = Region {
                gpa: r.start_addr().0,
                host: r.as_ptr() as u64,
                len: r.len(),
            };
            uffd.register(region.host, region.len, uffd::REGISTER_MODE_MISSING)
                .map_err(local)?;
            regions.push(region);
        }
        for (start, len) in stale.ranges() {
            let r = regions
                .iter()
                .find(|r| start >= r.gpa && start + len <= r.gpa + r.len)
                .ok_or_else(|| {
                    local(format!(
                        "stale pages {start:#x}+{len:#x} are not inside one RAM region"
                    ))
                })?;
            let off = start - r.gpa;
            let region = mem
                .iter()
                .find(|g| g.start_addr().0 == r.gpa)
                .expect("found above");
            let ret = match region.file_offset() {
                // SAFETY: punching a hole in the range of guest RAM's own
                // memory file; nothing runs on the memory yet.
                Some(fo) => unsafe {
                    libc::fallocate(
                        fo.file().as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        (fo.start() + off) as libc::off_t,
                        len as libc::off_t,
                    )
                },
                // SAFETY: the range lies inside a mapping of guest RAM
                // that nothing runs on yet; its pages become missing.
                None => unsafe {
                    libc::madvise(
                        (r.host + off) as *mut libc::c_void,
                        len as usize,
                        libc::MADV_DONTNEED,
                    )
                },
            };
            if ret != 0 {
                return Err(local(format!(
                    "cannot drop the stale pages at {start:#x}: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(Target {
            uffd: Arc::new(uffd),
            regions,
            stale: Arc::new(stale),
        })
    }

    /// Number of pages still to come.
    pub fn stale_pages(&self) -> u64 {
        self.stale.pages()
    }

    /// Starts the two threads on the connection (`r` from the source, `w`
    /// shared with whoever confirms, through `commit`). A failure calls
    /// `lost`, saying whether the confirmation went first.
    pub fn start<R, W>(
        self,
        r: FrameReader<R>,
        w: Arc<Mutex<FrameWriter<W>>>,
        commit: Arc<Commit>,
        lost: LostHook,
    ) -> Result<(), MigrateError>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let done = Arc::new(AtomicBool::new(false));
        let received: Arc<Vec<AtomicU64>> = Arc::new(
            (0..self.stale.pages().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        );
        let shared = Arc::new(Shared {
            uffd: self.uffd,
            regions: self.regions,
            stale: self.stale,
            received,
            done,
            commit,
            lost,
            faults: AtomicU64::new(0),
        });
        let faults = {
            let (s, w) = (shared.clone(), w.clone());
            std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn(move || {
                    stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Job);
                    s.ask_for_faults(&w)
                })
                .map_err(local)?
        };
        drop(faults);
        let s = shared;
        std::thread::Builder::new()
            .name("postcopy-pages".into())
            .spawn(move || {
                stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Job);
                s.put_pages(r, &w)
            })
            .map_err(local)?;
        Ok(())
    }
}

struct Shared {
    uffd: Arc<Userfaultfd>,
    regions: Vec<Region>,
    stale: Arc<StaleSet>,
    /// One bit per stale page: in place.
    received: Arc<Vec<AtomicU64>>,
    done: Arc<AtomicBool>,
    commit: Arc<Commit>,
    lost: LostHook,
    faults: AtomicU64,
}

impl Shared {
    fn fail(&self, why: String) {
        if self.done.swap(true, Ordering::SeqCst) {
            return; // finished, or the other thread already failed
        }
        match self.commit.fail() {
            Some(true) => (self.lost)(
                format!(
                    "post-copy failed after the VM started here: {why}; part of its memory was still on the source, so the VM is lost"
                ),
                true,
            ),
            Some(false) => (self.lost)(
                format!(
                    "post-copy failed before the VM ran here: {why}; the source keeps the VM"
                ),
                false,
            ),
            None => {}
        }
    }

    fn gpa_of(&self, host: u64) -> Option<(u64, &Region)> {
        self.regions
            .iter()
            .find(|r| host >= r.host && host < r.host + r.len)
            .map(|r| (r.gpa + (host - r.host), r))
    }

    fn host_of(&self, gpa: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa + PAGE_SIZE as u64 <= r.gpa + r.len)
            .map(|r| r.host + (gpa - r.gpa))
    }

    /// The fault thread: asks for what is faulted on, a chunk around it.
    fn ask_for_faults<W: Write>(&self, w: &Mutex<FrameWriter<W>>) {
        let mut asked = HashSet::new();
        let mut faults = Vec::new();
        let mut last_sent = Instant::now();
        while !self.done.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            unsafe { libc::poll(&mut pfd, 1, 200) };
            if let Err(e) = self.uffd.read_faults(&mut faults) {
                return self.fail(format!("reading page faults: {e}"));
            }
            let mut want = Vec::new();
            for f in &faults {
                self.faults.fetch_add(1, Ordering::Relaxed);
                let Some((gpa, r)) = self.gpa_of(f.address) else {
                    continue;
                };
                let chunk = gpa & !(REQUEST_CHUNK - 1);
                let start = chunk.max(r.gpa);
                let end = (chunk + REQUEST_CHUNK).min(r.gpa + r.len);
                if asked.insert(start) {
                    want.push((start, end - start));
                }
            }
            if want.is_empty() && last_sent.elapsed() < Duration::from_secs(1) {
                continue;
            }
            let m = Message::PageRequest(want);
            let sent = m.encode().map_err(|e| e.to_string()).and_then(|(k, p)| {
                let mut w = w.lock().expect("migration writer");
                w.write(k, &p)
                    .and_then(|()| w.flush())
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = sent {
                return self.fail(format!("asking the source for pages: {e}"));
            }
            last_sent = Instant::now();
        }
    }

    /// The page thread: puts every page that arrives in place.
    fn put_pages<R: Read, W: Write>(&self, mut r: FrameReader<R>, w: &Mutex<FrameWriter<W>>) {
        let started = Instant::now();
        let mut unpacked = Vec::new();
        let zeros = vec![0u8; PAGE_SIZE];
        let mut placed = 0u64;
        loop {
            let frame = match r.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return self.fail("the source closed the connection".into()),
                Err(e) => return self.fail(e.to_string()),
            };
            let m = match Message::decode(&frame) {
                Ok(m) => m,
                Err(e) => return self.fail(e.to_string()),
            };
            let batch = match (m.memory_batch(&mut unpacked), &m) {
                (Ok(Some(b)), _) => b,
                (Err(e), _) => return self.fail(e.to_string()),
                (Ok(None), Message::PostcopyDone) => break,
                (Ok(None), Message::Refuse(refusal)) => {
                    return self.fail(format!("the source gave up: {}", refusal.reason))
                }
                (Ok(None), m) => {
                    return self.fail(format!("a {} frame during post-copy", m.kind()))
                }
            };
            for p in batch.pages() {
                let Some(i) = self.stale.index(p.gpa) else {
                    return self.fail(format!("page {:#x} was not a stale page", p.gpa));
                };
                let (word, bit) = ((i / 64) as usize, 1u64 << (i % 64));
                if self.received[word].fetch_or(bit, Ordering::SeqCst) & bit != 0 {
                    continue;
                }
                let host = self.host_of(p.gpa).expect("a stale page is guest RAM");
                let src = p.data.unwrap_or(&zeros);
                match self.uffd.copy(host, src.as_ptr() as u64, PAGE_SIZE as u64) {
                    Ok(()) => placed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return self.fail(format!("placing page {:#x}: {e}", p.gpa)),
                }
            }
        }
        let missing: u64 = (0..self.stale.pages())
            .filter(|i| {
                self.received[(i / 64) as usize].load(Ordering::SeqCst) & (1 << (i % 64)) == 0
            })
            .count() as u64;
        if missing > 0 {
            return self.fail(format!(
                "the source said it sent every page, but {missing} never arrived"
            ));
        }
        self.done.store(true, Ordering::SeqCst);
        let sent = Message::PostcopyComplete
            .encode()
            .map_err(|e| e.to_string())
            .and_then(|(k, p)| {
                let mut w = w.lock().expect("migration writer");
                w.write(k, &p)
                    .and_then(|()| w.flush())
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = sent {
            tracing::warn!("post-copy: cannot tell the source it is complete: {e}");
        }
        eprintln!(
            "stasis: post-copy complete: {placed} pages placed in {:.1} ms, {} page faults waited for them",
            started.elapsed().as_secs_f64() * 1e3,
            self.faults.load(Ordering::Relaxed)
        );
    }
}
