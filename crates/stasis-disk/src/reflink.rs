//! Reflink clones (`FICLONE`): a copy of a file that shares its blocks
//! until either side writes (btrfs, xfs), made in constant time.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `_IOW(0x94, 9, int)`.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Clones `src` into the new file `dst` (which must not exist); on failure
/// nothing is left at `dst`, and the error is the kernel's (see
/// [`explain`]).
pub fn clone_file(src: &Path, dst: &Path) -> io::Result<()> {
    let from = File::open(src)?;
    let to = OpenOptions::new().write(true).create_new(true).open(dst)?;
    // SAFETY: FICLONE takes the source fd as its argument and changes only
    // the destination file.
    let ret = unsafe { libc::ioctl(to.as_raw_fd(), FICLONE, from.as_raw_fd()) };
    if ret != 0 {
        let e = io::Error::last_os_error();
        drop(to);
        let _ = std::fs::remove_file(dst);
        return Err(e);
    }
    Ok(())
}

/// Replaces `dst` by a clone of `src` atomically: the clone is made
/// beside `dst` and renamed over it, so a crash leaves the old or the new
/// file, never a mix.
pub fn replace_with_clone(src: &Path, dst: &Path) -> io::Result<()> {
    let name = dst
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dst.with_file_name(format!(".{}.stasis-tmp", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    clone_file(src, &tmp).map_err(explain)?;
    File::open(&tmp)?.sync_all()?;
    if let Err(e) = std::fs::rename(&tmp, dst) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dst)
}

/// `fsync`s the directory that holds `path` (makes a rename durable).
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// `e` from [`clone_file`] with what it means for a reflink clone.
pub fn explain(e: io::Error) -> io::Error {
    let why = match e.raw_os_error() {
        Some(libc::EXDEV) => "a reflink clone cannot cross filesystems",
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOTTY) => {
            "this filesystem cannot make reflink clones (btrfs and xfs can; ext4 cannot)"
        }
        _ => return e,
    };
    io::Error::new(e.kind(), format!("{why} ({e})"))
}
