//! Writing a snapshot: crash-safe, with a fast sparse memory copy.
//!
//! Everything is written into a temporary sibling directory
//! `.<name>.tmp-<pid>-<n>`; [`SnapshotWriter::commit`] writes the manifest
//! last, fsyncs, and then atomically puts the directory in place (see
//! `docs/FORMAT.md`, "Crash-safe writing").

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::chain::SnapshotChain;
use crate::error::{io_ctx, Error, Result};
use crate::fsutil;
use crate::manifest::{
    encode_manifest, CpuInfo, ManifestBody, MemoryLayout, PageMapRef, ParentRef, Producer,
    SectionEntry,
};
use crate::memory_image::{plan_layout, MemoryImage, MemoryRegionSource, MemoryWriteStats};
use crate::page_map::PageMap;
use crate::progress::Progress;
use crate::section::{check_key, encode_section, SectionState};
use crate::{MANIFEST_FILE, MEMORY_FILE, PAGE_MAP_FILE, SECTION_ALIGN, STATE_FILE};

/// The manifest fields the writer cannot know by itself.
#[derive(Clone, Debug, Default)]
pub struct ManifestInput {
    /// Creation time; `None` means now.
    pub created_unix_ms: Option<u64>,
    /// The VMM's configuration of the VM, stored opaquely.
    pub vm_config: serde_json::Value,
    /// The CPU and the guest's CPUID.
    pub cpu: CpuInfo,
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
    /// `begin_memory` was called.
    memory_begun: bool,
    /// A diff snapshot's parent chain and how the manifest names it.
    diff_parent: Option<(Arc<SnapshotChain>, ParentRef)>,
    /// A diff snapshot's page map, once memory is written.
    page_map: Option<PageMap>,
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
            memory_begun: false,
            diff_parent: None,
            page_map: None,
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
    /// as holes, and computes the chunk checksums, on up to
    /// [`set_threads`](Self::set_threads) threads. Call at most once.
    ///
    /// Regions are laid out in the order given, each at a file offset that
    /// is a multiple of 2 MiB. Sizes and guest addresses must be multiples
    /// of 4 KiB and regions must not overlap in guest physical memory.
    ///
    /// The region bytes are only read during this call; once it returns the
    /// guest may run again. Durability (fsync) happens in
    /// [`commit`](Self::commit).
    pub fn write_memory(&mut self, regions: &[MemoryRegionSource<'_>]) -> Result<MemoryWriteStats> {
        let start = Instant::now();
        let image = self.begin_memory(regions)?;
        let batches = image.batches();
        let threads = self.threads.min(batches.len()).max(1);
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let worker = || loop {
            if abort.load(Ordering::Relaxed) {
                break;
            }
            let b = next.fetch_add(1, Ordering::Relaxed);
            let Some(batch) = batches.get(b) else { break };
            stasis_failpoint::hit("writer.memory_batch");
            let copied = self
                .progress
                .check()
                .and_then(|()| image.copy_chunks(regions, batch.clone()));
            if let Err(e) = copied {
                abort.store(true, Ordering::Relaxed);
                first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                break;
            }
        };
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(worker);
            }
            worker();
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            self.failed = Some(e.to_string());
            return Err(e);
        }
        let mut stats = self.finish_memory(image, start)?;
        stats.threads = threads;
        Ok(stats)
    }

    /// Puts a hard link to `src` into the snapshot as `name` (a plain file
    /// name other than the snapshot's own files), e.g. a disk clone kept
    /// when a snapshot is rewritten. `src` must be on the same filesystem.
    pub fn link_file(&mut self, name: &str, src: &Path) -> Result<()> {
        if name.is_empty()
            || name.starts_with('.')
            || name.contains('/')
            || [MANIFEST_FILE, MEMORY_FILE, STATE_FILE, PAGE_MAP_FILE].contains(&name)
        {
            return Err(Error::Usage(format!(
                "{name:?} cannot be added to a snapshot"
            )));
        }
        let dst = self.tmp_dir.join(name);
        fs::hard_link(src, &dst).map_err(io_ctx(format!(
            "linking {} into {}",
            src.display(),
            self.tmp_dir.display()
        )))
    }

    /// Makes this a diff snapshot of `chain` (its newest snapshot is the
    /// parent), named in the manifest as `path` (relative to this
    /// snapshot's directory, or absolute). Call before the memory is
    /// written: pages equal to the parent's are then not stored.
    pub fn set_parent(&mut self, chain: Arc<SnapshotChain>, path: &str) -> Result<()> {
        if self.memory.is_some() || self.memory_begun || self.prepared.is_some() {
            return Err(Error::Usage(
                "set_parent after the memory image exists".to_string(),
            ));
        }
        let newest = chain.newest();
        let Some(id) = newest.body().snapshot_id.clone() else {
            return Err(Error::Parent {
                child: self.final_dir.clone(),
                message: format!(
                    "{} has no snapshot id (written by an older stasis); take a full snapshot to start a chain",
                    newest.dir().display()
                ),
            });
        };
        let link = ParentRef {
            snapshot_id: id,
            body_crc32c: format!("{:08x}", newest.manifest().body_crc32c),
            path: path.to_string(),
        };
        self.diff_parent = Some((chain, link));
        Ok(())
    }

    /// Starts the memory image for `regions` (laid out as
    /// [`write_memory`](Self::write_memory) describes): chunks are then
    /// copied with [`MemoryImage::copy_chunks`], in any order and from any
    /// thread, and the image is handed back with
    /// [`finish_memory`](Self::finish_memory). Call at most once.
    pub fn begin_memory(&mut self, regions: &[MemoryRegionSource<'_>]) -> Result<Arc<MemoryImage>> {
        if self.memory.is_some() || self.memory_begun {
            return Err(Error::Usage(
                "the memory image was started twice".to_string(),
            ));
        }
        let layout = plan_layout(regions)?;
        let file = match self.prepared.take() {
            Some((file, size)) if size == layout.file_size => file,
            Some((_, size)) => {
                return Err(Error::Usage(format!(
                    "the regions need a {}-byte image but prepare_memory made {size}",
                    layout.file_size
                )))
            }
            None => self.create_memory_file(layout.file_size)?,
        };
        let chain = match &self.diff_parent {
            None => None,
            Some((chain, _)) => {
                let theirs = chain.newest().regions();
                let same = crate::chain::same_layout(theirs, &layout.regions);
                if !same {
                    return Err(Error::Parent {
                        child: self.final_dir.clone(),
                        message: format!(
                            "{} has another memory layout (a diff needs the same regions)",
                            chain.newest().dir().display()
                        ),
                    });
                }
                Some(chain.clone())
            }
        };
        self.memory_begun = true;
        self.progress.phase(
            "copying memory",
            regions.iter().map(MemoryRegionSource::len).sum(),
        );
        let path = self.tmp_dir.join(MEMORY_FILE);
        Ok(Arc::new(MemoryImage::new(
            file,
            path,
            layout,
            self.progress.clone(),
            chain,
        )))
    }

    /// Ends the memory image begun with [`begin_memory`](Self::begin_memory):
    /// every chunk must have been copied and no other thread may still
    /// hold `image`. `started` is when the copy began (for the figures).
    pub fn finish_memory(
        &mut self,
        image: Arc<MemoryImage>,
        started: Instant,
    ) -> Result<MemoryWriteStats> {
        let finished = Arc::try_unwrap(image)
            .map_err(|_| Error::Usage("the memory image is still in use".to_string()))
            .and_then(MemoryImage::finish);
        let (file, layout, written, page_map) = match finished {
            Ok(v) => v,
            Err(e) => {
                self.failed = Some(e.to_string());
                return Err(e);
            }
        };
        let stats =
            MemoryImage::stats(&layout, layout.regions.len(), written, 1, started.elapsed());
        tracing::debug!(?stats, "memory image written");
        self.memory = Some((file, layout));
        self.page_map = page_map;
        Ok(stats)
    }

    /// Records that the memory copy failed half way: the snapshot can no
    /// longer be committed (its temporary directory goes on drop).
    pub fn fail(&mut self, why: &str) {
        self.failed.get_or_insert_with(|| why.to_string());
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
        if self.memory.is_some() || self.prepared.is_some() || self.memory_begun {
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
        let mut layout = layout.clone();
        // A diff's page map: written and made durable with the data.
        let parent = match (&self.diff_parent, &self.page_map) {
            (Some((_, link)), Some(map)) => {
                let path = self.tmp_dir.join(PAGE_MAP_FILE);
                let bytes = map.as_bytes();
                fs::write(&path, bytes)
                    .and_then(|()| File::open(&path)?.sync_all())
                    .map_err(io_ctx(format!("writing {}", path.display())))?;
                layout.page_map = Some(PageMapRef {
                    file: PAGE_MAP_FILE.to_string(),
                    size: bytes.len() as u64,
                    crc32c: crc32c::crc32c(bytes),
                });
                Some(link.clone())
            }
            (Some(_), None) => {
                return Err(Error::Usage(
                    "a diff snapshot needs its memory written".to_string(),
                ))
            }
            _ => None,
        };
        let sync_time = sync_start.elapsed();

        let body = ManifestBody {
            producer: Producer::this(),
            created_unix_ms: input.created_unix_ms.unwrap_or_else(now_unix_ms),
            vm_config: input.vm_config,
            cpu: input.cpu,
            memory: layout.clone(),
            sections: self.sections.clone(),
            state_file: STATE_FILE.to_string(),
            state_size: self.state_len,
            snapshot_id: Some(new_snapshot_id()),
            parent,
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

/// 128 random bits as 32 hex digits (`getrandom`; the clock and the
/// process id if that fails, which only makes ids guessable, not shared).
fn new_snapshot_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl crate::section::SectionSink for SnapshotWriter {
    fn add_raw_section(
        &mut self,
        name: &str,
        instance: &str,
        version: u32,
        optional: bool,
        bytes: &[u8],
    ) -> Result<()> {
        SnapshotWriter::add_raw_section(self, name, instance, version, optional, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
