//! qcow2: the data path through imago (reads, writes with copy-on-write
//! of shared clusters, discard, flush, backing files), and the parts no
//! crate offers, written against QEMU's `docs/interop/qcow2.txt`:
//! internal snapshots ([`snapshots`]) on direct metadata access
//! ([`image`]), and new overlays for external checkpoints.
//!
//! imago caches metadata, so metadata work never overlaps it: a
//! [`Qcow2Disk`] flushes and closes its imago instance, works on the file,
//! and opens imago again.

pub mod image;
pub mod snapshots;

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    PermissiveImplicitOpenGate,
};

use crate::{DiskBackend, DiskFormat};
use image::Qcow2Image;
pub use snapshots::SnapshotInfo;

/// A qcow2 image as a disk.
pub struct Qcow2Disk {
    path: PathBuf,
    readonly: bool,
    /// The format was probed, not given: the image's header may have been
    /// written by a guest into what was a raw disk, so it may not name
    /// other host files (a backing or data file).
    probed: bool,
    access: Option<FormatAccess<ImagoFile>>,
    size: u64,
}

fn open_access(path: &Path, readonly: bool, probed: bool) -> io::Result<FormatAccess<ImagoFile>> {
    let in_context =
        |e: io::Error| io::Error::new(e.kind(), format!("qcow2 image {}: {e}", path.display()));
    // The image itself is opened here; the gate decides only about files
    // it names (backing, data file).
    let file = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)
        .map_err(in_context)?;
    let storage = ImagoFile::try_from(file).map_err(in_context)?;
    let builder = Qcow2::<ImagoFile>::builder(storage).write(!readonly);
    let opened = if probed {
        builder.open(DenyImplicitOpenGate::default()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{e}; its format was detected, not given, and a detected qcow2 image may not name a backing file (a guest could have written that header into a raw disk): give format=qcow2 if the image is yours"
                ),
            )
        })
    } else {
        builder.open(PermissiveImplicitOpenGate::default())
    };
    Ok(FormatAccess::new(opened.map_err(in_context)?))
}

impl Qcow2Disk {
    /// Opens `path`; a writable open first repairs an image left dirty by
    /// an interrupted snapshot operation.
    pub fn open(path: &Path, readonly: bool) -> io::Result<Self> {
        Self::open_as(path, readonly, false)
    }

    /// [`Qcow2Disk::open`]; `probed`: the format was detected, so the image
    /// may not name a backing file.
    pub fn open_as(path: &Path, readonly: bool, probed: bool) -> io::Result<Self> {
        if !readonly {
            // Checks the header and repairs a dirty image before imago
            // sees it.
            let f = OpenOptions::new().read(true).write(true).open(path)?;
            Qcow2Image::open(f, true).map_err(|e| {
                io::Error::new(e.kind(), format!("qcow2 image {}: {e}", path.display()))
            })?;
        }
        let access = open_access(path, readonly, probed)?;
        Ok(Self {
            path: path.to_path_buf(),
            readonly,
            probed,
            size: access.size(),
            access: Some(access),
        })
    }

    fn access(&self) -> io::Result<&FormatAccess<ImagoFile>> {
        self.access
            .as_ref()
            .ok_or_else(|| io::Error::other("the qcow2 image is closed after a failed reopen"))
    }

    /// Flushes and closes imago, runs `f` on the image's metadata, and
    /// opens imago again (also when `f` failed).
    fn with_metadata<T>(
        &mut self,
        f: impl FnOnce(&mut Qcow2Image) -> io::Result<T>,
    ) -> io::Result<T> {
        if self.readonly {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the disk is read-only",
            ));
        }
        // Flushed before it is closed: a failed flush leaves it open.
        self.access()?.flush()?;
        self.access = None;
        let open = || OpenOptions::new().read(true).write(true).open(&self.path);
        let result = open().and_then(|file| {
            let mut img = Qcow2Image::open(file, true)?;
            f(&mut img)
        });
        // A failed operation may leave the image dirty (imago opens no
        // image with unknown incompatible bits): opening it writable again
        // repairs it, and the operation's own error is what is reported.
        let repaired = match &result {
            Ok(_) => Ok(()),
            Err(_) => open().and_then(|file| Qcow2Image::open(file, true).map(drop)),
        };
        let reopened = repaired.and_then(|()| open_access(&self.path, self.readonly, self.probed));
        match reopened {
            Ok(access) => {
                self.size = access.size();
                self.access = Some(access);
                result
            }
            Err(e) => Err(match result {
                Err(first) => io::Error::new(
                    first.kind(),
                    format!("{first}; then the image could not be opened again: {e}"),
                ),
                Ok(_) => e,
            }),
        }
    }
}

impl DiskBackend for Qcow2Disk {
    fn format(&self) -> DiskFormat {
        DiskFormat::Qcow2
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let mut v = IoVectorMut::with_capacity(bufs.len());
        for b in bufs.iter_mut() {
            v.push(&mut b[..]);
        }
        self.access()?.readv(v, offset)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let mut v = IoVector::with_capacity(bufs.len());
        for b in bufs {
            v.push(&b[..]);
        }
        self.access()?.writev(v, offset)
    }

    fn flush(&self) -> io::Result<()> {
        let a = self.access()?;
        a.flush()?;
        a.sync()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let a = self
            .access
            .as_mut()
            .ok_or_else(|| io::Error::other("the qcow2 image is closed"))?;
        match a.discard_to_any(offset, len) {
            // Discard is a hint (v2 images cannot drop clusters to zero).
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            r => r,
        }
    }

    fn take_internal_snapshot(&mut self, name: &str) -> io::Result<()> {
        self.with_metadata(|img| snapshots::take(img, name))
    }

    fn delete_internal_snapshot(&mut self, name: &str) -> io::Result<()> {
        self.with_metadata(|img| snapshots::delete(img, name))
    }

    fn apply_internal_snapshot(&mut self, name: &str) -> io::Result<()> {
        self.with_metadata(|img| snapshots::apply(img, name))
    }
}

/// Creates a new qcow2 image at `path` (which must not exist) whose
/// backing file is `backing` (recorded as an absolute path) of `format`.
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    format: DiskFormat,
    size: u64,
) -> io::Result<()> {
    let backing = std::path::absolute(backing)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
    let result = (|| {
        let storage = ImagoFile::try_from(file.try_clone()?)?;
        Qcow2::<ImagoFile>::create_builder(storage)
            .size(size)
            .backing(backing.display().to_string(), format.as_str().to_string())
            .create()?;
        file.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot create overlay {}: {e}", path.display()),
        )
    })
}

/// Creates an empty qcow2 image of `size` bytes at `path` (must not exist).
pub fn create(path: &Path, size: u64) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let storage = ImagoFile::try_from(file.try_clone()?)?;
    Qcow2::<ImagoFile>::create_builder(storage)
        .size(size)
        .create()?;
    file.sync_all()
}

/// Opens the image at `path` for metadata work (writable: repairs a dirty
/// image).
pub fn open_image(path: &Path, writable: bool) -> io::Result<Qcow2Image> {
    let file = OpenOptions::new().read(true).write(writable).open(path)?;
    Qcow2Image::open(file, writable)
        .map_err(|e| io::Error::new(e.kind(), format!("qcow2 image {}: {e}", path.display())))
}

/// The internal snapshots of the image at `path`.
pub fn list_snapshots(path: &Path) -> io::Result<Vec<SnapshotInfo>> {
    snapshots::list(&open_image(path, false)?)
}

/// The backing file name recorded in the image at `path`, if any.
pub fn backing_file(path: &Path) -> io::Result<Option<PathBuf>> {
    let file = File::open(path)?;
    let h = image::Header::read(&file)?;
    if h.backing_file_offset == 0 || h.backing_file_size == 0 {
        return Ok(None);
    }
    if h.backing_file_size > 1023
        || h.backing_file_offset
            .saturating_add(u64::from(h.backing_file_size))
            > h.cluster_size()
    {
        return Err(image::invalid("qcow2 backing file name out of range"));
    }
    let mut b = vec![0u8; h.backing_file_size as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, h.backing_file_offset)?;
    let name = PathBuf::from(String::from_utf8_lossy(&b).into_owned());
    Ok(Some(if name.is_absolute() {
        name
    } else {
        path.parent().unwrap_or(Path::new(".")).join(name)
    }))
}

/// The virtual size of the qcow2 image at `path`.
pub fn virtual_size(path: &Path) -> io::Result<u64> {
    Ok(image::Header::read(&File::open(path)?)?.size)
}
