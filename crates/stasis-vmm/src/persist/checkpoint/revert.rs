//! Bringing disks back to a checkpoint (before a restore starts the VM
//! from its state), and deleting checkpoints.
//!
//! Going back or forward never destroys a checkpoint: a qcow2 image's
//! active state becomes a copy-on-write view of the internal snapshot
//! (the discarded active state was nobody's checkpoint); an external
//! checkpoint's frozen image gets a new overlay (the old overlays stay);
//! a raw image is replaced by a new clone of the checkpoint's clone.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use stasis_disk::qcow2;

use super::tree::CheckpointTree;
use super::{overlay_path, DiskKeep};
use crate::devices::virtio::DiskCheckpointOp;
use crate::vm::VmControl;

/// The disks as a restore must configure them after [`prepare_disks`].
#[derive(Debug, Clone, Default)]
pub struct PreparedDisks {
    /// Disk id and the image to use.
    pub disk_paths: Vec<(String, PathBuf)>,
    /// Disk id and that image's format.
    pub disk_formats: Vec<(String, stasis_disk::DiskFormat)>,
}

/// Fails if a running VM holds the image (its `flock`).
fn check_unused(path: &Path) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on an fd we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "{} is in use by a running VM (roll a running VM back with `stasis rollback`)",
            path.display()
        ));
    }
    Ok(())
}

/// Brings every disk of checkpoint `name` in `store` back to it, and
/// makes it the store's current checkpoint. For a VM that is not running.
pub fn prepare_disks(store: &Path, name: &str) -> Result<PreparedDisks, String> {
    let mut tree = CheckpointTree::load(store)?.ok_or_else(|| {
        format!(
            "{} is not a checkpoint store (no tree.json)",
            store.display()
        )
    })?;
    let node = tree.require(name)?.clone();
    let dir = store.join(name);
    let mut out = PreparedDisks::default();
    for d in &node.disks {
        let err = |m: String| format!("disk '{}' of checkpoint '{name}': {m}", d.id);
        match d.kind {
            DiskKeep::Qcow2Internal => {
                check_unused(&d.image).map_err(err)?;
                let mut img = qcow2::open_image(&d.image, true).map_err(|e| err(e.to_string()))?;
                qcow2::snapshots::apply(&mut img, name).map_err(|e| err(e.to_string()))?;
                out.disk_paths.push((d.id.clone(), d.image.clone()));
            }
            DiskKeep::External => {
                let overlay = overlay_path(&d.image, name);
                let size = stasis_disk::virtual_size(&d.image, d.format)
                    .map_err(|e| err(format!("{}: {e}", d.image.display())))?;
                qcow2::create_overlay(&overlay, &d.image, d.format, size)
                    .map_err(|e| err(e.to_string()))?;
                out.disk_paths.push((d.id.clone(), overlay));
                out.disk_formats
                    .push((d.id.clone(), stasis_disk::DiskFormat::Qcow2));
            }
            DiskKeep::Reflink => {
                check_unused(&d.image).or_else(|e| {
                    if d.image.exists() {
                        Err(err(e))
                    } else {
                        Ok(())
                    }
                })?;
                let clone = dir.join(d.clone.as_deref().unwrap_or_default());
                stasis_disk::reflink::replace_with_clone(&clone, &d.image)
                    .map_err(|e| err(format!("cannot put back {}: {e}", clone.display())))?;
                out.disk_paths.push((d.id.clone(), d.image.clone()));
            }
        }
    }
    tree.current = Some(name.to_string());
    tree.save(store)?;
    Ok(out)
}

/// What [`delete`] did.
#[derive(Debug, Clone, Default)]
pub struct Deleted {
    /// Frozen images kept because overlays still read them.
    pub kept_images: Vec<PathBuf>,
}

/// Deletes checkpoint `name` from `store`: its entry (its children now
/// descend from its parent), its internal snapshots (through `running`'s
/// devices when the VM runs on the image), its directory. The index is
/// updated first, so a crash leaves at worst unlisted leftovers (internal
/// snapshots that `stasis checkpoints --disk` shows as disk-only).
pub fn delete(store: &Path, name: &str, running: Option<&VmControl>) -> Result<Deleted, String> {
    let mut tree = CheckpointTree::load(store)?.ok_or_else(|| {
        format!(
            "{} is not a checkpoint store (no tree.json)",
            store.display()
        )
    })?;
    let node = tree.require(name)?.clone();
    for c in tree.checkpoints.iter_mut() {
        if c.parent.as_deref() == Some(name) {
            c.parent = node.parent.clone();
        }
    }
    if tree.current.as_deref() == Some(name) {
        tree.current = node.parent.clone();
    }
    tree.checkpoints.retain(|c| c.name != name);
    tree.save(store)?;
    stasis_failpoint::hit("checkpoint.delete");
    let mut out = Deleted::default();
    let active: Vec<_> = running.map(|c| c.disk_images()).unwrap_or_default();
    for d in &node.disks {
        match d.kind {
            DiskKeep::Qcow2Internal => {
                let same = |p: &Path| {
                    std::fs::canonicalize(p).ok() == std::fs::canonicalize(&d.image).ok()
                };
                let result = match (running, active.iter().find(|a| same(&a.path))) {
                    (Some(control), Some(a)) => control.checkpoint_disk(
                        &a.id,
                        &DiskCheckpointOp::DeleteInternal(name.to_string()),
                    ),
                    _ => qcow2::open_image(&d.image, true)
                        .and_then(|mut img| qcow2::snapshots::delete(&mut img, name)),
                };
                if let Err(e) = result {
                    return Err(format!(
                        "checkpoint '{name}' is no longer listed, but disk '{}': cannot delete its internal snapshot in {}: {e}",
                        d.id,
                        d.image.display()
                    ));
                }
            }
            DiskKeep::External => out.kept_images.push(d.image.clone()),
            DiskKeep::Reflink => {}
        }
    }
    let dir = store.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| format!("cannot remove {}: {e}", dir.display()))?;
    }
    Ok(out)
}
