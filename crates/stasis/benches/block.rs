//! virtio-blk benchmark: prints a table, asserts nothing.
//!
//! For each access pattern (4 KiB random read/write, 1 MiB sequential
//! read/write), the guest kit's `diskbench` workload drives a virtio-blk
//! disk backed by a raw 256 MiB image for 2 s with 8 requests in flight, and
//! the same pattern is run on the same file from the host (pread/pwrite
//! through the page cache, as the device does) for reference. Median of
//! `STASIS_BENCH_RUNS` runs (default 3).
//!
//! ```text
//! cargo bench -p stasis --bench block
//! ```

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::{median, run_guest, runs};

const IMAGE_MIB: u64 = 256;
const BENCH_MS: u64 = 2000;

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// (IOPS, MB/s) measured inside the guest.
fn guest(mode: &str, kernel: &Path, image: &Path, work: &Path) -> (f64, f64) {
    let log = work.join(format!("serial-{mode}.log"));
    let _ = std::fs::remove_file(&log);
    let disk = format!("id=d0,path={}", image.display());
    let cmdline = format!("console=ttyS0 workload=diskbench bench_mode={mode} bench_ms={BENCH_MS}");
    let child = run_guest(
        &work.join("run"),
        "blkbench",
        64,
        kernel,
        &cmdline,
        &log,
        &["--disk", &disk],
    );
    let end = Instant::now() + Duration::from_secs(120);
    let line = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        // Only complete lines: the guest may be printing this one still.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(l) = complete.lines().find(|l| l.starts_with("DISKBENCH ")) {
            break l.to_string();
        }
        assert!(!text.contains("GUEST-ERROR"), "guest error:\n{text}");
        assert!(Instant::now() < end, "no DISKBENCH line:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(child);
    assert_eq!(field(&line, "errors"), 0.0, "{line}");
    (field(&line, "iops"), field(&line, "mb_s_x100") / 100.0)
}

/// (IOPS, MB/s) of the same pattern on the file from the host, one request
/// at a time (the device also executes one request at a time).
fn host(mode: &str, image: &Path) -> (f64, f64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let (size, random, write) = match mode {
        "randread4k" => (4096usize, true, false),
        "randwrite4k" => (4096, true, true),
        "seqread1m" => (1 << 20, false, false),
        _ => (1 << 20, false, true),
    };
    let mut buf = vec![0x5au8; size];
    let blocks = (IMAGE_MIB << 20) / size as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut ops, mut next) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(BENCH_MS) {
        let block = if random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            next = (next + 1) % blocks;
            next
        };
        let at = block * size as u64;
        if write {
            f.write_all_at(&buf, at).unwrap();
        } else {
            f.read_exact_at(&mut buf, at).unwrap();
        }
        ops += 1;
    }
    let s = start.elapsed().as_secs_f64();
    (ops as f64 / s, ops as f64 * size as f64 / 1e6 / s)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("block benchmark: run with `cargo bench -p stasis --bench block`");
        return;
    }
    let runs = runs();
    let work = std::env::temp_dir().join(format!("stasis-blkbench-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let kernel = stasis_guestkit::write_guest(&work).unwrap();
    // A fully written image, so that reads hit data, not holes.
    let image = work.join("disk.img");
    let chunk = vec![0xa5u8; 1 << 20];
    let f = std::fs::File::create(&image).unwrap();
    for i in 0..IMAGE_MIB {
        f.write_all_at(&chunk, i << 20).unwrap();
    }
    f.sync_all().unwrap();

    println!("virtio-blk on a raw {IMAGE_MIB} MiB image, {BENCH_MS} ms per run, medians of {runs}");
    println!("| pattern | guest IOPS | guest MB/s | host IOPS | host MB/s | guest / host |");
    println!("|---|---:|---:|---:|---:|---:|");
    for mode in ["randread4k", "randwrite4k", "seqread1m", "seqwrite1m"] {
        let g: Vec<(f64, f64)> = (0..runs)
            .map(|_| guest(mode, &kernel, &image, &work))
            .collect();
        let h: Vec<(f64, f64)> = (0..runs).map(|_| host(mode, &image)).collect();
        let (gi, gm) = (
            median(g.iter().map(|x| x.0).collect()),
            median(g.iter().map(|x| x.1).collect()),
        );
        let (hi, hm) = (
            median(h.iter().map(|x| x.0).collect()),
            median(h.iter().map(|x| x.1).collect()),
        );
        println!(
            "| {mode} | {gi:.0} | {gm:.1} | {hi:.0} | {hm:.1} | {:.2} |",
            gi / hi
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}
