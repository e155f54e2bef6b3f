//! Files and sockets that guest output goes to, opened so that a path
//! (typed by a user, or read from a snapshot someone handed them) can
//! never make the VMM hang on a FIFO, follow a link, or replace a file.
//!
//! A file stasis creates for output is marked with the extended attribute
//! [`OUTPUT_XATTR`]: a restore appends to a file named in the snapshot only
//! if it bears the mark (stasis made it for a VM's output), so that a
//! crafted snapshot cannot send guest output into a file of the user's.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The mark on files stasis created for guest output.
pub const OUTPUT_XATTR: &str = "user.stasis.output";

/// Opens `path` for appending guest output: created (and marked) if
/// missing; otherwise it must be a regular file, opened without following
/// a final link and without blocking (`O_NOFOLLOW | O_NONBLOCK`). Never
/// truncates.
pub fn open_append(path: &Path) -> io::Result<File> {
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(flags)
        .open(path)
    {
        Ok(f) => {
            mark(&f);
            return Ok(f);
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let f = OpenOptions::new()
        .append(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a symbolic link (output is never written through one)",
            ),
            Some(libc::ENXIO) => {
                io::Error::new(io::ErrorKind::InvalidInput, "is a FIFO, not a regular file")
            }
            _ => e,
        })?;
    let md = f.metadata()?;
    if !md.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "is {}, not a regular file",
                stasis_snapshot::file_kind(md.mode())
            ),
        ));
    }
    Ok(f)
}

/// Marks a file stasis created for output (best effort: a file system
/// without user extended attributes leaves it unmarked).
fn mark(f: &File) {
    let name = std::ffi::CString::new(OUTPUT_XATTR).expect("no NUL");
    // SAFETY: fsetxattr on a descriptor we own, with a NUL-terminated name
    // and a 1-byte value that outlive the call; the kernel only reads them.
    let r = unsafe { libc::fsetxattr(f.as_raw_fd(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    if r != 0 {
        tracing::debug!(
            "cannot mark an output file as stasis's: {}",
            io::Error::last_os_error()
        );
    }
}

/// Whether the file at `path` (not followed if a link) bears the mark.
pub fn is_marked(path: &Path) -> bool {
    let Ok(name) = std::ffi::CString::new(OUTPUT_XATTR) else {
        return false;
    };
    let Ok(p) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut v = [0u8; 8];
    // SAFETY: lgetxattr with NUL-terminated path and name and a buffer of
    // the length given, all live for the call; it writes at most that many
    // bytes.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    r > 0
}
