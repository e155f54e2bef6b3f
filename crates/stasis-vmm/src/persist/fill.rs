//! Background restore: the guest runs at once, its memory becomes resident
//! behind it.
//!
//! Guest RAM is fresh anonymous memory with transparent huge pages,
//! registered with userfaultfd for missing-page faults before anything
//! touches it. Then:
//!
//! * a fault thread (`restore-faults`) waits for faults: a vCPU, a device
//!   I/O thread, KVM itself or the VMM touching a page not yet filled
//!   blocks in the kernel, and this thread fills the whole 2 MiB block at
//!   once and wakes it;
//! * filler threads (`restore-fill-N`, at a lower priority than the
//!   threads the guest waits on) fill every other block: a recorded
//!   working set first, in the order the guest touched it, starting while
//!   the VM is still being built, then, once the guest runs, the rest in
//!   address order. Blocks that hold no data in the snapshot are left
//!   to the kernel (zero pages on first touch) unless a fault asks for one
//!   first.
//!
//! A block is read from the snapshot chain into a 2 MiB staging buffer
//! (each chunk checked against its checksum as it is read, see
//! `stasis_snapshot::SnapshotChain::read_block`), then moved into place
//! with `UFFDIO_MOVE`: the staging buffer's huge page becomes the guest's,
//! without a second copy (with `UFFDIO_COPY` on kernels before 6.8, as
//! 4 KiB pages). Each block is filled exactly once (claim states), so a
//! fault and the filler never race on one. When every block with data is
//! in place the guest memory is unregistered and runs with no further
//! cost; waiting threads (on blocks of zeros) then fault normally.
//!
//! A chunk that fails its checksum, or a read error, is never given to
//! the guest: the block stays missing, whoever touches it stays blocked,
//! and the fatal hook ends the VM naming the chunk.
//!
//! None of these threads takes a VM or device lock, so a device thread
//! or a vCPU waiting on a fault never holds up the thread that serves it.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use stasis_snapshot::{SnapshotChain, WorkingSet, FILL_BLOCK};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestRam;
use crate::uffd::{self, PageFault, Userfaultfd};

/// Called once when the fill cannot go on (a damaged chunk, a read error):
/// the VM must end before the guest can read the block. Given the
/// message; may exit the process.
pub type FatalHook = Arc<dyn Fn(String) + Send + Sync>;

/// How a background restore fills memory.
#[derive(Clone)]
pub struct FillOptions {
    /// Blocks (guest physical addresses) to fill first, in this order: a
    /// recorded working set.
    pub prefetch: Vec<u64>,
    /// Record the working set: for this long after the start the fillers
    /// hold back and only faults are served; the blocks the faults asked
    /// for, in order, are then stored beside the snapshot.
    pub record: Option<Duration>,
    /// Check each chunk's checksum as it is read (off only when the
    /// memory was verified whole before, or the user said not to).
    pub verify: bool,
    /// Filler threads besides the fault thread.
    pub fillers: usize,
    /// What to do when a block cannot be filled.
    pub on_fatal: FatalHook,
}

/// What a fill has done so far.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FillStatus {
    /// Bytes of guest memory.
    pub total_bytes: u64,
    /// Bytes filled from the snapshot (blocks of zeros are not counted).
    pub filled_bytes: u64,
    /// Blocks with data filled ahead of the guest or for it.
    pub blocks_filled: u64,
    /// Blocks left to the kernel because they hold only zeros.
    pub zero_blocks: u64,
    /// Page faults reported (a block may be asked for more than once).
    pub faults: u64,
    /// Blocks filled because a fault asked for them.
    pub fault_fills: u64,
    /// Blocks of a recorded working set filled first.
    pub prefetched_blocks: u64,
    /// Whether all memory is resident (userfaultfd unregistered).
    pub resident: bool,
    /// Milliseconds from the start of the fill until it was resident.
    pub resident_ms: Option<f64>,
    /// Why the fill stopped, if it failed.
    pub error: Option<String>,
    /// Blocks recorded as the working set, once stored.
    pub working_set_recorded: Option<usize>,
    /// How blocks are placed: `move` (huge pages kept) or `copy`.
    pub placement: &'static str,
}

/// The fillers' nice value: below the threads the guest waits on.
const FILLER_NICE: libc::c_int = 5;

const MISSING: u8 = 0;
const CLAIMED: u8 = 1;
const FILLED: u8 = 2;
/// Known to hold only zeros and left to the kernel.
const ZERO: u8 = 3;
const FAILED: u8 = 4;

struct Block {
    region: usize,
    offset: u64,
    len: u64,
    host: u64,
    gpa: u64,
}

struct Shared {
    uffd: Userfaultfd,
    chain: Arc<SnapshotChain>,
    blocks: Vec<Block>,
    state: Vec<AtomicU8>,
    /// Fill order (block indices); `cursor` is the next to try.
    order: Vec<u32>,
    prefetch_len: usize,
    cursor: AtomicUsize,
    /// Blocks neither filled nor known to be zero.
    remaining: AtomicUsize,
    /// Host ranges registered (one per region), with the index of each
    /// region's first block.
    ranges: Vec<(u64, u64)>,
    first_block: Vec<usize>,
    use_move: bool,
    verify: bool,
    stop: AtomicBool,
    finished: AtomicBool,
    /// When the fillers may begin (set by `begin_background`).
    go: Mutex<Option<Instant>>,
    go_changed: Condvar,
    record: Option<Duration>,
    recorded: Mutex<Vec<u32>>,
    started: Instant,
    filled_bytes: AtomicU64,
    blocks_filled: AtomicU64,
    zero_blocks: AtomicU64,
    faults: AtomicU64,
    fault_fills: AtomicU64,
    prefetched: AtomicU64,
    outcome: Mutex<Outcome>,
    changed: Condvar,
    on_fatal: FatalHook,
}

#[derive(Default)]
struct Outcome {
    resident_ms: Option<f64>,
    error: Option<String>,
    working_set_recorded: Option<usize>,
}

/// A running background fill of guest memory. Dropping it stops the
/// threads and unregisters the memory, filled or not: drop it only with
/// the VM.
pub struct MemoryFill {
    shared: Arc<Shared>,
}

/// A 2 MiB-aligned private anonymous buffer that blocks are read into
/// before they are moved into guest memory.
struct Staging {
    base: *mut libc::c_void,
    map_len: usize,
    ptr: *mut u8,
}

impl Staging {
    fn new() -> std::io::Result<Staging> {
        let block = FILL_BLOCK as usize;
        let map_len = 2 * block;
        // SAFETY: a fresh private anonymous mapping; nothing else uses it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = ((base as usize).div_ceil(block) * block) as *mut u8;
        // SAFETY: `ptr..ptr+block` lies inside the mapping just made;
        // MADV_HUGEPAGE only changes how the kernel backs it.
        unsafe { libc::madvise(ptr.cast(), block, libc::MADV_HUGEPAGE) };
        Ok(Staging { base, map_len, ptr })
    }

    /// The first `len` bytes.
    fn buf(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: `ptr` points at FILL_BLOCK bytes of our own mapping that
        // only this thread uses; `len <= FILL_BLOCK`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len.min(FILL_BLOCK as usize)) }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`.
        unsafe { libc::munmap(self.base, self.map_len) };
    }
}

impl MemoryFill {
    /// Registers every region of `mem` (fresh memory nothing has touched)
    /// for missing-page faults and starts the fault and filler threads,
    /// which fill it from `chain`.
    pub fn start(
        mem: &GuestRam,
        chain: Arc<SnapshotChain>,
        options: FillOptions,
    ) -> std::io::Result<MemoryFill> {
        let offered = Userfaultfd::offered_features()?;
        // UFFDIO_MOVE moves anonymous pages only; RAM that is a shared
        // memory file (the memfd backend) is filled by copying.
        let anonymous = mem.iter().all(|r| r.file_offset().is_none());
        let use_move = anonymous && offered & uffd::FEATURE_MOVE != 0;
        let uffd = Userfaultfd::new(if use_move { uffd::FEATURE_MOVE } else { 0 })?;
        let mut blocks = Vec::new();
        let mut ranges = Vec::new();
        let mut first_block = Vec::new();
        for (i, region) in mem.iter().enumerate() {
            first_block.push(blocks.len());
            let host = region.as_ptr() as u64;
            let len = region.len();
            uffd.register(host, len, uffd::REGISTER_MODE_MISSING)?;
            ranges.push((host, len));
            let gpa = region.start_addr().0;
            for (offset, blen) in chain.blocks(i) {
                blocks.push(Block {
                    region: i,
                    offset,
                    len: blen,
                    host: host + offset,
                    gpa: gpa + offset,
                });
            }
        }
        let mut order = Vec::with_capacity(blocks.len());
        let mut queued = vec![false; blocks.len()];
        let by_gpa: std::collections::HashMap<u64, usize> =
            blocks.iter().enumerate().map(|(i, b)| (b.gpa, i)).collect();
        for gpa in &options.prefetch {
            if let Some(&i) = by_gpa.get(gpa) {
                if !queued[i] {
                    queued[i] = true;
                    order.push(i as u32);
                }
            }
        }
        let prefetch_len = order.len();
        order.extend((0..blocks.len() as u32).filter(|&i| !queued[i as usize]));
        let n = blocks.len();
        let shared = Arc::new(Shared {
            uffd,
            chain,
            state: (0..n).map(|_| AtomicU8::new(MISSING)).collect(),
            blocks,
            order,
            prefetch_len,
            cursor: AtomicUsize::new(0),
            remaining: AtomicUsize::new(n),
            ranges,
            first_block,
            use_move,
            verify: options.verify,
            stop: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            go: Mutex::new(None),
            go_changed: Condvar::new(),
            record: options.record,
            recorded: Mutex::new(Vec::new()),
            started: Instant::now(),
            filled_bytes: AtomicU64::new(0),
            blocks_filled: AtomicU64::new(0),
            zero_blocks: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            fault_fills: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            outcome: Mutex::new(Outcome::default()),
            changed: Condvar::new(),
            on_fatal: options.on_fatal,
        });
        if n == 0 {
            shared.finish();
        }
        // Not joined (see Drop): each holds the shared state it needs.
        let fill = MemoryFill { shared };
        let s = fill.shared.clone();
        std::thread::Builder::new()
            .name("restore-faults".into())
            .spawn(move || {
                stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Job);
                s.serve_faults()
            })?;
        for i in 0..options.fillers.max(1) {
            let s = fill.shared.clone();
            std::thread::Builder::new()
                .name(format!("restore-fill-{i}"))
                .spawn(move || {
                    stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Job);
                    s.fill_in_order(i == 0)
                })?;
        }
        Ok(fill)
    }

    /// Lets the filler threads begin (the guest starts): until then only
    /// faults are served. A recording window starts now.
    pub fn begin_background(&self) {
        let mut go = self.shared.go.lock().unwrap_or_else(|p| p.into_inner());
        go.get_or_insert_with(Instant::now);
        self.shared.go_changed.notify_all();
    }

    /// What the fill has done so far.
    pub fn status(&self) -> FillStatus {
        let s = &self.shared;
        let o = s.outcome.lock().unwrap_or_else(|p| p.into_inner());
        FillStatus {
            total_bytes: s.ranges.iter().map(|r| r.1).sum(),
            filled_bytes: s.filled_bytes.load(Ordering::Relaxed),
            blocks_filled: s.blocks_filled.load(Ordering::Relaxed),
            zero_blocks: s.zero_blocks.load(Ordering::Relaxed),
            faults: s.faults.load(Ordering::Relaxed),
            fault_fills: s.fault_fills.load(Ordering::Relaxed),
            prefetched_blocks: s.prefetched.load(Ordering::Relaxed),
            resident: s.finished.load(Ordering::SeqCst),
            resident_ms: o.resident_ms,
            error: o.error.clone(),
            working_set_recorded: o.working_set_recorded,
            placement: if s.use_move { "move" } else { "copy" },
        }
    }

    /// Waits until all memory is resident (`Ok`) or the fill failed.
    pub fn wait_resident(&self) -> Result<(), String> {
        let s = &self.shared;
        let mut o = s.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = &o.error {
                return Err(e.clone());
            }
            if s.finished.load(Ordering::SeqCst) {
                return Ok(());
            }
            o = s
                .changed
                .wait_timeout(o, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for MemoryFill {
    fn drop(&mut self) {
        // The threads see `stop` within 50 ms and end; they are not joined
        // (one may be held by a test's failpoint). They never touch guest
        // memory themselves, only ask the kernel to move pages into it, so
        // its unmapping after this cannot be misused by them.
        self.shared.stop.store(true, Ordering::SeqCst);
        // Nobody fills any more: let whoever still waits go (the VM is
        // ending; what they see no longer matters).
        if !self.shared.finished.swap(true, Ordering::SeqCst) {
            for &(host, len) in &self.shared.ranges {
                let _ = self.shared.uffd.unregister(host, len);
            }
        }
    }
}

impl Shared {
    /// Whether faults are being recorded as the working set: from before
    /// the guest starts to the end of the recording window.
    fn recording(&self) -> bool {
        let Some(window) = self.record else {
            return false;
        };
        match *self.go.lock().unwrap_or_else(|p| p.into_inner()) {
            None => true,
            Some(go) => go.elapsed() < window,
        }
    }

    /// The block holding host address `addr`.
    fn block_of(&self, addr: u64) -> Option<usize> {
        self.ranges
            .iter()
            .zip(&self.first_block)
            .find(|(&(host, len), _)| addr >= host && addr - host < len)
            .map(|(&(host, _), &first)| first + ((addr - host) / FILL_BLOCK) as usize)
    }

    /// The fault thread: fills the block of every fault at once.
    fn serve_faults(&self) {
        let mut staging = match Staging::new() {
            Ok(s) => s,
            Err(e) => return self.fail(format!("cannot map a staging buffer: {e}")),
        };
        let mut faults: Vec<PageFault> = Vec::new();
        let mut scratch = Vec::new();
        while !self.stop.load(Ordering::Relaxed) && !self.finished.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                continue;
            }
            if let Err(e) = self.uffd.read_faults(&mut faults) {
                return self.fail(format!("reading userfaultfd: {e}"));
            }
            for f in &faults {
                self.faults.fetch_add(1, Ordering::Relaxed);
                let Some(b) = self.block_of(f.address) else {
                    continue;
                };
                if self.recording() {
                    let mut rec = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
                    if !rec.contains(&(b as u32)) {
                        rec.push(b as u32);
                    }
                }
                self.serve_fault(b, f.address, &mut staging, &mut scratch);
            }
        }
    }

    fn serve_fault(&self, b: usize, addr: u64, staging: &mut Staging, scratch: &mut Vec<u8>) {
        let state = &self.state[b];
        if state
            .compare_exchange(MISSING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.fault_fills.fetch_add(1, Ordering::Relaxed);
            self.fill(b, false, staging, scratch);
            return;
        }
        if state
            .compare_exchange(ZERO, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // Counted as done already: only place zeros, unless the fill
            // finished meanwhile (then the kernel serves the fault).
            if !self.finished.load(Ordering::SeqCst) {
                let block = &self.blocks[b];
                let buf = staging.buf(block.len as usize);
                buf.fill(0);
                if let Err(e) = self.place(block, staging) {
                    if !self.finished.load(Ordering::SeqCst) {
                        return self.fail(format!(
                            "cannot place guest memory at {:#x}: {e}",
                            block.gpa
                        ));
                    }
                }
            }
            state.store(FILLED, Ordering::Release);
            return;
        }
        if state.load(Ordering::Acquire) == FILLED {
            // Filled between the fault and now: the thread may already run
            // on, or wait for a wake-up that went before it slept.
            let _ = self.uffd.wake(addr & !4095, 4096);
        }
        // CLAIMED: the thread that fills it wakes every waiter when done.
    }

    /// A filler thread: the blocks in fill order, skipping those already
    /// claimed. The first one also stores the recorded working set.
    fn fill_in_order(&self, first: bool) {
        // Behind the threads the guest waits on (the fault thread, vCPUs,
        // device threads, the VMM building the VM) when they compete for
        // the host's CPUs.
        // SAFETY: setpriority on this thread's own id (PRIO_PROCESS with a
        // thread id applies to that thread alone on Linux).
        unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                libc::gettid() as libc::id_t,
                FILLER_NICE,
            );
        }
        // (A test can hold the fillers here: only faults are served.)
        stasis_failpoint::hit("restore.background_fill");
        let mut staging = match Staging::new() {
            Ok(s) => s,
            Err(e) => return self.fail(format!("cannot map a staging buffer: {e}")),
        };
        let mut scratch = Vec::new();
        // A recorded working set is what the guest touches first: it is
        // filled at once, while the VM is still being built. The rest
        // waits for the guest to start (and a recording window to end).
        let mut started = false;
        loop {
            if self.stop.load(Ordering::Relaxed) || self.finished.load(Ordering::SeqCst) {
                return;
            }
            let i = self.cursor.fetch_add(1, Ordering::Relaxed);
            let Some(&b) = self.order.get(i) else {
                return;
            };
            if i >= self.prefetch_len && !started {
                if !self.wait_for_guest(first) {
                    return;
                }
                started = true;
            }
            let b = b as usize;
            if self.state[b]
                .compare_exchange(MISSING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                if i < self.prefetch_len {
                    self.prefetched.fetch_add(1, Ordering::Relaxed);
                }
                self.fill(b, true, &mut staging, &mut scratch);
            }
        }
    }

    /// Waits until the guest runs and, when recording, through the
    /// recording window (the first filler then stores the working set).
    /// `false` if the fill was stopped meanwhile.
    fn wait_for_guest(&self, first: bool) -> bool {
        let go = {
            let mut go = self.go.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if self.stop.load(Ordering::Relaxed) {
                    return false;
                }
                if let Some(t) = *go {
                    break t;
                }
                go = self
                    .go_changed
                    .wait_timeout(go, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        if let Some(window) = self.record {
            let until = go + window;
            while Instant::now() < until {
                if self.stop.load(Ordering::Relaxed) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(5).min(until - Instant::now()));
            }
            if first {
                self.store_working_set();
            }
        }
        true
    }

    /// Fills claimed block `b`: reads it (checked) and places it, or, for
    /// the filler, leaves a block of zeros to the kernel.
    fn fill(&self, b: usize, may_skip_zero: bool, staging: &mut Staging, scratch: &mut Vec<u8>) {
        let block = &self.blocks[b];
        let result = (|| -> Result<bool, String> {
            let zero = self
                .chain
                .block_is_zero(block.region, block.offset, block.len)
                .map_err(|e| e.to_string())?;
            if zero && may_skip_zero {
                return Ok(false);
            }
            let buf = staging.buf(block.len as usize);
            if zero {
                buf.fill(0);
            } else {
                self.chain
                    .read_block(block.region, block.offset, buf, scratch, self.verify)
                    .map_err(|e| e.to_string())?;
            }
            self.place(block, staging)
                .map_err(|e| format!("cannot place guest memory at {:#x}: {e}", block.gpa))?;
            Ok(true)
        })();
        match result {
            Ok(placed) => {
                if placed {
                    self.filled_bytes.fetch_add(block.len, Ordering::Relaxed);
                    self.blocks_filled.fetch_add(1, Ordering::Relaxed);
                    self.state[b].store(FILLED, Ordering::Release);
                } else {
                    self.zero_blocks.fetch_add(1, Ordering::Relaxed);
                    self.state[b].store(ZERO, Ordering::Release);
                }
                if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.finish();
                }
            }
            Err(message) => {
                self.state[b].store(FAILED, Ordering::Release);
                self.fail(message);
            }
        }
    }

    /// Moves (or copies) the staging buffer's first `block.len` bytes into
    /// the block's place, waking whoever waits on it.
    fn place(&self, block: &Block, staging: &mut Staging) -> std::io::Result<()> {
        let src = staging.ptr as u64;
        if self.use_move {
            self.uffd.move_pages(block.host, src, block.len)
        } else {
            self.uffd.copy(block.host, src, block.len)
        }
    }

    /// All blocks with data are in place: unregister (threads waiting on
    /// blocks of zeros fault again, now served by the kernel).
    fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        for &(host, len) in &self.ranges {
            if let Err(e) = self.uffd.unregister(host, len) {
                tracing::error!("cannot unregister restored guest memory: {e}");
            }
        }
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        o.resident_ms = Some(self.started.elapsed().as_secs_f64() * 1e3);
        self.changed.notify_all();
    }

    /// The fill cannot go on: record why and call the fatal hook (once;
    /// not when the fill was being stopped anyway).
    fn fail(&self, message: String) {
        if self.stop.load(Ordering::SeqCst) {
            return;
        }
        let first = {
            let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
            let first = o.error.is_none();
            o.error.get_or_insert(message.clone());
            self.changed.notify_all();
            first
        };
        self.stop.store(true, Ordering::SeqCst);
        if first {
            (self.on_fatal)(format!(
                "restoring guest memory failed: {message}; the VM was stopped before the guest could use that memory"
            ));
        }
    }

    /// Stores the blocks faults asked for during the recording window.
    fn store_working_set(&self) {
        let rec = self
            .recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let set = WorkingSet {
            block_size: FILL_BLOCK,
            blocks: rec.iter().map(|&b| self.blocks[b as usize].gpa).collect(),
        };
        let newest = self.chain.newest();
        match stasis_snapshot::write_working_set(newest, &set) {
            Ok(()) => {
                tracing::info!(
                    "recorded a working set of {} blocks beside {}",
                    set.blocks.len(),
                    newest.dir().display()
                );
                let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
                o.working_set_recorded = Some(set.blocks.len());
            }
            Err(e) => tracing::warn!(
                "cannot store the working set beside {}: {e}",
                newest.dir().display()
            ),
        }
    }
}
