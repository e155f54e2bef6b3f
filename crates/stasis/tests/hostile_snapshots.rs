//! Snapshots crafted as an attacker would, every checksum recomputed: a
//! test for each kind of harm (hangs, memory, messages, impossible state,
//! host paths, the format's contract). Each must be refused with a clear
//! error naming what is wrong, quickly, in bounded memory, leaving every
//! file as it was; the kinds a restore must accept start a real VM.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One real snapshot of a small heartbeat VM, made once for this binary;
/// its serial log was created by that VM (so it bears stasis's mark).
fn pristine() -> &'static (Scratch, PathBuf, PathBuf) {
    static SNAP: OnceLock<(Scratch, PathBuf, PathBuf)> = OnceLock::new();
    SNAP.get_or_init(|| {
        let s = Scratch::new("hostile-pristine");
        let serial = s.join("serial.log");
        let mut vm = VmProcess::start(
            "hostile-src",
            VmOpts {
                memory: "32M",
                cmdline: "console=ttyS0 workload=heartbeat hb_ms=50",
                serial: Some(format!("file:{}", serial.display())),
                ..Default::default()
            },
        );
        vm.serial = serial.clone();
        vm.wait_tagged("HB", 2, Duration::from_secs(60));
        vm.wait_socket();
        let dir = s.join("snap");
        vm.snapshot(&dir, true);
        vm.wait_exit(Duration::from_secs(30));
        (s, dir, serial)
    })
}

/// A private copy of the pristine snapshot.
fn copy(tag: &str) -> (Scratch, PathBuf) {
    let s = Scratch::new(tag);
    let dst = s.join("snap");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(&pristine().1).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (s, dst)
}

/// Runs stasis with a 1.5 GiB address-space limit and a deadline: a
/// hang or an allocation the files asked for shows as a failure here.
fn run_bounded(args: &[&str], runtime: &Path) -> Output {
    let mut cmd = stasis_cmd();
    cmd.env("STASIS_RUNTIME_DIR", runtime)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing
    // of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 3 << 29,
                rlim_max: 3 << 29,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn stasis");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = (
        std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut out, &mut v).ok();
            v
        }),
        std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut err, &mut v).ok();
            v
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("stasis {args:?} hung (killed after 30 s)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: readers.0.join().unwrap(),
        stderr: readers.1.join().unwrap(),
    }
}

/// File name → (kind, length, modification time, crc of the contents of
/// files up to 256 MiB), to prove nothing changed.
fn fingerprint(dir: &Path) -> BTreeMap<String, (String, u64, i64, u32)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            let crc = if md.is_file() && md.len() <= 256 << 20 {
                crc32c::crc32c(&std::fs::read(e.path()).unwrap())
            } else {
                0
            };
            (
                e.file_name().to_string_lossy().into_owned(),
                (
                    format!("{:?}", md.file_type()),
                    md.len(),
                    md.mtime_nsec() + md.mtime() * 1_000_000_000,
                    crc,
                ),
            )
        })
        .collect()
}

/// Restores `dir` (serial to `null` unless `extra` says otherwise) and
/// runs `verify` too when `verify_too`; both must fail with exit status 1
/// and `want` in the message, within the limits of [`run_bounded`], with
/// no panic, no VM, no control character on the terminal, and the
/// snapshot's files unchanged.
fn expect_refused(dir: &Path, extra: &[&str], want: &str, verify_too: bool) -> String {
    let before = fingerprint(dir);
    let runtime = dir.parent().unwrap().join("run");
    let mut args = vec!["restore", dir.to_str().unwrap(), "--name", "hostile"];
    if !extra
        .iter()
        .any(|a| *a == "--serial" || *a == "--keep-serial")
    {
        args.extend(["--serial", "null"]);
    }
    args.extend(extra.iter().filter(|a| **a != "--keep-serial"));
    let out = run_bounded(&args, &runtime);
    let err = err_text(&out);
    assert_eq!(out.status.code(), Some(1), "restore: {err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !out.stderr.iter().any(|&b| b == 0x1b || b == b'\r'),
        "control characters reached the terminal: {err:?}"
    );
    assert!(err.len() < 8192, "{} bytes of messages", err.len());
    assert!(!runtime.join("hostile.sock").exists(), "a VM was started");
    if verify_too {
        let out = run_bounded(&["verify", dir.to_str().unwrap()], &runtime);
        let verr = err_text(&out);
        assert_eq!(out.status.code(), Some(1), "verify: {verr}");
        assert!(verr.contains(want), "verify: expected {want:?} in: {verr}");
        assert!(!verr.contains("panicked"), "{verr}");
    }
    assert_eq!(fingerprint(dir), before, "the snapshot's files changed");
    err
}

/// The manifest as JSON (outer, body), without any of stasis's checks.
fn manifest_json(dir: &Path) -> (serde_json::Value, serde_json::Value) {
    let mut outer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let body = outer["body"].take();
    (outer, body)
}

/// Rewrites the manifest's body as JSON and seals it again (a correct
/// checksum over whatever the body now says).
fn reseal(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let (outer, mut body) = manifest_json(dir);
    edit(&mut body);
    let version = outer["format_version"].as_u64().unwrap() as u32;
    let text = stasis_snapshot::seal_manifest_body(version, &serde_json::to_string(&body).unwrap());
    std::fs::write(dir.join("manifest.json"), text).unwrap();
}

/// Appends a section to `state.bin` with a correct entry and checksum.
fn append_section(dir: &Path, name: &str, instance: &str, version: u32, payload: &[u8]) {
    let state = dir.join("state.bin");
    let mut len = std::fs::metadata(&state).unwrap().len();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&state)
        .unwrap();
    let pad = (8 - len % 8) % 8;
    f.write_all(&vec![0u8; pad as usize]).unwrap();
    len += pad;
    f.write_all(payload).unwrap();
    reseal(dir, |b| {
        b["sections"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "name": name, "instance": instance, "version": version, "optional": false,
                "offset": len, "size": payload.len(), "crc32c": crc32c::crc32c(payload),
            }));
        b["state_size"] = (len + payload.len() as u64).into();
    });
}

/// A section's payload as JSON.
fn section_json(dir: &Path, name: &str, instance: &str) -> serde_json::Value {
    let r = stasis_snapshot::SnapshotReader::open(dir).unwrap();
    let e = r.find_section(name, instance).unwrap().clone();
    serde_json::from_slice(&r.section_bytes(&e).unwrap()).unwrap()
}

/// Replaces a section's payload (written at the end of `state.bin`).
fn replace_section(dir: &Path, name: &str, instance: &str, payload: &serde_json::Value) {
    let bytes = serde_json::to_vec(payload).unwrap();
    reseal(dir, |b| {
        b["sections"]
            .as_array_mut()
            .unwrap()
            .retain(|s| !(s["name"] == name && s["instance"] == instance));
    });
    append_section(dir, name, instance, 1, &bytes);
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path for the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

// ---- hangs: FIFOs and links instead of files ----

#[test]
fn a_fifo_or_a_link_in_place_of_a_snapshot_file_is_refused_at_once() {
    for file in ["manifest.json", "state.bin", "memory.img"] {
        let (_s, dir) = copy("hostile-fifo");
        std::fs::remove_file(dir.join(file)).unwrap();
        mkfifo(&dir.join(file));
        expect_refused(
            &dir,
            &[],
            &format!("{file}: is a FIFO, not a regular file"),
            true,
        );
    }
    let (s, dir) = copy("hostile-link");
    let outside = s.join("elsewhere.img");
    std::fs::rename(dir.join("memory.img"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("memory.img")).unwrap();
    expect_refused(&dir, &[], "memory.img: is a symbolic link", true);
}

// ---- memory: sizes the files claim ----

#[test]
fn a_section_claiming_terabytes_is_refused_without_allocating_them() {
    for claim in [8u64 << 40, 12 << 30] {
        let (_s, dir) = copy("hostile-huge-section");
        let state = dir.join("state.bin");
        let len = std::fs::metadata(&state).unwrap().len();
        let offset = len.div_ceil(8) * 8;
        // Sparse: the file really is that long, and costs nothing.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&state)
            .unwrap()
            .set_len(offset + claim)
            .unwrap();
        reseal(&dir, |b| {
            b["sections"].as_array_mut().unwrap().push(serde_json::json!({
                "name": "blob", "instance": "0", "version": 1, "optional": true,
                "offset": offset, "size": claim, "crc32c": stasis_snapshot::crc32c_append_zeros(0, claim),
            }));
            b["state_size"] = (offset + claim).into();
        });
        expect_refused(&dir, &[], "a section is at most 16 MiB", true);
    }
}

#[test]
fn huge_arrays_in_the_manifest_are_refused_while_parsing() {
    // 50 million elements in vm_config: 100 MB of text, gigabytes as a tree.
    let (_s, dir) = copy("hostile-array");
    let (outer, body) = manifest_json(&dir);
    let mut text = serde_json::to_string(&body).unwrap();
    let junk = format!("[{}0]", "0,".repeat(50_000_000));
    let at = text.find("\"vm_config\":{").unwrap() + "\"vm_config\":{".len();
    text.insert_str(at, &format!("\"junk\":{junk},"));
    let version = outer["format_version"].as_u64().unwrap() as u32;
    std::fs::write(
        dir.join("manifest.json"),
        stasis_snapshot::seal_manifest_body(version, &text),
    )
    .unwrap();
    expect_refused(&dir, &[], "vm_config: is 100000", true);

    // Twenty million chunk checksums.
    let (_s, dir) = copy("hostile-chunks");
    let (outer, body) = manifest_json(&dir);
    let mut text = serde_json::to_string(&body).unwrap();
    let at = text.find("\"chunk_crc32c\":[").unwrap() + "\"chunk_crc32c\":[".len();
    text.insert_str(at, &"7,".repeat(20_000_000));
    let version = outer["format_version"].as_u64().unwrap() as u32;
    std::fs::write(
        dir.join("manifest.json"),
        stasis_snapshot::seal_manifest_body(version, &text),
    )
    .unwrap();
    expect_refused(
        &dir,
        &[],
        "memory.chunk_crc32c: has more than 8388608 elements",
        true,
    );
}

#[test]
fn verify_reads_gigabyte_chunks_a_piece_at_a_time() {
    // A legitimate but unusual layout: 1 GiB checksum chunks over a
    // 2 GiB (sparse) memory image. Verify must pass in bounded memory.
    let (_s, dir) = copy("hostile-big-chunks");
    let mem = dir.join("memory.img");
    let data = std::fs::read(&mem).unwrap();
    let chunk = 1u64 << 30;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(2 * chunk)
        .unwrap();
    let first =
        stasis_snapshot::crc32c_append_zeros(crc32c::crc32c(&data), chunk - data.len() as u64);
    let second = stasis_snapshot::crc32c_append_zeros(0, chunk);
    reseal(&dir, |b| {
        b["memory"]["chunk_size"] = chunk.into();
        b["memory"]["file_size"] = (2 * chunk).into();
        b["memory"]["chunk_crc32c"] = serde_json::json!([first, second]);
    });
    let out = run_bounded(&["verify", dir.to_str().unwrap()], &dir);
    assert!(out.status.success(), "{}", err_text(&out));
    // And a flipped byte in it is still found.
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"x", chunk + 12345).unwrap();
    let out = run_bounded(&["verify", dir.to_str().unwrap()], &dir);
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("memory chunk 1"),
        "{}",
        err_text(&out)
    );
}

// ---- messages: fields named, strings quoted and cut, warnings summed up ----

#[test]
fn errors_name_the_field_and_never_echo_a_file_raw() {
    let (_s, dir) = copy("hostile-type");
    reseal(&dir, |b| b["memory"]["regions"][0]["size"] = "big".into());
    let err = expect_refused(
        &dir,
        &[],
        "memory.regions[0].size must be an unsigned integer",
        true,
    );
    assert!(!err.contains("line 1"), "{err}");

    let (_s, dir) = copy("hostile-escape");
    reseal(&dir, |b| {
        b["sections"][0]["name"] = "\u{1b}[2J\u{1b}[31mowned".into()
    });
    expect_refused(
        &dir,
        &[],
        "sections[0]: \"\\u{1b}[2J\\u{1b}[31mowned\"",
        true,
    );

    let (_s, dir) = copy("hostile-long");
    reseal(&dir, |b| {
        b["sections"][0]["instance"] = "y".repeat(1 << 20).into()
    });
    expect_refused(&dir, &[], "(1048576 bytes)", true);

    let (_s, dir) = copy("hostile-config-escape");
    reseal(&dir, |b| {
        b["vm_config"]["name"] = "vm\u{1b}]0;title\u{7}".into()
    });
    expect_refused(
        &dir,
        &[],
        "vm_config.name contains control characters",
        false,
    );
}

// ---- impossible state ----

/// A change to a saved vCPU's JSON.
type VcpuEdit = fn(&mut serde_json::Value);

#[test]
fn impossible_vcpu_state_is_refused_before_kvm_sees_it() {
    // A vCPU section the configuration does not have.
    let (_s, dir) = copy("hostile-extra-vcpu");
    let mut v = section_json(&dir, "vcpu", "0");
    v["index"] = 5.into();
    append_section(&dir, "vcpu", "5", 1, &serde_json::to_vec(&v).unwrap());
    expect_refused(
        &dir,
        &[],
        "vCPU section \"5\" is not one of the configuration's 1 vCPUs",
        false,
    );

    let cases: [(&str, VcpuEdit, &str); 4] = [
        (
            "efer",
            |v| {
                let efer = v["sregs"]["efer"].as_u64().unwrap();
                v["sregs"]["efer"] = (efer | 1 << 3).into();
            },
            "has reserved bits set (0x8)",
        ),
        (
            "rip",
            |v| v["regs"]["rip"] = 0xdead_0000_0000_0000u64.into(),
            "RIP 0xdead000000000000",
        ),
        (
            "rflags",
            |v| v["regs"]["rflags"] = 0u64.into(),
            "RFLAGS 0x0 has reserved bits set or bit 1 clear",
        ),
        (
            "cpuid",
            |v| {
                for leaf in v["cpuid"].as_array_mut().unwrap() {
                    if leaf["function"] == 7 && leaf["index"] == 0 {
                        leaf["ebx"] = u32::MAX.into();
                    }
                }
            },
            // The manifest's CPU record is untouched: the check reads what
            // would be loaded.
            "this host cannot offer CPU features the guest was given",
        ),
    ];
    for (tag, edit, want) in cases {
        let (_s, dir) = copy(&format!("hostile-{tag}"));
        let mut v = section_json(&dir, "vcpu", "0");
        edit(&mut v);
        replace_section(&dir, "vcpu", "0", &v);
        expect_refused(&dir, &[], want, false);
    }

    let (_s, dir) = copy("hostile-vmgenid");
    let mut v = section_json(&dir, "vmgenid", "0");
    v["generation"] = u64::MAX.into();
    replace_section(&dir, "vmgenid", "0", &v);
    expect_refused(
        &dir,
        &[],
        "vmgenid generation 18446744073709551615 cannot be advanced",
        false,
    );
}

// ---- host paths: the serial and console destinations a snapshot names ----

#[test]
fn saved_output_destinations_never_harm_a_file() {
    let (s, dir) = copy("hostile-dest");
    let victim = s.join("victim.txt");
    std::fs::write(&victim, "the user's file\n").unwrap();
    let keep = ["--keep-serial"];
    for (dest, want) in [
        (
            format!("socket:{}", victim.display()),
            "the snapshot names it as a socket, but a regular file is there",
        ),
        (
            format!("file:{}", victim.display()),
            "a file is there that stasis did not create",
        ),
        (
            format!("socket:{}", dir.join("manifest.json").display()),
            "inside the snapshot's directory",
        ),
        (
            format!("file:{}", dir.join("notes.txt").display()),
            "inside the snapshot's directory",
        ),
        // A file the guest would fill, where none is (an authorized_keys).
        (
            format!("file:{}", s.join("authorized_keys").display()),
            "a restore never creates a file or socket at a path read from a snapshot",
        ),
        (
            format!("socket:{}", s.join("new.sock").display()),
            "a restore never creates a file or socket at a path read from a snapshot",
        ),
    ] {
        reseal(&dir, |b| {
            let (mode, path) = dest.split_once(':').unwrap();
            b["vm_config"]["serial"] = serde_json::json!({ "mode": mode, "path": path });
        });
        expect_refused(&dir, &keep, want, false);
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "the user's file\n"
        );
        assert!(!dir.join("notes.txt").exists());
        assert!(!s.join("authorized_keys").exists());
        assert!(!s.join("new.sock").exists());
    }
    // A FIFO, saved or given: refused, not waited on.
    let fifo = s.join("fifo");
    mkfifo(&fifo);
    reseal(&dir, |b| {
        b["vm_config"]["serial"] = serde_json::json!({ "mode": "file", "path": fifo });
    });
    expect_refused(&dir, &keep, "a FIFO is there, not a regular file", false);
    expect_refused(
        &dir,
        &["--serial", &format!("file:{}", fifo.display())],
        "is a FIFO, not a regular file",
        false,
    );
    // A socket given on the command line never replaces a file either.
    expect_refused(
        &dir,
        &["--serial", &format!("socket:{}", victim.display())],
        "is a regular file, which a socket would replace",
        false,
    );
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "the user's file\n"
    );
}

// ---- what a restore must accept, and say ----

#[test]
fn optional_sections_are_skipped_and_saved_destinations_announced() {
    let (_s, dir) = copy("hostile-accept");
    // 60,000 optional sections this stasis does not know, and an optional
    // vmgenid from the future: FORMAT.md says both are skipped.
    reseal(&dir, |b| {
        let end = b["state_size"].as_u64().unwrap();
        let sections = b["sections"].as_array_mut().unwrap();
        for s in sections.iter_mut() {
            if s["name"] == "vmgenid" {
                assert_eq!(s["optional"], true);
                s["version"] = 99.into();
            }
        }
        for i in 0..60_000 {
            sections.push(serde_json::json!({
                "name": format!("future-{}", i % 100), "instance": i.to_string(), "version": 1,
                "optional": true, "offset": end, "size": 0, "crc32c": 0,
            }));
        }
    });
    let serial = &pristine().2;
    let before = std::fs::read_to_string(serial).unwrap().len();
    // The saved serial destination is the source VM's log, which stasis
    // created: it is used, and the user is told.
    let runtime = dir.parent().unwrap().join("run");
    let stderr_path = dir.parent().unwrap().join("stderr.log");
    let mut child = stasis_cmd()
        .env("STASIS_RUNTIME_DIR", &runtime)
        .args(["restore", dir.to_str().unwrap(), "--name", "accepting"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let grew = loop {
        let now = std::fs::read_to_string(serial).unwrap();
        if now.len() > before && now[before..].matches("HB").count() >= 2 {
            break true;
        }
        if Instant::now() > end || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().ok();
    child.wait().ok();
    let err = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        grew,
        "the restored guest's heartbeats did not reach the saved log: {err}"
    );
    assert!(
        err.contains(&format!(
            "serial output goes to file:{}, as saved in the snapshot (change with --serial)",
            serial.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("skipping optional section 'vmgenid'/'0' version 99"),
        "{err}"
    );
    assert!(
        err.contains("skipping 59996 more optional sections (future-"),
        "{err}"
    );
    assert!(err.len() < 4096, "{} bytes of warnings: {err}", err.len());
}

// ---- the contract ----

#[test]
fn a_version_1_manifest_with_a_parent_is_refused() {
    let (_s, dir) = copy("hostile-parent");
    reseal(&dir, |b| {
        b["parent"] = serde_json::json!({
            "snapshot_id": "0123456789abcdef0123456789abcdef",
            "body_crc32c": "01234567",
            "path": "../elsewhere",
        });
    });
    expect_refused(
        &dir,
        &[],
        "a version-1 snapshot cannot have a parent (diff snapshots are version 2)",
        true,
    );
    let (_s, dir) = copy("hostile-parent-map");
    reseal(&dir, |b| {
        b["parent"] = serde_json::json!({
            "snapshot_id": "0123456789abcdef0123456789abcdef",
            "body_crc32c": "01234567",
            "path": "../elsewhere",
        });
        let pages: u64 = b["memory"]["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["size"].as_u64().unwrap() / 4096)
            .sum();
        b["memory"]["page_map"] = serde_json::json!({
            "file": "page-map.bin", "size": pages.div_ceil(4), "crc32c": 0,
        });
    });
    expect_refused(
        &dir,
        &[],
        "a version-1 snapshot cannot have a parent (diff snapshots are version 2)",
        true,
    );
}
