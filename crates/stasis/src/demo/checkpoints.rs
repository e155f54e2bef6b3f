//! The demo's last act: checkpoints that include a disk. A VM with a qcow2
//! disk runs the guest kit's `disk` workload (every block stamped with
//! its pass number, each previous stamp checked before it is rewritten);
//! checkpoints A and B each keep the disk as a qcow2 internal snapshot;
//! the VM is stopped and started again from A, and the guest finds every
//! block as it was at A although the disk moved on twice since.

use std::path::Path;
use std::time::{Duration, Instant};

use stasis_config::{DiskConfig, SerialConfig, VmConfig};
use stasis_vmm::persist::checkpoint::{self, CheckpointSpec};
use stasis_vmm::persist::restore::RestoreOverrides;
use stasis_vmm::{Vm, VmControl};

use super::Tail;
use crate::signals::SignalTarget;

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Waits for `n` new `DISK` lines; returns them. A `DISK-BAD` line (a
/// block that is not as the guest left it) fails the demo.
fn disk_lines(tail: &mut Tail, n: usize) -> Result<Vec<String>, String> {
    let end = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < n {
        for l in tail.lines() {
            if l.starts_with("DISK-BAD") || l.starts_with("GUEST-ERROR") {
                return Err(format!("the guest found its disk wrong: {l}"));
            }
            if l.starts_with("DISK ") {
                out.push(l);
            }
        }
        if Instant::now() > end {
            return Err("the disk guest stopped reporting".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(out)
}

fn take(control: &VmControl, store: &Path, name: &str) -> Result<f64, String> {
    let spec = CheckpointSpec {
        name: name.to_string(),
        external: false,
    };
    let r = checkpoint::take(control, store, &spec, None)?;
    Ok(r.snapshot.pause_ms)
}

/// Runs the checkpoint act in `dir`.
pub fn demo(dir: &Path, kernel: &Path, signals: &SignalTarget) -> Result<(), String> {
    let image = dir.join("ckpt-disk.qcow2");
    stasis_disk::qcow2::create(&image, 16 << 20).map_err(|e| e.to_string())?;
    let serial = dir.join("serial-ckpt.log");
    std::fs::File::create(&serial).map_err(|e| e.to_string())?;
    let store = dir.join("ckpt-store");
    let mut cfg = VmConfig::new(
        format!("demo-ckpt-{}", std::process::id()),
        kernel.to_path_buf(),
    );
    cfg.memory_mib = 64;
    cfg.cmdline = "console=ttyS0 workload=disk disk_blocks=1024 disk_pass_ms=100".into();
    cfg.serial = SerialConfig::File {
        path: serial.clone(),
    };
    cfg.disk.push(DiskConfig {
        id: "d0".into(),
        path: image.clone(),
        readonly: false,
        format: None,
    });
    cfg.validate().map_err(|e| e.to_string())?;
    let mut vm = Vm::create(&cfg).map_err(|e| e.to_string())?;
    let control = vm.control();
    signals.set(control.exit_sink());
    vm.start().map_err(|e| e.to_string())?;
    let mut tail = Tail::open(&serial).map_err(|e| e.to_string())?;
    disk_lines(&mut tail, 2)?;
    let pause_a = take(&control, &store, "A")?;
    let at_a = disk_lines(&mut tail, 2)?;
    let pause_b = take(&control, &store, "B")?;
    let after_b = disk_lines(&mut tail, 2)?;
    control.request_stop();
    vm.wait();
    control.close_disks();
    let pass_a = field(&at_a[0], "pass").unwrap_or(0);
    let pass_end = field(after_b.last().expect("two lines"), "pass").unwrap_or(0);
    let snaps = stasis_disk::qcow2::list_snapshots(&image).map_err(|e| e.to_string())?;
    println!(
        "stasis demo: checkpoints A and B of a VM with a qcow2 disk (guest paused {pause_a:.1} and {pause_b:.1} ms): the image holds internal snapshots {} (as `qemu-img snapshot -l` lists them); the guest stamped its {} blocks up to pass {pass_end}, then stopped",
        snaps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" and "),
        field(&at_a[0], "written").unwrap_or(0),
    );

    // Back to A: the disk as it was at A, then the VM state of A.
    let t = Instant::now();
    let prepared = checkpoint::revert::prepare_disks(&store, "A")?;
    let overrides = RestoreOverrides {
        disk_paths: prepared.disk_paths,
        disk_formats: prepared.disk_formats,
        checkpoint_disks: true,
        // The demo's own log, which it created: given again, as a user
        // rolling back would (a destination saved in a snapshot is only
        // used as it is where stasis created the file).
        serial: Some(cfg.serial.clone()),
        ..Default::default()
    };
    let (vm, _) = super::start_restored(&store.join("A"), &overrides, signals)?;
    let control = vm.control();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let lines = disk_lines(&mut tail, 2)?;
    control.request_stop();
    vm.wait();
    control.close_disks();
    let resumed = field(&lines[0], "pass").unwrap_or(0);
    let bad: u64 = lines.iter().filter_map(|l| field(l, "bad")).sum();
    if bad != 0 || resumed > pass_end {
        return Err(format!(
            "the VM restored from checkpoint A did not find its disk as it was: {lines:?}"
        ));
    }
    println!(
        "stasis demo: rolled back to checkpoint A in {ms:.1} ms: the guest went on at pass {resumed} (A was taken during pass {}) and found every block as it was then, {bad} bad; B is still there to roll forward to",
        pass_a.max(1)
    );
    Ok(())
}
