//! Quiesce and timing benchmark: prints tables, asserts nothing.
//!
//! * Quiesce latency: how long a pause takes from the request until every
//!   vCPU, device I/O thread and host input is at its safe point (the
//!   `quiesce_us` the API reports), for an idle guest and for guests
//!   keeping 8 disk requests in flight (4 KiB random reads, 1 MiB
//!   sequential writes); and the same figure inside live snapshots of those
//!   guests. Targets: under 1 ms idle, under 5 ms with a busy disk.
//! * Guest timer rate before a suspend and after the restore (LAPIC timer
//!   set to 100 Hz): the rate tests only bound from above, since a loaded
//!   host makes a guest miss ticks.
//! * Control API round trip (`GET /v1/ping`, `GET /v1/vm`).
//!
//! ```text
//! cargo bench -p stasis --bench quiesce
//! STASIS_BENCH_PAUSES=100 cargo bench -p stasis --bench quiesce
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stasis_api::ApiClient;

mod common;
use common::{median, Vmm};

const STASIS: &str = env!("CARGO_BIN_EXE_stasis");

/// `stasis`, whose VMs may write state anywhere in the temporary
/// directory, where this benchmark keeps its files.
fn stasis() -> Command {
    let mut c = Command::new(STASIS);
    c.env("STASIS_STATE_DIR", std::env::temp_dir());
    c
}

/// `STASIS_BENCH_PAUSES`, default 40.
fn pauses() -> usize {
    std::env::var("STASIS_BENCH_PAUSES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

/// The `p`-th percentile of `v` (nearest rank).
fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// Complete serial lines starting with `tag `.
fn tagged(log: &Path, tag: &str) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(!text.contains("GUEST-ERROR"), "guest error:\n{text}");
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let prefix = format!("{tag} ");
    complete
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

fn wait_tagged(log: &Path, tag: &str, n: usize) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let lines = tagged(log, tag);
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < end,
            "no {n} {tag} lines in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running benchmark VM.
struct Guest {
    _vmm: Vmm,
    client: ApiClient,
    log: PathBuf,
}

fn start(work: &Path, name: &str, kernel: &Path, cmdline: &str, disk: Option<&Path>) -> Guest {
    let log = work.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&log);
    let runtime = work.join("run");
    let mut cmd = stasis();
    cmd.env("STASIS_RUNTIME_DIR", &runtime)
        .args(["run", "--name", name, "--memory", "64M"])
        .arg("--kernel")
        .arg(kernel)
        .args(["--cmdline", &format!("console=ttyS0 {cmdline}")])
        .arg("--serial")
        .arg(format!("file:{}", log.display()));
    if let Some(image) = disk {
        cmd.arg("--disk")
            .arg(format!("id=d0,path={}", image.display()));
    }
    let vmm = Vmm(cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stasis run"));
    let client = ApiClient::at(runtime.join(format!("{name}.sock")));
    let end = Instant::now() + Duration::from_secs(60);
    while client.ping().is_err() {
        assert!(Instant::now() < end, "VM {name} has no API");
        std::thread::sleep(Duration::from_millis(10));
    }
    Guest {
        _vmm: vmm,
        client,
        log,
    }
}

/// Quiesce latencies of `n` pauses, in ms, 20 ms of running between them.
fn pause_latencies(g: &Guest, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            let r = g.client.pause().expect("pause");
            g.client.resume().expect("resume");
            r.quiesce_us.expect("a pause reports quiesce_us") as f64 / 1e3
        })
        .collect()
}

/// Quiesce latencies inside `n` live snapshots, in ms.
fn snapshot_latencies(g: &Guest, work: &Path, n: usize) -> Vec<f64> {
    let dir = work.join("snap");
    (0..n)
        .map(|_| {
            // The disk is not kept (`skip`): only the quiesce inside the
            // snapshot is measured, and the image sits on any filesystem.
            let r = g
                .client
                .take_snapshot(&stasis_api::SnapshotRequest {
                    path: dir.to_str().unwrap().to_string(),
                    stop: false,
                    detach: false,
                    mode: None,
                    disk_mode: Some("skip".into()),
                    parent: None,
                })
                .expect("snapshot");
            r.quiesce_ms
        })
        .collect()
}

fn row(what: &str, v: Vec<f64>, target: &str) {
    println!(
        "| {what} | {} | {:.3} | {:.3} | {:.3} | {target} |",
        v.len(),
        median(v.clone()),
        percentile(v.clone(), 90.0),
        v.iter().cloned().fold(0.0, f64::max)
    );
}

fn quiesce_table(work: &Path, kernel: &Path, image: &Path) {
    let n = pauses();
    println!("Quiesce latency (request to every thread at its safe point), ms");
    println!("| guest | pauses | median | p90 | max | target |");
    println!("|---|---:|---:|---:|---:|---|");
    let idle = start(work, "q-idle", kernel, "workload=heartbeat", None);
    wait_tagged(&idle.log, "HB", 1);
    row("idle (heartbeat)", pause_latencies(&idle, n), "< 1 ms");
    let idle_snaps = snapshot_latencies(&idle, work, 5);
    drop(idle);
    let mut busy_snaps = Vec::new();
    for mode in ["randread4k", "seqwrite1m"] {
        let g = start(
            work,
            &format!("q-{mode}"),
            kernel,
            &format!("workload=diskbench bench_mode={mode} bench_ms=3600000"),
            Some(image),
        );
        wait_tagged(&g.log, "DISKBENCH-CONFIG", 1);
        std::thread::sleep(Duration::from_millis(300));
        row(
            &format!("disk {mode}, 8 requests in flight"),
            pause_latencies(&g, n),
            "< 5 ms",
        );
        busy_snaps.push((mode, snapshot_latencies(&g, work, 5)));
    }
    row("idle, inside a live snapshot", idle_snaps, "< 1 ms");
    for (mode, v) in busy_snaps {
        row(&format!("disk {mode}, inside a live snapshot"), v, "< 5 ms");
    }
    println!();
}

fn timer_table(work: &Path, kernel: &Path) {
    let g = start(
        work,
        "q-timer",
        kernel,
        "workload=timer timer_hz=100 report_ms=250",
        None,
    );
    let before = wait_tagged(&g.log, "TIMER", 9);
    let snap = work.join("timer-snap");
    g.client
        .snapshot(snap.to_str().unwrap(), true)
        .expect("suspend");
    drop(g);
    let log = work.join("q-timer-restored.log");
    let _restored = Vmm(stasis()
        .env("STASIS_RUNTIME_DIR", work.join("run"))
        .args(["restore", snap.to_str().unwrap(), "--name", "q-timer-r"])
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stasis restore"));
    let after = wait_tagged(&log, "TIMER", 9);
    // The first report of each run spans the start or the restore.
    let hz = |v: &[String]| median(v[1..].iter().map(|l| field(l, "hz_x100") / 100.0).collect());
    println!("Guest LAPIC timer set to 100 Hz (8 reports of 250 ms each, median)");
    println!("| | Hz | ratio to 100 Hz |");
    println!("|---|---:|---:|");
    for (what, v) in [
        ("before the suspend", &before),
        ("after the restore", &after),
    ] {
        let h = hz(v);
        println!("| {what} | {h:.1} | {:.3} |", h / 100.0);
    }
    println!();
}

fn api_table(work: &Path, kernel: &Path) {
    let g = start(work, "q-api", kernel, "workload=heartbeat", None);
    let time = |f: &dyn Fn()| {
        (0..200)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect::<Vec<f64>>()
    };
    let ping = time(&|| g.client.ping().unwrap());
    let vm = time(&|| {
        g.client.get_vm().unwrap();
    });
    println!("Control API round trip over the UNIX socket, ms (200 calls)");
    println!("| call | median | p99 |");
    println!("|---|---:|---:|");
    for (what, v) in [("GET /v1/ping", ping), ("GET /v1/vm", vm)] {
        println!(
            "| {what} | {:.3} | {:.3} |",
            median(v.clone()),
            percentile(v, 99.0)
        );
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("quiesce benchmark: run with `cargo bench -p stasis --bench quiesce`");
        return;
    }
    let work = std::env::temp_dir().join(format!("stasis-qbench-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let kernel = stasis_guestkit::write_guest(&work).unwrap();
    let image = work.join("disk.img");
    std::fs::write(&image, vec![0xa5u8; 64 << 20]).unwrap();
    quiesce_table(&work, &kernel, &image);
    timer_table(&work, &kernel);
    api_table(&work, &kernel);
    let _ = std::fs::remove_dir_all(&work);
}
