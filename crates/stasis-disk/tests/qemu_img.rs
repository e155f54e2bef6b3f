//! stasis-disk against QEMU's own tools: every image stasis writes passes
//! `qemu-img check`, QEMU reads the snapshots stasis takes and stasis
//! reads QEMU's, and both agree on what each snapshot holds.

use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use stasis_disk::qcow2::{self, snapshots};
use stasis_disk::{DiskBackend, DiskFormat};

const MIB: u64 = 1 << 20;

fn tool(name: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {name} ({e}): these tests need QEMU's tools (apt-get install qemu-utils)"
        )
    });
    out
}

fn ok(name: &str, args: &[&str]) -> String {
    let out = tool(name, args);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name} {args:?} failed: {text}");
    text
}

/// `qemu-img check` must find nothing, not even leaks.
fn check_clean(path: &Path) {
    let out = tool("qemu-img", &["check", path.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        path.display()
    );
}

/// Reads `len` bytes at `off` through QEMU and checks they are all `byte`.
fn qemu_reads(path: &Path, off: u64, len: u64, byte: u8) -> bool {
    let cmd = format!("read -P {byte:#x} {off} {len}");
    let out = tool("qemu-io", &["-r", "-c", &cmd, path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    out.status.success() && !text.contains("Pattern verification failed") && text.contains("read ")
}

fn new_qcow2(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            p.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    p
}

fn fill(disk: &dyn DiskBackend, off: u64, len: usize, byte: u8) {
    let buf = vec![byte; len];
    disk.write_vectored_at(&[IoSlice::new(&buf)], off).unwrap();
}

fn read(disk: &dyn DiskBackend, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    disk.read_vectored_at(&mut [IoSliceMut::new(&mut buf)], off)
        .unwrap();
    buf
}

#[test]
fn internal_snapshots_taken_by_stasis_are_qemus_too() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_qcow2(dir.path(), "d.qcow2", 64 * MIB);
    let mut disk = stasis_disk::open(&img, None, false).unwrap();
    assert_eq!(disk.format(), DiskFormat::Qcow2);
    assert_eq!(disk.size(), 64 * MIB);
    fill(disk.as_ref(), 0, 4 * MIB as usize, 0x11);
    fill(disk.as_ref(), 40 * MIB, 65536, 0x12);
    disk.take_internal_snapshot("A").unwrap();
    // Writes after A change the active state only: shared clusters are
    // copied first (their COPIED flags were cleared).
    fill(disk.as_ref(), 0, 2 * MIB as usize, 0x21);
    fill(disk.as_ref(), 50 * MIB, 65536, 0x22);
    disk.take_internal_snapshot("B").unwrap();
    fill(disk.as_ref(), MIB, 4096, 0x31);
    assert!(
        disk.take_internal_snapshot("A").is_err(),
        "a second A is refused"
    );
    disk.flush().unwrap();
    check_clean(&img);
    let listed = ok("qemu-img", &["snapshot", "-l", img.to_str().unwrap()]);
    assert!(
        has_tag(&listed, "A") && has_tag(&listed, "B"),
        "qemu-img snapshot -l: {listed}"
    );

    // Roll back to A, then forward to B, and check with QEMU each time.
    disk.apply_internal_snapshot("A").unwrap();
    assert_eq!(read(disk.as_ref(), MIB, 4096), vec![0x11; 4096]);
    drop(disk);
    check_clean(&img);
    assert!(qemu_reads(&img, 0, 4 * MIB, 0x11));
    assert!(qemu_reads(&img, 40 * MIB, 65536, 0x12));
    assert!(qemu_reads(&img, 50 * MIB, 65536, 0));
    let mut disk = stasis_disk::open(&img, None, false).unwrap();
    // A new branch from A: B stays as it was.
    fill(disk.as_ref(), 0, 65536, 0x41);
    disk.apply_internal_snapshot("B").unwrap();
    drop(disk);
    check_clean(&img);
    assert!(qemu_reads(&img, 0, 2 * MIB, 0x21));
    assert!(qemu_reads(&img, 2 * MIB, 2 * MIB, 0x11));
    assert!(qemu_reads(&img, 50 * MIB, 65536, 0x22));

    // QEMU agrees: its own apply of A gives what stasis's gave.
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    ok("qemu-img", &["snapshot", "-a", "A", copy.to_str().unwrap()]);
    let mut ours = qcow2::open_image(&img, true).unwrap();
    snapshots::apply(&mut ours, "A").unwrap();
    drop(ours);
    ok(
        "qemu-img",
        &["compare", img.to_str().unwrap(), copy.to_str().unwrap()],
    );

    // Deleting A frees what only A held and leaves B whole.
    let before = std::fs::metadata(&img).unwrap().blocks();
    let mut ours = qcow2::open_image(&img, true).unwrap();
    snapshots::delete(&mut ours, "A").unwrap();
    assert_eq!(
        snapshots::list(&ours)
            .unwrap()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["B"]
    );
    snapshots::apply(&mut ours, "B").unwrap();
    drop(ours);
    check_clean(&img);
    assert!(qemu_reads(&img, 50 * MIB, 65536, 0x22));
    let listed = ok("qemu-img", &["snapshot", "-l", img.to_str().unwrap()]);
    assert!(!has_tag(&listed, "A") && has_tag(&listed, "B"), "{listed}");
    let after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        after < before,
        "deleting A gave no space back ({before} -> {after} blocks)"
    );
}

#[test]
fn snapshots_taken_by_qemu_are_listed_and_applied() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_qcow2(dir.path(), "q.qcow2", 16 * MIB);
    ok(
        "qemu-io",
        &["-c", "write -P 0x55 0 1M", img.to_str().unwrap()],
    );
    ok(
        "qemu-img",
        &["snapshot", "-c", "from-qemu", img.to_str().unwrap()],
    );
    ok(
        "qemu-io",
        &["-c", "write -P 0x66 0 1M", img.to_str().unwrap()],
    );
    let list = qcow2::list_snapshots(&img).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "from-qemu");
    assert_eq!(list[0].disk_size, 16 * MIB);
    let mut disk = stasis_disk::open(&img, Some(DiskFormat::Qcow2), false).unwrap();
    assert_eq!(read(disk.as_ref(), 0, 4096), vec![0x66; 4096]);
    disk.apply_internal_snapshot("from-qemu").unwrap();
    assert_eq!(read(disk.as_ref(), 0, 4096), vec![0x55; 4096]);
    drop(disk);
    check_clean(&img);
    assert!(qemu_reads(&img, 0, MIB, 0x55));
}

#[test]
fn an_interrupted_snapshot_leaves_leaks_that_opening_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_qcow2(dir.path(), "i.qcow2", 16 * MIB);
    ok(
        "qemu-io",
        &["-c", "write -P 0x77 0 3M", img.to_str().unwrap()],
    );
    // The first half of a take: dirty bit, every cluster of the active
    // tree referenced once more, new clusters allocated; then "killed".
    {
        let mut raw = qcow2::open_image(&img, true).unwrap();
        raw.set_dirty(true).unwrap();
        let (l1, n) = (raw.header.l1_table_offset, raw.header.l1_size);
        let mut deltas = std::collections::HashMap::new();
        for e in raw.read_l1(l1, n).unwrap() {
            let l2 = e & qcow2::image::OFFSET_MASK;
            if l2 != 0 {
                for entry in raw.read_l2(l2).unwrap() {
                    if let Some((c, _)) = raw.l2_entry_clusters(entry) {
                        deltas.insert(c, 1);
                    }
                }
            }
        }
        assert!(deltas.len() >= 48);
        raw.apply_refcount_deltas(&deltas).unwrap();
        raw.allocate(65536).unwrap();
    }
    // QEMU sees refcounts that are too high (leaks) and, for clusters
    // still flagged COPIED, the flag disagreeing with them; never a
    // refcount below its references.
    let out = tool("qemu-img", &["check", img.to_str().unwrap()]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("leaked clusters"), "{text}");
    for l in text.lines().filter(|l| l.starts_with("ERROR")) {
        assert!(l.starts_with("ERROR OFLAG_COPIED"), "{l}\n{text}");
    }
    // Opening it writable repairs it.
    let disk = stasis_disk::open(&img, None, false).unwrap();
    assert_eq!(read(disk.as_ref(), 0, 4096), vec![0x77; 4096]);
    drop(disk);
    check_clean(&img);
    let h = qcow2::open_image(&img, false).unwrap().header;
    assert_eq!(h.incompatible_features & qcow2::image::INCOMPAT_DIRTY, 0);
}

#[test]
fn an_overlay_freezes_its_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x5au8; 8 * MIB as usize]).unwrap();
    let mut disk = stasis_disk::open(&base, None, false).unwrap();
    assert_eq!(disk.format(), DiskFormat::Raw);
    let overlay = dir.path().join("top.qcow2");
    stasis_disk::switch_to_overlay(&mut disk, &overlay).unwrap();
    assert_eq!(disk.format(), DiskFormat::Qcow2);
    assert_eq!(disk.size(), 8 * MIB);
    assert!(
        stasis_disk::switch_to_overlay(&mut disk, &overlay).is_err(),
        "an existing file is never overwritten"
    );
    assert_eq!(disk.path(), overlay.as_path());
    fill(disk.as_ref(), 4096, 4096, 0x99);
    assert_eq!(read(disk.as_ref(), 0, 4096), vec![0x5a; 4096]);
    assert_eq!(read(disk.as_ref(), 4096, 4096), vec![0x99; 4096]);
    drop(disk);
    check_clean(&overlay);
    let chain = ok(
        "qemu-img",
        &["info", "--backing-chain", overlay.to_str().unwrap()],
    );
    assert!(
        chain.contains(base.to_str().unwrap()) && chain.contains("file format: raw"),
        "{chain}"
    );
    assert_eq!(
        std::fs::read(&base).unwrap(),
        vec![0x5au8; 8 * MIB as usize],
        "the base is untouched"
    );
    assert_eq!(qcow2::backing_file(&overlay).unwrap().unwrap(), base);
    assert!(qemu_reads(&overlay, 4096, 4096, 0x99));
}

#[test]
fn hostile_headers_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_qcow2(dir.path(), "h.qcow2", MIB);
    let good = std::fs::read(&img).unwrap();
    let cases: [(usize, &[u8], &str); 4] = [
        (4, &[0, 0, 0, 9], "version 9"),
        (20, &[0, 0, 0, 40], "cluster_bits"),
        (36, &[0x7f, 0, 0, 0], "L1 table"),
        (60, &[0, 1, 0, 1], "snapshots"),
    ];
    for (at, bytes, what) in cases {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&img, &b).unwrap();
        let e = qcow2::list_snapshots(&img)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(what), "{what}: {e}");
    }
    std::fs::write(&img, b"QFI").unwrap();
    assert_eq!(stasis_disk::detect_format(&img).unwrap(), DiskFormat::Raw);
}

/// Whether `qemu-img snapshot -l` output lists a snapshot tagged `tag`.
fn has_tag(list: &str, tag: &str) -> bool {
    list.lines()
        .skip(2)
        .any(|l| l.split_whitespace().nth(1) == Some(tag))
}

/// A detected qcow2 image may not name a backing file: a guest can write
/// a qcow2 header naming any host file into its raw disk. Given as qcow2,
/// the same image opens with its backing file.
#[test]
fn a_detected_qcow2_image_may_not_name_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("host-secret.raw");
    std::fs::write(&secret, vec![0x42u8; MIB as usize]).unwrap();
    let img = dir.path().join("guest-made.img");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            secret.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    );
    let e = stasis_disk::open(&img, None, false)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("detected") && e.contains("format=qcow2"), "{e}");
    let disk = stasis_disk::open(&img, Some(DiskFormat::Qcow2), false).unwrap();
    assert_eq!(read(disk.as_ref(), 0, 4096), vec![0x42; 4096]);
    // Without a backing file, a detected qcow2 image opens.
    let plain = new_qcow2(dir.path(), "plain.qcow2", MIB);
    assert_eq!(
        stasis_disk::open(&plain, None, false).unwrap().format(),
        DiskFormat::Qcow2
    );
}
