//! Writes a snapshot of a synthetic guest RAM region with half of its
//! pages zero, then verifies and reads it back, printing throughputs.
//!
//! ```text
//! cargo run --release -p stasis-snapshot --example write_bench -- [DIR] [MIB] [ROUNDS]
//! ```
//!
//! DIR defaults to a directory under the system temp dir (it is deleted
//! afterwards), MIB to 1024, ROUNDS to 3. `STASIS_BENCH_THREADS` sets the
//! writer's thread count. Two patterns are measured: zero pages scattered
//! at random (runs of about two pages) and clustered in runs of 64 pages.
//! Figures are with a warm page cache; the commit includes fsync to disk.

use std::path::PathBuf;
use std::time::Instant;

use stasis_snapshot::{ManifestInput, MemoryRegionSource, SnapshotReader, SnapshotWriter};

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Fills `mem` so that about half of its pages are non-zero random data.
fn fill(mem: &mut [u8], run_pages: usize, seed: u64) {
    let mut rng = seed;
    for (i, run) in mem.chunks_mut(4096 * run_pages).enumerate() {
        let mut pick = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        if xorshift(&mut pick) & 1 == 0 {
            run.fill(0);
            continue;
        }
        for w in run.chunks_exact_mut(8) {
            w.copy_from_slice(&xorshift(&mut rng).to_ne_bytes());
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = args.next().map(PathBuf::from).unwrap_or_else(|| {
        std::env::temp_dir().join(format!("stasis-bench-{}", std::process::id()))
    });
    let mib: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    std::fs::create_dir_all(&base)?;
    let size = mib << 20;
    let mut mem = vec![0u8; size];
    for (label, run_pages) in [
        ("scattered (runs of ~1 page)", 1),
        ("clustered (runs of 64 pages)", 64),
    ] {
        fill(&mut mem, run_pages, 0x1234_5678_9abc_def1);
        for round in 1..=rounds {
            println!("round {round}:");
            // Start each round with no dirty pages from the previous one.
            std::process::Command::new("sync").status()?;
            let dir = base.join(format!("snap-{run_pages}"));
            let mut w = SnapshotWriter::create(&dir)?;
            if let Some(t) = std::env::var("STASIS_BENCH_THREADS")
                .ok()
                .and_then(|t| t.parse().ok())
            {
                w.set_threads(t);
            }
            let regions = [MemoryRegionSource::new("ram0", 0, &mem)];
            let ws = w.write_memory(&regions)?;
            let cs = w.commit(ManifestInput::default())?;
            println!(
                "{label}: {mib} MiB guest, {} of {} pages non-zero",
                ws.nonzero_pages,
                ws.nonzero_pages + ws.zero_pages
            );
            println!(
            "  write_memory: {:.3} s, {:.0} MB/s of guest memory ({} threads, {:.0} MB written)",
            ws.elapsed.as_secs_f64(),
            ws.mb_per_s(),
            ws.threads,
            ws.bytes_written as f64 / 1e6
        );
            println!(
                "  commit (fsync + manifest + rename): {:.3} s (fsync {:.3} s)",
                cs.elapsed.as_secs_f64(),
                cs.sync_time.as_secs_f64()
            );
            let t = Instant::now();
            let r = SnapshotReader::open(&dir)?;
            let open = t.elapsed();
            let report = r.verify(|_, _| {})?.into_result()?;
            println!(
                "  open: {:.1} ms; verify: {:.3} s, {:.0} MB/s ({:.0} MB read)",
                open.as_secs_f64() * 1e3,
                report.elapsed.as_secs_f64(),
                report.mb_per_s(),
                report.bytes_read as f64 / 1e6
            );
            let mut dst = vec![0u8; size];
            let t = Instant::now();
            let read = r.read_region_into(&r.regions()[0], &mut dst, true)?;
            let el = t.elapsed().as_secs_f64();
            println!(
            "  read_region_into (dst zeroed): {el:.3} s, {:.0} MB/s of guest memory ({:.0} MB read)",
            size as f64 / 1e6 / el,
            read as f64 / 1e6
        );
            assert!(dst == mem, "read back differs");
            let t = Instant::now();
            r.read_region_into(&r.regions()[0], &mut dst, false)?;
            let el = t.elapsed().as_secs_f64();
            println!(
            "  read_region_into (dst already faulted in, holes zero-filled): {el:.3} s, {:.0} MB/s",
            size as f64 / 1e6 / el
        );
            assert!(dst == mem, "read back differs");
            println!(
                "  on disk: {:.0} MB allocated for a {:.0} MB file",
                r.memory_allocated_bytes()? as f64 / 1e6,
                r.body().memory.file_size as f64 / 1e6
            );
            std::fs::remove_dir_all(&dir)?;
        }
    }
    let _ = std::fs::remove_dir(&base);
    Ok(())
}
