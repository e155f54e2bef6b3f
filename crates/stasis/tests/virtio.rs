//! Virtio devices on real KVM with the guest kit's drivers: several disks
//! and NICs per guest, I/O that survives a snapshot taken mid-flight, taps
//! in a network namespace, and restore-time overrides and refusals.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

fn image(s: &Scratch, name: &str, mib: u64) -> PathBuf {
    let p = s.join(name);
    sparse_file(&p, mib << 20);
    p
}

/// Counts the blocks of `img` holding valid stamps (stasis_guestkit::disk).
fn stamped_blocks(img: &Path, blocks: u64) -> (u64, u64) {
    let data = std::fs::read(img).unwrap();
    let mut ok = 0;
    let mut zero = 0;
    for b in 0..blocks {
        let at = (b as usize) * stasis_guestkit::disk::BLOCK_SIZE;
        let blk = &data[at..at + stasis_guestkit::disk::BLOCK_SIZE];
        if blk.iter().all(|&x| x == 0) {
            zero += 1;
        } else if stasis_guestkit::disk::check(blk, b).is_ok() {
            ok += 1;
        }
    }
    (ok, zero)
}

/// A VM with one disk `id` on `img`, running `cmdline`.
fn disk_vm(tag: &str, id: &str, img: &Path, cmdline: &str) -> VmProcess {
    VmProcess::start(
        tag,
        VmOpts {
            cmdline,
            extra: vec!["--disk".into(), format!("id={id},path={}", img.display())],
            ..Default::default()
        },
    )
}

fn disk_args(d0: &Path, d1: &Path) -> Vec<String> {
    vec![
        "--disk".into(),
        format!("id=d0,path={}", d0.display()),
        "--disk".into(),
        format!("id=d1,path={}", d1.display()),
    ]
}

#[test]
fn two_disks_are_independent() {
    let s = Scratch::new("vio-2disk");
    let (d0, d1) = (image(&s, "d0.img", 8), image(&s, "d1.img", 8));
    for (index, written, untouched) in [(0, &d0, &d1), (1, &d1, &d0)] {
        let before = std::fs::read(untouched).unwrap();
        let cmdline = format!("console=ttyS0 workload=disk disk_index={index} disk_blocks=64");
        let mut vm = VmProcess::start(
            &format!("vio-2disk{index}"),
            VmOpts {
                cmdline: &cmdline,
                extra: disk_args(&d0, &d1),
                ..Default::default()
            },
        );
        let found = vm.wait_tagged("VIRTIO", 2, T);
        assert!(
            found.iter().all(|l| fields(l)["type"] == "blk"),
            "{found:?}"
        );
        let cfg = vm.wait_tagged("DISK-CONFIG", 1, T);
        assert_eq!(fields(&cfg[0])["id"], format!("d{index}"), "{}", cfg[0]);
        let passes = vm.wait_tagged("DISK", 3, T);
        for l in &passes {
            assert_eq!(num(l, "bad"), 0, "{l}");
        }
        vm.signal(libc::SIGTERM);
        vm.wait_exit(T);
        assert_eq!(
            stamped_blocks(written, 64).0,
            64,
            "disk {index} lacks its stamps"
        );
        assert_eq!(
            std::fs::read(untouched).unwrap(),
            before,
            "the other disk changed"
        );
    }
}

#[test]
fn two_nics_on_taps_in_a_netns_are_independent() {
    let s = Scratch::new("vio-2nic");
    let ns = NetNs::new("2nic", &["vtap0", "vtap1"], &s);
    for (index, used, idle) in [(0, "vtap0", "vtap1"), (1, "vtap1", "vtap0")] {
        // The responders report once a second: let the counts settle.
        std::thread::sleep(Duration::from_millis(1300));
        let idle_before = ns.requests_seen(idle);
        let cmdline =
            format!("console=ttyS0 workload=net net_index={index} net_ms=20 report_ms=200");
        let mut vm = VmProcess::start(
            &format!("vio-2nic{index}"),
            VmOpts {
                cmdline: &cmdline,
                extra: vec![
                    "--net".into(),
                    "id=n0,tap=vtap0".into(),
                    "--net".into(),
                    "id=n1,tap=vtap1".into(),
                ],
                netns: Some(ns.name.clone()),
                ..Default::default()
            },
        );
        vm.wait_until("replies from the responder", T, |ls| {
            ls.iter()
                .any(|l| l.starts_with("NET ") && num(l, "replies") >= 10)
        });
        let last = vm.tagged("NET").pop().unwrap();
        assert_eq!(num(&last, "bad"), 0, "{last}");
        vm.signal(libc::SIGTERM);
        vm.wait_exit(T);
        std::thread::sleep(Duration::from_millis(1300));
        assert!(ns.requests_seen(used) >= 10, "{used} saw no frames");
        assert_eq!(
            ns.requests_seen(idle),
            idle_before,
            "frames leaked onto {idle}"
        );
    }
}

#[test]
fn disk_io_survives_a_snapshot_taken_mid_flight() {
    let s = Scratch::new("vio-diskio");
    let d0 = image(&s, "d0.img", 8);
    let mut vm = disk_vm(
        "vio-diskio",
        "d0",
        &d0,
        "console=ttyS0 workload=disk disk_blocks=512",
    );
    vm.wait_tagged("DISK", 3, T);
    let snap = s.join("snap");
    vm.suspend_to(&snap);
    let last_pass = num(vm.tagged("DISK").last().unwrap(), "pass");
    let mut r = restore_process("vio-diskio-r", &snap, &vm.runtime_dir, &[]);
    // Every block written before the snapshot verifies; writes go on.
    let after = r.wait_tagged("DISK", 3, T);
    for l in &after {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
    }
    assert!(
        num(&after[0], "pass") > last_pass,
        "{} after pass {last_pass}",
        after[0]
    );
    r.signal(libc::SIGTERM);
    r.wait_exit(T);
    // And a fresh guest that only reads finds every block stamped.
    let mut check = disk_vm(
        "vio-diskio-check",
        "d0",
        &d0,
        "console=ttyS0 workload=disk disk_blocks=512 disk_verify_only=1",
    );
    let v = check.wait_tagged("DISK", 1, T);
    assert_eq!(num(&v[0], "bad"), 0, "{}", v[0]);
    assert_eq!(num(&v[0], "verified"), 512, "{}", v[0]);
}

#[test]
fn net_exchanges_frames_before_and_after_restore() {
    let s = Scratch::new("vio-netsr");
    let ns = NetNs::new("netsr", &["ntap0"], &s);
    let mut vm = net_guest("vio-netsr", &ns, "ntap0", "64M");
    vm.wait_socket();
    let before = vm.tagged("NET").pop().unwrap();
    let snap = s.join("snap");
    vm.suspend_to(&snap);
    let mut r = restore_process_in(Some(&ns.name), "vio-netsr-r", &snap, &vm.runtime_dir, &[]);
    let want = num(&before, "replies") + 10;
    r.wait_until("replies after the restore", T, |ls| {
        ls.iter()
            .any(|l| l.starts_with("NET ") && num(l, "replies") >= want)
    });
    let after = r.tagged("NET").pop().unwrap();
    assert_eq!(num(&after, "bad"), 0, "{after}");
    assert_eq!(
        fields(&after)["mac"],
        fields(&before)["mac"],
        "MAC changed across restore"
    );
    assert!(num(&after, "sent") > num(&before, "sent"));
}

#[test]
fn restore_with_a_disk_path_override_writes_to_the_new_file() {
    let s = Scratch::new("vio-override");
    let d0 = image(&s, "d0.img", 8);
    let mut vm = disk_vm(
        "vio-override",
        "root",
        &d0,
        "console=ttyS0 workload=disk disk_blocks=128",
    );
    vm.wait_tagged("DISK", 2, T);
    let snap = s.join("snap");
    vm.suspend_to(&snap);
    let moved = s.join("moved.img");
    std::fs::copy(&d0, &moved).unwrap();
    let original = std::fs::read(&d0).unwrap();
    let moved_arg = format!("root={}", moved.display());
    let mut r = restore_process(
        "vio-override-r",
        &snap,
        &vm.runtime_dir,
        &["--disk-path", &moved_arg],
    );
    let after = r.wait_tagged("DISK", 2, T);
    assert_eq!(num(&after[1], "bad"), 0, "{}", after[1]);
    r.signal(libc::SIGTERM);
    r.wait_exit(T);
    assert_eq!(
        std::fs::read(&d0).unwrap(),
        original,
        "the old disk was written"
    );
    assert_ne!(
        std::fs::read(&moved).unwrap(),
        original,
        "the new disk was not written"
    );
}

#[test]
fn restore_refuses_a_missing_or_resized_disk_and_starts_nothing() {
    let s = Scratch::new("vio-refuse");
    let d0 = image(&s, "d0.img", 8);
    let mut vm = disk_vm(
        "vio-refuse",
        "root",
        &d0,
        "console=ttyS0 workload=disk disk_blocks=16",
    );
    vm.wait_tagged("DISK", 1, T);
    let snap = s.join("snap");
    vm.suspend_to(&snap);
    let runtime = s.join("run2");
    // Missing backing file.
    std::fs::rename(&d0, s.join("elsewhere.img")).unwrap();
    let out = stasis(
        &[
            "restore",
            snap.to_str().unwrap(),
            "--name",
            "refused",
            "--serial",
            "null",
        ],
        &runtime,
    );
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(err_text(&out).contains("root"), "{}", err_text(&out));
    assert!(
        err_text(&out).contains(d0.to_str().unwrap()),
        "{}",
        err_text(&out)
    );
    assert!(!runtime.join("refused.sock").exists());
    // A file of the wrong size.
    let small = image(&s, "small.img", 4);
    let arg = format!("root={}", small.display());
    let out = stasis(
        &[
            "restore",
            snap.to_str().unwrap(),
            "--name",
            "refused",
            "--serial",
            "null",
            "--disk-path",
            &arg,
        ],
        &runtime,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out)
            .contains("is 4194304 bytes, but the snapshot was taken with a 8388608-byte image"),
        "{}",
        err_text(&out)
    );
    assert!(!runtime.join("refused.sock").exists());
}

#[test]
fn rng_delivers_entropy() {
    let mut vm = VmProcess::start(
        "vio-rng",
        VmOpts {
            cmdline: "console=ttyS0 workload=rng report_ms=200",
            extra: vec!["--rng".into(), "id=rng0".into()],
            ..Default::default()
        },
    );
    vm.wait_until("entropy covering most byte values", T, |ls| {
        ls.iter()
            .any(|l| l.starts_with("RNG ") && num(l, "distinct") >= 250)
    });
}
