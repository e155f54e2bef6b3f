//! Migration benchmark: prints tables, asserts nothing.
//!
//! For each guest size (`STASIS_BENCH_SIZES`, default 1 GiB) and each
//! dirty rate (0, 10 and 100 MB/s), one guest of the guest kit: the
//! `memory` workload over (almost) all of RAM with `mem_fill=1` (its
//! first pass fills RAM at full speed; later passes rewrite it at the
//! rate), or for 0 MB/s the `touch` workload (every page written once,
//! then idle). Once RAM is full it is migrated live over loopback on this
//! host to a second VMM:
//!
//! * stasis with a pre-shared key (authenticated, encrypted stream);
//! * stasis with `--insecure` (clear stream: the cost of the encryption);
//! * both with `--connections 2` (two connections, a thread each);
//! * stasis `--insecure --postcopy-after 1` (the destination runs the VM
//!   after one pre-copy round and pulls the rest), against QEMU with
//!   `postcopy-ram` and `migrate-start-postcopy` at once;
//! * stasis local upgrade (`unix:PATH`) of a guest whose RAM is a memory
//!   file (`--memory-backend memfd`): memory is handed over, only state
//!   is sent;
//! * stasis local upgrade of a guest with anonymous RAM: copied over the
//!   UNIX socket, live, as over TCP;
//! * QEMU 7.2 (`qemu-system-x86_64`, microvm, the same guest, clear TCP),
//!   its parameters set to match ours: `downtime-limit` 50 ms,
//!   `max-bandwidth` unlimited (its default is 32 MiB/s), auto-converge on.
//!
//! Figures: downtime (stasis: from the pause at the source until the
//! destination said the VM runs there; QEMU: its own `downtime`, from the
//! source's stop until the source completed, which leaves out the
//! destination's start), total time, bytes sent and rounds. Medians of
//! `STASIS_BENCH_RUNS` runs (default 3). QEMU is skipped (and said so)
//! when `qemu-system-x86_64` is missing.
//!
//! ```text
//! cargo bench -p stasis --bench migration
//! STASIS_BENCH_SIZES=1024,4096 STASIS_BENCH_RUNS=5 cargo bench -p stasis --bench migration
//! ```

use std::io::{BufRead, BufReader};

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::qemu::{have_qemu, qemu, Qmp};
use common::{median, run_guest, runs, setup, size_name, stasis, wait_line, Vmm};

/// One migration's figures.
#[derive(Clone, Default)]
struct Figures {
    downtime_ms: f64,
    total_ms: f64,
    bytes: f64,
    rounds: f64,
}

/// The guest's command line for `rate` MB/s of dirtying over `mib` of RAM.
fn cmdline(mib: u64, rate: u64) -> String {
    let set = mib - 16;
    if rate == 0 {
        format!("console=ttyS0 workload=touch mem_mib={set}")
    } else {
        format!(
            "console=ttyS0 workload=memory mem_fill=1 mem_mib={set} mem_rate={} report_ms=1000",
            rate * 1_000_000 / 4096
        )
    }
}

/// Waits until the guest has filled its RAM.
fn wait_full(log: &Path, rate: u64) {
    let errors = ["GUEST-ERROR", "GUEST-EXCEPTION", "MEM-BAD"];
    if rate == 0 {
        wait_line(log, "TOUCH-READY", 1, Duration::from_secs(300), &errors);
    } else {
        wait_line(log, "MEM ", 1, Duration::from_secs(300), &errors);
    }
}

/// How a stasis run is set up: flags of `stasis run`, where the receiver
/// listens, authentication flags (of both `receive` and `migrate`) and
/// flags of `migrate` only.
struct Setup<'a> {
    run: &'a [&'a str],
    listen: String,
    auth: &'a [&'a str],
    migrate: &'a [&'a str],
}

fn stasis_run(dir: &Path, kernel: &Path, mib: u64, rate: u64, setup: &Setup) -> Figures {
    let runtime = dir.join("run-src");
    let log = dir.join("src.log");
    let _ = std::fs::remove_file(&log);
    let _src = run_guest(
        &runtime,
        "mbench",
        mib,
        kernel,
        &cmdline(mib, rate),
        &log,
        setup.run,
    );
    wait_full(&log, rate);
    let mut dst = Vmm(stasis(&dir.join("run-dst"))
        .args(["receive", "--listen", &setup.listen, "--serial"])
        .arg(format!("file:{}", dir.join("dst.log").display()))
        .args(setup.auth)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn stasis receive"));
    let mut lines = BufReader::new(dst.0.stderr.take().unwrap()).lines();
    let address = lines
        .by_ref()
        .map(|l| l.unwrap())
        .find_map(|l| {
            l.strip_prefix("stasis: waiting for a migration on ")
                .map(str::to_string)
        })
        .expect("the receiver's address");
    std::thread::spawn(move || for _ in lines {});
    let out = stasis(&runtime)
        .args(["migrate", "mbench", &address, "--json"])
        .args(setup.auth)
        .args(setup.migrate)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stasis migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Figures {
        downtime_ms: r["downtime_ms"].as_f64().unwrap(),
        total_ms: r["total_ms"].as_f64().unwrap(),
        bytes: r["bytes_sent"].as_f64().unwrap(),
        rounds: r["rounds"].as_array().unwrap().len() as f64,
    }
}

/// The TSC rate stasis gave its guest (from the guest's boot line): QEMU
/// gives none, and the guest's rate limit counts TSC ticks.
fn guest_tsc_khz(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("src.log")).unwrap_or_default();
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix("tsc_khz=")?.parse().ok())
        .expect("a tsc_khz= in the stasis guest's boot line")
}

fn qemu_run(
    dir: &Path,
    kernel: &Path,
    mib: u64,
    rate: u64,
    tsc_khz: u64,
    postcopy: bool,
) -> Option<Figures> {
    let line = format!("{} tsc_khz={tsc_khz}", cmdline(mib, rate));
    let log = dir.join("qsrc.log");
    let _ = std::fs::remove_file(&log);
    let (qs, qd) = (dir.join("qsrc.qmp"), dir.join("qdst.qmp"));
    let _src = qemu(mib, kernel, &line, &log, &qs, None, &[]);
    wait_full(&log, rate);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _dst = qemu(
        mib,
        kernel,
        &line,
        &dir.join("qdst.log"),
        &qd,
        Some(port),
        &[],
    );
    let mut dq = Qmp::connect(&qd);
    let mut q = Qmp::connect(&qs);
    q.call(r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "auto-converge", "state": true}]}}"#);
    if postcopy {
        let pc = r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "postcopy-ram", "state": true}]}}"#;
        q.call(pc);
        dq.call(pc);
    }
    q.call(r#"{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 50, "max-bandwidth": 100000000000}}"#);
    q.call(&format!(
        r#"{{"execute": "migrate", "arguments": {{"uri": "tcp:127.0.0.1:{port}"}}}}"#
    ));
    if postcopy {
        // Switches once the first pass over memory is done.
        q.call(r#"{"execute": "migrate-start-postcopy"}"#);
    }
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let s = q.call(r#"{"execute": "query-migrate"}"#);
        match s["status"].as_str() {
            Some("completed") => {
                return Some(Figures {
                    downtime_ms: s["downtime"].as_f64().unwrap_or(f64::NAN),
                    total_ms: s["total-time"].as_f64().unwrap_or(f64::NAN),
                    bytes: s["ram"]["transferred"].as_f64().unwrap_or(f64::NAN),
                    rounds: s["ram"]["dirty-sync-count"].as_f64().unwrap_or(f64::NAN),
                })
            }
            Some("failed") | Some("cancelled") => {
                println!("  (QEMU migration {}: {s})", s["status"]);
                return None;
            }
            _ if Instant::now() > end => {
                println!("  (QEMU migration did not complete in 300 s)");
                return None;
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn row(name: &str, v: &[Figures]) {
    if v.is_empty() {
        println!("| {name} | – | – | – | – |");
        return;
    }
    let m = |f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
    let (lo, hi) = v.iter().fold((f64::MAX, 0f64), |(lo, hi), f| {
        (lo.min(f.downtime_ms), hi.max(f.downtime_ms))
    });
    println!(
        "| {name} | {:.1} [{lo:.1}–{hi:.1}] | {:.0} | {:.0} | {:.0} |",
        m(|f| f.downtime_ms),
        m(|f| f.total_ms),
        m(|f| f.bytes) / (1 << 20) as f64,
        m(|f| f.rounds),
    );
}

fn main() {
    let Some((work, kernel)) = setup("migration") else {
        return;
    };
    let dir: PathBuf = work.0.clone();
    let key = dir.join("key");
    std::fs::write(&key, [0x5a; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let key = key.to_str().unwrap().to_string();
    let sizes = std::env::var("STASIS_BENCH_SIZES")
        .map(|_| common::sizes())
        .unwrap_or_else(|_| vec![1024]);
    let qemu_ok = have_qemu();
    if !qemu_ok {
        println!("qemu-system-x86_64 not found: QEMU rows left empty");
    }
    for mib in sizes {
        for rate in [0u64, 10, 100] {
            let tcp = "tcp:127.0.0.1:0".to_string();
            let unix = format!("unix:{}", dir.join("up.sock").display());
            let psk_flags = ["--psk", key.as_str()];
            let setup = |run, listen: &String, auth, migrate| Setup {
                run,
                listen: listen.clone(),
                auth,
                migrate,
            };
            let two = ["--connections", "2"];
            let configs = [
                (
                    "stasis, pre-shared key (encrypted)",
                    setup(&[], &tcp, &psk_flags[..], &[][..]),
                ),
                (
                    "stasis, `--insecure`",
                    setup(&[], &tcp, &["--insecure"], &[]),
                ),
                (
                    "stasis, pre-shared key, 2 connections",
                    setup(&[], &tcp, &psk_flags, &two),
                ),
                (
                    "stasis, `--insecure`, 2 connections",
                    setup(&[], &tcp, &["--insecure"], &two),
                ),
                (
                    "stasis, `--insecure`, post-copy after 1 round",
                    setup(&[], &tcp, &["--insecure"], &["--postcopy-after", "1"]),
                ),
                (
                    "stasis local upgrade, memfd RAM handed over",
                    setup(&["--memory-backend", "memfd"], &unix, &[], &[]),
                ),
                (
                    "stasis local upgrade, anonymous RAM copied",
                    setup(&[], &unix, &[], &[]),
                ),
            ];
            let mut figures = vec![Vec::new(); configs.len()];
            let (mut q, mut qpost) = (Vec::new(), Vec::new());
            for _ in 0..runs() {
                for (i, (_, c)) in configs.iter().enumerate() {
                    figures[i].push(stasis_run(&dir, &kernel, mib, rate, c));
                }
                if qemu_ok {
                    let khz = guest_tsc_khz(&dir);
                    if let Some(f) = qemu_run(&dir, &kernel, mib, rate, khz, false) {
                        q.push(f);
                    }
                    if let Some(f) = qemu_run(&dir, &kernel, mib, rate, khz, true) {
                        qpost.push(f);
                    }
                }
            }
            println!(
                "\n{} guest dirtying {rate} MB/s, live migration over loopback (local upgrades over a UNIX socket), median of {}:\n",
                size_name(mib),
                runs()
            );
            println!("| | downtime ms [min–max] | total ms | MiB sent | rounds |");
            println!("|---|---|---|---|---|");
            for ((name, _), f) in configs.iter().zip(&figures) {
                row(name, f);
            }
            row("QEMU 7.2", &q);
            row("QEMU 7.2, post-copy at once", &qpost);
            let psk = &figures[0];
            if !psk.is_empty() && !q.is_empty() {
                let r = |f: fn(&Figures) -> f64, v: &[Figures]| median(v.iter().map(f).collect());
                println!(
                    "\nratio stasis (encrypted) / QEMU: downtime {:.2}, total {:.2}",
                    r(|f| f.downtime_ms, psk) / r(|f| f.downtime_ms, &q),
                    r(|f| f.total_ms, psk) / r(|f| f.total_ms, &q)
                );
            }
        }
    }
}
