//! The zero page (`struct boot_params`) of the Linux x86 boot protocol.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::{e820, BootError, InitrdPlacement};
use crate::layout;
use crate::memory::GuestRam;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// `loadflags`: the protected-mode kernel is loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 0x01;
/// `loadflags`: the loader set `heap_end_ptr`... not used; KEEP_SEGMENTS etc.
/// are irrelevant for the 64-bit entry.
const CAN_USE_HEAP: u8 = 0x80;

/// Writes the zero page. For a bzImage, `header` is the setup header read
/// from the image and is kept (the kernel reads fields such as
/// `init_size` from it); for an ELF `vmlinux` a header is synthesised.
pub fn write_zero_page(
    mem: &GuestRam,
    header: Option<setup_header>,
    cmdline_size: u32,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: header.unwrap_or_else(|| setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.ext_cmd_line_ptr = (layout::CMDLINE_ADDR >> 32) as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.addr as u32;
        params.ext_ramdisk_image = (i.addr >> 32) as u32;
        params.hdr.ramdisk_size = i.size as u32;
        params.ext_ramdisk_size = (i.size >> 32) as u32;
    }
    let map = e820::memory_map(mem);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_ADDR))
        .map_err(|source| BootError::GuestWrite {
            what: "zero page",
            source,
        })
}
