//! Live and warm migration between two "hosts" on this machine: network
//! namespaces joined by a veth pair, one stasis in each, authenticated
//! with a pre-shared key. After each migration every page stamp the
//! guest wrote verifies on the destination, its progress goes on from
//! where it was, and the source has exited.

mod common;
use common::migration::*;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// Everything `vm`'s guest printed, the last line possibly incomplete.
fn serial_text(vm: &VmProcess) -> String {
    std::fs::read_to_string(&vm.serial).unwrap_or_default()
}

/// `(pass, done)` of every `MEM-PROGRESS` line of `lines`.
fn progress(lines: &[String]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter(|l| l.starts_with("MEM-PROGRESS "))
        .map(|l| (num(l, "pass"), num(l, "done")))
        .collect()
}

/// Migrates a guest that dirties `rate` pages/s of a `mem_mib` working set
/// from host A to host B; checks the report, the source's exit, and every
/// page on the destination.
fn migrate_memory_guest(
    tag: &str,
    vcpus: u32,
    rate: u64,
    mem_mib: u64,
    extra: &[&str],
) -> serde_json::Value {
    migrate_memory_guest_with(tag, vcpus, rate, mem_mib, "", &[], extra)
}

/// [`migrate_memory_guest`] with `guest_args` added to the guest's
/// command line and `env` to the source VMM's environment.
fn migrate_memory_guest_with(
    tag: &str,
    vcpus: u32,
    rate: u64,
    mem_mib: u64,
    guest_args: &str,
    env: &[(&str, &str)],
    extra: &[&str],
) -> serde_json::Value {
    let set = Setting::new(tag, &[]);
    let smp = if vcpus > 1 { " smp=1" } else { "" };
    let mut src = VmProcess::start(
        tag,
        VmOpts {
            vcpus,
            memory: "256M",
            cmdline: &format!(
                "console=ttyS0 workload=memory mem_mib={mem_mib} mem_rate={rate} report_ms=200{smp} {guest_args}"
            ),
            netns: Some(set.hosts.a.name.clone()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
    );
    // Past the first pass: every page holds a stamp the next pass checks.
    src.wait_tagged("MEM", vcpus as usize, T);
    src.wait_socket();
    let mut dst = set.receiver_for(&src, &[]);
    let report = set.migrate(&src, &dst, extra);
    let st = src.wait_exit(T);
    assert_eq!(
        st.code(),
        Some(0),
        "the source ends with 0 after a migration: {}",
        src.stderr()
    );
    assert!(src.stderr().contains("migrated to"), "{}", src.stderr());
    // The destination's guest goes on and verifies every page: two whole
    // passes after the migration (each pass checks the stamps of the one
    // before).
    // A line the guest was printing at the pause ends on the destination.
    let (before, _) = lines_across(&serial_text(&src), &serial_text(&dst.vm));
    let mem_before = before.iter().filter(|l| l.starts_with("MEM ")).count() / vcpus as usize;
    dst.vm
        .wait_until("two passes verified after the migration", T, |ls| {
            ls.iter().filter(|l| l.starts_with("MEM ")).count() >= 2 * vcpus as usize
        });
    let (_, after) = lines_across(&serial_text(&src), &serial_text(&dst.vm));
    assert!(
        !after.iter().any(|l| l.starts_with("MEM-BAD")),
        "pages lost or damaged:\n{}",
        after.join("\n")
    );
    for l in after.iter().filter(|l| l.starts_with("MEM ")) {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
        assert!(
            num(l, "verified") > 0,
            "a pass after the first verifies: {l}"
        );
        assert!(
            num(l, "pass") as usize > mem_before,
            "the destination goes on after pass {mem_before}: {l}"
        );
    }
    // No rewind: the guest's progress on the destination starts where it
    // was on the source (per CPU, in order).
    for cpu in 0..vcpus {
        let of = |ls: &[String]| {
            let own: Vec<String> = ls
                .iter()
                .filter(|l| l.starts_with("MEM-PROGRESS ") && num(l, "cpu") == cpu as u64)
                .cloned()
                .collect();
            progress(&own)
        };
        let (b, a) = (of(&before), of(&after));
        if let (Some(last), Some(first)) = (b.last(), a.first()) {
            assert!(
                first >= last,
                "cpu {cpu}: progress went back from {last:?} to {first:?}"
            );
        }
    }
    assert_eq!(report["destination"], dst.address);
    report
}

#[test]
fn live_migration_of_a_guest_dirtying_10_mb_per_s_loses_no_page() {
    let r = migrate_memory_guest("mig10", 1, 2560, 32, &[]);
    assert_eq!(r["mode"], "live");
    let rounds = r["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "pre-copy and a last round: {r}");
    assert_eq!(rounds.last().unwrap()["paused"], true);
    assert!(
        rounds[..rounds.len() - 1]
            .iter()
            .all(|x| x["paused"] == false),
        "{r}"
    );
}

#[test]
fn live_migration_of_a_guest_dirtying_100_mb_per_s_loses_no_page() {
    let r = migrate_memory_guest("mig100", 1, 25600, 128, &[]);
    assert!(r["rounds"].as_array().unwrap().len() >= 2, "{r}");
}

#[test]
fn a_zstd_compressed_migration_loses_no_page_and_sends_fewer_bytes() {
    // Pages with 16 random words and zeros after them.
    let zstd = ["--compress", "zstd"];
    let r = migrate_memory_guest_with("migzstd", 1, 2560, 32, "mem_words=16", &[], &zstd);
    let data_pages: u64 = r["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["pages"].as_u64().unwrap() - x["zero_pages"].as_u64().unwrap())
        .sum();
    // Such pages compress to well under a quarter; uncompressed they
    // would be 4 KiB each on the wire.
    let sent = r["bytes_sent"].as_u64().unwrap();
    assert!(data_pages >= 32 * 256, "{r}");
    assert!(
        sent < data_pages * 4096 / 4,
        "{sent} bytes for {data_pages} pages of data: {r}"
    );
}

#[test]
fn live_migration_of_two_vcpus_loses_no_page() {
    migrate_memory_guest("mig2cpu", 2, 2560, 32, &[]);
}

#[test]
fn warm_migration_sends_everything_once_while_paused() {
    let r = migrate_memory_guest("migwarm", 1, 2560, 32, &["--mode", "warm"]);
    assert_eq!(r["mode"], "warm");
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "{r}");
    assert_eq!(rounds[0]["paused"], true);
    assert_eq!(
        rounds[0]["pages"],
        256 * 256,
        "all 256 MiB of RAM, zero pages as entries: {r}"
    );
}

#[test]
fn an_idle_guests_heartbeat_goes_on_without_a_gap_on_two_vcpus() {
    let set = Setting::new("mighb", &[]);
    let mut src = VmProcess::start(
        "mighb",
        VmOpts {
            vcpus: 2,
            memory: "128M",
            cmdline: "console=ttyS0 workload=heartbeat smp=1 hb_ms=50",
            netns: Some(set.hosts.a.name.clone()),
            ..Default::default()
        },
    );
    src.wait_tagged("HB", 10, T);
    src.wait_socket();
    let mut dst = set.receiver_for(&src, &[]);
    set.migrate(&src, &dst, &[]);
    assert_eq!(src.wait_exit(T).code(), Some(0));
    dst.vm.wait_tagged("HB", 10, T);
    let (before, after) = lines_across(&serial_text(&src), &serial_text(&dst.vm));
    for cpu in 0..2u64 {
        let seqs = |ls: &[String]| -> Vec<u64> {
            ls.iter()
                .filter(|l| l.starts_with("HB ") && num(l, "cpu") == cpu)
                .map(|l| num(l, "seq"))
                .collect()
        };
        let (b, a) = (seqs(&before), seqs(&after));
        let (last, first) = (*b.last().expect("heartbeats before"), a[0]);
        assert_eq!(
            first,
            last + 1,
            "cpu {cpu}: the heartbeat goes on without a gap or rewind"
        );
        assert!(a.windows(2).all(|w| w[1] == w[0] + 1), "cpu {cpu}: {a:?}");
    }
}

#[test]
fn a_disk_on_a_shared_path_written_during_migration_verifies_after() {
    let set = Setting::new("migdisk", &[]);
    let img = set.scratch.join("shared.img");
    sparse_file(&img, 8 << 20);
    let mut src = VmProcess::start(
        "migdisk",
        VmOpts {
            cmdline: "console=ttyS0 workload=disk disk_blocks=512",
            extra: vec!["--disk".into(), format!("id=d0,path={}", img.display())],
            netns: Some(set.hosts.a.name.clone()),
            ..Default::default()
        },
    );
    src.wait_tagged("DISK", 2, T);
    let mut dst = set.receiver_for(&src, &[]);
    set.migrate(&src, &dst, &[]);
    assert_eq!(src.wait_exit(T).code(), Some(0));
    let last_pass = src.tagged("DISK").last().map(|l| num(l, "pass")).unwrap();
    let after = dst.vm.wait_tagged("DISK", 2, T);
    for l in &after {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
    }
    assert!(num(&after[0], "pass") > last_pass, "{after:?}");
    assert!(!dst.vm.lines().iter().any(|l| l.starts_with("DISK-BAD")));
}

#[test]
fn a_nic_carries_frames_after_migration_and_the_guest_is_announced() {
    let set = Setting::new("mignet", &["mt0"]);
    let src = net_guest("mignet", &set.hosts.a, "mt0", "64M");
    let mut dst = set.receiver_for(&src, &[]);
    // Listens on the destination's tap for the announcement of the guest's
    // MAC (a reverse-ARP broadcast) that follows the switchover.
    let watch = std::process::Command::new("ip")
        .args(["netns", "exec", &set.hosts.b.name, "python3", "-c"])
        .arg(
            "import socket,sys\n\
             s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(0x8035))\n\
             s.bind((sys.argv[1],0x8035)); s.settimeout(60)\n\
             f=s.recv(2048)\n\
             print(f[0:6].hex(),f[6:12].hex(),f[20:22].hex(),f[22:28].hex(),f[32:38].hex(),flush=True)",
        )
        .arg("mt0")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::thread::sleep(Duration::from_millis(500));
    set.migrate(&src, &dst, &[]);
    let before_b = set.hosts.b.requests_seen("mt0");
    dst.vm
        .wait_until("replies on the destination's tap", T, |_| {
            set.hosts.b.requests_seen("mt0") >= before_b + 5
        });
    let replies: Vec<u64> = dst
        .vm
        .tagged("NET")
        .iter()
        .map(|l| num(l, "replies"))
        .collect();
    assert!(replies.windows(2).all(|w| w[1] >= w[0]), "{replies:?}");
    let seen = watch.wait_with_output().unwrap();
    let seen: Vec<String> = String::from_utf8_lossy(&seen.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        seen.len(),
        5,
        "no announcement on the destination's tap: {seen:?}"
    );
    assert_eq!(seen[0], "ffffffffffff", "broadcast");
    assert_eq!(seen[2], "0003", "a reverse-ARP request");
    // From the guest's MAC (as the guest itself reports it), about it.
    let guest_mac = fields(&dst.vm.tagged("NET")[0])["mac"].replace(':', "");
    assert_eq!(seen[1], guest_mac);
    assert_eq!(seen[3], guest_mac);
    assert_eq!(seen[4], guest_mac);
}

#[test]
fn post_copy_runs_the_vm_on_the_destination_first_and_loses_no_page() {
    // A guest that dirties 100 MB/s cannot converge to a 1 ms pause: after
    // the first round the destination runs it and pulls the rest. The
    // background stream is slowed down (50 ms per 256 KiB) so that the
    // guest surely comes back to pages it wrote before the switch while
    // they are still missing: it waits for them, and they are asked for.
    let args = ["--postcopy-after", "1", "--max-downtime", "1"];
    let slow = [("STASIS_FAILPOINTS", "migrate.postcopy_background=sleep(50)")];
    let r = migrate_memory_guest_with("migpost", 1, 25600, 128, "", &slow, &args);
    assert!(r["postcopy_pages"].as_u64().unwrap() > 0, "{r}");
    assert!(r["postcopy_requests"].as_u64().unwrap() > 0, "{r}");
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "one pre-copy round, then the switch: {r}");
}

#[test]
fn memory_on_four_connections_loses_no_page() {
    let r = migrate_memory_guest("migconn", 1, 25600, 128, &["--connections", "4"]);
    let per: Vec<u64> = r["bytes_per_connection"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert_eq!(per.len(), 4, "{r}");
    // 128 MiB of written pages dealt in 2 MiB blocks: each connection
    // carries a quarter, give or take.
    for b in &per {
        assert!(*b > 16 << 20, "every connection carries memory: {per:?}");
    }
}
