use super::*;
use crate::model::{
    CpuModel, ARCHITECTURAL, KVM_GUEST_OPTIONAL, KVM_GUEST_REQUIRED, PSABI_BASELINE, PSABI_V2,
    PSABI_V3, PSABI_V4,
};

use crate::reference::{amd_offer, intel_offer};

fn names(list: &[&[&str]]) -> FeatureSet {
    list.iter()
        .flat_map(|l| l.iter())
        .map(|n| feature::by_name(n).unwrap())
        .collect()
}

fn template(model: CpuModel, offer: &[CpuidEntry]) -> GuestCpuid {
    guest_template(&CpuSpec::new(model), offer, 1 << 32).unwrap()
}

fn leaf(c: &GuestCpuid, f: u32, i: u32) -> Option<&CpuidEntry> {
    feature::entry(&c.cpuid, f, i)
}

/// The KVM features both test hosts offer.
fn kvm_optional_offered() -> FeatureSet {
    let both = FeatureSet::of(&amd_offer());
    names(&[KVM_GUEST_OPTIONAL])
        .iter()
        .filter(|f| both.contains(f))
        .copied()
        .collect()
}

#[test]
fn each_level_is_the_psabi_level_plus_what_a_kvm_guest_needs() {
    let levels: [(CpuModel, &[&[&str]]); 4] = [
        (CpuModel::X86_64, &[PSABI_BASELINE]),
        (CpuModel::X86_64V2, &[PSABI_BASELINE, PSABI_V2]),
        (CpuModel::X86_64V3, &[PSABI_BASELINE, PSABI_V2, PSABI_V3]),
        (
            CpuModel::X86_64V4,
            &[PSABI_BASELINE, PSABI_V2, PSABI_V3, PSABI_V4],
        ),
    ];
    for (model, lists) in levels {
        let want = names(lists)
            .union(&names(&[ARCHITECTURAL, KVM_GUEST_REQUIRED]))
            .union(&kvm_optional_offered());
        let intel = template(model, &intel_offer());
        assert_eq!(intel.features.names(), want.names(), "{model} on Intel");
        // This AMD host's KVM leaves LZCNT (abm) out of leaf 0x80000001,
        // so it offers the levels below v3 only.
        if matches!(model, CpuModel::X86_64 | CpuModel::X86_64V2) {
            let amd = template(model, &amd_offer());
            assert_eq!(amd.features.names(), want.names(), "{model} on AMD");
        }
    }
}

#[test]
fn models_a_host_cannot_offer_name_what_is_missing() {
    let e = guest_template(&CpuSpec::new(CpuModel::X86_64V4), &amd_offer(), 1 << 32).unwrap_err();
    assert_eq!(
        e.to_string(),
        "this host cannot offer CPU model x86-64-v4: it lacks avx512f, avx512dq, avx512cd, avx512bw, avx512vl, abm"
    );
    let e = guest_template(&CpuSpec::new(CpuModel::X86_64V3), &amd_offer(), 1 << 32).unwrap_err();
    assert_eq!(
        e.to_string(),
        "this host cannot offer CPU model x86-64-v3: it lacks abm"
    );
    let spec = CpuSpec {
        model: CpuModel::X86_64V3,
        changes: "-abm".parse().unwrap(),
    };
    guest_template(&spec, &amd_offer(), 1 << 32).unwrap();
}

#[test]
fn xsave_components_follow_the_model() {
    let v2 = template(CpuModel::X86_64V2, &amd_offer());
    assert_eq!(v2.xcr0, 0);
    assert!(leaf(&v2, 0xd, 0).is_none() && leaf(&v2, 0xd, 2).is_none());
    let v3 = template(CpuModel::X86_64V3, &intel_offer());
    assert_eq!(v3.xcr0, 0x7);
    let d0 = leaf(&v3, 0xd, 0).unwrap();
    assert_eq!((d0.eax, d0.edx, d0.ecx), (0x7, 0, 0x340));
    assert_eq!(
        leaf(&v3, 0xd, 1).unwrap().eax,
        0,
        "no xsaveopt/xsavec in v3"
    );
    assert!(leaf(&v3, 0xd, 2).is_some());
    assert!(leaf(&v3, 0xd, 9).is_none(), "PKRU is not in v3");
    let v4 = template(CpuModel::X86_64V4, &intel_offer());
    assert_eq!(v4.xcr0, 0xe7);
    assert_eq!(leaf(&v4, 0xd, 0).unwrap().ecx, 0xa80);
    let host = template(CpuModel::Host, &intel_offer());
    assert_eq!(host.xcr0, 0x2e7);
    let minus = guest_template(
        &CpuSpec {
            model: CpuModel::Host,
            changes: "-avx512f".parse().unwrap(),
        },
        &intel_offer(),
        1 << 32,
    )
    .unwrap();
    assert_eq!(minus.xcr0, 0x207);
    assert!(!minus
        .features
        .contains(&feature::by_name("avx512vl").unwrap()));
}

#[test]
fn baselines_hide_what_no_level_defines() {
    let v3 = template(CpuModel::X86_64V3, &intel_offer());
    // No PMU, no Intel PT, no SVM, no power management.
    assert_eq!(leaf(&v3, 0xa, 0).unwrap().eax, 0);
    assert_eq!(leaf(&v3, 0x14, 0).unwrap().ebx, 0);
    assert_eq!(leaf(&v3, 6, 0).unwrap().eax, 4, "ARAT only");
    assert_eq!(leaf(&v3, 0x8000_0007, 0).unwrap().edx, 0, "no invtsc");
    // Address sizes are normalised.
    assert_eq!(leaf(&v3, 0x8000_0008, 0).unwrap().eax & 0xffff, 0x3028);
    assert_eq!(phys_bits(&v3.cpuid), 40);
    let big = guest_template(&CpuSpec::new(CpuModel::X86_64V3), &intel_offer(), 1 << 42).unwrap();
    assert_eq!(phys_bits(&big.cpuid), 42);
    // The vendor, family and cache leaves are the host's.
    assert_eq!(vendor(&v3.cpuid), "GenuineIntel");
    assert_eq!(leaf(&v3, 1, 0).unwrap().eax, 0x0006_06a6);
    assert_eq!(leaf(&v3, 4, 1).unwrap().eax, 0x0400_0122);
    let amd = template(CpuModel::X86_64V2, &amd_offer());
    assert_eq!(leaf(&amd, 0x8000_000a, 0).unwrap().eax, 0, "no SVM");
    assert_eq!(leaf(&amd, 0x8000_001f, 0).unwrap().eax, 0, "no SEV");
    assert_eq!(leaf(&amd, 0x8000_0021, 0).unwrap().eax, 0);
    assert_eq!(
        leaf(&amd, 0x8000_001d, 0).unwrap().eax,
        0x121,
        "caches kept"
    );
}

#[test]
fn amd_mirrors_leaf_1_edx_in_the_extended_leaf() {
    let amd = template(CpuModel::X86_64V2, &amd_offer());
    let l1 = leaf(&amd, 1, 0).unwrap().edx;
    let ext = leaf(&amd, 0x8000_0001, 0).unwrap().edx;
    assert_eq!(ext & 0x0183_f3ff, l1 & 0x0183_f3ff);
    assert_ne!(ext & (1 << 29), 0, "lm");
    let intel = template(CpuModel::X86_64V2, &intel_offer());
    assert_eq!(leaf(&intel, 0x8000_0001, 0).unwrap().edx & 0x0183_f3ff, 0);
}

#[test]
fn host_model_keeps_the_offer_but_hides_nested_virtualisation() {
    let mut offer = intel_offer();
    offer[1].ecx |= 1 << 5; // vmx
    let host = template(CpuModel::Host, &offer);
    assert_eq!(leaf(&host, 1, 0).unwrap().ecx & (1 << 5), 0);
    let mut want = FeatureSet::of(&offer);
    want.remove(&feature::by_name("vmx").unwrap());
    assert_eq!(host.features, want);
    assert_eq!(
        leaf(&host, 0xa, 0).unwrap().eax,
        0x0804_3202,
        "host keeps its PMU"
    );
}

#[test]
fn host_base_fills_in_what_kvm_leaves_out() {
    let mut supported = amd_offer();
    supported[1].ecx = (1 << 13) | (1 << 21);
    let base = host_base(&supported, true);
    let ecx = feature::entry(&base, 1, 0).unwrap().ecx;
    for bit in [26, 28, 24, 31, 13, 21] {
        assert_ne!(ecx & (1 << bit), 0, "bit {bit}");
    }
    let base = host_base(&supported, false);
    assert_eq!(feature::entry(&base, 1, 0).unwrap().ecx & (1 << 24), 0);
}

#[test]
fn per_vcpu_topology_and_timing() {
    let t = template(CpuModel::X86_64V2, &intel_offer());
    let c = for_vcpu(&t.cpuid, 1, 2, 2_500_000);
    let l = |f, i| *feature::entry(&c, f, i).unwrap();
    assert_eq!(l(1, 0).ebx >> 24, 1);
    assert_eq!((l(1, 0).ebx >> 16) & 0xff, 2);
    assert_ne!(l(1, 0).edx & (1 << 28), 0, "HTT with 2 vCPUs");
    assert_eq!(l(0xb, 0).edx, 1);
    assert_eq!(l(0x4000_0000, 0).eax, TIMING_LEAF);
    assert_eq!(l(TIMING_LEAF, 0).eax, 2_500_000);
    assert_eq!(l(4, 0).eax >> 26, 1);
    let one = for_vcpu(&t.cpuid, 0, 1, 2_500_000);
    assert_eq!(feature::entry(&one, 1, 0).unwrap().edx & (1 << 28), 0);
    // Topology does not change the feature set.
    assert_eq!(FeatureSet::of(&c), t.features);
}

#[test]
fn host_model_keeps_supervisor_component_subleaves() {
    let mut offer = intel_offer();
    // A host with CET supervisor state (component 12) in XSS.
    let d1 = offer
        .iter_mut()
        .find(|e| e.function == 0xd && e.index == 1)
        .unwrap();
    d1.ecx |= 1 << 12;
    offer.push(CpuidEntry {
        function: 0xd,
        index: 12,
        flags: 1,
        eax: 24,
        ecx: 1,
        ..Default::default()
    });
    let host = template(CpuModel::Host, &offer);
    assert_eq!(leaf(&host, 0xd, 12).unwrap().eax, 24);
    let v2 = template(CpuModel::X86_64V2, &offer);
    assert!(leaf(&v2, 0xd, 12).is_none());
}

#[test]
fn a_host_without_an_address_width_gets_the_architectural_default() {
    let mut offer = amd_offer();
    for e in offer.iter_mut().filter(|e| e.function == 0x8000_0008) {
        e.eax &= !0xff;
    }
    let v2 = template(CpuModel::X86_64V2, &offer);
    assert_eq!(phys_bits(&v2.cpuid), 36);
}
