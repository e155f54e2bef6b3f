//! What frames carry. Control messages are small JSON objects (fields a
//! reader does not know are ignored, so a later version may add optional
//! ones); memory batches and state sections are binary.
//!
//! Memory batch payload (all little endian):
//!
//! ```text
//! u32            count of pages, 1..=MAX_BATCH_PAGES
//! count × u64    entry: guest physical address of the page (4 KiB
//!                aligned) | kind in the low 12 bits: 0 data follows,
//!                1 the page is all zeros (no data)
//! 4096 × D       the data pages, in entry order (D = entries of kind 0)
//! ```
//!
//! Section payload: `u16` name length, name (UTF-8), `u16` instance
//! length, instance, `u32` section version, `u8` flags (bit 0: optional),
//! then the section's bytes as the snapshot format encodes them
//! (FORMAT.md §4.2): one serialisation for snapshots and migration.

use serde::{Deserialize, Serialize};

use crate::compress::CompressedBatch;
use crate::error::{Error, Result};
use crate::frame::{Frame, FrameKind};

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// The most pages one batch carries (4 MiB of data).
pub const MAX_BATCH_PAGES: usize = 1024;
/// Longest section name or instance.
pub const MAX_NAME: usize = 64;

const ENTRY_ZERO: u64 = 1;

/// Source → destination: the versions it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the source speaks.
    pub protocol_min: u32,
    /// Newest.
    pub protocol_max: u32,
    /// Program and version, for messages (`stasis 0.1.0`).
    pub software: String,
}

/// Destination → source: the version both will speak.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version chosen.
    pub protocol: u32,
    /// Program and version.
    pub software: String,
    /// Version 2: a random token a source's further connections name in
    /// their join frame (parallel connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// Source → destination, the first frame of a further connection
/// (version 2, `--connections N`): which migration it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    /// The session token from the welcome.
    pub session: String,
    /// The connection's number, 1..N (0 is the first connection).
    pub index: u32,
}

/// Either way: a refusal and its reason; the stream ends after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Why, for the person on the other side.
    pub reason: String,
}

/// Source → destination: the VM that is coming, checked by the
/// destination before any memory moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmDescription {
    /// The VM configuration, as a snapshot's manifest records it.
    pub vm_config: serde_json::Value,
    /// The guest CPU (model, features, CPUID), as a manifest records it.
    pub cpu: serde_json::Value,
    /// Bytes of guest memory.
    pub memory_bytes: u64,
    /// Version 2: connections memory travels on (1 + further ones that
    /// join); 1 when absent.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub connections: u32,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// Source → destination (protocol version 2, over a UNIX socket only):
/// file descriptors follow out of band once the destination answers
/// files-ready: first one per memory region, then one per tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesOffer {
    /// Guest RAM handed over as memory files, one per region in order
    /// (empty: memory comes in batches as over TCP).
    pub memory: Vec<MemoryFile>,
    /// Taps handed over, by interface name.
    pub taps: Vec<String>,
}

impl FilesOffer {
    /// How many descriptors follow.
    pub fn count(&self) -> usize {
        self.memory.len() + self.taps.len()
    }
}

/// One guest RAM region in a memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFile {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where it starts in its file.
    pub offset: u64,
}

/// Source → destination: a pass over memory is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundEnd {
    /// The pass (1 = all of memory).
    pub round: u32,
    /// Pages sent in it.
    pub pages: u64,
}

/// A decoded memory batch, borrowing the frame's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryBatch<'a> {
    entries: Vec<u64>,
    data: &'a [u8],
}

/// One page of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry<'a> {
    /// Guest physical address.
    pub gpa: u64,
    /// Its bytes, or `None` for a page of zeros.
    pub data: Option<&'a [u8]>,
}

impl<'a> MemoryBatch<'a> {
    /// Decodes a memory-batch payload (a frame's, or a decompressed
    /// memory-batch-zstd one).
    pub fn decode(payload: &'a [u8]) -> Result<Self> {
        decode_batch(payload)
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it has no pages (never true of a decoded batch).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = PageEntry<'a>> + '_ {
        let mut next = 0;
        self.entries.iter().map(move |&e| {
            let gpa = e & !(PAGE_SIZE as u64 - 1);
            if e & ENTRY_ZERO != 0 {
                PageEntry { gpa, data: None }
            } else {
                let d = &self.data[next..next + PAGE_SIZE];
                next += PAGE_SIZE;
                PageEntry { gpa, data: Some(d) }
            }
        })
    }
}

/// Whether `bytes` are all zero (word at a time; this crate is built
/// optimised even in test builds, so the VM side uses this too).
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bytes are a valid u64 pattern; align_to splits at
        // the aligned middle.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Builds memory batch payloads: pages of zeros are sent as an entry only.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    entries: Vec<u64>,
    data: Vec<u8>,
    zero_pages: u64,
    /// The entries as bytes, reused by [`BatchBuilder::send`].
    wire: Vec<u8>,
}

impl BatchBuilder {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the page at `gpa` (4 KiB aligned) holding `page`. Returns
    /// `true` when the batch is full and should be sent.
    pub fn add(&mut self, gpa: u64, page: &[u8; PAGE_SIZE]) -> bool {
        debug_assert_eq!(gpa % PAGE_SIZE as u64, 0);
        if is_zero(page) {
            self.zero_pages += 1;
            self.entries.push(gpa | ENTRY_ZERO);
        } else {
            self.entries.push(gpa);
            self.data.extend_from_slice(page);
        }
        self.is_full()
    }

    /// Adds the page at `gpa` whose bytes `fill` writes (straight into
    /// the batch: one copy from guest memory). Returns `true` when the
    /// batch is full and should be sent.
    pub fn add_with(&mut self, gpa: u64, fill: impl FnOnce(&mut [u8])) -> bool {
        debug_assert_eq!(gpa % PAGE_SIZE as u64, 0);
        let at = self.grow_page();
        fill(&mut self.data[at..]);
        self.commit_page(gpa, at)
    }

    /// Room for one more page at the end of the data; its offset. (The
    /// non-generic halves of [`BatchBuilder::add_with`] are compiled,
    /// optimised, in this crate.)
    #[inline(never)]
    fn grow_page(&mut self) -> usize {
        let at = self.data.len();
        self.data.resize(at + PAGE_SIZE, 0);
        at
    }

    /// Records the page written at `at`: as an entry only if it is zeros.
    #[inline(never)]
    fn commit_page(&mut self, gpa: u64, at: usize) -> bool {
        if is_zero(&self.data[at..]) {
            self.data.truncate(at);
            self.zero_pages += 1;
            self.entries.push(gpa | ENTRY_ZERO);
        } else {
            self.entries.push(gpa);
        }
        self.is_full()
    }

    /// Sends the batch as one memory-batch frame (nothing if it is empty);
    /// the builder is empty again and keeps its buffers.
    pub fn send<W: std::io::Write>(&mut self, w: &mut crate::FrameWriter<W>) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        self.encode_entries();
        let sent = w.write_parts(FrameKind::MemoryBatch, &[&self.wire, &self.data]);
        self.entries.clear();
        self.data.clear();
        sent
    }

    /// Sends the batch as one memory-batch-zstd frame (protocol version
    /// 2; nothing if it is empty), compressed through `scratch`.
    pub fn send_zstd<W: std::io::Write>(
        &mut self,
        w: &mut crate::FrameWriter<W>,
        scratch: &mut Vec<u8>,
    ) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        self.encode_entries();
        crate::compress::compress_parts(&[&self.wire, &self.data], scratch)?;
        let sent = w.write(FrameKind::MemoryBatchZstd, scratch);
        self.entries.clear();
        self.data.clear();
        sent
    }

    /// The page count and entries as bytes, into `wire`.
    fn encode_entries(&mut self) {
        self.wire.clear();
        self.wire
            .extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            self.wire.extend_from_slice(&e.to_le_bytes());
        }
    }

    /// Pages of zeros added since the builder was made (they travel as an
    /// entry only).
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }

    /// Whether no more pages fit.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= MAX_BATCH_PAGES
    }

    /// Pages added.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no page was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The payload of a [`FrameKind::MemoryBatch`] frame; the builder is
    /// empty again.
    pub fn take_payload(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.entries.len() + self.data.len());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.to_le_bytes());
        }
        out.extend_from_slice(&self.data);
        self.entries.clear();
        self.data.clear();
        out
    }
}

/// One state section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section<'a> {
    /// Section name (`vcpu`, `virtio-blk`, ...).
    pub name: &'a str,
    /// Instance (`0`, a device id).
    pub instance: &'a str,
    /// The section's own version.
    pub version: u32,
    /// Whether a receiver that does not know it may skip it.
    pub optional: bool,
    /// Its bytes, as the snapshot format encodes them.
    pub bytes: &'a [u8],
}

impl Section<'_> {
    /// The payload of a [`FrameKind::Section`] frame.
    pub fn encode(&self) -> Result<Vec<u8>> {
        for (what, s) in [("name", self.name), ("instance", self.instance)] {
            check_name(what, s.as_bytes())?;
        }
        let mut out =
            Vec::with_capacity(9 + self.name.len() + self.instance.len() + self.bytes.len());
        out.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.instance.len() as u16).to_le_bytes());
        out.extend_from_slice(self.instance.as_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(u8::from(self.optional));
        out.extend_from_slice(self.bytes);
        Ok(out)
    }
}

fn decode_error(kind: FrameKind, message: impl Into<String>) -> Error {
    Error::Decode {
        kind: kind.name().into(),
        message: message.into(),
    }
}

fn check_name(what: &str, s: &[u8]) -> Result<()> {
    let bad = |m: String| decode_error(FrameKind::Section, format!("section {what} {m}"));
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(bad(format!("of {} bytes (1..={MAX_NAME})", s.len())));
    }
    let text = std::str::from_utf8(s).map_err(|_| bad("is not UTF-8".into()))?;
    if text.chars().any(char::is_control) {
        return Err(bad(format!("{:?} has control characters", text)));
    }
    Ok(())
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Message<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Refusal`].
    Refuse(Refusal),
    /// See [`VmDescription`].
    VmDescription(VmDescription),
    /// The destination can run the VM.
    Accept,
    /// See [`MemoryBatch`].
    MemoryBatch(MemoryBatch<'a>),
    /// See [`RoundEnd`].
    RoundEnd(RoundEnd),
    /// See [`Section`].
    Section(Section<'a>),
    /// All state sent.
    StateDone,
    /// The VM runs on the destination.
    Resumed,
    /// See [`FilesOffer`].
    Files(FilesOffer),
    /// A compressed memory batch: see [`CompressedBatch`].
    MemoryBatchZstd(CompressedBatch<'a>),
    /// Post-copy: guest-physical `(start, length)` ranges the destination
    /// must not use before they arrive again.
    StalePages(Vec<(u64, u64)>),
    /// Post-copy: ranges the destination waits for (empty: keepalive).
    PageRequest(Vec<(u64, u64)>),
    /// Post-copy: every stale page was sent.
    PostcopyDone,
    /// Post-copy: every page is in place at the destination.
    PostcopyComplete,
    /// See [`Join`].
    Join(Join),
    /// A further connection has carried all its memory.
    ConnectionDone,
    /// The destination waits for the descriptors.
    FilesReady,
}

fn json<'de, T: Deserialize<'de>>(kind: FrameKind, payload: &'de [u8]) -> Result<T> {
    serde_json::from_slice(payload).map_err(|e| decode_error(kind, e.to_string()))
}

fn empty(kind: FrameKind, payload: &[u8]) -> Result<()> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(decode_error(
            kind,
            format!("{} bytes where none belong", payload.len()),
        ))
    }
}

impl<'a> Message<'a> {
    /// The memory batch this message carries, plain or zstd-compressed
    /// (decompressed into `unpacked`, bounded as [`CompressedBatch`]
    /// says); `None` for any other message.
    pub fn memory_batch<'b>(
        &'b self,
        unpacked: &'b mut Vec<u8>,
    ) -> Result<Option<MemoryBatch<'b>>> {
        match self {
            Message::MemoryBatch(b) => Ok(Some(b.clone())),
            Message::MemoryBatchZstd(c) => {
                c.decompress(unpacked)?;
                MemoryBatch::decode(unpacked).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Decodes a frame's payload as its kind says, checking every length
    /// and field against the payload it came in.
    pub fn decode(frame: &'a Frame) -> Result<Message<'a>> {
        let (kind, p) = (frame.kind, frame.payload.as_slice());
        Ok(match kind {
            FrameKind::Hello => Message::Hello(json(kind, p)?),
            FrameKind::Welcome => Message::Welcome(json(kind, p)?),
            FrameKind::Refuse => Message::Refuse(json(kind, p)?),
            FrameKind::VmDescription => Message::VmDescription(json(kind, p)?),
            FrameKind::Accept => {
                empty(kind, p)?;
                Message::Accept
            }
            FrameKind::RoundEnd => Message::RoundEnd(json(kind, p)?),
            FrameKind::StateDone => {
                empty(kind, p)?;
                Message::StateDone
            }
            FrameKind::Resumed => {
                empty(kind, p)?;
                Message::Resumed
            }
            FrameKind::Files => Message::Files(json(kind, p)?),
            FrameKind::MemoryBatchZstd => Message::MemoryBatchZstd(CompressedBatch::decode(p)?),
            FrameKind::StalePages => Message::StalePages(decode_ranges(kind, p)?),
            FrameKind::PageRequest => Message::PageRequest(decode_ranges(kind, p)?),
            FrameKind::PostcopyDone => {
                empty(kind, p)?;
                Message::PostcopyDone
            }
            FrameKind::PostcopyComplete => {
                empty(kind, p)?;
                Message::PostcopyComplete
            }
            FrameKind::Join => Message::Join(json(kind, p)?),
            FrameKind::ConnectionDone => {
                empty(kind, p)?;
                Message::ConnectionDone
            }
            FrameKind::FilesReady => {
                empty(kind, p)?;
                Message::FilesReady
            }
            FrameKind::MemoryBatch => Message::MemoryBatch(decode_batch(p)?),
            FrameKind::Section => Message::Section(decode_section(p)?),
        })
    }

    /// The frame this message is sent as: kind and payload. (Batches are
    /// built with [`BatchBuilder`], sections with [`Section::encode`].)
    pub fn encode(&self) -> Result<(FrameKind, Vec<u8>)> {
        let j = |v: serde_json::Result<Vec<u8>>| v.expect("serialising plain data");
        Ok(match self {
            Message::Hello(h) => (FrameKind::Hello, j(serde_json::to_vec(h))),
            Message::Welcome(w) => (FrameKind::Welcome, j(serde_json::to_vec(w))),
            Message::Refuse(r) => (FrameKind::Refuse, j(serde_json::to_vec(r))),
            Message::VmDescription(d) => (FrameKind::VmDescription, j(serde_json::to_vec(d))),
            Message::Accept => (FrameKind::Accept, Vec::new()),
            Message::RoundEnd(r) => (FrameKind::RoundEnd, j(serde_json::to_vec(r))),
            Message::StateDone => (FrameKind::StateDone, Vec::new()),
            Message::Resumed => (FrameKind::Resumed, Vec::new()),
            Message::Files(f) => (FrameKind::Files, j(serde_json::to_vec(f))),
            Message::StalePages(r) => (FrameKind::StalePages, encode_ranges(r)),
            Message::PageRequest(r) => (FrameKind::PageRequest, encode_ranges(r)),
            Message::PostcopyDone => (FrameKind::PostcopyDone, Vec::new()),
            Message::PostcopyComplete => (FrameKind::PostcopyComplete, Vec::new()),
            Message::Join(join) => (FrameKind::Join, j(serde_json::to_vec(join))),
            Message::ConnectionDone => (FrameKind::ConnectionDone, Vec::new()),
            Message::MemoryBatchZstd(c) => {
                let mut out = Vec::with_capacity(4 + c.data.len());
                out.extend_from_slice(&(c.len as u32).to_le_bytes());
                out.extend_from_slice(c.data);
                (FrameKind::MemoryBatchZstd, out)
            }
            Message::FilesReady => (FrameKind::FilesReady, Vec::new()),
            Message::Section(s) => (FrameKind::Section, s.encode()?),
            Message::MemoryBatch(b) => {
                let mut out = Vec::new();
                out.extend_from_slice(&(b.entries.len() as u32).to_le_bytes());
                for e in &b.entries {
                    out.extend_from_slice(&e.to_le_bytes());
                }
                out.extend_from_slice(b.data);
                (FrameKind::MemoryBatch, out)
            }
        })
    }

    /// The message's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Hello(_) => FrameKind::Hello,
            Message::Welcome(_) => FrameKind::Welcome,
            Message::Refuse(_) => FrameKind::Refuse,
            Message::VmDescription(_) => FrameKind::VmDescription,
            Message::Accept => FrameKind::Accept,
            Message::MemoryBatch(_) => FrameKind::MemoryBatch,
            Message::RoundEnd(_) => FrameKind::RoundEnd,
            Message::Section(_) => FrameKind::Section,
            Message::StateDone => FrameKind::StateDone,
            Message::Resumed => FrameKind::Resumed,
            Message::Files(_) => FrameKind::Files,
            Message::MemoryBatchZstd(_) => FrameKind::MemoryBatchZstd,
            Message::StalePages(_) => FrameKind::StalePages,
            Message::PageRequest(_) => FrameKind::PageRequest,
            Message::PostcopyDone => FrameKind::PostcopyDone,
            Message::PostcopyComplete => FrameKind::PostcopyComplete,
            Message::Join(_) => FrameKind::Join,
            Message::ConnectionDone => FrameKind::ConnectionDone,
            Message::FilesReady => FrameKind::FilesReady,
        }
    }
}

/// The most ranges one stale-pages or page-request frame carries.
pub const MAX_RANGES: usize = 1 << 16;

fn encode_ranges(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * ranges.len());
    for (start, len) in ranges {
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    out
}

/// `(start, length)` pairs of u64, both page aligned, lengths non-zero,
/// no range wrapping around, at most [`MAX_RANGES`].
fn decode_ranges(kind: FrameKind, p: &[u8]) -> Result<Vec<(u64, u64)>> {
    let bad = |m: String| decode_error(kind, m);
    if !p.len().is_multiple_of(16) {
        return Err(bad(format!(
            "{} bytes is not a whole number of 16-byte ranges",
            p.len()
        )));
    }
    if p.len() / 16 > MAX_RANGES {
        return Err(bad(format!(
            "{} ranges (at most {MAX_RANGES})",
            p.len() / 16
        )));
    }
    let page = PAGE_SIZE as u64;
    p.chunks_exact(16)
        .map(|c| {
            let start = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
            let len = u64::from_le_bytes(c[8..].try_into().expect("8 bytes"));
            if start % page != 0 || len % page != 0 || len == 0 || start.checked_add(len).is_none()
            {
                return Err(bad(format!(
                    "range {start:#x}+{len:#x} is not a non-empty run of whole pages"
                )));
            }
            Ok((start, len))
        })
        .collect()
}

fn decode_batch(p: &[u8]) -> Result<MemoryBatch<'_>> {
    let kind = FrameKind::MemoryBatch;
    let bad = |m: String| decode_error(kind, m);
    if p.len() < 4 {
        return Err(bad(format!(
            "{} bytes, shorter than its page count",
            p.len()
        )));
    }
    let count = u32::from_le_bytes(p[..4].try_into().expect("4 bytes")) as usize;
    if count == 0 || count > MAX_BATCH_PAGES {
        return Err(bad(format!("{count} pages (1..={MAX_BATCH_PAGES})")));
    }
    let entries_end = 4 + 8 * count;
    if p.len() < entries_end {
        return Err(bad(format!(
            "{} bytes cannot hold the entries of {count} pages",
            p.len()
        )));
    }
    let mut entries = Vec::with_capacity(count);
    let mut data_pages = 0usize;
    for (i, e) in p[4..entries_end].chunks_exact(8).enumerate() {
        let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
        match e & (PAGE_SIZE as u64 - 1) {
            0 => data_pages += 1,
            ENTRY_ZERO => {}
            k => {
                return Err(bad(format!(
                    "page {i} (guest physical {:#x}) has kind {k}, not 0 (data) or 1 (zeros)",
                    e & !(PAGE_SIZE as u64 - 1)
                )))
            }
        }
        entries.push(e);
    }
    let want = entries_end + data_pages * PAGE_SIZE;
    if p.len() != want {
        return Err(bad(format!(
            "{} bytes, but {count} pages of which {data_pages} carry data make {want}",
            p.len()
        )));
    }
    Ok(MemoryBatch {
        entries,
        data: &p[entries_end..],
    })
}

fn decode_section(p: &[u8]) -> Result<Section<'_>> {
    let kind = FrameKind::Section;
    let short = || decode_error(kind, format!("{} bytes, cut short", p.len()));
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8]> {
        let s = p.get(at..at + n).ok_or_else(short)?;
        at += n;
        Ok(s)
    };
    let name_len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
    let name = take(name_len)?;
    let inst_len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
    let instance = take(inst_len)?;
    let version = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
    let flags = take(1)?[0];
    check_name("name", name)?;
    check_name("instance", instance)?;
    if flags & !1 != 0 {
        return Err(decode_error(
            kind,
            format!("flags {flags:#04x}: only bit 0 (optional) is defined"),
        ));
    }
    let (name, instance) = (
        std::str::from_utf8(name).expect("checked"),
        std::str::from_utf8(instance).expect("checked"),
    );
    Ok(Section {
        name,
        instance,
        version,
        optional: flags & 1 != 0,
        bytes: &p[at..],
    })
}
