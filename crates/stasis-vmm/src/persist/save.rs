//! Taking a snapshot of a running VM.
//!
//! Two modes. **Background** (the default for a running VM): the guest is
//! paused only while its vCPU and device state are read and its RAM is
//! write-protected; memory is copied while it runs again, a page the guest
//! is about to change first (see [`super::background`]). **Stop-copy**
//! (`--stop`, a paused VM, RAM that cannot be write-protected, or asked
//! for): the guest stays paused while its memory is copied into the page
//! cache. In both, fsync, the manifest and the atomic rename happen after
//! the guest runs again. The caller gets success only once the
//! snapshot is durable, and an older snapshot at the same path survives
//! any failure (see the format crate's crash-safe commit).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stasis_snapshot::{
    CpuInfo, CpuidEntry, ManifestInput, MemoryRegionSource, Progress, SnapshotWriter,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::background::{self, BackgroundStats, WriteProtection};
use super::disks::{self, DiskMode, DiskSaveError, PausedDisks, WritableDisk};
use crate::vm::{CapturedState, RunState, VmControl, VmDescription, VmError};

/// How guest memory is copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotMode {
    /// Background where the VM allows it (running, anonymous RAM, a
    /// kernel with userfaultfd write-protect), else stop-copy, saying why.
    #[default]
    Auto,
    /// Copy-on-write while the guest runs; refused where not possible.
    Background,
    /// The guest stays paused while memory is copied.
    StopCopy,
}

impl std::str::FromStr for SnapshotMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "background" => Ok(Self::Background),
            "stop-copy" => Ok(Self::StopCopy),
            _ => Err(format!(
                "unknown snapshot mode '{s}' (expected background, stop-copy or auto)"
            )),
        }
    }
}

/// What the caller asks of a snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// End the VM once the snapshot is durable (suspend). Implies
    /// stop-copy: the guest never runs again here.
    pub stop: bool,
    /// How memory is copied.
    pub mode: SnapshotMode,
    /// What a live snapshot does with writable disks (a snapshot that ends
    /// the VM leaves them in place).
    pub disk_mode: DiskMode,
    /// Take a diff snapshot against this one (a full snapshot or the
    /// newest of a chain): only pages that differ from it are stored.
    pub parent: Option<PathBuf>,
    /// Keep the disks as checkpoint `spec` asks (instead of `disk_mode`).
    pub checkpoint: Option<super::checkpoint::CheckpointSpec>,
    /// Where to report phases and bytes, and to look for a cancel request.
    /// A cancelled snapshot stops at its next safe point (before the
    /// pause, between memory batches, before the disks are flushed, before
    /// the rename), resumes the guest, and leaves the target path as it was.
    pub progress: Option<Arc<Progress>>,
}

/// Figures about a snapshot that was taken.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotReport {
    /// Where it is.
    pub path: PathBuf,
    /// How long the guest was paused (from the pause request, quiescing
    /// included), in ms.
    pub pause_ms: f64,
    /// How long quiescing took (request to every vCPU, device thread and
    /// host input at its safe point), in ms.
    pub quiesce_ms: f64,
    /// From the request to a durable snapshot, in ms.
    pub total_ms: f64,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Bytes of guest memory written (zero pages are holes).
    pub memory_written_bytes: u64,
    /// Size of the state sections.
    pub state_bytes: u64,
    /// Guest memory copied per second while paused, MB/s.
    pub copy_mb_per_s: f64,
    /// Time spent making the files durable, in ms.
    pub sync_ms: f64,
    /// Whether an older snapshot at the same path was replaced.
    pub replaced_existing: bool,
    /// Whether the VM was stopped afterwards.
    pub stopped: bool,
    /// How memory was copied: `background` or `stop-copy`.
    pub mode: &'static str,
    /// Why a snapshot that could have been taken in the background was
    /// not (absent when the mode is what was asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode_note: Option<String>,
    /// Background: time to write-protect guest RAM inside the pause, in ms.
    pub protect_ms: f64,
    /// Background: from the resume to the last byte of memory copied, ms.
    pub background_copy_ms: f64,
    /// Background: guest bytes copied ahead of their turn because the guest
    /// or a device was about to write them.
    pub early_copied_bytes: u64,
    /// Background: write-protect faults served.
    pub write_faults: u64,
    /// Time spent on the disks inside the pause (clones, copies), in ms.
    pub disk_ms: f64,
    /// Bytes of disk images copied inside the pause (`--disk-mode=copy`).
    pub disk_copied_bytes: u64,
    /// How each writable disk was saved.
    pub disks: Vec<SavedDisk>,
    /// A diff snapshot's parent, as the manifest names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// A checkpoint: how each writable disk is kept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checkpoint_disks: Vec<super::checkpoint::CheckpointDisk>,
}

/// How one writable disk was saved with a snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SavedDisk {
    /// The disk's id.
    pub id: String,
    /// `clone`, `copy`, `in-place` or `skip`.
    pub saved: &'static str,
    /// The image in the snapshot directory (clone, copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// Ways taking a snapshot can fail. The VM keeps running in every case
/// (unless it was paused before, then it stays paused).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM could not be paused or its state read.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Writing the snapshot failed; nothing at the target path changed.
    #[error(transparent)]
    Format(#[from] stasis_snapshot::Error),
    /// A disk image could not be made durable.
    #[error("cannot flush a disk image: {0}")]
    DiskSync(String),
    /// The configuration could not be recorded.
    #[error("cannot record the VM configuration: {0}")]
    Config(String),
    /// A background snapshot was asked for and is not possible.
    #[error("cannot take a background snapshot: {0}")]
    Background(String),
    /// A disk cannot be saved the way asked for (checked before the
    /// pause); the error says what to choose instead.
    #[error("cannot save {0}")]
    DiskRefused(DiskSaveError),
    /// Saving a disk failed (inside the pause or after it).
    #[error("cannot save {0}")]
    DiskSave(DiskSaveError),
    /// The VM was restored in the background and its memory could not be
    /// filled.
    #[error("guest memory is not all there: {0}")]
    MemoryFill(String),
}

impl SnapshotError {
    /// Whether the snapshot stopped because it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            SnapshotError::Format(stasis_snapshot::Error::Cancelled)
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The CPU description recorded in the manifest: vendor, brand string,
/// the CPUID the guest saw (vCPU 0's) and its CPU model.
pub fn cpu_info(description: &VmDescription, state: &CapturedState) -> CpuInfo {
    let cpuid: Vec<CpuidEntry> = state.vcpus[0].cpuid.clone();
    CpuInfo {
        vendor: description.cpu_vendor.clone(),
        model: crate::cpu::cpuid::host_brand(&cpuid),
        cpuid,
        guest: Some(description.cpu.clone()),
    }
}

/// Opens the parent chain of a diff snapshot to be written at `target`,
/// and how the child's manifest names it: `../NAME` for a sibling
/// directory (the pair can be moved together), else its absolute path.
/// Refuses a chain that `target` is part of (writing it would replace a
/// snapshot the diff depends on).
fn open_parent(
    parent: &Path,
    target: &Path,
) -> Result<(stasis_snapshot::SnapshotChain, String), SnapshotError> {
    let chain = stasis_snapshot::SnapshotChain::open(parent)?;
    let target_abs = std::path::absolute(target).unwrap_or_else(|_| target.to_path_buf());
    let target_canon = match (target_abs.parent(), target_abs.file_name()) {
        (Some(p), Some(n)) => std::fs::canonicalize(p)
            .map(|p| p.join(n))
            .unwrap_or(target_abs.clone()),
        _ => target_abs.clone(),
    };
    for m in chain.members() {
        if std::fs::canonicalize(m.dir()).ok().as_deref() == Some(target_canon.as_path()) {
            return Err(SnapshotError::Format(stasis_snapshot::Error::Parent {
                child: target.to_path_buf(),
                message: format!(
                    "chain includes {} itself: a diff cannot replace a snapshot it depends on",
                    m.dir().display()
                ),
            }));
        }
    }
    let parent_canon = std::fs::canonicalize(parent).map_err(|e| {
        SnapshotError::Format(stasis_snapshot::Error::Io {
            context: format!("resolving {}", parent.display()),
            source: e,
        })
    })?;
    let recorded = match (parent_canon.parent(), parent_canon.file_name()) {
        (Some(pp), Some(name)) if Some(pp) == target_canon.parent() => {
            format!("../{}", name.to_string_lossy())
        }
        _ => parent_canon.display().to_string(),
    };
    Ok((chain, recorded))
}

/// How this snapshot copies memory, decided before the pause.
enum Plan {
    StopCopy { note: Option<String> },
    Background(WriteProtection),
}

/// Chooses the mode: background when asked for or by default where the VM
/// allows it; RAM is registered for write protection here, before the
/// pause, because that is the step that can fail.
fn plan(control: &VmControl, opts: &SnapshotOptions, paused: bool) -> Result<Plan, SnapshotError> {
    let why_not = if opts.mode == SnapshotMode::StopCopy {
        return Ok(Plan::StopCopy { note: None });
    } else if opts.stop {
        Some("the VM stops after the snapshot (suspend), so it is not resumed".to_string())
    } else if paused {
        Some("the VM is paused".to_string())
    } else {
        background::unavailable_reason(control.memory())
    };
    let why_not = match why_not {
        Some(w) => w,
        None => match WriteProtection::register(control.memory()) {
            Ok(wp) => return Ok(Plan::Background(wp)),
            Err(e) => format!("cannot register guest RAM with userfaultfd: {e}"),
        },
    };
    if opts.mode == SnapshotMode::Background {
        return Err(SnapshotError::Background(why_not));
    }
    tracing::info!("snapshot copies memory with the guest paused: {why_not}");
    Ok(Plan::StopCopy {
        note: (!opts.stop && !paused).then_some(why_not),
    })
}

/// Snapshots the VM behind `control` into `dir`.
pub fn snapshot(
    control: &VmControl,
    dir: &Path,
    opts: &SnapshotOptions,
) -> Result<SnapshotReport, SnapshotError> {
    let mut kept = Vec::new();
    let result = snapshot_keeping(control, dir, opts, &mut kept);
    // A checkpoint that kept its disks and failed later: the internal
    // snapshots it took (and only those) are removed again.
    if let (Err(_), Some(spec)) = (&result, &opts.checkpoint) {
        super::checkpoint::undo(control, &kept, &spec.name);
    }
    result
}

/// [`snapshot`]; `kept` receives how a checkpoint kept the disks once it
/// has.
fn snapshot_keeping(
    control: &VmControl,
    dir: &Path,
    opts: &SnapshotOptions,
    kept: &mut Vec<super::checkpoint::CheckpointDisk>,
) -> Result<SnapshotReport, SnapshotError> {
    let started = Instant::now();
    let progress = opts.progress.clone().unwrap_or_default();
    // Temporary directories of snapshots whose writer was killed are
    // removed first (only those of dead processes; never the only copy).
    match stasis_snapshot::remove_stale_temp_dirs(dir) {
        Ok(removed) => {
            for d in removed {
                tracing::info!("removed {} left by an interrupted snapshot", d.display());
            }
        }
        Err(e) => tracing::warn!("cannot clean up after interrupted snapshots: {e}"),
    }
    // A VM restored in the background: its memory is registered with the
    // restore's userfaultfd until it is all there (a fraction of a second
    // per GiB); the snapshot reads or protects it after that.
    control
        .wait_memory_resident()
        .map_err(SnapshotError::MemoryFill)?;
    // No pause, resume or other snapshot may interleave with this one: the
    // guest must not run between reading its state and protecting or
    // copying its memory.
    let op = control.exclusive("snapshot")?;
    let was_paused = control.state() == RunState::Paused;
    let plan = plan(control, opts, was_paused)?;
    // Creating the writer first checks the target before the guest pauses;
    // the memory image is created (and for stop-copy cached) while the
    // guest still runs.
    let mut writer = SnapshotWriter::create(dir)?;
    writer.set_progress(progress.clone());
    let mut parent_recorded = None;
    if let Some(parent) = &opts.parent {
        let (chain, recorded) = open_parent(parent, dir)?;
        writer.set_parent(Arc::new(chain), &recorded)?;
        parent_recorded = Some(recorded);
    }
    let images: Vec<_> = control
        .disk_images()
        .into_iter()
        .filter(|d| !d.readonly)
        .collect();
    let writable: Vec<WritableDisk> = images
        .iter()
        .map(|d| WritableDisk {
            id: d.id.clone(),
            path: d.path.clone(),
        })
        .collect();
    if let Some(spec) = &opts.checkpoint {
        super::checkpoint::preflight(&images, spec, writer.temp_dir())
            .map_err(SnapshotError::DiskRefused)?;
    } else if !opts.stop {
        disks::preflight(&writable, opts.disk_mode, writer.temp_dir())
            .map_err(SnapshotError::DiskRefused)?;
    }
    let background_image = match &plan {
        Plan::StopCopy { .. } => {
            with_regions(control, |regions| writer.prepare_memory(regions))?;
            None
        }
        Plan::Background(_) => Some(with_regions(control, |regions| {
            writer.begin_memory(regions)
        })?),
    };
    progress.check()?;
    let description = control.description();
    let vm_config = serde_json::to_value(control.current_config())
        .map_err(|e| SnapshotError::Config(e.to_string()))?;
    // The guest stops being able to run at the request: the pause is
    // counted from here.
    let paused_at = Instant::now();
    progress.phase("pausing the guest", 0);
    let quiesce = control.pause_held(&op)?;
    let resume = |control: &VmControl| {
        if !was_paused {
            let _ = control.resume_held(&op);
        }
    };
    let mut copy = MemoryCopy::default();
    let mut paused_disks = PausedDisks::default();
    let mut checkpoint_disks = Vec::new();
    let mut save_disks = |writer: &SnapshotWriter| -> Result<(), SnapshotError> {
        if let Some(spec) = &opts.checkpoint {
            progress.phase("keeping the disks for the checkpoint", 0);
            (paused_disks, checkpoint_disks) =
                super::checkpoint::save_in_pause(control, &images, spec, writer.temp_dir())
                    .map_err(SnapshotError::DiskSave)?;
            kept.clone_from(&checkpoint_disks);
        } else if !opts.stop && !writable.is_empty() {
            progress.phase("saving the disks", 0);
            // A qcow2 image's metadata may still be in imago's caches:
            // written out before the image is cloned or copied.
            control
                .flush_qcow2_metadata()
                .map_err(|e| SnapshotError::DiskSync(e.to_string()))?;
            paused_disks = disks::save_in_pause(&writable, opts.disk_mode, writer.temp_dir())
                .map_err(SnapshotError::DiskSave)?;
        }
        Ok(())
    };
    let result = match plan {
        Plan::StopCopy { note } => {
            copy.note = note;
            write_state(control, &mut writer, &progress).and_then(|state| {
                save_disks(&writer)?;
                let stats = with_regions(control, |regions| writer.write_memory(regions))?;
                // The last safe point while the guest is paused.
                progress.check()?;
                copy.stats = Some(stats);
                Ok(state)
            })
        }
        Plan::Background(mut wp) => {
            copy.background = true;
            write_state(control, &mut writer, &progress).and_then(|state| {
                save_disks(&writer)?;
                copy.protect = wp.protect().map_err(|e| {
                    SnapshotError::Background(format!("cannot write-protect guest RAM: {e}"))
                })?;
                copy.wp = Some(wp);
                Ok(state)
            })
        }
    };
    let state = match result {
        Ok(v) => v,
        Err(e) => {
            resume(control);
            return Err(e);
        }
    };
    // The guest may run again: its state is saved, and its memory is in
    // the page cache (stop-copy) or protected until copied (background).
    if !opts.stop {
        resume(control);
    }
    let pause = paused_at.elapsed();
    if let (Some(wp), Some(image)) = (copy.wp.take(), background_image) {
        let copy_start = Instant::now();
        progress.phase(
            "copying memory in the background",
            image.layout().regions.iter().map(|r| r.size).sum(),
        );
        let copied = with_regions(control, |regions| {
            background::copy_in_background(wp, regions, &image, &progress)
        });
        match copied {
            Ok(stats) => copy.background_stats = stats,
            Err(e) => {
                writer.fail(&e.to_string());
                return Err(e.into());
            }
        }
        copy.stats = Some(writer.finish_memory(image, copy_start)?);
    }
    let mem_stats = copy.stats.take().expect("memory copied in either mode");
    // Disk writes the guest completed before the snapshot become durable
    // before the snapshot is (a restored guest must never miss them).
    progress.phase("flushing the disks", 0);
    if let Err(e) = progress
        .check()
        .map_err(SnapshotError::from)
        .and_then(|()| {
            control
                .sync_disks()
                .map_err(|e| SnapshotError::DiskSync(e.to_string()))
        })
    {
        if opts.stop {
            resume(control);
        }
        return Err(e);
    }
    // What each disk is, for a restore to check: the clones' checksums
    // (read now, with the guest running), or the in-place images' identity.
    let records = if opts.stop {
        disks::in_place_records(&writable)
    } else {
        disks::records(&paused_disks)
    };
    let records = match records
        .map_err(SnapshotError::DiskSave)
        .and_then(|records| {
            for r in &records {
                writer.add_section(&r.id, false, r)?;
            }
            Ok(records)
        }) {
        Ok(r) => r,
        Err(e) => {
            if opts.stop {
                resume(control);
            }
            return Err(e);
        }
    };
    let input = ManifestInput {
        created_unix_ms: Some(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        ),
        vm_config,
        cpu: cpu_info(description, &state),
        notes: Default::default(),
    };
    let commit = match writer.commit(input) {
        Ok(c) => c,
        Err(e) => {
            if opts.stop {
                resume(control);
            }
            return Err(e.into());
        }
    };
    if opts.stop {
        // Still paused and still holding the operation: the VM goes from
        // paused straight to stopping.
        control.end(crate::ExitReason::Suspended {
            path: commit.dir.display().to_string(),
        });
    }
    drop(op);
    let bg = copy.background_stats;
    Ok(SnapshotReport {
        path: commit.dir,
        quiesce_ms: quiesce.total_ms,
        pause_ms: ms(if opts.stop {
            paused_at.elapsed()
        } else {
            pause
        }),
        total_ms: ms(started.elapsed()),
        memory_bytes: mem_stats.guest_bytes,
        memory_written_bytes: mem_stats.bytes_written,
        state_bytes: commit.state_bytes,
        copy_mb_per_s: mem_stats.mb_per_s(),
        sync_ms: ms(commit.sync_time),
        replaced_existing: commit.replaced_existing,
        stopped: opts.stop,
        mode: if copy.background {
            "background"
        } else {
            "stop-copy"
        },
        mode_note: copy.note,
        protect_ms: ms(copy.protect),
        background_copy_ms: ms(bg.elapsed),
        early_copied_bytes: bg.early_bytes,
        write_faults: bg.faults,
        disk_ms: ms(paused_disks.elapsed),
        disk_copied_bytes: paused_disks.copied_bytes,
        disks: records
            .iter()
            .map(|r| SavedDisk {
                id: r.id.clone(),
                saved: r.saved.as_str(),
                file: r.file.clone(),
            })
            .collect(),
        checkpoint_disks,
        parent: parent_recorded,
    })
}

/// What the memory copy of one snapshot did.
#[derive(Default)]
struct MemoryCopy {
    background: bool,
    note: Option<String>,
    wp: Option<WriteProtection>,
    protect: Duration,
    background_stats: BackgroundStats,
    stats: Option<stasis_snapshot::MemoryWriteStats>,
}

/// Reads every vCPU and device section and writes it. The VM must be
/// paused.
fn write_state(
    control: &VmControl,
    writer: &mut SnapshotWriter,
    progress: &Progress,
) -> Result<CapturedState, SnapshotError> {
    progress.phase("saving vCPU and device state", 0);
    let state = control.capture()?;
    super::write_sections(&state, writer)?;
    Ok(state)
}

/// Runs `f` with guest memory described as the format crate's regions
/// (`ram0`, `ram1`, ...).
fn with_regions<R>(control: &VmControl, f: impl FnOnce(&[MemoryRegionSource]) -> R) -> R {
    let mem = control.memory();
    let names: Vec<String> = (0..mem.num_regions()).map(|i| format!("ram{i}")).collect();
    let regions: Vec<MemoryRegionSource> = mem
        .iter()
        .zip(&names)
        .map(|(r, name)| {
            // SAFETY: the region stays mapped while `control` (and so the
            // VM) lives. Its bytes are only read while they cannot change:
            // by `write_memory` while the VM is paused (no vCPU runs, device
            // threads are quiesced with the vCPUs), or by the background
            // copy only for chunks still write-protected (a write to them
            // blocks in the kernel until they are copied).
            unsafe {
                MemoryRegionSource::from_raw(name, r.start_addr().0, r.as_ptr(), r.len() as usize)
            }
        })
        .collect();
    f(&regions)
}
