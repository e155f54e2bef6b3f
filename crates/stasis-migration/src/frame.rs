//! Framing: a stream is the 8-byte [`PREAMBLE`], then frames.
//!
//! ```text
//! offset size
//!      0    1  kind (FrameKind)
//!      1    1  flags, 0 in protocol version 1
//!      2    2  reserved, 0
//!      4    4  payload length N (little endian), at most MAX_PAYLOAD
//!      8    N  payload
//!    8+N    4  CRC-32C of bytes 0..8+N (little endian)
//! ```
//!
//! A reader checks the header before reading the payload and reads at most
//! the payload's (bounded) length, so a hostile length costs an error, not
//! memory; the checksum is checked before the payload is decoded.

use std::io::{Read, Write};

use crate::error::{io_ctx, Error, Result};

/// What every stream begins with.
pub const PREAMBLE: [u8; 8] = *b"STASISMG";
/// The most payload one frame may carry: a full memory batch (1024 pages)
/// and its entries, with room to spare.
pub const MAX_PAYLOAD: u32 = 8 << 20;
const HEADER: usize = 8;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Source → destination: protocol versions and software.
    Hello = 1,
    /// Destination → source: the version chosen.
    Welcome = 2,
    /// Either way: no (with the reason), and the end of the stream.
    Refuse = 3,
    /// Source → destination: what VM is coming (configuration, CPU).
    VmDescription = 4,
    /// Destination → source: it can run that VM; memory may come.
    Accept = 5,
    /// Source → destination: pages of guest memory.
    MemoryBatch = 6,
    /// Source → destination: one pass over memory is complete.
    RoundEnd = 7,
    /// Source → destination: one state section (as in snapshots).
    Section = 8,
    /// Source → destination: all state is sent; the source is paused.
    StateDone = 9,
    /// Destination → source: the VM runs here now; the source may end.
    Resumed = 10,
    /// Source → destination (version 2, UNIX sockets): file descriptors
    /// (guest memory files, taps) are about to be handed over.
    Files = 11,
    /// Destination → source (version 2): send the file descriptors now.
    FilesReady = 12,
    /// Source → destination (version 2): a zstd-compressed memory batch.
    MemoryBatchZstd = 13,
    /// Source → destination (version 2, post-copy): pages the destination
    /// must not use: they come after the switchover.
    StalePages = 14,
    /// Destination → source (version 2, post-copy): pages a vCPU or
    /// device is waiting for (none: a keepalive).
    PageRequest = 15,
    /// Source → destination (version 2, post-copy): every stale page sent.
    PostcopyDone = 16,
    /// Destination → source (version 2, post-copy): every page in place;
    /// the source may end.
    PostcopyComplete = 17,
    /// Source → destination (version 2): the first frame of a further
    /// connection (`--connections N`).
    Join = 18,
    /// Source → destination (version 2): a further connection carried
    /// all its memory.
    ConnectionDone = 19,
}

impl FrameKind {
    /// The kind with this number (11 to 19 exist from protocol version
    /// 2).
    pub fn from_u8(v: u8) -> Option<FrameKind> {
        use FrameKind::*;
        Some(match v {
            1 => Hello,
            2 => Welcome,
            3 => Refuse,
            4 => VmDescription,
            5 => Accept,
            6 => MemoryBatch,
            7 => RoundEnd,
            8 => Section,
            9 => StateDone,
            10 => Resumed,
            11 => Files,
            12 => FilesReady,
            13 => MemoryBatchZstd,
            14 => StalePages,
            15 => PageRequest,
            16 => PostcopyDone,
            17 => PostcopyComplete,
            18 => Join,
            19 => ConnectionDone,
            _ => return None,
        })
    }

    /// The kind's name, for messages.
    pub fn name(self) -> &'static str {
        use FrameKind::*;
        match self {
            Hello => "hello",
            Welcome => "welcome",
            Refuse => "refuse",
            VmDescription => "vm-description",
            Accept => "accept",
            MemoryBatch => "memory-batch",
            RoundEnd => "round-end",
            Section => "section",
            StateDone => "state-done",
            Resumed => "resumed",
            Files => "files",
            FilesReady => "files-ready",
            MemoryBatchZstd => "memory-batch-zstd",
            StalePages => "stale-pages",
            PageRequest => "page-request",
            PostcopyDone => "postcopy-done",
            PostcopyComplete => "postcopy-complete",
            Join => "join",
            ConnectionDone => "connection-done",
        }
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Writes frames to a stream.
pub struct FrameWriter<W: Write> {
    inner: W,
    bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    /// Starts a stream: writes the preamble and flushes it (the peer
    /// reads it before it sends anything, so it must not wait in a
    /// buffer).
    pub fn start(mut inner: W) -> Result<Self> {
        inner
            .write_all(&PREAMBLE)
            .and_then(|()| inner.flush())
            .map_err(io_ctx("sending the preamble"))?;
        Ok(FrameWriter {
            inner,
            bytes: PREAMBLE.len() as u64,
        })
    }

    /// Writes one frame. A payload over [`MAX_PAYLOAD`] is refused here
    /// too (the reader would refuse it).
    pub fn write(&mut self, kind: FrameKind, payload: &[u8]) -> Result<()> {
        self.write_parts(kind, &[payload])
    }

    /// Writes one frame whose payload is `parts` one after the other
    /// (without joining them first).
    pub fn write_parts(&mut self, kind: FrameKind, parts: &[&[u8]]) -> Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_PAYLOAD as usize {
            return Err(Error::FrameTooLarge {
                kind: kind.name().into(),
                len: len as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        let mut header = [0u8; HEADER];
        header[0] = kind as u8;
        header[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = parts
            .iter()
            .fold(crc32c::crc32c(&header), |c, p| crc32c::crc32c_append(c, p));
        let what = || format!("sending a {kind} frame");
        self.inner
            .write_all(&header)
            .map_err(|e| io_ctx(&what())(e))?;
        for p in parts {
            self.inner.write_all(p).map_err(|e| io_ctx(&what())(e))?;
        }
        self.inner
            .write_all(&crc.to_le_bytes())
            .map_err(|e| io_ctx(&what())(e))?;
        self.bytes += (HEADER + len + 4) as u64;
        Ok(())
    }

    /// Flushes buffered frames.
    pub fn flush(&mut self) -> Result<()> {
        self.inner.flush().map_err(io_ctx("flushing the stream"))
    }

    /// Bytes written so far, preamble included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// The underlying stream.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// One frame as read: its kind and checked payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: FrameKind,
    /// The payload (its checksum verified).
    pub payload: Vec<u8>,
}

/// Reads frames from a stream.
pub struct FrameReader<R: Read> {
    inner: R,
    bytes: u64,
    /// A payload buffer given back with [`FrameReader::recycle`]: large
    /// frames reuse memory instead of mapping fresh memory each time.
    spare: Vec<u8>,
}

/// Makes `buf` `len` zero bytes, reusing its memory. Not generic on
/// purpose: compiled (optimised) in this crate, not byte by byte in a
/// debug build of whichever crate instantiates the generic reader.
#[inline(never)]
pub(crate) fn zeroed(buf: &mut Vec<u8>, len: usize) {
    buf.clear();
    buf.resize(len, 0);
}

/// Reads exactly `buf.len()` bytes; EOF part way is [`Error::Truncated`].
fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &str) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => {
                return Err(Error::Truncated {
                    what: what.to_string(),
                })
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_ctx(&format!("receiving {what}"))(e)),
        }
    }
    Ok(())
}

impl<R: Read> FrameReader<R> {
    /// Reads and checks the preamble.
    pub fn start(mut inner: R) -> Result<Self> {
        let mut p = [0u8; PREAMBLE.len()];
        read_exact(&mut inner, &mut p, "the preamble")?;
        if p != PREAMBLE {
            return Err(Error::NotMigrationStream {
                found: p.escape_ascii().to_string(),
            });
        }
        Ok(FrameReader {
            inner,
            bytes: PREAMBLE.len() as u64,
            spare: Vec::new(),
        })
    }

    /// Reads the next frame; `Ok(None)` at a clean end of stream (between
    /// frames).
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        let mut header = [0u8; HEADER];
        // A clean end is EOF before the first header byte.
        match self.inner.read(&mut header[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return self.next_frame(),
            Err(e) => return Err(io_ctx("receiving a frame")(e)),
        }
        read_exact(&mut self.inner, &mut header[1..], "a frame header")?;
        let kind = FrameKind::from_u8(header[0]).ok_or(Error::UnknownKind(header[0]))?;
        if header[1] != 0 || header[2..4] != [0, 0] {
            return Err(Error::BadHeader(format!(
                "{kind} frame with flags {:#04x} and reserved bytes {:02x}{:02x} (version 1 defines none)",
                header[1], header[2], header[3]
            )));
        }
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        if len > MAX_PAYLOAD {
            return Err(Error::FrameTooLarge {
                kind: kind.name().into(),
                len: len as u64,
                max: MAX_PAYLOAD as u64,
            });
        }
        let mut payload = std::mem::take(&mut self.spare);
        zeroed(&mut payload, len as usize);
        read_exact(
            &mut self.inner,
            &mut payload,
            &format!("a {kind} frame's payload"),
        )?;
        let mut crc = [0u8; 4];
        read_exact(
            &mut self.inner,
            &mut crc,
            &format!("a {kind} frame's checksum"),
        )?;
        let recorded = u32::from_le_bytes(crc);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&header), &payload);
        if recorded != computed {
            return Err(Error::FrameChecksum {
                kind: kind.name().into(),
                recorded,
                computed,
            });
        }
        self.bytes += (HEADER + payload.len() + 4) as u64;
        Ok(Some(Frame { kind, payload }))
    }

    /// Gives a frame's payload buffer back for the next frame to reuse.
    pub fn recycle(&mut self, frame: Frame) {
        if frame.payload.capacity() > self.spare.capacity() {
            self.spare = frame.payload;
        }
    }

    /// Bytes read so far, preamble included.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }
}
