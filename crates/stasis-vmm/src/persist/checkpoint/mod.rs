//! Checkpoints: the VM's state and every writable disk at one paused
//! instant, kept in a store as a tree that can be restored in either
//! direction (to a checkpoint older or newer than the one the VM runs
//! from).
//!
//! A checkpoint is a snapshot (the VM state, in `STORE/NAME/`, taken like
//! any live snapshot, in the background where it can) whose pause also
//! keeps each writable disk:
//!
//! - a qcow2 image gets an internal snapshot named NAME ([`stasis_disk`]
//!   writes it as QEMU's `savevm` would, so `qemu-img snapshot -l` lists
//!   it);
//! - with `external`, every disk (raw or qcow2) is frozen and the VM goes
//!   on writing a new qcow2 overlay beside it whose backing file it is;
//! - a raw image (not external) is reflink-cloned into `STORE/NAME/`
//!   (btrfs, xfs; refused clearly elsewhere).
//!
//! The store's `tree.json` ([`tree`]) lists the checkpoints with their
//! parents and says which one the VM runs from. [`revert`] brings disks
//! back to a checkpoint and deletes checkpoints.

pub mod revert;
pub mod tree;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use stasis_disk::DiskFormat;

use super::disks::{self, DiskSaveError, DiskSaved, PausedDisks, WritableDisk};
use crate::devices::virtio::{DiskCheckpointOp, DiskImage};
use crate::vm::VmControl;

/// What the caller asks of a checkpoint's disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSpec {
    /// The checkpoint's name (also the qcow2 internal snapshots' name).
    pub name: String,
    /// Freeze every disk and continue on new overlays instead of internal
    /// snapshots and clones.
    pub external: bool,
}

/// How a checkpoint keeps one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskKeep {
    /// A qcow2 internal snapshot named after the checkpoint.
    Qcow2Internal,
    /// The image as it was, frozen under a new overlay.
    External,
    /// A reflink clone in the checkpoint's directory.
    Reflink,
}

impl DiskKeep {
    /// The name used in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskKeep::Qcow2Internal => "qcow2-internal",
            DiskKeep::External => "external",
            DiskKeep::Reflink => "reflink",
        }
    }
}

/// One disk of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointDisk {
    /// The disk's id.
    pub id: String,
    /// How it is kept.
    pub kind: DiskKeep,
    /// The image the disk used at the checkpoint: the one holding the
    /// internal snapshot, the frozen image (external), or the image a
    /// restore replaces by the clone (reflink).
    pub image: PathBuf,
    /// That image's format.
    pub format: DiskFormat,
    /// External: the overlay the VM went on writing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<PathBuf>,
    /// Reflink: the clone's file name in the checkpoint's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<String>,
}

/// Checks a checkpoint name: 1-64 bytes of letters, digits, `.`, `_`,
/// `-`, not starting with `.` (it names a directory and qcow2 snapshots).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid checkpoint name '{}': use 1-64 letters, digits, '.', '_' or '-', not starting with '.'",
            name.escape_debug()
        ))
    }
}

/// Where an external checkpoint NAME puts disk `img`'s new overlay: beside
/// the image, `<stem>-<NAME>.qcow2` (stem: the file name up to its first
/// dot), numbered if taken.
pub fn overlay_path(img: &Path, name: &str) -> PathBuf {
    let file = img
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = file.split('.').next().unwrap_or("disk");
    let dir = img.parent().unwrap_or(Path::new("."));
    let mut p = dir.join(format!("{stem}-{name}.qcow2"));
    let mut n = 2;
    while p.exists() {
        p = dir.join(format!("{stem}-{name}-{n}.qcow2"));
        n += 1;
    }
    p
}

fn disk_error(d: &DiskImage, message: String) -> DiskSaveError {
    DiskSaveError {
        id: d.id.clone(),
        path: d.path.display().to_string(),
        message,
    }
}

/// Checks before the pause that every disk can be kept as `spec` asks.
pub fn preflight(
    disks: &[DiskImage],
    spec: &CheckpointSpec,
    tmp_dir: &Path,
) -> Result<(), DiskSaveError> {
    for d in disks {
        if spec.external {
            let dir = d.path.parent().unwrap_or(Path::new("."));
            let probe = dir.join(format!(".stasis-probe-{}", std::process::id()));
            std::fs::File::create(&probe)
                .map_err(|e| disk_error(d, format!("cannot create an overlay beside it: {e}")))?;
            let _ = std::fs::remove_file(&probe);
            continue;
        }
        match d.format {
            DiskFormat::Qcow2 => {
                let list = stasis_disk::qcow2::list_snapshots(&d.path)
                    .map_err(|e| disk_error(d, e.to_string()))?;
                if list.iter().any(|s| s.name == spec.name) {
                    return Err(disk_error(
                        d,
                        format!(
                            "the image already has an internal snapshot named '{}'",
                            spec.name
                        ),
                    ));
                }
            }
            DiskFormat::Raw => {
                let wd = WritableDisk {
                    id: d.id.clone(),
                    path: d.path.clone(),
                };
                disks::preflight(&[wd], disks::DiskMode::Clone, tmp_dir).map_err(|mut e| {
                    e.message = format!(
                        "{} (or take an external checkpoint: --external puts a qcow2 overlay on the raw image)",
                        e.message.split("; use --disk-mode").next().unwrap_or_default()
                    );
                    e
                })?;
            }
        }
    }
    Ok(())
}

/// Keeps every disk for checkpoint `spec`. Call while the VM is paused.
/// On failure, what was done to the disks before is undone where it can
/// be (internal snapshots deleted; a disk already on a new overlay stays
/// there, its data intact).
pub fn save_in_pause(
    control: &VmControl,
    disks: &[DiskImage],
    spec: &CheckpointSpec,
    tmp_dir: &Path,
) -> Result<(PausedDisks, Vec<CheckpointDisk>), DiskSaveError> {
    let start = Instant::now();
    let mut paused = PausedDisks::default();
    let mut kept = Vec::new();
    let result = (|| {
        for d in disks {
            let wd = WritableDisk {
                id: d.id.clone(),
                path: d.path.clone(),
            };
            stasis_failpoint::hit("checkpoint.disk");
            let mut disk = CheckpointDisk {
                id: d.id.clone(),
                kind: DiskKeep::Reflink,
                image: d.path.clone(),
                format: d.format,
                overlay: None,
                clone: None,
            };
            if spec.external {
                let overlay = overlay_path(&d.path, &spec.name);
                control
                    .checkpoint_disk(&d.id, &DiskCheckpointOp::Overlay(overlay.clone()))
                    .map_err(|e| {
                        disk_error(d, format!("cannot move it onto a new overlay: {e}"))
                    })?;
                disk.kind = DiskKeep::External;
                disk.overlay = Some(overlay);
                paused.saved.push((wd, DiskSaved::Checkpoint, None));
            } else if d.format == DiskFormat::Qcow2 {
                control
                    .checkpoint_disk(&d.id, &DiskCheckpointOp::TakeInternal(spec.name.clone()))
                    .map_err(|e| {
                        disk_error(d, format!("cannot take its internal snapshot: {e}"))
                    })?;
                disk.kind = DiskKeep::Qcow2Internal;
                paused.saved.push((wd, DiskSaved::Checkpoint, None));
            } else {
                let mut one = disks::save_in_pause(&[wd], disks::DiskMode::Clone, tmp_dir)?;
                disk.clone = Some(disks::file_name(&d.id));
                paused.saved.append(&mut one.saved);
            }
            kept.push(disk);
        }
        Ok(())
    })();
    if let Err(e) = result {
        undo(control, &kept, &spec.name);
        return Err(e);
    }
    paused.elapsed = start.elapsed();
    Ok((paused, kept))
}

/// Deletes the internal snapshots a failed checkpoint took.
pub fn undo(control: &VmControl, kept: &[CheckpointDisk], name: &str) {
    for k in kept.iter().filter(|k| k.kind == DiskKeep::Qcow2Internal) {
        let op = DiskCheckpointOp::DeleteInternal(name.to_string());
        if let Err(e) = control.checkpoint_disk(&k.id, &op) {
            tracing::warn!(
                "disk '{}': cannot delete the internal snapshot '{name}' of a failed checkpoint: {e}",
                k.id
            );
        }
    }
}

/// What a checkpoint that was taken reports.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointReport {
    /// Its name.
    pub name: String,
    /// The store.
    pub store: PathBuf,
    /// Its parent in the tree.
    pub parent: Option<String>,
    /// How each writable disk is kept.
    pub disks: Vec<CheckpointDisk>,
    /// The snapshot of the VM state.
    pub snapshot: super::save::SnapshotReport,
}

/// Takes checkpoint `spec` of the running VM into `store` (created if
/// needed) and makes it the store's current checkpoint.
pub fn take(
    control: &VmControl,
    store: &Path,
    spec: &CheckpointSpec,
    progress: Option<std::sync::Arc<stasis_snapshot::Progress>>,
) -> Result<CheckpointReport, String> {
    check_name(&spec.name)?;
    std::fs::create_dir_all(store).map_err(|e| {
        format!(
            "cannot create the checkpoint store {}: {e}",
            store.display()
        )
    })?;
    let vm = control.description().config.name.clone();
    let mut tree =
        tree::CheckpointTree::load(store)?.unwrap_or_else(|| tree::CheckpointTree::new(&vm));
    if tree.vm != vm {
        return Err(format!(
            "the checkpoint store {} belongs to VM '{}', not '{vm}'",
            store.display(),
            tree.vm
        ));
    }
    if tree.get(&spec.name).is_some() || store.join(&spec.name).exists() {
        return Err(format!(
            "checkpoint '{}' already exists in {}",
            spec.name,
            store.display()
        ));
    }
    let opts = super::save::SnapshotOptions {
        checkpoint: Some(spec.clone()),
        progress,
        ..Default::default()
    };
    // A failure undoes what this checkpoint did to the disks (see
    // `save::snapshot`), never a snapshot that was there before.
    let report = super::save::snapshot(control, &store.join(&spec.name), &opts)
        .map_err(|e| e.to_string())?;
    let node = tree::CheckpointNode {
        name: spec.name.clone(),
        parent: tree.current.clone(),
        created_unix_ms: tree::now_unix_ms(),
        external: spec.external,
        disks: report.checkpoint_disks.clone(),
        pause_ms: report.pause_ms,
    };
    stasis_failpoint::hit("checkpoint.before_index");
    tree.checkpoints.push(node);
    tree.current = Some(spec.name.clone());
    tree.save(store)?;
    Ok(CheckpointReport {
        name: spec.name.clone(),
        store: store.to_path_buf(),
        parent: tree.get(&spec.name).and_then(|n| n.parent.clone()),
        disks: report.checkpoint_disks.clone(),
        snapshot: report,
    })
}

/// The store a running VM's checkpoints go to by default (see
/// [`tree::default_store`]).
pub fn default_store(control: &VmControl) -> Result<PathBuf, String> {
    let first = control.disk_images().into_iter().find(|d| !d.readonly);
    tree::default_store(
        &control.description().config.name,
        first.as_ref().map(|d| d.path.as_path()),
    )
}
