//! Restore benchmark: prints tables, asserts nothing.
//!
//! For each guest size, boots the guest kit's `touch` workload over (almost)
//! all of RAM: it writes every page once, then waits for a restore. A
//! background snapshot is taken and the VM stopped; the snapshot is then in
//! the page cache. Each restore mode is measured from `stasis restore`
//! being spawned:
//!
//! * spawn → running: until stasis says the VM runs (vCPUs starting);
//! * then read all / then write all: measured by the guest with its TSC
//!   (one word of every page read, then written);
//! * running + resident: the sum (the guest has had every page read and
//!   written);
//!
//! with a floor measured in the same run: the image's page-cache read
//! (2 MiB `pread`s into one buffer) plus populating as much fresh
//! huge-page memory (`MADV_POPULATE_WRITE`). Before each restore the
//! image is read into the page cache and free memory is warmed (see
//! `populate`). A second guest touches 10% of its RAM (the
//! last 10%, which an address-order fill reaches last) before anything
//! else: the time until that 10% has been read, with and without a
//! recorded working set. Every mode checks checksums as it does by
//! default (lazy and eager: the whole image first; background: each
//! chunk as it is read); `lazy, --no-verify` is the old default's figure.
//! Medians of `STASIS_BENCH_RUNS` runs (default 3); the order of the modes
//! rotates between runs.
//!
//! ```text
//! cargo bench -p stasis --bench restore                 # 256 MiB, 1 GiB, 4 GiB
//! STASIS_BENCH_SIZES=1024 STASIS_BENCH_RUNS=5 cargo bench -p stasis --bench restore
//! STASIS_BENCH_PARTS=hot cargo bench -p stasis --bench restore   # only the working-set table
//! ```

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{
    median, run_guest, runs, setup, size_name, sizes, spawn_restore, stasis, wait_line, Vmm,
};

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

/// One restore's figures, in ms.
#[derive(Clone, Copy, Default)]
struct Figures {
    running: f64,
    hot: f64,
    read: f64,
    write: f64,
}

/// Boots the touch guest, snapshots it in the background, stops it.
fn prepare(mib: u64, hot_mib: u64, kernel: &Path, work: &Path, snap: &Path) {
    let runtime = work.join("run");
    let log = work.join("boot.log");
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir_all(snap);
    let cmdline = format!(
        "console=ttyS0 workload=touch mem_mib={} touch_hot_mib={hot_mib}",
        mib - 8
    );
    let _vm = run_guest(&runtime, "bench", mib, kernel, &cmdline, &log, &[]);
    wait_line(
        &log,
        "TOUCH-READY",
        1,
        Duration::from_secs(900),
        &["GUEST-ERROR"],
    );
    let out = stasis(&runtime)
        .args(["snapshot", "bench", snap.to_str().unwrap(), "--stop"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Maps `mib` MiB of fresh anonymous huge-page memory, has the kernel
/// populate (zero) it, twice, and unmaps it; returns the ms of the second
/// pass: the floor for making that much private memory resident. As a
/// side effect, the host's free memory is warm for what runs next: on this
/// kind of host (a VM whose balloon reports free pages to its hypervisor)
/// memory freed a while ago costs several µs per 4 KiB page on first
/// touch, for every restore mode alike.
fn populate(mib: u64) -> f64 {
    let len = (mib as usize) << 20;
    let mut ms = 0.0;
    for _ in 0..2 {
        // SAFETY: a fresh private anonymous mapping, unmapped below;
        // nothing else refers to it.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            libc::madvise(p, len, libc::MADV_HUGEPAGE);
            let t = Instant::now();
            assert_eq!(libc::madvise(p, len, libc::MADV_POPULATE_WRITE), 0);
            ms = t.elapsed().as_secs_f64() * 1e3;
            libc::munmap(p, len);
        }
    }
    ms
}

/// Restores `snap` with `args` and returns the figures of the guest's
/// first TOUCH line. The image is read once first, so that it is in the
/// page cache (this host's memory reclaim, DAMON, evicts cold pages), and
/// free memory is warmed (see `populate`).
fn restore(snap: &Path, work: &Path, args: &[&str]) -> Figures {
    page_cache_read(snap);
    let mib = std::fs::metadata(snap.join("memory.img")).unwrap().len() >> 20;
    populate(mib);
    let runtime = work.join("run");
    let log = work.join("restore.log");
    let _ = std::fs::remove_file(&log);
    let (child, running) = spawn_restore(&runtime, snap, args, "bench-restored", &log);
    let line = wait_line(
        &log,
        "TOUCH ",
        1,
        Duration::from_secs(600),
        &["GUEST-ERROR"],
    );
    assert_eq!(field(&line, "bad"), 0.0, "guest found wrong memory: {line}");
    drop(child);
    Figures {
        running: running.as_secs_f64() * 1e3,
        hot: field(&line, "hot_us") / 1e3,
        read: field(&line, "read_us") / 1e3,
        write: field(&line, "write_us") / 1e3,
    }
}

/// Restores `snap` recording its working set and waits until it is stored.
fn record_working_set(snap: &Path, work: &Path) {
    let ws = snap.join("working-set.bin");
    let _ = std::fs::remove_file(&ws);
    let runtime = work.join("run");
    let _child = Vmm(stasis(&runtime)
        .arg("restore")
        .arg(snap)
        .args(["--record-working-set=1000", "--name", "bench-record"])
        .args(["--serial", "null"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stasis restore"));
    let end = Instant::now() + Duration::from_secs(120);
    while !ws.exists() {
        assert!(Instant::now() < end, "no working set was recorded");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The floor: the memory image read from the page cache, in ms. The first
/// read brings it into the page cache, the second is timed.
fn page_cache_read(snap: &Path) -> f64 {
    let f = std::fs::File::open(snap.join("memory.img")).unwrap();
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; 2 << 20];
    let mut ms = 0.0;
    for _ in 0..2 {
        let t = Instant::now();
        let mut at = 0;
        while at < len {
            let n = f.read_at(&mut buf, at).unwrap();
            assert!(n > 0);
            at += n as u64;
        }
        ms = t.elapsed().as_secs_f64() * 1e3;
    }
    ms
}

const MODES: [(&str, &[&str]); 5] = [
    ("lazy", &["--mode", "lazy"]),
    ("lazy, --no-verify", &["--mode", "lazy", "--no-verify"]),
    ("eager", &["--mode", "eager"]),
    (
        "background",
        &["--mode", "background", "--ignore-working-set"],
    ),
    (
        "background, --no-verify",
        &[
            "--mode",
            "background",
            "--no-verify",
            "--ignore-working-set",
        ],
    ),
];

const HOT_MODES: [(&str, &[&str]); 4] = [
    ("eager", &["--mode", "eager"]),
    ("lazy", &["--mode", "lazy"]),
    (
        "background, address order",
        &["--mode", "background", "--ignore-working-set"],
    ),
    ("background, working set first", &["--mode", "background"]),
];

fn main() {
    let Some((work, kernel)) = setup("restore") else {
        return;
    };
    let sizes = sizes();
    let runs = runs();
    let parts = std::env::var("STASIS_BENCH_PARTS").unwrap_or_else(|_| "modes,hot".into());
    let snap = work.0.join("snap");
    println!("stasis restore benchmark: medians of {runs} run(s); ms; snapshot in the page cache");
    for &mib in &sizes {
        let mut floor = Vec::new();
        let mut zero = Vec::new();
        let mut all: Vec<Vec<Figures>> = vec![Vec::new(); MODES.len()];
        let mut hot: Vec<Vec<Figures>> = vec![Vec::new(); HOT_MODES.len()];
        for run in 0..runs {
            prepare(mib, 0, &kernel, &work.0, &snap);
            floor.push(page_cache_read(&snap));
            zero.push(populate(mib));
            for k in 0..MODES.len() {
                if !parts.contains("modes") {
                    break;
                }
                let i = (k + run) % MODES.len();
                all[i].push(restore(&snap, &work.0, MODES[i].1));
            }
            if !parts.contains("hot") {
                continue;
            }
            // The working-set guest: record once (for the first second
            // after the restore), then measure.
            prepare(mib, (mib / 10).max(2), &kernel, &work.0, &snap);
            record_working_set(&snap, &work.0);
            for k in 0..HOT_MODES.len() {
                let i = (k + run) % HOT_MODES.len();
                hot[i].push(restore(&snap, &work.0, HOT_MODES[i].1));
            }
        }
        let read = median(floor);
        let zero = median(zero);
        let floor = read + zero;
        println!();
        println!(
            "### {} (floor {floor:.0} ms: page-cache read of the image {read:.0} ms + populating as much fresh memory {zero:.0} ms)",
            size_name(mib)
        );
        println!();
        println!("| mode | spawn → running | then read all | then write all | running + resident | resident / floor |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (i, (label, _)) in MODES.iter().enumerate() {
            if all[i].is_empty() {
                continue;
            }
            let m = |f: fn(&Figures) -> f64| median(all[i].iter().map(f).collect());
            let total = m(|f| f.running + f.read + f.write);
            println!(
                "| {label} | {:.1} | {:.0} | {:.0} | {total:.0} | {:.2} |",
                m(|f| f.running),
                m(|f| f.read),
                m(|f| f.write),
                total / floor,
            );
        }
        println!();
        println!("| guest reads 10% of RAM first ({} MiB) | spawn → running | then that 10% read | running + 10% resident |", (mib / 10).max(2));
        println!("|---|---:|---:|---:|");
        for (i, (label, _)) in HOT_MODES.iter().enumerate() {
            if hot[i].is_empty() {
                continue;
            }
            let m = |f: fn(&Figures) -> f64| median(hot[i].iter().map(f).collect());
            println!(
                "| {label} | {:.1} | {:.1} | {:.1} |",
                m(|f| f.running),
                m(|f| f.hot),
                m(|f| f.running + f.hot),
            );
        }
    }
}
