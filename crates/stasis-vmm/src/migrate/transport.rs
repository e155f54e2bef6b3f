//! The connection a migration runs over: TCP between hosts, or a UNIX
//! socket for a local upgrade, which can also carry file descriptors
//! (`SCM_RIGHTS`): guest memory files and taps are handed to the new
//! process instead of being copied or reopened.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::IO_TIMEOUT;

/// The byte that carries handed-over file descriptors.
const FILES_MARK: u8 = b'F';
/// The most descriptors one hand-over carries (memory regions and taps).
pub const MAX_FILES: usize = 64;

/// A connected migration stream.
#[derive(Debug)]
pub enum MigrationStream {
    /// Between hosts.
    Tcp(TcpStream),
    /// On this host (a local upgrade).
    Unix(UnixStream),
}

impl MigrationStream {
    /// Sets the stall timeout both ways (and turns off Nagle on TCP:
    /// switchover messages are small and waited for).
    pub fn set_timeouts(&self) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                s.set_nodelay(true)
            }
            Self::Unix(s) => {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
        }
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
        })
    }

    /// Shuts the connection both ways: a call blocked on it fails at once.
    pub fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
            Self::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    /// The process at the other end of a UNIX socket.
    pub fn peer_pid(&self) -> Option<i32> {
        match self {
            Self::Unix(s) => peer_credentials(s).ok().map(|(pid, _)| pid),
            Self::Tcp(_) => None,
        }
    }

    /// The process at the other end of a UNIX socket, held by a pidfd (a
    /// handle that cannot come to name another process).
    pub fn peer_process(&self) -> Option<PeerProcess> {
        let pid = self.peer_pid()?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the fd was just returned to us and nothing else owns it.
        Some(PeerProcess(unsafe {
            std::os::fd::OwnedFd::from_raw_fd(fd as RawFd)
        }))
    }

    /// Whether file descriptors can travel over it.
    pub fn carries_files(&self) -> bool {
        matches!(self, Self::Unix(_))
    }

    /// Sends `files` out of band, as one marker byte with the descriptors
    /// attached. The peer must not be reading ahead of the frames it
    /// expects (the protocol has it ask for them first), or the marker
    /// would be swallowed by a buffer.
    pub fn send_files(&self, files: &[&File]) -> std::io::Result<()> {
        let Self::Unix(s) = self else {
            return Err(std::io::Error::other("file descriptors need a UNIX socket"));
        };
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let sent = s
            .send_with_fds(&[[FILES_MARK].as_slice()], &fds)
            .map_err(std::io::Error::from)?;
        if sent != 1 {
            return Err(std::io::Error::other("the file descriptors were not sent"));
        }
        Ok(())
    }

    /// Receives exactly `count` descriptors sent by [`Self::send_files`].
    pub fn recv_files(&self, count: usize) -> std::io::Result<Vec<File>> {
        let Self::Unix(s) = self else {
            return Err(std::io::Error::other("file descriptors need a UNIX socket"));
        };
        if count > MAX_FILES {
            return Err(std::io::Error::other(format!(
                "{count} file descriptors announced, at most {MAX_FILES} accepted"
            )));
        }
        let mut mark = [0u8; 1];
        let mut iov = [libc::iovec {
            iov_base: mark.as_mut_ptr().cast(),
            iov_len: 1,
        }];
        let mut fds = vec![-1 as RawFd; MAX_FILES];
        // SAFETY: the iovec points at `mark`, one byte we own for the call.
        let (n, got) =
            unsafe { s.recv_with_fds(&mut iov, &mut fds) }.map_err(std::io::Error::from)?;
        // Own every descriptor received first, so that none leaks, and
        // keep them from any program this process might start.
        let files: Vec<File> = fds[..got]
            .iter()
            .map(|&fd| {
                // SAFETY: recvmsg installed these descriptors in this
                // process for us; each is wrapped once and closed on drop,
                // and F_SETFD only sets its close-on-exec flag.
                unsafe {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                    File::from_raw_fd(fd)
                }
            })
            .collect();
        if n != 1 || mark[0] != FILES_MARK {
            return Err(std::io::Error::other(
                "the peer sent data where file descriptors were expected",
            ));
        }
        if files.len() != count {
            return Err(std::io::Error::other(format!(
                "{} file descriptors received, {count} announced",
                files.len()
            )));
        }
        Ok(files)
    }
}

impl Read for MigrationStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for MigrationStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process a local upgrade handed a VM to.
#[derive(Debug)]
pub struct PeerProcess(std::os::fd::OwnedFd);

impl PeerProcess {
    /// Kills it (SIGKILL) and waits up to `timeout` until it is gone: a
    /// process that may have started running a VM on memory it shares
    /// with this one must be gone before this one runs it again.
    pub fn kill_and_wait(&self, timeout: std::time::Duration) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: pidfd_send_signal on our pidfd, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd, valid for the call; a pidfd polls readable
        // once its process has exited.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            1 => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the receiving process did not end",
            )),
        }
    }
}

/// A receiver's listening socket. A UNIX socket is made readable and
/// writable by its owner only, and removed once the connection arrived.
#[derive(Debug)]
pub enum MigrationListener {
    /// TCP.
    Tcp(TcpListener),
    /// A UNIX socket and its path.
    Unix(UnixListener, PathBuf),
}

impl MigrationListener {
    /// Binds a UNIX socket at `path`. A socket left there by a receiver
    /// that died is replaced; anything else there (a live socket, a file)
    /// is refused, never removed.
    pub fn bind_unix(path: &Path) -> std::io::Result<Self> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(std::io::Error::other(format!(
                    "{} exists and is not a socket (not replaced)",
                    path.display()
                )));
            }
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(std::io::Error::other(format!(
                        "{} is in use by another listener",
                        path.display()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                }
                Err(e) => return Err(e),
            }
        }
        // Created owner-only from the start (no moment with the umask's
        // mode); the receiver has no other threads yet.
        // SAFETY: umask only swaps the process's file creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring it.
        unsafe { libc::umask(old) };
        let l = bound?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self::Unix(l, path.to_path_buf()))
    }

    /// Where it listens, as a migration address (`tcp:IP:PORT` with the
    /// port picked when 0 was asked for, or `unix:PATH`).
    pub fn address(&self) -> std::io::Result<String> {
        Ok(match self {
            Self::Tcp(l) => format!("tcp:{}", l.local_addr()?),
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        })
    }

    /// Waits for the one connection, and names its peer. A UNIX peer must
    /// run as this process's user (or root).
    pub fn accept(&self) -> std::io::Result<(MigrationStream, String)> {
        match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let s = MigrationStream::Tcp(s);
                s.set_timeouts()?;
                Ok((s, peer.to_string()))
            }
            Self::Unix(l, _) => loop {
                let (s, _) = l.accept()?;
                let (pid, uid) = peer_credentials(&s)?;
                // SAFETY: geteuid has no preconditions.
                let me = unsafe { libc::geteuid() };
                if uid != me && uid != 0 {
                    // Turned away; the receiver waits on for its source.
                    eprintln!(
                        "stasis: refused a connection from process {pid} of user {uid}: only user {me} or root may hand a VM over"
                    );
                    continue;
                }
                let s = MigrationStream::Unix(s);
                s.set_timeouts()?;
                return Ok((s, format!("process {pid}")));
            },
        }
    }
}

impl MigrationListener {
    /// [`Self::accept`], giving up after `timeout` with `TimedOut`.
    pub fn accept_within(
        &self,
        timeout: std::time::Duration,
    ) -> std::io::Result<(MigrationStream, String)> {
        let fd = match self {
            Self::Tcp(l) => l.as_raw_fd(),
            Self::Unix(l, _) => l.as_raw_fd(),
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd, valid for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            n if n < 0 => Err(std::io::Error::last_os_error()),
            0 => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {} s", timeout.as_secs()),
            )),
            _ => self.accept(),
        }
    }
}

impl Drop for MigrationListener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The process listening on the UNIX socket at `path`, if one does.
pub fn listener_pid(path: &Path) -> Option<i32> {
    let s = UnixStream::connect(path).ok()?;
    peer_credentials(&s).ok().map(|(pid, _)| pid)
}

/// The pid and uid of a UNIX socket's peer (`SO_PEERCRED`; for a
/// connection made to a listener, the process that listens).
fn peer_credentials(s: &UnixStream) -> std::io::Result<(i32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one `struct ucred` into `cred`, whose
    // size `len` gives; both outlive the call.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.pid, cred.uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_travel_over_a_unix_socket_and_counts_are_checked() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (MigrationStream::Unix(a), MigrationStream::Unix(b));
        let mut f = tempfile_with(b"guest ram");
        a.send_files(&[&f, &f]).unwrap();
        let got = b.recv_files(2).unwrap();
        let mut text = String::new();
        let mut g = &got[1];
        std::io::Seek::rewind(&mut f).unwrap();
        std::io::Seek::rewind(&mut g).unwrap();
        g.read_to_string(&mut text).unwrap();
        assert_eq!(text, "guest ram");
        a.send_files(&[&f]).unwrap();
        let e = b.recv_files(2).unwrap_err().to_string();
        assert!(
            e.contains("1 file descriptors received, 2 announced"),
            "{e}"
        );
        (&a).write_all_bytes(b"x");
        let e = b.recv_files(1).unwrap_err().to_string();
        assert!(e.contains("data where file descriptors"), "{e}");
    }

    trait WriteAll {
        fn write_all_bytes(self, b: &[u8]);
    }
    impl WriteAll for &MigrationStream {
        fn write_all_bytes(self, b: &[u8]) {
            let MigrationStream::Unix(s) = self else {
                unreachable!()
            };
            (&*s).write_all(b).unwrap();
        }
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let dir = std::env::temp_dir().join(format!("stasis-transport-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(bytes).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        f
    }

    #[test]
    fn a_unix_listener_replaces_a_dead_socket_but_never_a_file() {
        let dir = std::env::temp_dir().join(format!("stasis-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        std::fs::write(&path, b"keep").unwrap();
        let e = MigrationListener::bind_unix(&path).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        std::fs::remove_file(&path).unwrap();
        drop(UnixListener::bind(&path).unwrap()); // a dead socket stays
        let l = MigrationListener::bind_unix(&path).unwrap();
        let e = MigrationListener::bind_unix(&path).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(l);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
