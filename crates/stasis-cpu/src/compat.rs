//! Can this host run a saved VM? Every reason it cannot, at once.
//!
//! The saved side is what the guest saw (its CPUID, XSAVE area, MSRs, TSC
//! rate), never the host it ran on: a VM of a baseline model saved on a
//! large host restores on a small one as long as the small one offers
//! what the guest was given.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use stasis_snapshot::CpuidEntry;

use crate::cpuid;
use crate::feature::FeatureSet;
use crate::msr;
use crate::tsc::{self, TscMismatch, TscPlan};
use crate::xsave;

/// What this host offers, as probed through its KVM.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct HostCpu {
    /// Vendor string.
    pub vendor: String,
    /// Brand string.
    pub brand: String,
    /// The CPUID a new vCPU gets with the `host` model, as KVM reports it.
    pub offer: Vec<CpuidEntry>,
    /// MSRs a vCPU can read and write.
    pub msrs: Vec<u32>,
    /// A new vCPU's TSC rate in kHz.
    pub tsc_khz: u32,
    /// Whether KVM can run a guest's TSC at another rate.
    pub tsc_scaling: bool,
    /// Bytes of XSAVE area this KVM transfers (4096 without
    /// `KVM_CAP_XSAVE2`).
    pub xsave_size: usize,
    /// The most vCPUs a VM may have.
    pub max_vcpus: usize,
}

/// A saved VM's CPU, as far as compatibility goes: the manifest's record
/// and every vCPU. Everything in it counts: a feature named anywhere is a
/// feature the guest may rely on.
#[derive(Debug, Clone)]
pub struct SavedCpu<'a> {
    /// The vendor the manifest records.
    pub vendor: &'a str,
    /// The CPUID the manifest records (vCPU 0's).
    pub cpuid: &'a [CpuidEntry],
    /// The feature names of the manifest's CPU model record.
    pub features: &'a [String],
    /// The vCPUs.
    pub vcpus: Vec<SavedVcpu<'a>>,
}

/// One saved vCPU, as far as compatibility goes.
#[derive(Debug, Clone, Copy)]
pub struct SavedVcpu<'a> {
    /// The CPUID the guest saw.
    pub cpuid: &'a [CpuidEntry],
    /// Length of its saved XSAVE area.
    pub xsave_len: usize,
    /// Its MSRs, `(index, value)`.
    pub msrs: &'a [(u32, u64)],
    /// Its TSC rate in kHz.
    pub tsc_khz: u32,
}

/// Why a host cannot run a saved VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// The CPU vendor differs.
    #[error("the guest ran on a {saved} CPU; this host's CPU is {host} (a VM cannot move between CPU vendors)")]
    Vendor {
        /// The saved vendor.
        saved: String,
        /// This host's.
        host: String,
    },
    /// The guest saw features this host's KVM cannot offer.
    #[error("this host cannot offer CPU features the guest was given: {}", .missing.join(", "))]
    Features {
        /// Their names.
        missing: Vec<String>,
    },
    /// The snapshot names features this stasis does not know.
    #[error("the snapshot's CPU model names features this stasis does not know: {}", .names.join(", "))]
    UnknownFeatures {
        /// The names, as recorded.
        names: Vec<String>,
    },
    /// XSAVE components the guest could enable are not supported here.
    #[error("this host's KVM does not support XSAVE state the guest could use: {}", .components.join(", "))]
    Xsave {
        /// Their names.
        components: Vec<String>,
    },
    /// The saved XSAVE area is larger than this KVM transfers.
    #[error("the saved XSAVE area is {saved} bytes; this host's KVM handles {host}")]
    XsaveSize {
        /// Saved length.
        saved: usize,
        /// This host's.
        host: usize,
    },
    /// MSRs with state that this host's KVM does not have.
    #[error("this host's KVM lacks MSRs that hold guest state: {}", .msrs.join(", "))]
    Msrs {
        /// Described MSRs.
        msrs: Vec<String>,
    },
    /// The guest's physical address width exceeds this host's.
    #[error("the guest uses {saved}-bit physical addresses; this host offers {host}")]
    PhysBits {
        /// Saved width.
        saved: u32,
        /// This host's.
        host: u32,
    },
    /// More vCPUs than this host's KVM allows.
    #[error("the VM has {saved} vCPUs; this host's KVM allows {max}")]
    Vcpus {
        /// Saved count.
        saved: usize,
        /// This host's limit.
        max: usize,
    },
    /// The guest's performance counters exceed this host's.
    #[error("the guest saw a PMU with {saved}; this host's KVM offers {host}")]
    Pmu {
        /// The saved PMU (version and counters).
        saved: String,
        /// This host's.
        host: String,
    },
    /// The vCPUs were saved with different TSC rates.
    #[error("the vCPUs were saved with different TSC rates ({} kHz); a snapshot has one", .rates_khz.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))]
    TscRates {
        /// The rates found.
        rates_khz: Vec<u32>,
    },
    /// The TSC rate differs and cannot be scaled.
    #[error(transparent)]
    Tsc(#[from] TscMismatch),
}

/// The answer to "can this host run it?".
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CompatReport {
    /// Every reason it cannot (empty: it can).
    pub problems: Vec<Problem>,
    /// What happens to the guest's TSC (absent when no vCPU was saved).
    pub tsc: Option<TscPlan>,
    /// MSRs the host lacks that are zero in every vCPU: they hold no
    /// state, so a restore leaves them out.
    pub skipped_msrs: Vec<u32>,
}

impl CompatReport {
    /// Whether the host can run the VM.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// All problems in one message.
    pub fn message(&self) -> String {
        self.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Checks a saved VM's CPU against `host`. `allow_tsc_mismatch` accepts a
/// TSC rate that cannot be kept.
pub fn check(saved: &SavedCpu<'_>, host: &HostCpu, allow_tsc_mismatch: bool) -> CompatReport {
    let mut report = CompatReport::default();
    let p = &mut report.problems;
    let vcpus = &saved.vcpus;
    let guest_vendor = vcpus.first().map(|v| cpuid::vendor(v.cpuid));
    let foreign = [Some(saved.vendor.to_string()), guest_vendor]
        .into_iter()
        .flatten()
        .find(|v| *v != host.vendor);
    if let Some(v) = foreign {
        p.push(Problem::Vendor {
            saved: v,
            host: host.vendor.clone(),
        });
    }
    if vcpus.len() > host.max_vcpus && host.max_vcpus > 0 {
        p.push(Problem::Vcpus {
            saved: vcpus.len(),
            max: host.max_vcpus,
        });
    }
    // The CPU record alone (a migration checks it before any vCPU state
    // exists): its model's features; with vCPUs, theirs too.
    let mut unknown = Vec::new();
    let mut required = FeatureSet::of(saved.cpuid);
    for name in saved.features {
        match crate::feature::by_name(name) {
            Some(f) => required.insert(f),
            // Bits without a name are recorded as "cpuid 0x7.0 ebx bit N".
            None => match crate::feature::parse_unnamed(name) {
                Some(f) => required.insert(f),
                None => unknown.push(name.clone()),
            },
        }
    }
    let offered = FeatureSet::of(&host.offer);
    let mut missing = required.missing_from(&offered);
    let mut lacking_xcr0 = cpuid::xcr0_mask(saved.cpuid) & !cpuid::xcr0_mask(&host.offer);
    for v in vcpus {
        missing = missing.union(&FeatureSet::of(v.cpuid).missing_from(&offered));
        lacking_xcr0 |= cpuid::xcr0_mask(v.cpuid) & !cpuid::xcr0_mask(&host.offer);
    }
    if !missing.is_empty() {
        p.push(Problem::Features {
            missing: missing.names(),
        });
    }
    if !unknown.is_empty() {
        p.push(Problem::UnknownFeatures { names: unknown });
    }
    if lacking_xcr0 != 0 {
        p.push(Problem::Xsave {
            components: xsave::component_names(lacking_xcr0),
        });
    }
    let Some(first) = vcpus.first() else {
        return report;
    };
    let longest = vcpus.iter().map(|v| v.xsave_len).max().unwrap_or(0);
    if longest > host.xsave_size.max(xsave::KVM_XSAVE_SIZE) {
        p.push(Problem::XsaveSize {
            saved: longest,
            host: host.xsave_size,
        });
    }
    let saved_phys = vcpus
        .iter()
        .map(|v| cpuid::phys_bits(v.cpuid))
        .max()
        .unwrap_or(0);
    let host_phys = cpuid::phys_bits(&host.offer);
    if saved_phys > host_phys {
        p.push(Problem::PhysBits {
            saved: saved_phys,
            host: host_phys,
        });
    }
    if let Some(pmu) = pmu_problem(saved.cpuid, &host.offer) {
        p.push(pmu);
    }
    let host_msrs: HashSet<u32> = host.msrs.iter().copied().collect();
    // MSRs the host lacks, and whether any vCPU holds a non-zero value.
    let mut absent: BTreeMap<u32, bool> = BTreeMap::new();
    for (index, value) in vcpus.iter().flat_map(|v| v.msrs.iter()) {
        if !host_msrs.contains(index) {
            *absent.entry(*index).or_default() |= *value != 0;
        }
    }
    let (with_state, without): (Vec<u32>, Vec<u32>) = {
        let (a, b): (Vec<_>, Vec<_>) = absent.into_iter().partition(|(_, state)| *state);
        (
            a.into_iter().map(|(i, _)| i).collect(),
            b.into_iter().map(|(i, _)| i).collect(),
        )
    };
    report.skipped_msrs = without;
    if !with_state.is_empty() {
        report.problems.push(Problem::Msrs {
            msrs: with_state.into_iter().map(msr::describe).collect(),
        });
    }
    let rates: BTreeSet<u32> = vcpus.iter().map(|v| v.tsc_khz).collect();
    if rates.len() > 1 {
        report.problems.push(Problem::TscRates {
            rates_khz: rates.into_iter().collect(),
        });
        return report;
    }
    match tsc::plan(
        first.tsc_khz,
        host.tsc_khz,
        host.tsc_scaling,
        allow_tsc_mismatch,
    ) {
        Ok(plan) => report.tsc = Some(plan),
        Err(e) => report.problems.push(e.into()),
    }
    report
}

/// The architectural PMU of leaf 0xA: version, general-purpose counters,
/// fixed counters.
fn pmu(cpuid: &[CpuidEntry]) -> (u32, u32, u32) {
    match crate::feature::entry(cpuid, 0xa, 0) {
        Some(e) if e.eax & 0xff != 0 => {
            let fixed = if e.eax & 0xff >= 2 { e.edx & 0x1f } else { 0 };
            (e.eax & 0xff, (e.eax >> 8) & 0xff, fixed)
        }
        _ => (0, 0, 0),
    }
}

/// A problem if the guest saw a PMU (leaf 0xA) newer or with more counters
/// than this host's.
fn pmu_problem(saved: &[CpuidEntry], host: &[CpuidEntry]) -> Option<Problem> {
    let (s, h) = (pmu(saved), pmu(host));
    if s.0 <= h.0 && s.1 <= h.1 && s.2 <= h.2 {
        return None;
    }
    let show = |(v, gp, fixed): (u32, u32, u32)| {
        if v == 0 {
            "none".to_string()
        } else {
            format!("version {v}, {gp} general and {fixed} fixed counters")
        }
    };
    Some(Problem::Pmu {
        saved: show(s),
        host: show(h),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature::by_name;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    fn amd() -> [CpuidEntry; 1] {
        [leaf(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65)]
    }

    fn host(ecx1: u32, ebx7: u32, xcr0: u32) -> HostCpu {
        let mut offer = amd().to_vec();
        offer.push(leaf(1, 0, 0, 0, ecx1, 0));
        offer.push(leaf(7, 0, 0, ebx7, 0, 0));
        offer.push(leaf(0xd, 0, xcr0, 0, 0, 0));
        offer.push(leaf(0x8000_0008, 0, 0x3030, 0, 0, 0));
        HostCpu {
            vendor: "AuthenticAMD".into(),
            offer,
            msrs: vec![0x10, 0x1a0],
            tsc_khz: 2_000_000,
            tsc_scaling: false,
            xsave_size: 4096,
            max_vcpus: 2,
            ..Default::default()
        }
    }

    fn saved(ecx1: u32, ebx7: u32, xcr0: u32) -> Vec<CpuidEntry> {
        let mut c = amd().to_vec();
        c.push(leaf(1, 0, 0, 0, ecx1, 0));
        c.push(leaf(7, 0, 0, ebx7, 0, 0));
        c.push(leaf(0xd, 0, xcr0, 0, 0, 0));
        c.push(leaf(0x8000_0008, 0, 0x3028, 0, 0, 0));
        c
    }

    fn cpu<'a>(vcpus: &[SavedVcpu<'a>]) -> SavedCpu<'a> {
        SavedCpu {
            vendor: "AuthenticAMD",
            cpuid: vcpus[0].cpuid,
            features: &[],
            vcpus: vcpus.to_vec(),
        }
    }

    fn vcpu<'a>(cpuid: &'a [CpuidEntry], msrs: &'a [(u32, u64)]) -> SavedVcpu<'a> {
        SavedVcpu {
            cpuid,
            xsave_len: 4096,
            msrs,
            tsc_khz: 2_000_000,
        }
    }

    const AVX: u32 = (1 << 28) | (1 << 26);
    const AVX2: u32 = 1 << 5;
    const AVX512F: u32 = 1 << 16;

    #[test]
    fn a_smaller_guest_runs_on_a_bigger_host() {
        let c = saved(AVX, AVX2, 0x7);
        let r = check(
            &cpu(&[vcpu(&c, &[(0x10, 5)])]),
            &host(AVX, AVX2 | AVX512F, 0xe7),
            false,
        );
        assert!(r.is_ok(), "{}", r.message());
        assert_eq!(
            r.tsc,
            Some(TscPlan::Same {
                host_khz: 2_000_000
            })
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let c = saved(AVX, AVX2 | AVX512F, 0xe7);
        let msrs = [(0x10, 1), (0x3b, 7), (0x6e0, 0)];
        let mut v = vcpu(&c, &msrs);
        v.tsc_khz = 3_000_000;
        v.xsave_len = 8192;
        let mut h = host(AVX, AVX2, 0x7);
        h.vendor = "GenuineIntel".into();
        h.offer[4].eax = 0x3020; // 32 physical address bits
        let r = check(&cpu(&[v, v, v]), &h, false);
        let kinds: Vec<String> = r
            .problems
            .iter()
            .map(|p| {
                serde_json::to_value(p).unwrap()["kind"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "vendor",
                "vcpus",
                "features",
                "xsave",
                "xsave_size",
                "phys_bits",
                "msrs",
                "tsc"
            ]
        );
        assert_eq!(
            r.problems[2].to_string(),
            "this host cannot offer CPU features the guest was given: avx512f"
        );
        assert_eq!(
            r.problems[3].to_string(),
            "this host's KVM does not support XSAVE state the guest could use: AVX-512 opmask, AVX-512 ZMM_Hi256, AVX-512 Hi16_ZMM"
        );
        assert_eq!(
            r.problems[6].to_string(),
            "this host's KVM lacks MSRs that hold guest state: 0x3b (IA32_TSC_ADJUST)"
        );
        assert_eq!(r.skipped_msrs, vec![0x6e0]);
        assert!(r.tsc.is_none());
        assert!(by_name("avx512f").is_some());
    }

    #[test]
    fn the_manifest_record_counts_too() {
        let c = saved(AVX, AVX2, 0x7);
        let v = vcpu(&c, &[]);
        let names = [
            "sha_ni".to_string(),
            "avx2".to_string(),
            "wonderful_new_thing".to_string(),
        ];
        let saved = SavedCpu {
            vendor: "GenuineIntel",
            cpuid: &c,
            features: &names,
            vcpus: vec![v],
        };
        let r = check(&saved, &host(AVX, AVX2, 0x7), false);
        let msgs: Vec<String> = r.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            msgs,
            [
                "the guest ran on a GenuineIntel CPU; this host's CPU is AuthenticAMD (a VM cannot move between CPU vendors)",
                "this host cannot offer CPU features the guest was given: sha_ni",
                "the snapshot's CPU model names features this stasis does not know: wonderful_new_thing",
            ]
        );
    }

    #[test]
    fn pmu_unnamed_bits_and_mixed_rates_are_problems() {
        let mut c = saved(0, 0, 0x3);
        c.push(leaf(0xa, 0, 0x0730_0402, 0, 0, 0x3)); // v2, 4 GP, 3 fixed
        let mut h = host(0, 0, 0x3);
        h.offer.push(leaf(0xa, 0, 0x0730_0202, 0, 0, 0x3)); // 2 GP
        let names = ["cpuid 0x7.2 edx bit 31".to_string()];
        let v = vcpu(&c, &[]);
        let mut w = v;
        w.tsc_khz = 2_100_000;
        let saved = SavedCpu {
            vendor: "AuthenticAMD",
            cpuid: &c,
            features: &names,
            vcpus: vec![v, w],
        };
        let msgs: Vec<String> = check(&saved, &h, false)
            .problems
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            msgs,
            [
                "this host cannot offer CPU features the guest was given: cpuid 0x7.2 edx bit 31",
                "the guest saw a PMU with version 2, 4 general and 3 fixed counters; this host's KVM offers version 2, 2 general and 3 fixed counters",
                "the vCPUs were saved with different TSC rates (2000000, 2100000 kHz); a snapshot has one",
            ]
        );
        h.offer.pop();
        h.offer.push(leaf(0xa, 0, 0x0730_0805, 0, 0, 0x4));
        let r = check(&cpu(&[v]), &h, false);
        assert!(r.is_ok(), "{}", r.message());
    }

    #[test]
    fn tsc_mismatch_can_be_accepted() {
        let c = saved(0, 0, 0x3);
        let mut v = vcpu(&c, &[]);
        v.tsc_khz = 3_000_000;
        let r = check(&cpu(&[v]), &host(0, 0, 0x3), true);
        assert!(r.is_ok(), "{}", r.message());
        assert_eq!(
            r.tsc,
            Some(TscPlan::Mismatch {
                saved_khz: 3_000_000,
                host_khz: 2_000_000
            })
        );
        let mut h = host(0, 0, 0x3);
        h.tsc_scaling = true;
        let r = check(&cpu(&[v]), &h, false);
        assert_eq!(
            r.tsc,
            Some(TscPlan::Scale {
                saved_khz: 3_000_000,
                host_khz: 2_000_000
            })
        );
    }
}
