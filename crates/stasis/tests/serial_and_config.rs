//! Serial output to a UNIX socket (with input back to the guest's UART) and
//! VMs described by a TOML config file.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn serial_socket_replays_recent_output_and_streams_new_lines() {
    require_kvm();
    let s = Scratch::new("ser-sock");
    let kernel = guest(s.path());
    let sock = s.join("console.sock");
    let runtime = s.join("run");
    let mut child = stasis_cmd()
        .env("STASIS_RUNTIME_DIR", &runtime)
        .args(["run", "--name", "sersock", "--memory", "32M"])
        .arg("--kernel")
        .arg(&kernel)
        .args(["--cmdline", "console=ttyS0 workload=heartbeat hb_ms=50"])
        .arg("--serial")
        .arg(format!("socket:{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < end, "serial socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Connect late: the boot line printed before we connected is replayed.
    std::thread::sleep(Duration::from_millis(500));
    let stream = UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut lines = BufReader::new(stream.try_clone().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("STASIS-GUEST boot"), "{first}");
    let mut hb = 0;
    for l in lines.by_ref() {
        if l.unwrap().starts_with("HB ") {
            hb += 1;
            if hb == 3 {
                break;
            }
        }
    }
    // Typing into the socket reaches the UART: this guest never reads its
    // receive FIFO, so the bytes wait there, and a snapshot shows them.
    (&stream).write_all(b"hello\n").unwrap();
    let l = lines
        .find(|l| l.as_ref().unwrap().starts_with("HB "))
        .unwrap()
        .unwrap();
    assert!(l.starts_with("HB "));
    let snap = s.join("snap");
    let out = stasis_cmd()
        .env("STASIS_RUNTIME_DIR", &runtime)
        .args(["snapshot", "sersock", snap.to_str().unwrap(), "--stop"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", err_text(&out));
    let reader = stasis_snapshot::SnapshotReader::open(&snap).unwrap();
    let (_, uart) = reader
        .read_section::<stasis_vmm::devices::serial::SerialDeviceState>("com1")
        .unwrap()
        .expect("serial section");
    assert_eq!(uart.rx_fifo, b"hello\n");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_vm_runs_from_a_toml_config_file() {
    require_kvm();
    let s = Scratch::new("cfg-file");
    let kernel = guest(s.path());
    let serial = s.join("serial.log");
    let cfg = s.join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"fromfile\"\nvcpus = 2\nmemory = \"48M\"\nkernel = \"{}\"\n\
             cmdline = \"console=ttyS0 workload=heartbeat hb_ms=50 smp=1\"\nboot = \"linux\"\n\
             [serial]\nmode = \"file\"\npath = \"{}\"\n",
            kernel.display(),
            serial.display()
        ),
    )
    .unwrap();
    let runtime = s.join("run");
    let mut child = stasis_cmd()
        .env("STASIS_RUNTIME_DIR", &runtime)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        // Complete lines only: the guest may be half way through one.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let boot = complete
            .lines()
            .find(|l| l.starts_with("STASIS-GUEST boot"));
        let cpus: std::collections::BTreeSet<u64> = complete
            .lines()
            .filter(|l| l.starts_with("HB "))
            .map(|l| num(l, "cpu"))
            .collect();
        if let (Some(b), 2) = (boot, cpus.len()) {
            assert_eq!(fields(b)["proto"], "linux64", "{b}");
            assert_eq!(num(b, "cpus"), 2);
            break;
        }
        assert!(
            Instant::now() < end,
            "config-file VM did not run as configured:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // It is found under the name from the file.
    let out = stasis(&["status", "fromfile", "--json"], &runtime);
    assert!(out.status.success(), "{}", err_text(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_mib"], 48);
    let _ = child.kill();
    let _ = child.wait();
}
