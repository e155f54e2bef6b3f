//! Disk image formats for stasis, with no KVM dependency: raw files and
//! qcow2 images behind one [`DiskBackend`] trait, plus the operations
//! checkpoints need (qcow2 internal snapshots, new overlays for external
//! checkpoints, reflink clones of raw images).
//!
//! The qcow2 data path is imago's; internal snapshots and metadata repair
//! are written here (see [`qcow2`]) because no crate offers them.

pub mod qcow2;
pub mod raw;
pub mod reflink;

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The guest's bytes, as they are.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl DiskFormat {
    /// `raw` or `qcow2`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            _ => Err(format!("unknown disk format '{s}' (expected raw or qcow2)")),
        }
    }
}

/// The format of the image at `path`, from its first bytes: qcow2 if it
/// starts with qcow2's magic, raw otherwise.
pub fn detect_format(path: &Path) -> io::Result<DiskFormat> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(
        if n == 4 && u32::from_be_bytes(magic) == qcow2::image::MAGIC {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        },
    )
}

/// The size the guest sees of the image at `path` in `format`.
pub fn virtual_size(path: &Path, format: DiskFormat) -> io::Result<u64> {
    match format {
        DiskFormat::Raw => Ok(std::fs::metadata(path)?.len()),
        DiskFormat::Qcow2 => qcow2::virtual_size(path),
    }
}

/// A disk image as the block device sees it. Offsets and lengths are in
/// bytes; the device checks them against [`DiskBackend::size`].
pub trait DiskBackend: Send {
    /// The image's format.
    fn format(&self) -> DiskFormat;
    /// The size the guest sees, in bytes.
    fn size(&self) -> u64;
    /// The image file.
    fn path(&self) -> &Path;
    /// Fills `bufs` from `offset`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()>;
    /// Writes `bufs` at `offset`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable, metadata included.
    fn flush(&self) -> io::Result<()>;
    /// Lets the image forget `len` bytes at `offset` (a hint: reads may
    /// return the old data or zeros afterwards).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Takes an internal snapshot `name` (qcow2 only).
    fn take_internal_snapshot(&mut self, name: &str) -> io::Result<()> {
        let _ = name;
        Err(unsupported(self.format(), "internal snapshots"))
    }
    /// Deletes internal snapshot `name` (qcow2 only).
    fn delete_internal_snapshot(&mut self, name: &str) -> io::Result<()> {
        let _ = name;
        Err(unsupported(self.format(), "internal snapshots"))
    }
    /// Makes internal snapshot `name` the disk's contents (qcow2 only).
    fn apply_internal_snapshot(&mut self, name: &str) -> io::Result<()> {
        let _ = name;
        Err(unsupported(self.format(), "internal snapshots"))
    }
}

/// Punches a hole of `len` bytes at `offset` into `file`, keeping its
/// size (the blocks go back to the filesystem; reads return zeros).
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on an fd the caller owns; no memory is involved.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn unsupported(format: DiskFormat, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!("{format} images have no {what} (qcow2 images do)"),
    )
}

/// Opens the image at `path` in `format` (detected when `None`: a
/// detected qcow2 image may not name a backing file, since a guest can
/// write a qcow2 header into a raw disk).
pub fn open(
    path: &Path,
    format: Option<DiskFormat>,
    readonly: bool,
) -> io::Result<Box<dyn DiskBackend>> {
    let (format, probed) = match format {
        Some(f) => (f, false),
        None => (detect_format(path)?, true),
    };
    Ok(match format {
        DiskFormat::Raw => Box::new(raw::RawDisk::open(path, readonly)?),
        DiskFormat::Qcow2 => Box::new(qcow2::Qcow2Disk::open_as(path, readonly, probed)?),
    })
}

/// A disk whose image was closed (its VM ended): every request fails.
pub struct ClosedDisk {
    path: std::path::PathBuf,
    format: DiskFormat,
    size: u64,
}

impl ClosedDisk {
    /// Stands in for `backend`, which the caller then drops.
    pub fn replacing(backend: &dyn DiskBackend) -> Self {
        Self {
            path: backend.path().to_path_buf(),
            format: backend.format(),
            size: backend.size(),
        }
    }
}

fn closed() -> io::Error {
    io::Error::other("the disk image is closed")
}

impl DiskBackend for ClosedDisk {
    fn format(&self) -> DiskFormat {
        self.format
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn read_vectored_at(&self, _: &mut [IoSliceMut<'_>], _: u64) -> io::Result<()> {
        Err(closed())
    }
    fn write_vectored_at(&self, _: &[IoSlice<'_>], _: u64) -> io::Result<()> {
        Err(closed())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> io::Result<()> {
        Err(closed())
    }
    fn take_internal_snapshot(&mut self, _: &str) -> io::Result<()> {
        Err(closed())
    }
    fn delete_internal_snapshot(&mut self, _: &str) -> io::Result<()> {
        Err(closed())
    }
    fn apply_internal_snapshot(&mut self, _: &str) -> io::Result<()> {
        Err(closed())
    }
}

/// Freezes `backend`'s image and continues on a new qcow2 overlay at
/// `overlay` whose backing file it is: the external checkpoint of one
/// disk. On failure the disk goes on with its old image.
pub fn switch_to_overlay(backend: &mut Box<dyn DiskBackend>, overlay: &Path) -> io::Result<()> {
    // A closed disk flushes "successfully": refuse it by its reads.
    backend.read_vectored_at(&mut [], 0)?;
    backend.flush()?;
    let (path, format, size) = (
        backend.path().to_path_buf(),
        backend.format(),
        backend.size(),
    );
    qcow2::create_overlay(overlay, &path, format, size)?;
    match qcow2::Qcow2Disk::open(overlay, false) {
        Ok(disk) => {
            *backend = Box::new(disk);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(overlay);
            Err(e)
        }
    }
}
