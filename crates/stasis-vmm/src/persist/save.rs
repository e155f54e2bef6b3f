//! Taking a snapshot of a running VM.
//!
//! The guest is paused only while its state is read and its memory is
//! copied into the page cache; fsync, the manifest and the atomic rename
//! happen after the guest runs again. The caller gets success only once the
//! snapshot is durable, and an older snapshot at the same path survives
//! any failure (see the format crate's crash-safe commit).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stasis_snapshot::{
    CpuInfo, CpuidEntry, ManifestInput, MemoryRegionSource, Progress, SnapshotWriter,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{CMOS, COM1, SINGLETON};
use crate::vm::{CapturedState, RunState, VmControl, VmDescription, VmError};

/// What the caller asks of a snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// End the VM once the snapshot is durable (suspend).
    pub stop: bool,
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

/// Snapshots the VM behind `control` into `dir`.
pub fn snapshot(
    control: &VmControl,
    dir: &Path,
    opts: &SnapshotOptions,
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
    // No pause, resume or other snapshot may interleave with this one: the
    // guest must not run between reading its state and copying its memory.
    let op = control.exclusive("snapshot")?;
    // Creating the writer first checks the target before the guest pauses;
    // the memory image is created and cached while the guest still runs.
    let mut writer = SnapshotWriter::create(dir)?;
    writer.set_progress(progress.clone());
    with_regions(control, |regions| writer.prepare_memory(regions))?;
    progress.check()?;
    let description = control.description();
    let vm_config = serde_json::to_value(&description.config)
        .map_err(|e| SnapshotError::Config(e.to_string()))?;
    let was_paused = control.state() == RunState::Paused;
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
    let result = write_contents(control, &mut writer, &progress);
    let (state, mem_stats) = match result {
        Ok(v) => v,
        Err(e) => {
            resume(control);
            return Err(e);
        }
    };
    // The guest may run again: its memory and state are in the page cache.
    if !opts.stop {
        resume(control);
    }
    let pause = paused_at.elapsed();
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
    let input = ManifestInput {
        created_unix_ms: Some(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        ),
        vm_config,
        cpu: cpu_info(description, &state),
        parent: None,
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
    })
}

/// Writes every section and the memory image while the VM is paused.
fn write_contents(
    control: &VmControl,
    writer: &mut SnapshotWriter,
    progress: &Progress,
) -> Result<(CapturedState, stasis_snapshot::MemoryWriteStats), SnapshotError> {
    progress.phase("saving vCPU and device state", 0);
    let state = control.capture()?;
    for v in &state.vcpus {
        writer.add_section(&v.index.to_string(), false, v)?;
    }
    writer.add_section(SINGLETON, false, &state.irqchip)?;
    writer.add_section(SINGLETON, false, &state.pit)?;
    writer.add_section(SINGLETON, false, &state.clock)?;
    writer.add_section(COM1, false, &state.serial)?;
    writer.add_section(CMOS, false, &state.rtc)?;
    writer.add_section(SINGLETON, true, &state.vmgenid)?;
    for v in &state.virtio {
        v.write_to(writer)?;
    }
    let stats = with_regions(control, |regions| writer.write_memory(regions))?;
    // The last safe point while the guest is paused.
    progress.check()?;
    Ok((state, stats))
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
            // VM) lives. Its bytes are only read by `write_memory`, which
            // runs while the VM is paused: no vCPU runs, and device threads
            // (virtio-net receive) are paused with the vCPUs.
            unsafe {
                MemoryRegionSource::from_raw(name, r.start_addr().0, r.as_ptr(), r.len() as usize)
            }
        })
        .collect();
    f(&regions)
}
