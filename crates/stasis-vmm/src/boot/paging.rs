//! The identity map the Linux 64-bit entry requires.

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::layout::{BOOT_IDENTITY_MAP_GIB, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use crate::memory::GuestRam;

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes page tables that identity-map the first
/// [`BOOT_IDENTITY_MAP_GIB`] GiB with 2 MiB pages (the kernel, zero page,
/// command line and initrd must be reachable at their physical addresses).
pub fn write_identity_map(mem: &GuestRam) -> Result<(), BootError> {
    let err = |source| BootError::GuestWrite {
        what: "page tables",
        source,
    };
    mem.write_obj(PDPT_ADDR | PRESENT_RW, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    for gib in 0..BOOT_IDENTITY_MAP_GIB {
        let pd = PD_ADDR + gib * 0x1000;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPT_ADDR + gib * 8))
            .map_err(err)?;
        let mut entries = [0u8; 4096];
        for (i, e) in entries.chunks_exact_mut(8).enumerate() {
            let addr = (gib << 30) | ((i as u64) << 21);
            e.copy_from_slice(&(addr | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd)).map_err(err)?;
    }
    Ok(())
}
