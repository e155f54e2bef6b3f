//! Disks at the same instant as memory: what a snapshot does with each
//! writable disk image, and the identity a restore checks.
//!
//! A live snapshot's guest goes on writing its disks after the pause, so
//! the image at its path no longer matches the snapshot's memory. Inside
//! the pause each writable image is therefore
//!
//! - **cloned** (`--disk-mode clone`, the default): `FICLONE`, a reflink
//!   copy that shares the image's blocks (btrfs, xfs; constant time, no
//!   data copied), into the snapshot directory as `disk-<id>.img`;
//! - **copied** (`--disk-mode copy`): a full copy, for filesystems without
//!   reflinks, made while the guest is paused (reported as such);
//! - **skipped** (`--disk-mode skip`, unsafe): nothing is kept; the guest
//!   of a restore finds the disk as it is by then.
//!
//! A snapshot that ends the VM (`--stop`) keeps the image where it is (the
//! VM never writes it again) and records its inode, generation and mtime.
//!
//! Each disk gets a `disk-image` section (instance = disk id): how it was
//! saved and an identity: the crc32c of the clone or copy (computed after
//! the guest resumed), or the in-place file's inode, generation and mtime.
//! A restore refuses an image that does not match, naming the disk, and
//! never writes into the snapshot's own clone (`--disk-path ID=` points it
//! at a copy: `cp --reflink=auto SNAP/disk-ID.img NEW`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stasis_snapshot::SectionState;

/// What a live snapshot does with each writable disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskMode {
    /// A reflink clone into the snapshot; refused where the filesystem
    /// cannot.
    #[default]
    Clone,
    /// A full copy while the guest is paused.
    Copy,
    /// Nothing kept (unsafe: memory and disk will not match).
    Skip,
}

impl std::str::FromStr for DiskMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "clone" => Ok(Self::Clone),
            "copy" => Ok(Self::Copy),
            "skip" => Ok(Self::Skip),
            _ => Err(format!(
                "unknown disk mode '{s}' (expected clone, copy or skip)"
            )),
        }
    }
}

/// How one disk was saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskSaved {
    /// A reflink clone in the snapshot directory.
    Clone,
    /// A full copy in the snapshot directory.
    Copy,
    /// Left where it is; the VM ended with the snapshot.
    InPlace,
    /// Not kept.
    Skip,
    /// Kept by a checkpoint (an internal snapshot or a frozen image under
    /// an overlay): restored with `stasis restore --checkpoint`.
    Checkpoint,
}

impl DiskSaved {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskSaved::Clone => "clone",
            DiskSaved::Copy => "copy",
            DiskSaved::InPlace => "in-place",
            DiskSaved::Skip => "skip",
            DiskSaved::Checkpoint => "checkpoint",
        }
    }
}

/// Section `disk-image`, instance = the disk's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImageState {
    /// The disk's id.
    pub id: String,
    /// How it was saved.
    pub saved: DiskSaved,
    /// The image the VM used.
    pub source_path: PathBuf,
    /// Its size at the snapshot.
    pub size: u64,
    /// Clone or copy: its file name in the snapshot directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Clone or copy: crc32c of its whole contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<u32>,
    /// In place: the file's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<FileIdentity>,
}

impl SectionState for DiskImageState {
    const NAME: &'static str = "disk-image";
    const VERSION: u32 = 1;
}

/// Which file, and which version of it: inode, its generation (where the
/// filesystem has one), the last modification time and the size. The
/// device number is kept for information only (it can change across a
/// reboot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// `FS_IOC_GETVERSION` (0 where the filesystem does not say).
    pub generation: u64,
    /// Last modification, ns since the UNIX epoch.
    pub mtime_ns: i64,
    /// Size in bytes.
    pub size: u64,
}

impl FileIdentity {
    /// The identity of the file at `path`.
    pub fn of(path: &Path) -> std::io::Result<FileIdentity> {
        let f = File::open(path)?;
        let m = f.metadata()?;
        let mut generation: libc::c_long = 0;
        // SAFETY: FS_IOC_GETVERSION writes one long into `generation`.
        let ret = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETVERSION, &mut generation) };
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            generation: if ret == 0 { generation as u64 } else { 0 },
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            size: m.len(),
        })
    }
}

/// `_IOR('v', 1, long)`.
const FS_IOC_GETVERSION: libc::c_ulong = 0x8008_7601;

/// A writable disk of the VM.
#[derive(Debug, Clone)]
pub struct WritableDisk {
    /// Its id.
    pub id: String,
    /// Its image.
    pub path: PathBuf,
}

/// What the pause did with the disks.
#[derive(Debug, Default)]
pub struct PausedDisks {
    /// One per writable disk: how it was saved and, for clones and copies,
    /// the file in the snapshot's temporary directory.
    pub saved: Vec<(WritableDisk, DiskSaved, Option<PathBuf>)>,
    /// Time spent on them inside the pause.
    pub elapsed: Duration,
    /// Bytes copied (copy mode).
    pub copied_bytes: u64,
}

/// Why a disk could not be saved.
#[derive(Debug, thiserror::Error)]
#[error("disk '{id}' ({path}): {message}")]
pub struct DiskSaveError {
    /// The disk.
    pub id: String,
    /// Its image.
    pub path: String,
    /// What went wrong and what to do.
    pub message: String,
}

/// The file name of disk `id`'s clone or copy in a snapshot.
pub fn file_name(id: &str) -> String {
    format!("disk-{id}.img")
}

fn clone_error(disk: &WritableDisk, e: &std::io::Error) -> DiskSaveError {
    let why = match e.raw_os_error() {
        Some(libc::EXDEV) => {
            "the snapshot directory is on another filesystem than the image, and a reflink \
             clone cannot cross filesystems"
                .to_string()
        }
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOTTY) => {
            "its filesystem cannot make reflink clones (btrfs and xfs can; ext4 cannot)".to_string()
        }
        _ => format!("reflink clone failed: {e}"),
    };
    DiskSaveError {
        id: disk.id.clone(),
        path: disk.path.display().to_string(),
        message: format!(
            "{why}; use --disk-mode=copy for a full copy made while the guest is paused, or \
             --disk-mode=skip (unsafe: a restored guest will find the disk as it is then, not as \
             it was at the snapshot)"
        ),
    }
}

/// Checks before the pause that every disk can be saved in `mode` into
/// `tmp_dir` (a clone is tried and removed), so that a refusal never
/// pauses the guest.
pub fn preflight(
    disks: &[WritableDisk],
    mode: DiskMode,
    tmp_dir: &Path,
) -> Result<(), DiskSaveError> {
    if mode != DiskMode::Clone {
        return Ok(());
    }
    for d in disks {
        let probe = tmp_dir.join(format!(".probe-{}", file_name(&d.id)));
        stasis_disk::reflink::clone_file(&d.path, &probe).map_err(|e| clone_error(d, &e))?;
        let _ = std::fs::remove_file(&probe);
    }
    Ok(())
}

/// Saves every disk in `mode` into `tmp_dir`. Call while the VM is paused
/// (no request in flight, so the image is what the guest saw completed).
pub fn save_in_pause(
    disks: &[WritableDisk],
    mode: DiskMode,
    tmp_dir: &Path,
) -> Result<PausedDisks, DiskSaveError> {
    let start = Instant::now();
    let mut out = PausedDisks::default();
    for d in disks {
        let dst = tmp_dir.join(file_name(&d.id));
        let saved = match mode {
            DiskMode::Skip => {
                out.saved.push((d.clone(), DiskSaved::Skip, None));
                continue;
            }
            DiskMode::Clone => {
                stasis_disk::reflink::clone_file(&d.path, &dst).map_err(|e| clone_error(d, &e))?;
                DiskSaved::Clone
            }
            DiskMode::Copy => {
                let n = std::fs::copy(&d.path, &dst).map_err(|e| DiskSaveError {
                    id: d.id.clone(),
                    path: d.path.display().to_string(),
                    message: format!("cannot copy it into the snapshot: {e}"),
                })?;
                out.copied_bytes += n;
                DiskSaved::Copy
            }
        };
        out.saved.push((d.clone(), saved, Some(dst)));
    }
    out.elapsed = start.elapsed();
    Ok(out)
}

/// The sections for the disks saved in the pause: the clones and copies
/// are made durable (fsync) and checksummed here, after the guest runs
/// again.
pub fn records(paused: &PausedDisks) -> Result<Vec<DiskImageState>, DiskSaveError> {
    let mut out = Vec::new();
    for (d, saved, file) in &paused.saved {
        let err = |message: String| DiskSaveError {
            id: d.id.clone(),
            path: d.path.display().to_string(),
            message,
        };
        let (size, crc32c, name) = match file {
            Some(f) => {
                File::open(f)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| err(format!("cannot make its saved image durable: {e}")))?;
                let (size, crc) = stasis_snapshot::checksum_file(f)
                    .map_err(|e| err(format!("cannot checksum its saved image: {e}")))?;
                (size, Some(crc), Some(file_name(&d.id)))
            }
            None => (
                std::fs::metadata(&d.path)
                    .map_err(|e| err(e.to_string()))?
                    .len(),
                None,
                None,
            ),
        };
        out.push(DiskImageState {
            id: d.id.clone(),
            saved: *saved,
            source_path: d.path.clone(),
            size,
            file: name,
            crc32c,
            identity: None,
        });
    }
    Ok(out)
}

/// The sections for disks left in place by a snapshot that ends the VM.
pub fn in_place_records(disks: &[WritableDisk]) -> Result<Vec<DiskImageState>, DiskSaveError> {
    disks
        .iter()
        .map(|d| {
            let id = FileIdentity::of(&d.path).map_err(|e| DiskSaveError {
                id: d.id.clone(),
                path: d.path.display().to_string(),
                message: format!("cannot read its identity: {e}"),
            })?;
            Ok(DiskImageState {
                id: d.id.clone(),
                saved: DiskSaved::InPlace,
                source_path: d.path.clone(),
                size: id.size,
                file: None,
                crc32c: None,
                identity: Some(id),
            })
        })
        .collect()
}

/// Checks that `path`, the image a restore will give disk `saved.id`, is
/// the disk as it was at the snapshot in `snapshot_dir`. Returns a warning
/// to show when that cannot be checked, or an error naming what differs.
pub fn check_restore_image(
    saved: &DiskImageState,
    path: &Path,
    snapshot_dir: &Path,
) -> Result<Option<String>, String> {
    match saved.saved {
        DiskSaved::Checkpoint => Err(format!(
            "this is a checkpoint's VM state and disk '{}' was kept by the checkpoint: restore it with `stasis restore --checkpoint {}`",
            saved.id,
            snapshot_dir.display()
        )),
        DiskSaved::Skip => Ok(Some(format!(
            "disk '{}' was not saved with the snapshot (--disk-mode=skip): the guest finds {} as it is now",
            saved.id,
            path.display()
        ))),
        DiskSaved::InPlace => {
            let Some(want) = saved.identity else {
                return Err("the snapshot records no identity for it".to_string());
            };
            let same_path = std::fs::canonicalize(path).ok()
                == std::fs::canonicalize(&saved.source_path).ok();
            let have = FileIdentity::of(path).map_err(|e| format!("{}: {e}", path.display()))?;
            // The device number is not compared: it can change across a
            // reboot or remount (btrfs gives one per mount) while the file
            // stays the same.
            let same_file = have.ino == want.ino && have.generation == want.generation;
            let unchanged = have.mtime_ns == want.mtime_ns && have.size == want.size;
            if same_file && unchanged {
                Ok(None)
            } else if same_path && !same_file {
                Err(format!(
                    "{} is another file than the snapshot's disk (inode {}, generation {}; the snapshot recorded inode {}, generation {})",
                    path.display(),
                    have.ino,
                    have.generation,
                    want.ino,
                    want.generation
                ))
            } else if same_path || same_file {
                Err(format!(
                    "{} changed since the snapshot (modified at {} ns, {} bytes; the snapshot recorded {} ns, {} bytes)",
                    path.display(),
                    have.mtime_ns,
                    have.size,
                    want.mtime_ns,
                    want.size
                ))
            } else {
                Ok(Some(format!(
                    "disk '{}': {} is not the file the snapshot was taken with ({}); its contents cannot be checked",
                    saved.id,
                    path.display(),
                    saved.source_path.display()
                )))
            }
        }
        DiskSaved::Clone | DiskSaved::Copy => {
            let name = saved.file.as_deref().unwrap_or_default();
            let kept = snapshot_dir.join(name);
            let hint = format!(
                "the snapshot keeps the disk as it was in {}: copy it (cp --reflink=auto {} NEW.img) and restore with --disk-path {}=NEW.img",
                kept.display(),
                kept.display(),
                saved.id
            );
            if let (Ok(a), Ok(b)) = (std::fs::metadata(path), std::fs::metadata(&kept)) {
                if a.dev() == b.dev() && a.ino() == b.ino() {
                    return Err(format!(
                        "{} is the snapshot's own copy of the disk, which a restored VM would change; {hint}",
                        path.display()
                    ));
                }
            }
            let (size, crc) = stasis_snapshot::checksum_file(path).map_err(|e| e.to_string())?;
            if size != saved.size || Some(crc) != saved.crc32c {
                return Err(format!(
                    "{} does not hold the disk as it was at the snapshot (crc32c {crc:08x}, {size} bytes; saved {:08x}, {} bytes); {hint}",
                    path.display(),
                    saved.crc32c.unwrap_or(0),
                    saved.size
                ));
            }
            Ok(None)
        }
    }
}
