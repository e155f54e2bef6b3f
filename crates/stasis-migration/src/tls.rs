//! Mutual TLS for the authentication layer (docs/MIGRATION.md §6): a TLS
//! 1.3 handshake (rustls, the `ring` provider) in which the destination
//! shows a certificate for the name the source connects to and the source
//! shows a client certificate, each signed by the CA the other side was
//! given. Once both Finished messages are checked, each side exports 64
//! bytes of keying material (RFC 8446 §7.5, label
//! `EXPORTER-stasis-migration-v1`, context: both nonces of the
//! authentication hello) and the stream goes on in the layer's own sealed
//! records under those keys; TLS itself carries one short "ready"
//! record each way after the handshake and nothing more. So that no byte past the handshake is swallowed by TLS, it
//! reads the stream one TLS record at a time, never past a record's end,
//! and the destination sends no session tickets.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::auth::Role;
use crate::error::{Error, Result};

const EXPORTER_LABEL: &[u8] = b"EXPORTER-stasis-migration-v1";

/// Certificates and key of one side, and the CA it trusts for the other.
#[derive(Clone)]
pub struct TlsAuth {
    certs: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    /// The name the source expects in the destination's certificate (the
    /// host it connects to); unused on the destination.
    pub server_name: Option<String>,
    files: String,
}

impl std::fmt::Debug for TlsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsAuth({})", self.files)
    }
}

/// The three files of [`TlsAuth::from_files`].
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This side's certificate chain (PEM), its own first.
    pub cert: PathBuf,
    /// Its private key (PEM), readable by its owner only.
    pub key: PathBuf,
    /// The CA certificate(s) (PEM) the peer's certificate must chain to.
    pub ca: PathBuf,
}

/// The contents of a [`TlsFiles`], read by the side that may open them
/// (the `stasis migrate` client) for a VMM that may not (it is confined
/// to its state directories).
#[derive(Clone)]
pub struct TlsPem {
    /// The certificate chain (PEM).
    pub cert: Vec<u8>,
    /// The private key (PEM).
    pub key: Vec<u8>,
    /// The CA certificate(s) (PEM).
    pub ca: Vec<u8>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsPem { .. }")
    }
}

impl TlsFiles {
    /// Reads the three files (the key: a regular file readable by its
    /// owner only), each at most 1 MiB. Every refusal names the file.
    pub fn read(&self) -> std::result::Result<TlsPem, String> {
        let public = |path: &Path, what: &str| -> std::result::Result<Vec<u8>, String> {
            let bytes =
                std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
            if bytes.len() > 1 << 20 {
                return Err(format!("{what} {}: larger than 1 MiB", path.display()));
            }
            Ok(bytes)
        };
        Ok(TlsPem {
            cert: public(&self.cert, "TLS certificate file")?,
            key: crate::auth::read_private_file(&self.key, "TLS key file", 1 << 20)?,
            ca: public(&self.ca, "TLS CA file")?,
        })
    }
}

/// The certificates in PEM `bytes`; `what` names the file in messages.
fn certs(bytes: &[u8], what: &str) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let all: std::result::Result<Vec<_>, _> = CertificateDer::pem_slice_iter(bytes).collect();
    let all = all.map_err(|e| format!("{what}: {e}"))?;
    if all.is_empty() {
        return Err(format!("{what} holds no PEM certificate"));
    }
    Ok(all)
}

impl TlsAuth {
    /// Reads the certificate chain, the private key (a file readable by
    /// its owner only) and the CA. Every refusal names the file.
    pub fn from_files(files: &TlsFiles) -> std::result::Result<TlsAuth, String> {
        let pem = files.read()?;
        let name = |p: &Path| p.display().to_string();
        TlsAuth::from_pem(
            &pem,
            [&name(&files.cert), &name(&files.key), &name(&files.ca)],
        )
    }

    /// The identity in `pem`, read elsewhere; `names` (certificate, key,
    /// CA) name its parts in messages.
    pub fn from_pem(pem: &TlsPem, names: [&str; 3]) -> std::result::Result<TlsAuth, String> {
        let [cert_name, key_name, ca_name] = names;
        let chain = certs(&pem.cert, &format!("TLS certificate file {cert_name}"))?;
        let key = PrivateKeyDer::from_pem_slice(&pem.key)
            .map_err(|e| format!("TLS key file {key_name}: {e}"))?;
        let mut roots = RootCertStore::empty();
        for c in certs(&pem.ca, &format!("TLS CA file {ca_name}"))? {
            roots
                .add(c)
                .map_err(|e| format!("TLS CA file {ca_name}: {e}"))?;
        }
        Ok(TlsAuth {
            certs: chain,
            key: Arc::new(key),
            roots: Arc::new(roots),
            server_name: None,
            files: cert_name.to_string(),
        })
    }

    /// The same identity expecting the destination to be `name`.
    pub fn for_server(mut self, name: &str) -> Self {
        self.server_name = Some(name.to_string());
        self
    }
}

fn tls_error(e: impl std::fmt::Display) -> Error {
    Error::Auth(format!("TLS: {e}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the stream one whole TLS record at a time and never past the
/// end of one, so that what follows the handshake stays in the stream.
struct RecordReader<'a, R: Read> {
    inner: &'a mut R,
    /// Bytes of the current record still to hand out.
    left: usize,
}

impl<R: Read> Read for RecordReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            if buf.len() < 5 {
                return Err(io::Error::other("TLS read buffer too small"));
            }
            let mut header = [0u8; 5];
            self.inner.read_exact(&mut header)?;
            buf[..5].copy_from_slice(&header);
            self.left = u16::from_be_bytes([header[3], header[4]]) as usize;
            return Ok(5);
        }
        let n = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= got;
        Ok(got)
    }
}

/// Drives a handshake to its end over `r`/`w`.
fn drive<R: Read, W: Write, D>(
    conn: &mut rustls::ConnectionCommon<D>,
    r: &mut R,
    w: &mut W,
) -> Result<()> {
    let mut reader = RecordReader { inner: r, left: 0 };
    loop {
        while conn.wants_write() {
            conn.write_tls(w).map_err(tls_error)?;
        }
        w.flush().map_err(tls_error)?;
        if !conn.is_handshaking() {
            return Ok(());
        }
        match conn.read_tls(&mut reader) {
            Ok(0) => {
                return Err(Error::Auth(
                    "TLS: the peer closed the connection during the handshake (is its certificate signed by this side's CA, and this side's by its?)".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(tls_error(e)),
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (an alert), then give up.
            let _ = conn.write_tls(w);
            let _ = w.flush();
            return Err(tls_error(e));
        }
    }
}

const READY: &[u8; 16] = b"stasis-tls-ready";

/// After the handshake each side sends [`READY`] as TLS application data
/// and reads the other's: a destination that refused this side's
/// certificate (which TLS 1.3 tells the client only after its own
/// handshake ended) is named here, with its alert, before any frame.
fn confirm<R: Read, W: Write, D>(
    conn: &mut rustls::ConnectionCommon<D>,
    r: &mut R,
    w: &mut W,
) -> Result<()> {
    conn.writer().write_all(READY).map_err(tls_error)?;
    // A peer that refused this side's certificate has sent its alert and
    // may have closed already: a failed write here is not the story, the
    // alert waiting to be read is.
    let mut sent: io::Result<()> = Ok(());
    while conn.wants_write() && sent.is_ok() {
        sent = conn.write_tls(w).map(drop);
    }
    let sent = sent.and_then(|()| w.flush());
    let mut reader = RecordReader { inner: r, left: 0 };
    let mut got = Vec::new();
    while got.len() < READY.len() {
        match conn.read_tls(&mut reader) {
            Ok(0) => {
                return Err(Error::Auth(
                    "TLS: the peer closed the connection after the handshake: it did not accept this side's certificate (is it signed by the CA the peer was given with --tls-ca?)".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Error::Auth(format!(
                    "TLS: the peer ended the connection after the handshake ({e}): it did not accept this side's certificate (is it signed by the CA the peer was given with --tls-ca?)"
                )))
            }
        }
        conn.process_new_packets().map_err(tls_error)?;
        let mut buf = [0u8; 16];
        match conn.reader().read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(tls_error(e)),
        }
    }
    sent.map_err(tls_error)?;
    if got != READY {
        return Err(Error::Auth(
            "TLS: the peer is not a stasis migration endpoint".into(),
        ));
    }
    Ok(())
}

/// The TLS handshake as `role`; returns the record keys (source to
/// destination, destination to source).
pub(crate) fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    role: Role,
    auth: &TlsAuth,
    source_nonce: &[u8; 32],
    dest_nonce: &[u8; 32],
) -> Result<([u8; 32], [u8; 32])> {
    let mut context = Vec::with_capacity(64);
    context.extend_from_slice(source_nonce);
    context.extend_from_slice(dest_nonce);
    let mut okm = [0u8; 64];
    let versions = &[&rustls::version::TLS13];
    match role {
        Role::Source => {
            let name = auth
                .server_name
                .clone()
                .ok_or_else(|| Error::Auth("TLS: the destination's name is not known".into()))?;
            let name = ServerName::try_from(name.clone())
                .map_err(|e| Error::Auth(format!("TLS: '{name}' is not a server name: {e}")))?;
            let mut config = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .map_err(tls_error)?
                .with_root_certificates(auth.roots.clone())
                .with_client_auth_cert(auth.certs.clone(), auth.key.clone_key())
                .map_err(tls_error)?;
            config.resumption = rustls::client::Resumption::disabled();
            let mut conn = ClientConnection::new(Arc::new(config), name).map_err(tls_error)?;
            drive(&mut conn, r, w)?;
            confirm(&mut conn, r, w)?;
            conn.export_keying_material(&mut okm, EXPORTER_LABEL, Some(&context))
                .map_err(tls_error)?;
        }
        Role::Destination => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(auth.roots.clone(), provider())
                    .build()
                    .map_err(tls_error)?;
            let mut config = ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .map_err(tls_error)?
                .with_client_cert_verifier(verifier)
                .with_single_cert(auth.certs.clone(), auth.key.clone_key())
                .map_err(tls_error)?;
            config.send_tls13_tickets = 0;
            let mut conn = ServerConnection::new(Arc::new(config)).map_err(tls_error)?;
            drive(&mut conn, r, w)?;
            confirm(&mut conn, r, w)?;
            conn.export_keying_material(&mut okm, EXPORTER_LABEL, Some(&context))
                .map_err(tls_error)?;
        }
    }
    let to_destination: [u8; 32] = okm[..32].try_into().expect("32 bytes");
    let to_source: [u8; 32] = okm[32..].try_into().expect("32 bytes");
    Ok((to_destination, to_source))
}
