//! Shared helpers for the integration tests: each test runs the real
//! `stasis` binary on real KVM with the guest kit's guest.
#![allow(dead_code)]

pub mod checkpoint;
pub mod loopfs;
pub mod migration;
pub mod qemu;
pub mod tls;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Fails the test with a clear message when KVM cannot be used.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "this test needs KVM: cannot open /dev/kvm ({e}). Run the tests on a host with KVM \
             enabled and access to /dev/kvm."
        );
    }
}

/// A per-test scratch directory, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "stasis-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `stasis` binary under test.
pub fn stasis_bin() -> &'static str {
    env!("CARGO_BIN_EXE_stasis")
}

/// Writes the guest kit's ELF into `dir`.
pub fn guest(dir: &Path) -> PathBuf {
    stasis_guestkit::write_guest(dir).expect("write guest ELF")
}

/// Parses `key=value` pairs of a guest output line.
pub fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// The numeric field `key` of `line`.
pub fn num(line: &str, key: &str) -> u64 {
    fields(line)
        .get(key)
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {line:?}"))
}

/// A `stasis run` process with its serial output in a file and its API
/// socket in a private runtime directory. Killed when dropped.
pub struct VmProcess {
    pub name: String,
    pub child: Child,
    pub serial: PathBuf,
    pub runtime_dir: PathBuf,
    pub stderr_path: PathBuf,
    pub scratch: Scratch,
}

/// Options for [`VmProcess::start`].
pub struct VmOpts<'a> {
    pub vcpus: u32,
    pub memory: &'a str,
    pub boot: &'a str,
    pub cmdline: &'a str,
    pub extra: Vec<String>,
    /// Run the VMM inside this network namespace.
    pub netns: Option<String>,
    /// Extra environment of the VMM (e.g. `STASIS_FAILPOINTS`); an empty
    /// value removes the variable.
    pub env: Vec<(String, String)>,
    /// Another serial destination than the file [`VmProcess::serial`]
    /// (whose lines then stay empty).
    pub serial: Option<String>,
}

/// `stasis` itself, or `ip netns exec NS stasis` when `netns` is set;
/// the VMs it starts may write state anywhere in the temporary directory,
/// where every test keeps its files (see [`stasis_cmd`]).
pub fn stasis_command(netns: Option<&str>) -> Command {
    let mut c = match netns {
        None => Command::new(stasis_bin()),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, stasis_bin()]);
            c
        }
    };
    c.env("STASIS_STATE_DIR", std::env::temp_dir());
    c
}

/// `stasis`, whose VMs may write state (snapshots, checkpoints) anywhere
/// in the temporary directory, where the tests keep their files: without
/// it a VM may write only beside its first disk or in its own state
/// directory (Landlock; see docs/SECURITY.md).
pub fn stasis_cmd() -> Command {
    stasis_command(None)
}

impl Default for VmOpts<'_> {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory: "64M",
            boot: "auto",
            cmdline: "console=ttyS0 workload=heartbeat",
            extra: Vec::new(),
            netns: None,
            env: Vec::new(),
            serial: None,
        }
    }
}

impl VmProcess {
    pub fn start(tag: &str, opts: VmOpts) -> Self {
        require_kvm();
        let scratch = Scratch::new(tag);
        let kernel = guest(scratch.path());
        let serial = scratch.join("serial.log");
        let runtime_dir = scratch.join("run");
        let stderr_path = scratch.join("stderr.log");
        let name = format!("{tag}-{}", std::process::id());
        let serial_arg = opts
            .serial
            .clone()
            .unwrap_or_else(|| format!("file:{}", serial.display()));
        let mut cmd = stasis_command(opts.netns.as_deref());
        for (k, v) in &opts.env {
            // An empty value removes the variable.
            match v.is_empty() {
                true => cmd.env_remove(k),
                false => cmd.env(k, v),
            };
        }
        let child = cmd
            .env("STASIS_RUNTIME_DIR", &runtime_dir)
            .arg("run")
            .args(["--name", &name])
            .args(["--vcpus", &opts.vcpus.to_string()])
            .args(["--memory", opts.memory])
            .args(["--boot", opts.boot])
            .args(["--cmdline", opts.cmdline])
            .arg("--kernel")
            .arg(&kernel)
            .arg("--serial")
            .arg(serial_arg)
            .args(&opts.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn stasis run");
        Self {
            name,
            child,
            serial,
            runtime_dir,
            stderr_path,
            scratch,
        }
    }

    /// Everything the guest printed so far, as complete lines.
    pub fn lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        complete
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect()
    }

    /// Lines starting with `tag`.
    pub fn tagged(&self, tag: &str) -> Vec<String> {
        let prefix = format!("{tag} ");
        self.lines()
            .into_iter()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Panics with the guest's output and the VMM's stderr.
    pub fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- guest serial ---\n{}\n--- stasis stderr ---\n{}",
            self.lines().join("\n"),
            self.stderr()
        )
    }

    /// Waits until `pred` holds for the set of output lines.
    pub fn wait_until(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[String]) -> bool) {
        let end = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if lines
                .iter()
                .any(|l| l.starts_with("GUEST-EXCEPTION") || l.starts_with("GUEST-ERROR"))
            {
                self.fail(&format!("guest reported an error while waiting for {what}"));
            }
            if pred(&lines) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                self.fail(&format!("stasis exited ({st}) while waiting for {what}"));
            }
            if Instant::now() > end {
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for at least `n` lines with `tag`; returns them.
    pub fn wait_tagged(&mut self, tag: &str, n: usize, timeout: Duration) -> Vec<String> {
        let prefix = format!("{tag} ");
        self.wait_until(&format!("{n} '{tag}' lines"), timeout, |ls| {
            ls.iter().filter(|l| l.starts_with(&prefix)).count() >= n
        });
        self.tagged(tag)
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > end {
                self.fail(&format!("stasis did not exit within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The API socket path.
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join(format!("{}.sock", self.name))
    }

    /// Waits until the API socket exists.
    pub fn wait_socket(&mut self) {
        let s = self.socket();
        self.wait_until("the API socket", Duration::from_secs(30), |_| s.exists());
    }

    /// Runs a client subcommand against this VM's runtime directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        stasis_cmd()
            .env("STASIS_RUNTIME_DIR", &self.runtime_dir)
            .args(args)
            .output()
            .expect("run stasis client")
    }

    /// Sends a signal to the VMM.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest kit's `net` workload on tap `tap` of `ns` (the VMM runs in
/// the namespace), started and waited for until at least 5 frames were
/// answered.
pub fn net_guest(tag: &str, ns: &NetNs, tap: &str, memory: &str) -> VmProcess {
    let mut vm = VmProcess::start(
        tag,
        VmOpts {
            memory,
            cmdline: "console=ttyS0 workload=net net_ms=20 report_ms=200",
            extra: vec!["--net".into(), format!("id=n0,tap={tap}")],
            netns: Some(ns.name.clone()),
            ..Default::default()
        },
    );
    vm.wait_until(
        "replies before the snapshot",
        Duration::from_secs(90),
        |ls| {
            ls.iter()
                .any(|l| l.starts_with("NET ") && num(l, "replies") >= 5)
        },
    );
    vm
}

/// Creates (or truncates) `path` as a sparse file of `bytes` bytes: a
/// blank disk image.
pub fn sparse_file(path: &Path, bytes: u64) {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
}

/// Runs `stasis` with `args` and no VM.
pub fn stasis(args: &[&str], runtime_dir: &Path) -> Output {
    stasis_cmd()
        .env("STASIS_RUNTIME_DIR", runtime_dir)
        .args(args)
        .output()
        .expect("run stasis")
}

/// Standard error of `out` as text.
pub fn err_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Starts `stasis restore DIR` with serial output in a file of `scratch`
/// and the API socket in `runtime_dir`.
pub fn restore_process(tag: &str, dir: &Path, runtime_dir: &Path, extra: &[&str]) -> VmProcess {
    restore_process_in(None, tag, dir, runtime_dir, extra)
}

/// [`restore_process`], inside network namespace `netns` if given.
pub fn restore_process_in(
    netns: Option<&str>,
    tag: &str,
    dir: &Path,
    runtime_dir: &Path,
    extra: &[&str],
) -> VmProcess {
    restore_process_with(netns, tag, dir, runtime_dir, extra, &[])
}

/// [`restore_process_in`] with extra environment for the VMM.
pub fn restore_process_with(
    netns: Option<&str>,
    tag: &str,
    dir: &Path,
    runtime_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> VmProcess {
    let scratch = Scratch::new(tag);
    let serial = scratch.join("serial.log");
    let stderr_path = scratch.join("stderr.log");
    let name = format!("{tag}-{}", std::process::id());
    let has_serial = extra.contains(&"--serial");
    let mut cmd = stasis_command(netns);
    cmd.env("STASIS_RUNTIME_DIR", runtime_dir)
        .envs(env.iter().copied())
        .arg("restore")
        .arg(dir)
        .args(["--name", &name]);
    if !has_serial {
        cmd.arg("--serial")
            .arg(format!("file:{}", serial.display()));
    }
    let child = cmd
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("spawn stasis restore");
    VmProcess {
        name,
        child,
        serial,
        runtime_dir: runtime_dir.to_path_buf(),
        stderr_path,
        scratch,
    }
}

/// `TIMER` reports of one CPU: every report after the first (which may
/// span a pause or the start) shows ticks since the one before, at a rate no higher than `hz` (plus one tick per report
/// for the interval's edges).
pub fn timer_runs_at_most_at(reports: &[String], hz: f64) {
    for w in reports.windows(2).skip(1) {
        assert!(
            num(&w[1], "ticks") > num(&w[0], "ticks"),
            "no timer tick between reports: {} -> {}",
            w[0],
            w[1]
        );
        let rate = num(&w[1], "hz_x100") as f64 / 100.0;
        assert!(
            rate <= hz * 1.5,
            "timer at {rate} Hz, set to {hz}: {}",
            w[1]
        );
    }
}

/// A guest's serial output across a suspend and restore, as complete
/// lines: those before the suspend, and those after it. `before` is the
/// suspended guest's output, whose last line may have been cut by the
/// suspend (the restored guest prints the rest of it first); `after` is
/// the restored guest's, whose last line may still be incomplete.
pub fn lines_across(before: &str, after: &str) -> (Vec<String>, Vec<String>) {
    let cut = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let first: Vec<String> = before[..cut].lines().map(str::to_string).collect();
    let rest = format!("{}{}", &before[cut..], after);
    let complete = &rest[..rest.rfind('\n').map(|i| i + 1).unwrap_or(0)];
    (first, complete.lines().map(str::to_string).collect())
}

/// The last complete heartbeat before a suspend (`before`: the suspended
/// guest's serial output) and the first one the restored guest printed.
pub fn heartbeats_across(before: &str, restored: &VmProcess) -> (String, String) {
    let after = std::fs::read_to_string(&restored.serial).unwrap();
    let (before, after) = lines_across(before, &after);
    let last_hb = before
        .into_iter()
        .rfind(|l| l.starts_with("HB "))
        .expect("heartbeats before the suspend");
    let next_hb = after
        .into_iter()
        .find(|l| l.starts_with("HB "))
        .unwrap_or_else(|| restored.fail("no heartbeat after the restore"));
    (last_hb, next_hb)
}

impl VmProcess {
    /// Suspends the VM to `dir` (`snapshot --stop`) and waits for the VMM
    /// to exit with status 0.
    pub fn suspend_to(&mut self, dir: &Path) {
        self.wait_socket();
        self.snapshot(dir, true);
        let st = self.wait_exit(Duration::from_secs(60));
        if st.code() != Some(0) {
            self.fail(&format!("suspend ended with {st}"));
        }
    }

    /// `stasis snapshot NAME DIR [--stop]`; panics with details on failure.
    pub fn snapshot(&self, dir: &Path, stop: bool) -> serde_json::Value {
        self.snapshot_with(dir, if stop { &["--stop"] } else { &[] })
    }

    /// `stasis snapshot NAME DIR --json EXTRA...`; panics with details on
    /// failure.
    pub fn snapshot_with(&self, dir: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["snapshot", &self.name, dir.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        if !out.status.success() {
            self.fail(&format!("snapshot failed: {}", err_text(&out)));
        }
        serde_json::from_slice(&out.stdout).expect("snapshot --json output")
    }
}

/// A network namespace with tap devices and a `net-responder.py` on each,
/// removed (with everything in it) when dropped. Needs root and `ip`.
pub struct NetNs {
    pub name: String,
    responders: Vec<(String, Child, PathBuf)>,
}

impl NetNs {
    pub fn new(tag: &str, taps: &[&str], scratch: &Scratch) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "st-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("the ip tool (iproute2)");
            assert!(out.status.success(), "ip {args:?}: {}", err_text(&out));
        };
        ip(&["netns", "add", &name]);
        let mut ns = NetNs {
            name: name.clone(),
            responders: Vec::new(),
        };
        for tap in taps {
            ip(&[
                "netns", "exec", &name, "ip", "tuntap", "add", "dev", tap, "mode", "tap",
            ]);
            ip(&["netns", "exec", &name, "ip", "link", "set", tap, "up"]);
            let log = scratch.join(&format!("responder-{tap}.log"));
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guests/net-responder.py");
            let child = Command::new("ip")
                .args(["netns", "exec", &name, "python3", "-u"])
                .arg(&script)
                .arg(tap)
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 for the responder");
            ns.responders.push((tap.to_string(), child, log));
        }
        ns
    }

    /// The responder's last `requests=` count for `tap`.
    pub fn requests_seen(&self, tap: &str) -> u64 {
        let (_, _, log) = self.responders.iter().find(|(t, _, _)| t == tap).unwrap();
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .rfind(|l| l.starts_with("RESPONDER "))
            .map(|l| num(l, "requests"))
            .unwrap_or(0)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for (_, c, _) in self.responders.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Rewrites the snapshot at `dir` through the format crate, as a tool or
/// an attacker with the format's documentation could: `edit_section` may
/// change any section's JSON payload (given its name and instance),
/// `edit_manifest` the manifest's fields; every checksum is recomputed and
/// the memory image is copied unchanged.
pub fn rewrite_snapshot(
    dir: &Path,
    mut edit_section: impl FnMut(&str, &str, &mut serde_json::Value),
    edit_manifest: impl FnOnce(&mut stasis_snapshot::ManifestInput),
) {
    use stasis_snapshot::{ManifestInput, MemoryRegionSource, SnapshotReader, SnapshotWriter};
    let reader = SnapshotReader::open(dir).expect("open the snapshot to rewrite");
    let mut sections = Vec::new();
    for e in reader.sections() {
        let bytes = reader.section_bytes(e).expect("read a section");
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).expect("section is JSON");
        edit_section(&e.name, &e.instance, &mut v);
        let bytes = serde_json::to_vec(&v).unwrap();
        sections.push((
            e.name.clone(),
            e.instance.clone(),
            e.version,
            e.optional,
            bytes,
        ));
    }
    let mut memory = Vec::new();
    for r in reader.regions() {
        let mut buf = vec![0u8; r.size as usize];
        reader
            .read_region_into(r, &mut buf, true)
            .expect("read memory");
        memory.push((r.name.clone(), r.gpa, buf));
    }
    let body = reader.body().clone();
    drop(reader);
    let mut input = ManifestInput {
        created_unix_ms: Some(body.created_unix_ms),
        vm_config: body.vm_config,
        cpu: body.cpu,
        notes: body.notes,
    };
    edit_manifest(&mut input);
    let mut w = SnapshotWriter::create(dir).unwrap();
    for (name, instance, version, optional, bytes) in &sections {
        w.add_raw_section(name, instance, *version, *optional, bytes)
            .unwrap();
    }
    let sources: Vec<MemoryRegionSource<'_>> = memory
        .iter()
        .map(|(name, gpa, buf)| MemoryRegionSource::new(name, *gpa, buf))
        .collect();
    w.write_memory(&sources).unwrap();
    w.commit(input).unwrap();
}

/// `stasis check DIR --json` (plus `extra` flags): exit status and report.
pub fn check_json(dir: &Path, extra: &[&str]) -> (Option<i32>, serde_json::Value) {
    let mut args = vec!["check", dir.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let out = stasis(&args, dir.parent().unwrap());
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}): {}", err_text(&out)));
    (out.status.code(), v)
}
