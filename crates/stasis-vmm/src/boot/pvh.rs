//! The PVH start info (`struct hvm_start_info`) and its memory map.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{e820, BootError, InitrdPlacement};
use crate::layout;
use crate::memory::GuestRam;

/// The magic `hvm_start_info` begins with.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: a plain C struct of integers, every bit pattern is valid.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: as above.
unsafe impl ByteValued for MemmapEntry {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: as above.
unsafe impl ByteValued for ModlistEntry {}

/// Writes the start info at [`layout::PVH_START_INFO_ADDR`], followed by
/// the module list (the initrd) and the memory map.
pub fn write_start_info(
    mem: &GuestRam,
    initrd: Option<InitrdPlacement>,
    rsdp: u64,
) -> Result<(), BootError> {
    let err = |source| BootError::GuestWrite {
        what: "PVH start info",
        source,
    };
    let base = layout::PVH_START_INFO_ADDR;
    let modlist_addr = base + std::mem::size_of::<hvm_start_info>() as u64;
    let memmap_addr = modlist_addr + std::mem::size_of::<hvm_modlist_entry>() as u64;
    let map = e820::memory_map(mem);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(i) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
        let m = ModlistEntry(hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        });
        mem.write_obj(m, GuestAddress(modlist_addr)).map_err(err)?;
    }
    for (i, e) in map.iter().enumerate() {
        let entry = MemmapEntry(hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        });
        let at = memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at)).map_err(err)?;
    }
    mem.write_obj(StartInfo(info), GuestAddress(base))
        .map_err(err)
}
