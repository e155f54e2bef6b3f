//! Shared by the authentication tests: one exchange of frames over a
//! real socket pair, each side on its own thread.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::thread;

use stasis_migration::{secure, Auth, Error, FrameKind, FrameReader, FrameWriter, Role};

/// Source on a thread, destination here: the source sends a frame of
/// `payload` and reads one back; the destination echoes.
pub fn exchange(
    src: Auth,
    dst: Auth,
    payload: Vec<u8>,
) -> (Result<Vec<u8>, Error>, Result<(), Error>) {
    let (a, b) = UnixStream::pair().unwrap();
    let source = thread::spawn(move || {
        let (r, w) = secure(a.try_clone().unwrap(), a, Role::Source, &src)?;
        let mut w = FrameWriter::start(w)?;
        let mut r = FrameReader::start(r)?;
        w.write(FrameKind::Section, &payload)?;
        w.flush()?;
        let f = r.next_frame()?.expect("an echo");
        Ok(f.payload)
    });
    let dest = (|| {
        let (r, w) = secure(b.try_clone().unwrap(), b, Role::Destination, &dst)?;
        let mut w = FrameWriter::start(w)?;
        let mut r = FrameReader::start(r)?;
        let f = r.next_frame()?.expect("a frame");
        w.write(FrameKind::Section, &f.payload)?;
        w.flush()
    })();
    (source.join().unwrap(), dest)
}
