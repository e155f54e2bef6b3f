//! What no real x86 vCPU can be in: checked on saved vCPU state before
//! KVM sees it, because KVM takes some impossible values as they are
//! (`KVM_SET_SREGS` does not check EFER's reserved bits, `KVM_SET_REGS`
//! not RIP nor RFLAGS) and the guest then fails to enter, or runs from a
//! state a snapshot file chose. The rules are the Intel SDM's and AMD
//! APM's (vol. 3A §2.2, §2.5, §3.3.7; APM vol. 2 §3.1.7).

use super::state::VcpuState;

const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const EFER_SVME: u64 = 1 << 12;
const EFER_LMSLE: u64 = 1 << 13;
const EFER_FFXSR: u64 = 1 << 14;
const EFER_TCE: u64 = 1 << 15;
const EFER_AUTOIBRS: u64 = 1 << 21;
/// Every EFER bit either vendor defines; the rest are reserved.
const EFER_DEFINED: u64 = EFER_SCE
    | EFER_LME
    | EFER_LMA
    | EFER_NXE
    | EFER_SVME
    | EFER_LMSLE
    | EFER_FFXSR
    | EFER_TCE
    | EFER_AUTOIBRS;

const CR0_PE: u64 = 1 << 0;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;

/// RFLAGS bits that may be set (bit 1 must be): CF, bit 1, PF, AF, ZF, SF, TF,
/// IF, DF, OF, IOPL, NT, RF, VM, AC, VIF, VIP, ID.
const RFLAGS_DEFINED: u64 = 0x003f_7fd7;
const RFLAGS_FIXED1: u64 = 1 << 1;

/// Whether `addr` is canonical for `bits`-bit linear addresses (48, or
/// 57 with 5-level paging): bits 63..bits-1 all equal.
fn canonical(addr: u64, bits: u32) -> bool {
    let shift = 64 - bits;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

/// Checks one saved vCPU, the `index`th of the VM: the first broken rule,
/// named with the register and its value.
pub fn check(v: &VcpuState, index: u32) -> Result<(), String> {
    if v.index != index {
        return Err(format!(
            "vCPU section {index} holds the state of vCPU {}",
            v.index
        ));
    }
    let s = &v.sregs;
    let reserved = s.efer & !EFER_DEFINED;
    if reserved != 0 {
        return Err(format!(
            "EFER {:#x} has reserved bits set ({reserved:#x})",
            s.efer
        ));
    }
    if s.cr0 >> 32 != 0 {
        return Err(format!("CR0 {:#x} has reserved bits 63:32 set", s.cr0));
    }
    if s.cr0 & CR0_PG != 0 && s.cr0 & CR0_PE == 0 {
        return Err(format!(
            "CR0 {:#x} enables paging without protected mode",
            s.cr0
        ));
    }
    if s.cr0 & CR0_NW != 0 && s.cr0 & CR0_CD == 0 {
        return Err(format!("CR0 {:#x} sets NW without CD", s.cr0));
    }
    let paging = s.cr0 & CR0_PG != 0;
    let long_mode = s.efer & EFER_LMA != 0;
    if long_mode != (paging && s.efer & EFER_LME != 0) {
        return Err(format!(
            "EFER {:#x} says long mode is {}, but CR0 {:#x} and EFER.LME say otherwise",
            s.efer,
            if long_mode { "active" } else { "inactive" },
            s.cr0
        ));
    }
    if long_mode && s.cr4 & CR4_PAE == 0 {
        return Err(format!("long mode without CR4.PAE (CR4 {:#x})", s.cr4));
    }
    let bits = if s.cr4 & CR4_LA57 != 0 { 57 } else { 48 };
    let rip = v.regs.rip;
    if long_mode && s.cs.l != 0 {
        if !canonical(rip, bits) {
            return Err(format!(
                "RIP {rip:#x} is not a canonical {bits}-bit address"
            ));
        }
    } else if rip > u64::from(u32::MAX) {
        return Err(format!(
            "RIP {rip:#x} does not fit the 32 bits of a vCPU outside 64-bit mode"
        ));
    }
    let rflags = v.regs.rflags;
    if rflags & !RFLAGS_DEFINED != 0 || rflags & RFLAGS_FIXED1 == 0 {
        return Err(format!(
            "RFLAGS {rflags:#x} has reserved bits set or bit 1 clear"
        ));
    }
    for (name, base) in [
        ("FS base", s.fs.base),
        ("GS base", s.gs.base),
        ("TR base", s.tr.base),
        ("LDT base", s.ldt.base),
        ("GDT base", s.gdt.base),
        ("IDT base", s.idt.base),
    ] {
        if !canonical(base, bits) {
            return Err(format!(
                "{name} {base:#x} is not a canonical {bits}-bit address"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses() {
        assert!(canonical(0x0000_7fff_ffff_ffff, 48));
        assert!(canonical(0xffff_8000_0000_0000, 48));
        assert!(!canonical(0x0000_8000_0000_0000, 48));
        assert!(!canonical(0xdead_beef_0000_0000, 48));
        assert!(canonical(0x00ff_ffff_ffff_ffff, 57));
        assert!(!canonical(0x0100_0000_0000_0000, 57));
    }
}
