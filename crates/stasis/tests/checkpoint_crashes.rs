//! SIGKILL in the middle of every checkpoint write, landed on purpose by a
//! failpoint that holds the writing thread: while a checkpoint's internal
//! snapshot updates refcounts (inside the guest's pause), while a delete
//! releases a snapshot's clusters, and while a restore brings a disk back
//! (before its header commit). Afterwards `qemu-img check` finds at most
//! leaks (never an error), the image is repaired the next time stasis
//! opens it, and every checkpoint still listed restores with its disk as
//! it was.

mod common;
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(90);

fn qemu_img(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("qemu-img is needed for this test ({e}); .ci/run installs qemu-utils")
        });
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &err_text(&out);
    (out.status.code(), text)
}

/// Whether the image's header has the dirty bit (incompatible feature 0:
/// "refcounts may be inconsistent, repair before use").
fn dirty(img: &Path) -> bool {
    let b = std::fs::read(img).unwrap();
    b[79] & 1 != 0
}

/// `qemu-img check` after a kill: leaks (refcounts too high) at worst,
/// plus, while the dirty bit says a repair is due, COPIED flags that
/// disagree with them (the one window qcow2 has, QEMU's `savevm` too).
/// Never a refcount below the references (what would lose data).
fn check_after_kill(img: &Path) {
    let (code, text) = qemu_img(&["check", img.to_str().unwrap()]);
    let is_dirty = dirty(img);
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

/// `qemu-img check` finds nothing at all.
fn check_clean(img: &Path) {
    let (code, text) = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(
        code == Some(0) && text.contains("No errors were found"),
        "{text}"
    );
    assert!(!dirty(img));
}

fn snapshots(img: &Path) -> String {
    let (code, text) = qemu_img(&["snapshot", "-l", "-U", img.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    text
}

/// A VM on a qcow2 disk with checkpoint A taken, and the last pass the
/// guest had finished before A.
fn vm_with_a(tag: &str, img: &Path, store: &Path, env: Vec<(String, String)>) -> (VmProcess, u64) {
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            cmdline: "console=ttyS0 workload=disk disk_blocks=512",
            extra: vec!["--disk".into(), format!("id=d0,path={}", img.display())],
            env,
            ..Default::default()
        },
    );
    vm.wait_tagged("DISK", 2, T);
    vm.wait_socket();
    let pass = num(vm.tagged("DISK").last().unwrap(), "pass");
    let out = vm.cli(&[
        "checkpoint",
        &vm.name,
        "A",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", err_text(&out));
    let n = vm.tagged("DISK").len();
    vm.wait_tagged("DISK", n + 2, T);
    (vm, pass)
}

/// Starts `stasis ARGS` with `failpoints`, waits until it holds at
/// `point`, and kills it.
fn kill_at(args: &[&str], runtime: &Path, failpoints: &str, point: &str, log: &Path) {
    let mut child: Child = Command::new(stasis_bin())
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

/// Restores STORE/NAME and checks that the guest's disk is as it was at
/// that checkpoint.
fn restores(tag: &str, store: &Path, name: &str, runtime: &Path, after_pass: u64) {
    let mut r = restore_process(tag, &store.join(name), runtime, &["--checkpoint"]);
    let lines = r.wait_tagged("DISK", 2, T);
    for l in &lines {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
    }
    assert!(num(&lines[0], "pass") > after_pass, "{lines:?}");
    r.signal(libc::SIGTERM);
    r.wait_exit(T);
}

#[test]
fn killed_inside_an_internal_checkpoints_refcount_update() {
    require_kvm();
    let scratch = Scratch::new("ckpt-kill-take");
    let img = scratch.join("d0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let store = scratch.join("store");
    // A passes the failpoint; B holds inside its metadata update.
    let fp = "qcow2.snapshot_refcounts=1*sleep(0);qcow2.snapshot_refcounts=hold";
    let (mut vm, pass_a) = vm_with_a(
        "ckpt-kt",
        &img,
        &store,
        vec![("STASIS_FAILPOINTS".into(), fp.into())],
    );
    let mut cli = Command::new(stasis_bin())
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
    let runtime = vm.runtime_dir.clone();
    restores("ckpt-kt-a", &store, "A", &runtime, pass_a);
    // Opening it repaired it.
    check_clean(&img);
}

#[test]
fn killed_while_a_delete_releases_clusters() {
    require_kvm();
    let scratch = Scratch::new("ckpt-kill-delete");
    let img = scratch.join("d0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let store = scratch.join("store");
    let (mut vm, pass_a) = vm_with_a("ckpt-kd", &img, &store, vec![]);
    let pass_b = num(vm.tagged("DISK").last().unwrap(), "pass");
    let out = vm.cli(&[
        "checkpoint",
        &vm.name,
        "B",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", err_text(&out));
    let n = vm.tagged("DISK").len();
    vm.wait_tagged("DISK", n + 2, T);
    vm.signal(libc::SIGTERM);
    vm.wait_exit(T);
    let runtime = vm.runtime_dir.clone();
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
    let out = stasis(
        &["checkpoints", "--store", store.to_str().unwrap(), "--json"],
        &runtime,
    );
    let tree: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tree["checkpoints"].as_array().unwrap().len(), 1, "{tree}");
    restores("ckpt-kd-b", &store, "B", &runtime, pass_b);
    check_clean(&img);
    let _ = pass_a;
}

#[test]
fn killed_while_a_restore_brings_the_disk_back() {
    require_kvm();
    let scratch = Scratch::new("ckpt-kill-revert");
    let img = scratch.join("d0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let store = scratch.join("store");
    let (mut vm, pass_a) = vm_with_a("ckpt-kr", &img, &store, vec![]);
    let pass_b = num(vm.tagged("DISK").last().unwrap(), "pass");
    let out = vm.cli(&[
        "checkpoint",
        &vm.name,
        "B",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", err_text(&out));
    vm.signal(libc::SIGTERM);
    vm.wait_exit(T);
    let runtime = vm.runtime_dir.clone();
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

/// Whether `qemu-img snapshot -l` output lists a snapshot tagged `tag`.
fn has_tag(list: &str, tag: &str) -> bool {
    list.lines()
        .skip(2)
        .any(|l| l.split_whitespace().nth(1) == Some(tag))
}
