//! The VM's disks as they are now: checkpoints move a disk onto a new
//! overlay, so the configuration's paths are where each disk started and
//! these calls ask the devices.

use stasis_config::VmConfig;

use super::VmControl;
use crate::devices::virtio::{DiskCheckpointOp, DiskImage};

impl VmControl {
    /// Every disk's image as it is now, in slot order.
    pub fn disk_images(&self) -> Vec<DiskImage> {
        self.shared
            .virtio
            .iter()
            .filter_map(|d| d.transport.lock().expect("virtio lock").disk_image())
            .collect()
    }

    /// The configuration with each disk's current image and format.
    pub fn current_config(&self) -> VmConfig {
        let mut cfg = self.description.config.clone();
        for img in self.disk_images() {
            if let Some(d) = cfg.disk.iter_mut().find(|d| d.id == img.id) {
                d.path = img.path;
                d.format = Some(img.format);
            }
        }
        cfg
    }

    /// Runs a checkpoint's operation on disk `id`. Only while paused (no
    /// request in flight).
    pub fn checkpoint_disk(&self, id: &str, op: &DiskCheckpointOp) -> std::io::Result<()> {
        for d in &self.shared.virtio {
            let mut t = d.transport.lock().expect("virtio lock");
            if t.disk_image().is_some_and(|img| img.id == id) {
                return t.checkpoint_disk(op).unwrap_or_else(|| {
                    Err(std::io::Error::other(format!(
                        "device '{id}' is not a disk"
                    )))
                });
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("the VM has no disk '{id}'"),
        ))
    }

    /// Writes out the cached metadata of every qcow2 disk (raw images
    /// have none). Only while paused.
    pub fn flush_qcow2_metadata(&self) -> std::io::Result<()> {
        for img in self.disk_images() {
            if img.format == stasis_disk::DiskFormat::Qcow2 && !img.readonly {
                self.checkpoint_disk(&img.id, &DiskCheckpointOp::Flush)?;
            }
        }
        Ok(())
    }

    /// Flushes and closes every disk image and releases its lock: the VM
    /// has ended, and whatever still holds this control (a late API
    /// connection) can no longer touch the images.
    pub fn close_disks(&self) {
        for d in &self.shared.virtio {
            let mut t = d.transport.lock().expect("virtio lock");
            if let Some(Err(e)) = t.checkpoint_disk(&DiskCheckpointOp::Close) {
                tracing::warn!("cannot flush a disk image as the VM ends: {e}");
            }
        }
    }
}
