//! Checkpoints of a running VM and its disk, on real KVM, checked by
//! QEMU's own tools: qcow2 internal snapshots, external overlays and
//! reflinked raw images (on a loop-mounted btrfs).
//!
//! The guest kit's `disk` workload stamps every block with its pass
//! number and checks each block's previous stamp before rewriting it, so a
//! guest restored from a checkpoint prints `DISK-BAD` unless the disk is
//! exactly as it was at that checkpoint's pause. Each test takes A, lets
//! the guest write, takes B, lets it write, stops; restores A (blocks
//! verify as at A), lets it write (a new branch); restores B (blocks verify
//! as at B, the branch from A did not touch it); deletes A, and B still
//! restores.

mod common;
use common::loopfs::LoopFs;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("qemu-img is needed for this test ({e}); .ci/run installs qemu-utils")
        });
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &err_text(&out);
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

fn check_clean(img: &Path) {
    let text = qemu_img(&["check", img.to_str().unwrap()]);
    assert!(
        text.contains("No errors were found"),
        "{}: {text}",
        img.display()
    );
}

fn disk_vm(tag: &str, img: &Path) -> VmProcess {
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            cmdline: "console=ttyS0 workload=disk disk_blocks=512",
            extra: vec!["--disk".into(), format!("id=d0,path={}", img.display())],
            ..Default::default()
        },
    );
    vm.wait_tagged("DISK", 2, T);
    vm.wait_socket();
    vm
}

/// `stasis checkpoint NAME CKPT --store STORE EXTRA --json`; returns the
/// answer and the last pass the guest had finished before it.
fn checkpoint(
    vm: &mut VmProcess,
    store: &Path,
    name: &str,
    extra: &[&str],
) -> (serde_json::Value, u64) {
    let pass = num(vm.tagged("DISK").last().unwrap(), "pass");
    let mut args = vec![
        "checkpoint",
        &vm.name,
        name,
        "--store",
        store.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = vm.cli(&args);
    assert!(
        out.status.success(),
        "checkpoint {name}: {}",
        err_text(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The guest goes on writing after the checkpoint.
    let n = vm.tagged("DISK").len();
    vm.wait_tagged("DISK", n + 2, T);
    (v, pass)
}

/// Restores checkpoint STORE/NAME; the guest's disk must verify as at
/// that checkpoint, and it must go on from the pass it was in then.
fn restore_checkpoint(
    tag: &str,
    store: &Path,
    name: &str,
    runtime: &Path,
    after_pass: u64,
) -> VmProcess {
    let mut r = restore_process(tag, &store.join(name), runtime, &["--checkpoint"]);
    let lines = r.wait_tagged("DISK", 2, T);
    for l in &lines {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
    }
    assert!(
        r.tagged("DISK-BAD").is_empty(),
        "{:?}",
        r.tagged("DISK-BAD")
    );
    let first = num(&lines[0], "pass");
    assert!(
        first > after_pass,
        "restored at pass {first}, the checkpoint was after pass {after_pass}"
    );
    r
}

fn stop(mut vm: VmProcess) {
    vm.signal(libc::SIGTERM);
    vm.wait_exit(T);
}

fn tree(store: &Path, runtime: &Path) -> serde_json::Value {
    let out = stasis(
        &["checkpoints", "--store", store.to_str().unwrap(), "--json"],
        runtime,
    );
    assert!(out.status.success(), "{}", err_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A, write, B, write; back to A, write; forward to B; delete A.
fn walk_the_tree(tag: &str, dir: &Path, img: &Path, external: bool, kind: &str) -> PathBuf {
    require_kvm();
    let store = dir.join("store");
    let extra: &[&str] = if external { &["--external"] } else { &[] };
    let mut vm = disk_vm(tag, img);
    let runtime = vm.runtime_dir.clone();
    let (a, pass_a) = checkpoint(&mut vm, &store, "A", extra);
    assert_eq!(a["disks"][0]["kind"], kind, "{a}");
    assert_eq!(a["parent"], serde_json::Value::Null, "{a}");
    let (b, pass_b) = checkpoint(&mut vm, &store, "B", extra);
    assert_eq!(b["parent"], "A", "{b}");
    // A name taken is refused, and the VM runs on.
    let out = vm.cli(&[
        "checkpoint",
        &vm.name,
        "A",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out).contains("already exists"),
        "{}",
        err_text(&out)
    );
    let active = PathBuf::from(
        b["disks"][0]["overlay"]
            .as_str()
            .map(str::to_string)
            .unwrap_or(img.display().to_string()),
    );
    stop(vm);
    if kind == "qcow2-internal" {
        check_clean(img);
        let list = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
        assert!(has_tag(&list, "A") && has_tag(&list, "B"), "{list}");
    }
    if external {
        check_clean(&active);
        let chain = qemu_img(&["info", "--backing-chain", active.to_str().unwrap()]);
        let frozen_b = b["disks"][0]["image"].as_str().unwrap();
        assert!(
            chain.contains(frozen_b) && chain.contains(img.to_str().unwrap()),
            "{chain}"
        );
    }
    let t = tree(&store, &runtime);
    assert_eq!(t["current"], "B", "{t}");

    // Back to A: the disk is as it was at A; the guest writes a new branch.
    let r = restore_checkpoint(&format!("{tag}-a"), &store, "A", &runtime, pass_a);
    assert_eq!(tree(&store, &runtime)["current"], "A");
    stop(r);
    // Forward to B: untouched by the branch from A.
    let r = restore_checkpoint(&format!("{tag}-b"), &store, "B", &runtime, pass_b);
    stop(r);
    // Deleting A leaves B whole.
    let out = stasis(
        &[
            "checkpoint",
            "delete",
            "gone-vm",
            "A",
            "--store",
            store.to_str().unwrap(),
        ],
        &runtime,
    );
    assert!(out.status.success(), "{}", err_text(&out));
    let t = tree(&store, &runtime);
    assert_eq!(t["checkpoints"].as_array().unwrap().len(), 1, "{t}");
    assert_eq!(
        t["checkpoints"][0]["parent"],
        serde_json::Value::Null,
        "{t}"
    );
    assert!(!store.join("A").exists());
    if kind == "qcow2-internal" {
        check_clean(img);
        let list = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
        assert!(!has_tag(&list, "A") && has_tag(&list, "B"), "{list}");
    }
    let r = restore_checkpoint(&format!("{tag}-b2"), &store, "B", &runtime, pass_b);
    stop(r);
    if kind == "qcow2-internal" {
        check_clean(img);
    }
    store
}

#[test]
fn qcow2_internal_checkpoints_roll_back_and_forward() {
    let scratch = Scratch::new("ckpt-internal");
    let img = scratch.join("d0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    walk_the_tree("ckpt-int", &scratch.join(""), &img, false, "qcow2-internal");
    // stasis lists QEMU's snapshots too (disk-only).
    qemu_img(&["snapshot", "-c", "by-qemu", img.to_str().unwrap()]);
    let out = stasis(
        &["checkpoints", "--disk", img.to_str().unwrap()],
        &scratch.join(""),
    );
    assert!(out.status.success(), "{}", err_text(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("by-qemu") && has_tag(&text, "B"), "{text}");
}

#[test]
fn external_checkpoints_put_each_disk_on_a_new_overlay() {
    let scratch = Scratch::new("ckpt-external");
    let img = scratch.join("d0.raw");
    sparse_file(&img, 8 << 20);
    walk_the_tree("ckpt-ext", &scratch.join(""), &img, true, "external");
}

#[test]
fn raw_checkpoints_reflink_the_image_on_btrfs() {
    let lfs = LoopFs::new("ckpt-btrfs", "btrfs");
    let img = lfs.mnt.join("d0.img");
    sparse_file(&img, 8 << 20);
    walk_the_tree("ckpt-raw", &lfs.mnt, &img, false, "reflink");
}

#[test]
fn a_raw_checkpoint_on_ext4_is_refused_before_the_pause() {
    require_kvm();
    let lfs = LoopFs::new("ckpt-ext4", "ext4");
    let img = lfs.mnt.join("d0.img");
    sparse_file(&img, 8 << 20);
    let mut vm = disk_vm("ckpt-ext4", &img);
    let store = lfs.mnt.join("store");
    let out = vm.cli(&[
        "checkpoint",
        &vm.name,
        "A",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = err_text(&out);
    assert!(
        e.contains("d0") && e.contains("reflink") && e.contains("--external"),
        "{e}"
    );
    // Nothing was kept and the guest runs on.
    assert!(!store.join("A").exists());
    let n = vm.tagged("DISK").len();
    vm.wait_tagged("DISK", n + 1, T);
    stop(vm);
}

/// `stasis rollback` on a running VM: the same process goes back to A
/// (same name, same socket), its disk as at A; then forward to B; B's
/// directory and internal snapshot survive the branch taken from A.
#[test]
fn a_running_vm_rolls_back_and_forward_in_place() {
    require_kvm();
    let scratch = Scratch::new("ckpt-rollback");
    let img = scratch.join("d0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let store = scratch.join("store");
    let mut vm = disk_vm("ckpt-rb", &img);
    let pid = vm.child.id();
    let (_, pass_a) = checkpoint(&mut vm, &store, "A", &[]);
    let (_, pass_b) = checkpoint(&mut vm, &store, "B", &[]);
    // An unknown checkpoint is refused and the VM runs on.
    let out = vm.cli(&[
        "rollback",
        &vm.name,
        "nope",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out).contains("no checkpoint 'nope'"),
        "{}",
        err_text(&out)
    );
    for (name, after_pass) in [("A", pass_a), ("B", pass_b)] {
        let n = vm.tagged("DISK").len();
        let out = vm.cli(&[
            "rollback",
            &vm.name,
            name,
            "--store",
            store.to_str().unwrap(),
            "--timeout",
            "20",
        ]);
        if !out.status.success() {
            vm.fail(&format!("rollback {name}: {}", err_text(&out)));
        }
        // The same process, the guest going on from the checkpoint's pass
        // (where the pass numbers stop counting up by one, the restored
        // guest's lines begin) with its disk as it was then.
        let restored_from = |lines: &[String]| {
            (n.max(1)..lines.len())
                .find(|&i| num(&lines[i], "pass") != num(&lines[i - 1], "pass") + 1)
        };
        vm.wait_until("the guest running from the checkpoint", T, |l| {
            let disk: Vec<String> = l
                .iter()
                .filter(|x| x.starts_with("DISK "))
                .cloned()
                .collect();
            restored_from(&disk).is_some_and(|i| disk.len() >= i + 2)
        });
        let lines = vm.tagged("DISK");
        let i = restored_from(&lines).expect("seen above");
        for l in &lines[i..] {
            assert_eq!(num(l, "bad"), 0, "after rollback to {name}: {l}");
            assert_eq!(num(l, "total_bad"), 0, "after rollback to {name}: {l}");
        }
        assert!(
            vm.tagged("DISK-BAD").is_empty(),
            "{:?}",
            vm.tagged("DISK-BAD")
        );
        assert!(num(&lines[i], "pass") > after_pass, "{name}: {}", lines[i]);
        assert_eq!(vm.child.id(), pid);
        assert_eq!(tree(&store, &vm.runtime_dir)["current"], name);
    }
    let list = qemu_img(&["snapshot", "-l", "-U", img.to_str().unwrap()]);
    assert!(has_tag(&list, "A") && has_tag(&list, "B"), "{list}");
    stop(vm);
    check_clean(&img);
}

/// Whether `qemu-img snapshot -l` output lists a snapshot tagged `tag`.
fn has_tag(list: &str, tag: &str) -> bool {
    list.lines()
        .skip(2)
        .any(|l| l.split_whitespace().nth(1) == Some(tag))
}
