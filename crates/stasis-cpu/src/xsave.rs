//! Sizes of the XSAVE area (the standard, uncompacted layout that
//! `KVM_GET_XSAVE`/`KVM_GET_XSAVE2` use), from CPUID leaf 0xD.

use stasis_snapshot::CpuidEntry;

use crate::feature;

/// End of the legacy region plus the XSAVE header (512 + 64 bytes): the
/// size of an area holding only x87 and SSE state.
pub const LEGACY_AREA_END: usize = 576;

/// `sizeof(struct kvm_xsave)`: what `KVM_GET_XSAVE` always transfers, and
/// the least any stasis snapshot stores.
pub const KVM_XSAVE_SIZE: usize = 4096;

/// The uncompacted XSAVE area size holding the components in `xcr0`, with
/// component offsets and sizes from `cpuid`'s leaf 0xD subleaves.
/// Components without a subleaf count as ending at the legacy area.
pub fn area_size(cpuid: &[CpuidEntry], xcr0: u64) -> usize {
    let mut end = LEGACY_AREA_END;
    for i in 2..64u32 {
        if xcr0 & (1 << i) == 0 {
            continue;
        }
        if let Some(e) = feature::entry(cpuid, 0xd, i) {
            end = end.max(e.ebx as usize + e.eax as usize);
        }
    }
    end
}

/// The number of bytes of KVM's XSAVE area a snapshot stores for a vCPU
/// whose XSAVE components are `xcr0`: never less than
/// [`KVM_XSAVE_SIZE`], more only for components that end beyond it (AMX).
pub fn saved_size(cpuid: &[CpuidEntry], xcr0: u64) -> usize {
    area_size(cpuid, xcr0)
        .max(KVM_XSAVE_SIZE)
        .next_multiple_of(4)
}

/// Names of XSAVE components, for messages.
pub fn component_names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|i| mask & (1u64 << i) != 0)
        .map(|i| {
            match i {
                0 => "x87",
                1 => "SSE",
                2 => "AVX",
                3 => "MPX bounds",
                4 => "MPX config",
                5 => "AVX-512 opmask",
                6 => "AVX-512 ZMM_Hi256",
                7 => "AVX-512 Hi16_ZMM",
                9 => "PKRU",
                17 => "AMX tile config",
                18 => "AMX tile data",
                19 => "APX",
                _ => "",
            }
            .to_string()
        })
        .zip((0..64).filter(|i| mask & (1u64 << i) != 0))
        .map(|(n, i)| {
            if n.is_empty() {
                format!("component {i}")
            } else {
                n
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amd_zen3_leaf_d() -> Vec<CpuidEntry> {
        vec![
            CpuidEntry {
                function: 0xd,
                index: 2,
                eax: 0x100,
                ebx: 0x240,
                ..Default::default()
            },
            CpuidEntry {
                function: 0xd,
                index: 9,
                eax: 8,
                ebx: 0x980,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn sizes_follow_the_components() {
        let c = amd_zen3_leaf_d();
        assert_eq!(area_size(&c, 0x3), 576);
        assert_eq!(area_size(&c, 0x7), 0x340);
        assert_eq!(area_size(&c, 0x207), 0x988);
        assert_eq!(saved_size(&c, 0x207), 4096);
        let mut amx = c.clone();
        amx.push(CpuidEntry {
            function: 0xd,
            index: 18,
            eax: 8192,
            ebx: 2816,
            ..Default::default()
        });
        assert_eq!(saved_size(&amx, 0x60207), 11008);
        assert_eq!(saved_size(&amx, 0x207), 4096);
    }

    #[test]
    fn component_names_for_messages() {
        assert_eq!(
            component_names(0xe4),
            vec![
                "AVX",
                "AVX-512 opmask",
                "AVX-512 ZMM_Hi256",
                "AVX-512 Hi16_ZMM"
            ]
        );
        assert_eq!(component_names(1 << 30), vec!["component 30"]);
    }
}
