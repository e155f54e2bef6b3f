//! Stopping the world at an instant: what a pause or a snapshot must never
//! tear (a port instruction half done, a host byte half delivered, a disk
//! request half done), what a panic must never leave behind (a half-alive
//! VM), and what a restored clone must be told (its new generation ID).
//!
//! Races are reached on purpose, not by luck: failpoints
//! (`STASIS_FAILPOINTS`, see crates/stasis-failpoint) hold a VMM thread
//! exactly inside the window under test.

mod common;
use common::*;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn env(spec: &str) -> Vec<(String, String)> {
    vec![("STASIS_FAILPOINTS".into(), spec.into())]
}

/// A client of a serial socket: what the guest prints.
struct SerialClient {
    stream: UnixStream,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl SerialClient {
    fn connect(path: &Path) -> Self {
        let deadline = Instant::now() + T;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("cannot connect to {}: {e}", path.display()),
            }
        };
        let raw = Arc::new(Mutex::new(Vec::new()));
        let mut reader = stream.try_clone().unwrap();
        let sink = raw.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut reader, &mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self { stream, raw }
    }

    /// Everything received so far.
    fn raw(&self) -> Vec<u8> {
        self.raw.lock().unwrap().clone()
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn tagged(&self, tag: &str) -> Vec<String> {
        tagged_lines(&self.raw(), tag)
    }

    /// Waits for `n` lines tagged `tag`.
    fn wait_tagged(&self, tag: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + T;
        loop {
            let t = self.tagged(tag);
            if t.len() >= n {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} '{tag}' lines; got {:?}",
                String::from_utf8_lossy(&self.raw())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The complete lines of `raw` tagged `tag`.
fn tagged_lines(raw: &[u8], tag: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(raw);
    let prefix = format!("{tag} ");
    let complete = &text[..text.rfind('\n').map(|i| i + 1).unwrap_or(0)];
    complete
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The bytes the guest's `serial` workload reported, in order.
fn received(c: &SerialClient) -> String {
    c.tagged("SERIAL-RX")
        .iter()
        .map(|l| fields(l)["data_hex"].clone())
        .collect()
}

#[test]
fn serial_input_sent_while_paused_arrives_after_resume_and_after_restore_with_its_interrupt() {
    let s = Scratch::new("q-serial");
    let sock = s.join("com1.sock");
    let mut vm = VmProcess::start(
        "q-serial",
        VmOpts {
            memory: "32M",
            cmdline: "console=ttyS0 workload=serial",
            serial: Some(format!("socket:{}", sock.display())),
            // The capture of a snapshot stops for a second between the
            // interrupt controllers and the serial port: input arriving
            // then is the case under test.
            env: env("capture.after_irqchip=1*sleep(1500)"),
            ..Default::default()
        },
    );
    let mut c = SerialClient::connect(&sock);
    c.wait_tagged("SERIAL-READY", 1);
    c.send(b"abc");
    c.wait_tagged("SERIAL-RX", 1);
    assert_eq!(received(&c), hex("abc"));

    // Paused: the bytes wait, untouched, and come in order after resume,
    // raising the interrupt then.
    vm.wait_socket();
    let out = vm.cli(&["pause", &vm.name]);
    assert!(out.status.success(), "{}", err_text(&out));
    c.send(b"defgh");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        received(&c),
        hex("abc"),
        "input reached the guest while paused"
    );
    let out = vm.cli(&["resume", &vm.name]);
    assert!(out.status.success(), "{}", err_text(&out));
    let rx = c.wait_tagged("SERIAL-RX", 2);
    assert_eq!(received(&c), hex("abcdefgh"));
    assert!(num(&rx[1], "irqs") > num(&rx[0], "irqs"), "{rx:?}");

    // Input that arrives in the middle of a snapshot's capture is part of
    // the snapshot, and the restored guest gets it with its interrupt.
    let snap = s.join("snap");
    let cli = {
        let (name, runtime, snap) = (vm.name.clone(), vm.runtime_dir.clone(), snap.clone());
        std::thread::spawn(move || {
            stasis(
                &["snapshot", &name, snap.to_str().unwrap(), "--stop"],
                &runtime,
            )
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.send(b"xyz");
    let out = cli.join().unwrap();
    assert!(out.status.success(), "{}", err_text(&out));
    assert_eq!(vm.wait_exit(T).code(), Some(0));
    assert_eq!(
        received(&c),
        hex("abcdefgh"),
        "input reached the guest during the snapshot"
    );

    let sock2 = s.join("com1-restored.sock");
    let serial = format!("socket:{}", sock2.display());
    let _r = restore_process("q-serial-r", &snap, &vm.runtime_dir, &["--serial", &serial]);
    let c2 = SerialClient::connect(&sock2);
    let rx = c2.wait_tagged("SERIAL-RX", 1);
    assert_eq!(fields(&rx[0])["data_hex"], hex("xyz"), "{rx:?}");
    assert!(num(&rx[0], "irqs") > 2, "{rx:?}");
}

#[test]
fn a_pause_never_leaves_a_port_read_for_the_restored_guest_to_repeat() {
    // Each vCPU loop stops for 1 ms before deciding whether to park, so a
    // pause request lands there, often right after the guest read the
    // UART's receive buffer: KVM finishes such a read (puts the byte in
    // the register) only on the next KVM_RUN. Parked there, the restored
    // guest would read again and lose the byte it had been handed.
    let fp = "vcpu.before_gate=sleep(1)";
    let s = Scratch::new("q-io");
    let sock = |k: usize| s.join(&format!("com1-{k}.sock"));
    let mut vm = VmProcess::start(
        "q-io",
        VmOpts {
            memory: "32M",
            cmdline: "console=ttyS0 workload=serial",
            serial: Some(format!("socket:{}", sock(0).display())),
            env: env(fp),
            ..Default::default()
        },
    );
    let mut client = SerialClient::connect(&sock(0));
    client.wait_tagged("SERIAL-READY", 1);
    let runtime = vm.runtime_dir.clone();
    let mut sent = Vec::new();
    let mut outputs = Vec::new();
    let mut current: Option<VmProcess> = None;
    for cycle in 0..8usize {
        let chunk: Vec<u8> = (0..150)
            .map(|i| b'a' + ((cycle * 150 + i) % 26) as u8)
            .collect();
        client.send(&chunk);
        sent.extend_from_slice(&chunk);
        // The guest drains the chunk a byte per two port reads, slowly.
        std::thread::sleep(Duration::from_millis(120));
        let dir = s.join(&format!("snap{}", cycle % 2));
        match current.as_mut() {
            Some(c) => c.suspend_to(&dir),
            None => vm.suspend_to(&dir),
        }
        outputs.push(client.raw());
        let serial = format!("socket:{}", sock(cycle + 1).display());
        let next = restore_process_with(
            None,
            "q-io-r",
            &dir,
            &runtime,
            &["--serial", &serial],
            &[("STASIS_FAILPOINTS", fp)],
        );
        client = SerialClient::connect(&sock(cycle + 1));
        current = Some(next);
    }
    // Every byte sent reaches the guest exactly once, in order, across the
    // eight seams (a line cut by a suspend is finished by the next VM).
    let deadline = Instant::now() + T;
    loop {
        let all: Vec<u8> = outputs
            .iter()
            .flatten()
            .copied()
            .chain(client.raw())
            .collect();
        let got: String = tagged_lines(&all, "SERIAL-RX")
            .iter()
            .map(|l| fields(l)["data_hex"].clone())
            .collect();
        let want = hex(std::str::from_utf8(&sent).unwrap());
        if got.len() >= want.len() || Instant::now() > deadline {
            assert_eq!(
                got, want,
                "serial input lost or repeated across suspend/restore"
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_panicking_vcpu_thread_ends_the_vm_with_a_status_and_a_message() {
    let mut vm = VmProcess::start(
        "q-panic-vcpu",
        VmOpts {
            memory: "32M",
            env: env("vcpu.exit=300*sleep(0);vcpu.exit=panic"),
            ..Default::default()
        },
    );
    let status = vm.wait_exit(T);
    assert_eq!(status.code(), Some(7), "{}", vm.stderr());
    let err = vm.stderr();
    assert!(
        err.contains(&format!(
            "stasis: VM '{}' ended: internal error: thread 'vcpu0' panicked",
            vm.name
        )),
        "{err}"
    );
    assert!(err.contains("failpoint vcpu.exit (exit status 7)"), "{err}");
    assert!(!vm.socket().exists(), "the API socket was left behind");
}

#[test]
fn a_panicking_api_handler_ends_the_vm_instead_of_leaving_it_half_alive() {
    let mut vm = VmProcess::start(
        "q-panic-api",
        VmOpts {
            memory: "32M",
            env: env("api.pause=panic"),
            ..Default::default()
        },
    );
    vm.wait_tagged("HB", 1, T);
    vm.wait_socket();
    let out = vm.cli(&["pause", &vm.name]);
    assert!(
        !out.status.success(),
        "pause answered although its handler panicked"
    );
    let status = vm.wait_exit(T);
    assert_eq!(status.code(), Some(7), "{}", vm.stderr());
    assert!(vm.stderr().contains("panicked at"), "{}", vm.stderr());
    assert!(
        vm.stderr().contains("failpoint api.pause"),
        "{}",
        vm.stderr()
    );
}

fn image(s: &Scratch, name: &str, mib: u64) -> std::path::PathBuf {
    let p = s.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

#[test]
fn fifty_snapshots_of_a_guest_driving_its_disk_all_complete_and_the_disk_verifies() {
    let s = Scratch::new("q-disk");
    let d0 = image(&s, "d0.img", 8);
    let disk = format!("id=d0,path={}", d0.display());
    let mut vm = VmProcess::start(
        "q-disk",
        VmOpts {
            cmdline: "console=ttyS0 workload=disk disk_blocks=512",
            extra: vec!["--disk".into(), disk.clone()],
            ..Default::default()
        },
    );
    vm.wait_tagged("DISK", 2, T);
    vm.wait_socket();
    let snaps = Scratch::new("q-disk-snaps");
    let mut quiesce_ms = Vec::new();
    for i in 0..50 {
        // The scratch directory is on any filesystem: full disk copies.
        let r = vm.snapshot_with(
            &snaps.join(&format!("s{}", i % 2)),
            &["--disk-mode", "copy"],
        );
        quiesce_ms.push(r["quiesce_ms"].as_f64().expect("quiesce_ms in the report"));
    }
    quiesce_ms.sort_by(f64::total_cmp);
    eprintln!(
        "quiesce of a guest driving its disk, 50 snapshots: median {:.3} ms, max {:.3} ms",
        quiesce_ms[25], quiesce_ms[49]
    );
    let before = vm.tagged("DISK").len();
    vm.wait_tagged("DISK", before + 1, T);
    let dir = snaps.join("last");
    vm.suspend_to(&dir);
    let last_pass = num(vm.tagged("DISK").last().unwrap(), "pass");
    let mut r = restore_process("q-disk-r", &dir, &vm.runtime_dir, &[]);
    let after = r.wait_tagged("DISK", 2, T);
    for l in &after {
        assert_eq!(num(l, "bad"), 0, "{l}");
        assert_eq!(num(l, "total_bad"), 0, "{l}");
    }
    assert!(num(&after[0], "pass") > last_pass, "{after:?}");
    r.signal(libc::SIGTERM);
    r.wait_exit(T);
    let mut check = VmProcess::start(
        "q-disk-check",
        VmOpts {
            cmdline: "console=ttyS0 workload=disk disk_blocks=512 disk_verify_only=1",
            extra: vec!["--disk".into(), disk],
            ..Default::default()
        },
    );
    let v = check.wait_tagged("DISK", 1, T);
    assert_eq!(num(&v[0], "bad"), 0, "{}", v[0]);
    assert_eq!(num(&v[0], "verified"), 512, "{}", v[0]);
}

#[test]
fn a_restored_clone_is_notified_of_its_new_generation_id() {
    let mut vm = VmProcess::start(
        "q-genid",
        VmOpts {
            memory: "32M",
            cmdline: "console=ttyS0 workload=heartbeat hb_ms=20",
            ..Default::default()
        },
    );
    vm.wait_tagged("HB", 5, T);
    assert!(
        vm.tagged("GENID-NOTIFY").is_empty(),
        "a booted VM was notified"
    );
    let s = Scratch::new("q-genid-snap");
    let dir = s.join("snap");
    vm.suspend_to(&dir);
    // Two clones of one snapshot: each is told, each has its own ID.
    let mut a = restore_process("q-genid-a", &dir, &vm.runtime_dir, &[]);
    let mut b = restore_process("q-genid-b", &dir, &vm.runtime_dir, &[]);
    for c in [&mut a, &mut b] {
        let n = c.wait_tagged("GENID-NOTIFY", 1, T);
        assert_eq!(num(&n[0], "count"), 1, "{n:?}");
        let g = c.wait_tagged("GENID", 1, T);
        assert_eq!(num(&g[0], "generation"), 1, "{g:?}");
    }
    let id = |c: &VmProcess| fields(&c.tagged("GENID")[0])["id_hex"].clone();
    assert_ne!(id(&a), id(&b));
}
