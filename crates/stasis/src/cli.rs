//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use stasis_config::{BootProtocol, ConsoleConfig, DiskConfig, NetConfig, RngConfig, SerialConfig};

/// stasis: a KVM virtual machine monitor built around VM state.
#[derive(Debug, Parser)]
#[command(name = "stasis", version, about, long_about = None)]
pub struct Cli {
    /// Log level for the VMM's own messages (error, warn, info, debug,
    /// trace); `RUST_LOG` takes precedence.
    #[arg(long, global = true, default_value = "warn")]
    pub log_level: String,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a VM and run it until it ends.
    Run(RunArgs),
    /// Boot the built-in heartbeat guest, pause and resume it, suspend it to a
    /// snapshot and restore it.
    Demo(DemoArgs),
    /// List the VMs running on this host.
    List,
    /// Show a VM's state.
    Status(NameArg),
    /// Pause a VM: every vCPU leaves the guest and waits.
    Pause(NameArg),
    /// Resume a paused VM.
    Resume(NameArg),
    /// Stop a VM (the VMM exits with status 0).
    Stop(NameArg),
    /// Snapshot a running VM into a directory; it keeps running unless --stop.
    /// Waits with a progress bar (Ctrl-C cancels) unless --detach.
    /// `stasis snapshot merge DIR` flattens a chain of diff snapshots ending
    /// at DIR into one full snapshot at DIR.
    Snapshot(SnapshotArgs),
    /// List a VM's jobs (long operations such as snapshots), or show one.
    Jobs(JobsArgs),
    /// Cancel a VM's running job; it stops at its next safe point and
    /// leaves the previous snapshot at its path as it was.
    Cancel(CancelArgs),
    /// Start a VM from a snapshot directory (runs in the foreground like `run`).
    Restore(RestoreArgs),
    /// Checkpoint a running VM and its disks: `stasis checkpoint NAME CKPT
    /// [--external]`. qcow2 disks get an internal snapshot CKPT, raw disks a
    /// reflink clone; --external moves every disk onto a new qcow2 overlay.
    /// `stasis checkpoint delete NAME CKPT` deletes one (with --store and no
    /// running VM, from a stopped VM's store).
    Checkpoint(CheckpointArgs),
    /// Show a VM's checkpoint tree (`stasis checkpoints NAME`, or
    /// `--store DIR` for a stopped VM), or the internal snapshots of a
    /// qcow2 image (`--disk PATH`, including ones QEMU made).
    Checkpoints(CheckpointsArgs),
    /// Bring a running VM and its disks back (or forward) to one of its
    /// checkpoints; it goes on from there in the same process, with the
    /// same name and socket. Checkpoints after it stay.
    Rollback(RollbackArgs),
    /// Send a running VM to `stasis receive` on another host (or this
    /// one); it ends here once it runs there, and runs on here if anything
    /// fails before that. Waits with a progress bar (Ctrl-C cancels).
    Migrate(MigrateArgs),
    /// Wait for one VM sent by `stasis migrate` and run it (in the
    /// foreground, like `restore`).
    Receive(ReceiveArgs),
    /// Check every checksum of a snapshot.
    Verify(VerifyArgs),
    /// Describe a snapshot.
    Inspect(InspectArgs),
    /// Can this host run a snapshot? Checks its CPU, vCPU and TSC needs
    /// against this host without starting anything (exit 0 yes, 1 no).
    Check(CheckArgs),
    /// List the CPU models and which of them this host can run.
    CpuModels(CpuModelsArgs),
}

/// `stasis check DIR`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Accept a TSC rate this host cannot keep (as `restore
    /// --allow-tsc-mismatch` would).
    #[arg(long)]
    pub allow_tsc_mismatch: bool,
}

/// `stasis cpu-models`.
#[derive(Debug, Args)]
pub struct CpuModelsArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Also list the features each model gives a guest here.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

/// `stasis checkpoint NAME CKPT` / `stasis checkpoint delete NAME CKPT`.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// The VM's name (or `delete`).
    pub name: String,
    /// The checkpoint's name (or, after `delete`, the VM's name).
    pub checkpoint: String,
    /// After `delete`: the checkpoint's name.
    pub delete_checkpoint: Option<String>,
    /// Freeze every disk and continue on new qcow2 overlays beside them
    /// (works on raw and qcow2 images, on any filesystem).
    #[arg(long)]
    pub external: bool,
    /// The checkpoint store (default: `<vm>.checkpoints` beside the VM's
    /// first writable disk).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Print the API's JSON answer.
    #[arg(long)]
    pub json: bool,
}

/// `stasis rollback NAME CKPT`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The VM's name.
    pub name: String,
    /// The checkpoint.
    pub checkpoint: String,
    /// The checkpoint store (default: the VM's).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Seconds to wait for the VM to run from the checkpoint.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

/// `stasis checkpoints [NAME]`.
#[derive(Debug, Args)]
pub struct CheckpointsArgs {
    /// A running VM's name.
    pub name: Option<String>,
    /// A checkpoint store (a stopped VM's).
    #[arg(long, value_name = "DIR", conflicts_with = "disk")]
    pub store: Option<PathBuf>,
    /// A qcow2 image: list its internal snapshots.
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `stasis snapshot NAME DIR`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The VM's name (or `merge`: flatten the chain ending at DIR).
    pub name: String,
    /// The snapshot directory (its parent must exist; an older snapshot
    /// there is replaced atomically).
    pub dir: PathBuf,
    /// End the VM once the snapshot is safely on disk (suspend).
    #[arg(long)]
    pub stop: bool,
    /// How memory is copied: `background` (the guest runs while its memory
    /// is copied copy-on-write; refused where the VM cannot), `stop-copy`
    /// (the guest stays paused while memory is copied), `auto` (background
    /// where possible, else stop-copy, saying why).
    #[arg(long, default_value = "auto", value_parser = ["auto", "background", "stop-copy"])]
    pub mode: String,
    /// What a live snapshot does with each writable disk so that it matches
    /// memory: `clone` (a reflink clone into the snapshot directory, btrfs
    /// or xfs; refused elsewhere), `copy` (a full copy made while the guest
    /// is paused), `skip` (unsafe: the disk is not kept, a restored guest
    /// finds it as it is then). With --stop disks stay in place.
    #[arg(long, default_value = "clone", value_parser = ["clone", "copy", "skip"])]
    pub disk_mode: String,
    /// Take a diff snapshot against PARENT (a full snapshot or the newest
    /// of a chain): only the pages that differ from it are stored, and
    /// `stasis restore DIR` restores the whole chain. Parent and child
    /// in one directory are named relatively, so they can move together.
    #[arg(long, value_name = "PARENT")]
    pub parent: Option<PathBuf>,
    /// Print the API's JSON answer.
    #[arg(long)]
    pub json: bool,
    /// Start the snapshot as a job and print its id at once instead of
    /// waiting (follow it with `stasis jobs NAME ID --wait`).
    #[arg(long)]
    pub detach: bool,
}

/// `stasis jobs NAME [ID]`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// The VM's name.
    pub name: String,
    /// One job's id (default: list them all).
    pub id: Option<u64>,
    /// Wait for the job to end, with a progress bar on a terminal (needs
    /// ID).
    #[arg(long, requires = "id")]
    pub wait: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `stasis cancel NAME ID`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The VM's name.
    pub name: String,
    /// The job's id.
    pub id: u64,
}

/// `stasis restore DIR`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot directory (with --checkpoint: the checkpoint's
    /// directory in its store, STORE/CKPT).
    pub dir: PathBuf,
    /// DIR is a checkpoint: bring every disk back to it (qcow2 internal
    /// snapshot applied, new overlay on the frozen image, or the reflink
    /// clone put back), then start the VM from its state. Other
    /// checkpoints, earlier or later, stay.
    #[arg(long)]
    pub checkpoint: bool,
    /// What differs on this host.
    #[command(flatten)]
    pub vm: OverrideArgs,
    /// background: the guest starts at once and its memory is filled
    /// behind it (pages it touches first, then the rest; huge pages);
    /// eager: copy all memory first, then start; lazy: map the image
    /// copy-on-write (starts at once, every first write copies 4 KiB).
    #[arg(long, default_value = "background")]
    pub mode: stasis_vmm::persist::restore::RestoreMode,
    /// Do not check the memory image's checksums (section checksums are
    /// always checked). Without this, background restores check each chunk
    /// as they read it; lazy and eager ones check the whole image first.
    #[arg(long)]
    pub no_verify: bool,
    /// Background mode: record the snapshot's working set. For MS
    /// milliseconds (default 1000) only memory the guest touches is
    /// filled, in the order it touches it; that order is stored beside the
    /// snapshot (working-set.bin) and later restores fill it first.
    #[arg(long, value_name = "MS", num_args = 0..=1, default_missing_value = "1000")]
    pub record_working_set: Option<u64>,
    /// Background mode: ignore a recorded working set (fill in address
    /// order).
    #[arg(long, conflicts_with = "record_working_set")]
    pub ignore_working_set: bool,
    /// Background mode: threads filling memory besides the one serving
    /// the guest's faults (default: one per host CPU, at most 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub fill_threads: Option<u16>,
    /// Confinement: seccomp filters and Landlock.
    #[command(flatten)]
    pub sandbox: crate::confinement::SandboxArgs,
    /// Who to become once the VM is set up.
    #[command(flatten)]
    pub privileges: crate::privileges::PrivilegeArgs,
}

/// What a restored or arriving VM changes from its saved configuration
/// (`stasis restore`, `stasis receive`).
#[derive(Debug, Args)]
pub struct OverrideArgs {
    /// A new name for the VM (default: the saved one).
    #[arg(long)]
    pub name: Option<String>,
    /// A new control socket path.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// A new serial destination: stdout, null, file:PATH, socket:PATH.
    #[arg(long)]
    pub serial: Option<SerialConfig>,
    /// Run the VM even if this host's TSC runs at another rate than the
    /// guest's and KVM cannot scale it (guest time then drifts).
    #[arg(long)]
    pub allow_tsc_mismatch: bool,
    /// Another image file for a disk: ID=PATH (repeatable). It must have the
    /// size the saved one had.
    #[arg(long = "disk-path", value_name = "ID=PATH", value_parser = parse_id_value)]
    pub disk_paths: Vec<(String, String)>,
    /// Another tap for a network device: ID=TAP (repeatable).
    #[arg(long = "tap", value_name = "ID=TAP", value_parser = parse_id_value)]
    pub taps: Vec<(String, String)>,
    /// Another destination for a console: ID=DEST (repeatable), DEST being
    /// stdout, null, file:PATH, socket:PATH, or a path (replacing the path
    /// of a file or socket destination).
    #[arg(long = "console-path", value_name = "ID=DEST", value_parser = parse_id_value)]
    pub console_paths: Vec<(String, String)>,
}

impl OverrideArgs {
    /// As the VM core takes them.
    pub fn overrides(&self) -> stasis_vmm::persist::restore::RestoreOverrides {
        stasis_vmm::persist::restore::RestoreOverrides {
            allow_tsc_mismatch: self.allow_tsc_mismatch,
            name: self.name.clone(),
            api_socket: self.api_socket.clone(),
            serial: self.serial.clone(),
            disk_paths: self
                .disk_paths
                .iter()
                .map(|(id, p)| (id.clone(), p.into()))
                .collect(),
            taps: self.taps.clone(),
            console_outputs: self.console_paths.clone(),
            disk_formats: Vec::new(),
            checkpoint_disks: false,
        }
    }
}

/// Mutual TLS for a migration, on both sides (docs/MIGRATION.md §6).
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Mutual TLS instead of a key: this side's certificate (PEM; the
    /// receiver's must name the host the source connects to), with
    /// --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"], conflicts_with_all = ["psk", "insecure"])]
    pub tls_cert: Option<PathBuf>,
    /// Mutual TLS: the private key of --tls-cert (readable by its owner
    /// only).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: the CA that signed the other side's certificate.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The three files, if TLS was asked for (clap makes them come
    /// together).
    pub fn files(&self) -> Option<stasis_migration::TlsFiles> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(stasis_migration::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        }
    }
}

/// `stasis receive --listen tcp:ADDR:PORT|unix:PATH`.
#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Where to wait for the one incoming VM: tcp:ADDR:PORT (port 0 picks
    /// a free port, printed on standard error), or unix:PATH for a local
    /// upgrade (guest memory files and taps are handed over, not copied;
    /// only this user or root may connect).
    #[arg(long, value_name = "tcp:ADDR:PORT|unix:PATH")]
    pub listen: stasis_vmm::migrate::MigrationAddress,
    /// The key shared with the source (a file readable by its owner only,
    /// 16 to 4096 bytes, e.g. from `head -c 32 /dev/urandom > key`): the
    /// source must prove it holds it, and the stream is encrypted.
    #[arg(long, value_name = "FILE")]
    pub psk: Option<PathBuf>,
    /// Accept a migration without authentication; only on a loopback
    /// address.
    #[arg(long, conflicts_with = "psk")]
    pub insecure: bool,
    /// Mutual TLS instead of a key.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// What differs on this host.
    #[command(flatten)]
    pub vm: OverrideArgs,
    /// Confinement: seccomp filters and Landlock.
    #[command(flatten)]
    pub sandbox: crate::confinement::SandboxArgs,
    /// Giving root up once the arriving VM exists (tcp: only; a local
    /// upgrade needs no root: run the receiver as the source's user).
    #[command(flatten)]
    pub privileges: crate::privileges::PrivilegeArgs,
}

/// `stasis migrate NAME tcp:HOST:PORT|unix:PATH`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM's name.
    pub name: String,
    /// Where `stasis receive` listens: tcp:HOST:PORT, or unix:PATH for a
    /// local upgrade (a VM run with --memory-backend memfd hands its
    /// memory over and pauses only for its state; other RAM is copied).
    pub destination: stasis_vmm::migrate::MigrationAddress,
    /// live: memory is copied while the guest runs, in rounds, then the
    /// guest pauses briefly for the rest; warm: the guest is paused for
    /// the whole transfer.
    #[arg(long, default_value = "live", value_parser = ["live", "warm"])]
    pub mode: String,
    /// Live: switch over once the last round is expected to pause the
    /// guest for at most this long.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    pub max_downtime: u64,
    /// Live: give up (the VM runs on here) after this many rounds.
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub max_rounds: u32,
    /// Live: give up (the VM runs on here) after this long.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub max_time: u64,
    /// Live: never slow the vCPUs down (auto-converge throttles them step
    /// by step when the guest dirties memory faster than it can be sent).
    #[arg(long)]
    pub no_auto_converge: bool,
    /// Compress memory with zstd (level 1): fewer bytes on a slow link,
    /// more CPU on both sides; the receiver must be this version or newer.
    #[arg(long, default_value = "none", value_parser = ["none", "zstd"])]
    pub compress: String,
    /// Live: when pre-copy does not converge within the limits, switch to
    /// post-copy instead of failing: the destination runs the VM at once
    /// and pulls the pages it still lacks. From then on a lost link or a
    /// failed side LOSES THE VM.
    #[arg(long)]
    pub postcopy: bool,
    /// Live: switch to post-copy after N pre-copy rounds (implies
    /// --postcopy).
    #[arg(long, value_name = "N")]
    pub postcopy_after: Option<u32>,
    /// Connections memory travels on in parallel (1 to 16): more cores
    /// encrypt, checksum and copy on both sides.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub connections: u32,
    /// The key shared with the receiver (see `stasis receive --psk`); the
    /// VMM reads the file.
    #[arg(long, value_name = "FILE")]
    pub psk: Option<PathBuf>,
    /// Send without authentication to a receiver on loopback started with
    /// --insecure.
    #[arg(long, conflicts_with = "psk")]
    pub insecure: bool,
    /// Mutual TLS instead of a key.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print the migration report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Start the migration as a job and print its id at once.
    #[arg(long)]
    pub detach: bool,
}

/// `stasis verify DIR`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
}

/// `stasis inspect DIR`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// A VM name.
#[derive(Debug, Args)]
pub struct NameArg {
    /// The VM's name.
    pub name: String,
    /// Print the API's JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// `stasis run`: flags override the values of `--config`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A TOML file describing the VM (see docs/CONFIG.md).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// The VM's name (default: vm-<pid>).
    #[arg(long)]
    pub name: Option<String>,
    /// Number of vCPUs (default 1).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Guest memory: MiB, or with a unit such as 512M or 2G (default 256).
    #[arg(long, value_parser = parse_memory)]
    pub memory: Option<u64>,
    /// What backs guest RAM: anonymous (default; huge pages) or memfd (a
    /// memory file a local upgrade hands over without copying).
    #[arg(long, value_name = "BACKEND")]
    pub memory_backend: Option<stasis_config::MemoryBackend>,
    /// Kernel image: bzImage or ELF vmlinux.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Boot protocol: auto (PVH when the ELF has a PVH note), linux, pvh.
    #[arg(long)]
    pub boot: Option<BootProtocol>,
    /// CPU model: host (default), x86-64, x86-64-v2, x86-64-v3, x86-64-v4
    /// (see `stasis cpu-models`).
    #[arg(long, value_name = "MODEL")]
    pub cpu: Option<stasis_config::CpuModel>,
    /// Features to add to or remove from the CPU model, by their Linux
    /// /proc/cpuinfo names: +FEAT,-FEAT (e.g. +avx2,-popcnt).
    #[arg(long, value_name = "+FEAT,-FEAT", allow_hyphen_values = true)]
    pub cpu_features: Option<stasis_config::FeatureChanges>,
    /// Serial (COM1) output: stdout, null, file:PATH, socket:PATH.
    #[arg(long)]
    pub serial: Option<SerialConfig>,
    /// Control socket path (default: <runtime dir>/<name>.sock).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// A virtio disk on a raw image (repeatable). A flag with the id of a
    /// disk in --config replaces it.
    #[arg(long = "disk", value_name = "id=ID,path=PATH[,readonly=on]")]
    pub disks: Vec<DiskConfig>,
    /// A virtio network device on an existing tap (repeatable); the MAC
    /// defaults to one derived from the VM name and the id.
    #[arg(long = "net", value_name = "id=ID,tap=TAP[,mac=MAC]")]
    pub nets: Vec<NetConfig>,
    /// A virtio entropy device fed from getrandom(2) (repeatable).
    #[arg(long = "rng", value_name = "id=ID")]
    pub rngs: Vec<RngConfig>,
    /// A virtio console (repeatable); output: stdout (default), null,
    /// file:PATH, socket:PATH.
    #[arg(long = "console", value_name = "id=ID[,output=DEST]")]
    pub consoles: Vec<ConsoleConfig>,
    /// Print the resulting configuration as TOML and exit without running.
    #[arg(long)]
    pub print_config: bool,
    /// Confinement: seccomp filters and Landlock.
    #[command(flatten)]
    pub sandbox: crate::confinement::SandboxArgs,
    /// Who to become once the VM is set up.
    #[command(flatten)]
    pub privileges: crate::privileges::PrivilegeArgs,
}

/// `stasis demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Seconds to let the guest run before and after the pause.
    #[arg(long, default_value_t = 2)]
    pub seconds: u64,
    /// vCPUs for the demo guest (each runs the heartbeat).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// CPU model of the demo guest (a baseline model makes the snapshot
    /// portable across hosts; see `stasis cpu-models`).
    #[arg(long, default_value = "x86-64-v2")]
    pub cpu: stasis_config::CpuModel,
}

/// Parses `ID=VALUE`.
fn parse_id_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((id, v)) if !id.is_empty() && !v.is_empty() => Ok((id.to_string(), v.to_string())),
        _ => Err(format!("expected ID=VALUE, got '{s}'")),
    }
}

fn parse_memory(s: &str) -> Result<u64, String> {
    stasis_config::parse_size_mib(s).map_err(|e| e.to_string())
}
