//! Mutual TLS under the frames, over real socket pairs: certificates from
//! the same CA carry frames both ways (sealed with keys exported from the
//! handshake); a certificate from another CA, a destination whose
//! certificate names another host, and a key file others can read are
//! refused by name.

mod common;
use common::exchange;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use stasis_migration::Auth;
use stasis_migration::{TlsAuth, TlsFiles};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
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

/// Writes a certificate for `names` signed by `ca`, its key (mode 600) and
/// the CA certificate `trust` into `dir/prefix.*`.
fn files(dir: &Path, prefix: &str, ca: &Ca, names: &[&str], trust: &Ca) -> TlsFiles {
    let key = KeyPair::generate().unwrap();
    let p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let path = |ext: &str| -> PathBuf { dir.join(format!("{prefix}.{ext}")) };
    std::fs::write(path("crt"), cert.pem()).unwrap();
    std::fs::write(path("key"), key.serialize_pem()).unwrap();
    std::fs::set_permissions(path("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(path("ca"), trust.cert.pem()).unwrap();
    TlsFiles {
        cert: path("crt"),
        key: path("key"),
        ca: path("ca"),
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stasis-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tls(f: &TlsFiles, server: Option<&str>) -> Auth {
    let t = TlsAuth::from_files(f).unwrap();
    Auth::Tls(match server {
        Some(n) => t.for_server(n),
        None => t,
    })
}

#[test]
fn certificates_of_one_ca_carry_frames_both_ways() {
    let dir = scratch("ok");
    let ca = ca("stasis test CA");
    let server = files(&dir, "server", &ca, &["10.0.0.2", "hostb"], &ca);
    let client = files(&dir, "client", &ca, &["hosta"], &ca);
    let payload: Vec<u8> = (0..700_000u32).map(|i| (i * 13) as u8).collect();
    for name in ["10.0.0.2", "hostb"] {
        let (s, d) = exchange(
            tls(&client, Some(name)),
            tls(&server, None),
            payload.clone(),
        );
        d.unwrap();
        assert_eq!(s.unwrap(), payload, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_certificate_from_another_ca_or_for_another_host_is_refused() {
    let dir = scratch("bad");
    let ca1 = ca("CA one");
    let ca2 = ca("CA two");
    let server = files(&dir, "server", &ca1, &["10.0.0.2"], &ca1);
    let stranger = files(&dir, "stranger", &ca2, &["hosta"], &ca1);
    let (s, d) = exchange(
        tls(&stranger, Some("10.0.0.2")),
        tls(&server, None),
        b"secret".to_vec(),
    );
    let d = d.unwrap_err().to_string();
    assert!(
        d.contains("TLS") && d.to_lowercase().contains("unknown"),
        "{d}"
    );
    let s = s.unwrap_err().to_string();
    assert!(
        s.contains("TLS") && s.contains("UnknownCA"),
        "the peer's alert: {s}"
    );
    let client = files(&dir, "client", &ca1, &["hosta"], &ca1);
    let (s, d) = exchange(
        tls(&client, Some("10.0.0.9")),
        tls(&server, None),
        b"secret".to_vec(),
    );
    let s = s.unwrap_err().to_string();
    assert!(s.contains("TLS") && s.contains("10.0.0.9"), "{s}");
    assert!(d.is_err());
    let (s, d) = exchange(tls(&client, Some("10.0.0.2")), Auth::None, b"x".to_vec());
    assert!(s.unwrap_err().to_string().contains("mutual TLS"));
    assert!(d.unwrap_err().to_string().contains("mutual TLS"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    let dir = scratch("mode");
    let ca = ca("CA");
    let f = files(&dir, "server", &ca, &["hostb"], &ca);
    std::fs::set_permissions(&f.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = TlsAuth::from_files(&f).unwrap_err();
    assert!(
        e.contains("can be read by others") && e.contains("chmod 600"),
        "{e}"
    );
    let missing = TlsFiles {
        ca: dir.join("nope.pem"),
        ..f
    };
    std::fs::set_permissions(&missing.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = TlsAuth::from_files(&missing).unwrap_err();
    assert!(e.contains("TLS CA file") && e.contains("nope.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
