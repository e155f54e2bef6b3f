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
use common::checkpoint::{checkpoint, disk_vm, refused, restore_checkpoint, stop, tree, T};
use common::loopfs::LoopFs;
use common::qemu::{check_clean, has_tag, qemu_img};
use common::*;
use std::path::{Path, PathBuf};

/// A, write, B, write; back to A, write; forward to B; delete A.
fn walk_the_tree(tag: &str, dir: &Path, img: &Path, external: bool, kind: &str) -> PathBuf {
    require_kvm();
    let store = dir.join("store");
    let extra: &[&str] = if external { &["--external"] } else { &[] };
    // A second disk: raw, written from the host between checkpoints where
    // it stays the image the VM uses (not external: an overlay takes over).
    let d1 = dir.join("d1.raw");
    sparse_file(&d1, 1 << 20);
    let stamp = |byte: u8| {
        if !external {
            std::fs::write(&d1, vec![byte; 1 << 20]).unwrap();
        }
    };
    stamp(0xa1);
    let mut vm = disk_vm(tag, img, Some(&d1), vec![]);
    let runtime = vm.runtime_dir.clone();
    let (a, pass_a) = checkpoint(&mut vm, &store, "A", extra);
    assert_eq!(a["disks"][0]["kind"], kind, "{a}");
    let d1_kind = if external { "external" } else { "reflink" };
    assert_eq!(a["disks"][1]["kind"], d1_kind, "{a}");
    assert_eq!(a["parent"], serde_json::Value::Null, "{a}");
    stamp(0xb2);
    let (b, pass_b) = checkpoint(&mut vm, &store, "B", extra);
    assert_eq!(b["parent"], "A", "{b}");
    stamp(0xc3);
    // A name taken is refused, and the VM runs on.
    refused(
        &vm,
        &[
            "checkpoint",
            &vm.name,
            "A",
            "--store",
            store.to_str().unwrap(),
        ],
        "already exists",
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

    // The second disk as each checkpoint kept it (external: the new
    // overlay on the frozen raw image reads it).
    let d1_at = |name: &str| -> Vec<u8> {
        let disks = tree(&store, &runtime)["checkpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["disks"]
            .clone();
        assert_eq!(disks.as_array().unwrap().len(), 2, "{disks}");
        let img = if external {
            PathBuf::from(disks[1]["image"].as_str().unwrap())
        } else {
            d1.clone()
        };
        let disk = stasis_disk::open(&img, None, true).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        disk.read_vectored_at(&mut [std::io::IoSliceMut::new(&mut buf)], 0)
            .unwrap();
        buf
    };
    // Back to A: the disks are as they were at A; the guest writes a new
    // branch.
    let r = restore_checkpoint(&format!("{tag}-a"), &store, "A", &runtime, pass_a);
    assert_eq!(tree(&store, &runtime)["current"], "A");
    stop(r);
    if !external {
        assert!(d1_at("A").iter().all(|&b| b == 0xa1), "d1 is not as at A");
    }
    // Forward to B: untouched by the branch from A.
    let r = restore_checkpoint(&format!("{tag}-b"), &store, "B", &runtime, pass_b);
    stop(r);
    if !external {
        assert!(d1_at("B").iter().all(|&b| b == 0xb2), "d1 is not as at B");
    } else {
        // A froze d1 itself; B froze the overlay A put on it, whose chain
        // QEMU follows back to d1.
        let t = tree(&store, &runtime);
        let image = |i: usize| {
            t["checkpoints"][i]["disks"][1]["image"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(image(0), d1.display().to_string(), "{t}");
        let chain = qemu_img(&["info", "-U", "--backing-chain", &image(1)]);
        assert!(
            image(1).ends_with(".qcow2") && chain.contains(&d1.display().to_string()),
            "{chain}"
        );
    }
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
    // On btrfs: the VM's second disk is raw and gets reflinked.
    let lfs = LoopFs::new("ckpt-internal", "btrfs");
    let img = lfs.mnt.join("d0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    walk_the_tree("ckpt-int", &lfs.mnt, &img, false, "qcow2-internal");
    // stasis lists QEMU's snapshots too (disk-only).
    qemu_img(&["snapshot", "-c", "by-qemu", img.to_str().unwrap()]);
    let out = stasis(&["checkpoints", "--disk", img.to_str().unwrap()], &lfs.mnt);
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
    let mut vm = disk_vm("ckpt-ext4", &img, None, vec![]);
    let store = lfs.mnt.join("store");
    let args = [
        "checkpoint",
        &vm.name,
        "A",
        "--store",
        store.to_str().unwrap(),
    ];
    refused(&vm, &args, "disk 'd0'");
    refused(&vm, &args, "reflink");
    refused(&vm, &args, "--external");
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
    let mut vm = disk_vm("ckpt-rb", &img, None, vec![]);
    let pid = vm.child.id();
    let (_, pass_a) = checkpoint(&mut vm, &store, "A", &[]);
    let (_, pass_b) = checkpoint(&mut vm, &store, "B", &[]);
    // An unknown checkpoint is refused and the VM runs on.
    refused(
        &vm,
        &[
            "rollback",
            &vm.name,
            "nope",
            "--store",
            store.to_str().unwrap(),
        ],
        "no checkpoint 'nope'",
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

/// A name an image already has (here a snapshot QEMU made) is refused
/// before the pause, and that snapshot is left alone.
#[test]
fn a_checkpoint_name_the_image_already_has_is_refused_and_kept() {
    require_kvm();
    let scratch = Scratch::new("ckpt-taken-name");
    let img = scratch.join("d0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    qemu_img(&["snapshot", "-c", "X", img.to_str().unwrap()]);
    let store = scratch.join("store");
    let mut vm = disk_vm("ckpt-taken", &img, None, vec![]);
    refused(
        &vm,
        &[
            "checkpoint",
            &vm.name,
            "X",
            "--store",
            store.to_str().unwrap(),
        ],
        "already has an internal snapshot named 'X'",
    );
    assert!(!store.join("X").exists());
    let n = vm.tagged("DISK").len();
    vm.wait_tagged("DISK", n + 1, T);
    stop(vm);
    let list = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    assert!(has_tag(&list, "X"), "QEMU's snapshot X is gone: {list}");
    check_clean(&img);
}

/// An internal checkpoint A of an image that a later external checkpoint
/// B froze is not brought back in place (B's overlays read that image);
/// B still restores.
#[test]
fn an_image_frozen_by_a_later_external_checkpoint_is_not_reverted_in_place() {
    require_kvm();
    let scratch = Scratch::new("ckpt-frozen");
    let img = scratch.join("d0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let store = scratch.join("store");
    let mut vm = disk_vm("ckpt-frozen", &img, None, vec![]);
    let runtime = vm.runtime_dir.clone();
    checkpoint(&mut vm, &store, "A", &[]);
    let (_, pass_b) = checkpoint(&mut vm, &store, "B", &["--external"]);
    // Not even a running VM's rollback stops for it.
    refused(
        &vm,
        &[
            "rollback",
            &vm.name,
            "A",
            "--store",
            store.to_str().unwrap(),
        ],
        "frozen under external checkpoint 'B'",
    );
    let n = vm.tagged("DISK").len();
    vm.wait_tagged("DISK", n + 1, T);
    stop(vm);
    let out = stasis(
        &["restore", store.join("A").to_str().unwrap(), "--checkpoint"],
        &runtime,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out).contains("frozen under external checkpoint 'B'"),
        "{}",
        err_text(&out)
    );
    check_clean(&img);
    stop(restore_checkpoint(
        "ckpt-frozen-b",
        &store,
        "B",
        &runtime,
        pass_b,
    ));
}
