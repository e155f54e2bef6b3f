//! The guest physical address map of an x86_64 stasis VM.
//!
//! ```text
//! 0x0000_0500  GDT used at boot (4 entries)
//! 0x0000_0520  IDT placeholder used at boot
//! 0x0000_6000  PVH hvm_start_info, then its memory map and module list
//! 0x0000_7000  Linux zero page (struct boot_params)
//! 0x0000_8ff0  initial stack pointer for the 64-bit entry
//! 0x0000_9000  PML4, then PDPT (0xa000) and 4 page directories (0xb000..0xf000)
//! 0x0002_0000  kernel command line (up to one page)
//! 0x0009_f000  VM generation ID (reserved from here to 1 MiB)
//! 0x0009_fc00  MP table (top of conventional memory, "EBDA")
//! 0x000e_0000  ACPI tables (RSDP first, found by the legacy BIOS-area scan)
//! 0x0010_0000  kernel (1 MiB), then initrd near the top of low RAM
//! 0xc000_0000  MMIO hole: device windows, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0xd000_0000  virtio-mmio slots 0..16, 4 KiB each (see VIRTIO_MMIO_BASE)
//! 0x1_0000_0000  RAM above 4 GiB, when the VM has more than 3 GiB
//! ```

/// Start of the boot GDT.
pub const BOOT_GDT_ADDR: u64 = 0x500;
/// Start of the boot IDT placeholder.
pub const BOOT_IDT_ADDR: u64 = 0x520;
/// PVH start info structure.
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// Linux zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the Linux 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the boot identity map.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the page directories of the boot identity map.
pub const PD_ADDR: u64 = 0xb000;
/// How many GiB the boot identity map covers (one page directory each).
pub const BOOT_IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line, terminating NUL included.
pub const CMDLINE_MAX_SIZE: u64 = 0x1000;
/// The VM generation ID page (reserved in the memory map).
pub const VMGENID_ADDR: u64 = 0x9f000;
/// End of usable conventional memory: from here to 1 MiB the memory map
/// says reserved (VM generation ID page, EBDA, BIOS area).
pub const LOW_RESERVED_START: u64 = VMGENID_ADDR;
/// Start of the EBDA.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table lives at the start of the EBDA.
pub const MPTABLE_ADDR: u64 = EBDA_START;
/// ACPI tables start here (RSDP first).
pub const ACPI_START: u64 = 0xe0000;
/// ACPI tables must end below this.
pub const ACPI_END: u64 = 0x10_0000;
/// Where kernels are loaded and high memory starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB.
pub const FOUR_GIB: u64 = 0x1_0000_0000;
/// The IOAPIC's MMIO window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' MMIO window.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// The KVM TSS (three pages) sits just below the BIOS ROM area at the top of
/// the 32-bit space, inside the MMIO hole, as is customary.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// The KVM identity-map page for real-mode emulation, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The ACPI sleep control register (HW-reduced ACPI), an 8-bit I/O port.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// The ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// The ACPI reset register; writing [`ACPI_RESET_VALUE`] resets the VM.
pub const ACPI_RESET_PORT: u16 = 0x3c2;
/// The value that, written to [`ACPI_RESET_PORT`], resets the VM.
pub const ACPI_RESET_VALUE: u8 = 0x01;

/// Start of the virtio-mmio device windows, inside the MMIO hole.
///
/// This placement is a stable interface (guests scan for it): virtio device
/// number *n* of a VM (slot *n*, counting disks, then network interfaces,
/// then entropy sources, then consoles, each in configuration order) has
/// its 4 KiB virtio-mmio version 2 register window at
/// `VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_SIZE` and its edge-triggered
/// interrupt on GSI `VIRTIO_GSIS[n]`. Up to [`VIRTIO_MMIO_SLOTS`] slots;
/// unused slots read as all ones (no magic value). Guests find the devices
/// by reading the magic value `0x74726976` ("virt") at the start of each
/// slot, from the ACPI DSDT (`LNRO0005` devices `VR00`, `VR01`, ... with
/// `_UID` = slot), or from the `virtio_mmio.device=4K@0xd0000000:5` entries
/// the VMM appends to the kernel command line.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// How many virtio-mmio slots there are.
pub const VIRTIO_MMIO_SLOTS: usize = 16;
/// The GSI (= IOAPIC pin, and for GSIs below 16 also the ISA IRQ) of each
/// virtio-mmio slot: the ISA lines no emulated device uses (keyboard 1,
/// COM1 4 and the RTC 8 are taken; 0, 2, 3, 12 and 13 are left alone), then
/// the IOAPIC-only pins 16-23.
pub const VIRTIO_GSIS: [u32; VIRTIO_MMIO_SLOTS] =
    [5, 6, 7, 9, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];

/// The register window base and GSI of virtio slot `slot`.
pub fn virtio_mmio_slot(slot: usize) -> Option<(u64, u32)> {
    let gsi = *VIRTIO_GSIS.get(slot)?;
    Some((VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE, gsi))
}

/// The GSI of the ACPI Generic Event Device that notifies the guest of a
/// new VM generation ID: ISA IRQ 13 (the legacy FPU error line, which no
/// x86-64 system uses).
pub const GED_GSI: u32 = 13;

/// COM1's I/O base and IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// CMOS RTC index/data ports.
pub const CMOS_PORT: u16 = 0x70;

// The boot structures must not overlap; checked when the crate compiles.
const BOOT_PAGE_TABLES_END: u64 = PD_ADDR + BOOT_IDENTITY_MAP_GIB * 0x1000;
const _: () = assert!(BOOT_PAGE_TABLES_END <= 0x10000);
const _: () = assert!(PVH_START_INFO_ADDR + 0x1000 <= ZERO_PAGE_ADDR);
const _: () = assert!(ZERO_PAGE_ADDR + 0x1000 <= BOOT_STACK_POINTER);
const _: () = assert!(BOOT_PAGE_TABLES_END <= CMDLINE_ADDR);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE <= LOW_RESERVED_START);
const _: () = assert!(VMGENID_ADDR + 24 <= MPTABLE_ADDR);

/// The guest RAM ranges for a VM of `mem_bytes`: everything below the MMIO
/// hole, the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (FOUR_GIB, mem_bytes - MMIO_HOLE_START),
        ]
    }
}

/// The first guest-physical address above everything a VM of `mem_bytes`
/// of RAM uses: its RAM, and the device window below 4 GiB.
pub fn guest_top(mem_bytes: u64) -> u64 {
    ram_ranges(mem_bytes)
        .iter()
        .map(|(start, size)| start + size)
        .max()
        .unwrap_or(0)
        .max(FOUR_GIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
    }

    #[test]
    fn large_vm_splits_around_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_HOLE_START), (FOUR_GIB, 1 << 30)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn virtio_slots_fit_the_hole_and_avoid_legacy_irqs() {
        assert_eq!(VIRTIO_MMIO_SLOTS, stasis_config::MAX_VIRTIO_DEVICES);
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_mmio_slot(15), Some((0xd000_f000, 23)));
        assert_eq!(virtio_mmio_slot(16), None);
        let end = VIRTIO_MMIO_BASE + VIRTIO_MMIO_SLOTS as u64 * VIRTIO_MMIO_SIZE;
        assert!(VIRTIO_MMIO_BASE >= MMIO_HOLE_START && end <= IOAPIC_ADDR);
        for (i, g) in VIRTIO_GSIS.iter().enumerate() {
            assert!(![0, 1, 2, COM1_IRQ, 8].contains(g));
            assert!(*g < 24);
            assert!(!VIRTIO_GSIS[..i].contains(g));
        }
    }
}
