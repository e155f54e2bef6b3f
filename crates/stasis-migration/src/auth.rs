//! Who is on the other end, and nobody else reading or changing the
//! stream: the layer under the frames (docs/MIGRATION.md §6).
//!
//! Before the migration preamble each side sends `STASISAU`, a version
//! byte, its method (0 = none, 1 = pre-shared key) and a 32-byte random
//! nonce. Both must use the same method. With a pre-shared key each side
//! proves it holds the key with HMAC-SHA256 over its role and both nonces
//! (a proof cannot be replayed into another connection or reflected back
//! as the other role); a wrong key is refused before any frame, and so
//! before any VM state, is read. Then every byte in each direction travels
//! in records sealed with AES-256-GCM under a key of its own
//! derived with HKDF-SHA256 from the shared key and both nonces; a record
//! changed, dropped, replayed or reordered fails to open and ends the
//! migration.
//!
//! With mutual TLS (method 2, [`crate::tls`]) a TLS 1.3 handshake with
//! certificates on both sides replaces the key proofs, and the two
//! record keys are exported from it (RFC 8446 §7.5); the records are the
//! same.
//!
//! The primitives come from the RustCrypto crates (`hmac`, `sha2`,
//! `hkdf`, `aes-gcm`: AES-NI and carry-less multiplication where the CPU
//! has them, several GB/s, where ChaCha20-Poly1305 measured a third of
//! that here); only the record framing, a few lines, is written here.
//! TLS (rustls) has no pre-shared-key mode for this, and its streams
//! cannot be split into a reading and a writing half used by two
//! threads, which post-copy and parallel connections need: hence TLS for
//! the handshake only.

use std::io::{self, Read, Write};
use std::path::Path;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Key as AeadKey, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

/// The first bytes of each direction, before the migration preamble.
pub const AUTH_PREAMBLE: [u8; 8] = *b"STASISAU";
/// Version of this layer.
const AUTH_VERSION: u8 = 1;
/// Plaintext bytes per sealed record, at most.
pub const MAX_RECORD: usize = 256 << 10;
/// A key file's size limits.
const MIN_KEY: usize = 16;
const MAX_KEY: usize = 4096;
const TAG: usize = 16;

/// A pre-shared key (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

impl Key {
    /// A key from bytes (at least 16).
    pub fn new(bytes: Vec<u8>) -> std::result::Result<Key, String> {
        if !(MIN_KEY..=MAX_KEY).contains(&bytes.len()) {
            return Err(format!(
                "a pre-shared key must be {MIN_KEY} to {MAX_KEY} bytes, this one is {}",
                bytes.len()
            ));
        }
        Ok(Key(bytes))
    }

    /// The key's bytes (to hand it to a VMM that may not open the file).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Reads a key file: a regular file (no symlink), readable by its
    /// owner only, of 16 to 4096 bytes (a trailing newline is not part of
    /// the key). Every refusal names the file and what to do.
    pub fn from_file(path: &Path) -> std::result::Result<Key, String> {
        let what = "pre-shared key file";
        let mut bytes = read_private_file(path, what, MAX_KEY as u64 + 2)?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        Key::new(bytes).map_err(|e| format!("{what} {}: {e}", path.display()))
    }
}

/// Reads a secret (`what`, for messages: "pre-shared key file"): a
/// regular file (no symlink; a FIFO does not hang the open), readable by
/// its owner only; at most `limit` bytes. Every refusal names the file
/// and what to do.
pub(crate) fn read_private_file(
    path: &Path,
    what: &str,
    limit: u64,
) -> std::result::Result<Vec<u8>, String> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let p = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{what} {p}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("{what} {p}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{what} {p} is not a regular file"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{what} {p} can be read by others (mode {:o}): make it readable by its owner only (chmod 600)",
            meta.mode() & 0o777
        ));
    }
    let mut bytes = Vec::new();
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{what} {p}: {e}"))?;
    Ok(bytes)
}

/// How a connection is authenticated.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Not at all (a receiver allows this only on loopback, when told).
    None,
    /// A key both sides hold; the stream is encrypted with keys from it.
    Psk(Key),
    /// Mutual TLS: each side shows a certificate the other's CA signed.
    Tls(crate::tls::TlsAuth),
}

impl Auth {
    fn method(&self) -> u8 {
        match self {
            Auth::None => 0,
            Auth::Psk(_) => 1,
            Auth::Tls(_) => 2,
        }
    }
}

fn method_name(m: u8) -> String {
    match m {
        0 => "no authentication (--insecure)".into(),
        1 => "a pre-shared key (--psk)".into(),
        2 => "mutual TLS (--tls-cert, --tls-key, --tls-ca)".into(),
        m => format!("unknown method {m}"),
    }
}

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side sending the VM.
    Source,
    /// The side receiving it.
    Destination,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Source => b"source",
            Role::Destination => b"destination",
        }
    }
    fn other(self) -> Role {
        match self {
            Role::Source => Role::Destination,
            Role::Destination => Role::Source,
        }
    }
}

fn io(context: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        context: context.to_string(),
        source,
    }
}

pub(crate) fn random_nonce() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    let mut got = 0;
    while got < n.len() {
        // SAFETY: getrandom writes at most `len - got` bytes at the offset,
        // inside `n`.
        let r = unsafe { libc::getrandom(n[got..].as_mut_ptr().cast(), n.len() - got, 0) };
        if r <= 0 {
            return Err(Error::Auth(
                "cannot get random bytes from the kernel".into(),
            ));
        }
        got += r as usize;
    }
    Ok(n)
}

fn proof(key: &Key, role: Role, source_nonce: &[u8; 32], dest_nonce: &[u8; 32]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.0).expect("HMAC takes any key size");
    mac.update(b"stasis-migration v1 proof ");
    mac.update(role.label());
    mac.update(source_nonce);
    mac.update(dest_nonce);
    mac
}

fn direction_key(key: &Key, salt: &[u8], from: Role) -> [u8; 32] {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), &key.0);
    let mut okm = [0u8; 32];
    let info: &[u8] = match from {
        Role::Source => b"stasis-migration v1 source to destination",
        Role::Destination => b"stasis-migration v1 destination to source",
    };
    hk.expand(info, &mut okm)
        .expect("32 bytes is a valid HKDF length");
    okm
}

/// The two halves carrying sealed records: `to_destination` keys what the
/// source sends, `to_source` what the destination sends.
fn sealed<R: Read, W: Write>(
    r: R,
    w: W,
    role: Role,
    to_destination: [u8; 32],
    to_source: [u8; 32],
) -> (ChannelReader<R>, ChannelWriter<W>) {
    let (mine, theirs) = match role {
        Role::Source => (to_destination, to_source),
        Role::Destination => (to_source, to_destination),
    };
    let aead = |k: [u8; 32]| Aes256Gcm::new(AeadKey::<Aes256Gcm>::from_slice(&k));
    (
        ChannelReader::Sealed(Box::new(SealedReader {
            inner: r,
            aead: aead(theirs),
            counter: 0,
            plain: Vec::new(),
            pos: 0,
        })),
        ChannelWriter::Sealed(Box::new(SealedWriter {
            inner: w,
            aead: aead(mine),
            counter: 0,
            plain: Vec::with_capacity(MAX_RECORD),
        })),
    )
}

/// Authenticates the connection (`r` from the peer, `w` to it) as `role`
/// with `auth`, and returns the two halves to carry the migration.
pub fn secure<R: Read, W: Write>(
    mut r: R,
    mut w: W,
    role: Role,
    auth: &Auth,
) -> Result<(ChannelReader<R>, ChannelWriter<W>)> {
    let ours = random_nonce()?;
    let mut hello = Vec::with_capacity(42);
    hello.extend_from_slice(&AUTH_PREAMBLE);
    hello.push(AUTH_VERSION);
    hello.push(auth.method());
    hello.extend_from_slice(&ours);
    w.write_all(&hello)
        .and_then(|()| w.flush())
        .map_err(io("sending the authentication hello"))?;
    let mut theirs = [0u8; 42];
    r.read_exact(&mut theirs).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Auth(
            "the peer closed the connection during authentication (does it use the same --psk or --insecure?)".into(),
        ),
        _ => io("reading the peer's authentication hello")(e),
    })?;
    if theirs[..8] != AUTH_PREAMBLE {
        return Err(Error::NotMigrationStream {
            found: theirs[..8].escape_ascii().to_string(),
        });
    }
    if theirs[8] != AUTH_VERSION {
        return Err(Error::Auth(format!(
            "the peer's authentication layer is version {}, this side's {AUTH_VERSION}",
            theirs[8]
        )));
    }
    if theirs[9] != auth.method() {
        return Err(Error::Auth(format!(
            "this side uses {}, the peer {}: both need --psk with the same key file (or a receiver on loopback with --insecure)",
            method_name(auth.method()),
            method_name(theirs[9])
        )));
    }
    let peer: [u8; 32] = theirs[10..].try_into().expect("32 bytes");
    let (source_nonce, dest_nonce) = match role {
        Role::Source => (ours, peer),
        Role::Destination => (peer, ours),
    };
    let key = match auth {
        Auth::None => return Ok((ChannelReader::Plain(r), ChannelWriter::Plain(w))),
        Auth::Psk(k) => k,
        Auth::Tls(t) => {
            let (to_d, to_s) =
                crate::tls::handshake(&mut r, &mut w, role, t, &source_nonce, &dest_nonce)?;
            return Ok(sealed(r, w, role, to_d, to_s));
        }
    };
    let mine = proof(key, role, &source_nonce, &dest_nonce)
        .finalize()
        .into_bytes();
    w.write_all(&mine)
        .and_then(|()| w.flush())
        .map_err(io("sending the key proof"))?;
    let mut got = [0u8; 32];
    r.read_exact(&mut got).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Auth(
            "the peer closed the connection after seeing this side's key proof: the keys differ"
                .into(),
        ),
        _ => io("reading the peer's key proof")(e),
    })?;
    proof(key, role.other(), &source_nonce, &dest_nonce)
        .verify_slice(&got)
        .map_err(|_| {
            Error::Auth(
                "wrong pre-shared key: the peer's proof does not match this side's key (both need the same --psk file)".into(),
            )
        })?;
    let mut salt = Vec::with_capacity(64);
    salt.extend_from_slice(&source_nonce);
    salt.extend_from_slice(&dest_nonce);
    Ok(sealed(
        r,
        w,
        role,
        direction_key(key, &salt, Role::Source),
        direction_key(key, &salt, Role::Destination),
    ))
}

fn nonce(counter: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    *Nonce::from_slice(&n)
}

// The two functions below are not generic on purpose: they are compiled
// (optimised) here, not in whichever crate instantiates the reader and
// writer over its stream type.

/// Seals `plain` in place; returns the tag.
#[inline(never)]
fn seal_record(
    aead: &Aes256Gcm,
    counter: u64,
    header: &[u8; 4],
    plain: &mut [u8],
) -> io::Result<Tag> {
    aead.encrypt_in_place_detached(&nonce(counter), header, plain)
        .map_err(|_| io::Error::other("cannot seal a record"))
}

/// Opens a record (`sealed` = ciphertext then tag) in place, leaving the
/// plaintext.
#[inline(never)]
fn open_record(
    aead: &Aes256Gcm,
    counter: u64,
    header: &[u8; 4],
    sealed: &mut Vec<u8>,
) -> io::Result<()> {
    let len = sealed.len() - TAG;
    let tag = Tag::clone_from_slice(&sealed[len..]);
    sealed.truncate(len);
    aead.decrypt_in_place_detached(&nonce(counter), header, sealed, &tag)
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a sealed record failed authentication: the stream was changed in transit or is not from the peer",
            )
        })
}

/// The receiving half of a connection: plain, or opening sealed records.
pub enum ChannelReader<R: Read> {
    /// No authentication.
    Plain(R),
    /// Sealed records (boxed: the cipher's key schedule is large).
    Sealed(Box<SealedReader<R>>),
}

/// The sending half of a connection: plain, or sealing records.
pub enum ChannelWriter<W: Write> {
    /// No authentication.
    Plain(W),
    /// Sealed records (boxed: the cipher's key schedule is large).
    Sealed(Box<SealedWriter<W>>),
}

/// Opens sealed records.
pub struct SealedReader<R: Read> {
    inner: R,
    aead: Aes256Gcm,
    counter: u64,
    plain: Vec<u8>,
    pos: usize,
}

/// Seals records.
pub struct SealedWriter<W: Write> {
    inner: W,
    aead: Aes256Gcm,
    counter: u64,
    plain: Vec<u8>,
}

impl<R: Read> SealedReader<R> {
    /// The next record's plaintext; `false` at a clean end of stream.
    fn next_record(&mut self) -> io::Result<bool> {
        let mut header = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the stream ended inside a sealed record",
                    ))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let len = u32::from_le_bytes(header) as usize;
        if len == 0 || len > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("sealed record of {len} bytes (1..={MAX_RECORD}): the stream is damaged or not from the peer"),
            ));
        }
        crate::frame::zeroed(&mut self.plain, len + TAG);
        self.inner.read_exact(&mut self.plain)?;
        open_record(&self.aead, self.counter, &header, &mut self.plain)?;
        self.counter += 1;
        self.pos = 0;
        Ok(true)
    }
}

impl<R: Read> Read for SealedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.plain.len() && !self.next_record()? {
            return Ok(0);
        }
        let n = buf.len().min(self.plain.len() - self.pos);
        buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl<W: Write> SealedWriter<W> {
    fn seal(&mut self) -> io::Result<()> {
        if self.plain.is_empty() {
            return Ok(());
        }
        let header = (self.plain.len() as u32).to_le_bytes();
        let tag = seal_record(&self.aead, self.counter, &header, &mut self.plain)?;
        self.counter += 1;
        self.inner.write_all(&header)?;
        self.inner.write_all(&self.plain)?;
        self.inner.write_all(&tag)?;
        self.plain.clear();
        Ok(())
    }
}

impl<W: Write> Write for SealedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(MAX_RECORD - self.plain.len());
        self.plain.extend_from_slice(&buf[..n]);
        if self.plain.len() == MAX_RECORD {
            self.seal()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.seal()?;
        self.inner.flush()
    }
}

impl<R: Read> Read for ChannelReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ChannelReader::Plain(r) => r.read(buf),
            ChannelReader::Sealed(r) => r.read(buf),
        }
    }
}

impl<W: Write> Write for ChannelWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ChannelWriter::Plain(w) => w.write(buf),
            ChannelWriter::Sealed(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            ChannelWriter::Plain(w) => w.flush(),
            ChannelWriter::Sealed(w) => w.flush(),
        }
    }
}
