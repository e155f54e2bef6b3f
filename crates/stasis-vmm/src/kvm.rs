//! Opening KVM: the capabilities stasis cannot run without, checked once
//! with a message naming what is missing.

use kvm_ioctls::Kvm;

use crate::cpu::cpuid;
use crate::vm::VmError;

/// Opens KVM and checks what stasis needs of it.
pub(crate) fn open(vcpus: u32) -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
    cpuid::request_amx_permission();
    for (cap, name) in [
        (
            kvm_ioctls::Cap::Irqchip,
            "an in-kernel irqchip (KVM_CAP_IRQCHIP)",
        ),
        (kvm_ioctls::Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (kvm_ioctls::Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
        (kvm_ioctls::Cap::Xsave, "KVM_CAP_XSAVE"),
        (kvm_ioctls::Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
        (kvm_ioctls::Cap::Xcrs, "KVM_CAP_XCRS"),
        (kvm_ioctls::Cap::MpState, "KVM_CAP_MP_STATE"),
        (kvm_ioctls::Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
        (kvm_ioctls::Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmCapability(name));
        }
    }
    if vcpus as usize > kvm.get_max_vcpus() {
        return Err(VmError::TooManyVcpus {
            asked: vcpus,
            max: kvm.get_max_vcpus(),
        });
    }
    if vcpus as usize > kvm.get_nr_vcpus().max(1) {
        tracing::warn!(
            "{vcpus} vCPUs is more than the {} this host recommends (KVM_CAP_NR_VCPUS)",
            kvm.get_nr_vcpus()
        );
    }
    Ok(kvm)
}
