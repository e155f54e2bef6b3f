//! SIGKILL in the middle of every checkpoint write, landed on purpose by a
//! failpoint that holds the writing thread: while a checkpoint's internal
//! snapshot updates refcounts (inside the guest's pause), while a delete
//! releases a snapshot's clusters, and while a restore brings a disk back
//! (before its header commit). Afterwards `qemu-img check` finds at most
//! leaks (never an error), the image is repaired the next time stasis
//! opens it, and every checkpoint still listed restores with its disk as
//! it was.

mod common;
use common::checkpoint::{checkpoint, disk_vm, restore_checkpoint, stop, tree, T};
use common::qemu::{check_clean, has_tag, qcow2_dirty, qemu_img_output};
use common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// `qemu-img check` after a kill: leaks (refcounts too high) at worst,
/// plus, while the dirty bit says a repair is due, COPIED flags that
/// disagree with them (the one window qcow2 has, QEMU's `savevm` too).
/// Never a refcount below the references (what would lose data).
fn check_after_kill(img: &Path) {
    let (code, text) = qemu_img_output(&["check", img.to_str().unwrap()]);
    let is_dirty = qcow2_dirty(img);
    for l in text.lines().filter(|l| l.starts_with("ERROR")) {
        assert!(
            is_dirty && l.starts_with("ERROR OFLAG_COPIED"),
            "{l} (dirty bit: {is_dirty})\n{text}"
        );
    }
    assert!(
        !text.contains("reference=")
            || text
                .lines()
                .all(|l| !l.contains("reference=") || l.starts_with("Leaked")),
        "{text}"
    );
    assert!(
        matches!(code, Some(0) | Some(2) | Some(3)),
        "{code:?} {text}"
    );
}

fn snapshots(img: &Path) -> String {
    let (code, text) = qemu_img_output(&["snapshot", "-l", "-U", img.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    text
}

/// Starts `stasis ARGS` with `failpoints`, waits until it holds at
/// `point`, and kills it.
fn kill_at(args: &[&str], runtime: &Path, failpoints: &str, point: &str, log: &Path) {
    let mut child: Child = stasis_cmd()
        .env("STASIS_RUNTIME_DIR", runtime)
        .env("STASIS_FAILPOINTS", failpoints)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    wait_for_hold(log, point, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
}

fn wait_for_hold(log: &Path, point: &str, child: &mut Child) {
    let want = format!("STASIS-FAILPOINT {point}");
    let end = Instant::now() + T;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(&want) {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("stasis ended ({st}) before reaching {point}: {text}");
        }
        assert!(Instant::now() < end, "never reached {point}: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A stopped VM's qcow2 disk with checkpoints A and B in `store`; the
/// runtime directory and the passes the guest had finished before each.
fn a_and_b(tag: &str, img: &Path, store: &Path) -> (std::path::PathBuf, u64, u64) {
    qemu_img_output(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let mut vm = disk_vm(tag, img, None, vec![]);
    let (_, pass_a) = checkpoint(&mut vm, store, "A", &[]);
    let (_, pass_b) = checkpoint(&mut vm, store, "B", &[]);
    let runtime = vm.runtime_dir.clone();
    stop(vm);
    (runtime, pass_a, pass_b)
}

/// Restores STORE/NAME (its disk must verify as at that checkpoint) and
/// stops it.
fn restores(tag: &str, store: &Path, name: &str, runtime: &Path, after_pass: u64) {
    stop(restore_checkpoint(tag, store, name, runtime, after_pass));
}

#[test]
fn killed_inside_an_internal_checkpoints_refcount_update() {
    require_kvm();
    let scratch = Scratch::new("ckpt-kill-take");
    let img = scratch.join("d0.qcow2");
    qemu_img_output(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let store = scratch.join("store");
    // A passes the failpoint; B holds inside its metadata update.
    let fp = "qcow2.snapshot_refcounts=1*sleep(0);qcow2.snapshot_refcounts=hold";
    let mut vm = disk_vm(
        "ckpt-kt",
        &img,
        None,
        vec![("STASIS_FAILPOINTS".into(), fp.into())],
    );
    let (_, pass_a) = checkpoint(&mut vm, &store, "A", &[]);
    let mut cli = stasis_cmd()
        .env("STASIS_RUNTIME_DIR", &vm.runtime_dir)
        .args([
            "checkpoint",
            &vm.name,
            "B",
            "--store",
            store.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_hold(
        &vm.stderr_path.clone(),
        "qcow2.snapshot_refcounts",
        &mut vm.child,
    );
    vm.signal(libc::SIGKILL);
    vm.wait_exit(T);
    let _ = cli.wait();
    // Too-high refcounts (leaks) at worst; B was never committed.
    check_after_kill(&img);
    let list = snapshots(&img);
    assert!(has_tag(&list, "A") && !has_tag(&list, "B"), "{list}");
    assert_eq!(
        tree(&store, &vm.runtime_dir)["checkpoints"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    restores("ckpt-kt-a", &store, "A", &vm.runtime_dir, pass_a);
    // Opening it repaired it.
    check_clean(&img);
}

#[test]
fn killed_while_a_delete_releases_clusters() {
    require_kvm();
    let scratch = Scratch::new("ckpt-kill-delete");
    let (img, store) = (scratch.join("d0.qcow2"), scratch.join("store"));
    let (runtime, _, pass_b) = a_and_b("ckpt-kd", &img, &store);
    kill_at(
        &[
            "checkpoint",
            "delete",
            "gone",
            "A",
            "--store",
            store.to_str().unwrap(),
        ],
        &runtime,
        "qcow2.delete_refcounts=hold",
        "qcow2.delete_refcounts",
        &scratch.join("delete.log"),
    );
    check_after_kill(&img);
    // The delete had committed: A is gone from the image and the index.
    assert!(!has_tag(&snapshots(&img), "A"));
    assert_eq!(
        tree(&store, &runtime)["checkpoints"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    restores("ckpt-kd-b", &store, "B", &runtime, pass_b);
    check_clean(&img);
}

#[test]
fn killed_while_a_restore_brings_the_disk_back() {
    require_kvm();
    let scratch = Scratch::new("ckpt-kill-revert");
    let (img, store) = (scratch.join("d0.qcow2"), scratch.join("store"));
    let (runtime, pass_a, pass_b) = a_and_b("ckpt-kr", &img, &store);
    kill_at(
        &["restore", store.join("A").to_str().unwrap(), "--checkpoint"],
        &runtime,
        "qcow2.before_commit=hold",
        "qcow2.before_commit",
        &scratch.join("revert.log"),
    );
    check_after_kill(&img);
    let list = snapshots(&img);
    assert!(has_tag(&list, "A") && has_tag(&list, "B"), "{list}");
    // Both checkpoints restore.
    restores("ckpt-kr-b", &store, "B", &runtime, pass_b);
    restores("ckpt-kr-a", &store, "A", &runtime, pass_a);
    check_clean(&img);
}
