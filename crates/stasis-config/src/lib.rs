//! VM configuration for stasis: the model, its TOML form, and validation.
//!
//! A VM is described by a [`VmConfig`]. It can come from a TOML file
//! ([`VmConfig::from_toml_str`]) or be assembled from command-line flags by
//! the CLI; either way [`VmConfig::validate`] checks it before any KVM work
//! starts, so a bad configuration fails early with an error that names the
//! offending key. Nothing here needs `/dev/kvm`.

mod serial;
mod size;
mod virtio;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use serial::{SerialConfig, SerialParseError};
pub use size::{parse_size_mib, SizeParseError};
pub use stasis_cpu::{CpuModel, CpuSpec, FeatureChanges};
pub use virtio::{
    check_disk_file, validate_device_id, validate_tap_name, ConsoleConfig, DeviceParseError,
    DiskConfig, MacAddr, NetConfig, RngConfig, VirtioDeviceRef, MAX_DEVICE_ID_LEN,
    MAX_TAP_NAME_LEN, MAX_VIRTIO_DEVICES,
};

/// The smallest guest memory stasis accepts, in MiB.
///
/// The boot structures (zero page, page tables, ACPI, MP table) live below
/// 1 MiB and kernels load at 1 MiB; below 16 MiB nothing useful fits.
pub const MIN_MEMORY_MIB: u64 = 16;

/// The largest guest memory stasis accepts, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// The largest vCPU count the configuration accepts. The VMM further checks
/// the limit that KVM reports on the host (`KVM_CAP_MAX_VCPUS`).
pub const MAX_VCPUS: u32 = 254;

/// The default kernel command line when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// What backs guest RAM on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MemoryBackend {
    /// Private anonymous memory, with transparent huge pages.
    #[default]
    Anonymous,
    /// A shared memory file (`memfd_create`): another process can be given
    /// it, so a local upgrade hands RAM over without copying it. Backed by
    /// 4 KiB pages unless the host enables huge pages for shared memory
    /// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled`).
    Memfd,
}

impl MemoryBackend {
    fn is_default(&self) -> bool {
        *self == Self::Anonymous
    }
}

impl std::str::FromStr for MemoryBackend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "anonymous" => Ok(Self::Anonymous),
            "memfd" => Ok(Self::Memfd),
            other => Err(format!(
                "unknown memory backend '{other}' (expected anonymous or memfd)"
            )),
        }
    }
}

impl std::fmt::Display for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Anonymous => "anonymous",
            Self::Memfd => "memfd",
        })
    }
}

/// How the kernel image is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// PVH if the image is an ELF with a PVH entry note, otherwise the Linux
    /// 64-bit boot protocol.
    #[default]
    Auto,
    /// The Linux x86_64 boot protocol (64-bit entry with a zero page), for
    /// bzImage and ELF `vmlinux` images.
    Linux,
    /// The PVH entry (32-bit protected mode, `hvm_start_info`); ELF only.
    Pvh,
}

impl std::str::FromStr for BootProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "linux" => Ok(Self::Linux),
            "pvh" => Ok(Self::Pvh),
            other => Err(format!(
                "unknown boot protocol '{other}' (expected auto, linux or pvh)"
            )),
        }
    }
}

impl std::fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Linux => "linux",
            Self::Pvh => "pvh",
        })
    }
}

/// The complete description of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The VM's name: the key under which `stasis status NAME` finds it.
    pub name: String,
    /// Number of vCPUs; each runs on its own host thread.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// The CPU model the guest sees (`host`, `x86-64`, `x86-64-v2`,
    /// `x86-64-v3`, `x86-64-v4`); see docs/CPU-MODELS.md.
    #[serde(default, skip_serializing_if = "is_host")]
    pub cpu: CpuModel,
    /// Features added to or removed from the model: `["+avx2", "-popcnt"]`
    /// or `"+avx2,-popcnt"` (Linux `/proc/cpuinfo` names).
    #[serde(default, skip_serializing_if = "FeatureChanges::is_empty")]
    pub cpu_features: FeatureChanges,
    /// Guest memory in MiB. In TOML, `memory = 512` (MiB) or
    /// `memory = "2G"`.
    #[serde(
        rename = "memory",
        with = "size::mib_serde",
        default = "default_memory"
    )]
    pub memory_mib: u64,
    /// What backs guest RAM on the host: `anonymous` (default; private
    /// memory with transparent huge pages) or `memfd` (a memory file that
    /// a local upgrade hands to the new stasis process instead of copying
    /// it; see docs/MIGRATION.md).
    #[serde(default, skip_serializing_if = "MemoryBackend::is_default")]
    pub memory_backend: MemoryBackend,
    /// The kernel image: a bzImage or an ELF `vmlinux`.
    pub kernel: PathBuf,
    /// The kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// An initial ramdisk, if any.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// How to enter the kernel.
    #[serde(default)]
    pub boot: BootProtocol,
    /// Where the guest's COM1 goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// The control socket; defaults to `<runtime dir>/<name>.sock`.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// virtio-blk disks (`[[disk]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk: Vec<DiskConfig>,
    /// virtio-net interfaces (`[[net]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// virtio-rng entropy sources (`[[rng]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rng: Vec<RngConfig>,
    /// virtio-console consoles (`[[console]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub console: Vec<ConsoleConfig>,
}

fn is_host(m: &CpuModel) -> bool {
    *m == CpuModel::Host
}

fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

/// Everything that can be wrong with a configuration. Each message names the
/// key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or has unknown or mistyped keys.
    #[error("invalid config{}: {message}", path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Parse {
        /// The file, if the config came from one.
        path: Option<PathBuf>,
        /// What the TOML parser said (includes line and column).
        message: String,
    },
    /// `name` is not a valid VM name.
    #[error("invalid VM name '{name}': {reason}")]
    Name {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `vcpus` is zero or too large.
    #[error("vcpus = {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    /// `memory` is below the minimum or above the maximum.
    #[error(
        "memory = {0} MiB: must be at least {MIN_MEMORY_MIB} MiB and at most {MAX_MEMORY_MIB} MiB"
    )]
    Memory(u64),
    /// A file named by the config does not exist or is not a regular file.
    #[error("{key} = {path}: {problem}")]
    File {
        /// The key (`kernel`, `initrd`).
        key: &'static str,
        /// The path given.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The command line is too long or contains a NUL byte.
    #[error("cmdline: {0}")]
    Cmdline(String),
    /// The serial configuration is incomplete.
    #[error("serial: {0}")]
    Serial(String),
    /// A virtio device is misconfigured.
    #[error("{kind} '{id}': {problem}")]
    Device {
        /// `disk`, `net`, `rng` or `console`.
        kind: &'static str,
        /// The device's id as given.
        id: String,
        /// What is wrong.
        problem: String,
    },
    /// More virtio devices than the VM has slots for.
    #[error("{0} virtio devices (disks, nets, rngs and consoles together): at most {MAX_VIRTIO_DEVICES} are supported")]
    TooManyDevices(usize),
}

/// The longest command line accepted (the Linux boot protocol's limit on
/// current kernels is 2048 bytes including the terminating NUL, larger with
/// `cmdline_size`; PVH has no fixed limit). 4095 bytes plus NUL fits one page.
pub const MAX_CMDLINE_LEN: usize = 4095;

impl VmConfig {
    /// A configuration with defaults for everything but the name and kernel.
    pub fn new(name: impl Into<String>, kernel: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            vcpus: default_vcpus(),
            cpu: CpuModel::Host,
            cpu_features: FeatureChanges::default(),
            memory_mib: default_memory(),
            memory_backend: MemoryBackend::Anonymous,
            kernel: kernel.into(),
            cmdline: default_cmdline(),
            initrd: None,
            boot: BootProtocol::Auto,
            serial: SerialConfig::default(),
            api_socket: None,
            disk: Vec::new(),
            net: Vec::new(),
            rng: Vec::new(),
            console: Vec::new(),
        }
    }

    /// Parses a TOML document. Unknown keys are errors.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: None,
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Reads and parses a TOML file. Relative paths inside the file are taken
    /// relative to the file's directory.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::from_toml_str(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: Some(path.to_path_buf()),
                message,
            },
            other => other,
        })?;
        if let Some(base) = path.parent() {
            cfg.resolve_relative_paths(base);
        }
        Ok(cfg)
    }

    fn resolve_relative_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.kernel);
        if let Some(p) = self.initrd.as_mut() {
            fix(p);
        }
        if let Some(p) = self.api_socket.as_mut() {
            fix(p);
        }
        let fix_output = |o: &mut SerialConfig| match o {
            SerialConfig::File { path } | SerialConfig::Socket { path } => fix(path),
            SerialConfig::Stdout | SerialConfig::Null => {}
        };
        fix_output(&mut self.serial);
        for d in &mut self.disk {
            fix(&mut d.path);
        }
        for c in &mut self.console {
            fix_output(&mut c.output);
        }
    }

    /// Checks everything that can be checked without KVM: name, sizes, that
    /// the kernel, initrd and disk images exist, the command line, the
    /// virtio devices.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_for_restore()?;
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        self.validate_devices(true)?;
        Ok(())
    }

    /// The checks that apply to a VM restored from a snapshot: as
    /// [`VmConfig::validate`], except that the kernel and initrd files need
    /// not exist any more (their contents are in the saved memory). Disk
    /// images are checked by the restore itself, against the saved sizes.
    pub fn validate_for_restore(&self) -> Result<(), ConfigError> {
        validate_name(&self.name)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::Cmdline(format!(
                "{} bytes is longer than the limit of {MAX_CMDLINE_LEN}",
                self.cmdline.len()
            )));
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::Cmdline("contains a NUL byte".into()));
        }
        self.serial.validate().map_err(ConfigError::Serial)?;
        self.validate_devices(false)?;
        Ok(())
    }

    /// The CPU model with its feature changes.
    pub fn cpu_spec(&self) -> CpuSpec {
        CpuSpec {
            model: self.cpu,
            changes: self.cpu_features.clone(),
        }
    }

    /// The configuration as TOML text (what `stasis run --config` reads).
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("VmConfig always serializes")
    }
}

/// Checks a VM name: 1-64 characters of `[A-Za-z0-9._-]`, not starting with
/// `.` or `-` (names become socket file names).
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let err = |reason| {
        Err(ConfigError::Name {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return err("must not be empty");
    }
    if name.len() > 64 {
        return err("must be at most 64 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return err("must not start with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return err("may contain only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn check_file(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    let problem = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => return Ok(()),
        Ok(_) => "is not a regular file".to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no such file".to_string(),
        Err(e) => e.to_string(),
    };
    Err(ConfigError::File {
        key,
        path: path.to_path_buf(),
        problem,
    })
}

#[cfg(test)]
mod tests;
