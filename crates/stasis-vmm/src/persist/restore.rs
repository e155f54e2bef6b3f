//! Starting a VM from a snapshot: check, then build.
//!
//! [`prepare`] does every check that can fail before anything is created
//! (manifest, sections, configuration, CPU compatibility, memory layout);
//! [`load_memory`] maps or copies the memory image; [`crate::Vm::restore`]
//! builds the VM from both. A snapshot is never modified by restoring it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use stasis_config::{SerialConfig, VmConfig};
use stasis_snapshot::{SectionState, SectionWarning, SnapshotReader};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::compat::{self, CompatError};
use super::{CMOS, COM1, SINGLETON};
use crate::cpu::cpuid;
use crate::cpu::state::VcpuState;
use crate::devices::rtc::CmosRtcState;
use crate::devices::serial::SerialDeviceState;
use crate::devices::vmgenid::{VmGenId, VmGenIdState};
use crate::layout;
use crate::memory::{self, GuestRam};
use crate::vm::CapturedState;
use crate::vm_state::{ClockState, IrqchipState, PitState};

/// How guest memory comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    /// Map the memory image copy-on-write (`MAP_PRIVATE`): restore time does
    /// not grow with memory size; pages are read when the guest touches
    /// them. Several VMs can share one snapshot this way.
    #[default]
    Lazy,
    /// Copy the memory image into fresh (huge-page backed) memory first.
    Eager,
}

impl std::str::FromStr for RestoreMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lazy" => Ok(Self::Lazy),
            "eager" => Ok(Self::Eager),
            o => Err(format!(
                "unknown restore mode '{o}' (expected lazy or eager)"
            )),
        }
    }
}

/// What differs on the host the snapshot is restored on, and how careful
/// to be.
#[derive(Debug, Clone, Default)]
pub struct RestoreOverrides {
    /// Skip checking the memory image's checksums (faster lazy restores of
    /// large VMs, at the price of running a guest on damaged memory).
    pub skip_memory_verify: bool,
    /// A new VM name.
    pub name: Option<String>,
    /// A new API socket path.
    pub api_socket: Option<PathBuf>,
    /// A new serial destination.
    pub serial: Option<SerialConfig>,
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
    #[error("{0} (the saved configuration can be overridden on restore: --name, --api-socket, --serial)")]
    Invalid(#[from] stasis_config::ConfigError),
    /// A section the restore needs is missing.
    #[error("snapshot lacks required section '{name}' instance '{instance}'")]
    MissingSection {
        /// Section name.
        name: &'static str,
        /// Instance.
        instance: String,
    },
    /// This host cannot run the snapshot.
    #[error("this host cannot run the snapshot: {0}")]
    Incompatible(#[from] CompatError),
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
    /// The reader (keeps the memory file open).
    pub reader: SnapshotReader,
}

fn known_section(name: &str) -> Option<u32> {
    match name {
        n if n == VcpuState::NAME => Some(VcpuState::VERSION),
        n if n == IrqchipState::NAME => Some(IrqchipState::VERSION),
        n if n == PitState::NAME => Some(PitState::VERSION),
        n if n == ClockState::NAME => Some(ClockState::VERSION),
        n if n == SerialDeviceState::NAME => Some(SerialDeviceState::VERSION),
        n if n == CmosRtcState::NAME => Some(CmosRtcState::VERSION),
        n if n == VmGenIdState::NAME => Some(VmGenIdState::VERSION),
        _ => None,
    }
}

fn required<T: SectionState>(reader: &SnapshotReader, instance: &str) -> Result<T, RestoreError> {
    match reader.read_section::<T>(instance)? {
        Some((_, v)) => Ok(v),
        None => Err(RestoreError::MissingSection {
            name: T::NAME,
            instance: instance.to_string(),
        }),
    }
}

/// Opens and checks the snapshot in `dir` for a restore on this host.
pub fn prepare(
    dir: &std::path::Path,
    overrides: &RestoreOverrides,
) -> Result<RestorePlan, RestoreError> {
    let reader = SnapshotReader::open(dir)?;
    let warnings = reader.check_known(&known_section)?;
    if !overrides.skip_memory_verify {
        // Every section checksum is checked as it is read below; this
        // covers the memory image (and warms the page cache that a lazy
        // restore maps).
        reader.verify(|_, _| {})?.into_result()?;
    }
    let body = reader.body();
    let mut config: VmConfig = serde_json::from_value(body.vm_config.clone())
        .map_err(|e| RestoreError::Config(e.to_string()))?;
    if let Some(n) = &overrides.name {
        config.name = n.clone();
    }
    if let Some(p) = &overrides.api_socket {
        config.api_socket = Some(p.clone());
    }
    if let Some(s) = &overrides.serial {
        config.serial = s.clone();
    }
    config.validate_for_restore()?;

    // The memory regions must be exactly what this configuration maps.
    let want = layout::ram_ranges(config.memory_mib << 20);
    let got: Vec<(u64, u64)> = reader.regions().iter().map(|r| (r.gpa, r.size)).collect();
    if want != got {
        return Err(RestoreError::Layout(format!(
            "regions {got:x?} for {} MiB of RAM (expected {want:x?})",
            config.memory_mib
        )));
    }

    // CPU compatibility against what a new vCPU would get here.
    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| RestoreError::Kvm(format!("cannot open /dev/kvm: {e}")))?;
    let host = cpuid::effective_for_new_vcpu(&kvm, config.vcpus)
        .map_err(|e| RestoreError::Kvm(e.to_string()))?;
    compat::check(&body.cpu, &cpuid::vendor(&host), &host)?;
    let saved_xsave = reader
        .read_section::<VcpuState>("0")?
        .map(|(_, v)| v.xsave.len())
        .unwrap_or(0);
    let host_xsave = crate::vm::host_xsave_size(&kvm);
    if saved_xsave > host_xsave {
        return Err(CompatError::XsaveSize {
            saved: saved_xsave,
            host: host_xsave,
        }
        .into());
    }

    let vcpus = (0..config.vcpus)
        .map(|i| required::<VcpuState>(&reader, &i.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let vmgenid = match reader.read_section::<VmGenIdState>(SINGLETON)? {
        Some((_, v)) => v,
        None => VmGenId::new().save(),
    };
    let state = CapturedState {
        vcpus,
        irqchip: required(&reader, SINGLETON)?,
        pit: required(&reader, SINGLETON)?,
        clock: required(&reader, SINGLETON)?,
        serial: required(&reader, COM1)?,
        rtc: required(&reader, CMOS)?,
        vmgenid,
    };
    Ok(RestorePlan {
        config,
        state,
        warnings,
        reader,
    })
}

/// Guest memory for a restore, with how long loading it took.
pub fn load_memory(
    plan: &RestorePlan,
    mode: RestoreMode,
) -> Result<(GuestRam, Duration), RestoreError> {
    let started = Instant::now();
    let path = plan.reader.memory_file_path();
    let err = |message: String| RestoreError::Memory {
        path: path.clone(),
        message,
    };
    let mem = match mode {
        RestoreMode::Lazy => {
            let mut regions = Vec::new();
            for r in plan.reader.regions() {
                let file = plan
                    .reader
                    .memory_file()
                    .try_clone()
                    .map_err(|e| err(e.to_string()))?;
                let mapping = MmapRegionBuilder::new(r.size as usize)
                    .with_file_offset(FileOffset::new(file, r.file_offset))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                    .build()
                    .map_err(|e| err(format!("mmap of region {}: {e}", r.name)))?;
                regions.push(
                    GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
                        .ok_or_else(|| err(format!("region {} overflows", r.name)))?,
                );
            }
            GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))?
        }
        RestoreMode::Eager => {
            let mem = memory::allocate(plan.config.memory_mib).map_err(|e| err(e.to_string()))?;
            for (r, region) in plan
                .reader
                .regions()
                .iter()
                .zip(vm_memory::GuestMemoryBackend::iter(&mem))
            {
                // SAFETY: the region was just mapped by us, nothing else
                // refers to it yet, and its length is what we pass.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        region.as_ptr(),
                        vm_memory::GuestMemoryRegion::len(region) as usize,
                    )
                };
                plan.reader.read_region_into(r, dst, true)?;
            }
            mem
        }
    };
    Ok((mem, started.elapsed()))
}
