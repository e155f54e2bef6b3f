//! CPU features: where each lives in CPUID, what it is called, and the set
//! of features a CPUID table advertises.
//!
//! A feature is one bit of a *feature word* (a register of a CPUID leaf,
//! e.g. leaf 7 subleaf 0 EBX). Names are Linux's `/proc/cpuinfo` names
//! ([`crate::names`]), plus KVM's paravirtual features (leaf 0x40000001)
//! and a few bits Linux does not list. Bits that change at run time with
//! guest state (OSXSAVE, OSPKE, APIC) are not features here.

use std::collections::BTreeSet;
use std::fmt;

use stasis_snapshot::CpuidEntry;

use crate::names::{EXTRA_FEATURES, KVM_PV_FEATURES, LINUX_FEATURES};

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl Reg {
    /// The register's value in `e`.
    pub fn get(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    /// A mutable reference to the register in `e`.
    pub fn get_mut(self, e: &mut CpuidEntry) -> &mut u32 {
        match self {
            Reg::Eax => &mut e.eax,
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        }
    }
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        })
    }
}

/// One register of one CPUID leaf that holds feature bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Word {
    /// Leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input).
    pub subleaf: u32,
    /// Output register.
    pub reg: Reg,
}

/// The leaf holding KVM's paravirtual feature bits.
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;

/// Every feature word stasis compares between hosts, in a fixed order.
pub const FEATURE_WORDS: &[Word] = &[
    w(1, 0, Reg::Edx),
    w(1, 0, Reg::Ecx),
    w(0x8000_0001, 0, Reg::Edx),
    w(0x8000_0001, 0, Reg::Ecx),
    w(7, 0, Reg::Ebx),
    w(7, 0, Reg::Ecx),
    w(7, 0, Reg::Edx),
    w(7, 1, Reg::Eax),
    w(7, 1, Reg::Edx),
    w(7, 2, Reg::Edx),
    w(0xd, 1, Reg::Eax),
    w(0x8000_0008, 0, Reg::Ebx),
    w(6, 0, Reg::Eax),
    w(0x8000_000a, 0, Reg::Edx),
    w(0x8000_0007, 0, Reg::Ebx),
    w(0x8000_0007, 0, Reg::Edx),
    w(0x8000_001f, 0, Reg::Eax),
    w(0x8000_0021, 0, Reg::Eax),
    w(KVM_FEATURES_LEAF, 0, Reg::Eax),
];

const fn w(leaf: u32, subleaf: u32, reg: Reg) -> Word {
    Word { leaf, subleaf, reg }
}

/// Bits of feature words that follow guest state or the VM's topology
/// rather than describe the CPU: OSXSAVE (CR4.OSXSAVE), APIC (the APIC
/// base MSR's enable bit), OSPKE (CR4.PKE) and HTT (more than one
/// logical processor). They are never compared or required.
pub const DYNAMIC_BITS: &[FeatureBit] = &[
    FeatureBit::new(1, 0, Reg::Ecx, 27),
    FeatureBit::new(1, 0, Reg::Edx, 9),
    FeatureBit::new(1, 0, Reg::Edx, 28),
    FeatureBit::new(7, 0, Reg::Ecx, 4),
];

/// The bits of leaf 0x80000001 EDX that AMD processors mirror from leaf 1
/// EDX (FPU, VME, ..., FXSR). They are copies, not features of their own:
/// never compared, and rebuilt from leaf 1 for AMD guests.
pub const AMD_MIRROR_MASK: u32 = 0x0183_f3ff;

/// The word holding [`AMD_MIRROR_MASK`].
pub const AMD_MIRROR_WORD: Word = w(0x8000_0001, 0, Reg::Edx);

/// One feature: a bit of a feature word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeatureBit {
    /// The word.
    pub word: Word,
    /// Bit number, 0-31.
    pub bit: u8,
}

impl FeatureBit {
    /// The bit `bit` of `leaf`.`subleaf` `reg`.
    pub const fn new(leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Self {
        Self {
            word: w(leaf, subleaf, reg),
            bit,
        }
    }

    /// The feature's name: Linux's, KVM's, or `cpuid 0x7.0 ebx bit 3` for
    /// a bit nobody named.
    pub fn name(&self) -> String {
        match name_of(*self) {
            Some(n) => n.to_string(),
            None => format!(
                "cpuid {:#x}.{} {} bit {}",
                self.word.leaf, self.word.subleaf, self.word.reg, self.bit
            ),
        }
    }

    /// The bit's mask within its word.
    pub fn mask(&self) -> u32 {
        1 << self.bit
    }
}

impl fmt::Display for FeatureBit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Every named feature: (name, bit).
pub fn all_named() -> impl Iterator<Item = (&'static str, FeatureBit)> {
    LINUX_FEATURES
        .iter()
        .map(|&(n, l, s, r, b, _)| (n, FeatureBit::new(l, s, r, b)))
        .chain(
            KVM_PV_FEATURES
                .iter()
                .map(|&(n, b)| (n, FeatureBit::new(KVM_FEATURES_LEAF, 0, Reg::Eax, b))),
        )
        .chain(
            EXTRA_FEATURES
                .iter()
                .map(|&(n, l, s, r, b)| (n, FeatureBit::new(l, s, r, b))),
        )
}

/// Other spellings people use for features that Linux names differently.
const ALIASES: &[(&str, &str)] = &[
    ("sse3", "pni"),
    ("sse4.1", "sse4_1"),
    ("sse4.2", "sse4_2"),
    ("lzcnt", "abm"),
    ("lahf", "lahf_lm"),
    ("sha", "sha_ni"),
    ("cmpxchg16b", "cx16"),
    ("pclmul", "pclmulqdq"),
    ("tsc-deadline", "tsc_deadline_timer"),
    ("tsc_deadline", "tsc_deadline_timer"),
    ("page1gb", "pdpe1gb"),
    ("rdrnd", "rdrand"),
    ("bmi", "bmi1"),
    ("prefetchw", "3dnowprefetch"),
];

/// The feature called `name` (a Linux `/proc/cpuinfo` name, a KVM
/// paravirtual feature such as `kvmclock`, or a common alias such as
/// `sse4.2` or `lzcnt`). Case-insensitive.
pub fn by_name(name: &str) -> Option<FeatureBit> {
    let lower = name.trim().to_ascii_lowercase();
    let canonical = ALIASES
        .iter()
        .find(|(a, _)| *a == lower)
        .map(|(_, c)| *c)
        .unwrap_or(lower.as_str());
    name_index().by_name.get(canonical).copied()
}

/// [`all_named`] indexed both ways, built once: names are looked up for
/// every feature printed and every `--cpu-features` entry.
struct NameIndex {
    by_name: std::collections::HashMap<&'static str, FeatureBit>,
    by_bit: std::collections::HashMap<FeatureBit, &'static str>,
}

fn name_index() -> &'static NameIndex {
    static INDEX: std::sync::OnceLock<NameIndex> = std::sync::OnceLock::new();
    INDEX.get_or_init(|| NameIndex {
        by_name: all_named().collect(),
        by_bit: all_named().map(|(n, b)| (b, n)).collect(),
    })
}

/// The bit a [`FeatureBit::name`] of an unnamed bit stands for
/// (`cpuid 0x7.0 ebx bit 3`), if `name` is one and lies in a feature word.
pub fn parse_unnamed(name: &str) -> Option<FeatureBit> {
    let rest = name.trim().strip_prefix("cpuid ")?;
    let mut parts = rest.split_whitespace();
    let (leaf, subleaf) = parts.next()?.split_once('.')?;
    let leaf = u32::from_str_radix(leaf.strip_prefix("0x")?, 16).ok()?;
    let subleaf: u32 = subleaf.parse().ok()?;
    let reg = match parts.next()? {
        "eax" => Reg::Eax,
        "ebx" => Reg::Ebx,
        "ecx" => Reg::Ecx,
        "edx" => Reg::Edx,
        _ => return None,
    };
    if parts.next()? != "bit" {
        return None;
    }
    let bit: u8 = parts.next()?.parse().ok()?;
    if bit >= 32 || parts.next().is_some() {
        return None;
    }
    let f = FeatureBit {
        word: Word { leaf, subleaf, reg },
        bit,
    };
    FEATURE_WORDS.contains(&f.word).then_some(f)
}

/// The name of `bit`, if it has one.
pub fn name_of(bit: FeatureBit) -> Option<&'static str> {
    name_index().by_bit.get(&bit).copied()
}

/// Known names close to `name` (for "did you mean" hints).
pub fn suggestions(name: &str) -> Vec<&'static str> {
    // No feature name is this long: nothing is close, and a long input
    // must not cost a comparison with every name.
    if name.len() > 64 {
        return Vec::new();
    }
    let lower = name.to_ascii_lowercase();
    let mut v: Vec<&'static str> = all_named()
        .map(|(n, _)| n)
        .filter(|n| {
            (lower.len() >= 3 && (n.contains(lower.as_str()) || lower.contains(n)))
                || (n.len().abs_diff(lower.len()) <= 1 && edit_distance(n, &lower) <= 1)
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v.truncate(5);
    v
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The entry for `leaf`.`subleaf` in a CPUID table.
pub fn entry(cpuid: &[CpuidEntry], leaf: u32, subleaf: u32) -> Option<&CpuidEntry> {
    cpuid
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
}

/// The value of a feature word in a CPUID table (0 if the leaf is absent).
pub fn word_value(cpuid: &[CpuidEntry], word: Word) -> u32 {
    entry(cpuid, word.leaf, word.subleaf)
        .map(|e| word.reg.get(e))
        .unwrap_or(0)
}

/// A set of features.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureSet(BTreeSet<FeatureBit>);

impl FeatureSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every feature a CPUID table advertises (dynamic bits left out).
    pub fn of(cpuid: &[CpuidEntry]) -> Self {
        let mut set = BTreeSet::new();
        for &word in FEATURE_WORDS {
            let v = word_value(cpuid, word);
            for bit in 0..32u8 {
                let f = FeatureBit { word, bit };
                let mirrored = word == AMD_MIRROR_WORD && AMD_MIRROR_MASK & f.mask() != 0;
                if v & f.mask() != 0 && !DYNAMIC_BITS.contains(&f) && !mirrored {
                    set.insert(f);
                }
            }
        }
        Self(set)
    }

    /// The features named in `names`; unknown names are returned as errors.
    pub fn from_names<'a>(
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, UnknownFeature> {
        let mut set = BTreeSet::new();
        for n in names {
            set.insert(by_name(n).ok_or_else(|| UnknownFeature::new(n))?);
        }
        Ok(Self(set))
    }

    /// Adds a feature.
    pub fn insert(&mut self, f: FeatureBit) {
        self.0.insert(f);
    }

    /// Removes a feature.
    pub fn remove(&mut self, f: &FeatureBit) -> bool {
        self.0.remove(f)
    }

    /// Whether `f` is in the set.
    pub fn contains(&self, f: &FeatureBit) -> bool {
        self.0.contains(f)
    }

    /// The features of `self` that `other` lacks.
    pub fn missing_from(&self, other: &FeatureSet) -> FeatureSet {
        Self(self.0.difference(&other.0).copied().collect())
    }

    /// `self` and `other` together.
    pub fn union(&self, other: &FeatureSet) -> FeatureSet {
        Self(self.0.union(&other.0).copied().collect())
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of features.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The features, in CPUID order.
    pub fn iter(&self) -> impl Iterator<Item = &FeatureBit> {
        self.0.iter()
    }

    /// The mask of the set's features in `word`.
    pub fn mask(&self, word: Word) -> u32 {
        self.0
            .iter()
            .filter(|f| f.word == word)
            .fold(0, |m, f| m | f.mask())
    }

    /// The features' names, in CPUID order.
    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(FeatureBit::name).collect()
    }
}

impl FromIterator<FeatureBit> for FeatureSet {
    fn from_iter<T: IntoIterator<Item = FeatureBit>>(iter: T) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// A feature name stasis does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CPU feature '{name}'{}", hint(.suggestions))]
pub struct UnknownFeature {
    /// The name given.
    pub name: String,
    /// Known names that look like it.
    pub suggestions: Vec<&'static str>,
}

fn hint(s: &[&str]) -> String {
    if s.is_empty() {
        " (features use Linux /proc/cpuinfo names, e.g. avx2, sse4_2, kvmclock)".to_string()
    } else {
        format!(" (did you mean {}?)", s.join(", "))
    }
}

impl UnknownFeature {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            suggestions: suggestions(name),
        }
    }
}

/// Looks up `name`, or says it is unknown with suggestions.
pub fn lookup(name: &str) -> Result<FeatureBit, UnknownFeature> {
    by_name(name).ok_or_else(|| UnknownFeature::new(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_bits_are_unique() {
        let mut names = std::collections::HashSet::new();
        let mut bits = std::collections::HashSet::new();
        for (n, b) in all_named() {
            assert!(names.insert(n), "duplicate name {n}");
            assert!(bits.insert(b), "duplicate bit for {n}");
            assert!(b.bit < 32);
            assert!(
                FEATURE_WORDS.contains(&b.word),
                "{n} lives outside the compared feature words"
            );
        }
    }

    #[test]
    fn unnamed_bits_round_trip() {
        let f = FeatureBit::new(7, 2, Reg::Edx, 31);
        assert_eq!(f.name(), "cpuid 0x7.2 edx bit 31");
        assert_eq!(parse_unnamed(&f.name()), Some(f));
        for bad in [
            "cpuid 0x7.0 ebx bit 32",
            "cpuid 0x7.0 esp bit 1",
            "cpuid 0x99.0 eax bit 1",
            "cpuid 7.0 ebx bit 1",
            "cpuid 0x7.0 ebx bit 1 more",
            "avx2",
        ] {
            assert_eq!(parse_unnamed(bad), None, "{bad}");
        }
    }

    #[test]
    fn lookups_and_aliases() {
        assert_eq!(by_name("avx2"), Some(FeatureBit::new(7, 0, Reg::Ebx, 5)));
        assert_eq!(by_name("SSE4.2"), by_name("sse4_2"));
        assert_eq!(
            by_name("lzcnt"),
            Some(FeatureBit::new(0x8000_0001, 0, Reg::Ecx, 5))
        );
        assert_eq!(
            by_name("kvmclock"),
            Some(FeatureBit::new(KVM_FEATURES_LEAF, 0, Reg::Eax, 0))
        );
        assert_eq!(
            by_name("invtsc"),
            Some(FeatureBit::new(0x8000_0007, 0, Reg::Edx, 8))
        );
        assert_eq!(by_name("avx9"), None);
        assert_eq!(FeatureBit::new(7, 0, Reg::Ebx, 5).name(), "avx2");
        assert_eq!(
            FeatureBit::new(0x8000_0001, 0, Reg::Edx, 3).name(),
            "cpuid 0x80000001.0 edx bit 3"
        );
    }

    #[test]
    fn unknown_names_get_suggestions() {
        let e = lookup("avx52").unwrap_err();
        assert!(e.suggestions.contains(&"avx2"), "{e}");
        assert!(
            e.to_string()
                .starts_with("unknown CPU feature 'avx52' (did you mean"),
            "{e}"
        );
    }

    #[test]
    fn feature_set_of_cpuid_skips_dynamic_bits() {
        let cpuid = [
            CpuidEntry {
                function: 1,
                ecx: (1 << 27) | (1 << 28) | (1 << 20),
                edx: (1 << 9) | 1,
                ..Default::default()
            },
            CpuidEntry {
                function: 7,
                ebx: 1 << 5,
                ecx: 1 << 4,
                ..Default::default()
            },
        ];
        let set = FeatureSet::of(&cpuid);
        assert_eq!(set.names(), vec!["sse4_2", "avx", "fpu", "avx2"]);
    }
}
