//! Snapshot and restore benchmark: prints a table, asserts nothing.
//!
//! For each guest size, boots the guest kit's memory workload over (almost)
//! all of RAM, waits until it has written every page once, then measures,
//! with the guest still writing all its memory as fast as it can:
//! a stop-copy snapshot (guest pause, total time to durable), a background
//! snapshot (guest pause, of it the write-protect time, the copy while the
//! guest runs, bytes copied early because the guest wrote them, total), and
//! `dd conv=fdatasync` of the same bytes into the same directory, while the
//! guest still runs (the floor for a durable copy under the same load) and
//! again once it has ended (the floor on an idle host); then restores in lazy and eager mode (time
//! from `stasis restore` to the vCPUs starting, and until the guest has
//! verified and rewritten all its memory once more). Then, on a guest that
//! wrote all its RAM once and rewrites 10% of it: a full snapshot and a
//! diff snapshot against it two passes later (size on disk against the
//! dirtied memory, pause, total). Medians of `STASIS_BENCH_RUNS` runs
//! (default 3).
//!
//! ```text
//! cargo bench -p stasis --bench snapshot                 # 256 MiB, 1 GiB, 4 GiB
//! STASIS_BENCH_SIZES=256,1024 STASIS_BENCH_RUNS=5 cargo bench -p stasis --bench snapshot
//! ```

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{
    median, run_guest, runs, setup, size_name, sizes, spawn_restore, stasis, wait_line, Vmm,
};

/// Waits until the serial log has `n` complete `MEM ` lines; returns when.
fn wait_mem_lines(log: &Path, n: usize, timeout: Duration) -> Instant {
    wait_line(log, "MEM ", n, timeout, &["GUEST-ERROR", "MEM-BAD"]);
    Instant::now()
}

fn du_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

#[derive(Default, Clone)]
struct Run {
    pause_ms: f64,
    total_ms: f64,
    mb_s: f64,
    disk_mib: f64,
    bg_pause_ms: f64,
    bg_protect_ms: f64,
    bg_copy_ms: f64,
    bg_total_ms: f64,
    bg_early_mib: f64,
    bg_sync_ms: f64,
    dd_ms: f64,
    dd_idle_ms: f64,
    diff_full_ms: f64,
    diff_ms: f64,
    diff_pause_ms: f64,
    diff_stored_mib: f64,
    diff_dirty_mib: f64,
    lazy_ready_ms: f64,
    lazy_touch_ms: f64,
    eager_ready_ms: f64,
    eager_touch_ms: f64,
}

/// Restores `snap` and returns (ms from spawn to "ready" (vCPUs about to
/// start), ms from spawn until the guest finished a full memory pass).
fn restore(snap: &Path, runtime: &Path, mode: &str, work: &Path) -> (f64, f64) {
    let log = work.join(format!("serial-{mode}.log"));
    let _ = std::fs::remove_file(&log);
    let t0 = Instant::now();
    let (child, ready) = spawn_restore(
        runtime,
        snap,
        &["--mode", mode, "--no-verify"],
        &format!("bench-{mode}"),
        &log,
    );
    // The first MEM line after restore ends the pass that was under way; the
    // second ends a full pass: the guest has verified and rewritten every
    // page since the restore.
    let touched = wait_mem_lines(&log, 2, Duration::from_secs(600)) - t0;
    drop(child);
    (ready.as_secs_f64() * 1e3, touched.as_secs_f64() * 1e3)
}

/// A guest that wrote all its RAM once and then rewrites 10% of it: a full
/// snapshot, two passes (every hot page rewritten since), a diff snapshot
/// against it. Fills the `diff_*` fields.
fn diff_run(mib: u64, kernel: &Path, work: &Path, run: &mut Run) {
    let runtime = work.join("run-diff");
    let log = work.join("serial-diff.log");
    let _ = std::fs::remove_file(&log);
    let used = mib - 8;
    let hot = used / 10;
    let vm = Vmm(stasis(&runtime)
        .args([
            "run",
            "--name",
            "bench-diff",
            "--memory",
            &format!("{mib}M"),
        ])
        .arg("--kernel")
        .arg(kernel)
        .args([
            "--cmdline",
            &format!(
                "console=ttyS0 workload=memory mem_mib={used} mem_hot_mib={hot} report_ms=100000"
            ),
        ])
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stasis run"));
    wait_mem_lines(&log, 1, Duration::from_secs(900));
    let full = work.join("diff-parent");
    let child = work.join("diff-child");
    let take = |dir: &Path, extra: &[&str]| -> serde_json::Value {
        let _ = std::fs::remove_dir_all(dir);
        let out = stasis(&runtime)
            .args(["snapshot", "bench-diff", dir.to_str().unwrap(), "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let f = take(&full, &[]);
    run.diff_full_ms = f["total_ms"].as_f64().unwrap();
    let seen = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("MEM "))
        .count();
    wait_mem_lines(&log, seen + 2, Duration::from_secs(900));
    let d = take(&child, &["--parent", full.to_str().unwrap()]);
    drop(vm);
    run.diff_ms = d["total_ms"].as_f64().unwrap();
    run.diff_pause_ms = d["pause_ms"].as_f64().unwrap();
    run.diff_stored_mib = du_bytes(&child) as f64 / (1 << 20) as f64;
    run.diff_dirty_mib = hot as f64;
    let _ = std::fs::remove_dir_all(&child);
    let _ = std::fs::remove_dir_all(&full);
}

fn one_run(mib: u64, kernel: &Path, work: &Path) -> Run {
    let runtime = work.join("run");
    let log = work.join("serial.log");
    let _ = std::fs::remove_file(&log);
    // All of RAM but the guest image and boot structures (~6 MiB).
    let cmdline = format!("console=ttyS0 workload=memory mem_mib={}", mib - 8);
    let vm = run_guest(&runtime, "bench", mib, kernel, &cmdline, &log, &[]);
    // Pass 1 done: every page of the working set has been written.
    wait_mem_lines(&log, 1, Duration::from_secs(900));
    let snapshot = |dir: &Path, mode: &str| -> serde_json::Value {
        let _ = std::fs::remove_dir_all(dir);
        let out = stasis(&runtime)
            .args([
                "snapshot",
                "bench",
                dir.to_str().unwrap(),
                "--json",
                "--mode",
                mode,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let stop_copy_dir = work.join("snap-stop-copy");
    let r = snapshot(&stop_copy_dir, "stop-copy");
    let mut run = Run {
        pause_ms: r["pause_ms"].as_f64().unwrap(),
        total_ms: r["total_ms"].as_f64().unwrap(),
        disk_mib: du_bytes(&stop_copy_dir) as f64 / (1 << 20) as f64,
        ..Default::default()
    };
    run.mb_s = r["memory_bytes"].as_f64().unwrap() / 1e6 / (run.total_ms / 1e3);
    let snap = work.join("snap");
    let b = snapshot(&snap, "background");
    assert_eq!(b["mode"], "background", "{b}");
    run.bg_pause_ms = b["pause_ms"].as_f64().unwrap();
    run.bg_protect_ms = b["protect_ms"].as_f64().unwrap();
    run.bg_copy_ms = b["background_copy_ms"].as_f64().unwrap();
    run.bg_total_ms = b["total_ms"].as_f64().unwrap();
    run.bg_early_mib = b["early_copied_bytes"].as_f64().unwrap() / (1 << 20) as f64;
    run.bg_sync_ms = b["sync_ms"].as_f64().unwrap();
    // The floor: the same bytes, copied and made durable by dd, in the
    // same directory (from the page cache: the stop-copy image was just
    // written), while the guest still runs, as it does during the
    // background copy (its vCPU keeps one of the host's CPUs busy).
    let dd = || {
        let dd_out = work.join("dd.img");
        let t = Instant::now();
        let st = Command::new("dd")
            .arg(format!("if={}", stop_copy_dir.join("memory.img").display()))
            .arg(format!("of={}", dd_out.display()))
            .args(["bs=16M", "conv=fdatasync,sparse", "status=none"])
            .status()
            .unwrap();
        assert!(st.success());
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let _ = std::fs::remove_file(&dd_out);
        ms
    };
    run.dd_ms = dd();
    drop(vm);
    // And with the host otherwise idle.
    run.dd_idle_ms = dd();
    let _ = std::fs::remove_dir_all(&stop_copy_dir);
    (run.lazy_ready_ms, run.lazy_touch_ms) = restore(&snap, &runtime, "lazy", work);
    (run.eager_ready_ms, run.eager_touch_ms) = restore(&snap, &runtime, "eager", work);
    let _ = std::fs::remove_dir_all(&snap);
    diff_run(mib, kernel, work, &mut run);
    run
}

fn main() {
    let Some((work, kernel)) = setup("snapshot") else {
        return;
    };
    let sizes = sizes();
    let runs = runs();

    println!("stasis snapshot/restore benchmark: medians of {runs} run(s); times in ms; the guest writes all its RAM throughout");
    let all: Vec<(u64, Vec<Run>)> = sizes
        .iter()
        .map(|&mib| {
            let runs: Vec<Run> = (0..runs).map(|_| one_run(mib, &kernel, &work.0)).collect();
            (mib, runs)
        })
        .collect();
    println!();
    println!(
        "| guest | stop-copy: pause | stop-copy: total | background: pause | of it: write-protect | background: copy | copied early MiB | background: fsync | background: total | dd, guest running | total / dd | dd, host idle | total / idle dd | on disk MiB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (mib, runs) in &all {
        let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} |",
            size_name(*mib),
            m(|r| r.pause_ms),
            m(|r| r.total_ms),
            m(|r| r.bg_pause_ms),
            m(|r| r.bg_protect_ms),
            m(|r| r.bg_copy_ms),
            m(|r| r.bg_early_mib),
            m(|r| r.bg_sync_ms),
            m(|r| r.bg_total_ms),
            m(|r| r.dd_ms),
            m(|r| r.bg_total_ms / r.dd_ms),
            m(|r| r.dd_idle_ms),
            m(|r| r.bg_total_ms / r.dd_idle_ms),
            m(|r| r.disk_mib),
        );
    }
    println!();
    println!(
        "| guest | diff at 10% dirty: dirtied MiB | diff on disk MiB | on disk / dirtied | diff pause | diff total | full snapshot total, same guest |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (mib, runs) in &all {
        let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        println!(
            "| {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.0} | {:.0} |",
            size_name(*mib),
            m(|r| r.diff_dirty_mib),
            m(|r| r.diff_stored_mib),
            m(|r| r.diff_stored_mib / r.diff_dirty_mib),
            m(|r| r.diff_pause_ms),
            m(|r| r.diff_ms),
            m(|r| r.diff_full_ms),
        );
    }
    println!();
    println!(
        "| guest | stop-copy MB/s | lazy: ready | lazy: all RAM touched | eager: ready | eager: all RAM touched |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for (mib, runs) in &all {
        let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        println!(
            "| {} | {:.0} | {:.1} | {:.0} | {:.1} | {:.0} |",
            size_name(*mib),
            m(|r| r.mb_s),
            m(|r| r.lazy_ready_ms),
            m(|r| r.lazy_touch_ms),
            m(|r| r.eager_ready_ms),
            m(|r| r.eager_touch_ms),
        );
    }
}
