//! Diff snapshots and chains on real KVM: a diff stores only the pages
//! that changed since its parent, a chain of them restores to a guest that
//! finds every page as it was, a merge flattens a chain into a full
//! snapshot of the same memory, and broken chains are refused by name.
//!
//! The guest kit's `memory` workload with `mem_hot_mib` writes all its
//! working set once, then keeps rewriting only the first (hot) part and
//! checks the rest against its first stamp on every pass: the dirtied part
//! of memory is known, and a restored guest checks every page.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

fn hot_vm(tag: &str, mib: u64, hot_mib: u64) -> VmProcess {
    let memory = format!("{mib}M");
    let cmdline = format!(
        "console=ttyS0 workload=memory mem_mib={} mem_hot_mib={hot_mib} report_ms=200",
        mib - 16
    );
    VmProcess::start(
        tag,
        VmOpts {
            memory: &memory,
            cmdline: &cmdline,
            ..Default::default()
        },
    )
}

/// Waits for `n` more `MEM` lines (complete passes).
fn passes(vm: &mut VmProcess, n: usize) {
    let have = vm.tagged("MEM").len();
    vm.wait_tagged("MEM", have + n, T);
}

/// Restores `snap` (with `extra`) and checks that the guest verifies every
/// page twice over: hot pages against their last pass, cold ones against
/// their first stamp.
fn restore_verifies(tag: &str, snap: &Path, runtime: &Path, extra: &[&str]) {
    let mut r = restore_process(tag, snap, runtime, extra);
    let after = r.wait_tagged("MEM", 2, T);
    for l in &after {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
    }
    assert!(num(&after[1], "verified") > 0, "{}", after[1]);
    assert!(r.tagged("MEM-BAD").is_empty(), "{:?}", r.tagged("MEM-BAD"));
}

fn composed(snap: &Path) -> Vec<Vec<u8>> {
    let chain = stasis_snapshot::SnapshotChain::open(snap).unwrap();
    chain
        .newest()
        .regions()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut buf = vec![0u8; r.size as usize];
            chain.read_region_into(i, &mut buf, true).unwrap();
            buf
        })
        .collect()
}

/// 10% of a 1 GiB guest dirtied: the diff stores about that much.
#[test]
fn a_diff_of_a_1g_guest_with_10_percent_dirty_stores_about_10_percent() {
    let mut vm = hot_vm("diff-1g", 1024, 100);
    vm.wait_tagged("MEM", 1, T);
    vm.wait_socket();
    let full = vm.scratch.join("full");
    let r0 = vm.snapshot(&full, false);
    // Two passes: one whole pass of the hot part after the full snapshot.
    passes(&mut vm, 2);
    let diff = vm.scratch.join("diff");
    let r1 = vm.snapshot_with(&diff, &["--parent", full.to_str().unwrap()]);
    assert_eq!(r1["parent"], "../full", "{r1}");
    let hot = 100u64 << 20;
    let stored = r1["memory_written_bytes"].as_u64().unwrap();
    assert!(
        stored >= hot && stored as f64 <= 1.2 * hot as f64,
        "diff stored {stored} bytes for {hot} dirtied (full: {})",
        r0["memory_written_bytes"]
    );
    let allocated = stasis_snapshot::SnapshotReader::open(&diff)
        .unwrap()
        .memory_allocated_bytes()
        .unwrap();
    assert!(
        allocated as f64 <= 1.2 * hot as f64,
        "diff allocates {allocated} bytes for {hot} dirtied"
    );
    vm.signal(libc::SIGTERM);
    vm.wait_exit(T);
    restore_verifies("diff-1g-r", &diff, &vm.runtime_dir, &[]);
}

/// A chain of five diffs restores (lazily and eagerly) to a guest that
/// verifies every page; merged it is one full snapshot of the same memory;
/// a missing or damaged parent is refused by name.
#[test]
fn a_chain_of_five_diffs_restores_merges_and_refuses_broken_parents() {
    let mut vm = hot_vm("diff-chain", 256, 24);
    vm.wait_tagged("MEM", 1, T);
    vm.wait_socket();
    let dirs: Vec<_> = (0..6).map(|i| vm.scratch.join(&format!("s{i}"))).collect();
    vm.snapshot(&dirs[0], false);
    for i in 1..6 {
        passes(&mut vm, 1);
        let r = vm.snapshot_with(&dirs[i], &["--parent", dirs[i - 1].to_str().unwrap()]);
        assert_eq!(r["parent"], format!("../s{}", i - 1), "{r}");
    }
    vm.signal(libc::SIGTERM);
    vm.wait_exit(T);
    let last = &dirs[5];
    let out = stasis(&["inspect", last.to_str().unwrap()], &vm.runtime_dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("chain (6 snapshots, newest first)"), "{text}");
    let out = stasis(&["verify", last.to_str().unwrap()], &vm.runtime_dir);
    assert!(out.status.success(), "{}", err_text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("chain of 6 snapshots OK"), "{said}");

    restore_verifies(
        "diff-chain-lazy",
        last,
        &vm.runtime_dir,
        &["--mode", "lazy"],
    );
    restore_verifies(
        "diff-chain-eager",
        last,
        &vm.runtime_dir,
        &["--mode", "eager"],
    );

    // A missing parent, then a damaged one: refused, naming it.
    let s3 = dirs[3].to_str().unwrap().to_string();
    let aside = vm.scratch.join("aside");
    std::fs::rename(&dirs[3], &aside).unwrap();
    let out = stasis(&["restore", last.to_str().unwrap()], &vm.runtime_dir);
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(err_text(&out).contains(&s3), "{}", err_text(&out));
    std::fs::rename(&aside, &dirs[3]).unwrap();
    let mem2 = dirs[2].join("memory.img");
    let saved = std::fs::read(&mem2).unwrap();
    let at = saved.iter().position(|&b| b != 0).expect("s2 stores pages");
    let mut damaged = saved.clone();
    damaged[at] ^= 0xFF;
    std::fs::write(&mem2, &damaged).unwrap();
    let out = stasis(
        &["restore", last.to_str().unwrap(), "--mode", "eager"],
        &vm.runtime_dir,
    );
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("s2") && err_text(&out).contains("verification failed"),
        "{}",
        err_text(&out)
    );
    // A background restore reads the chain through its fault handler and
    // fillers, checking each chunk as read: the damaged one ends the VM.
    let out = stasis(&["restore", last.to_str().unwrap()], &vm.runtime_dir);
    assert_eq!(out.status.code(), Some(8), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("s2/memory.img: memory chunk"),
        "{}",
        err_text(&out)
    );
    let out = stasis(&["verify", last.to_str().unwrap()], &vm.runtime_dir);
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(err_text(&out).contains("s2"), "{}", err_text(&out));
    std::fs::write(&mem2, &saved).unwrap();

    // Merged: one full snapshot, the same memory, and it restores.
    let before = composed(last);
    let out = stasis(
        &["snapshot", "merge", last.to_str().unwrap()],
        &vm.runtime_dir,
    );
    assert!(out.status.success(), "{}", err_text(&out));
    let merged = stasis_snapshot::SnapshotReader::open(last).unwrap();
    assert_eq!(merged.body().parent, None);
    assert!(
        composed(last) == before,
        "the merged snapshot's memory differs"
    );
    restore_verifies("diff-chain-merged", last, &vm.runtime_dir, &[]);
}
