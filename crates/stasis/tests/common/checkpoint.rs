//! Checkpoint steps shared by the checkpoint tests: the guest kit's
//! `disk` workload stamps every block with its pass number and checks each
//! previous stamp before rewriting it, so a VM restored from a checkpoint
//! whose disk is not as it was then prints bad blocks.

use std::path::Path;
use std::time::Duration;

use super::{err_text, num, restore_process, stasis, VmOpts, VmProcess};

/// How long a test waits for the guest.
pub const T: Duration = Duration::from_secs(90);

/// A VM whose guest stamps `img` (disk d0), with `second` as disk d1 (the
/// guest leaves it alone), and `env` for the VMM; running and answering.
pub fn disk_vm(
    tag: &str,
    img: &Path,
    second: Option<&Path>,
    env: Vec<(String, String)>,
) -> VmProcess {
    let mut extra = vec!["--disk".into(), format!("id=d0,path={}", img.display())];
    if let Some(d1) = second {
        extra.extend(["--disk".into(), format!("id=d1,path={}", d1.display())]);
    }
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            cmdline: "console=ttyS0 workload=disk disk_blocks=512",
            extra,
            env,
            ..Default::default()
        },
    );
    vm.wait_tagged("DISK", 2, T);
    vm.wait_socket();
    vm
}

/// `stasis checkpoint NAME CKPT --store STORE EXTRA --json`, then two more
/// passes of the guest; returns the answer and the last pass the guest
/// had finished before the checkpoint.
pub fn checkpoint(
    vm: &mut VmProcess,
    store: &Path,
    name: &str,
    extra: &[&str],
) -> (serde_json::Value, u64) {
    let pass = num(vm.tagged("DISK").last().unwrap(), "pass");
    let mut args = vec![
        "checkpoint",
        &vm.name,
        name,
        "--store",
        store.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = vm.cli(&args);
    if !out.status.success() {
        vm.fail(&format!("checkpoint {name}: {}", err_text(&out)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = vm.tagged("DISK").len();
    vm.wait_tagged("DISK", n + 2, T);
    (v, pass)
}

/// Restores checkpoint STORE/NAME; the guest's disk must verify as at
/// that checkpoint, and it must go on from the pass it was in then.
pub fn restore_checkpoint(
    tag: &str,
    store: &Path,
    name: &str,
    runtime: &Path,
    after_pass: u64,
) -> VmProcess {
    let mut r = restore_process(tag, &store.join(name), runtime, &["--checkpoint"]);
    let lines = r.wait_tagged("DISK", 2, T);
    for l in &lines {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
    }
    assert!(
        r.tagged("DISK-BAD").is_empty(),
        "{:?}",
        r.tagged("DISK-BAD")
    );
    let first = num(&lines[0], "pass");
    assert!(
        first > after_pass,
        "restored at pass {first}, the checkpoint was after pass {after_pass}"
    );
    r
}

/// Ends a VM with SIGTERM.
pub fn stop(mut vm: VmProcess) {
    vm.signal(libc::SIGTERM);
    vm.wait_exit(T);
}

/// The store's index, as `stasis checkpoints --store STORE --json` prints
/// it.
pub fn tree(store: &Path, runtime: &Path) -> serde_json::Value {
    let out = stasis(
        &["checkpoints", "--store", store.to_str().unwrap(), "--json"],
        runtime,
    );
    assert!(out.status.success(), "{}", err_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `stasis ARGS` against `vm`'s runtime directory; it must fail with
/// status 1 and say `what`.
pub fn refused(vm: &VmProcess, args: &[&str], what: &str) {
    let out = vm.cli(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} was not refused");
    assert!(
        err_text(&out).contains(what),
        "{args:?}: {}",
        err_text(&out)
    );
}
