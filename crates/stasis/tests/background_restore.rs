//! Background restores on real KVM: the guest runs while its memory is
//! filled (userfaultfd), on one and two vCPUs and in every restore mode;
//! devices work on memory not yet filled; a damaged chunk stops the VM
//! before the guest reads it; a working set is recorded and filled first;
//! a VM restored this way can be snapshotted at once.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

/// The memory workload on `vcpus` vCPUs, suspended to `dir` after its
/// second pass (every page stamped twice).
fn memory_snapshot(tag: &str, vcpus: u32, dir: &Path) -> VmProcess {
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            vcpus,
            memory: "192M",
            cmdline: if vcpus == 1 {
                "console=ttyS0 workload=memory mem_mib=160 report_ms=100"
            } else {
                "console=ttyS0 workload=memory mem_mib=160 report_ms=100 smp=1"
            },
            ..Default::default()
        },
    );
    vm.wait_tagged("MEM", 2 * vcpus as usize, T);
    vm.suspend_to(dir);
    vm
}

/// Waits until every CPU has finished two more passes in `r`, all clean.
fn memory_verifies(r: &mut VmProcess, vcpus: u32) {
    r.wait_until("two clean passes on every CPU", T, |ls| {
        (0..vcpus as u64).all(|c| {
            ls.iter()
                .filter(|l| l.starts_with("MEM ") && num(l, "cpu") == c)
                .count()
                >= 2
        })
    });
    for l in r.tagged("MEM") {
        assert_eq!(num(&l, "bad"), 0, "{l}");
        assert!(num(&l, "verified") > 0, "{l}");
    }
    assert!(r.tagged("MEM-BAD").is_empty(), "{:?}", r.tagged("MEM-BAD"));
}

/// Waits until stasis says the memory of `r` is resident.
fn wait_resident(r: &mut VmProcess) {
    let stderr = r.stderr_path.clone();
    r.wait_until("memory resident", T, |_| {
        std::fs::read_to_string(&stderr)
            .unwrap_or_default()
            .contains(" resident: ")
    });
}

/// `GET /v1/vm` of `r` as JSON.
fn info(r: &VmProcess) -> serde_json::Value {
    let out = r.cli(&["status", &r.name, "--json"]);
    assert!(out.status.success(), "{}", err_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_restore_mode_brings_memory_back_on_one_and_two_vcpus() {
    for vcpus in [1, 2] {
        let s = Scratch::new(&format!("bgr-modes-{vcpus}"));
        let dir = s.join("snap");
        let vm = memory_snapshot(&format!("bgr-modes-{vcpus}"), vcpus, &dir);
        for mode in ["background", "eager", "lazy"] {
            let mut r = restore_process(
                &format!("bgr-modes-{vcpus}-{mode}"),
                &dir,
                &vm.runtime_dir,
                &["--mode", mode],
            );
            memory_verifies(&mut r, vcpus);
            r.wait_socket();
            let fill = &info(&r)["memory_fill"];
            if mode == "background" {
                // Resident soon after: every block with data was filled.
                wait_resident(&mut r);
                let fill = &info(&r)["memory_fill"];
                assert_eq!(fill["resident"], true, "{fill}");
                assert!(
                    fill["filled_bytes"].as_u64().unwrap() >= 160 << 20,
                    "{fill}"
                );
            } else {
                assert!(fill.is_null(), "{mode}: {fill}");
            }
        }
    }
}

#[test]
fn devices_work_on_memory_not_yet_filled() {
    // The fillers are held: every page the guest, the disk's I/O thread
    // or the NIC's touches after the restore is filled by the fault
    // thread, for whoever touched it first.
    let hold = [("STASIS_FAILPOINTS", "restore.background_fill=hold")];
    let s = Scratch::new("bgr-dev");
    let img = s.join("d0.img");
    sparse_file(&img, 8 << 20);
    let mut vm = VmProcess::start(
        "bgr-dev-disk",
        VmOpts {
            memory: "128M",
            cmdline: "console=ttyS0 workload=disk disk_blocks=512",
            extra: vec!["--disk".into(), format!("id=d0,path={}", img.display())],
            ..Default::default()
        },
    );
    vm.wait_tagged("DISK", 2, T);
    let snap = s.join("snap");
    vm.suspend_to(&snap);
    let last = num(vm.tagged("DISK").last().unwrap(), "pass");
    let mut r = restore_process_with(None, "bgr-dev-disk-r", &snap, &vm.runtime_dir, &[], &hold);
    let after = r.wait_tagged("DISK", 3, T);
    for l in &after {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
    }
    assert!(num(&after[0], "pass") > last, "{}", after[0]);
    r.wait_socket();
    let fill = info(&r)["memory_fill"].clone();
    assert_eq!(fill["resident"], false, "the fillers ran: {fill}");
    assert!(fill["fault_fills"].as_u64().unwrap() > 0, "{fill}");
    assert!(
        r.stderr()
            .contains("STASIS-FAILPOINT restore.background_fill"),
        "{}",
        r.stderr()
    );
    drop(r);

    let ns = NetNs::new("bgrnet", &["btap0"], &s);
    let mut vm = net_guest("bgr-dev-net", &ns, "btap0", "128M");
    let before = vm.tagged("NET").pop().unwrap();
    let snap = s.join("snap-net");
    vm.suspend_to(&snap);
    let mut r = restore_process_with(
        Some(&ns.name),
        "bgr-dev-net-r",
        &snap,
        &vm.runtime_dir,
        &[],
        &hold,
    );
    let want = num(&before, "replies") + 10;
    r.wait_until("replies after the restore", T, |ls| {
        ls.iter()
            .any(|l| l.starts_with("NET ") && num(l, "replies") >= want)
    });
    let after = r.tagged("NET").pop().unwrap();
    assert_eq!(num(&after, "bad"), 0, "{after}");
    r.wait_socket();
    let fill = info(&r)["memory_fill"].clone();
    assert_eq!(fill["resident"], false, "{fill}");
}

#[test]
fn a_damaged_chunk_stops_the_vm_before_the_guest_reads_it() {
    let s = Scratch::new("bgr-bad");
    let dir = s.join("snap");
    let vm = memory_snapshot("bgr-bad", 1, &dir);
    // Chunk 40 (80 MiB into the image) is guest data the workload reads
    // on its next pass: flip one byte in it.
    let img = dir.join("memory.img");
    let at = (40u64 << 21) + 1234;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    drop(f);
    let mut r = restore_process(
        "bgr-bad-r",
        &dir,
        &vm.runtime_dir,
        &["--mode", "background"],
    );
    let st = r.wait_exit(T);
    let err = r.stderr();
    assert_eq!(st.code(), Some(8), "{err}");
    assert!(
        err.contains("memory chunk 40 ") && err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(err.contains("memory.img"), "{err}");
    // The guest never saw the damaged page: no pass found a bad one.
    assert!(r.tagged("MEM-BAD").is_empty(), "{:?}", r.tagged("MEM-BAD"));
    for l in r.tagged("MEM") {
        assert_eq!(num(&l, "bad"), 0, "{l}");
    }
    // The API socket was removed on the way out.
    assert!(!r.socket().exists());
}

#[test]
fn a_recorded_working_set_is_filled_first() {
    let s = Scratch::new("bgr-ws");
    let dir = s.join("snap");
    let mut vm = VmProcess::start(
        "bgr-ws",
        VmOpts {
            memory: "192M",
            cmdline: "console=ttyS0 workload=touch mem_mib=160 touch_hot_mib=16",
            ..Default::default()
        },
    );
    vm.wait_tagged("TOUCH-READY", 1, T);
    vm.suspend_to(&dir);
    let ready = vm.tagged("TOUCH-READY").pop().unwrap();
    let pages = num(&ready, "pages");

    // No working set yet: it restores, in address order.
    assert!(!dir.join("working-set.bin").exists());
    let mut r = restore_process(
        "bgr-ws-rec",
        &dir,
        &vm.runtime_dir,
        &["--record-working-set=3000"],
    );
    let t = r.wait_tagged("TOUCH", 1, T);
    assert_eq!(num(&t[0], "bad"), 0, "{}", t[0]);
    r.wait_until("the working set stored", T, |_| {
        dir.join("working-set.bin").exists()
    });
    drop(r);
    let reader = stasis_snapshot::SnapshotReader::open(&dir).unwrap();
    let ws = stasis_snapshot::read_working_set(&reader)
        .unwrap()
        .expect("a working set");
    // The guest read its hot set (the last 16 MiB of its pages) first:
    // the recorded order starts with those blocks (and the VMM's own
    // first touches, e.g. the VM generation ID page, at most a few).
    let first_page = u64::from_str_radix(&fields(&ready)["first_page_hex"], 16).unwrap();
    let hot_start = first_page + ((pages - (16 << 8)) << 12);
    let first_hot = ws
        .blocks
        .iter()
        .position(|&b| b + (2 << 20) > hot_start)
        .unwrap();
    assert!(
        first_hot <= 4,
        "{:x?}",
        &ws.blocks[..10.min(ws.blocks.len())]
    );
    assert!(
        ws.blocks[first_hot..first_hot + 8]
            .iter()
            .all(|&b| b + (2 << 20) > hot_start),
        "{:x?}",
        ws.blocks
    );

    // The next restore fills those blocks first, and says so.
    let mut r = restore_process("bgr-ws-use", &dir, &vm.runtime_dir, &[]);
    let t = r.wait_tagged("TOUCH", 1, T);
    assert_eq!(num(&t[0], "bad"), 0, "{}", t[0]);
    wait_resident(&mut r);
    let err = r.stderr();
    assert!(err.contains("working set of "), "{err}");
    r.wait_socket();
    let fill = info(&r)["memory_fill"].clone();
    assert!(fill["prefetched_blocks"].as_u64().unwrap() > 0, "{fill}");
    drop(r);

    // A damaged working set is only a warning.
    let ws_path = dir.join("working-set.bin");
    let mut bytes = std::fs::read(&ws_path).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&ws_path, &bytes).unwrap();
    let mut r = restore_process("bgr-ws-bad", &dir, &vm.runtime_dir, &[]);
    let t = r.wait_tagged("TOUCH", 1, T);
    assert_eq!(num(&t[0], "bad"), 0, "{}", t[0]);
    assert!(
        r.stderr()
            .contains("working-set.bin: checksum mismatch; ignored"),
        "{}",
        r.stderr()
    );
}

#[test]
fn a_vm_restored_in_the_background_is_snapshotted_once_resident() {
    // The fillers start 5 s late (ample for the first status request on a
    // loaded host): the snapshot asked for at once waits for the memory,
    // then takes a background snapshot as of any VM.
    let s = Scratch::new("bgr-snap");
    let dir = s.join("snap");
    let vm = memory_snapshot("bgr-snap", 1, &dir);
    let mut r = restore_process_with(
        None,
        "bgr-snap-r",
        &dir,
        &vm.runtime_dir,
        &[],
        &[("STASIS_FAILPOINTS", "restore.background_fill=sleep(5000)")],
    );
    r.wait_socket();
    assert_eq!(info(&r)["memory_fill"]["resident"], false);
    let second = s.join("second");
    let report = r.snapshot_with(&second, &["--mode", "background"]);
    assert_eq!(report["mode"], "background", "{report}");
    assert_eq!(info(&r)["memory_fill"]["resident"], true);
    drop(r);
    let mut again = restore_process("bgr-snap-again", &second, &vm.runtime_dir, &[]);
    memory_verifies(&mut again, 1);
}

#[test]
fn two_clones_of_one_snapshot_each_fill_their_own_memory() {
    // Both restored at once in the background from one memory image: each
    // guest rewrites all its pages pass after pass at its own pace and
    // checks the previous pass's stamps, which would fail at once if the
    // two shared any page.
    let s = Scratch::new("bgr-clones");
    let dir = s.join("snap");
    let vm = memory_snapshot("bgr-clones", 1, &dir);
    let mut a = restore_process("bgr-clones-a", &dir, &vm.runtime_dir, &[]);
    let mut b = restore_process("bgr-clones-b", &dir, &vm.runtime_dir, &[]);
    for r in [&mut a, &mut b] {
        r.wait_until("three clean passes", T, |ls| {
            ls.iter().filter(|l| l.starts_with("MEM ")).count() >= 3
        });
        memory_verifies(r, 1);
        wait_resident(r);
    }
    // Different processes, different memory: each filled all of its own.
    for r in [&a, &b] {
        let fill = info(r)["memory_fill"].clone();
        assert!(
            fill["filled_bytes"].as_u64().unwrap() >= 160 << 20,
            "{fill}"
        );
    }
}
