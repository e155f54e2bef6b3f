//! Migrations that fail: the destination killed during pre-copy, during
//! the state transfer and just before switchover; the link cut; a
//! refusal; a wrong key; a damaged frame; a cancel. In each the source VM
//! runs on as before (its guest keeps verifying every page) and the
//! destination is gone.

mod common;
use common::migration::*;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// A source guest on loopback (or in `netns`) that dirties memory, past
/// its first pass.
fn source(tag: &str, netns: Option<String>) -> VmProcess {
    source_sized(tag, netns, "128M", 32)
}

/// A source whose guest fills `mem_mib` MiB at once: a first round far
/// larger than any socket buffer (TCP autotuning may grow a loopback
/// connection's to tens of MiB), so a destination that stops reading in
/// round 1 surely stalls the source there, before switchover.
fn big_source(tag: &str, netns: Option<String>) -> VmProcess {
    source_sized(tag, netns, "320M", 256)
}

fn source_sized(tag: &str, netns: Option<String>, memory: &str, mem_mib: u32) -> VmProcess {
    let cmdline = format!(
        "console=ttyS0 workload=memory mem_mib={mem_mib} mem_fill=1 mem_rate=4000 report_ms=200"
    );
    let mut src = VmProcess::start(
        tag,
        VmOpts {
            memory,
            cmdline: &cmdline,
            netns,
            ..Default::default()
        },
    );
    src.wait_tagged("MEM", 1, T);
    src.wait_socket();
    src
}

/// The source still runs and its guest still verifies: two more passes
/// with no bad page, and the API says running.
fn runs_on(src: &mut VmProcess) {
    let n = src.tagged("MEM").len();
    src.wait_until("two more verified passes on the source", T, |ls| {
        ls.iter().filter(|l| l.starts_with("MEM ")).count() >= n + 2
    });
    for l in src.tagged("MEM") {
        assert_eq!(num(&l, "bad"), 0, "{l}");
    }
    assert!(!src.lines().iter().any(|l| l.starts_with("MEM-BAD")));
    let out = src.cli(&["status", &src.name, "--json"]);
    assert!(out.status.success(), "{}", err_text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
}

/// Kills the receiver once it reports reaching failpoint `point` (set to
/// hold there), and checks that the migration failed and the source runs.
fn kill_destination_at(mut src: VmProcess, tag: &str, point: &str, extra: &[&str]) {
    let fp = format!("{point}=1*hold");
    let mut dst = receiver(
        &format!("{tag}-dst"),
        None,
        "127.0.0.1",
        &["--insecure"],
        &[("STASIS_FAILPOINTS", &fp)],
    );
    let dest = dst.address.clone();
    let mut args = vec!["--insecure"];
    args.extend_from_slice(extra);
    let job = migrate_detached(&src, &dest, &args);
    wait_stderr(&mut dst.vm, &format!("STASIS-FAILPOINT {point}"), T);
    dst.vm.signal(libc::SIGKILL);
    let j = wait_job(&src, job, T);
    assert_eq!(j["state"], "failed", "{j}");
    runs_on(&mut src);
}

#[test]
fn the_destination_killed_during_pre_copy_leaves_the_source_running() {
    let src = big_source("mfpre", None);
    kill_destination_at(src, "mfpre", "migrate.memory_batch", &[]);
}

#[test]
fn the_destination_killed_during_the_state_transfer_leaves_the_source_running() {
    let src = source("mfstate", None);
    kill_destination_at(src, "mfstate", "migrate.receive_section", &[]);
}

#[test]
fn the_destination_killed_just_before_switchover_leaves_the_source_running() {
    // The source has paused, sent everything and released its disk locks;
    // it takes them back and resumes.
    let src = source("mfswitch", None);
    kill_destination_at(
        src,
        "mfswitch",
        "migrate.before_confirm",
        &["--mode", "warm"],
    );
}

#[test]
fn a_cut_link_fails_the_migration_and_the_source_runs_on() {
    let set = Setting::new("mfcut", &[]);
    let mut src = big_source("mfcut", Some(set.hosts.a.name.clone()));
    let fp = "migrate.memory_batch=1*hold";
    let mut dst = set.receiver_for(&src, &[("STASIS_FAILPOINTS", fp)]);
    let job = migrate_detached(&src, &dst.address, &["--psk", &set.key]);
    wait_stderr(&mut dst.vm, "STASIS-FAILPOINT migrate.memory_batch", T);
    set.hosts.cut();
    let j = wait_job(&src, job, T);
    assert_eq!(j["state"], "failed", "{j}");
    let e = j["error"].as_str().unwrap();
    assert!(
        e.contains("timed out") || e.contains("Resource temporarily unavailable"),
        "the stall is named: {e}"
    );
    runs_on(&mut src);
}

#[test]
fn a_wrong_key_is_refused_before_any_state_and_the_source_runs_on() {
    let scratch = Scratch::new("mfkey");
    let right = key_file(scratch.path(), "right", 1);
    let wrong = key_file(scratch.path(), "wrong", 2);
    let mut src = source("mfkey", None);
    let mut dst = receiver(
        "mfkey-dst",
        None,
        "127.0.0.1",
        &["--psk", right.to_str().unwrap()],
        &[],
    );
    let dest = dst.address.clone();
    let out = migrate(&src, &dest, &["--psk", wrong.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let e = err_text(&out);
    assert!(
        e.contains("wrong pre-shared key") && e.contains("the VM runs on here"),
        "{e}"
    );
    let st = dst.vm.wait_exit(T);
    assert_ne!(st.code(), Some(0));
    assert!(
        dst.vm.stderr().contains("wrong pre-shared key"),
        "{}",
        dst.vm.stderr()
    );
    assert!(
        !dst.vm.stderr().contains("receiving '"),
        "no VM state was read: {}",
        dst.vm.stderr()
    );
    runs_on(&mut src);
}

#[test]
fn a_receiver_needs_a_key_off_loopback_and_the_source_needs_one_too() {
    let scratch = Scratch::new("mfauth");
    let hosts = Hosts::new("mfauth", &[], &scratch);
    let out = stasis_command(Some(&hosts.b.name))
        .env("STASIS_RUNTIME_DIR", scratch.join("run"))
        .args([
            "receive",
            "--listen",
            &format!("tcp:{}:0", hosts.ip_b),
            "--insecure",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err_text(&out).contains("--insecure is allowed only on a loopback address"),
        "{}",
        err_text(&out)
    );
    let out = stasis(
        &["receive", "--listen", "tcp:127.0.0.1:0"],
        &scratch.join("run"),
    );
    assert!(
        err_text(&out).contains("a receiver needs authentication: --psk FILE"),
        "{}",
        err_text(&out)
    );
    let src = source("mfauth", None);
    let out = migrate(&src, "tcp:127.0.0.1:9", &[]);
    assert!(
        err_text(&out).contains("a migration needs authentication"),
        "{}",
        err_text(&out)
    );
    let open = scratch.join("open-key");
    std::fs::write(&open, [1u8; 32]).unwrap();
    let out = migrate(&src, "tcp:127.0.0.1:9", &["--psk", open.to_str().unwrap()]);
    assert!(
        err_text(&out).contains("can be read by others"),
        "{}",
        err_text(&out)
    );
}

#[test]
fn a_refusal_reaches_the_source_and_it_runs_on() {
    // The destination cannot open the VM's disk (its path does not exist
    // there): refused before any memory moves, the reason shown here.
    let scratch = Scratch::new("mfref");
    let img = scratch.join("d.img");
    sparse_file(&img, 4 << 20);
    let mut src = VmProcess::start(
        "mfref",
        VmOpts {
            cmdline: "console=ttyS0 workload=heartbeat",
            extra: vec!["--disk".into(), format!("id=d0,path={}", img.display())],
            ..Default::default()
        },
    );
    src.wait_tagged("HB", 3, T);
    src.wait_socket();
    let mut dst = receiver(
        "mfref-dst",
        None,
        "127.0.0.1",
        &["--insecure", "--disk-path", "d0=/nonexistent/d.img"],
        &[],
    );
    let dest = dst.address.clone();
    let out = migrate(&src, &dest, &["--insecure"]);
    assert_eq!(out.status.code(), Some(1));
    let e = err_text(&out);
    assert!(
        e.contains("the destination refused: disk 'd0': /nonexistent/d.img"),
        "{e}"
    );
    assert_ne!(dst.vm.wait_exit(T).code(), Some(0));
    let n = src.tagged("HB").len();
    src.wait_tagged("HB", n + 3, T);
}

#[test]
fn a_receiver_refuses_a_cpu_model_it_cannot_run_and_says_why() {
    // A source speaking the protocol by hand offers a CPU this stasis does
    // not know; the real receiver refuses with the reason.
    use stasis_migration::handshake::{source_hello, source_offer};
    use stasis_migration::{secure, Auth, FrameReader, FrameWriter, Role, VmDescription};
    let mut dst = receiver("mfcpu-dst", None, "127.0.0.1", &["--insecure"], &[]);
    let s = std::net::TcpStream::connect(dst.address.strip_prefix("tcp:").unwrap()).unwrap();
    let (r, w) = secure(s.try_clone().unwrap(), s, Role::Source, &Auth::None).unwrap();
    let mut w = FrameWriter::start(w).unwrap();
    let mut r = FrameReader::start(r).unwrap();
    source_hello(&mut r, &mut w, "test").unwrap();
    let kernel = guest(dst.vm.scratch.path());
    let e = source_offer(
        &mut r,
        &mut w,
        VmDescription {
            vm_config: serde_json::json!({"name": "cpuvm", "kernel": kernel, "memory": 64}),
            cpu: serde_json::json!({
                "vendor": "AuthenticAMD", "model": "", "cpuid": [],
                "guest": {"model": "x86-64-v2", "features": ["sse2", "wonderful_new_thing"]}
            }),
            memory_bytes: 64 << 20,
            connections: 1,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("this host cannot run the VM") && e.contains("wonderful_new_thing"),
        "{e}"
    );
    assert_ne!(dst.vm.wait_exit(T).code(), Some(0));
}

#[test]
fn a_damaged_frame_is_refused_and_the_source_runs_on() {
    let mut src = source("mfdmg", None);
    let mut dst = receiver("mfdmg-dst", None, "127.0.0.1", &["--insecure"], &[]);
    // A bit deep inside the first memory batches.
    let proxy = Proxy::flipping(&dst.address, 3 << 20);
    let out = migrate(&src, &proxy.address, &["--insecure"]);
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert_ne!(dst.vm.wait_exit(T).code(), Some(0));
    let e = dst.vm.stderr();
    assert!(e.contains("checksum mismatch"), "{e}");
    runs_on(&mut src);
}

#[test]
fn a_cancelled_migration_leaves_the_source_running_even_on_a_stalled_link() {
    // The destination stops reading at the first memory batch: the source
    // blocks in round 1 writing to a full connection. A cancel still ends
    // it at once (the connection is shut), not after the stall timeout.
    let mut src = big_source("mfcancel", None);
    let fp = "migrate.memory_batch=1*hold";
    let mut dst = receiver(
        "mfcancel-dst",
        None,
        "127.0.0.1",
        &["--insecure"],
        &[("STASIS_FAILPOINTS", fp)],
    );
    let dest = dst.address.clone();
    let job = migrate_detached(&src, &dest, &["--insecure"]);
    wait_stderr(&mut dst.vm, "STASIS-FAILPOINT migrate.memory_batch", T);
    let asked = std::time::Instant::now();
    let out = src.cli(&["cancel", &src.name, &job.to_string()]);
    assert!(out.status.success(), "{}", err_text(&out));
    let j = wait_job(&src, job, T);
    assert_eq!(j["state"], "cancelled", "{j}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the cancel waited for the stall timeout ({:?})",
        asked.elapsed()
    );
    dst.vm.signal(libc::SIGKILL);
    runs_on(&mut src);
}

#[test]
fn a_source_lost_in_post_copy_ends_the_destination_with_the_reason() {
    // Post-copy at once; the source stops before sending a stale page and
    // is killed: the VM, running on the destination with pages missing,
    // is lost. The destination must say so and end, not hang.
    let mut src = VmProcess::start(
        "mflost",
        VmOpts {
            memory: "256M",
            cmdline:
                "console=ttyS0 workload=memory mem_mib=128 mem_fill=1 mem_rate=25600 report_ms=200",
            env: vec![(
                "STASIS_FAILPOINTS".into(),
                "migrate.postcopy_background=1*hold".into(),
            )],
            ..Default::default()
        },
    );
    src.wait_tagged("MEM", 1, T);
    src.wait_socket();
    let mut dst = receiver("mflost-dst", None, "127.0.0.1", &["--insecure"], &[]);
    let dest = dst.address.clone();
    let out_flags = ["--insecure", "--postcopy-after", "1", "--max-downtime", "1"];
    let _job = migrate_detached(&src, &dest, &out_flags);
    wait_stderr(&mut src, "STASIS-FAILPOINT migrate.postcopy_background", T);
    src.signal(libc::SIGKILL);
    let st = dst.vm.wait_exit(T);
    assert_eq!(st.code(), Some(9), "{}", dst.vm.stderr());
    let e = dst.vm.stderr();
    assert!(
        e.contains("post-copy failed after the VM started here") && e.contains("the VM is lost"),
        "{e}"
    );
}

#[test]
fn mutual_tls_refuses_a_certificate_of_another_ca_then_carries_the_migration() {
    use common::tls::Ca;
    let set = Setting::new("mftls", &[]);
    let (ca, other) = (Ca::new("stasis test CA"), Ca::new("another CA"));
    let dir = set.scratch.path();
    let dst_flags = ca.issue(dir, "dst", &[&set.hosts.ip_b], &ca);
    let src_flags = ca.issue(dir, "src", &["hosta"], &ca);
    let stranger = other.issue(dir, "stranger", &["hosta"], &ca);
    fn strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let mut src = source("mftls", Some(set.hosts.a.name.clone()));
    let name = src.name.clone();
    let recv = |tag: &str| {
        receiver(
            tag,
            Some(&set.hosts.b.name),
            &set.hosts.ip_b,
            &strs(&dst_flags),
            &[],
        )
        .named(&name)
    };
    // A client certificate from another CA: refused before any VM state.
    let mut dst = recv("mftls-bad");
    let out = migrate(&src, &dst.address, &strs(&stranger));
    assert_eq!(out.status.code(), Some(1), "{}", err_text(&out));
    assert!(err_text(&out).contains("TLS"), "{}", err_text(&out));
    assert_ne!(dst.vm.wait_exit(T).code(), Some(0));
    let e = dst.vm.stderr();
    assert!(e.contains("TLS") && !e.contains("receiving"), "{e}");
    runs_on(&mut src);
    // The right one: the VM moves, every page verifies there.
    let mut dst = recv("mftls-ok");
    let out = migrate(&src, &dst.address, &strs(&src_flags));
    assert!(out.status.success(), "{}", err_text(&out));
    assert_eq!(src.wait_exit(T).code(), Some(0));
    dst.vm
        .wait_until("two verified passes on the destination", T, |ls| {
            ls.iter().filter(|l| l.starts_with("MEM ")).count() >= 2
        });
    for l in dst.vm.tagged("MEM") {
        assert_eq!(num(&l, "bad"), 0, "{l}");
    }
}
