//! Local upgrade: `stasis migrate NAME unix:PATH` to a `stasis receive`
//! on the same host. A VM whose RAM is a memory file (`--memory-backend
//! memfd`) hands it over with its taps and pauses only for its state;
//! other RAM is copied over the socket as over TCP.

mod common;

use std::time::Duration;

use common::migration::*;
use common::*;

const T: Duration = Duration::from_secs(60);

/// A memory-workload guest of 256 MiB that filled 128 MiB.
fn memory_guest(tag: &str, backend: &str) -> VmProcess {
    let mut src = VmProcess::start(
        tag,
        VmOpts {
            memory: "256M",
            cmdline:
                "console=ttyS0 workload=memory mem_mib=128 mem_fill=1 mem_rate=4000 report_ms=200",
            extra: vec!["--memory-backend".into(), backend.into()],
            ..Default::default()
        },
    );
    src.wait_tagged("MEM", 1, T);
    src.wait_socket();
    src
}

/// Two more verified passes on `vm` after the ones it already printed,
/// and no bad page in any.
fn verifies_on(vm: &mut VmProcess) {
    let n = vm.tagged("MEM").len();
    vm.wait_until("two more verified passes", T, |ls| {
        ls.iter().filter(|l| l.starts_with("MEM ")).count() >= n + 2
    });
    for l in vm.tagged("MEM") {
        assert_eq!(num(&l, "bad"), 0, "{l}");
    }
    assert!(!vm.lines().iter().any(|l| l.starts_with("MEM-BAD")));
}

fn unix_receiver(src: &VmProcess, tag: &str, env: &[(&str, &str)]) -> Receiver {
    let path = src.scratch.join(&format!("{tag}.sock"));
    receiver(tag, None, &format!("unix:{}", path.display()), &[], env).named(&src.name)
}

#[test]
fn a_memfd_vm_is_handed_over_with_only_its_state_and_takes_its_api_socket() {
    let mut src = memory_guest("upmemfd", "memfd");
    // The same runtime directory: the new process takes the VM's control
    // socket over.
    let run = src.runtime_dir.display().to_string();
    let mut dst = unix_receiver(&src, "upmemfd-dst", &[("STASIS_RUNTIME_DIR", &run)]);
    let out = migrate(&src, &dst.address, &[]);
    if !out.status.success() {
        dst.vm
            .fail(&format!("migrate: {}\n{}", err_text(&out), src.stderr()));
    }
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["mode"], "local", "{r}");
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "only the paused round: {r}");
    assert_eq!(rounds[0]["pages"], 0, "no page copied: {r}");
    assert!(
        r["bytes_sent"].as_u64().unwrap() < 1 << 20,
        "state only, not 128 MiB of memory: {r}"
    );
    assert_eq!(src.wait_exit(T).code(), Some(0));
    let e = dst.vm.stderr();
    assert!(e.contains("memory handed over as files"), "{e}");
    verifies_on(&mut dst.vm);
    // The VM's name reaches the new process through the same socket path.
    let out = src.cli(&["status", &src.name, "--json"]);
    assert!(out.status.success(), "{}", err_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    assert!(!std::fs::read_dir(&src.runtime_dir).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".new-")));
}

#[test]
fn anonymous_ram_is_copied_over_the_unix_socket() {
    let src = memory_guest("upanon", "anonymous");
    let mut dst = unix_receiver(&src, "upanon-dst", &[]);
    // One connection only: refused before anything is sent.
    let out = migrate(&src, &dst.address, &["--connections", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(
        err_text(&out).contains("a local upgrade (unix:) uses one connection"),
        "{}",
        err_text(&out)
    );
    let out = migrate(&src, &dst.address, &[]);
    if !out.status.success() {
        dst.vm
            .fail(&format!("migrate: {}\n{}", err_text(&out), src.stderr()));
    }
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["mode"], "live", "{r}");
    assert!(
        r["rounds"][0]["pages"].as_u64().unwrap() >= 128 * 256,
        "the filled memory was copied: {r}"
    );
    verifies_on(&mut dst.vm);
}

#[test]
fn a_destination_killed_after_taking_the_memory_leaves_the_source_running() {
    let mut src = memory_guest("upkill", "memfd");
    let fp = [("STASIS_FAILPOINTS", "migrate.receive_section=1*hold")];
    let mut dst = unix_receiver(&src, "upkill-dst", &fp);
    let job = migrate_detached(&src, &dst.address, &[]);
    wait_stderr(&mut dst.vm, "STASIS-FAILPOINT migrate.receive_section", T);
    dst.vm.signal(libc::SIGKILL);
    let j = wait_job(&src, job, T);
    assert_eq!(j["state"], "failed", "{j}");
    verifies_on(&mut src);
}

#[test]
fn a_tap_is_handed_over_and_frames_flow_after() {
    let scratch = Scratch::new("uptap");
    let ns = NetNs::new("uptap", &["ut0"], &scratch);
    let src = net_guest("uptap", &ns, "ut0", "64M");
    let path = src.scratch.join("up.sock");
    let mut dst = receiver(
        "uptap-dst",
        Some(&ns.name),
        &format!("unix:{}", path.display()),
        &[],
        &[],
    )
    .named(&src.name);
    let replies_before = src.tagged("NET").last().map_or(0, |l| num(l, "replies"));
    let out = migrate(&src, &dst.address, &[]);
    if !out.status.success() {
        dst.vm
            .fail(&format!("migrate: {}\n{}", err_text(&out), src.stderr()));
    }
    let before = ns.requests_seen("ut0");
    dst.vm
        .wait_until("replies through the handed-over tap", T, |_| {
            ns.requests_seen("ut0") >= before + 5
        });
    dst.vm
        .wait_until("the guest counts replies after the hand-over", T, |ls| {
            ls.iter()
                .rev()
                .find(|l| l.starts_with("NET "))
                .is_some_and(|l| num(l, "replies") > replies_before)
        });
}

#[test]
fn a_receiver_stuck_after_taking_shared_memory_is_ended_before_the_source_resumes() {
    use std::os::unix::process::ExitStatusExt;
    // The receiver has the memory file and the state and built the VM,
    // then never confirms: after the stall timeout the source ends it
    // (both would otherwise run the guest on one memory) and resumes.
    let mut src = memory_guest("upstuck", "memfd");
    let fp = [("STASIS_FAILPOINTS", "migrate.before_confirm=1*hold")];
    let mut dst = unix_receiver(&src, "upstuck-dst", &fp);
    let job = migrate_detached(&src, &dst.address, &[]);
    wait_stderr(&mut dst.vm, "STASIS-FAILPOINT migrate.before_confirm", T);
    let j = wait_job(&src, job, T);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(dst.vm.wait_exit(T).signal(), Some(libc::SIGKILL));
    verifies_on(&mut src);
}
