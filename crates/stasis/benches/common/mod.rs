//! Pieces shared by the benchmarks.
#![allow(dead_code)] // each benchmark uses some of these

pub mod qemu;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch directory, removed when dropped.
pub struct Dir(pub PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The start of a benchmark's `main`: `None` (after saying how to run it)
/// unless `cargo bench` asked for it (`cargo test --benches` runs benches
/// too); otherwise a scratch directory `stasis-<tag>-<pid>` and the guest
/// kit's kernel written into it.
pub fn setup(tag: &str) -> Option<(Dir, PathBuf)> {
    if !std::env::args().any(|a| a == "--bench") {
        println!("{tag} benchmark: run with `cargo bench -p stasis --bench {tag}`");
        return None;
    }
    let work = Dir(std::env::temp_dir().join(format!("stasis-{tag}-bench-{}", std::process::id())));
    std::fs::create_dir_all(&work.0).unwrap();
    let kernel = stasis_guestkit::write_guest(&work.0).unwrap();
    Some((work, kernel))
}

/// `stasis` (the binary under benchmark) with its runtime directory.
pub fn stasis(runtime: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stasis"));
    // The benchmarks keep their files in the temporary directory.
    c.env("STASIS_STATE_DIR", std::env::temp_dir());
    c.env("STASIS_RUNTIME_DIR", runtime);
    c
}

/// `STASIS_BENCH_SIZES` (MiB, comma separated), default 256, 1024, 4096.
pub fn sizes() -> Vec<u64> {
    std::env::var("STASIS_BENCH_SIZES")
        .unwrap_or_else(|_| "256,1024,4096".into())
        .split(',')
        .map(|s| s.trim().parse().expect("STASIS_BENCH_SIZES: MiB list"))
        .collect()
}

/// A guest size for a table: `256 MiB`, `4 GiB`.
pub fn size_name(mib: u64) -> String {
    if mib >= 1024 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// Waits for the `n`-th complete line starting with `tag` in the serial
/// log `log` and returns it; panics on any of `errors` in the log, or after
/// `timeout`.
pub fn wait_line(
    log: &Path,
    tag: &str,
    n: usize,
    timeout: std::time::Duration,
    errors: &[&str],
) -> String {
    let end = std::time::Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(l) = complete.lines().filter(|l| l.starts_with(tag)).nth(n - 1) {
            return l.to_string();
        }
        if let Some(e) = errors.iter().find(|e| text.contains(*e)) {
            panic!("guest reported {e}:\n{text}");
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {n} {tag:?} lines in {}",
            log.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Spawns `stasis restore SNAP ARGS --name NAME --serial file:LOG` and
/// waits until it says the VM runs; returns the VMM and the time from the
/// spawn to that line. Its standard error is drained from then on.
pub fn spawn_restore(
    runtime: &Path,
    snap: &Path,
    args: &[&str],
    name: &str,
    log: &Path,
) -> (Vmm, std::time::Duration) {
    use std::io::{BufRead, BufReader};
    let t0 = std::time::Instant::now();
    let mut child = Vmm(stasis(runtime)
        .arg("restore")
        .arg(snap)
        .args(args)
        .args(["--name", name])
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn stasis restore"));
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let running = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains(" running: "))
        .map(|_| t0.elapsed())
        .unwrap_or_else(|| panic!("stasis restore {args:?} did not start"));
    std::thread::spawn(move || for _ in lines {});
    (child, running)
}

/// Spawns `stasis run --name NAME --memory MIB --kernel KERNEL --cmdline
/// CMDLINE --serial file:LOG EXTRA` (output discarded) for a benchmark.
pub fn run_guest(
    runtime: &Path,
    name: &str,
    mib: u64,
    kernel: &Path,
    cmdline: &str,
    log: &Path,
    extra: &[&str],
) -> Vmm {
    Vmm(stasis(runtime)
        .args(["run", "--name", name, "--memory", &format!("{mib}M")])
        .arg("--kernel")
        .arg(kernel)
        .args(["--cmdline", cmdline])
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn stasis run"))
}

/// A child VMM that is killed when dropped, also when the benchmark panics.
pub struct Vmm(pub std::process::Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The median of `v` (the upper one for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// `STASIS_BENCH_RUNS`, default 3.
pub fn runs() -> usize {
    std::env::var("STASIS_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}
