//! Damaged, truncated, foreign and future snapshots: each gives a clear
//! error naming the problem and a non-zero exit, never a panic, never a
//! VM, and leaves the files exactly as they were.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// One real snapshot of a small heartbeat VM, made once for this binary.
fn pristine() -> &'static Path {
    static SNAP: OnceLock<(Scratch, PathBuf)> = OnceLock::new();
    &SNAP
        .get_or_init(|| {
            let mut vm = VmProcess::start(
                "bad-src",
                VmOpts {
                    memory: "32M",
                    cmdline: "console=ttyS0 workload=heartbeat hb_ms=50",
                    ..Default::default()
                },
            );
            vm.wait_tagged("HB", 2, Duration::from_secs(60));
            vm.wait_socket();
            let s = Scratch::new("bad-pristine");
            let dir = s.join("snap");
            vm.snapshot(&dir, true);
            vm.wait_exit(Duration::from_secs(30));
            (s, dir)
        })
        .1
}

/// A private copy of the pristine snapshot.
fn copy(tag: &str) -> (Scratch, PathBuf) {
    let s = Scratch::new(tag);
    let dst = s.join("snap");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(pristine()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (s, dst)
}

/// File name → contents hash, to prove a failed restore changed nothing.
fn fingerprint(dir: &Path) -> BTreeMap<String, (u64, u32)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let data = std::fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                (data.len() as u64, crc32c::crc32c(&data)),
            )
        })
        .collect()
}

fn flip_byte(path: &Path, offset: u64) {
    let mut data = std::fs::read(path).unwrap();
    let i = offset as usize;
    data[i] ^= 0x5a;
    std::fs::write(path, data).unwrap();
}

/// Restores `dir` and expects failure with `want` in the message; also
/// runs `verify` when `verify_too`, expecting it to fail as well.
fn expect_refusal(dir: &Path, want: &str, verify_too: bool) {
    expect_failure(dir, &[], 1, want, verify_too);
}

/// Restores `dir` with `extra` arguments and expects exit status `code`
/// with `want` in the message, no VM left behind and the snapshot
/// untouched; also runs `verify` when `verify_too`.
fn expect_failure(dir: &Path, extra: &[&str], code: i32, want: &str, verify_too: bool) {
    let before = fingerprint(dir);
    let runtime = dir.parent().unwrap().join("run");
    let mut args = vec![
        "restore",
        dir.to_str().unwrap(),
        "--name",
        "bad",
        "--serial",
        "null",
    ];
    args.extend_from_slice(extra);
    let out = stasis(&args, &runtime);
    let err = err_text(&out);
    assert_eq!(out.status.code(), Some(code), "restore: {err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!runtime.join("bad.sock").exists(), "a VM was started");
    if verify_too {
        let out = stasis(&["verify", dir.to_str().unwrap()], &runtime);
        assert_eq!(out.status.code(), Some(1), "verify: {}", err_text(&out));
        assert!(!err_text(&out).contains("panicked"));
    }
    assert_eq!(fingerprint(dir), before, "the snapshot's files changed");
}

#[test]
fn pristine_snapshot_verifies_and_inspects() {
    let (_s, dir) = copy("bad-ok");
    let out = stasis(&["verify", dir.to_str().unwrap()], &dir);
    assert!(out.status.success(), "{}", err_text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
    let out = stasis(&["inspect", dir.to_str().unwrap(), "--json"], &dir);
    assert!(out.status.success(), "{}", err_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format_version"], 1);
    let text = String::from_utf8_lossy(&stasis(&["inspect", dir.to_str().unwrap()], &dir).stdout)
        .into_owned();
    assert!(text.contains("vcpu"), "{text}");
}

#[test]
fn truncated_manifest() {
    let (_s, dir) = copy("bad-trunc");
    let m = dir.join("manifest.json");
    let len = std::fs::metadata(&m).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&m)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    expect_refusal(&dir, "manifest.json is truncated or not JSON", true);
}

#[test]
fn flipped_byte_in_a_section() {
    let (_s, dir) = copy("bad-section");
    // The first section is vcpu/0; flip a byte inside its payload.
    flip_byte(&dir.join("state.bin"), 40);
    expect_refusal(
        &dir,
        "section 'vcpu'/'0' is corrupt: checksum mismatch",
        true,
    );
}

#[test]
fn flipped_byte_in_the_memory_image() {
    let (_s, dir) = copy("bad-mem");
    // The guest image is loaded at 1 MiB: certainly a written page.
    flip_byte(&dir.join("memory.img"), (1 << 20) + 100);
    // Lazy and eager restores check the whole image first and start
    // nothing; a background restore checks each chunk as it reads it and
    // ends the VM (status 8) before the guest can use the damaged one.
    expect_failure(&dir, &["--mode", "lazy"], 1, "memory chunk 0 ", true);
    expect_failure(&dir, &["--mode", "eager"], 1, "memory chunk 0 ", false);
    expect_failure(
        &dir,
        &[],
        8,
        "memory chunk 0 (file bytes 0x0..0x200000",
        false,
    );
}

#[test]
fn missing_file() {
    let (_s, dir) = copy("bad-missing");
    std::fs::remove_file(dir.join("state.bin")).unwrap();
    expect_refusal(&dir, "state.bin is missing", true);
}

#[test]
fn truncated_memory_image() {
    let (_s, dir) = copy("bad-memtrunc");
    let m = dir.join("memory.img");
    let len = std::fs::metadata(&m).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&m)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    expect_refusal(&dir, "memory.img is", true);
}

fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value, &mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut outer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut body = outer["body"].take();
    edit(&mut outer, &mut body);
    let version = outer["format_version"].as_u64().unwrap() as u32;
    let sealed =
        stasis_snapshot::seal_manifest_body(version, &serde_json::to_string(&body).unwrap());
    std::fs::write(&path, sealed).unwrap();
}

#[test]
fn future_format_version() {
    let (_s, dir) = copy("bad-future");
    rewrite_manifest(&dir, |outer, _| outer["format_version"] = 99.into());
    expect_refusal(
        &dir,
        "snapshot format version 99 is newer than this stasis supports",
        true,
    );
}

#[test]
fn foreign_cpu_vendor() {
    let (_s, dir) = copy("bad-vendor");
    let mut saved = String::new();
    rewrite_manifest(&dir, |_, body| {
        saved = body["cpu"]["vendor"].as_str().unwrap().to_string();
        let other = if saved == "GenuineIntel" {
            "AuthenticAMD"
        } else {
            "GenuineIntel"
        };
        body["cpu"]["vendor"] = other.into();
    });
    let other = if saved == "GenuineIntel" {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    };
    // The snapshot itself is intact (verify passes); this host cannot run it.
    let out = stasis(&["verify", dir.to_str().unwrap()], &dir);
    assert!(out.status.success(), "{}", err_text(&out));
    expect_refusal(
        &dir,
        &format!("the guest ran on a {other} CPU; this host's CPU is {saved}"),
        false,
    );
}

#[test]
fn cpu_features_this_host_lacks() {
    let (_s, dir) = copy("bad-features");
    rewrite_manifest(&dir, |_, body| {
        for leaf in body["cpu"]["cpuid"].as_array_mut().unwrap() {
            if leaf["function"] == 7 && leaf["index"] == 0 {
                // Claim every leaf-7 feature, which no host offers.
                leaf["ebx"] = u32::MAX.into();
            }
        }
    });
    expect_refusal(
        &dir,
        "this host cannot offer CPU features the guest was given",
        false,
    );
}

#[test]
fn not_a_snapshot_at_all() {
    let s = Scratch::new("bad-foreign");
    let dir = s.join("snap");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        br#"{"format":"something-else","format_version":1}"#,
    )
    .unwrap();
    expect_refusal(&dir, "not a stasis snapshot", true);
}

#[test]
fn snapshot_directory_missing() {
    let s = Scratch::new("bad-nodir");
    let runtime = s.join("run");
    let out = stasis(&["restore", s.join("nope").to_str().unwrap()], &runtime);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out).contains("no such snapshot directory"),
        "{}",
        err_text(&out)
    );
}
