//! Background (copy-on-write) snapshots on real KVM: the guest runs while
//! its memory is copied, and the snapshot is still exactly the guest at
//! the instant of the pause.
//!
//! The guest kit's `memory` workload stamps every page with its pass
//! number, over and over, and checks each page's previous stamp before
//! rewriting it. A restored guest resumes at the page it was about to
//! stamp: every page before it must hold this pass, every page after it
//! the previous one. A snapshot that caught a single page written after
//! the pause (or missed one written before) makes it print `MEM-BAD`.
//!
//! So that the guest surely writes while memory is being copied, the
//! writer is held for a second before its first batch (failpoint
//! `writer.memory_batch`); every page the guest writes in that time is
//! copied early by the fault handler, which the report counts.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// Holds the background writer 1 s before its first batch.
const HOLD_FIRST_BATCH: &str = "writer.memory_batch=1*sleep(1000)";

fn memory_vm(tag: &str, mib: u64, vcpus: u32, backend: &str) -> VmProcess {
    let memory = format!("{mib}M");
    let cmdline = format!(
        "console=ttyS0 workload=memory mem_mib={} report_ms=200{}",
        mib - 16,
        if vcpus > 1 { " smp=1" } else { "" }
    );
    VmProcess::start(
        tag,
        VmOpts {
            vcpus,
            memory: &memory,
            cmdline: &cmdline,
            env: vec![("STASIS_FAILPOINTS".into(), HOLD_FIRST_BATCH.into())],
            extra: vec!["--memory-backend".into(), backend.into()],
            ..Default::default()
        },
    )
}

/// `MEM` lines of one CPU.
fn mem_of(lines: &[String], cpu: u64) -> Vec<String> {
    lines
        .iter()
        .filter(|l| num(l, "cpu") == cpu)
        .cloned()
        .collect()
}

fn assert_clean(vm: &VmProcess, lines: &[String]) {
    for l in lines {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
    }
    let bad = vm.tagged("MEM-BAD");
    assert!(bad.is_empty(), "{bad:?}");
}

/// Background snapshot of a guest writing all its memory; the source goes
/// on, and the restored guest finds every page as it was at the pause.
fn memory_exact_at_pause(tag: &str, mib: u64, vcpus: u32, backend: &str) {
    let mut vm = memory_vm(tag, mib, vcpus, backend);
    let cpus: Vec<u64> = (0..vcpus as u64).collect();
    // Every CPU has written its whole share once.
    vm.wait_until("a full pass on every CPU", T, |ls| {
        let mem: Vec<String> = ls
            .iter()
            .filter(|l| l.starts_with("MEM "))
            .cloned()
            .collect();
        cpus.iter().all(|&c| !mem_of(&mem, c).is_empty())
    });
    vm.wait_socket();
    let dir = vm.scratch.join("snap");
    let report = vm.snapshot_with(&dir, &["--mode", "background"]);
    assert_eq!(report["mode"], "background", "{report}");
    assert_eq!(report["memory_bytes"].as_u64(), Some(mib << 20), "{report}");
    // The guest ran and wrote while memory was copied: the fault handler
    // copied those chunks first.
    assert!(
        report["early_copied_bytes"].as_u64().unwrap() > 0,
        "no page was copied early: {report}"
    );
    assert!(report["write_faults"].as_u64().unwrap() > 0, "{report}");
    let before = vm.tagged("MEM");

    // The source goes on correctly: each CPU finishes two more passes.
    vm.wait_until("two more passes on the source", T, |ls| {
        let mem: Vec<String> = ls
            .iter()
            .filter(|l| l.starts_with("MEM "))
            .cloned()
            .collect();
        cpus.iter()
            .all(|&c| mem_of(&mem, c).len() >= mem_of(&before, c).len() + 2)
    });
    assert_clean(&vm, &vm.tagged("MEM"));
    vm.signal(libc::SIGTERM);
    vm.wait_exit(T);

    // The restored guest verifies every page against its position at the
    // pause: the pass under way, then a whole pass.
    let mut r = restore_process(&format!("{tag}-r"), &dir, &vm.runtime_dir, &[]);
    r.wait_until("two passes after the restore", T, |ls| {
        let mem: Vec<String> = ls
            .iter()
            .filter(|l| l.starts_with("MEM "))
            .cloned()
            .collect();
        cpus.iter().all(|&c| mem_of(&mem, c).len() >= 2)
    });
    let after = r.tagged("MEM");
    assert_clean(&r, &after);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", r.child.id())).unwrap();
    assert_eq!(
        maps.contains("memfd:stasis-guest-ram"),
        backend == "memfd",
        "the restored RAM keeps the backend"
    );
    for &c in &cpus {
        let a = mem_of(&after, c);
        assert!(num(&a[1], "verified") > 0, "{}", a[1]);
    }
}

#[test]
fn background_snapshot_is_the_guest_at_the_pause_256m_1cpu() {
    memory_exact_at_pause("bg-256-1", 256, 1, "anonymous");
}

#[test]
fn background_snapshot_is_the_guest_at_the_pause_256m_2cpus() {
    memory_exact_at_pause("bg-256-2", 256, 2, "anonymous");
}

#[test]
fn background_snapshot_is_the_guest_at_the_pause_1g_2cpus() {
    memory_exact_at_pause("bg-1g-2", 1024, 2, "anonymous");
}

/// RAM that is a shared memory file (`--memory-backend memfd`): write
/// protection works on it too, and the restore (in the background, its
/// RAM again a memory file, filled by copying) verifies every page.
#[test]
fn background_snapshot_of_memfd_ram_is_the_guest_at_the_pause() {
    memory_exact_at_pause("bg-memfd", 256, 1, "memfd");
}

/// Device threads write into guest memory too (a block read lands in a
/// guest buffer, the used ring is updated): during a background copy those
/// writes block on the protection until the chunk is copied, and must
/// neither deadlock nor stop the guest's I/O.
#[test]
fn device_writes_during_a_background_copy_go_through() {
    let s = Scratch::new("bg-disk");
    let img = s.join("d0.img");
    sparse_file(&img, 8 << 20);
    let mut vm = VmProcess::start(
        "bg-disk",
        VmOpts {
            extra: vec!["--disk".into(), format!("id=d0,path={}", img.display())],
            cmdline: "console=ttyS0 workload=disk disk_blocks=512",
            env: vec![("STASIS_FAILPOINTS".into(), HOLD_FIRST_BATCH.into())],
            ..Default::default()
        },
    );
    vm.wait_tagged("DISK", 2, T);
    vm.wait_socket();
    let dir = s.join("snap");
    let report = vm.snapshot_with(&dir, &["--mode", "background", "--disk-mode", "skip"]);
    assert_eq!(report["mode"], "background", "{report}");
    assert!(report["write_faults"].as_u64().unwrap() > 0, "{report}");
    // I/O goes on: more passes, every block verified.
    let n = vm.tagged("DISK").len();
    let lines = vm.wait_tagged("DISK", n + 2, T);
    for l in &lines {
        assert_eq!(num(l, "bad"), 0, "{l}");
    }
}

/// A lazily restored VM maps its RAM from the snapshot file, which the
/// kernel cannot write-protect: `--mode background` is refused with the
/// reason, and the default falls back to stop-copy and says why.
#[test]
fn background_mode_on_file_backed_ram_is_refused_or_falls_back() {
    let mut vm = VmProcess::start("bg-lazy", VmOpts::default());
    vm.wait_tagged("HB", 2, T);
    let s = Scratch::new("bg-lazy-snap");
    let first = s.join("first");
    vm.suspend_to(&first);
    let mut r = restore_process("bg-lazy-r", &first, &vm.runtime_dir, &["--mode", "lazy"]);
    r.wait_tagged("HB", 2, T);
    r.wait_socket();
    let second = s.join("second");
    let out = r.cli(&[
        "snapshot",
        &r.name,
        second.to_str().unwrap(),
        "--mode",
        "background",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    let e = err_text(&out);
    assert!(
        e.contains("cannot take a background snapshot") && e.contains("lazy restore"),
        "{e}"
    );
    assert!(!second.exists());
    let out = r.cli(&["snapshot", &r.name, second.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", err_text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "stop-copy", "{report}");
    assert!(
        report["mode_note"]
            .as_str()
            .unwrap()
            .contains("lazy restore"),
        "{report}"
    );
    // The VM still runs.
    let n = r.tagged("HB").len();
    r.wait_tagged("HB", n + 2, T);
}
