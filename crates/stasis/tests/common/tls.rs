//! Certificates for the mutual-TLS tests: a CA, and certificates it signs
//! written as PEM files (keys readable by their owner only).
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// Writes `dir/prefix.crt` (for `names`, signed by this CA),
    /// `dir/prefix.key` (mode 600) and `dir/prefix.ca` (`trust`'s
    /// certificate); returns the `--tls-cert/--tls-key/--tls-ca` flags.
    pub fn issue(&self, dir: &Path, prefix: &str, names: &[&str], trust: &Ca) -> Vec<String> {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let path = |ext: &str| -> PathBuf { dir.join(format!("{prefix}.{ext}")) };
        std::fs::write(path("crt"), cert.pem()).unwrap();
        std::fs::write(path("key"), key.serialize_pem()).unwrap();
        std::fs::set_permissions(path("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(path("ca"), trust.cert.pem()).unwrap();
        let flag = |f: &str, ext: &str| [f.to_string(), path(ext).display().to_string()];
        [
            flag("--tls-cert", "crt"),
            flag("--tls-key", "key"),
            flag("--tls-ca", "ca"),
        ]
        .concat()
    }
}
