//! The CPUID tables stasis gives vCPUs.
//!
//! Three steps, each a pure function of its inputs:
//!
//! 1. [`host_base`]: what KVM reports as supported, made into a usable
//!    table (hypervisor bit, TSC-deadline timer, XSAVE/AVX where a KVM
//!    lists the XSAVE components but not the leaf-1 bits).
//! 2. [`guest_template`]: the CPUID of a CPU model, cut from the *offer*
//!    (what a new vCPU of this host really gets from the base table, as
//!    KVM reports it back; see `stasis-vmm`'s probe). Feature words keep
//!    exactly the model's features; a baseline model also keeps only the
//!    leaves that describe the processor (vendor, family, caches,
//!    topology, address sizes) and zeroes the rest, so that the model
//!    means the same on every host of a vendor.
//! 3. [`for_vcpu`]: per-vCPU topology (APIC ids, counts) and the
//!    hypervisor timing leaf.

use stasis_snapshot::CpuidEntry;

use crate::feature::{
    self, FeatureSet, Reg, Word, AMD_MIRROR_MASK, AMD_MIRROR_WORD, DYNAMIC_BITS, FEATURE_WORDS,
};
use crate::model::{CpuSpec, ModelError};
use crate::xsave;

/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`: the subleaf selects the entry.
pub const FLAG_SIGNIFICANT_INDEX: u32 = 1;
/// The hypervisor timing leaf (TSC and APIC bus frequency in kHz).
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz (`APIC_BUS_CYCLE_NS` = 1).
const KVM_APIC_BUS_KHZ: u32 = 1_000_000;

const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Guest-physical address width of baseline models: 1 TiB, which every
/// x86-64 server CPU of the last decade covers; more only if the guest's
/// memory map reaches beyond it.
pub const BASELINE_PHYS_BITS: u32 = 40;
/// Linear address width without 5-level paging.
const VIRT_BITS_4_LEVEL: u32 = 48;

/// The CPU vendor string of leaf 0 (`AuthenticAMD`, `GenuineIntel`).
pub fn vendor(cpuid: &[CpuidEntry]) -> String {
    feature::entry(cpuid, 0, 0)
        .map(|e| {
            let mut v = Vec::with_capacity(12);
            for r in [e.ebx, e.edx, e.ecx] {
                v.extend_from_slice(&r.to_le_bytes());
            }
            String::from_utf8_lossy(&v).into_owned()
        })
        .unwrap_or_default()
}

/// Whether the vendor is AMD (or Hygon, which follows AMD's CPUID).
pub fn is_amd_like(vendor: &str) -> bool {
    vendor == "AuthenticAMD" || vendor == "HygonGenuine"
}

/// The XSAVE components the guest may enable (leaf 0xD subleaf 0).
pub fn xcr0_mask(cpuid: &[CpuidEntry]) -> u64 {
    feature::entry(cpuid, 0xd, 0)
        .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
        .unwrap_or(0)
}

/// Guest physical address width (leaf 0x80000008 EAX[7:0]), 36 if absent.
pub fn phys_bits(cpuid: &[CpuidEntry]) -> u32 {
    match feature::entry(cpuid, 0x8000_0008, 0) {
        Some(e) if e.eax & 0xff != 0 => e.eax & 0xff,
        _ => 36,
    }
}

/// The brand string (leaves 0x80000002-4), trimmed; empty if absent.
pub fn brand(cpuid: &[CpuidEntry]) -> String {
    let mut b = Vec::new();
    for f in 0x8000_0002u32..=0x8000_0004 {
        if let Some(e) = feature::entry(cpuid, f, 0) {
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                b.extend_from_slice(&r.to_le_bytes());
            }
        }
    }
    String::from_utf8_lossy(&b)
        .trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

/// KVM's supported CPUID made into the base of the `host` model: the
/// hypervisor bit, the TSC-deadline timer when KVM emulates it
/// (`KVM_CAP_TSC_DEADLINE_TIMER`), and, where a KVM lists XSAVE
/// components in leaf 0xD but leaves XSAVE/AVX out of leaf 1 (PVM), the
/// leaf-1 bits that match leaf 0xD.
pub fn host_base(supported: &[CpuidEntry], tsc_deadline: bool) -> Vec<CpuidEntry> {
    let xcr0 = xcr0_mask(supported);
    let mut out = supported.to_vec();
    for e in out.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= LEAF1_ECX_HYPERVISOR;
        if tsc_deadline {
            e.ecx |= LEAF1_ECX_TSC_DEADLINE;
        }
        if xcr0 & 0x3 == 0x3 {
            e.ecx |= LEAF1_ECX_XSAVE;
            if xcr0 & 0x4 != 0 {
                e.ecx |= LEAF1_ECX_AVX;
            }
        }
    }
    out
}

/// A model's CPUID template and what it contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCpuid {
    /// The table, before per-vCPU topology ([`for_vcpu`]).
    pub cpuid: Vec<CpuidEntry>,
    /// The features it advertises.
    pub features: FeatureSet,
    /// The XSAVE components the guest may enable.
    pub xcr0: u64,
}

/// Leaves a baseline model keeps (feature words within them are masked);
/// every other leaf's registers are zeroed.
fn baseline_keeps(leaf: u32) -> bool {
    matches!(
        leaf,
        0 | 1
            | 2
            | 4
            | 6
            | 7
            | 0xb
            | 0xd
            | 0x15
            | 0x16
            | 0x1f
            | 0x4000_0000
            | 0x4000_0001
            | TIMING_LEAF
            | 0x8000_0000..=0x8000_0008 | 0x8000_0019 | 0x8000_001d | 0x8000_001e
    )
}

/// XSAVE components and the feature that allows each.
const XSAVE_COMPONENTS: &[(u64, &str)] = &[
    (0b11, "xsave"),
    (1 << 2, "avx"),
    (0b11 << 3, "mpx"),
    (0b111 << 5, "avx512f"),
    (1 << 9, "pku"),
    (0b11 << 17, "amx_tile"),
];

/// The XSAVE components that `features` allow.
pub fn xcr0_for(features: &FeatureSet) -> u64 {
    XSAVE_COMPONENTS
        .iter()
        .filter(|(_, f)| features.contains(&feature::by_name(f).expect("known feature")))
        .fold(0, |m, (c, _)| m | c)
}

fn known_components() -> u64 {
    XSAVE_COMPONENTS.iter().fold(0, |m, (c, _)| m | c)
}

/// Bits needed to address `top` (the first address above the guest's
/// memory map).
fn bits_for(top: u64) -> u32 {
    64 - top.saturating_sub(1).leading_zeros()
}

/// The CPUID template of `spec` on a host whose KVM offers `offer` (the
/// table a new vCPU really gets from [`host_base`]). `guest_top` is the
/// first guest-physical address above RAM and MMIO. Fails with the
/// features the host lacks.
pub fn guest_template(
    spec: &CpuSpec,
    offer: &[CpuidEntry],
    guest_top: u64,
) -> Result<GuestCpuid, ModelError> {
    let offered = FeatureSet::of(offer);
    let features = spec.resolve(&offered)?.features;
    let baseline = spec.model.is_baseline();
    let amd = is_amd_like(&vendor(offer));
    let dynamic: FeatureSet = DYNAMIC_BITS.iter().copied().collect();
    let offered_xcr0 = xcr0_mask(offer);
    let xcr0 = if baseline {
        xcr0_for(&features) & offered_xcr0
    } else {
        // Components stasis has no name for stay as the host offers them.
        offered_xcr0 & (xcr0_for(&features) | !known_components())
    };
    let leaf1_edx_word = Word {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Edx,
    };
    let leaf1_edx = feature::word_value(offer, leaf1_edx_word)
        & (features.mask(leaf1_edx_word) | dynamic.mask(leaf1_edx_word));
    // Supervisor components (XSS) the host model passes through with their
    // subleaves; baselines have none.
    let xss = match feature::entry(offer, 0xd, 1) {
        Some(e) if !baseline => u64::from(e.ecx) | (u64::from(e.edx) << 32),
        _ => 0,
    };
    let keeps_7_1 = features
        .iter()
        .any(|f| f.word.leaf == 7 && f.word.subleaf == 1);
    let mut out = Vec::with_capacity(offer.len());
    for e in offer {
        let mut e = *e;
        let leaf = e.function;
        if (baseline && !baseline_keeps(leaf)) || leaf == 0x8000_000a {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
            out.push(e);
            continue;
        }
        if leaf == 0xd {
            match e.index {
                0 => {
                    if xcr0 & 0b11 != 0b11 && baseline {
                        continue; // no XSAVE: no leaf 0xD
                    }
                    e.eax = xcr0 as u32;
                    e.edx = (xcr0 >> 32) as u32;
                    e.ecx = xsave::area_size(offer, xcr0) as u32;
                    // KVM keeps EBX at the size for the guest's current XCR0.
                    e.ebx = xsave::area_size(offer, xcr0 & 0b11) as u32;
                }
                1 => {
                    if xcr0 & 0b11 != 0b11 && baseline {
                        continue;
                    }
                    e.eax &= features.mask(Word {
                        leaf: 0xd,
                        subleaf: 1,
                        reg: Reg::Eax,
                    });
                    if baseline {
                        // No supervisor components (XSS) in baselines.
                        e.ebx = 0;
                        e.ecx = 0;
                        e.edx = 0;
                    }
                }
                i if i < 64 && (xcr0 | xss) & (1 << i) == 0 => continue,
                _ => {}
            }
            out.push(e);
            continue;
        }
        if baseline && leaf == 7 && e.index > 1 {
            continue;
        }
        if baseline && leaf == 7 && e.index == 1 && !keeps_7_1 {
            continue;
        }
        for &word in FEATURE_WORDS {
            if word.leaf == leaf && word.subleaf == e.index {
                let mut allowed = features.mask(word) | dynamic.mask(word);
                if word == AMD_MIRROR_WORD && !baseline {
                    allowed |= AMD_MIRROR_MASK;
                }
                *word.reg.get_mut(&mut e) &= allowed;
            }
        }
        if baseline {
            match leaf {
                6 | 0x8000_0007 => {
                    // Thermal/power leaves: only the feature words stay.
                    if leaf == 6 {
                        e.ebx = 0;
                        e.ecx = 0;
                        e.edx = 0;
                    } else {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = 0;
                    }
                }
                7 if e.index == 0 => e.eax = u32::from(keeps_7_1),
                0x4000_0001 => {
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0; // no KVM hints (e.g. "realtime")
                }
                0x8000_0001 if amd => {
                    // AMD mirrors most leaf-1 EDX bits here.
                    e.edx = (e.edx & !AMD_MIRROR_MASK) | (leaf1_edx & AMD_MIRROR_MASK);
                }
                0x8000_0008 => {
                    // A host that leaves the width out has the
                    // architectural default of 36 bits.
                    let host_phys = match e.eax & 0xff {
                        0 => 36,
                        n => n,
                    };
                    let phys = BASELINE_PHYS_BITS.max(bits_for(guest_top)).min(host_phys);
                    e.eax = (e.eax & !0xffff) | (VIRT_BITS_4_LEVEL << 8) | phys;
                    e.edx = 0;
                }
                _ => {}
            }
        }
        out.push(e);
    }
    let features = FeatureSet::of(&out);
    let xcr0 = xcr0_mask(&out);
    Ok(GuestCpuid {
        cpuid: out,
        features,
        xcr0,
    })
}

/// The CPUID for vCPU `index` (its APIC id) of `count`, with `tsc_khz`
/// advertised in the hypervisor timing leaf.
pub fn for_vcpu(template: &[CpuidEntry], index: u32, count: u32, tsc_khz: u32) -> Vec<CpuidEntry> {
    let mut entries = template.to_vec();
    // Bits needed to hold `count` APIC ids, for the topology leaves.
    let core_bits = 32 - (count.max(1) - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // APIC id, logical processor count, CLFLUSH line size (8 * 8 bytes).
                e.ebx = (index << 24) | ((count.min(255)) << 16) | (8 << 8);
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field above is valid
                } else {
                    e.edx &= !(1 << 28);
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
            TIMING_LEAF => {
                e.eax = tsc_khz;
                e.ebx = KVM_APIC_BUS_KHZ;
            }
            0x8000_0008 => {
                // AMD: number of cores - 1 in ECX[7:0].
                e.ecx = (e.ecx & !0xff) | (count.max(1) - 1);
            }
            _ => {}
        }
    }
    if !entries.iter().any(|e| e.function == TIMING_LEAF) {
        entries.push(CpuidEntry {
            function: TIMING_LEAF,
            eax: tsc_khz,
            ebx: KVM_APIC_BUS_KHZ,
            ..Default::default()
        });
    }
    entries
}

#[cfg(test)]
mod tests;
