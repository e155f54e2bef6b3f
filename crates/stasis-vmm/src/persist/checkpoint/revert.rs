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

/// The index of `store`, which must have one.
fn load_store(store: &Path) -> Result<CheckpointTree, String> {
    CheckpointTree::load(store)?.ok_or_else(|| {
        format!(
            "{} is not a checkpoint store (no tree.json)",
            store.display()
        )
    })
}

/// Locks the image exclusively (`flock`), failing if a running VM holds
/// it; the lock lasts as long as the returned file.
fn lock_unused(path: &Path) -> Result<File, String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on an fd we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "{} is in use by a running VM (roll a running VM back with `stasis rollback`)",
            path.display()
        ));
    }
    Ok(f)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Checks, without changing anything, that every disk of checkpoint
/// `name` can be brought back: what it needs exists, and no image it
/// would change in place is frozen under an external checkpoint (whose
/// overlays read it: changing it would change that checkpoint).
pub fn check(tree: &CheckpointTree, store: &Path, name: &str) -> Result<(), String> {
    let node = tree.require(name)?;
    for d in &node.disks {
        let err = |m: String| format!("disk '{}' of checkpoint '{name}': {m}", d.id);
        match d.kind {
            DiskKeep::Qcow2Internal | DiskKeep::Reflink => {
                if let Some(frozen) = tree.checkpoints.iter().find(|c| {
                    c.disks
                        .iter()
                        .any(|x| x.kind == DiskKeep::External && same_file(&x.image, &d.image))
                }) {
                    return Err(err(format!(
                        "{} is frozen under external checkpoint '{}', whose overlays read it; bringing it back to '{name}' in place would change '{}' (delete '{}' first, or keep going from it)",
                        d.image.display(),
                        frozen.name,
                        frozen.name,
                        frozen.name
                    )));
                }
                if d.kind == DiskKeep::Qcow2Internal {
                    let list = qcow2::list_snapshots(&d.image).map_err(|e| err(e.to_string()))?;
                    if !list.iter().any(|s| s.name == name) {
                        return Err(err(format!(
                            "{} has no internal snapshot '{name}'",
                            d.image.display()
                        )));
                    }
                } else {
                    let clone = store
                        .join(name)
                        .join(d.clone.as_deref().unwrap_or_default());
                    if !clone.is_file() {
                        return Err(err(format!("its clone {} is missing", clone.display())));
                    }
                }
            }
            DiskKeep::External => {
                if !d.image.is_file() {
                    return Err(err(format!(
                        "its frozen image {} is missing",
                        d.image.display()
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Brings every disk of checkpoint `name` in `store` back to it, and
/// makes it the store's current checkpoint. For a VM that is not running.
/// Every disk is checked (and every image changed in place locked) before
/// any is changed.
pub fn prepare_disks(store: &Path, name: &str) -> Result<PreparedDisks, String> {
    let mut tree = load_store(store)?;
    let node = tree.require(name)?.clone();
    let dir = store.join(name);
    let mut locks = Vec::new();
    for d in &node.disks {
        let err = |m: String| format!("disk '{}' of checkpoint '{name}': {m}", d.id);
        if d.kind != DiskKeep::External && d.image.exists() {
            locks.push(lock_unused(&d.image).map_err(err)?);
        }
        // An image an interrupted operation left dirty is repaired now
        // (it is locked): the checks below read its snapshot table.
        if d.kind == DiskKeep::Qcow2Internal {
            qcow2::open_image(&d.image, true).map_err(|e| err(e.to_string()))?;
        }
    }
    check(&tree, store, name)?;
    let mut out = PreparedDisks::default();
    for d in &node.disks {
        let err = |m: String| format!("disk '{}' of checkpoint '{name}': {m}", d.id);
        match d.kind {
            DiskKeep::Qcow2Internal => {
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
                let clone = dir.join(d.clone.as_deref().unwrap_or_default());
                stasis_disk::reflink::replace_with_clone(&clone, &d.image)
                    .map_err(|e| err(format!("cannot put back {}: {e}", clone.display())))?;
                out.disk_paths.push((d.id.clone(), d.image.clone()));
            }
        }
    }
    tree.current = Some(name.to_string());
    tree.save(store)?;
    drop(locks);
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
    let mut tree = load_store(store)?;
    let node = tree.require(name)?.clone();
    let active: Vec<_> = running.map(|c| c.disk_images()).unwrap_or_default();
    // Images no VM of ours has open are locked for the whole delete: a
    // VM running on one (another name, another store) is not touched.
    let mut locks = Vec::new();
    for d in node
        .disks
        .iter()
        .filter(|d| d.kind == DiskKeep::Qcow2Internal)
    {
        if !active.iter().any(|a| same_file(&a.path, &d.image)) && d.image.exists() {
            locks.push(lock_unused(&d.image).map_err(|m| {
                format!(
                    "checkpoint '{name}' cannot be deleted: disk '{}': {m}",
                    d.id
                )
            })?);
        }
    }
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
    for d in &node.disks {
        match d.kind {
            DiskKeep::Qcow2Internal => {
                let result = match (
                    running,
                    active.iter().find(|a| same_file(&a.path, &d.image)),
                ) {
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
    drop(locks);
    let dir = store.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| format!("cannot remove {}: {e}", dir.display()))?;
    }
    Ok(out)
}
