//! The authentication layer over real socket pairs, each side on its own
//! thread: the same key carries frames both ways; a wrong key, a missing
//! key and a changed byte are refused by name; key files are checked.

mod common;
use common::exchange;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::thread;

use stasis_migration::{secure, Auth, FrameKind, FrameReader, FrameWriter, Key, Role};

fn key(b: u8) -> Auth {
    Auth::Psk(Key::new(vec![b; 32]).unwrap())
}

#[test]
fn the_same_key_carries_frames_both_ways_sealed() {
    let payload: Vec<u8> = (0..700_000u32).map(|i| (i * 7) as u8).collect();
    let (s, d) = exchange(key(1), key(1), payload.clone());
    d.unwrap();
    assert_eq!(s.unwrap(), payload);
    let (s, d) = exchange(Auth::None, Auth::None, b"plain".to_vec());
    d.unwrap();
    assert_eq!(s.unwrap(), b"plain");
}

#[test]
fn a_wrong_key_is_refused_on_both_sides_before_any_frame() {
    let (s, d) = exchange(key(1), key(2), b"secret".to_vec());
    for e in [s.unwrap_err().to_string(), d.unwrap_err().to_string()] {
        assert!(e.contains("wrong pre-shared key"), "{e}");
    }
}

#[test]
fn a_missing_key_is_named_on_both_sides() {
    let (s, d) = exchange(Auth::None, key(1), b"x".to_vec());
    let (s, d) = (s.unwrap_err().to_string(), d.unwrap_err().to_string());
    assert!(
        s.contains(
            "this side uses no authentication (--insecure), the peer a pre-shared key (--psk)"
        ),
        "{s}"
    );
    assert!(
        d.contains("this side uses a pre-shared key (--psk), the peer no authentication"),
        "{d}"
    );
}

#[test]
fn a_byte_changed_in_transit_fails_authentication() {
    // source <-> proxy <-> destination; the proxy flips one bit of the
    // first sealed record after the handshake (42 + 32 bytes each way).
    let (a, pa) = UnixStream::pair().unwrap();
    let (pb, b) = UnixStream::pair().unwrap();
    let up = {
        let (mut from, mut to) = (pa.try_clone().unwrap(), pb.try_clone().unwrap());
        thread::spawn(move || {
            let mut seen = 0usize;
            let mut buf = [0u8; 4096];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for (i, byte) in buf[..n].iter_mut().enumerate() {
                    if seen + i == 42 + 32 + 4 + 3 {
                        *byte ^= 0x10;
                    }
                }
                seen += n;
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        })
    };
    let down = {
        let (mut from, mut to) = (pb, pa);
        thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
        })
    };
    let source = thread::spawn(move || {
        let (_r, w) = secure(a.try_clone().unwrap(), a, Role::Source, &key(3)).unwrap();
        let mut w = FrameWriter::start(w).unwrap();
        w.write(FrameKind::Section, b"state").unwrap();
        w.flush().unwrap();
    });
    let (r, _w) = secure(
        b.try_clone().unwrap(),
        b.try_clone().unwrap(),
        Role::Destination,
        &key(3),
    )
    .unwrap();
    let e = match FrameReader::start(r) {
        Ok(mut r) => r.next_frame().unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("failed authentication"), "{e}");
    source.join().unwrap();
    let _ = b.shutdown(std::net::Shutdown::Both);
    let _ = (up.join(), down.join());
}

#[test]
fn key_files_must_be_private_regular_and_long_enough() {
    let dir = std::env::temp_dir().join(format!("stasis-psk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good");
    std::fs::write(&good, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o600)).unwrap();
    let k = Key::from_file(&good).unwrap();
    assert_eq!(
        k,
        Key::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap()
    );
    assert_eq!(format!("{k:?}"), "Key(32 bytes)", "never printed");

    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Key::from_file(&good).unwrap_err();
    assert!(
        e.contains("can be read by others (mode 644)") && e.contains("chmod 600"),
        "{e}"
    );

    let short = dir.join("short");
    std::fs::write(&short, "tiny").unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = Key::from_file(&short).unwrap_err();
    assert!(e.contains("16 to 4096 bytes, this one is 4"), "{e}");

    let link = dir.join("link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&good, &link).unwrap();
    assert!(Key::from_file(&link).is_err(), "a symlink is refused");
    assert!(
        Key::from_file(&dir)
            .unwrap_err()
            .contains("not a regular file")
            || Key::from_file(&dir).is_err()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
