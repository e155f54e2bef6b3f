//! A VM's vCPUs: created with their CPU model for a boot, or with their
//! saved state for a restore, together with what later snapshots of them
//! need to know ([`SaveLayout`]) and the record of the guest's CPU.

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use stasis_cpu::{cpuid as model_cpuid, msr, xsave, CpuSpec, FeatureSet, GuestCpuid};
use stasis_snapshot::GuestCpuRecord;

use crate::boot::BootInfo;
use crate::cpu::cpuid;
use crate::cpu::regs;
use crate::cpu::state::{self, CpuidLeaf, RestoreLayout, SaveLayout, VcpuState, XsaveIo};
use crate::vm::VmError;

/// Created vCPUs, how to save them, and what their guest's CPU is.
pub struct VcpuSetup {
    /// The vCPUs, in index order.
    pub vcpus: Vec<VcpuFd>,
    /// How a snapshot reads them.
    pub layout: SaveLayout,
    /// The guest's CPU model and features.
    pub cpu: GuestCpuRecord,
    /// The CPU vendor the guest sees.
    pub vendor: String,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What a snapshot of vCPUs whose applied CPUID is `applied` saves.
fn save_layout(
    kvm: &Kvm,
    vcpu0: &VcpuFd,
    applied: &[CpuidLeaf],
    baseline: bool,
) -> Result<SaveLayout, VmError> {
    let readable = state::readable_msrs(kvm, vcpu0).map_err(kvm_err("KVM_GET_MSRS (probe)"))?;
    Ok(SaveLayout {
        msrs: msr::saved_msrs(&readable, &FeatureSet::of(applied), baseline),
        xsave_io: XsaveIo::for_host(kvm),
        xsave_keep: xsave::saved_size(applied, model_cpuid::xcr0_mask(applied)),
    })
}

/// Creates `count` vCPUs in their boot state with CPU model `spec`, whose
/// CPUID template on this host is `template`.
pub fn boot_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    spec: &CpuSpec,
    template: &GuestCpuid,
    count: u32,
    boot: &BootInfo,
) -> Result<VcpuSetup, VmError> {
    let mut vcpus = Vec::with_capacity(count as usize);
    let mut applied0 = Vec::new();
    for index in 0..count {
        let vcpu = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let applied = cpuid::set_for_vcpu(&vcpu, &template.cpuid, index, count)?;
        regs::setup_msrs(&vcpu)?;
        regs::setup_fpu(&vcpu)?;
        regs::setup_lapic(&vcpu)?;
        if index == 0 {
            regs::setup_boot_cpu(&vcpu, boot.entry)?;
            applied0 = applied;
        }
        vcpus.push(vcpu);
    }
    let added = cpuid::added_by_kvm(&template.cpuid, &applied0);
    if !added.is_empty() {
        tracing::warn!(
            "this host's KVM does not let a VMM hide CPU features: besides CPU model {spec} the guest also sees {}; snapshots of this VM restore only where these are offered too",
            added.names().join(" ")
        );
    }
    finish(kvm, spec, vcpus, &applied0, &added)
}

/// How a restore puts the saved vCPUs back on this host: decided by the
/// restore's checks (`persist::restore::prepare`).
#[derive(Debug, Clone)]
pub struct RestoreCpu {
    /// XSAVE transfer, TSC scaling, MSRs to leave out.
    pub layout: RestoreLayout,
    /// The manifest's record of the guest's CPU, if it has one.
    pub saved: Option<GuestCpuRecord>,
}

/// Creates one vCPU per saved state and puts the state back.
pub fn restore_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    spec: &CpuSpec,
    saved: &[VcpuState],
    restore: &RestoreCpu,
) -> Result<VcpuSetup, VmError> {
    let mut vcpus = Vec::with_capacity(saved.len());
    let mut applied0 = Vec::new();
    for (index, s) in saved.iter().enumerate() {
        if s.index as usize != index {
            return Err(VmError::Mismatch(format!(
                "vCPU state {index} is labelled as vCPU {}",
                s.index
            )));
        }
        let vcpu = vm
            .create_vcpu(index as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let applied = state::restore_vcpu(&vcpu, s, &restore.layout)?;
        if index == 0 {
            applied0 = applied;
        }
        vcpus.push(vcpu);
    }
    let first = saved
        .first()
        .ok_or_else(|| VmError::Mismatch("no vCPU state".into()))?;
    // What this host's KVM adds to the saved CPUID, with what the source
    // host's KVM had added.
    let mut added = cpuid::added_by_kvm(&first.cpuid, &applied0);
    if let Some(r) = &restore.saved {
        let before: FeatureSet = r
            .added_by_host
            .iter()
            .filter_map(|n| stasis_cpu::feature::by_name(n))
            .collect();
        added = added.union(&before);
    }
    finish(kvm, spec, vcpus, &applied0, &added)
}

/// The set-up of created vCPUs: what their snapshots save, and the record
/// of the CPU the guest sees (`applied0`: vCPU 0's CPUID as KVM applied it;
/// `added`: what the host's KVM showed beyond the model).
fn finish(
    kvm: &Kvm,
    spec: &CpuSpec,
    vcpus: Vec<VcpuFd>,
    applied0: &[CpuidLeaf],
    added: &FeatureSet,
) -> Result<VcpuSetup, VmError> {
    let layout = save_layout(kvm, &vcpus[0], applied0, spec.model.is_baseline())?;
    Ok(VcpuSetup {
        vcpus,
        layout,
        vendor: model_cpuid::vendor(applied0),
        cpu: GuestCpuRecord {
            model: spec.model.name().to_string(),
            changes: spec.changes.to_strings(),
            features: FeatureSet::of(applied0).names(),
            added_by_host: added.names(),
            xcr0: model_cpuid::xcr0_mask(applied0),
        },
    })
}
