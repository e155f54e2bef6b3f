//! Snapshots from earlier stasis releases still restore, and their guests
//! continue exactly where they stopped. See tests/fixtures/README.md.

mod common;
use common::*;
use std::path::PathBuf;
use std::time::Duration;

/// (file name, crc32c) of every file in `dir`, sorted.
fn fingerprint(dir: &std::path::Path) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                crc32c::crc32c(&std::fs::read(e.path()).unwrap()),
            )
        })
        .collect();
    v.sort();
    v
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn v1_heartbeat_snapshot_restores_and_continues() {
    let dir = fixture("v1-heartbeat-16m");
    let snap = dir.join("snapshot");
    let before_files = fingerprint(&snap);
    let runtime = Scratch::new("fx-run");
    let out = stasis(&["verify", snap.to_str().unwrap()], runtime.path());
    assert!(out.status.success(), "{}", err_text(&out));

    let mut r = restore_process(
        "fx-v1",
        &snap,
        runtime.path(),
        &["--api-socket", runtime.join("fx.sock").to_str().unwrap()],
    );
    r.wait_until("two heartbeats", Duration::from_secs(60), |ls| {
        ls.iter().filter(|l| l.starts_with("HB ")).count() >= 2
    });
    // The guest's output before the snapshot, with a line cut by the
    // suspend completed by the restored guest's first bytes.
    let before = std::fs::read_to_string(dir.join("serial-before.log")).unwrap();
    let after = std::fs::read_to_string(&r.serial).unwrap();
    let cut = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let last_hb = before[..cut]
        .lines()
        .rfind(|l| l.starts_with("HB "))
        .expect("fixture has heartbeats")
        .to_string();
    let joined = format!("{}{}", &before[cut..], after);
    let next_hb = joined
        .lines()
        .find(|l| l.starts_with("HB "))
        .expect("heartbeat after restore")
        .to_string();
    assert_eq!(
        num(&next_hb, "seq"),
        num(&last_hb, "seq") + 1,
        "{last_hb} -> {next_hb}"
    );
    assert!(
        num(&next_hb, "counter") > num(&last_hb, "counter"),
        "{last_hb} -> {next_hb}"
    );
    // The restore is a new generation of the VM.
    let genid = r.wait_tagged("GENID", 1, Duration::from_secs(30));
    assert_eq!(num(&genid[0], "generation"), 1, "{}", genid[0]);
    drop(r);
    let after_files = fingerprint(&snap);
    assert_eq!(before_files, after_files, "restoring modified the fixture");
}
