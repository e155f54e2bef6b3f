//! CPUID through KVM: what this host offers ([`probe_host`]), and setting
//! a model's CPUID on vCPUs ([`set_for_vcpu`]). The decisions (which
//! leaves and bits a model has) are `stasis-cpu`'s; this module feeds it
//! what KVM reports and reads back what KVM really applied.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use stasis_cpu::{cpuid as model_cpuid, FeatureSet, HostCpu};

use crate::cpu::state::{self, leaf_from_kvm, leaf_to_kvm, CpuidLeaf};

/// Errors while building or setting CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
    /// The probe VM could not be created or queried.
    #[error("probing what a new vCPU gets on this host failed: {0}")]
    Probe(kvm_ioctls::Error),
    /// Setting or reading a vCPU's CPUID failed.
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Vcpu {
        /// The vCPU.
        vcpu: u32,
        /// The ioctl.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The table does not fit KVM's CPUID array.
    #[error("too many CPUID entries")]
    TooMany,
}

/// A CPUID table in KVM's form.
pub fn to_kvm(entries: &[CpuidLeaf]) -> Result<CpuId, CpuidError> {
    CpuId::from_entries(
        &entries
            .iter()
            .map(leaf_to_kvm)
            .collect::<Vec<kvm_cpuid_entry2>>(),
    )
    .map_err(|_| CpuidError::TooMany)
}

/// A KVM CPUID table as plain leaves.
pub fn from_kvm(cpuid: &CpuId) -> Vec<CpuidLeaf> {
    cpuid.as_slice().iter().map(leaf_from_kvm).collect()
}

/// KVM's supported CPUID.
pub fn supported(kvm: &Kvm) -> Result<Vec<CpuidLeaf>, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map(|c| from_kvm(&c))
        .map_err(CpuidError::Supported)
}

/// Sets `entries` on a vCPU and returns the CPUID KVM really applied: some
/// KVMs (PVM) rewrite feature leaves on `KVM_SET_CPUID2`, so what the
/// guest sees is what KVM reports back, not what was asked.
pub fn set_and_read_back(
    vcpu: &VcpuFd,
    index: u32,
    entries: &[CpuidLeaf],
) -> Result<Vec<CpuidLeaf>, CpuidError> {
    let err = |what| {
        move |source| CpuidError::Vcpu {
            vcpu: index,
            what,
            source,
        }
    };
    vcpu.set_cpuid2(&to_kvm(entries)?)
        .map_err(err("KVM_SET_CPUID2"))?;
    vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map(|c| from_kvm(&c))
        .map_err(err("KVM_GET_CPUID2"))
}

/// Sets vCPU `index`'s CPUID from a model template (topology and TSC rate
/// filled in) and returns what KVM applied.
pub fn set_for_vcpu(
    vcpu: &VcpuFd,
    template: &[CpuidLeaf],
    index: u32,
    count: u32,
) -> Result<Vec<CpuidLeaf>, CpuidError> {
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    set_and_read_back(
        vcpu,
        index,
        &model_cpuid::for_vcpu(template, index, count, tsc_khz),
    )
}

/// Asks the kernel (once per process) to let this process's guests use
/// AMX tile data, a dynamically enabled XSAVE component, as QEMU does.
/// Without it a KVM that offers AMX refuses a CPUID table whose leaf 0xD
/// lists it. Hosts without AMX refuse the request, which is fine.
pub fn request_amx_permission() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        const ARCH_REQ_XCOMP_GUEST_PERM: libc::c_ulong = 0x1025;
        const XFEATURE_XTILE_DATA: libc::c_ulong = 18;
        // SAFETY: arch_prctl with these arguments only changes this
        // process's permission bitmap; no memory is passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_GUEST_PERM,
                XFEATURE_XTILE_DATA,
            )
        };
        if r != 0 {
            tracing::debug!(
                "no AMX permission for guests: {}",
                std::io::Error::last_os_error()
            );
        }
    });
}

/// What this host offers a VM of `vcpus` vCPUs: the CPUID a new vCPU
/// really gets with the `host` model, the MSRs it can read, its TSC rate
/// and whether KVM scales TSCs, the XSAVE size, the vCPU limit. Costs one
/// throwaway VM and vCPU; nothing of it outlives the call.
pub fn probe_host(kvm: &Kvm, vcpus: u32) -> Result<HostCpu, CpuidError> {
    request_amx_permission();
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let base = model_cpuid::host_base(&supported(kvm)?, tsc_deadline);
    let vm = kvm.create_vm().map_err(CpuidError::Probe)?;
    // An in-kernel LAPIC, as real VMs have, so LAPIC MSRs probe right.
    vm.create_irq_chip().map_err(CpuidError::Probe)?;
    let vcpu = vm.create_vcpu(0).map_err(CpuidError::Probe)?;
    let offer = set_for_vcpu(&vcpu, &base, 0, vcpus.max(1))?;
    let msrs = state::readable_msrs(kvm, &vcpu).map_err(CpuidError::Probe)?;
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    // Tearing a VM down takes KVM several milliseconds (on this kind of
    // host over ten): the scratch VM goes on a thread of its own, off the
    // path to a running guest.
    let scratch = (vcpu, vm);
    if std::thread::Builder::new()
        .name("kvm-probe-drop".into())
        .spawn(move || {
            stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Job);
            drop(scratch)
        })
        .is_err()
    {
        tracing::debug!("could not drop the probe VM on a thread; dropped here");
    }
    Ok(HostCpu {
        vendor: model_cpuid::vendor(&offer),
        brand: host_brand(&offer),
        tsc_khz,
        tsc_scaling: kvm.check_extension(kvm_ioctls::Cap::TscControl),
        xsave_size: state::XsaveIo::for_host(kvm).size(),
        max_vcpus: kvm.get_max_vcpus(),
        offer,
        msrs,
    })
}

/// The brand string: from CPUID, or from `/proc/cpuinfo` on KVMs that
/// pass no brand leaves.
pub fn host_brand(cpuid: &[CpuidLeaf]) -> String {
    let b = model_cpuid::brand(cpuid);
    if !b.is_empty() {
        return b;
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_default()
}

/// Features in `applied` that `asked` did not have: what a KVM that
/// cannot hide features put in anyway.
pub fn added_by_kvm(asked: &[CpuidLeaf], applied: &[CpuidLeaf]) -> FeatureSet {
    FeatureSet::of(applied).missing_from(&FeatureSet::of(asked))
}

/// What a new vCPU of a `count`-vCPU VM really gets on this host when
/// given `template` (a model's CPUID): costs one throwaway VM and vCPU.
pub fn probe_applied(
    kvm: &Kvm,
    template: &[CpuidLeaf],
    count: u32,
) -> Result<Vec<CpuidLeaf>, CpuidError> {
    let vm = kvm.create_vm().map_err(CpuidError::Probe)?;
    vm.create_irq_chip().map_err(CpuidError::Probe)?;
    let vcpu = vm.create_vcpu(0).map_err(CpuidError::Probe)?;
    set_for_vcpu(&vcpu, template, 0, count.max(1))
}
