//! Small file-system helpers: directory fsync, atomic exchange, hole seeking.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{io_ctx, Result};

/// fsyncs a directory, making renames and creations inside it durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(io_ctx(format!("opening {} to fsync it", dir.display())))?;
    f.sync_all()
        .map_err(io_ctx(format!("fsyncing directory {}", dir.display())))
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Atomically swaps two paths with `renameat2(RENAME_EXCHANGE)`.
///
/// Returns `Ok(false)` if the kernel or file system does not support it
/// (`EINVAL`, `ENOSYS`, `EOPNOTSUPP`), so the caller can fall back.
pub(crate) fn rename_exchange(a: &Path, b: &Path) -> io::Result<bool> {
    let ca = cpath(a)?;
    let cb = cpath(b)?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the
    // call; renameat2 only reads them. AT_FDCWD makes relative paths resolve
    // like std's.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

/// Why [`open_regular`] refused a file.
#[derive(Debug)]
pub enum OpenRegularError {
    /// It does not exist.
    Missing,
    /// It is a symbolic link (never followed inside a snapshot).
    Symlink,
    /// It exists but is not a regular file: what it is instead.
    NotRegular(&'static str),
    /// Opening or examining it failed.
    Io(io::Error),
}

impl std::fmt::Display for OpenRegularError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => f.write_str("does not exist"),
            Self::Symlink => f.write_str(
                "is a symbolic link (snapshot files must be regular files inside the snapshot directory)",
            ),
            Self::NotRegular(kind) => write!(f, "is {kind}, not a regular file"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// What a file of type `mode` is, in words.
pub fn file_kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symbolic link",
        _ => "a special file",
    }
}

/// Opens `path` for reading only if it is a regular file, without ever
/// blocking or following a final symbolic link: `O_NOFOLLOW | O_NONBLOCK`
/// (a FIFO opens at once instead of waiting for a writer), then `fstat`
/// on what was opened. Every file of a snapshot is opened this way, so a
/// crafted snapshot cannot make a reader hang on a FIFO, read a device or
/// follow a link out of its directory.
pub fn open_regular(path: &Path) -> std::result::Result<File, OpenRegularError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OpenRegularError::Missing),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(OpenRegularError::Symlink),
        Err(e) => return Err(OpenRegularError::Io(e)),
    };
    let md = f.metadata().map_err(OpenRegularError::Io)?;
    if !md.is_file() {
        return Err(OpenRegularError::NotRegular(file_kind(md.mode())));
    }
    Ok(f)
}

/// Where the next data (non-hole) byte at or after `from` is, or `None` if
/// there is only a hole up to end of file. `Err` with `EINVAL`/`EOPNOTSUPP`
/// means the file system cannot tell; callers then treat everything as data.
pub(crate) fn seek_data(f: &File, from: u64) -> io::Result<Option<u64>> {
    seek(f, from, libc::SEEK_DATA)
}

/// Where the next hole at or after `from` is (end of file counts as a hole).
pub(crate) fn seek_hole(f: &File, from: u64) -> io::Result<Option<u64>> {
    seek(f, from, libc::SEEK_HOLE)
}

fn seek(f: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(from)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek on a file descriptor we own (borrowed from a live File);
    // it only moves the descriptor's offset, which this crate never uses
    // (all I/O is positional: pread/pwrite).
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Whether a process with this pid exists (from this pid namespace's view).
pub(crate) fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks existence and
    // permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The crc32c and length of a whole file's contents (read in 1 MiB
/// blocks; holes read as zeros). Used to give a disk image an identity a
/// restore can check.
pub fn checksum_file(path: &Path) -> crate::Result<(u64, u32)> {
    use std::io::Read;
    let ctx = || format!("reading {}", path.display());
    let mut f = open_regular(path).map_err(|e| crate::error::Error::Io {
        context: ctx(),
        source: match e {
            OpenRegularError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
        },
    })?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut len, mut crc) = (0u64, 0u32);
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => return Ok((len, crc)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(crate::error::io_ctx(ctx())(e)),
        };
        crc = crate::crc::append(crc, &buf[..n]);
        len += n as u64;
    }
}
