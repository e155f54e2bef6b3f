//! The CPUID each vCPU sees: KVM's supported set, with the topology, the
//! hypervisor leaves and the TSC frequency filled in per vCPU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// CPUID leaf 1 ECX: XSAVE supported.
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
/// CPUID leaf 1 ECX: AVX supported.
const LEAF1_ECX_AVX: u32 = 1 << 28;
/// CPUID leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 ECX: TSC-deadline timer mode of the local APIC.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// The hypervisor timing leaf (TSC and APIC bus frequency in kHz).
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz (`APIC_BUS_CYCLE_NS` = 1).
const KVM_APIC_BUS_KHZ: u32 = 1_000_000;

/// Errors while building CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
    /// The probe VM could not be created or queried.
    #[error("probing the CPUID of a new vCPU failed: {0}")]
    Probe(kvm_ioctls::Error),
    /// The result does not fit the CPUID array.
    #[error("too many CPUID entries")]
    TooMany,
}

/// The CPU vendor, from leaf 0.
pub fn vendor(cpuid: &CpuId) -> String {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map(|e| {
            let mut v = Vec::with_capacity(12);
            for r in [e.ebx, e.edx, e.ecx] {
                v.extend_from_slice(&r.to_le_bytes());
            }
            String::from_utf8_lossy(&v).into_owned()
        })
        .unwrap_or_default()
}

/// KVM's supported CPUID, the base every vCPU's CPUID is made from.
pub fn supported(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)
}

/// The CPUID for vCPU `index` (its APIC id) of `count`, with the TSC
/// frequency `tsc_khz` advertised in the hypervisor timing leaf.
pub fn for_vcpu(base: &CpuId, index: u32, count: u32, tsc_khz: u32) -> Result<CpuId, CpuidError> {
    let mut entries: Vec<kvm_cpuid_entry2> = base.as_slice().to_vec();
    // Bits needed to hold `count` APIC ids, for the topology leaves.
    let core_bits = 32 - (count.max(1) - 1).leading_zeros();
    let xsave_components = entries
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| e.eax)
        .unwrap_or(0);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // APIC id, logical processor count, CLFLUSH line size (8 * 8 bytes).
                e.ebx = (index << 24) | ((count.min(255)) << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
                // Some KVMs (PVM) leave XSAVE/AVX out of leaf 1 while
                // leaf 0xD lists the components: advertise what leaf 0xD
                // says the guest can enable.
                if xsave_components & 0x3 == 0x3 {
                    e.ecx |= LEAF1_ECX_XSAVE;
                    if xsave_components & 0x4 != 0 {
                        e.ecx |= LEAF1_ECX_AVX;
                    }
                }
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field above is valid
                }
            }
            4 => {
                // Intel deterministic cache parameters: cores per package - 1.
                e.eax = (e.eax & 0x03ff_ffff) | ((count.max(1) - 1) << 26);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 SMT (1 thread), level 1 core.
                e.edx = index;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x4000_0000 => {
                e.eax = e.eax.max(TIMING_LEAF);
            }
            0x8000_0008 => {
                // AMD: number of cores - 1 in ECX[7:0].
                e.ecx = (e.ecx & !0xff) | (count.max(1) - 1);
            }
            _ => {}
        }
    }
    if !entries.iter().any(|e| e.function == TIMING_LEAF) {
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: tsc_khz,
            ebx: KVM_APIC_BUS_KHZ,
            ..Default::default()
        });
    }
    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooMany)
}

/// The CPUID a new vCPU of a `count`-vCPU VM really gets on this host:
/// what stasis sets ([`for_vcpu`]) as KVM then reports it back. Some KVMs
/// (PVM) adjust feature leaves on `KVM_SET_CPUID2`, so this — not
/// `KVM_GET_SUPPORTED_CPUID` — is what a saved guest's CPUID must be
/// compared with. Costs one throwaway VM and vCPU.
pub fn effective_for_new_vcpu(kvm: &Kvm, count: u32) -> Result<CpuId, CpuidError> {
    let base = supported(kvm)?;
    let vm = kvm.create_vm().map_err(CpuidError::Probe)?;
    let vcpu = vm.create_vcpu(0).map_err(CpuidError::Probe)?;
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    vcpu.set_cpuid2(&for_vcpu(&base, 0, count, tsc_khz)?)
        .map_err(CpuidError::Probe)?;
    vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0,
                ebx: u32::from_le_bytes(*b"Genu"),
                edx: u32::from_le_bytes(*b"ineI"),
                ecx: u32::from_le_bytes(*b"ntel"),
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                eax: 0x7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn vendor_string() {
        assert_eq!(vendor(&base()), "GenuineIntel");
    }

    #[test]
    fn per_vcpu_topology_and_timing() {
        let c = for_vcpu(&base(), 1, 2, 2_500_000).unwrap();
        let leaf = |f, i| {
            *c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        assert_eq!(leaf(1, 0).ebx >> 24, 1);
        assert_eq!((leaf(1, 0).ebx >> 16) & 0xff, 2);
        assert_ne!(leaf(1, 0).ecx & LEAF1_ECX_XSAVE, 0);
        assert_ne!(leaf(1, 0).ecx & LEAF1_ECX_AVX, 0);
        assert_eq!(leaf(0xb, 1).ebx, 2);
        assert_eq!(leaf(0xb, 1).edx, 1);
        assert_eq!(leaf(0x4000_0000, 0).eax, TIMING_LEAF);
        assert_eq!(leaf(TIMING_LEAF, 0).eax, 2_500_000);
    }
}
