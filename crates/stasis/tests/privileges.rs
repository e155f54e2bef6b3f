//! stasis without root: a user who may open /dev/kvm runs, snapshots,
//! restores, checkpoints and migrates VMs; root gives itself up with
//! `--user`; and no other user reaches a VM's control socket. The users
//! are uids made up by the test (no account is needed to hold a uid);
//! the test itself runs as root to become them.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The unprivileged user the tests run stasis as.
const USER: u32 = 64_101;
/// Another unprivileged user.
const OTHER: u32 = 64_102;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests become other users and must run as root"
    );
}

/// The group that may open /dev/kvm (its owning group).
fn kvm_gid() -> u32 {
    require_kvm();
    std::fs::metadata("/dev/kvm").unwrap().gid()
}

/// A directory of `s` owned by USER (group kvm), mode 0700, with the
/// guest kernel in it.
fn home(s: &Scratch) -> PathBuf {
    let home = s.join("home");
    std::fs::create_dir(&home).unwrap();
    guest(&home);
    chown_tree(&home, USER, kvm_gid());
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Every directory above must let the user through.
    let mut p = home.parent();
    while let Some(d) = p {
        let mode = std::fs::metadata(d).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not searchable by other users",
            d.display()
        );
        p = d.parent();
    }
    home
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), uid, gid);
        }
    }
}

/// `stasis ARGS` as USER (group kvm), with `home/run` as runtime directory.
fn as_user(home: &Path) -> Command {
    let mut c = stasis_cmd();
    c.uid(USER)
        .gid(kvm_gid())
        .env("STASIS_RUNTIME_DIR", home.join("run"))
        .env("HOME", home)
        .env_remove("XDG_RUNTIME_DIR")
        .current_dir(home);
    c
}

/// A VMM started by `cmd` (with `serial` as its log), as a VmProcess.
fn spawn_vm(mut cmd: Command, name: &str, home: &Path, tag: &str) -> VmProcess {
    let scratch = Scratch::new(tag);
    let stderr_path = scratch.join("stderr.log");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("spawn stasis");
    VmProcess {
        name: name.to_string(),
        child,
        serial: home.join(format!("{name}.log")),
        runtime_dir: home.join("run"),
        stderr_path,
        scratch,
    }
}

fn run_args(home: &Path, name: &str) -> Vec<String> {
    [
        "run",
        "--name",
        name,
        "--memory",
        "32M",
        "--kernel",
        home.join(stasis_guestkit::GUEST_FILE_NAME)
            .to_str()
            .unwrap(),
        "--cmdline",
        "console=ttyS0 workload=heartbeat hb_ms=50",
        "--serial",
        &format!("file:{}", home.join(format!("{name}.log")).display()),
    ]
    .map(String::from)
    .into()
}

/// `stasis ARGS` as USER; panics with its messages unless it succeeds.
fn user_cli(home: &Path, args: &[&str]) -> Output {
    let out = as_user(home).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "stasis {args:?} as uid {USER}: {}",
        err_text(&out)
    );
    out
}

/// (real, effective) uid and gid of every thread of process `pid`.
fn thread_ids(pid: u32) -> Vec<(String, String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            // A thread that ended meanwhile is skipped.
            let status = std::fs::read_to_string(t.ok()?.path().join("status")).ok()?;
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .unwrap()
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            Some((field("Uid:"), field("Gid:"), field("Groups:")))
        })
        .collect()
}

fn assert_runs_as_user(vm: &VmProcess) {
    let ids = thread_ids(vm.child.id());
    assert!(ids.len() > 1, "{ids:?}");
    let want = (format!("{USER} {USER}"), format!("{0} {0}", kvm_gid()));
    for (uid, gid, _) in &ids {
        assert_eq!((uid, gid), (&want.0, &want.1), "{ids:?}");
    }
}

/// Connects to the UNIX socket `path` as `uid` in a forked child; the
/// errno of `connect` (0: connected).
fn connect_as(uid: u32, path: &Path) -> i32 {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let bytes = c.as_bytes_with_nul();
    // SAFETY: a zeroed sockaddr_un is valid; the path fits (checked).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    assert!(bytes.len() <= addr.sun_path.len());
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child only makes async-signal-safe system calls on
    // memory prepared before the fork, then _exits; the parent waits.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                libc::_exit(200);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let r = libc::connect(
                fd,
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            let errno = if r == 0 { 0 } else { *libc::__errno_location() };
            libc::_exit(errno.min(199));
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        assert!(libc::WIFEXITED(status));
        let code = libc::WEXITSTATUS(status);
        assert_ne!(code, 200, "the child could not become uid {uid}");
        code
    }
}

#[test]
fn another_user_cannot_reach_a_vms_control_socket() {
    require_root();
    let s = Scratch::new("priv-socket");
    let home = home(&s);
    let mut args = run_args(&home, "guarded");
    args.extend([
        "--api-socket".into(),
        home.join("run/guarded.sock").display().to_string(),
    ]);
    std::fs::create_dir(home.join("run")).unwrap();
    std::os::unix::fs::chown(home.join("run"), Some(USER), Some(kvm_gid())).unwrap();
    std::fs::set_permissions(home.join("run"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut vm = spawn_vm(
        {
            let mut c = as_user(&home);
            c.args(&args);
            c
        },
        "guarded",
        &home,
        "priv-socket-vm",
    );
    vm.wait_tagged("HB", 1, Duration::from_secs(60));
    vm.wait_socket();
    let sock = home.join("run/guarded.sock");
    let md = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    assert_eq!(md.uid(), USER);
    assert_eq!(connect_as(USER, &sock), 0, "the owner must reach it");
    assert_eq!(
        connect_as(OTHER, &sock),
        libc::EACCES,
        "another user reached it"
    );
    // The check can fail: with the modes opened up, the other user gets in.
    let run = home.join("run");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o711)).unwrap();
    assert_eq!(
        connect_as(OTHER, &sock),
        libc::EACCES,
        "socket mode alone must refuse"
    );
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(connect_as(OTHER, &sock), 0, "the probe cannot tell");
}

/// Lets group kvm open /dev/userfaultfd (background restores and
/// snapshots of an unprivileged user need it, as docs/SECURITY.md says)
/// while it lives; puts the device's owner and mode back when dropped.
struct UserfaultfdForKvm(Option<(u32, u32, u32)>);

impl UserfaultfdForKvm {
    fn grant() -> Self {
        let dev = Path::new("/dev/userfaultfd");
        let Ok(md) = std::fs::metadata(dev) else {
            // Older kernels: the system call alone decides.
            return Self(None);
        };
        std::os::unix::fs::chown(dev, None, Some(kvm_gid())).unwrap();
        std::fs::set_permissions(dev, std::fs::Permissions::from_mode(0o660)).unwrap();
        Self(Some((md.uid(), md.gid(), md.permissions().mode() & 0o7777)))
    }
}

impl Drop for UserfaultfdForKvm {
    fn drop(&mut self) {
        if let Some((uid, gid, mode)) = self.0 {
            let dev = Path::new("/dev/userfaultfd");
            let _ = std::os::unix::fs::chown(dev, Some(uid), Some(gid));
            let _ = std::fs::set_permissions(dev, std::fs::Permissions::from_mode(mode));
        }
    }
}

#[test]
fn an_unprivileged_user_runs_snapshots_restores_checkpoints_and_migrates() {
    require_root();
    let _uffd = UserfaultfdForKvm::grant();
    let s = Scratch::new("priv-user");
    let home = home(&s);
    // Run.
    let mut cmd = as_user(&home);
    cmd.args(run_args(&home, "src"));
    let mut src = spawn_vm(cmd, "src", &home, "priv-src");
    src.wait_tagged("HB", 2, Duration::from_secs(60));
    src.wait_socket();
    assert_runs_as_user(&src);
    let md = std::fs::metadata(home.join("run")).unwrap();
    assert_eq!((md.uid(), md.permissions().mode() & 0o777), (USER, 0o700));
    // Snapshot (live) and suspend.
    let snap = home.join("snap");
    user_cli(
        &home,
        &["snapshot", "src", snap.to_str().unwrap(), "--stop"],
    );
    assert_eq!(src.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert_eq!(
        std::fs::metadata(snap.join("memory.img")).unwrap().uid(),
        USER
    );
    // Restore.
    let mut cmd = as_user(&home);
    cmd.args([
        "restore",
        snap.to_str().unwrap(),
        "--name",
        "restored",
        "--serial",
        &format!("file:{}", home.join("restored.log").display()),
    ]);
    let mut restored = spawn_vm(cmd, "restored", &home, "priv-restored");
    restored.wait_tagged("HB", 2, Duration::from_secs(60));
    restored.wait_socket();
    assert_runs_as_user(&restored);
    // Migrate it to a receiver, both as the user.
    // Its own runtime directory: the VM keeps its name on arrival.
    let mut cmd = as_user(&home);
    cmd.env("STASIS_RUNTIME_DIR", home.join("run2"))
        .args(receiver_args(&home));
    let mut arrived = spawn_vm(cmd, "restored", &home, "priv-arrived");
    arrived.serial = home.join("arrived.log");
    let address = listening_address(&arrived);
    user_cli(&home, &["migrate", "restored", &address, "--insecure"]);
    assert_eq!(restored.wait_exit(Duration::from_secs(60)).code(), Some(0));
    arrived.wait_tagged("HB", 2, Duration::from_secs(60));
    assert_runs_as_user(&arrived);
    stop_arrived(&home, &mut arrived);

    // Checkpoints of a VM with a disk: an external one (a qcow2 overlay
    // made by the user beside the disk), listed, then rolled back to.
    let disk = home.join("d0.img");
    sparse_file(&disk, 16 << 20);
    std::os::unix::fs::chown(&disk, Some(USER), Some(kvm_gid())).unwrap();
    let mut args = run_args(&home, "disky");
    args.extend(["--disk".into(), format!("id=d0,path={}", disk.display())]);
    let mut cmd = as_user(&home);
    cmd.args(&args);
    let mut disky = spawn_vm(cmd, "disky", &home, "priv-disky");
    disky.wait_tagged("HB", 2, Duration::from_secs(60));
    disky.wait_socket();
    user_cli(&home, &["checkpoint", "disky", "c1", "--external"]);
    let out = user_cli(&home, &["checkpoints", "disky"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("c1"));
    let overlay = home.join("d0-c1.qcow2");
    assert_eq!(std::fs::metadata(&overlay).unwrap().uid(), USER);
    user_cli(&home, &["rollback", "disky", "c1"]);
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while !disky.stderr().contains("restored from a snapshot") {
        assert!(std::time::Instant::now() < end, "{}", disky.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_runs_as_user(&disky);
    user_cli(&home, &["stop", "disky"]);
    assert_eq!(disky.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn root_gives_itself_up_with_user_and_group() {
    require_root();
    let s = Scratch::new("priv-drop");
    let home = home(&s);
    // No state directory given: the VM's own, RUNTIME_DIR/NAME.state,
    // made by root for the user.
    let mut cmd = stasis_cmd();
    cmd.env("STASIS_RUNTIME_DIR", home.join("run"))
        .env_remove("STASIS_STATE_DIR")
        .args(run_args(&home, "dropped"))
        .args([
            "--user",
            &USER.to_string(),
            "--group",
            &kvm_gid().to_string(),
        ]);
    let mut vm = spawn_vm(cmd, "dropped", &home, "priv-drop-vm");
    vm.wait_tagged("HB", 2, Duration::from_secs(60));
    vm.wait_socket();
    assert_runs_as_user(&vm);
    for (_, _, groups) in thread_ids(vm.child.id()) {
        assert_eq!(groups, "", "supplementary groups kept");
    }
    // The socket was made by the user, who drives the VM.
    let sock = home.join("run/dropped.sock");
    assert_eq!(std::fs::metadata(&sock).unwrap().uid(), USER);
    let own = home.join("run/dropped.state");
    assert_eq!(std::fs::metadata(&own).unwrap().uid(), USER);
    let snap = own.join("snap");
    user_cli(&home, &["snapshot", "dropped", snap.to_str().unwrap()]);
    assert_eq!(
        std::fs::metadata(snap.join("manifest.json")).unwrap().uid(),
        USER
    );
    // A receiver started as root gives root up too, once the arriving VM
    // exists, and binds the socket as the user.
    let mut cmd = stasis_cmd();
    cmd.env("STASIS_RUNTIME_DIR", home.join("run2"))
        .args(receiver_args(&home))
        .args([
            "--user",
            &USER.to_string(),
            "--group",
            &kvm_gid().to_string(),
        ]);
    let mut arrived = spawn_vm(cmd, "dropped", &home, "priv-drop-arrived");
    arrived.serial = home.join("arrived.log");
    arrived.runtime_dir = home.join("run2");
    let address = listening_address(&arrived);
    user_cli(&home, &["migrate", "dropped", &address, "--insecure"]);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
    arrived.wait_tagged("HB", 2, Duration::from_secs(60));
    arrived.wait_socket();
    assert_runs_as_user(&arrived);
    let sock = home.join("run2/dropped.sock");
    assert_eq!(std::fs::metadata(&sock).unwrap().uid(), USER);
    stop_arrived(&home, &mut arrived);

    // Wrong uses are refused before anything starts.
    for (args, want) in [
        (
            vec!["--user", "no-such-user-here"],
            "--user no-such-user-here: no such user",
        ),
        (
            vec!["--user", "0", "--group", "0"],
            "becoming root is not giving root up",
        ),
        (vec!["--user", "64101"], "a numeric uid needs --group"),
        (
            vec!["--user", "64101", "--group", "0"],
            "the root group (gid 0) is not giving root up",
        ),
    ] {
        let out = stasis_cmd()
            .env("STASIS_RUNTIME_DIR", home.join("run"))
            .args(run_args(&home, "refused"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            err_text(&out).contains(want),
            "{args:?}: {}",
            err_text(&out)
        );
    }
    // A local upgrade needs no root, so a receiver on a UNIX socket does
    // not take --user.
    let out = stasis_cmd()
        .env("STASIS_RUNTIME_DIR", home.join("run"))
        .args(["receive", "--listen"])
        .arg(format!("unix:{}", home.join("upgrade.sock").display()))
        .args([
            "--user",
            &USER.to_string(),
            "--group",
            &kvm_gid().to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out).contains("--user is for tcp: listeners"),
        "{}",
        err_text(&out)
    );
    assert!(!home.join("upgrade.sock").exists());
}

/// `stasis receive` on a free loopback port, its log in `home`.
fn receiver_args(home: &Path) -> Vec<String> {
    [
        "receive",
        "--listen",
        "tcp:127.0.0.1:0",
        "--insecure",
        "--serial",
        &format!("file:{}", home.join("arrived.log").display()),
    ]
    .map(String::from)
    .into()
}

/// Stops, as USER, a VM that arrived at a receiver in `home/run2`.
fn stop_arrived(home: &Path, arrived: &mut VmProcess) {
    let out = as_user(home)
        .env("STASIS_RUNTIME_DIR", home.join("run2"))
        .args(["stop", &arrived.name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", err_text(&out));
    assert_eq!(arrived.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

/// The address a receiver printed that it waits on.
fn listening_address(receiver: &VmProcess) -> String {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(a) = receiver
            .stderr()
            .lines()
            .find_map(|l| l.strip_prefix("stasis: waiting for a migration on "))
        {
            return a.trim().to_string();
        }
        assert!(std::time::Instant::now() < end, "{}", receiver.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}
