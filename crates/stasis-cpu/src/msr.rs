//! Which MSRs a VM's snapshots carry, and how MSR lists are cut into
//! ioctl-sized chunks.
//!
//! A vCPU saves every MSR this host's KVM can read (`KVM_GET_MSR_INDEX_LIST`
//! plus the MTRRs), except, for baseline models, those the guest cannot
//! reach: MSRs of features its CPUID does not have (the TSC-deadline MSR
//! without `tsc_deadline_timer`, `XSS` without `xsaves`, ...) and the
//! performance counters (baseline models have no PMU). Leaving them out is
//! what lets a baseline snapshot restore on a host that lacks them. MSRs
//! stasis has no rule for are kept: nothing the guest could have set is
//! dropped.

use crate::feature::{self, FeatureSet};

/// The most MSRs one `KVM_GET_MSRS`/`KVM_SET_MSRS` call takes (the kernel
/// refuses `nmsrs >= MAX_IO_MSRS` = 256).
pub const MAX_MSRS_PER_IOCTL: usize = 255;

/// What makes an MSR meaningful to a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Any of these features.
    Any(&'static [&'static str]),
    /// The performance monitoring unit.
    Pmu,
}

/// `(first, last, gate, name)`: MSRs that exist for a guest only with a
/// feature.
const GATED: &[(u32, u32, Gate, &str)] = &[
    (
        0x11,
        0x12,
        Gate::Any(&["kvmclock"]),
        "KVM wall clock / system time (old)",
    ),
    (0x3b, 0x3b, Gate::Any(&["tsc_adjust"]), "IA32_TSC_ADJUST"),
    (
        0x48,
        0x48,
        Gate::Any(&[
            "spec_ctrl",
            "amd_ibrs",
            "amd_ssbd",
            "amd_stibp",
            "intel_stibp",
            "spec_ctrl_ssbd",
        ]),
        "IA32_SPEC_CTRL",
    ),
    (
        0x10a,
        0x10a,
        Gate::Any(&["arch_capabilities"]),
        "IA32_ARCH_CAPABILITIES",
    ),
    (0x122, 0x122, Gate::Any(&["rtm", "hle"]), "IA32_TSX_CTRL"),
    (0x1c4, 0x1c5, Gate::Any(&["xfd"]), "IA32_XFD / XFD_ERR"),
    (0x345, 0x345, Gate::Any(&["pdcm"]), "IA32_PERF_CAPABILITIES"),
    (0x560, 0x58f, Gate::Any(&["intel_pt"]), "Intel PT (RTIT)"),
    (0x6a0, 0x6a8, Gate::Any(&["shstk", "ibt"]), "CET"),
    (
        0x6e0,
        0x6e0,
        Gate::Any(&["tsc_deadline_timer"]),
        "IA32_TSC_DEADLINE",
    ),
    (0xd90, 0xd90, Gate::Any(&["mpx"]), "IA32_BNDCFGS"),
    (0xda0, 0xda0, Gate::Any(&["xsaves"]), "IA32_XSS"),
    (0xe1, 0xe1, Gate::Any(&["waitpkg"]), "IA32_UMWAIT_CONTROL"),
    (
        0xc000_0103,
        0xc000_0103,
        Gate::Any(&["rdtscp", "rdpid"]),
        "TSC_AUX",
    ),
    (
        0xc000_0104,
        0xc000_0104,
        Gate::Any(&["tsc_scale"]),
        "TSC_RATIO",
    ),
    (0xc001_0117, 0xc001_0117, Gate::Any(&["svm"]), "VM_HSAVE_PA"),
    (
        0xc001_011f,
        0xc001_011f,
        Gate::Any(&["virt_ssbd"]),
        "VIRT_SPEC_CTRL",
    ),
    (
        0x4b56_4d00,
        0x4b56_4d01,
        Gate::Any(&["kvmclock2"]),
        "KVM wall clock / system time",
    ),
    (
        0x4b56_4d02,
        0x4b56_4d02,
        Gate::Any(&["kvm_async_pf"]),
        "KVM async PF",
    ),
    (
        0x4b56_4d03,
        0x4b56_4d03,
        Gate::Any(&["kvm_steal_time"]),
        "KVM steal time",
    ),
    (
        0x4b56_4d04,
        0x4b56_4d04,
        Gate::Any(&["kvm_pv_eoi"]),
        "KVM PV EOI",
    ),
    (
        0x4b56_4d05,
        0x4b56_4d05,
        Gate::Any(&["kvm_poll_control"]),
        "KVM poll control",
    ),
    (
        0x4b56_4d06,
        0x4b56_4d07,
        Gate::Any(&["kvm_async_pf_int"]),
        "KVM async PF interrupt",
    ),
    // Performance counters, Intel and AMD.
    (0xc1, 0xc8, Gate::Pmu, "IA32_PMCx"),
    (0x186, 0x18d, Gate::Pmu, "IA32_PERFEVTSELx"),
    (0x309, 0x30b, Gate::Pmu, "IA32_FIXED_CTRx"),
    (0x38d, 0x390, Gate::Pmu, "IA32_PERF_GLOBAL_*"),
    (0x3f1, 0x3f1, Gate::Pmu, "IA32_PEBS_ENABLE"),
    (0x4c1, 0x4c8, Gate::Pmu, "IA32_A_PMCx"),
    (0x600, 0x600, Gate::Pmu, "IA32_DS_AREA"),
    (0xc000_0300, 0xc000_0303, Gate::Pmu, "AMD PerfMonV2 global"),
    (
        0xc001_0000,
        0xc001_0007,
        Gate::Pmu,
        "AMD K7 performance counters",
    ),
    (
        0xc001_0200,
        0xc001_020b,
        Gate::Pmu,
        "AMD F15h performance counters",
    ),
];

/// Whether a guest with `features` can use MSR `index`, for a baseline
/// model (`host` VMs keep every readable MSR).
pub fn guest_can_use(index: u32, features: &FeatureSet) -> bool {
    match GATED.iter().find(|(a, b, _, _)| (*a..=*b).contains(&index)) {
        None => true,
        Some((_, _, Gate::Pmu, _)) => false,
        Some((_, _, Gate::Any(names), _)) => names.iter().any(|n| {
            feature::by_name(n)
                .map(|f| features.contains(&f))
                .unwrap_or(false)
        }),
    }
}

/// The MSRs a VM saves: of those this host can read (`readable`), all for
/// `host`, and for a baseline model those [`guest_can_use`].
pub fn saved_msrs(readable: &[u32], features: &FeatureSet, baseline: bool) -> Vec<u32> {
    readable
        .iter()
        .copied()
        .filter(|&m| !baseline || guest_can_use(m, features))
        .collect()
}

/// A short name for an MSR, for messages (`0x6e0 (IA32_TSC_DEADLINE)`).
pub fn describe(index: u32) -> String {
    const NAMES: &[(u32, &str)] = &[
        (0x10, "IA32_TSC"),
        (0x1a0, "IA32_MISC_ENABLE"),
        (0x277, "IA32_PAT"),
        (0xc000_0080, "EFER"),
        (0xc001_0015, "HWCR"),
    ];
    let name = NAMES
        .iter()
        .find(|(i, _)| *i == index)
        .map(|(_, n)| *n)
        .or_else(|| {
            GATED
                .iter()
                .find(|(a, b, _, _)| (*a..=*b).contains(&index))
                .map(|(_, _, _, n)| *n)
        });
    match name {
        Some(n) => format!("{index:#x} ({n})"),
        None => format!("{index:#x}"),
    }
}

/// `items` cut into chunks that one MSR ioctl takes.
pub fn chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    items.chunks(MAX_MSRS_PER_IOCTL)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(names: &[&str]) -> FeatureSet {
        FeatureSet::from_names(names.iter().copied()).unwrap()
    }

    #[test]
    fn baseline_models_leave_out_msrs_of_absent_features() {
        let readable = [
            0x10,
            0x3b,
            0x6e0,
            0xda0,
            0xc000_0103,
            0xc1,
            0x4b56_4d00,
            0x4b56_4d03,
            0x1a0,
            0xc001_0117,
            0xc000_0104,
        ];
        let f = features(&["tsc_deadline_timer", "kvmclock2"]);
        assert_eq!(
            saved_msrs(&readable, &f, true),
            vec![0x10, 0x6e0, 0x4b56_4d00, 0x1a0]
        );
        assert_eq!(saved_msrs(&readable, &f, false), readable.to_vec());
        let f = features(&["tsc_adjust", "xsave", "xsaves", "rdpid", "kvm_steal_time"]);
        assert_eq!(
            saved_msrs(&readable, &f, true),
            vec![0x10, 0x3b, 0xda0, 0xc000_0103, 0x4b56_4d03, 0x1a0]
        );
    }

    #[test]
    fn gates_name_known_features() {
        for (_, _, gate, name) in GATED {
            if let Gate::Any(names) = gate {
                for n in *names {
                    assert!(feature::by_name(n).is_some(), "{name}: unknown feature {n}");
                }
            }
        }
    }

    #[test]
    fn chunks_fit_one_ioctl() {
        let v: Vec<u32> = (0..600).collect();
        let sizes: Vec<usize> = chunks(&v).map(<[u32]>::len).collect();
        assert_eq!(sizes, vec![255, 255, 90]);
        assert_eq!(describe(0x6e0), "0x6e0 (IA32_TSC_DEADLINE)");
        assert_eq!(describe(0x12345), "0x12345");
    }
}
