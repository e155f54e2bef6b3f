//! `--seccomp`, `--state-dir` and `--require-sandbox`: what a VMM may do
//! once its VM is set up. The filters and the Landlock ruleset live in
//! `stasis-sandbox`; this module turns a VM's configuration and the flags
//! into the file-system policy (docs/SECURITY.md, "Landlock").

use std::path::{Path, PathBuf};

use clap::Args;
use stasis_config::{SerialConfig, VmConfig};
use stasis_sandbox::{Confinement, FsPolicy};

use crate::privileges::Identity;
use std::os::unix::fs::DirBuilderExt;

/// The confinement flags of `stasis run` and `stasis restore`.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Seccomp filters, one per kind of thread (docs/SECURITY.md): kill
    /// (a forbidden system call ends the VMM with a message naming the
    /// thread and the call), log (allowed, and logged by the kernel; for
    /// finding what a filter lacks), off (no filters: debugging only).
    #[arg(long, value_name = "kill|log|off", default_value = "kill")]
    pub seccomp: stasis_sandbox::Mode,
    /// A directory the VM may write snapshots, checkpoints and other
    /// state into (repeatable; $STASIS_STATE_DIR, colon-separated, gives
    /// the default). Without either: the directory of the VM's first
    /// disk, or for a VM without disks RUNTIME_DIR/NAME.state. A snapshot
    /// or checkpoint elsewhere is refused (and Landlock would stop it).
    #[arg(
        long = "state-dir",
        value_name = "DIR",
        env = "STASIS_STATE_DIR",
        value_delimiter = ':'
    )]
    pub state_dirs: Vec<PathBuf>,
    /// Refuse to start where the kernel cannot confine the VMM (no
    /// Landlock) or with --seccomp=off, instead of running unconfined.
    #[arg(long)]
    pub require_sandbox: bool,
}

/// The directory `path` is in.
fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `dir` (mode 0700) for the VMM, owned by `owner` when it will
/// become that user (`--user`): made by root now, used by the user later.
fn private_dir(dir: &Path, owner: Option<Identity>) -> Result<(), String> {
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        return Err(format!("cannot create {}: {e}", dir.display()));
    }
    if let Some(id) = owner {
        std::os::unix::fs::chown(dir, Some(id.uid), Some(id.gid))
            .map_err(|e| format!("cannot give {} to uid {}: {e}", dir.display(), id.uid))?;
    }
    Ok(())
}

/// The state directories of `cfg` under `args`, created if they are the
/// default per-VM directory.
fn state_dirs(
    cfg: &VmConfig,
    args: &SandboxArgs,
    socket: &Path,
    owner: Option<Identity>,
) -> Result<Vec<PathBuf>, String> {
    let given: Vec<PathBuf> = args
        .state_dirs
        .iter()
        .filter(|d| !d.as_os_str().is_empty())
        .cloned()
        .collect();
    if !given.is_empty() {
        for d in &given {
            if !d.is_dir() {
                return Err(format!("--state-dir {}: not a directory", d.display()));
            }
        }
        return Ok(given);
    }
    if let Some(d) = cfg.disk.first() {
        return Ok(vec![dir_of(&d.path)]);
    }
    let runtime = dir_of(socket);
    if owner.is_some() && !runtime.exists() {
        // The user's runtime directory, which the user will bind its
        // socket in: it must exist (and be theirs) for the ruleset.
        private_dir(&runtime, owner)?;
    }
    let dir = runtime.join(format!("{}.state", cfg.name));
    if owner.is_some() {
        private_dir(&dir, owner)?;
    } else {
        stasis_api::runtime::ensure_private_dir(&dir)
            .map_err(|e| format!("cannot create the state directory {}: {e}", dir.display()))?;
    }
    Ok(vec![dir])
}

/// The snapshot directories a restored VM reaches.
#[derive(Debug, Default)]
pub struct SnapshotDirs {
    /// Read: the snapshot and its parents.
    pub read: Vec<PathBuf>,
    /// Written: the snapshot's own directory, when a working set is
    /// recorded beside it.
    pub write: Option<PathBuf>,
}

/// Prepares Landlock for a VM of `cfg` whose API socket is `socket`
/// (restored from the snapshots in `snapshots`) and says on standard
/// error how confined it will be. Call before the VM's threads exist.
/// With `owner` (`--user`), the directories it creates belong to that
/// user.
pub fn prepare(
    cfg: &VmConfig,
    args: &SandboxArgs,
    socket: &Path,
    snapshots: &SnapshotDirs,
    owner: Option<Identity>,
) -> Result<(), String> {
    let mut policy = FsPolicy {
        state_dirs: state_dirs(cfg, args, socket, owner)?,
        private_dirs: Vec::new(),
        socket_dirs: Vec::new(),
        read_dirs: snapshots.read.clone(),
        // KVM, taps and userfaultfd (a rollback builds the VM again), the
        // page map that tracks dirty pages for live snapshots and
        // migrations, and the CPU description KVM's probe reads.
        files: [
            "/dev/kvm",
            "/dev/net/tun",
            "/dev/userfaultfd",
            "/proc/self/pagemap",
            "/proc/cpuinfo",
        ]
        .map(PathBuf::from)
        .into(),
    };
    // A tap's state, which a rollback checks.
    policy
        .read_dirs
        .extend(["/sys/class/net", "/sys/devices/virtual/net"].map(PathBuf::from));
    // Disks: their directories take overlays, reflink clones, checkpoint
    // stores and locks (read-only disks only need reading, with the
    // backing files beside them).
    for d in &cfg.disk {
        let dir = dir_of(&d.path);
        if d.readonly {
            policy.read_dirs.push(dir);
        } else {
            policy.state_dirs.push(dir);
        }
    }
    // The runtime directory (the API socket is removed at the end and
    // bound again by a rollback), and output destinations (a rollback
    // opens them again; a socket is bound again beside itself): sockets
    // only, not a place for files.
    policy.socket_dirs.push(dir_of(socket));
    policy.private_dirs.extend(snapshots.write.clone());
    let outputs = std::iter::once(&cfg.serial).chain(cfg.console.iter().map(|c| &c.output));
    for o in outputs {
        match o {
            SerialConfig::File { path } => {
                // Created now (as the VM would a moment later) so that the
                // ruleset can name it: a rollback opens it again.
                if !path.exists() {
                    if let Ok(f) = stasis_vmm::devices::output_file::open_append(path) {
                        drop(f);
                        if let Some(id) = owner {
                            let _ = std::os::unix::fs::chown(path, Some(id.uid), Some(id.gid));
                        }
                    }
                }
                policy.files.push(path.clone())
            }
            SerialConfig::Socket { path } => policy.socket_dirs.push(dir_of(path)),
            SerialConfig::Stdout | SerialConfig::Null => {}
        }
    }
    let confinement = stasis_sandbox::prepare_landlock(&policy).map_err(|e| e.to_string())?;
    let dirs: Vec<String> = stasis_sandbox::writable_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    match confinement {
        Confinement::Full => {
            tracing::info!("Landlock: the VM may write only in {}", dirs.join(", "))
        }
        Confinement::Partial => eprintln!(
            "stasis: this kernel's Landlock is older than stasis's: file access is confined, but not every right"
        ),
        Confinement::None if args.require_sandbox => {
            return Err("this kernel has no Landlock, and --require-sandbox was given".into())
        }
        Confinement::None => eprintln!(
            "stasis: WARNING: this kernel has no Landlock: the VMM runs without file-system confinement"
        ),
    }
    Ok(())
}
