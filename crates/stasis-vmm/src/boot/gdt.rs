//! The boot GDT, and the segment registers that match it.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::layout::{BOOT_GDT_ADDR, BOOT_IDT_ADDR};
use crate::memory::GuestRam;

/// Selector of the code segment (`__BOOT_CS` in the Linux boot protocol).
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the data segment (`__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x20;

/// Entries: null, unused, code, data, TSS. The code entry is 64-bit for the
/// Linux entry and 32-bit for PVH.
pub fn entries(pvh: bool) -> [u64; 5] {
    [
        0,
        0,
        if pvh { code32() } else { code64() },
        descriptor(0xc093, 0, 0xfffff), // data
        descriptor(0x808b, 0, 0xfffff), // TSS (busy)
    ]
}

/// A segment descriptor from `flags` (access byte in bits 0-7, flags
/// nibble in bits 12-15), base and limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The segment register cache contents for a descriptor.
pub fn segment(selector: u16, desc: u64) -> kvm_segment {
    let base = ((desc >> 16) & 0xff_ffff) | ((desc >> 32) & 0xff00_0000);
    let raw_limit = (desc & 0xffff) | ((desc >> 32) & 0xf_0000);
    let g = ((desc >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// A flat 32-bit code segment for the PVH entry.
pub const fn code32() -> u64 {
    descriptor(0xc09b, 0, 0xfffff)
}

/// A flat 64-bit code segment for the Linux entry.
pub const fn code64() -> u64 {
    descriptor(0xa09b, 0, 0xfffff)
}

/// Writes the boot GDT (with a 32-bit code segment when `pvh`) and a null
/// IDT placeholder.
pub fn write_boot_gdt(mem: &GuestRam, pvh: bool) -> Result<(), BootError> {
    let err = |source| BootError::GuestWrite {
        what: "boot GDT",
        source,
    };
    for (i, e) in entries(pvh).iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_ADDR + i as u64 * 8))
            .map_err(err)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_ADDR))
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        assert_eq!(descriptor(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(descriptor(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn segment_cache_matches_descriptor() {
        let s = segment(CODE_SELECTOR, entries(false)[2]);
        assert_eq!((s.l, s.db, s.g, s.present, s.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(s.limit, 0xffff_ffff);
        let d = segment(DATA_SELECTOR, entries(false)[3]);
        assert_eq!((d.l, d.db, d.s, d.type_), (0, 1, 1, 3));
    }
}
