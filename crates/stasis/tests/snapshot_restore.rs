//! Save and restore on real KVM: the guest continues exactly where it
//! stopped, across vCPUs, memory, registers and timers.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Boots `cmdline`, waits for `ready` lines with `tag`, suspends to a
/// snapshot and restores it. Returns (original, restored, snapshot dir
/// holder).
fn suspend_and_restore(
    tag: &str,
    opts: VmOpts,
    ready_tag: &str,
    ready: usize,
) -> (VmProcess, VmProcess, Scratch) {
    let mut vm = VmProcess::start(tag, opts);
    vm.wait_tagged(ready_tag, ready, T);
    vm.wait_socket();
    let snaps = Scratch::new(&format!("{tag}-snap"));
    let dir = snaps.join("snap");
    let report = vm.snapshot(&dir, true);
    assert_eq!(report["stopped"], true);
    let st = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", vm.stderr());
    assert!(
        vm.stderr().contains("suspended to snapshot"),
        "{}",
        vm.stderr()
    );
    let restored = restore_process(&format!("{tag}-r"), &dir, &vm.runtime_dir, &[]);
    (vm, restored, snaps)
}

/// The guest's output across a suspend and restore, as one stream: a line
/// the guest was printing when it was suspended ends in the restored VM's
/// output. Returns (complete lines before the snapshot, lines after).
fn joined(orig: &VmProcess, restored: &VmProcess) -> (Vec<String>, Vec<String>) {
    let a = std::fs::read_to_string(&orig.serial).unwrap_or_default();
    let b = std::fs::read_to_string(&restored.serial).unwrap_or_default();
    lines_across(&a, &b)
}

/// Heartbeat lines of one CPU.
fn hb_of(lines: &[String], cpu: u64) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with("HB ") && num(l, "cpu") == cpu)
        .cloned()
        .collect()
}

fn assert_continues(before: &[String], after: &[String]) {
    let last = before.last().expect("heartbeat before the snapshot");
    let first = after.first().expect("heartbeat after the restore");
    assert_eq!(
        num(first, "seq"),
        num(last, "seq") + 1,
        "heartbeat did not continue where it stopped: {last} -> {first}"
    );
    assert!(
        num(first, "counter") > num(last, "counter"),
        "counter went back: {last} -> {first}"
    );
    for w in after.windows(2) {
        assert_eq!(num(&w[1], "seq"), num(&w[0], "seq") + 1);
        assert!(num(&w[1], "counter") > num(&w[0], "counter"));
    }
}

#[test]
fn heartbeat_continues_after_restore() {
    let (vm, mut r, _s) = suspend_and_restore(
        "sr-hb",
        VmOpts {
            cmdline: "console=ttyS0 workload=heartbeat hb_ms=50",
            ..Default::default()
        },
        "HB",
        3,
    );
    r.wait_tagged("HB", 3, T);
    let (before, after) = joined(&vm, &r);
    assert_continues(&hb_of(&before, 0), &hb_of(&after, 0));
}

#[test]
fn both_vcpus_continue_after_restore() {
    let (vm, mut r, _s) = suspend_and_restore(
        "sr-smp",
        VmOpts {
            vcpus: 2,
            cmdline: "console=ttyS0 workload=heartbeat hb_ms=50 smp=1",
            ..Default::default()
        },
        "HB",
        6,
    );
    r.wait_until("heartbeats from both CPUs", T, |ls| {
        let l = ls.to_vec();
        hb_of(&l, 0).len() >= 3 && hb_of(&l, 1).len() >= 3
    });
    let (before, after) = joined(&vm, &r);
    for cpu in [0, 1] {
        assert_continues(&hb_of(&before, cpu), &hb_of(&after, cpu));
    }
}

#[test]
fn every_page_stamp_verifies_after_restore() {
    let (vm, mut r, _s) = suspend_and_restore(
        "sr-mem",
        VmOpts {
            memory: "96M",
            cmdline: "console=ttyS0 workload=memory mem_mib=48 report_ms=100",
            ..Default::default()
        },
        "MEM",
        2,
    );
    let before = vm.tagged("MEM");
    let n = before.len();
    let last_pass = num(before.last().unwrap(), "pass");
    // Two more full passes after the restore: every page written before the
    // snapshot is verified, then rewritten and verified again.
    let after = r.wait_tagged("MEM", 2, T);
    let _ = n;
    for l in &after {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
        assert!(num(l, "verified") > 0, "{l}");
    }
    assert!(
        num(&after[0], "pass") > last_pass,
        "{:?} then {:?}",
        before.last(),
        after[0]
    );
    assert!(r.tagged("MEM-BAD").is_empty(), "{:?}", r.tagged("MEM-BAD"));
}

#[test]
fn timer_runs_after_restore() {
    let (_vm, mut r, _s) = suspend_and_restore(
        "sr-timer",
        VmOpts {
            cmdline: "console=ttyS0 workload=timer timer_hz=100 report_ms=500",
            ..Default::default()
        },
        "TIMER",
        2,
    );
    let after = r.wait_tagged("TIMER", 4, T);
    // The timer runs after the restore (ticks between every two reports)
    // and never faster than it was set to (a load on the host can only
    // make a guest miss ticks, never gain them). How close to 100 Hz it
    // stays is measured by `cargo bench -p stasis --bench quiesce`.
    timer_runs_at_most_at(&after, 100.0);
    assert!(num(after.last().unwrap(), "ticks") > num(&after[0], "ticks"));
}

#[test]
fn registers_survive_100_snapshot_restore_cycles() {
    let opts = VmOpts {
        memory: "32M",
        cmdline: "console=ttyS0 workload=registers report_ms=20 regs_hold_ms=5",
        ..Default::default()
    };
    let mut vm = VmProcess::start("sr-regs", opts);
    vm.wait_tagged("REGS", 1, T);
    vm.wait_socket();
    let snaps = Scratch::new("sr-regs-snap");
    let runtime = vm.runtime_dir.clone();
    let mut last_round = num(vm.tagged("REGS").last().unwrap(), "round");
    // `vm` owns the runtime directory every restored VM uses: keep it.
    let mut current: Option<VmProcess> = None;
    for cycle in 0..100 {
        let dir = snaps.join(&format!("c{}", cycle % 2));
        let current_vm = current.as_ref().unwrap_or(&vm);
        current_vm.snapshot(&dir, true);
        let code = match current.as_mut() {
            Some(c) => c.wait_exit(Duration::from_secs(30)).code(),
            None => vm.wait_exit(Duration::from_secs(30)).code(),
        };
        assert_eq!(code, Some(0));
        let mut next = restore_process("sr-regs-r", &dir, &runtime, &[]);
        // A report from a later round proves the registers were checked
        // after this restore.
        next.wait_until("a REGS report after the restore", T, |ls| {
            ls.iter()
                .filter(|l| l.starts_with("REGS "))
                .any(|l| num(l, "round") > last_round)
        });
        next.wait_socket();
        let regs = next.tagged("REGS");
        let last = regs.last().unwrap();
        assert_eq!(num(last, "mismatches"), 0, "cycle {cycle}: {last}");
        assert!(
            next.tagged("REGS-MISMATCH").is_empty(),
            "cycle {cycle}: {:?}",
            next.tagged("REGS-MISMATCH")
        );
        last_round = num(last, "round");
        current = Some(next);
    }
    let regs = current.unwrap().tagged("REGS");
    let last = regs.last().unwrap();
    assert_eq!(num(last, "mismatches"), 0, "{last}");
    assert!(num(last, "checks") > 0);
}

#[test]
fn a_restored_vm_snapshots_and_restores_again() {
    let (_vm, mut r1, s) = suspend_and_restore(
        "sr-chain",
        VmOpts {
            cmdline: "console=ttyS0 workload=heartbeat hb_ms=50",
            ..Default::default()
        },
        "HB",
        2,
    );
    r1.wait_tagged("HB", 2, T);
    r1.wait_socket();
    let dir2 = s.join("second");
    r1.snapshot(&dir2, true);
    assert_eq!(r1.wait_exit(Duration::from_secs(30)).code(), Some(0));
    let mut r2 = restore_process("sr-chain-r2", &dir2, &r1.runtime_dir, &[]);
    r2.wait_tagged("HB", 2, T);
    let (before, after) = joined(&r1, &r2);
    assert_continues(&hb_of(&before, 0), &hb_of(&after, 0));
}

#[test]
fn one_snapshot_restored_into_two_vms_at_once() {
    let mut vm = VmProcess::start(
        "sr-clone",
        VmOpts {
            cmdline: "console=ttyS0 workload=heartbeat hb_ms=50",
            ..Default::default()
        },
    );
    vm.wait_tagged("HB", 2, T);
    vm.wait_socket();
    let snaps = Scratch::new("sr-clone-snap");
    let dir = snaps.join("snap");
    // Without --stop: the original keeps running too.
    let report = vm.snapshot(&dir, false);
    assert_eq!(report["stopped"], false);
    let n = vm.tagged("HB").len();
    vm.wait_tagged("HB", n + 2, T);
    let mut a = restore_process("sr-clone-a", &dir, &vm.runtime_dir, &[]);
    let mut b = restore_process("sr-clone-b", &dir, &vm.runtime_dir, &["--mode", "eager"]);
    let ha = a.wait_tagged("HB", 3, T);
    let hb = b.wait_tagged("HB", 3, T);
    // Both continue from the same point.
    assert_eq!(num(&ha[0], "seq"), num(&hb[0], "seq"));
    // Each clone can tell it is a clone: a new VM generation ID, generation 1.
    let gen = |p: &VmProcess| {
        p.tagged("GENID")
            .last()
            .cloned()
            .unwrap_or_else(|| p.fail("no GENID line"))
    };
    a.wait_tagged("GENID", 1, T);
    b.wait_tagged("GENID", 1, T);
    let (ga, gb) = (gen(&a), gen(&b));
    assert_eq!(num(&ga, "generation"), 1, "{ga}");
    assert_eq!(num(&gb, "generation"), 1, "{gb}");
    assert_ne!(fields(&ga)["id_hex"], fields(&gb)["id_hex"]);
    let go = gen(&vm);
    assert_eq!(num(&go, "generation"), 0, "{go}");
    assert_ne!(fields(&go)["id_hex"], fields(&ga)["id_hex"]);
}
