//! Raw images: the guest's bytes at the same offsets in a file, moved by
//! `preadv`/`pwritev` straight between the file and the caller's buffers.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{DiskBackend, DiskFormat};

/// The most `iovec`s one call takes (`IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A raw image.
pub struct RawDisk {
    path: PathBuf,
    file: File,
    size: u64,
}

impl RawDisk {
    /// Opens `path`.
    pub fn open(path: &Path, readonly: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!readonly).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    /// Reads (`read`) or writes `iov` at `offset`: one call, or, after a
    /// short or failed one, again with a copy of the `iovec`s that
    /// [`RawDisk::transfer`] advances.
    fn vectored(&self, iov: &[libc::iovec], offset: u64, read: bool) -> io::Result<()> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        if iov.len() <= IOV_MAX {
            // SAFETY: the iovecs describe the caller's buffers (writable
            // ones for a read), valid for this call.
            let n = unsafe {
                if read {
                    libc::preadv(
                        self.file.as_raw_fd(),
                        iov.as_ptr(),
                        iov.len() as i32,
                        offset as i64,
                    )
                } else {
                    libc::pwritev(
                        self.file.as_raw_fd(),
                        iov.as_ptr(),
                        iov.len() as i32,
                        offset as i64,
                    )
                }
            };
            if n >= 0 && n as usize == total {
                return Ok(());
            }
        }
        self.transfer(&mut iov.to_vec(), offset, read)
    }

    /// Reads (`read`) or writes `iov` at `offset`, resuming after short
    /// transfers.
    fn transfer(&self, iov: &mut [libc::iovec], offset: u64, read: bool) -> io::Result<()> {
        let mut first = 0;
        let mut pos = offset;
        while first < iov.len() {
            let batch = &iov[first..iov.len().min(first + IOV_MAX)];
            // SAFETY: the iovecs were made from live `IoSlice`/`IoSliceMut`
            // borrows of the caller's (mutable, for a read) buffers; the
            // kernel touches only those bytes.
            let n = unsafe {
                if read {
                    libc::preadv(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as i32,
                        pos as i64,
                    )
                } else {
                    libc::pwritev(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as i32,
                        pos as i64,
                    )
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    if read {
                        "the image ended"
                    } else {
                        "the image took no more bytes"
                    },
                ));
            }
            let mut n = n as usize;
            pos += n as u64;
            while n > 0 && first < iov.len() {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same buffer.
                    v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                    v.iov_len -= n;
                    n = 0;
                }
            }
            while first < iov.len() && iov[first].iov_len == 0 {
                first += 1;
            }
        }
        Ok(())
    }
}

impl DiskBackend for RawDisk {
    fn format(&self) -> DiskFormat {
        DiskFormat::Raw
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec` on Unix (std
        // guarantees it); the kernel writes only into these, the caller's
        // mutable buffers, borrowed for this call.
        let iov =
            unsafe { std::slice::from_raw_parts(bufs.as_ptr() as *const libc::iovec, bufs.len()) };
        self.vectored(iov, offset, true)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        // SAFETY: `IoSlice` is ABI-compatible with `iovec`; the kernel only
        // reads the caller's buffers, borrowed for this call.
        let iov =
            unsafe { std::slice::from_raw_parts(bufs.as_ptr() as *const libc::iovec, bufs.len()) };
        self.vectored(iov, offset, false)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match crate::punch_hole(&self.file, offset, len) {
            // Discard is a hint: a filesystem that cannot punch holes
            // keeps the data, which virtio allows.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }
}
