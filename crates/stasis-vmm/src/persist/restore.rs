//! Starting a VM from a snapshot: check, then build.
//!
//! [`prepare`] does every check that can fail before anything is created
//! (manifest, sections, configuration, CPU compatibility, memory layout);
//! [`load_memory`] maps, copies or starts filling guest memory (see
//! `super::load`); [`crate::Vm::restore`] builds the VM from both. A
//! snapshot is never modified by restoring it (a recorded working set is
//! a file of its own beside it).

pub use super::load::{load_memory, LoadOptions, LoadedMemory, RestoreMode, WorkingSetUse};

use std::path::PathBuf;

use stasis_config::{SerialConfig, VmConfig};
use stasis_snapshot::{SectionSource, SectionState, SectionWarning, SnapshotReader};

use super::compat::HostCheck;
use super::{CMOS, COM1, SINGLETON};
use crate::cpu::setup::RestoreCpu;
use crate::cpu::state::VcpuState;
use crate::devices::rtc::CmosRtcState;
use crate::devices::serial::SerialDeviceState;
use crate::devices::virtio::state::{
    VirtioBlkState, VirtioConsoleState, VirtioDeviceState, VirtioNetState, VirtioRngState,
};
use crate::devices::vmgenid::{VmGenId, VmGenIdState};
use crate::layout;
use crate::vm::CapturedState;
use crate::vm_state::{ClockState, IrqchipState, PitState};

/// What differs on the host the snapshot is restored on, and how careful
/// to be.
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    /// Restore on a host whose TSC runs at another rate and cannot scale
    /// the guest's (guest time then drifts).
    pub allow_tsc_mismatch: bool,
    /// A new VM name.
    pub name: Option<String>,
    /// A new API socket path.
    pub api_socket: Option<PathBuf>,
    /// A new serial destination.
    pub serial: Option<SerialConfig>,
    /// New image files for disks, by disk id (`--disk-path ID=PATH`).
    pub disk_paths: Vec<(String, PathBuf)>,
    /// New taps for network devices, by device id (`--tap ID=TAP`).
    pub taps: Vec<(String, String)>,
    /// New output destinations for consoles, by device id
    /// (`--console-path ID=DEST`): `stdout`, `null`, `file:PATH`,
    /// `socket:PATH`, or a bare path that replaces the path of a file or
    /// socket destination (and means `file:PATH` otherwise).
    pub console_outputs: Vec<(String, String)>,
    /// Formats of the images given by `disk_paths`, by disk id, where
    /// they differ from the saved ones (a checkpoint restore puts a raw
    /// disk on a qcow2 overlay).
    pub disk_formats: Vec<(String, stasis_disk::DiskFormat)>,
    /// The disks were brought back by a checkpoint restore
    /// ([`super::checkpoint::revert::prepare_disks`]): the snapshot's own
    /// disk records are not checked.
    pub checkpoint_disks: bool,
}

/// Ways a restore can fail before any VM exists.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot could not be read.
    #[error(transparent)]
    Format(#[from] stasis_snapshot::Error),
    /// The manifest's VM configuration is not one stasis understands.
    #[error("snapshot's VM configuration cannot be read: {0}")]
    Config(String),
    /// The configuration (after overrides) is invalid.
    #[error("{0} (the saved configuration can be overridden on restore: --name, --api-socket, --serial, --disk-path, --tap, --console-path)")]
    Invalid(#[from] stasis_config::ConfigError),
    /// An override names a device the snapshot does not have.
    #[error("{flag} {id}=...: the snapshot has no {kind} with id '{id}' (it has: {known})")]
    UnknownDevice {
        /// The flag.
        flag: &'static str,
        /// The id given.
        id: String,
        /// `disk`, `net` or `console`.
        kind: &'static str,
        /// The ids of that kind in the snapshot.
        known: String,
    },
    /// A device's backend cannot be used for the restore.
    #[error("{kind} '{id}': {message}")]
    Backend {
        /// `disk`, `net` or `console`.
        kind: &'static str,
        /// The device id.
        id: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The saved state is not one a real VM can be in, or its sections
    /// and its configuration disagree.
    #[error("the snapshot's state is impossible: {0}")]
    InvalidState(String),
    /// An output destination cannot be used.
    #[error("{what} output to {dest}: {message}")]
    Output {
        /// `serial` or `console 'ID'`.
        what: String,
        /// The destination.
        dest: String,
        /// Why not, and what to do.
        message: String,
    },
    /// A section the restore needs is missing.
    #[error("snapshot lacks required section '{name}' instance '{instance}'")]
    MissingSection {
        /// Section name.
        name: &'static str,
        /// Instance.
        instance: String,
    },
    /// This host cannot run the snapshot (every reason, at once).
    #[error("this host cannot run the snapshot: {}", .0.message())]
    Incompatible(stasis_cpu::CompatReport),
    /// KVM could not be asked what it supports.
    #[error("cannot query KVM: {0}")]
    Kvm(String),
    /// The memory regions do not match the configuration.
    #[error("snapshot memory layout does not match its configuration: {0}")]
    Layout(String),
    /// Guest memory could not be mapped or read.
    #[error("cannot load guest memory from {path}: {message}")]
    Memory {
        /// The memory image.
        path: PathBuf,
        /// What happened.
        message: String,
    },
}

/// A checked snapshot, ready to be turned into a VM.
pub struct RestorePlan {
    /// The configuration with overrides applied.
    pub config: VmConfig,
    /// The saved state.
    pub state: CapturedState,
    /// Optional sections this stasis does not know (skipped).
    pub warnings: Vec<SectionWarning>,
    /// The reader of the snapshot restored (its sections).
    pub reader: SnapshotReader,
    /// It and, for a diff snapshot, its parents back to a full snapshot
    /// (guest memory is composed from them).
    pub chain: std::sync::Arc<stasis_snapshot::SnapshotChain>,
    /// How the vCPUs go back on this host.
    pub cpu: RestoreCpu,
    /// What the host check found (TSC plan, MSRs left out).
    pub check: HostCheck,
    /// One line for each output destination taken from the snapshot.
    pub outputs: Vec<String>,
}

impl RestorePlan {
    /// Builds the VM from this plan and the memory [`load_memory`] gave
    /// for it (see [`crate::Vm::restore`]).
    pub fn build_vm(&self, memory: LoadedMemory) -> Result<crate::Vm, crate::VmError> {
        crate::Vm::restore(
            &self.config,
            memory.memory,
            memory.fill,
            &self.state,
            &self.cpu,
        )
    }
}

use super::disks::{check_restore_image, DiskImageState};

/// The newest version of section `name` this stasis restores, or `None`
/// for a section it does not know.
pub fn known_section(name: &str) -> Option<u32> {
    match name {
        n if n == VcpuState::NAME => Some(VcpuState::VERSION),
        n if n == IrqchipState::NAME => Some(IrqchipState::VERSION),
        n if n == PitState::NAME => Some(PitState::VERSION),
        n if n == ClockState::NAME => Some(ClockState::VERSION),
        n if n == SerialDeviceState::NAME => Some(SerialDeviceState::VERSION),
        n if n == CmosRtcState::NAME => Some(CmosRtcState::VERSION),
        n if n == VmGenIdState::NAME => Some(VmGenIdState::VERSION),
        n if n == VirtioBlkState::NAME => Some(VirtioBlkState::VERSION),
        n if n == VirtioNetState::NAME => Some(VirtioNetState::VERSION),
        n if n == VirtioRngState::NAME => Some(VirtioRngState::VERSION),
        n if n == VirtioConsoleState::NAME => Some(VirtioConsoleState::VERSION),
        n if n == DiskImageState::NAME => Some(DiskImageState::VERSION),
        _ => None,
    }
}

fn required<T: SectionState, S: SectionSource>(
    reader: &S,
    instance: &str,
) -> Result<T, RestoreError> {
    match stasis_snapshot::read_section::<T, S>(reader, instance)? {
        Some((_, v)) => Ok(v),
        None => Err(RestoreError::MissingSection {
            name: T::NAME,
            instance: instance.to_string(),
        }),
    }
}

/// Opens and checks the snapshot in `dir` for a restore on this host: the
/// manifest, every section (their checksums), the configuration, the CPU;
/// guest memory is checked by [`load_memory`], when and as the restore
/// mode reads it.
pub fn prepare(
    dir: &std::path::Path,
    overrides: &RestoreOverrides,
) -> Result<RestorePlan, RestoreError> {
    let reader = SnapshotReader::open(dir)?;
    // A diff snapshot's parents, each link checked (a missing, changed or
    // foreign parent is refused by name).
    let chain = stasis_snapshot::SnapshotChain::open(dir)?;
    // Both must be the same snapshot (another may have replaced it between
    // the two opens): state and memory must never come from two.
    let (a, b) = (reader.manifest(), chain.newest().manifest());
    if a.body_crc32c != b.body_crc32c || a.body.snapshot_id != b.body.snapshot_id {
        return Err(RestoreError::Format(stasis_snapshot::Error::Usage(
            format!(
                "the snapshot at {} was replaced while it was being opened; try again",
                dir.display()
            ),
        )));
    }
    let warnings = reader.check_known(&known_section)?;
    let config = saved_config(&reader, overrides)?;
    let outputs = super::outputs::check(&config, overrides, Some(dir))?;
    let vcpus = saved_vcpus(&reader, &config)?;
    // Whether this host can run it, before the (long) memory check.
    let check = check_host(&reader.body().cpu, &vcpus, overrides.allow_tsc_mismatch)?;
    if !check.report.is_ok() {
        return Err(RestoreError::Incompatible(check.report));
    }
    if let Some(stasis_cpu::TscPlan::Mismatch {
        saved_khz,
        host_khz,
    }) = check.report.tsc
    {
        tracing::warn!(
            "the guest's TSC ran at {saved_khz} kHz and this host's runs at {host_khz} kHz without scaling; restoring anyway (--allow-tsc-mismatch): time the guest derives from its TSC will drift"
        );
    }
    let disk_dir = (!overrides.checkpoint_disks).then(|| reader.dir());
    let state = state_from_sections(&reader, &config, vcpus, disk_dir)?;
    let cpu = check.restore_cpu(reader.body().cpu.guest.clone());
    Ok(RestorePlan {
        config,
        state,
        warnings,
        reader,
        chain: std::sync::Arc::new(chain),
        cpu,
        check,
        outputs,
    })
}

/// The rest of a VM's state once its vCPUs are read: the VM-wide and
/// device sections of `sections` (a snapshot's, or those a migration
/// received) for `config`, each device's backend checked. `snapshot_dir`
/// is the snapshot's directory, where disks saved with it are.
pub fn state_from_sections<S: SectionSource>(
    sections: &S,
    config: &VmConfig,
    vcpus: Vec<VcpuState>,
    snapshot_dir: Option<&std::path::Path>,
) -> Result<CapturedState, RestoreError> {
    let vmgenid = match stasis_snapshot::read_section::<VmGenIdState, S>(sections, SINGLETON)? {
        Some((_, v)) => v,
        None => VmGenId::new().save(),
    };
    if vmgenid.generation == u64::MAX {
        return Err(RestoreError::InvalidState(format!(
            "vmgenid generation {} cannot be advanced",
            vmgenid.generation
        )));
    }
    let virtio = read_virtio_states(sections, config, snapshot_dir)?;
    Ok(CapturedState {
        vcpus,
        irqchip: required(sections, SINGLETON)?,
        pit: required(sections, SINGLETON)?,
        clock: required(sections, SINGLETON)?,
        serial: required(sections, COM1)?,
        rtc: required(sections, CMOS)?,
        vmgenid,
        virtio,
    })
}

/// A saved configuration (a snapshot manifest's or a migration's
/// `vm_config`) with the caller's overrides, validated for a restore.
pub fn configure(
    vm_config: &serde_json::Value,
    overrides: &RestoreOverrides,
) -> Result<VmConfig, RestoreError> {
    if let Some(path) = control_characters(vm_config, "vm_config") {
        return Err(RestoreError::Config(format!(
            "{path} contains control characters"
        )));
    }
    let mut config: VmConfig =
        stasis_snapshot::text::from_json_value(vm_config.clone()).map_err(RestoreError::Config)?;
    // Every saved disk names its format since stasis had more than one;
    // a disk saved without one was raw, and is never probed (its guest
    // could have written a qcow2 header into it).
    for d in config.disk.iter_mut() {
        d.format.get_or_insert(stasis_disk::DiskFormat::Raw);
    }
    if let Some(n) = &overrides.name {
        config.name = n.clone();
    }
    if let Some(p) = &overrides.api_socket {
        config.api_socket = Some(p.clone());
    }
    if let Some(s) = &overrides.serial {
        config.serial = s.clone();
    }
    apply_device_overrides(&mut config, overrides)?;
    config.validate_for_restore()?;
    Ok(config)
}

/// The saved configuration with the caller's overrides, validated, and
/// checked against the memory layout.
fn saved_config(
    reader: &SnapshotReader,
    overrides: &RestoreOverrides,
) -> Result<VmConfig, RestoreError> {
    let config = configure(&reader.body().vm_config, overrides)?;
    // The memory regions must be exactly what this configuration maps.
    let want = layout::ram_ranges(config.memory_mib << 20);
    let got: Vec<(u64, u64)> = reader.regions().iter().map(|r| (r.gpa, r.size)).collect();
    if want != got {
        return Err(RestoreError::Layout(format!(
            "regions {got:x?} for {} MiB of RAM (expected {want:x?})",
            config.memory_mib
        )));
    }
    Ok(config)
}

/// The path of the first string in `v` (keys included) that holds a
/// control character, which would reach a terminal when shown.
fn control_characters(v: &serde_json::Value, path: &str) -> Option<String> {
    let bad = |s: &str| s.chars().any(char::is_control);
    match v {
        serde_json::Value::String(s) if bad(s) => Some(path.to_string()),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| control_characters(x, &format!("{path}[{i}]"))),
        serde_json::Value::Object(o) => o.iter().find_map(|(k, x)| {
            if bad(k) {
                Some(format!("a key of {path}"))
            } else {
                control_characters(x, &format!("{path}.{k}"))
            }
        }),
        _ => None,
    }
}

/// Every vCPU section the configuration needs, each checked against what
/// a real vCPU can be in ([`crate::cpu::invariants`]); a vCPU section the
/// configuration does not have is refused, not ignored.
pub fn saved_vcpus<S: SectionSource>(
    reader: &S,
    config: &VmConfig,
) -> Result<Vec<VcpuState>, RestoreError> {
    for e in reader
        .entries()
        .iter()
        .filter(|e| e.name == VcpuState::NAME)
    {
        let known = e
            .instance
            .parse::<u32>()
            .ok()
            .filter(|&i| i < config.vcpus && i.to_string() == e.instance);
        if known.is_none() {
            return Err(RestoreError::InvalidState(format!(
                "vCPU section {} is not one of the configuration's {} vCPUs (0 to {})",
                stasis_snapshot::text::quoted(&e.instance),
                config.vcpus,
                config.vcpus.saturating_sub(1)
            )));
        }
    }
    (0..config.vcpus)
        .map(|i| {
            let v = required::<VcpuState, S>(reader, &i.to_string())?;
            crate::cpu::invariants::check(&v, i)
                .map_err(|e| RestoreError::InvalidState(format!("vCPU {i}: {e}")))?;
            Ok(v)
        })
        .collect()
}

/// Probes this host and checks a saved CPU (the record `cpu` and the
/// vCPUs) against it.
pub fn check_host(
    cpu: &stasis_snapshot::CpuInfo,
    vcpus: &[VcpuState],
    allow_tsc_mismatch: bool,
) -> Result<HostCheck, RestoreError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| {
        RestoreError::Kvm(format!(
            "cannot open /dev/kvm: {e} (is KVM available on this host, and may this user use it?)"
        ))
    })?;
    HostCheck::run(&kvm, cpu, vcpus, allow_tsc_mismatch)
        .map_err(|e| RestoreError::Kvm(e.to_string()))
}

/// What `stasis check` reports: the snapshot's CPU and what this host
/// says about it.
pub struct SnapshotCheck {
    /// The snapshot's saved configuration.
    pub config: VmConfig,
    /// The saved record of the guest's CPU (none before CPU models).
    pub guest_cpu: Option<stasis_snapshot::GuestCpuRecord>,
    /// The CPU vendor the snapshot was taken on.
    pub vendor: String,
    /// This host and the compatibility report.
    pub check: HostCheck,
}

/// Answers "can this host run the snapshot in `dir`?" without creating a
/// VM: reads the manifest, the configuration and the vCPU sections (their
/// checksums are checked; the memory image's are not, see `verify`), and
/// checks them against this host.
pub fn check_snapshot(
    dir: &std::path::Path,
    allow_tsc_mismatch: bool,
) -> Result<SnapshotCheck, RestoreError> {
    let reader = SnapshotReader::open(dir)?;
    // Where output goes is this host's business and overridable on
    // restore: not part of "can this host run it".
    let consoles: Vec<(String, String)> =
        serde_json::from_value::<VmConfig>(reader.body().vm_config.clone())
            .map(|c| {
                c.console
                    .iter()
                    .map(|c| (c.id.clone(), "null".into()))
                    .collect()
            })
            .unwrap_or_default();
    let overrides = RestoreOverrides {
        serial: Some(SerialConfig::Null),
        console_outputs: consoles,
        ..Default::default()
    };
    let config = saved_config(&reader, &overrides)?;
    let vcpus = saved_vcpus(&reader, &config)?;
    let check = check_host(&reader.body().cpu, &vcpus, allow_tsc_mismatch)?;
    Ok(SnapshotCheck {
        config,
        guest_cpu: reader.body().cpu.guest.clone(),
        vendor: reader.body().cpu.vendor.clone(),
        check,
    })
}

/// Applies `--disk-path`, `--tap` and `--console-path` to the saved
/// configuration; an id the snapshot does not have is an error.
fn apply_device_overrides(
    config: &mut VmConfig,
    overrides: &RestoreOverrides,
) -> Result<(), RestoreError> {
    fn unknown<'a>(
        flag: &'static str,
        kind: &'static str,
        id: &str,
        ids: impl Iterator<Item = &'a String>,
    ) -> RestoreError {
        let known: Vec<&str> = ids.map(String::as_str).collect();
        RestoreError::UnknownDevice {
            flag,
            id: id.to_string(),
            kind,
            known: if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
        }
    }
    for (id, path) in &overrides.disk_paths {
        match config.disk.iter_mut().find(|d| &d.id == id) {
            Some(d) => d.path = path.clone(),
            None => {
                return Err(unknown(
                    "--disk-path",
                    "disk",
                    id,
                    config.disk.iter().map(|d| &d.id),
                ))
            }
        }
    }
    for (id, format) in &overrides.disk_formats {
        if let Some(d) = config.disk.iter_mut().find(|d| &d.id == id) {
            d.format = Some(*format);
        }
    }
    for (id, tap) in &overrides.taps {
        match config.net.iter_mut().find(|n| &n.id == id) {
            Some(n) => n.tap = tap.clone(),
            None => {
                return Err(unknown(
                    "--tap",
                    "net",
                    id,
                    config.net.iter().map(|n| &n.id),
                ))
            }
        }
    }
    for (id, dest) in &overrides.console_outputs {
        let Some(c) = config.console.iter_mut().find(|c| &c.id == id) else {
            return Err(unknown(
                "--console-path",
                "console",
                id,
                config.console.iter().map(|c| &c.id),
            ));
        };
        c.output = match dest.parse::<SerialConfig>() {
            Ok(o) => o,
            Err(_) => match &c.output {
                SerialConfig::Socket { .. } => SerialConfig::Socket { path: dest.into() },
                _ => SerialConfig::File { path: dest.into() },
            },
        };
    }
    Ok(())
}

/// Reads the section of every virtio device the configuration names, and
/// checks that each backend can be had: disk images exist with their saved
/// size, taps can be attached.
fn read_virtio_states<S: SectionSource>(
    reader: &S,
    config: &VmConfig,
    snapshot_dir: Option<&std::path::Path>,
) -> Result<Vec<VirtioDeviceState>, RestoreError> {
    use stasis_config::VirtioDeviceRef as D;
    let mut out = Vec::new();
    for d in config.virtio_devices() {
        let state = match d {
            D::Disk(disk) => {
                let s: VirtioBlkState = required(reader, &disk.id)?;
                let err = |message: String| RestoreError::Backend {
                    kind: "disk",
                    id: disk.id.clone(),
                    message,
                };
                let size = match std::fs::metadata(&disk.path) {
                    Ok(m) if m.is_file() => {
                        let format = match disk.format {
                            Some(f) => Ok(f),
                            None => stasis_disk::detect_format(&disk.path),
                        };
                        format
                            .and_then(|f| stasis_disk::virtual_size(&disk.path, f))
                            .map_err(|e| err(format!("disk image {}: {e}", disk.path.display())))?
                    }
                    Ok(_) => {
                        return Err(err(format!(
                            "{} is not a regular file",
                            disk.path.display()
                        )))
                    }
                    Err(e) => {
                        return Err(err(format!(
                            "disk image {}: {e} (give another with --disk-path {}=PATH)",
                            disk.path.display(),
                            disk.id
                        )))
                    }
                };
                if size != s.size {
                    return Err(err(format!(
                        "disk image {} is {size} bytes, but the snapshot was taken with a {}-byte image (is it the same disk?)",
                        disk.path.display(),
                        s.size
                    )));
                }
                // Snapshots since disks were saved with them say how, and
                // what the image must be (older ones: size only).
                let saved = match snapshot_dir {
                    Some(dir) => {
                        stasis_snapshot::read_section::<DiskImageState, S>(reader, &disk.id)?
                            .map(|(_, saved)| (saved, dir))
                    }
                    None => None,
                };
                if let Some((saved, dir)) = saved {
                    match check_restore_image(&saved, &disk.path, dir) {
                        Ok(None) => {}
                        Ok(Some(warning)) => tracing::warn!("{warning}"),
                        Err(m) => return Err(err(m)),
                    }
                }
                if disk.readonly != s.readonly {
                    return Err(err(format!(
                        "saved as {}, configured as {}",
                        if s.readonly { "read-only" } else { "writable" },
                        if disk.readonly {
                            "read-only"
                        } else {
                            "writable"
                        }
                    )));
                }
                VirtioDeviceState::Blk(s)
            }
            D::Net(net) => {
                let s: VirtioNetState = required(reader, &net.id)?;
                crate::devices::virtio::probe_tap(&net.tap).map_err(|m| RestoreError::Backend {
                    kind: "net",
                    id: net.id.clone(),
                    message: format!("{m} (give another with --tap {}=TAP)", net.id),
                })?;
                VirtioDeviceState::Net(s)
            }
            D::Rng(r) => VirtioDeviceState::Rng(required(reader, &r.id)?),
            D::Console(c) => VirtioDeviceState::Console(required(reader, &c.id)?),
        };
        out.push(state);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stasis_config::{ConsoleConfig, DiskConfig, NetConfig};

    fn config() -> VmConfig {
        let mut c = VmConfig::new("v", "/k");
        c.disk.push(DiskConfig {
            id: "root".into(),
            path: "/old.img".into(),
            readonly: false,
            format: None,
        });
        c.net.push(NetConfig {
            id: "eth0".into(),
            tap: "tap0".into(),
            mac: None,
        });
        c.console.push(ConsoleConfig {
            id: "con0".into(),
            output: SerialConfig::Socket {
                path: "/run/c.sock".into(),
            },
        });
        c.console.push(ConsoleConfig {
            id: "con1".into(),
            output: SerialConfig::Stdout,
        });
        c
    }

    #[test]
    fn device_overrides_apply_by_id() {
        let mut c = config();
        let o = RestoreOverrides {
            disk_paths: vec![("root".into(), "/new.img".into())],
            taps: vec![("eth0".into(), "tap5".into())],
            console_outputs: vec![
                ("con0".into(), "/run/new.sock".into()),
                ("con1".into(), "/var/log/con1.log".into()),
            ],
            ..Default::default()
        };
        apply_device_overrides(&mut c, &o).unwrap();
        assert_eq!(c.disk[0].path, PathBuf::from("/new.img"));
        assert_eq!(c.net[0].tap, "tap5");
        assert_eq!(
            c.console[0].output,
            SerialConfig::Socket {
                path: "/run/new.sock".into()
            }
        );
        assert_eq!(
            c.console[1].output,
            SerialConfig::File {
                path: "/var/log/con1.log".into()
            }
        );
        let o = RestoreOverrides {
            console_outputs: vec![("con0".into(), "null".into())],
            ..Default::default()
        };
        apply_device_overrides(&mut c, &o).unwrap();
        assert_eq!(c.console[0].output, SerialConfig::Null);
    }

    #[test]
    fn unknown_override_ids_are_refused() {
        let mut c = config();
        let o = RestoreOverrides {
            disk_paths: vec![("data".into(), "/x".into())],
            ..Default::default()
        };
        let e = apply_device_overrides(&mut c, &o).unwrap_err().to_string();
        assert_eq!(
            e,
            "--disk-path data=...: the snapshot has no disk with id 'data' (it has: root)"
        );
        let o = RestoreOverrides {
            taps: vec![("eth1".into(), "tap1".into())],
            ..Default::default()
        };
        assert!(apply_device_overrides(&mut c, &o).is_err());
        c.console.clear();
        let o = RestoreOverrides {
            console_outputs: vec![("c".into(), "stdout".into())],
            ..Default::default()
        };
        let e = apply_device_overrides(&mut c, &o).unwrap_err().to_string();
        assert!(e.ends_with("(it has: none)"), "{e}");
    }
}
