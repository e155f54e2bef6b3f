//! Can this host run a snapshot? Checked before anything is created, with
//! an error that names what is missing.

use kvm_bindings::CpuId;
use stasis_snapshot::{CpuInfo, CpuidEntry};

use crate::cpu::state::leaf_from_kvm;

/// Why this host cannot run a snapshot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompatError {
    /// The CPU vendor differs.
    #[error("snapshot was taken on a {saved} CPU; this host's CPU is {host}")]
    Vendor {
        /// Saved vendor.
        saved: String,
        /// This host's vendor.
        host: String,
    },
    /// The guest saw CPU features this host's KVM cannot offer.
    #[error("this host cannot offer CPU features the guest was using: {}", .0.join(", "))]
    Features(Vec<String>),
    /// XSAVE state components the guest enabled are not supported here.
    #[error("this host's KVM does not support XSAVE components {0:#x} that the guest had enabled")]
    Xsave(u64),
    /// The saved XSAVE area does not fit this host's.
    #[error("saved XSAVE area is {saved} bytes; this host's KVM handles {host} (KVM_CAP_XSAVE2)")]
    XsaveSize {
        /// Saved size.
        saved: usize,
        /// This host's size.
        host: usize,
    },
}

/// Names for the feature bits most likely to differ between hosts.
fn feature_name(function: u32, index: u32, reg: &str, bit: u32) -> String {
    let name = match (function, index, reg, bit) {
        (1, 0, "ecx", 0) => "sse3",
        (1, 0, "ecx", 9) => "ssse3",
        (1, 0, "ecx", 12) => "fma",
        (1, 0, "ecx", 13) => "cx16",
        (1, 0, "ecx", 19) => "sse4.1",
        (1, 0, "ecx", 20) => "sse4.2",
        (1, 0, "ecx", 22) => "movbe",
        (1, 0, "ecx", 23) => "popcnt",
        (1, 0, "ecx", 25) => "aes",
        (1, 0, "ecx", 26) => "xsave",
        (1, 0, "ecx", 28) => "avx",
        (1, 0, "ecx", 29) => "f16c",
        (1, 0, "ecx", 30) => "rdrand",
        (7, 0, "ebx", 3) => "bmi1",
        (7, 0, "ebx", 5) => "avx2",
        (7, 0, "ebx", 8) => "bmi2",
        (7, 0, "ebx", 16) => "avx512f",
        (7, 0, "ebx", 17) => "avx512dq",
        (7, 0, "ebx", 18) => "rdseed",
        (7, 0, "ebx", 19) => "adx",
        (7, 0, "ebx", 29) => "sha",
        (7, 0, "ebx", 30) => "avx512bw",
        (7, 0, "ebx", 31) => "avx512vl",
        (7, 0, "ecx", 1) => "avx512vbmi",
        (7, 0, "ecx", 8) => "gfni",
        (7, 0, "ecx", 9) => "vaes",
        (0x8000_0001, 0, "ecx", 5) => "lzcnt",
        (0x8000_0001, 0, "edx", 27) => "rdtscp",
        (0x8000_0001, 0, "edx", 26) => "pdpe1gb",
        _ => "",
    };
    if name.is_empty() {
        format!("cpuid {function:#x}.{index} {reg} bit {bit}")
    } else {
        name.to_string()
    }
}

/// Feature words to compare: (leaf, subleaf, register, mask of bits that
/// describe features rather than per-vCPU or dynamic state).
const FEATURE_WORDS: &[(u32, u32, &str, u32)] = &[
    // Leaf 1 ECX: bit 27 OSXSAVE follows CR4; bit 31 hypervisor is ours.
    (1, 0, "ecx", !((1 << 27) | (1 << 31))),
    // Leaf 1 EDX: bit 9 APIC follows the APIC base MSR.
    (1, 0, "edx", !(1 << 9)),
    (7, 0, "ebx", !0),
    // Leaf 7 ECX: bit 4 OSPKE follows CR4.
    (7, 0, "ecx", !(1 << 4)),
    (7, 0, "edx", !0),
    (0x8000_0001, 0, "ecx", !0),
    (0x8000_0001, 0, "edx", !0),
];

fn reg(e: &CpuidEntry, r: &str) -> u32 {
    match r {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

/// Checks a saved CPU description against `host` (the CPUID this host's
/// KVM would give a new vCPU, after stasis's own adjustments).
pub fn check(saved: &CpuInfo, host_vendor: &str, host: &CpuId) -> Result<(), CompatError> {
    if saved.vendor != host_vendor {
        return Err(CompatError::Vendor {
            saved: saved.vendor.clone(),
            host: host_vendor.to_string(),
        });
    }
    let host: Vec<CpuidEntry> = host.as_slice().iter().map(leaf_from_kvm).collect();
    let find = |set: &[CpuidEntry], f: u32, i: u32| {
        set.iter()
            .find(|e| e.function == f && e.index == i)
            .copied()
    };
    let mut missing = Vec::new();
    for &(f, i, r, mask) in FEATURE_WORDS {
        let Some(s) = find(&saved.cpuid, f, i) else {
            continue;
        };
        let h = find(&host, f, i).map(|e| reg(&e, r)).unwrap_or(0);
        let lacking = reg(&s, r) & mask & !h;
        for bit in 0..32 {
            if lacking & (1 << bit) != 0 {
                missing.push(feature_name(f, i, r, bit));
            }
        }
    }
    if !missing.is_empty() {
        return Err(CompatError::Features(missing));
    }
    let xcr0 = |set: &[CpuidEntry]| {
        find(set, 0xd, 0)
            .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
            .unwrap_or(0)
    };
    let lacking = xcr0(&saved.cpuid) & !xcr0(&host);
    if lacking != 0 {
        return Err(CompatError::Xsave(lacking));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn host(ecx1: u32) -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ecx: ecx1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                eax: 0x7,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    fn saved(vendor: &str, ecx1: u32, xcr0: u32) -> CpuInfo {
        CpuInfo {
            vendor: vendor.into(),
            model: String::new(),
            cpuid: vec![
                CpuidEntry {
                    function: 1,
                    ecx: ecx1,
                    ..Default::default()
                },
                CpuidEntry {
                    function: 0xd,
                    eax: xcr0,
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn same_host_is_compatible() {
        let avx = (1 << 28) | (1 << 26);
        check(&saved("AuthenticAMD", avx, 7), "AuthenticAMD", &host(avx)).unwrap();
    }

    #[test]
    fn other_vendor_is_refused_by_name() {
        let e = check(&saved("GenuineIntel", 0, 7), "AuthenticAMD", &host(0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "snapshot was taken on a GenuineIntel CPU; this host's CPU is AuthenticAMD"
        );
    }

    #[test]
    fn missing_features_are_named() {
        let e = check(&saved("X", (1 << 28) | (1 << 13), 7), "X", &host(0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "this host cannot offer CPU features the guest was using: cx16, avx"
        );
    }

    #[test]
    fn dynamic_bits_are_ignored() {
        check(&saved("X", 1 << 27, 7), "X", &host(0)).unwrap();
    }

    #[test]
    fn xsave_components_are_checked() {
        let e = check(&saved("X", 0, 0xe7), "X", &host(0)).unwrap_err();
        assert_eq!(e, CompatError::Xsave(0xe0));
    }
}
