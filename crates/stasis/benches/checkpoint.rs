//! Checkpoint benchmark: prints tables, asserts nothing.
//!
//! A 1 GiB guest (the guest kit's memory workload rewriting ~1000 MiB as
//! fast as it can) with a 4 GiB disk holding 1 GiB of data:
//!
//! - for each way of keeping the disk (qcow2 internal snapshot, external
//!   qcow2 overlay on the qcow2 image, reflink clone of a raw image on a
//!   loop-mounted btrfs): the guest's pause, the time spent on the disk
//!   inside it, and the time until the checkpoint is durable (VM state
//!   copied in the background), of `stasis checkpoint`; then the wall time
//!   of `stasis rollback` to the first checkpoint (the same process runs
//!   the VM from it again);
//! - 4 KiB random read and write IOPS inside the guest (the `diskbench`
//!   workload, 8 requests in flight) on a fully written 256 MiB image, raw
//!   and qcow2, on the same host in the same run.
//!
//! Medians of `STASIS_BENCH_RUNS` runs (default 3). Needs root (loop
//! mount), qemu-img and qemu-io (qemu-utils), mkfs.btrfs.
//!
//! ```text
//! cargo bench -p stasis --bench checkpoint
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::qemu::{have_qemu, qemu, Qmp};
use common::{median, run_guest, runs, setup, stasis, wait_line};

const GUEST_MIB: u64 = 1024;
const DISK: &str = "4G";
const DATA: &str = "1G";

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (this benchmark needs qemu-utils and btrfs-progs)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `DIR/d0.qcow2`: a new `DISK` qcow2 image with `DATA` written to it.
fn qcow2_disk(dir: &Path) -> PathBuf {
    let d = dir.join("d0.qcow2");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", d.to_str().unwrap(), DISK],
    );
    sh(
        "qemu-io",
        &[
            "-c",
            &format!("write -P 0x5a 0 {DATA}"),
            d.to_str().unwrap(),
        ],
    );
    d
}

/// A loop-mounted btrfs, unmounted when dropped.
struct Btrfs(PathBuf);

impl Btrfs {
    fn new(work: &Path) -> Btrfs {
        let img = work.join("btrfs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(24 << 30)
            .unwrap();
        sh("mkfs.btrfs", &["-q", img.to_str().unwrap()]);
        let mnt = work.join("btrfs");
        std::fs::create_dir_all(&mnt).unwrap();
        sh(
            "mount",
            &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        Btrfs(mnt)
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[derive(Default)]
struct Kind {
    pause_ms: Vec<f64>,
    disk_ms: Vec<f64>,
    total_ms: Vec<f64>,
    rollback_ms: Vec<f64>,
}

/// Checkpoints and rollbacks of a 1 GiB guest on `disk`.
fn measure(kernel: &Path, dir: &Path, disk: &Path, external: bool, runs: usize) -> Kind {
    let runtime = dir.join("run");
    let log = dir.join("serial.log");
    let store = dir.join("store");
    let _ = std::fs::remove_file(&log);
    let name = "ckptbench";
    let cmdline = format!("console=ttyS0 workload=memory mem_mib={}", GUEST_MIB - 24);
    let _vmm = run_guest(
        &runtime,
        name,
        GUEST_MIB,
        kernel,
        &cmdline,
        &log,
        &["--disk", &format!("id=d0,path={}", disk.display())],
    );
    // Every page written once.
    wait_line(
        &log,
        "MEM ",
        1,
        Duration::from_secs(300),
        &["GUEST-ERROR", "MEM-BAD"],
    );
    let mut k = Kind::default();
    for i in 0..runs {
        let mut c = stasis(&runtime);
        c.args(["checkpoint", name, &format!("c{i}"), "--store"])
            .arg(&store)
            .arg("--json");
        if external {
            c.arg("--external");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "checkpoint: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let s = &v["snapshot"];
        k.pause_ms.push(s["pause_ms"].as_f64().unwrap());
        k.disk_ms.push(s["disk_ms"].as_f64().unwrap());
        k.total_ms.push(s["total_ms"].as_f64().unwrap());
    }
    for i in 0..runs {
        let start = Instant::now();
        let out = stasis(&runtime)
            .args(["rollback", name, &format!("c{i}"), "--store"])
            .arg(&store)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rollback: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        k.rollback_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let _ = stasis(&runtime).args(["stop", name]).output();
    k
}

/// QEMU's `savevm` (VM state into the qcow2 image, the guest stopped
/// throughout) and `loadvm` on the same guest and disk.
fn measure_qemu(kernel: &Path, dir: &Path, disk: &Path, runs: usize) -> Kind {
    let log = dir.join("qemu.log");
    let qmp = dir.join("qemu.qmp");
    let cmdline = format!("console=ttyS0 workload=memory mem_mib={}", GUEST_MIB - 24);
    let drive = format!("file={},if=none,id=d0,format=qcow2", disk.display());
    let _vmm = qemu(
        GUEST_MIB,
        kernel,
        &cmdline,
        &log,
        &qmp,
        None,
        &["-drive", &drive, "-device", "virtio-blk-device,drive=d0"],
    );
    let mut q = Qmp::connect(&qmp);
    wait_line(
        &log,
        "MEM ",
        1,
        Duration::from_secs(300),
        &["GUEST-ERROR", "MEM-BAD"],
    );
    let hmp = |q: &mut Qmp, cmd: &str| -> f64 {
        let start = Instant::now();
        let r = q.call(&format!(
            r#"{{"execute": "human-monitor-command", "arguments": {{"command-line": "{cmd}"}}}}"#
        ));
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let text = r.as_str().unwrap_or_default();
        assert!(text.trim().is_empty(), "QEMU {cmd}: {text}");
        ms
    };
    let mut k = Kind::default();
    for i in 0..runs {
        // The guest is stopped for the whole savevm: pause = total.
        let ms = hmp(&mut q, &format!("savevm c{i}"));
        k.pause_ms.push(ms);
        k.total_ms.push(ms);
    }
    for i in 0..runs {
        k.rollback_ms.push(hmp(&mut q, &format!("loadvm c{i}")));
    }
    k
}

/// IOPS of `mode` inside the guest on `image`.
fn iops(kernel: &Path, work: &Path, image: &Path, mode: &str) -> f64 {
    let log = work.join(format!("serial-{mode}.log"));
    let _ = std::fs::remove_file(&log);
    let cmdline = format!("console=ttyS0 workload=diskbench bench_mode={mode} bench_ms=2000");
    let _vmm = run_guest(
        &work.join("run-iops"),
        "ckptiops",
        64,
        kernel,
        &cmdline,
        &log,
        &["--disk", &format!("id=d0,path={}", image.display())],
    );
    let line = wait_line(
        &log,
        "DISKBENCH ",
        1,
        Duration::from_secs(120),
        &["GUEST-ERROR"],
    );
    let field = |key: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in {line}"))
    };
    assert_eq!(field("errors"), 0.0, "{line}");
    field("iops")
}

fn main() {
    let Some((work, kernel)) = setup("checkpoint") else {
        return;
    };
    let runs = runs();
    let fs = Btrfs::new(&work.0);
    let mut rows = Vec::new();
    for (label, external, raw) in [
        ("qcow2 internal snapshot", false, false),
        ("external overlay (qcow2)", true, false),
        ("reflink clone (raw, btrfs)", false, true),
    ] {
        let dir = fs.0.join(label.split_whitespace().next().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        let disk = if raw {
            let d = dir.join("d0.raw");
            std::fs::File::create(&d).unwrap().set_len(4 << 30).unwrap();
            sh(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P 0x5a 0 {DATA}"),
                    d.to_str().unwrap(),
                ],
            );
            d
        } else {
            qcow2_disk(&dir)
        };
        let k = measure(&kernel, &dir, &disk, external, runs);
        rows.push((label.to_string(), k));
        // Each kind's memory images and disks take a few GiB.
        let _ = std::fs::remove_dir_all(&dir);
    }
    if have_qemu() {
        let dir = fs.0.join("qemu");
        std::fs::create_dir_all(&dir).unwrap();
        let d = qcow2_disk(&dir);
        let k = measure_qemu(&kernel, &dir, &d, runs);
        rows.push((
            "QEMU 7.2 savevm / loadvm (internal, VM state in the image)".into(),
            k,
        ));
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("qemu-system-x86_64 not found: the QEMU row is left out");
    }
    println!("checkpoint of a {GUEST_MIB} MiB guest rewriting its memory, {DISK} disk with {DATA} of data, medians of {runs}");
    println!("| disk kept as | guest pause (ms) | of it on the disk (ms) | durable (ms) | rollback (ms) |");
    println!("|---|---:|---:|---:|---:|");
    for (label, k) in &rows {
        let disk = if k.disk_ms.is_empty() {
            "–".to_string()
        } else {
            format!("{:.2}", median(k.disk_ms.clone()))
        };
        println!(
            "| {label} | {:.1} | {disk} | {:.0} | {:.0} |",
            median(k.pause_ms.clone()),
            median(k.total_ms.clone()),
            median(k.rollback_ms.clone())
        );
    }

    // qcow2 against raw, same data, same host.
    let raw = work.0.join("iops.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    sh(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xa5 0 256M",
            raw.to_str().unwrap(),
        ],
    );
    let q = work.0.join("iops.qcow2");
    sh(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            q.to_str().unwrap(),
        ],
    );
    println!();
    println!("virtio-blk 4 KiB random I/O on a fully written 256 MiB image, 8 in flight, medians of {runs}");
    println!("| pattern | raw IOPS | qcow2 IOPS | qcow2 / raw |");
    println!("|---|---:|---:|---:|");
    for mode in ["randread4k", "randwrite4k"] {
        // Alternating, each after a `sync`: neither format pays for the
        // other's (or the setup's) dirty pages.
        let (mut r, mut c) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            sh("sync", &[]);
            r.push(iops(&kernel, &work.0, &raw, mode));
            sh("sync", &[]);
            c.push(iops(&kernel, &work.0, &q, mode));
        }
        let (r, c) = (median(r), median(c));
        println!("| {mode} | {r:.0} | {c:.0} | {:.2} |", c / r);
    }
    drop(fs);
}
