//! Reference CPUID tables of two hosts, as a new vCPU gets them from KVM:
//! data for tests, and for constructing snapshot fixtures of a vendor no
//! machine at hand has (see `crates/stasis/tests/fixtures/README.md`).

use stasis_snapshot::CpuidEntry;

use crate::cpuid::FLAG_SIGNIFICANT_INDEX;

fn e(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
    let flags = if matches!(function, 4 | 7 | 0xb | 0xd | 0x1f | 0x8000_001d) {
        FLAG_SIGNIFICANT_INDEX
    } else {
        0
    };
    CpuidEntry {
        function,
        index,
        flags,
        eax,
        ebx,
        ecx,
        edx,
    }
}

/// What a new vCPU of an AMD EPYC (Zen 3) PVM host gets: KVM's supported
/// CPUID with leaves 1, 7 and 0xD as PVM rewrites them (measured).
pub fn amd_epyc_zen3_pvm() -> Vec<CpuidEntry> {
    vec![
        e(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
        e(1, 0, 0x00a0_0f11, 0x0102_0800, 0xf7f8_3203, 0x178b_fbff),
        e(6, 0, 4, 0, 0, 0),
        e(7, 0, 0, 0x219c_03ab, 0x0000_0604, 0x8800_0010),
        e(0xa, 0, 0, 0, 0, 0),
        e(0xb, 0, 0, 1, 0x100, 0),
        e(0xd, 0, 0x207, 0x240, 0x988, 0),
        e(0xd, 1, 0x7, 0x240, 0, 0),
        e(0xd, 2, 0x100, 0x240, 0, 0),
        e(0xd, 9, 0x8, 0x980, 0, 0),
        e(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        e(0x4000_0001, 0, 0x0100_7efb, 0, 0, 0),
        e(
            0x8000_0000,
            0,
            0x8000_0022,
            0x6874_7541,
            0x444d_4163,
            0x6974_6e65,
        ),
        e(
            0x8000_0001,
            0,
            0x00a0_0f11,
            0x4000_0000,
            0x0040_0393,
            0x23d3_fbff,
        ),
        e(
            0x8000_0005,
            0,
            0xff40_ff40,
            0xff40_ff40,
            0x2008_0140,
            0x2008_0140,
        ),
        e(
            0x8000_0006,
            0,
            0x4800_2200,
            0x6800_4200,
            0x0200_6140,
            0x0800_9140,
        ),
        e(0x8000_0007, 0, 0, 0, 0, 0x100),
        e(0x8000_0008, 0, 0x3030, 0x110a_d205, 0x7001, 0),
        e(0x8000_000a, 0, 1, 0x8000, 0, 0x0001_0000),
        e(0x8000_001d, 0, 0x121, 0x01c0_003f, 0x3f, 0),
        e(0x8000_001f, 0, 0x1, 0, 0, 0),
        e(0x8000_0021, 0, 0x1800_0265, 0, 6, 0),
    ]
}

/// An Intel Xeon (Ice Lake-SP class) host under KVM, with AVX-512 and a
/// PMU (constructed from Intel's documented CPUID layout).
pub fn intel_xeon_icelake() -> Vec<CpuidEntry> {
    let leaf1_ecx = (1 << 0)
        | (1 << 1)
        | (1 << 9)
        | (1 << 12)
        | (1 << 13)
        | (1 << 17)
        | (1 << 19)
        | (1 << 20)
        | (1 << 21)
        | (1 << 22)
        | (1 << 23)
        | (1 << 24)
        | (1 << 25)
        | (1 << 26)
        | (1 << 28)
        | (1 << 29)
        | (1 << 30)
        | (1 << 31);
    let leaf7_ebx = (1 << 0)
        | (1 << 1)
        | (1 << 3)
        | (1 << 5)
        | (1 << 7)
        | (1 << 8)
        | (1 << 9)
        | (1 << 10)
        | (1 << 16)
        | (1 << 17)
        | (1 << 18)
        | (1 << 19)
        | (1 << 20)
        | (1 << 21)
        | (1 << 23)
        | (1 << 24)
        | (1 << 26)
        | (1 << 28)
        | (1 << 29)
        | (1 << 30)
        | (1 << 31);
    vec![
        e(0, 0, 0x1b, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
        e(1, 0, 0x0006_06a6, 0x0008_0800, leaf1_ecx, 0x0f8b_fbff),
        e(4, 0, 0x0400_0121, 0x02c0_003f, 0x3f, 0),
        e(4, 1, 0x0400_0122, 0x01c0_003f, 0x3f, 0),
        e(6, 0, 4, 0, 0, 0),
        e(7, 0, 0, leaf7_ebx, 0x0040_5f5e, 0xbc00_0410),
        e(0xa, 0, 0x0804_3202, 0, 0, 0x0603),
        e(0xb, 0, 0, 1, 0x100, 0),
        e(0xd, 0, 0x2e7, 0xa88, 0xa88, 0),
        e(0xd, 1, 0xf, 0, 0, 0),
        e(0xd, 2, 0x100, 0x240, 0, 0),
        e(0xd, 5, 0x40, 0x440, 0, 0),
        e(0xd, 6, 0x200, 0x480, 0, 0),
        e(0xd, 7, 0x400, 0x680, 0, 0),
        e(0xd, 9, 0x8, 0xa80, 0, 0),
        e(0x14, 0, 1, 0xf, 7, 0),
        e(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        e(0x4000_0001, 0, 0x0100_7efb, 0, 0, 0),
        e(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
        e(0x8000_0001, 0, 0, 0, 0x121, 0x2c10_0800),
        e(0x8000_0007, 0, 0, 0, 0, 0x100),
        e(0x8000_0008, 0, 0x302e, 0x200, 0, 0),
    ]
}

/// Short names for the tests.
#[cfg(test)]
pub(crate) use amd_epyc_zen3_pvm as amd_offer;
#[cfg(test)]
pub(crate) use intel_xeon_icelake as intel_offer;
