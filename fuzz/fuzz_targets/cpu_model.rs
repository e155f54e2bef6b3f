//! CPU model and feature strings: `--cpu MODEL` and
//! `--cpu-features +FEAT,-FEAT` (clap calls the [`std::str::FromStr`] of
//! [`CpuModel`] and [`FeatureChanges`]; the TOML key `cpu_features`
//! ends in the same parser), and a spec written as
//! `MODEL,+FEAT,-FEAT` (how `GuestCpuRecord::spec` and `CpuSpec`'s
//! `Display` print one). A spec that parses is resolved into the CPUID a
//! guest gets, [`guest_template`], on the two reference hosts of
//! [`stasis_cpu::reference`] (at boot stasis does this with the host's
//! KVM offer; `stasis cpu-models` passes the same guest top, 4 GiB).
//! Single names also go through [`feature::lookup`] (with its "did you
//! mean" suggestions) and [`feature::parse_unnamed`].
//!
//! One property is asserted: a spec that parses, printed, parses back to
//! the same spec.
//!
//! Input: text. Seeds: model names and feature strings in
//! `corpus/cpu_model/`; `make-seeds.sh` writes a dictionary of every
//! feature name (`dict/cpu_model.dict`, which `run.sh` uses).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stasis_cpu::cpuid::guest_template;
use stasis_cpu::{feature, reference, CpuModel, CpuSpec, FeatureChanges, FeatureSet};
use stasis_snapshot::CpuidEntry;

/// The reference hosts' CPUID, built once.
fn hosts() -> &'static [Vec<CpuidEntry>; 2] {
    static HOSTS: OnceLock<[Vec<CpuidEntry>; 2]> = OnceLock::new();
    HOSTS.get_or_init(|| [reference::intel_xeon_icelake(), reference::amd_epyc_zen3_pvm()])
}

/// Parses `MODEL[,CHANGES]`.
fn parse_spec(text: &str) -> Option<CpuSpec> {
    let (model, changes) = text.split_once(',').unwrap_or((text, ""));
    Some(CpuSpec { model: model.parse().ok()?, changes: changes.parse().ok()? })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = text.parse::<CpuModel>() {
        let _ = e.to_string();
    }
    if let Err(e) = text.parse::<FeatureChanges>() {
        let _ = e.to_string();
    }
    if let Err(e) = feature::lookup(text) {
        let _ = e.to_string();
    }
    let _ = feature::parse_unnamed(text);

    let Some(spec) = parse_spec(text) else { return };
    let printed = spec.to_string();
    assert_eq!(parse_spec(&printed).as_ref(), Some(&spec), "{text:?} printed as {printed:?}");
    for host in hosts() {
        match guest_template(&spec, host, 1 << 32) {
            // The guest gets nothing its host does not offer.
            Ok(t) => assert!(t.features.missing_from(&FeatureSet::of(host)).is_empty()),
            Err(e) => drop(e.to_string()),
        }
    }
});
