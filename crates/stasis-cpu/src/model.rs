//! CPU models: `host` and the x86-64 psABI micro-architecture levels, with
//! `+feature` / `-feature` changes on top, resolved against what a host
//! offers into the exact feature set a guest sees.
//!
//! The levels are those of the System V x86-64 psABI ("x86-64-v2" etc.):
//!
//! | level | adds |
//! |---|---|
//! | `x86-64` | cmov, cx8, fpu, fxsr, mmx, syscall, sse, sse2 (with lm) |
//! | `x86-64-v2` | cx16, lahf_lm, popcnt, pni (SSE3), sse4_1, sse4_2, ssse3 |
//! | `x86-64-v3` | avx, avx2, bmi1, bmi2, f16c, fma, abm (LZCNT), movbe, xsave |
//! | `x86-64-v4` | avx512f, avx512bw, avx512cd, avx512dq, avx512vl |
//!
//! Every baseline model also has the architectural features all x86-64
//! processors share ([`ARCHITECTURAL`]) and what a KVM guest needs: x2apic
//! and the hypervisor bit always, and where the host has them the
//! TSC-deadline timer, ARAT and KVM's paravirtual features
//! ([`KVM_GUEST_OPTIONAL`]). Nothing else: no PMU, no nested
//! virtualisation, no security-mitigation or power-management bits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::feature::{self, FeatureBit, FeatureSet, UnknownFeature};

/// A named CPU model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CpuModel {
    /// Everything the host's KVM offers (except nested virtualisation):
    /// fastest, but snapshots restore only on hosts with the same features.
    #[default]
    #[serde(rename = "host")]
    Host,
    /// psABI baseline x86-64.
    #[serde(rename = "x86-64", alias = "x86-64-v1")]
    X86_64,
    /// psABI x86-64-v2 (Nehalem, Jaguar and later).
    #[serde(rename = "x86-64-v2")]
    X86_64V2,
    /// psABI x86-64-v3 (Haswell, Excavator and later).
    #[serde(rename = "x86-64-v3")]
    X86_64V3,
    /// psABI x86-64-v4 (Skylake-X, Zen 4 and later).
    #[serde(rename = "x86-64-v4")]
    X86_64V4,
}

impl CpuModel {
    /// Every model, in the order `stasis cpu-models` lists them.
    pub const ALL: [CpuModel; 5] = [
        CpuModel::Host,
        CpuModel::X86_64,
        CpuModel::X86_64V2,
        CpuModel::X86_64V3,
        CpuModel::X86_64V4,
    ];

    /// The model's name as given to `--cpu`.
    pub fn name(self) -> &'static str {
        match self {
            CpuModel::Host => "host",
            CpuModel::X86_64 => "x86-64",
            CpuModel::X86_64V2 => "x86-64-v2",
            CpuModel::X86_64V3 => "x86-64-v3",
            CpuModel::X86_64V4 => "x86-64-v4",
        }
    }

    /// One line on what the model is for.
    pub fn description(self) -> &'static str {
        match self {
            CpuModel::Host => {
                "everything this host's KVM offers; restores only on the same kind of host"
            }
            CpuModel::X86_64 => "psABI baseline: SSE2, any x86-64 host",
            CpuModel::X86_64V2 => "psABI v2: SSE4.2, POPCNT, CMPXCHG16B (Intel Nehalem 2008, AMD Bulldozer/Jaguar and later)",
            CpuModel::X86_64V3 => "psABI v3: AVX2, BMI1/2, FMA, MOVBE (Haswell, Zen and later)",
            CpuModel::X86_64V4 => "psABI v4: AVX-512 F/BW/CD/DQ/VL (Skylake-X, Zen 4 and later)",
        }
    }

    /// Whether the model is a fixed baseline (everything but `host`).
    pub fn is_baseline(self) -> bool {
        self != CpuModel::Host
    }

    /// The psABI features of the level (cumulative), by name.
    pub fn level_features(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let levels: &[&[&str]] = match self {
            CpuModel::Host => &[],
            CpuModel::X86_64 => &[PSABI_BASELINE],
            CpuModel::X86_64V2 => &[PSABI_BASELINE, PSABI_V2],
            CpuModel::X86_64V3 => &[PSABI_BASELINE, PSABI_V2, PSABI_V3],
            CpuModel::X86_64V4 => &[PSABI_BASELINE, PSABI_V2, PSABI_V3, PSABI_V4],
        };
        for l in levels {
            v.extend_from_slice(l);
        }
        v
    }
}

impl fmt::Display for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CpuModel {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let s = s.trim();
        if s == "x86-64-v1" {
            return Ok(CpuModel::X86_64);
        }
        CpuModel::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| ModelError::UnknownModel(s.to_string()))
    }
}

/// The psABI baseline (x86-64 itself).
pub const PSABI_BASELINE: &[&str] = &[
    "cmov", "cx8", "fpu", "fxsr", "mmx", "syscall", "sse", "sse2", "lm",
];
/// What x86-64-v2 adds.
pub const PSABI_V2: &[&str] = &[
    "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3",
];
/// What x86-64-v3 adds (the psABI's OSXSAVE is offered as XSAVE; the
/// guest's CR4 sets OSXSAVE).
pub const PSABI_V3: &[&str] = &[
    "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
];
/// What x86-64-v4 adds.
pub const PSABI_V4: &[&str] = &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];

/// Features every x86-64 processor has besides the psABI list, which
/// operating systems take for granted (paging, TSC, MSRs, local APIC,
/// machine checks, SYSENTER, NX). Part of every baseline model.
pub const ARCHITECTURAL: &[&str] = &[
    "vme", "de", "pse", "tsc", "msr", "pae", "mce", "sep", "mtrr", "pge", "mca", "pat", "pse36",
    "clflush", "nx",
];

/// What every KVM guest of a baseline model gets: the x2APIC KVM
/// emulates and the bit that says "running under a hypervisor".
pub const KVM_GUEST_REQUIRED: &[&str] = &["x2apic", "hypervisor"];

/// What a KVM guest of a baseline model gets where the host offers it:
/// the TSC-deadline timer, an always-running APIC timer, and KVM's
/// paravirtual clock and helpers (all standard in KVM since Linux 5.8).
pub const KVM_GUEST_OPTIONAL: &[&str] = &[
    "tsc_deadline_timer",
    "arat",
    "kvmclock",
    "kvm_nop_io_delay",
    "kvmclock2",
    "kvm_async_pf",
    "kvm_steal_time",
    "kvm_pv_eoi",
    "kvm_pv_unhalt",
    "kvm_pv_tlb_flush",
    "kvm_async_pf_vmexit",
    "kvm_pv_send_ipi",
    "kvm_poll_control",
    "kvm_pv_sched_yield",
    "kvm_async_pf_int",
    "kvmclock_stable_bit",
];

/// Features that need saved state stasis does not save (nested
/// virtualisation): hidden from every model, `host` included.
pub const NESTED: &[&str] = &["vmx", "svm"];

/// `(feature, requires)`: a feature that makes no sense without another.
/// Removing the second removes the first; adding the first without the
/// second is refused.
pub const REQUIRES: &[(&str, &str)] = &[
    ("ssse3", "pni"),
    ("sse4_1", "ssse3"),
    ("sse4_2", "sse4_1"),
    ("avx", "xsave"),
    ("fma", "avx"),
    ("f16c", "avx"),
    ("avx2", "avx"),
    ("vaes", "avx"),
    ("vpclmulqdq", "avx"),
    ("avx_vnni", "avx2"),
    ("avx512f", "avx"),
    ("avx512dq", "avx512f"),
    ("avx512ifma", "avx512f"),
    ("avx512cd", "avx512f"),
    ("avx512bw", "avx512f"),
    ("avx512vl", "avx512f"),
    ("avx512vbmi", "avx512bw"),
    ("avx512_vbmi2", "avx512f"),
    ("avx512_vnni", "avx512f"),
    ("avx512_bitalg", "avx512f"),
    ("avx512_vpopcntdq", "avx512f"),
    ("avx512_bf16", "avx512vl"),
    ("avx512_fp16", "avx512bw"),
    ("xsaveopt", "xsave"),
    ("xsavec", "xsave"),
    ("xgetbv1", "xsave"),
    ("xsaves", "xsave"),
    ("amx_tile", "xfd"),
    ("xfd", "xsave"),
    ("amx_bf16", "amx_tile"),
    ("amx_int8", "amx_tile"),
    ("pku", "xsave"),
];

/// Errors in choosing or resolving a CPU model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// No such model.
    #[error("unknown CPU model '{0}' (models: host, x86-64, x86-64-v2, x86-64-v3, x86-64-v4)")]
    UnknownModel(String),
    /// No such feature.
    #[error(transparent)]
    UnknownFeature(#[from] UnknownFeature),
    /// A feature change is not `+NAME` or `-NAME`.
    #[error("cpu feature change '{0}': expected +NAME or -NAME")]
    BadChange(String),
    /// A feature added without one it needs.
    #[error(
        "+{feature} needs {needs}, which the model with these changes lacks (add +{needs} too)"
    )]
    NeedsFeature {
        /// The feature added.
        feature: String,
        /// What it needs.
        needs: String,
    },
    /// A hidden feature asked for.
    #[error("+{0}: nested virtualisation is not offered (its state is not saved in snapshots)")]
    Nested(String),
    /// A bit the CPU or KVM sets at run time, which a model cannot change.
    #[error("{change}: {feature} is not a model choice ({why})")]
    NotChangeable {
        /// The change as given, e.g. `-osxsave`.
        change: String,
        /// The feature.
        feature: String,
        /// Why it cannot be changed.
        why: &'static str,
    },
    /// The host cannot offer what the model needs.
    #[error("this host cannot offer CPU model {model}: it lacks {}", .missing.join(", "))]
    Missing {
        /// The model with its changes, e.g. `x86-64-v3,+avx512f`.
        model: String,
        /// The features the host lacks.
        missing: Vec<String>,
    },
}

/// One `+NAME` or `-NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureChange {
    /// The feature.
    pub feature: FeatureBit,
    /// Added (`+`) or removed (`-`).
    pub add: bool,
}

impl FromStr for FeatureChange {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let s = s.trim();
        let (add, name) = match s.as_bytes().first() {
            Some(b'+') => (true, &s[1..]),
            Some(b'-') => (false, &s[1..]),
            Some(_) => (true, s),
            None => return Err(ModelError::BadChange(s.to_string())),
        };
        if name.is_empty() || name.starts_with(['+', '-']) {
            return Err(ModelError::BadChange(s.to_string()));
        }
        Ok(Self {
            feature: feature::lookup(name)?,
            add,
        })
    }
}

impl fmt::Display for FeatureChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", if self.add { '+' } else { '-' }, self.feature)
    }
}

/// Feature changes on top of a model, in the order given (a later change
/// of the same feature wins).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureChanges(pub Vec<FeatureChange>);

impl FeatureChanges {
    /// No changes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The changes as `+a,-b` strings.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

impl FromStr for FeatureChanges {
    type Err = ModelError;
    /// Parses `+avx2,-popcnt` (commas or whitespace between changes).
    fn from_str(s: &str) -> Result<Self, ModelError> {
        s.split(|c: char| c == ',' || c.is_whitespace())
            .filter(|p| !p.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
}

impl fmt::Display for FeatureChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_strings().join(","))
    }
}

impl Serialize for FeatureChanges {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_strings().serialize(s)
    }
}

impl<'de> Deserialize<'de> for FeatureChanges {
    /// A list of changes (`["+avx2", "-popcnt"]`) or one string
    /// (`"+avx2,-popcnt"`).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(String),
            Many(Vec<String>),
        }
        let text = match Form::deserialize(d)? {
            Form::One(s) => s,
            Form::Many(v) => v.join(","),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A model with its feature changes: what `--cpu` and `--cpu-features`
/// choose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuSpec {
    /// The model.
    pub model: CpuModel,
    /// Changes on top of it.
    pub changes: FeatureChanges,
}

impl fmt::Display for CpuSpec {
    /// `x86-64-v2` or `x86-64-v2,+avx2,-popcnt`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.model.name())?;
        for c in &self.changes.0 {
            write!(f, ",{c}")?;
        }
        Ok(())
    }
}

/// The features a model gives a guest on a given host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    /// Exactly the features the guest's CPUID will advertise.
    pub features: FeatureSet,
}

fn names_to_set(names: &[&str]) -> FeatureSet {
    names
        .iter()
        .map(|n| {
            feature::by_name(n).unwrap_or_else(|| panic!("model table names unknown feature {n}"))
        })
        .collect()
}

fn requires() -> Vec<(FeatureBit, FeatureBit)> {
    REQUIRES
        .iter()
        .map(|(a, b)| {
            let f = |n: &str| feature::by_name(n).unwrap_or_else(|| panic!("unknown feature {n}"));
            (f(a), f(b))
        })
        .collect()
}

/// Removes `f` and everything that (transitively) requires it.
fn remove_with_dependents(set: &mut FeatureSet, f: FeatureBit, deps: &[(FeatureBit, FeatureBit)]) {
    if !set.remove(&f) {
        return;
    }
    for &(dependent, needs) in deps {
        if needs == f {
            remove_with_dependents(set, dependent, deps);
        }
    }
}

impl CpuSpec {
    /// A model without changes.
    pub fn new(model: CpuModel) -> Self {
        Self {
            model,
            changes: FeatureChanges::default(),
        }
    }

    /// The exact feature set the guest gets on a host whose KVM offers
    /// `offer`, or the features the host lacks.
    pub fn resolve(&self, offer: &FeatureSet) -> Result<ResolvedModel, ModelError> {
        let deps = requires();
        let nested = names_to_set(NESTED);
        let mut features = if self.model.is_baseline() {
            let mut f = names_to_set(&self.model.level_features())
                .union(&names_to_set(ARCHITECTURAL))
                .union(&names_to_set(KVM_GUEST_REQUIRED));
            for o in names_to_set(KVM_GUEST_OPTIONAL).iter() {
                if offer.contains(o) {
                    f.insert(*o);
                }
            }
            f
        } else {
            let mut f = offer.clone();
            for n in nested.iter() {
                f.remove(n);
            }
            // SVM's feature word means nothing without SVM.
            f = f
                .iter()
                .filter(|b| b.word.leaf != 0x8000_000a)
                .copied()
                .collect();
            f
        };
        for c in &self.changes.0 {
            if feature::DYNAMIC_BITS.contains(&c.feature) {
                return Err(ModelError::NotChangeable {
                    change: c.to_string(),
                    feature: c.feature.name(),
                    why: "the CPU sets it from CR4, the APIC base MSR or the vCPU count",
                });
            }
            if c.feature.word.leaf == 0x8000_000a {
                return Err(ModelError::NotChangeable {
                    change: c.to_string(),
                    feature: c.feature.name(),
                    why: "SVM sub-features; nested virtualisation is not offered",
                });
            }
            if c.add {
                if nested.contains(&c.feature) {
                    return Err(ModelError::Nested(c.feature.name()));
                }
                features.insert(c.feature);
            } else {
                remove_with_dependents(&mut features, c.feature, &deps);
            }
        }
        for c in self.changes.0.iter().filter(|c| c.add) {
            if !features.contains(&c.feature) {
                continue; // removed again by a later change
            }
            for &(dependent, needs) in &deps {
                if dependent == c.feature && !features.contains(&needs) {
                    return Err(ModelError::NeedsFeature {
                        feature: c.feature.name(),
                        needs: needs.name(),
                    });
                }
            }
        }
        let missing = features.missing_from(offer);
        if !missing.is_empty() {
            return Err(ModelError::Missing {
                model: self.to_string(),
                missing: missing.names(),
            });
        }
        Ok(ResolvedModel { features })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> FeatureSet {
        names_to_set(names)
    }

    /// A host offering everything named in the model tables and more.
    fn big_host() -> FeatureSet {
        let mut all: Vec<&str> = Vec::new();
        for l in [
            PSABI_BASELINE,
            PSABI_V2,
            PSABI_V3,
            PSABI_V4,
            ARCHITECTURAL,
            KVM_GUEST_REQUIRED,
            KVM_GUEST_OPTIONAL,
        ] {
            all.extend_from_slice(l);
        }
        all.extend_from_slice(&["vmx", "sha_ni", "rdrand", "pclmulqdq", "aes", "avx512_vnni"]);
        set(&all)
    }

    #[test]
    fn model_names_round_trip() {
        for m in CpuModel::ALL {
            assert_eq!(m.name().parse::<CpuModel>().unwrap(), m);
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.name())
            );
        }
        assert_eq!("x86-64-v1".parse::<CpuModel>().unwrap(), CpuModel::X86_64);
        let e = "x86-64-v5".parse::<CpuModel>().unwrap_err().to_string();
        assert!(
            e.starts_with("unknown CPU model 'x86-64-v5' (models: host,"),
            "{e}"
        );
    }

    #[test]
    fn levels_are_exactly_the_psabi_lists() {
        let v2 = CpuSpec::new(CpuModel::X86_64V2)
            .resolve(&big_host())
            .unwrap()
            .features;
        for f in PSABI_BASELINE.iter().chain(PSABI_V2) {
            assert!(v2.contains(&feature::by_name(f).unwrap()), "v2 lacks {f}");
        }
        for f in PSABI_V3
            .iter()
            .chain(PSABI_V4)
            .chain(&["sha_ni", "aes", "vmx"])
        {
            assert!(!v2.contains(&feature::by_name(f).unwrap()), "v2 has {f}");
        }
        let v3 = CpuSpec::new(CpuModel::X86_64V3)
            .resolve(&big_host())
            .unwrap()
            .features;
        assert!(v3.contains(&feature::by_name("avx2").unwrap()));
        assert!(v3.contains(&feature::by_name("movbe").unwrap()));
        assert!(!v3.contains(&feature::by_name("avx512f").unwrap()));
        let v4 = CpuSpec::new(CpuModel::X86_64V4)
            .resolve(&big_host())
            .unwrap()
            .features;
        for f in PSABI_V4 {
            assert!(v4.contains(&feature::by_name(f).unwrap()), "v4 lacks {f}");
        }
        assert!(!v4.contains(&feature::by_name("avx512_vnni").unwrap()));
        // Each level contains the one below.
        assert!(v2.missing_from(&v3).is_empty());
        assert!(v3.missing_from(&v4).is_empty());
        // And what a KVM guest needs.
        for f in [
            "x2apic",
            "hypervisor",
            "tsc_deadline_timer",
            "kvmclock",
            "kvmclock_stable_bit",
        ] {
            assert!(v2.contains(&feature::by_name(f).unwrap()), "v2 lacks {f}");
        }
    }

    #[test]
    fn optional_guest_features_follow_the_host() {
        let mut host = big_host();
        host.remove(&feature::by_name("tsc_deadline_timer").unwrap());
        host.remove(&feature::by_name("kvm_pv_unhalt").unwrap());
        let v2 = CpuSpec::new(CpuModel::X86_64V2)
            .resolve(&host)
            .unwrap()
            .features;
        assert!(!v2.contains(&feature::by_name("tsc_deadline_timer").unwrap()));
        assert!(!v2.contains(&feature::by_name("kvm_pv_unhalt").unwrap()));
    }

    #[test]
    fn missing_features_are_named() {
        let mut host = big_host();
        for f in ["avx2", "fma"] {
            host.remove(&feature::by_name(f).unwrap());
        }
        let e = CpuSpec::new(CpuModel::X86_64V3).resolve(&host).unwrap_err();
        assert_eq!(
            e,
            ModelError::Missing {
                model: "x86-64-v3".into(),
                missing: vec!["fma".into(), "avx2".into()],
            }
        );
        assert_eq!(
            e.to_string(),
            "this host cannot offer CPU model x86-64-v3: it lacks fma, avx2"
        );
        CpuSpec::new(CpuModel::X86_64V2).resolve(&host).unwrap();
    }

    #[test]
    fn host_model_is_the_offer_without_nested_virtualisation() {
        let host = big_host();
        let f = CpuSpec::new(CpuModel::Host)
            .resolve(&host)
            .unwrap()
            .features;
        assert!(f.contains(&feature::by_name("sha_ni").unwrap()));
        assert!(!f.contains(&feature::by_name("vmx").unwrap()));
        let spec = CpuSpec {
            model: CpuModel::Host,
            changes: "+vmx".parse().unwrap(),
        };
        assert_eq!(
            spec.resolve(&host).unwrap_err(),
            ModelError::Nested("vmx".into())
        );
    }

    #[test]
    fn changes_add_remove_and_follow_dependencies() {
        let spec = CpuSpec {
            model: CpuModel::X86_64V3,
            changes: "-avx,+sha_ni".parse().unwrap(),
        };
        let f = spec.resolve(&big_host()).unwrap().features;
        for gone in ["avx", "avx2", "fma", "f16c"] {
            assert!(!f.contains(&feature::by_name(gone).unwrap()), "{gone} kept");
        }
        assert!(f.contains(&feature::by_name("sha_ni").unwrap()));
        assert!(f.contains(&feature::by_name("bmi2").unwrap()));
        let spec = CpuSpec {
            model: CpuModel::X86_64V2,
            changes: "+avx2".parse().unwrap(),
        };
        assert_eq!(
            spec.resolve(&big_host()).unwrap_err().to_string(),
            "+avx2 needs avx, which the model with these changes lacks (add +avx too)"
        );
        let spec = CpuSpec {
            model: CpuModel::X86_64V2,
            changes: "+xsave,+avx,+avx2".parse().unwrap(),
        };
        spec.resolve(&big_host()).unwrap();
        let spec = CpuSpec {
            model: CpuModel::X86_64V2,
            changes: "+rdtscp".parse().unwrap(),
        };
        assert_eq!(
            spec.resolve(&big_host()).unwrap_err().to_string(),
            "this host cannot offer CPU model x86-64-v2,+rdtscp: it lacks rdtscp"
        );
    }

    #[test]
    fn runtime_bits_and_svm_words_are_not_model_choices() {
        for change in ["-osxsave", "+ospke", "-apic", "+ht", "-npt"] {
            let spec = CpuSpec {
                model: CpuModel::Host,
                changes: change.parse().unwrap(),
            };
            let e = spec.resolve(&big_host()).unwrap_err();
            assert!(
                matches!(e, ModelError::NotChangeable { .. }),
                "{change}: {e:?}"
            );
            assert!(e.to_string().starts_with(&format!("{change}: ")), "{e}");
        }
    }

    #[test]
    fn dependencies_follow_linux() {
        let mut host = big_host();
        for f in [
            "avx512vbmi",
            "avx512_fp16",
            "avx512_bf16",
            "amx_tile",
            "xfd",
        ] {
            host.insert(feature::by_name(f).unwrap());
        }
        let resolve = |changes: &str| {
            CpuSpec {
                model: CpuModel::X86_64V4,
                changes: changes.parse().unwrap(),
            }
            .resolve(&host)
        };
        let f = resolve("+avx512vbmi,+avx512_fp16,+avx512_bf16,-avx512bw")
            .unwrap()
            .features;
        for gone in ["avx512vbmi", "avx512_fp16", "avx512bw"] {
            assert!(!f.contains(&feature::by_name(gone).unwrap()), "{gone} kept");
        }
        assert!(f.contains(&feature::by_name("avx512_bf16").unwrap()));
        let f = resolve("+avx512_bf16,-avx512vl").unwrap().features;
        assert!(!f.contains(&feature::by_name("avx512_bf16").unwrap()));
        assert_eq!(
            resolve("+amx_tile").unwrap_err().to_string(),
            "+amx_tile needs xfd, which the model with these changes lacks (add +xfd too)"
        );
        resolve("+xfd,+amx_tile").unwrap();
    }

    #[test]
    fn change_syntax() {
        let c: FeatureChanges = "+avx2, -popcnt sse4.2".parse().unwrap();
        assert_eq!(c.to_strings(), vec!["+avx2", "-popcnt", "+sse4_2"]);
        assert!(matches!(
            "+".parse::<FeatureChange>(),
            Err(ModelError::BadChange(_))
        ));
        assert!(matches!(
            "++avx".parse::<FeatureChange>(),
            Err(ModelError::BadChange(_))
        ));
        assert!(matches!(
            "+avx9".parse::<FeatureChange>(),
            Err(ModelError::UnknownFeature(_))
        ));
        let from_list: FeatureChanges = serde_json::from_str(r#"["+avx2","-popcnt"]"#).unwrap();
        let from_text: FeatureChanges = serde_json::from_str(r#""+avx2,-popcnt""#).unwrap();
        assert_eq!(from_list, from_text);
        assert_eq!(
            serde_json::to_string(&from_list).unwrap(),
            r#"["+avx2","-popcnt"]"#
        );
        let spec = CpuSpec {
            model: CpuModel::X86_64V2,
            changes: from_list,
        };
        assert_eq!(spec.to_string(), "x86-64-v2,+avx2,-popcnt");
    }
}
