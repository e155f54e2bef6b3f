//! Helpers for the migration tests: two "hosts" (network namespaces
//! joined by a veth pair), a receiving stasis, a key file, a TCP proxy.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::*;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip tool (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", err_text(&out));
}

/// Two network namespaces joined by a veth pair: host A at `10.X.Y.1`,
/// host B at `10.X.Y.2`. Each may also hold taps with responders
/// ([`NetNs`]). Removed when dropped.
pub struct Hosts {
    pub a: NetNs,
    pub b: NetNs,
    pub ip_a: String,
    pub ip_b: String,
    veth_a: String,
}

impl Hosts {
    pub fn new(tag: &str, taps: &[&str], scratch: &Scratch) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let a = NetNs::new(&format!("{tag}a"), taps, scratch);
        let b = NetNs::new(&format!("{tag}b"), taps, scratch);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let subnet = format!("10.{}.{}", 100 + (std::process::id() % 100), n % 250);
        let (va, vb) = (format!("vma{n}"), format!("vmb{n}"));
        ip(&[
            "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
            &b.name,
        ]);
        let (ip_a, ip_b) = (format!("{subnet}.1"), format!("{subnet}.2"));
        for (ns, dev, addr) in [(&a.name, &va, &ip_a), (&b.name, &vb, &ip_b)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Hosts {
            a,
            b,
            ip_a,
            ip_b,
            veth_a: va,
        }
    }

    /// Cuts the link: host A's end of the veth goes down.
    pub fn cut(&self) {
        ip(&["-n", &self.a.name, "link", "set", &self.veth_a, "down"]);
    }
}

/// The setting of most migration tests: two hosts and a key they share.
pub struct Setting {
    pub hosts: Hosts,
    pub key: String,
    pub scratch: Scratch,
}

impl Setting {
    pub fn new(tag: &str, taps: &[&str]) -> Self {
        let scratch = Scratch::new(tag);
        let hosts = Hosts::new(tag, taps, &scratch);
        let key = key_file(scratch.path(), "key", 7);
        Setting {
            key: key.to_str().unwrap().to_string(),
            hosts,
            scratch,
        }
    }

    /// A receiver on host B (with the key, and `env`) for `src`.
    pub fn receiver_for(&self, src: &VmProcess, env: &[(&str, &str)]) -> Receiver {
        let tag = format!("{}-dst", src.name.rsplit_once('-').map_or("", |p| p.0));
        receiver(
            &tag,
            Some(&self.hosts.b.name),
            &self.hosts.ip_b,
            &["--psk", &self.key],
            env,
        )
        .named(&src.name)
    }

    /// `stasis migrate` of `src` to `dst` with the key and `extra`; the
    /// report, or a panic with both sides' output.
    pub fn migrate(&self, src: &VmProcess, dst: &Receiver, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["--psk", &self.key];
        args.extend_from_slice(extra);
        let out = migrate(src, &dst.address, &args);
        if !out.status.success() {
            dst.vm.fail(&format!(
                "migrate failed: {}\n--- source stderr ---\n{}",
                err_text(&out),
                src.stderr()
            ));
        }
        serde_json::from_slice(&out.stdout).expect("the migration report")
    }
}

/// A key file readable by its owner only.
pub fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![byte; 32]).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A `stasis receive` waiting for one VM, as a [`VmProcess`] (its serial
/// file gets the guest's output once the VM arrives), and the address it
/// listens on.
pub struct Receiver {
    pub vm: VmProcess,
    pub address: String,
}

/// Starts `stasis receive --listen tcp:LISTEN:0 EXTRA` (in `netns`), or
/// `--listen LISTEN` when it is a `unix:PATH`, and waits until it says
/// where it listens.
pub fn receiver(
    tag: &str,
    netns: Option<&str>,
    listen: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Receiver {
    require_kvm();
    let scratch = Scratch::new(tag);
    let serial = scratch.join("serial.log");
    let runtime_dir = scratch.join("run");
    let stderr_path = scratch.join("stderr.log");
    let child = stasis_command(netns)
        .env("STASIS_RUNTIME_DIR", &runtime_dir)
        .envs(env.iter().copied())
        .arg("receive")
        .arg("--listen")
        .arg(match listen.starts_with("unix:") {
            true => listen.to_string(),
            false => format!("tcp:{listen}:0"),
        })
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("spawn stasis receive");
    let mut vm = VmProcess {
        name: String::new(),
        child,
        serial,
        runtime_dir,
        stderr_path,
        scratch,
    };
    let end = Instant::now() + Duration::from_secs(30);
    let address = loop {
        if let Some(a) = vm
            .stderr()
            .lines()
            .find_map(|l| l.strip_prefix("stasis: waiting for a migration on "))
        {
            break a.trim().to_string();
        }
        if let Ok(Some(st)) = vm.child.try_wait() {
            vm.fail(&format!("stasis receive exited ({st}) before listening"));
        }
        if Instant::now() > end {
            vm.fail("stasis receive did not start listening");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Receiver { vm, address }
}

impl Receiver {
    /// The VM's name once it arrived (the source's).
    pub fn named(mut self, name: &str) -> Self {
        self.vm.name = name.to_string();
        self
    }
}

/// `stasis migrate NAME DEST --json EXTRA` against `src`'s API.
pub fn migrate(src: &VmProcess, dest: &str, extra: &[&str]) -> Output {
    let mut args = vec!["migrate", &src.name, dest, "--json"];
    args.extend_from_slice(extra);
    src.cli(&args)
}

/// Starts `stasis migrate ... --detach` and returns the job id.
pub fn migrate_detached(src: &VmProcess, dest: &str, extra: &[&str]) -> u64 {
    let mut args = vec!["--detach"];
    args.extend_from_slice(extra);
    let out = migrate(src, dest, &args);
    if !out.status.success() {
        src.fail(&format!("migrate --detach: {}", err_text(&out)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v["job"].as_u64().expect("a job id")
}

/// The job's JSON (`stasis jobs NAME ID --json`).
pub fn job(src: &VmProcess, id: u64) -> serde_json::Value {
    // Exit status 1 for a job that failed or was cancelled; its JSON is
    // printed all the same.
    let out = src.cli(&["jobs", &src.name, &id.to_string(), "--json"]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("jobs --json: {e}: {}", err_text(&out)))
}

/// Waits until the job has ended; returns its JSON.
pub fn wait_job(src: &VmProcess, id: u64, timeout: Duration) -> serde_json::Value {
    let end = Instant::now() + timeout;
    loop {
        let j = job(src, id);
        if j["state"] != "running" {
            return j;
        }
        if Instant::now() > end {
            src.fail(&format!("job {id} still running after {timeout:?}: {j}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `vm`'s stderr has a line containing `what`.
pub fn wait_stderr(vm: &mut VmProcess, what: &str, timeout: Duration) {
    let end = Instant::now() + timeout;
    while !vm.stderr().contains(what) {
        if Instant::now() > end {
            vm.fail(&format!("no '{what}' on stderr within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP proxy on loopback to `target` that flips one bit of the byte at
/// `flip_at` (counted from the start of the source's stream).
pub struct Proxy {
    pub address: String,
}

impl Proxy {
    pub fn flipping(target: &str, flip_at: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("tcp:{}", listener.local_addr().unwrap());
        let target = target.strip_prefix("tcp:").unwrap().to_string();
        std::thread::spawn(move || {
            let Ok((mut client, _)) = listener.accept() else {
                return;
            };
            let mut server = TcpStream::connect(&target).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
            let mut seen = 0u64;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if (seen..seen + n as u64).contains(&flip_at) {
                    buf[(flip_at - seen) as usize] ^= 0x01;
                }
                seen += n as u64;
                if server.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = server.shutdown(std::net::Shutdown::Both);
        });
        Proxy { address }
    }
}
