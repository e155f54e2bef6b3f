//! Both sides of the opening handshake over a real socket pair, each side
//! on its own thread: agreement, a version mismatch, a refused VM (the
//! reason shown on the source), and a peer that breaks the order.

use std::os::unix::net::UnixStream;
use std::thread;

use stasis_migration::handshake::{
    destination_check, destination_hello, source_hello, source_offer,
};
use stasis_migration::{Error, FrameKind, FrameReader, FrameWriter, VmDescription};

fn pair() -> ((UnixStream, UnixStream), (UnixStream, UnixStream)) {
    let (a, b) = UnixStream::pair().unwrap();
    ((a.try_clone().unwrap(), a), (b.try_clone().unwrap(), b))
}

fn vm() -> VmDescription {
    VmDescription {
        vm_config: serde_json::json!({"name": "vm1"}),
        cpu: serde_json::json!({"model": "x86-64-v3"}),
        memory_bytes: 1 << 30,
        connections: 1,
    }
}

/// Runs the destination (with `check`) on a thread and the source here;
/// returns both results.
fn run(
    check: fn(&VmDescription) -> Result<(), String>,
) -> (Result<(), Error>, Result<VmDescription, Error>) {
    let ((sr, sw), (dr, dw)) = pair();
    let dest = thread::spawn(move || {
        let mut w = FrameWriter::start(dw).unwrap();
        let mut r = FrameReader::start(dr).unwrap();
        destination_hello(&mut r, &mut w, "dest")?;
        destination_check(&mut r, &mut w, check)
    });
    let mut w = FrameWriter::start(sw).unwrap();
    let mut r = FrameReader::start(sr).unwrap();
    let source = source_hello(&mut r, &mut w, "src").and_then(|welcome| {
        assert_eq!(welcome.protocol, stasis_migration::PROTOCOL_VERSION);
        assert_eq!(welcome.software, "dest");
        source_offer(&mut r, &mut w, vm())
    });
    (source, dest.join().unwrap())
}

#[test]
fn both_sides_agree_and_the_vm_is_accepted() {
    let (source, dest) = run(|_| Ok(()));
    source.unwrap();
    assert_eq!(dest.unwrap(), vm());
}

#[test]
fn a_refused_vm_tells_the_source_why_before_any_memory_moves() {
    let (source, dest) = run(|vm| {
        Err(format!(
            "this host cannot run CPU model {}: it lacks avx2",
            vm.cpu["model"].as_str().unwrap()
        ))
    });
    let e = source.unwrap_err().to_string();
    assert_eq!(
        e,
        "the destination refused: this host cannot run CPU model x86-64-v3: it lacks avx2"
    );
    assert!(matches!(dest, Err(Error::Refused { .. })));
}

#[test]
fn a_source_speaking_only_newer_versions_is_refused_with_both_ranges() {
    let ((sr, sw), (dr, dw)) = pair();
    let dest = thread::spawn(move || {
        let mut w = FrameWriter::start(dw).unwrap();
        let mut r = FrameReader::start(dr).unwrap();
        destination_hello(&mut r, &mut w, "dest").map(|_| ())
    });
    // A hand-made hello from a future stasis.
    let mut w = FrameWriter::start(sw).unwrap();
    w.write(
        FrameKind::Hello,
        br#"{"protocol_min": 5, "protocol_max": 6, "software": "stasis 9", "new_field": true}"#,
    )
    .unwrap();
    let mut r = FrameReader::start(sr).unwrap();
    let f = r.next_frame().unwrap().unwrap();
    assert_eq!(f.kind, FrameKind::Refuse);
    let reason: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
    assert_eq!(
        reason["reason"],
        "no protocol version in common: this side speaks 1..=2, the peer 5..=6"
    );
    assert!(matches!(
        dest.join().unwrap(),
        Err(Error::NoCommonVersion { .. })
    ));
}

#[test]
fn frames_out_of_order_or_a_closed_peer_are_named() {
    // A destination that skips its welcome and accepts at once.
    let ((sr, sw), (dr, dw)) = pair();
    let dest = thread::spawn(move || {
        let mut w = FrameWriter::start(dw).unwrap();
        let mut r = FrameReader::start(dr).unwrap();
        assert_eq!(r.next_frame().unwrap().unwrap().kind, FrameKind::Hello);
        w.write(FrameKind::Accept, &[]).unwrap();
        // Hold the connection until the source has hung up.
        while let Ok(Some(_)) = r.next_frame() {}
    });
    let mut w = FrameWriter::start(sw).unwrap();
    let mut r = FrameReader::start(sr).unwrap();
    let e = source_hello(&mut r, &mut w, "src").unwrap_err().to_string();
    assert_eq!(
        e,
        "expected a welcome or refuse frame, the peer sent an accept frame"
    );
    drop((r, w));
    dest.join().unwrap();

    // A destination that hangs up after the preamble.
    let ((sr, sw), (dr, dw)) = pair();
    let dest = thread::spawn(move || {
        let _w = FrameWriter::start(dw).unwrap();
        drop(dr);
    });
    let mut w = FrameWriter::start(sw).unwrap();
    dest.join().unwrap();
    let mut r = FrameReader::start(sr).unwrap();
    let e = source_hello(&mut r, &mut w, "src");
    let text = e.unwrap_err().to_string();
    assert!(
        text.contains("closed the connection before its welcome")
            || text.starts_with("sending a hello frame"),
        "{text}"
    );
}

#[test]
fn a_further_connection_must_name_the_session() {
    use stasis_migration::handshake::{destination_join, source_join};
    for (token, ok) in [("s3cr3t", true), ("guess", false)] {
        let ((sr, sw), (dr, dw)) = pair();
        let dest = thread::spawn(move || {
            let mut w = FrameWriter::start(dw).unwrap();
            let mut r = FrameReader::start(dr).unwrap();
            destination_join(&mut r, &mut w, "s3cr3t")
        });
        let mut w = FrameWriter::start(sw).unwrap();
        let mut r = FrameReader::start(sr).unwrap();
        let source = source_join(&mut r, &mut w, token, 2);
        let dest = dest.join().unwrap();
        if ok {
            source.unwrap();
            assert_eq!(dest.unwrap(), 2);
        } else {
            let e = source.unwrap_err().to_string();
            assert!(e.contains("wrong session token"), "{e}");
            assert!(dest.is_err());
        }
    }
}
