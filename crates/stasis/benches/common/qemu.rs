//! QEMU (`qemu-system-x86_64`, microvm) as the peer some benchmarks
//! measure beside stasis, steered through QMP.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Vmm;

/// A QMP connection.
pub struct Qmp(BufReader<UnixStream>);

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let end = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        let mut q = Qmp(BufReader::new(s));
        q.line(); // greeting
        q.call(r#"{"execute": "qmp_capabilities"}"#);
        q
    }

    fn line(&mut self) -> serde_json::Value {
        let mut l = String::new();
        self.0.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP {l:?}: {e}"))
    }

    /// Sends a command; its `return` (events are skipped).
    pub fn call(&mut self, cmd: &str) -> serde_json::Value {
        writeln!(self.0.get_mut(), "{cmd}").unwrap();
        loop {
            let v = self.line();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {cmd}: {e}");
            }
        }
    }
}

pub fn qemu(
    mib: u64,
    kernel: &Path,
    cmdline: &str,
    log: &Path,
    qmp: &Path,
    incoming: Option<u16>,
    extra: &[&str],
) -> Vmm {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args([
        "-m",
        &format!("{mib}M"),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-display", "none", "-kernel"])
    .arg(kernel)
    .args(["-append", cmdline, "-serial"])
    .arg(format!("file:{}", log.display()))
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c.args(extra);
    if let Some(p) = incoming {
        c.args(["-incoming", &format!("tcp:127.0.0.1:{p}")]);
    }
    Vmm(c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-system-x86_64"))
}

/// Whether `qemu-system-x86_64` runs here.
pub fn have_qemu() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
