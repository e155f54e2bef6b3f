//! Writing a snapshot: crash-safe, with a fast sparse memory copy.
//!
//! Everything is written into a temporary sibling directory
//! `.<name>.tmp-<pid>-<n>`; [`SnapshotWriter::commit`] writes the manifest
//! last, fsyncs, and then atomically puts the directory in place (see
//! `docs/FORMAT.md`, "Crash-safe writing").

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::crc;
use crate::error::{io_ctx, Error, Result};
use crate::fsutil;
use crate::manifest::{
    encode_manifest, CpuInfo, ManifestBody, MemoryLayout, MemoryRegion, Producer, SectionEntry,
};
use crate::progress::Progress;
use crate::section::{check_key, encode_section, SectionState};
use crate::{
    CHUNK_SIZE, MANIFEST_FILE, MEMORY_FILE, PAGE_SIZE, REGION_ALIGN, SECTION_ALIGN, STATE_FILE,
};

/// Chunks handed to a worker thread at a time (8 × 2 MiB = 16 MiB); also
/// the largest single `pwrite`.
const BATCH_CHUNKS: usize = 8;

/// One guest RAM region to copy into the memory image.
///
/// The bytes are only read during [`SnapshotWriter::write_memory`]. For
/// guest memory the VM must be paused (no vCPU running, no device DMA) for
/// the duration of that call, or the image will not be a consistent copy.
#[derive(Clone, Copy, Debug)]
pub struct MemoryRegionSource<'a> {
    name: &'a str,
    gpa: u64,
    data: &'a [u8],
}

impl<'a> MemoryRegionSource<'a> {
    /// A region named `name` (e.g. `"ram0"`) at guest physical address
    /// `gpa` whose contents are `data` (length a multiple of 4 KiB).
    pub fn new(name: &'a str, gpa: u64, data: &'a [u8]) -> MemoryRegionSource<'a> {
        MemoryRegionSource { name, gpa, data }
    }

    /// Like [`MemoryRegionSource::new`], from a host mapping of guest memory.
    ///
    /// # Safety
    ///
    /// `ptr .. ptr + len` must be mapped and readable for the whole lifetime
    /// `'a`, and must not be written by anyone (vCPUs, devices, other
    /// threads) while the writer reads it, i.e. during
    /// [`SnapshotWriter::write_memory`].
    pub unsafe fn from_raw(
        name: &'a str,
        gpa: u64,
        ptr: *const u8,
        len: usize,
    ) -> MemoryRegionSource<'a> {
        // SAFETY: the caller guarantees the range is mapped, readable and
        // unchanging for 'a, which is what a shared slice requires.
        let data = unsafe { std::slice::from_raw_parts(ptr, len) };
        MemoryRegionSource { name, gpa, data }
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
        self.data.len() as u64
    }

    /// Whether the region is empty (which `write_memory` rejects).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
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

/// The manifest fields the writer cannot know by itself.
#[derive(Clone, Debug, Default)]
pub struct ManifestInput {
    /// Creation time; `None` means now.
    pub created_unix_ms: Option<u64>,
    /// The VMM's configuration of the VM, stored opaquely.
    pub vm_config: serde_json::Value,
    /// The CPU and the guest's CPUID.
    pub cpu: CpuInfo,
    /// Reserved for diff snapshots; keep `None`.
    pub parent: Option<String>,
    /// Free-form notes.
    pub notes: BTreeMap<String, String>,
}

/// Figures from [`SnapshotWriter::commit`].
#[derive(Clone, Debug, PartialEq)]
pub struct CommitStats {
    /// Where the snapshot now is.
    pub dir: PathBuf,
    /// Size of `manifest.json`.
    pub manifest_bytes: u64,
    /// Size of `state.bin`.
    pub state_bytes: u64,
    /// Length of `memory.img` (holes included).
    pub memory_file_size: u64,
    /// Whether an older snapshot at the same path was replaced.
    pub replaced_existing: bool,
    /// Time spent in fsync of the data files.
    pub sync_time: Duration,
    /// Total time of the commit.
    pub elapsed: Duration,
}

/// What is at the target path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Missing,
    Snapshot,
    EmptyDir,
}

fn check_target(dir: &Path) -> Result<Target> {
    let md = match fs::symlink_metadata(dir) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Target::Missing),
        Err(e) => return Err(io_ctx(format!("examining {}", dir.display()))(e)),
    };
    if !md.is_dir() {
        return Err(Error::RefuseOverwrite {
            dir: dir.to_path_buf(),
        });
    }
    if fs::symlink_metadata(dir.join(MANIFEST_FILE)).is_ok() {
        return Ok(Target::Snapshot);
    }
    let mut entries = fs::read_dir(dir).map_err(io_ctx(format!("listing {}", dir.display())))?;
    if entries.next().is_none() {
        Ok(Target::EmptyDir)
    } else {
        Err(Error::RefuseOverwrite {
            dir: dir.to_path_buf(),
        })
    }
}

/// Splits a target path into (parent, final component), with `.` for a
/// relative path's empty parent.
fn split_target(final_dir: &Path) -> Result<(PathBuf, OsString)> {
    let name = final_dir.file_name().ok_or_else(|| {
        Error::Usage(format!(
            "snapshot path {} has no final directory name",
            final_dir.display()
        ))
    })?;
    let parent = match final_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_os_string()))
}

/// Sibling path `.<name>.<kind>-<pid>-<n>`.
fn sibling(parent: &Path, name: &OsString, kind: &str, n: u64) -> PathBuf {
    let mut s = OsString::from(".");
    s.push(name);
    s.push(format!(".{kind}-{}-{n}", std::process::id()));
    parent.join(s)
}

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// Writes one snapshot. Create it, add sections and memory in any order,
/// then [`commit`](SnapshotWriter::commit). Dropping it without committing
/// deletes everything it wrote and leaves any existing snapshot alone.
#[derive(Debug)]
pub struct SnapshotWriter {
    final_dir: PathBuf,
    parent: PathBuf,
    name: OsString,
    tmp_dir: PathBuf,
    state: BufWriter<File>,
    state_len: u64,
    sections: Vec<SectionEntry>,
    memory: Option<(File, MemoryLayout)>,
    /// The memory image created ahead of `write_memory` by
    /// `prepare_memory`, with its length.
    prepared: Option<(File, u64)>,
    threads: usize,
    /// Set when a write failed half-way: the files are inconsistent, so
    /// `commit` refuses.
    failed: Option<String>,
    /// Use `RENAME_EXCHANGE` when replacing (tests turn it off to exercise
    /// the fallback).
    exchange: bool,
    /// The temp dir is no longer ours to delete (renamed into place).
    done: bool,
    /// Where the writer reports how far it is, and learns of a cancel.
    progress: Arc<Progress>,
}

impl SnapshotWriter {
    /// Starts a snapshot that will end up at `final_dir`.
    ///
    /// `final_dir`'s parent must exist. If `final_dir` exists it must be a
    /// snapshot (has `manifest.json`) or an empty directory; it is replaced
    /// only by a successful commit.
    pub fn create(final_dir: &Path) -> Result<SnapshotWriter> {
        let (parent, name) = split_target(final_dir)?;
        if !parent.is_dir() {
            return Err(Error::NoParent {
                dir: final_dir.to_path_buf(),
                parent,
            });
        }
        check_target(final_dir)?;
        let tmp_dir = loop {
            let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
            let p = sibling(&parent, &name, "tmp", n);
            match fs::create_dir(&p) {
                Ok(()) => break p,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(io_ctx(format!("creating {}", p.display()))(e));
                }
            }
        };
        let state_path = tmp_dir.join(STATE_FILE);
        let state = match File::create(&state_path) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp_dir);
                return Err(io_ctx(format!("creating {}", state_path.display()))(e));
            }
        };
        tracing::debug!(tmp = %tmp_dir.display(), "snapshot writer started");
        Ok(SnapshotWriter {
            final_dir: final_dir.to_path_buf(),
            parent,
            name,
            tmp_dir,
            state: BufWriter::with_capacity(1 << 20, state),
            state_len: 0,
            sections: Vec::new(),
            memory: None,
            prepared: None,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(2),
            failed: None,
            exchange: true,
            done: false,
            progress: Arc::new(Progress::new()),
        })
    }

    /// The temporary directory being written.
    pub fn temp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// Reports progress into `progress` and stops with
    /// [`Error::Cancelled`] at its safe points (between memory batches,
    /// before the fsyncs, before the rename) once a cancel is requested
    /// there. Before [`SnapshotWriter::commit`]'s rename the temporary
    /// directory is removed on drop, so a cancel leaves nothing behind.
    pub fn set_progress(&mut self, progress: Arc<Progress>) {
        self.progress = progress;
    }

    /// Sets the number of threads [`write_memory`](Self::write_memory) uses
    /// (default: 2, or 1 on a single-CPU host).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Adds a section holding `state` as JSON, under `T::NAME`, `instance`
    /// and `T::VERSION`. `optional` sections may be skipped by a restoring
    /// stasis that does not understand them.
    pub fn add_section<T: SectionState>(
        &mut self,
        instance: &str,
        optional: bool,
        state: &T,
    ) -> Result<()> {
        let bytes = encode_section(state)?;
        self.add_raw_section(T::NAME, instance, T::VERSION, optional, &bytes)
    }

    /// Adds a section with an already-encoded payload.
    pub fn add_raw_section(
        &mut self,
        name: &str,
        instance: &str,
        version: u32,
        optional: bool,
        bytes: &[u8],
    ) -> Result<()> {
        check_key(name, instance)?;
        if self
            .sections
            .iter()
            .any(|s| s.name == name && s.instance == instance)
        {
            return Err(Error::BadSection {
                name: name.to_string(),
                instance: instance.to_string(),
                detail: "added twice".to_string(),
            });
        }
        let pad = (SECTION_ALIGN - self.state_len % SECTION_ALIGN) % SECTION_ALIGN;
        let written = self
            .state
            .write_all(&[0u8; SECTION_ALIGN as usize][..pad as usize])
            .and_then(|()| self.state.write_all(bytes));
        if let Err(e) = written {
            let e = io_ctx(format!(
                "writing section '{name}'/'{instance}' to {}",
                self.tmp_dir.join(STATE_FILE).display()
            ))(e);
            self.failed = Some(e.to_string());
            return Err(e);
        }
        let offset = self.state_len + pad;
        self.state_len = offset + bytes.len() as u64;
        self.sections.push(SectionEntry {
            name: name.to_string(),
            instance: instance.to_string(),
            version,
            optional,
            offset,
            size: bytes.len() as u64,
            crc32c: crc32c::crc32c(bytes),
        });
        Ok(())
    }

    /// Copies guest memory into `memory.img`, leaving all-zero 4 KiB pages
    /// as holes, and computes the chunk checksums. Call at most once.
    ///
    /// Regions are laid out in the order given, each at a file offset that
    /// is a multiple of 2 MiB. Sizes and guest addresses must be multiples
    /// of 4 KiB and regions must not overlap in guest physical memory.
    ///
    /// The region bytes are only read during this call; once it returns the
    /// guest may run again. Durability (fsync) happens in
    /// [`commit`](Self::commit).
    pub fn write_memory(&mut self, regions: &[MemoryRegionSource<'_>]) -> Result<MemoryWriteStats> {
        if self.memory.is_some() {
            return Err(Error::Usage("write_memory called twice".to_string()));
        }
        let start = Instant::now();
        let layout = plan_layout(regions)?;
        let result = self.copy_memory(regions, layout, start);
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
        }
        result
    }

    /// Creates the memory image for `regions` ahead of
    /// [`write_memory`](Self::write_memory) and reads it through once, so
    /// that the page cache holds a clean page for every page of it. Call
    /// while the guest still runs: `write_memory` (while it is paused) then
    /// only copies into cached pages instead of allocating them, which on
    /// hosts where fresh memory is slow to fault in (nested VMs) is most
    /// of a large snapshot's cost. The regions passed to `write_memory`
    /// must have the same layout. Optional.
    pub fn prepare_memory(&mut self, regions: &[MemoryRegionSource<'_>]) -> Result<()> {
        if self.memory.is_some() || self.prepared.is_some() {
            return Err(Error::Usage(
                "prepare_memory after the memory image exists".to_string(),
            ));
        }
        let layout = plan_layout(regions)?;
        let file = self.create_memory_file(layout.file_size)?;
        let path = self.tmp_dir.join(MEMORY_FILE);
        self.progress
            .phase("preparing the memory image", layout.file_size);
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < layout.file_size {
            self.progress.check()?;
            let n = file
                .read_at(&mut buf, at)
                .map_err(io_ctx(format!("reading {}", path.display())))?;
            if n == 0 {
                break;
            }
            at += n as u64;
            self.progress.add(n as u64);
        }
        self.prepared = Some((file, layout.file_size));
        Ok(())
    }

    fn create_memory_file(&self, size: u64) -> Result<File> {
        let path = self.tmp_dir.join(MEMORY_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_ctx(format!("creating {}", path.display())))?;
        file.set_len(size)
            .map_err(io_ctx(format!("sizing {}", path.display())))?;
        Ok(file)
    }

    /// The I/O part of `write_memory`, after the regions were checked.
    fn copy_memory(
        &mut self,
        regions: &[MemoryRegionSource<'_>],
        layout: MemoryLayout,
        start: Instant,
    ) -> Result<MemoryWriteStats> {
        let path = self.tmp_dir.join(MEMORY_FILE);
        let file = match self.prepared.take() {
            Some((file, size)) if size == layout.file_size => file,
            Some((_, size)) => {
                return Err(Error::Usage(format!(
                    "write_memory regions need a {}-byte image but prepare_memory made {size}",
                    layout.file_size
                )))
            }
            None => self.create_memory_file(layout.file_size)?,
        };

        let tasks = plan_chunks(&layout);
        let batches = plan_batches(&tasks);
        let progress = self.progress.clone();
        progress.phase(
            "copying memory",
            regions.iter().map(MemoryRegionSource::len).sum(),
        );
        let threads = self.threads.min(batches.len()).max(1);
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let results: Mutex<Vec<WorkerResult>> = Mutex::new(Vec::new());
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let worker = || {
            let mut out = WorkerResult::default();
            loop {
                if abort.load(Ordering::Relaxed) {
                    break;
                }
                let b = next.fetch_add(1, Ordering::Relaxed);
                let Some(batch) = batches.get(b) else { break };
                let chunk_tasks = &tasks[batch.clone()];
                let region = &regions[chunk_tasks[0].region];
                let placed = &layout.regions[chunk_tasks[0].region];
                stasis_failpoint::hit("writer.memory_batch");
                let copied = progress
                    .check()
                    .and_then(|()| copy_batch(&file, &path, region, placed, chunk_tasks, &mut out));
                progress.add(chunk_tasks.iter().map(|t| t.data_len as u64).sum());
                if let Err(e) = copied {
                    abort.store(true, Ordering::Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                    break;
                }
            }
            results.lock().unwrap_or_else(|p| p.into_inner()).push(out);
        };
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(worker);
            }
            worker();
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let mut layout = layout;
        let mut written = 0u64;
        for r in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
            layout.nonzero_pages += r.nonzero_pages;
            written += r.bytes_written;
            for (i, c) in r.chunk_crcs {
                layout.chunk_crc32c[i] = c;
            }
        }
        let guest_bytes: u64 = regions.iter().map(|r| r.len()).sum();
        let stats = MemoryWriteStats {
            regions: regions.len(),
            guest_bytes,
            bytes_written: written,
            nonzero_pages: layout.nonzero_pages,
            zero_pages: guest_bytes / PAGE_SIZE - layout.nonzero_pages,
            file_size: layout.file_size,
            threads,
            elapsed: start.elapsed(),
        };
        tracing::debug!(?stats, "memory image written");
        self.memory = Some((file, layout));
        Ok(stats)
    }

    /// Finishes the snapshot: fsyncs the data files, writes and fsyncs
    /// `manifest.json` (last, so a directory without it is never mistaken
    /// for a snapshot), fsyncs the directory, then atomically puts it at
    /// the target path, replacing an older snapshot there, and fsyncs the
    /// parent directory.
    pub fn commit(mut self, input: ManifestInput) -> Result<CommitStats> {
        if let Some(e) = &self.failed {
            return Err(Error::Usage(format!(
                "an earlier write failed ({e}); this snapshot cannot be committed"
            )));
        }
        let start = Instant::now();
        let state_path = self.tmp_dir.join(STATE_FILE);
        self.state
            .flush()
            .map_err(io_ctx(format!("writing {}", state_path.display())))?;
        if self.memory.is_none() {
            let path = self.tmp_dir.join(MEMORY_FILE);
            let file =
                File::create(&path).map_err(io_ctx(format!("creating {}", path.display())))?;
            self.memory = Some((file, plan_layout(&[])?));
        }
        self.progress.check()?;
        self.progress.phase("making the files durable", 0);
        let sync_start = Instant::now();
        self.state
            .get_ref()
            .sync_all()
            .map_err(io_ctx(format!("fsyncing {}", state_path.display())))?;
        let (mem_file, layout) = self.memory.as_ref().expect("set above");
        mem_file.sync_all().map_err(io_ctx(format!(
            "fsyncing {}",
            self.tmp_dir.join(MEMORY_FILE).display()
        )))?;
        let sync_time = sync_start.elapsed();
        let layout = layout.clone();

        let body = ManifestBody {
            producer: Producer::this(),
            created_unix_ms: input.created_unix_ms.unwrap_or_else(now_unix_ms),
            vm_config: input.vm_config,
            cpu: input.cpu,
            memory: layout.clone(),
            sections: self.sections.clone(),
            state_file: STATE_FILE.to_string(),
            state_size: self.state_len,
            parent: input.parent,
            notes: input.notes,
        };
        crate::manifest::validate_body(&body)?;
        let text = encode_manifest(&body)?;
        let manifest_path = self.tmp_dir.join(MANIFEST_FILE);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&manifest_path)
                .map_err(io_ctx(format!("creating {}", manifest_path.display())))?;
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io_ctx(format!("writing {}", manifest_path.display())))?;
        }
        fsutil::fsync_dir(&self.tmp_dir)?;

        // The last point at which the snapshot may be abandoned.
        stasis_failpoint::hit("writer.before_rename");
        self.progress.enter_commit()?;
        self.progress.phase("putting the snapshot in place", 0);
        let replaced_existing = self.swap_into_place()?;
        let stats = CommitStats {
            dir: self.final_dir.clone(),
            manifest_bytes: text.len() as u64,
            state_bytes: self.state_len,
            memory_file_size: layout.file_size,
            replaced_existing,
            sync_time,
            elapsed: start.elapsed(),
        };
        tracing::info!(dir = %self.final_dir.display(), ?stats, "snapshot committed");
        Ok(stats)
    }

    /// The atomic replacement step of `commit`. Returns whether an old
    /// snapshot was replaced.
    fn swap_into_place(&mut self) -> Result<bool> {
        let final_dir = self.final_dir.clone();
        let tmp = self.tmp_dir.clone();
        let rename_ctx =
            |a: &Path, b: &Path| format!("renaming {} to {}", a.display(), b.display());
        match check_target(&final_dir)? {
            Target::Missing => {
                fs::rename(&tmp, &final_dir).map_err(io_ctx(rename_ctx(&tmp, &final_dir)))?;
                self.done = true;
                fsutil::fsync_dir(&self.parent)?;
                Ok(false)
            }
            Target::Snapshot | Target::EmptyDir => {
                let exchanged = self.exchange
                    && fsutil::rename_exchange(&tmp, &final_dir).map_err(io_ctx(format!(
                        "exchanging {} and {}",
                        tmp.display(),
                        final_dir.display()
                    )))?;
                tracing::debug!(exchanged, "replacing the existing snapshot");
                if exchanged {
                    // The new snapshot is at final_dir; tmp now holds what was
                    // there. If something else took the target's place since
                    // it was checked, swap back rather than delete it.
                    if !matches!(check_target(&tmp), Ok(Target::Snapshot | Target::EmptyDir)) {
                        let _ = fsutil::rename_exchange(&tmp, &final_dir);
                        return Err(Error::RefuseOverwrite { dir: final_dir });
                    }
                    self.done = true;
                    fsutil::fsync_dir(&self.parent)?;
                    remove_old(&tmp);
                } else {
                    // No RENAME_EXCHANGE here: move the old one aside first.
                    let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
                    let old = sibling(&self.parent, &self.name, "old", n);
                    fs::rename(&final_dir, &old).map_err(io_ctx(rename_ctx(&final_dir, &old)))?;
                    if !matches!(check_target(&old), Ok(Target::Snapshot | Target::EmptyDir)) {
                        // Not what was checked: put it back, refuse.
                        let _ = fs::rename(&old, &final_dir);
                        return Err(Error::RefuseOverwrite { dir: final_dir });
                    }
                    if let Err(e) = fs::rename(&tmp, &final_dir) {
                        // Put the old one back; the new one is deleted on drop.
                        let _ = fs::rename(&old, &final_dir);
                        return Err(io_ctx(rename_ctx(&tmp, &final_dir))(e));
                    }
                    self.done = true;
                    fsutil::fsync_dir(&self.parent)?;
                    remove_old(&old);
                }
                fsutil::fsync_dir(&self.parent)?;
                Ok(true)
            }
        }
    }
}

/// Deletes a replaced snapshot; failure leaves garbage but no damage. The
/// manifest goes first, so that a deletion cut short never leaves a
/// directory that looks like a (damaged) snapshot.
fn remove_old(dir: &Path) {
    let result = match fs::remove_file(dir.join(MANIFEST_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => fs::remove_dir_all(dir),
    };
    if let Err(e) = result {
        tracing::warn!(dir = %dir.display(), error = %e, "could not delete the replaced snapshot");
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = fs::remove_dir_all(&self.tmp_dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.tmp_dir.display(), error = %e,
                        "could not delete an unfinished snapshot");
                }
            }
        }
    }
}

/// Removes leftovers of writers that died (were killed, or the machine
/// crashed) while writing the snapshot at `final_dir`: sibling
/// `.<name>.tmp-<pid>-<n>` and `.<name>.old-<pid>-<n>` directories whose
/// process no longer exists. Returns what it removed.
///
/// A leftover that holds a `manifest.json` is removed only if `final_dir`
/// holds a snapshot: after a crash between the two renames of the fallback
/// replacement (see `docs/FORMAT.md`), `final_dir` is missing and the
/// leftovers are the only complete copies. Leftovers of live processes
/// (e.g. a concurrent writer) are never touched.
pub fn remove_stale_temp_dirs(final_dir: &Path) -> Result<Vec<PathBuf>> {
    let (parent, name) = split_target(final_dir)?;
    let target_is_snapshot = check_target(final_dir).ok() == Some(Target::Snapshot);
    let mut prefix = OsString::from(".");
    prefix.push(&name);
    let prefix = prefix.to_string_lossy().into_owned();
    let mut removed = Vec::new();
    for entry in fs::read_dir(&parent).map_err(io_ctx(format!("listing {}", parent.display())))? {
        let entry = entry.map_err(io_ctx(format!("listing {}", parent.display())))?;
        let fname = entry.file_name();
        let Some(fname) = fname.to_str() else {
            continue;
        };
        let Some(rest) = fname.strip_prefix(&prefix) else {
            continue;
        };
        let Some(rest) = rest
            .strip_prefix(".tmp-")
            .or_else(|| rest.strip_prefix(".old-"))
        else {
            continue;
        };
        let Some((pid, n)) = rest.split_once('-') else {
            continue;
        };
        let (Ok(pid), Ok(_)) = (pid.parse::<i32>(), n.parse::<u64>()) else {
            continue;
        };
        if fsutil::pid_alive(pid) {
            continue;
        }
        let path = entry.path();
        if !target_is_snapshot && fs::symlink_metadata(path.join(MANIFEST_FILE)).is_ok() {
            continue;
        }
        remove_old(&path);
        if fs::symlink_metadata(&path).is_ok() {
            return Err(Error::Io {
                context: format!("removing {}", path.display()),
                source: io::Error::other("directory still exists after removal"),
            });
        }
        tracing::info!(dir = %path.display(), "removed stale snapshot temp dir");
        removed.push(path);
    }
    Ok(removed)
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checks the regions and places them in the file: in order, each at the
/// next multiple of 2 MiB. The chunk list is sized but not filled.
fn plan_layout(regions: &[MemoryRegionSource<'_>]) -> Result<MemoryLayout> {
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
        if r.data.is_empty() || r.len() % PAGE_SIZE != 0 {
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
    })
}

/// One checksum chunk of the file: region bytes, then zero padding.
#[derive(Clone, Debug)]
struct ChunkTask {
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
fn plan_chunks(layout: &MemoryLayout) -> Vec<ChunkTask> {
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

/// Scans one batch page by page: checksums each chunk (zero runs through
/// [`crc::append_zeros`]), and writes each run of non-zero pages with one
/// `pwrite`.
fn copy_batch(
    file: &File,
    path: &Path,
    src: &MemoryRegionSource<'_>,
    placed: &MemoryRegion,
    tasks: &[ChunkTask],
    out: &mut WorkerResult,
) -> Result<()> {
    let page = PAGE_SIZE as usize;
    let data = src.data;
    let flush = |from: usize, to: usize, out: &mut WorkerResult| -> Result<()> {
        let at = placed.file_offset + from as u64;
        file.write_all_at(&data[from..to], at)
            .map_err(|e| Error::Io {
                context: format!("writing {} at offset {at:#x}", path.display()),
                source: e,
            })?;
        out.bytes_written += (to - from) as u64;
        Ok(())
    };
    let mut run: Option<usize> = None;
    for t in tasks {
        let mut crc = 0u32;
        let mut zeros = 0u64;
        let end = t.data_off + t.data_len;
        let mut off = t.data_off;
        while off < end {
            let p = &data[off..off + page];
            if crc::is_zero(p) {
                zeros += PAGE_SIZE;
                if let Some(s) = run.take() {
                    flush(s, off, out)?;
                }
            } else {
                if zeros > 0 {
                    crc = crc::append_zeros(crc, zeros);
                    zeros = 0;
                }
                crc = crc::append(crc, p);
                out.nonzero_pages += 1;
                run.get_or_insert(off);
            }
            off += page;
        }
        out.chunk_crcs
            .push((t.index, crc::append_zeros(crc, zeros + t.pad)));
    }
    if let (Some(s), Some(last)) = (run, tasks.last()) {
        flush(s, last.data_off + last.data_len, out)?;
    }
    Ok(())
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
    fn fallback_replacement_without_rename_exchange() {
        let base =
            std::env::temp_dir().join(format!("stasis-snapshot-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let target = base.join("snap");
        let mut notes = BTreeMap::new();
        for note in ["old", "new"] {
            notes.insert("n".to_string(), note.to_string());
            let mut w = SnapshotWriter::create(&target).unwrap();
            w.exchange = false;
            w.add_raw_section("x", note, 1, false, note.as_bytes())
                .unwrap();
            let stats = w
                .commit(ManifestInput {
                    notes: notes.clone(),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(stats.replaced_existing, note == "new");
        }
        let entries: Vec<_> = fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(entries, vec![OsString::from("snap")]);
        let r = crate::SnapshotReader::open(&target).unwrap();
        assert_eq!(r.body().notes["n"], "new");
        assert_eq!(r.sections()[0].instance, "new");
        fs::remove_dir_all(&base).unwrap();
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
}
