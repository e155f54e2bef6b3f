//! Writing to a UNIX stream socket without risking `SIGPIPE`.
//!
//! Rust programs ignore `SIGPIPE` by default, but a binary may restore the
//! default action (CLIs often do, for `| head`). A write to a socket whose
//! peer has gone would then kill the whole process, a VM included. Sending
//! with `MSG_NOSIGNAL` turns that into an ordinary `EPIPE` error.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// A writer over a borrowed stream that sends with `MSG_NOSIGNAL`.
pub(crate) struct NoSigPipe<'a>(pub(crate) &'a UnixStream);

impl Write for NoSigPipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is a valid, initialized slice for the duration
            // of the call and its length is passed with it; the descriptor
            // is open while `self.0` is borrowed.
            let n = unsafe {
                libc::send(
                    self.0.as_raw_fd(),
                    buf.as_ptr().cast::<libc::c_void>(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn writes_and_reports_a_gone_peer_as_epipe() {
        let (a, mut b) = UnixStream::pair().unwrap();
        NoSigPipe(&a).write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(b);
        let err = NoSigPipe(&a).write_all(b"x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
