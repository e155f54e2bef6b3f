//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT and DSDT.
//!
//! Layout in guest memory, each table 16-byte aligned, starting at `base`:
//! RSDP, XSDT, FADT, MADT, DSDT. No FACS: it is optional on hardware-reduced
//! platforms (there is no global lock and no firmware waking vector).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use crate::{
    align_up, GuestBlob, MmioDevice, PlatformError, PlatformLayout, BIOS_AREA_END, COM1_PORT,
    I8042_CMD_PORT, I8042_DATA_PORT, RESET_VALUE, RTC_PORT, S5_SLEEP_TYPE,
};

/// OEM ID of every table.
const OEM_ID: [u8; 6] = *b"STASIS";
/// OEM table ID of every table.
const OEM_TABLE_ID: [u8; 8] = *b"STASISVM";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// Creator ID of every table.
const CREATOR_ID: [u8; 4] = *b"STAS";
/// Creator revision of every table.
const CREATOR_REVISION: u32 = 1;

/// Start of the legacy BIOS area scanned for the RSDP.
const BIOS_AREA_START: u64 = 0xE_0000;

/// Header offsets shared by all system description tables.
const SDT_HEADER_LEN: u32 = 36;
const SDT_CREATOR_ID_OFFSET: usize = 28;
const SDT_CREATOR_REVISION_OFFSET: usize = 32;

/// FADT IAPC_BOOT_ARCH bits (ACPI 6.5 table 5.11).
mod iapc_boot_arch {
    /// The platform has an 8042 (or equivalent) keyboard controller.
    pub const I8042: u16 = 1 << 1;
    /// Probing for VGA at its legacy addresses is not safe / no VGA.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// OSPM must not enable MSI.
    pub const MSI_NOT_SUPPORTED: u16 = 1 << 3;
    /// OSPM must not take over PCIe ASPM control.
    pub const PCIE_ASPM_CONTROLS: u16 = 1 << 4;
}

/// CMOS RAM index of the RTC century register.
const RTC_CENTURY_INDEX: u8 = 0x32;

/// MADT flag: the system also has a PC-AT compatible dual 8259 (KVM's in-kernel
/// PIC), which OSPM must mask before using the IOAPIC.
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT revision for ACPI 6.2-6.4.
const MADT_REVISION: u8 = 5;
/// MADT Processor Local APIC flag: processor usable.
const LAPIC_ENABLED: u32 = 1;
/// MADT structure types.
const MADT_TYPE_LAPIC: u8 = 0;
const MADT_TYPE_IOAPIC: u8 = 1;
const MADT_TYPE_LAPIC_NMI: u8 = 4;
/// ACPI processor UID meaning "all processors" in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xFF;

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;

/// Builds the ACPI tables for `layout`, placing them from `base` (which becomes
/// the RSDP address) up to, not including, `limit`.
///
/// `base` must be 16-byte aligned and the RSDP must lie in 0xE0000..0x100000,
/// where guests without a boot-protocol RSDP pointer scan for it. Normally
/// called as `acpi_tables(&layout, RSDP_ADDR, 0x10_0000)`; the caller must mark
/// `[base, limit)` reserved (or ACPI) in the guest's memory map.
///
/// Returns one blob per table (RSDP first); the tables are also listed by
/// the XSDT (FADT, MADT) and the FADT (DSDT).
pub fn acpi_tables(
    layout: &PlatformLayout,
    base: u64,
    limit: u64,
) -> Result<Vec<GuestBlob>, PlatformError> {
    layout.validate()?;
    let rsdp_len = Rsdp::len() as u64;
    if base & 0xF != 0 {
        return Err(PlatformError::BadAddress {
            what: "RSDP",
            addr: base,
            reason: "not 16-byte aligned",
        });
    }
    if !(BIOS_AREA_START..BIOS_AREA_END).contains(&base) || base + rsdp_len > BIOS_AREA_END {
        return Err(PlatformError::BadAddress {
            what: "RSDP",
            addr: base,
            reason: "outside 0xE0000..0x100000, where guests scan for it",
        });
    }

    // Tables that point at nothing can be built first; their sizes fix the
    // addresses of the others.
    let dsdt = build_dsdt(layout);
    let madt = build_madt(layout);
    const XSDT_ENTRIES: u64 = 2;
    let xsdt_len = u64::from(SDT_HEADER_LEN) + 8 * XSDT_ENTRIES;
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;

    let rsdp_addr = base;
    let xsdt_addr = align_up(rsdp_addr + rsdp_len, 16);
    let fadt_addr = align_up(xsdt_addr + xsdt_len, 16);
    let madt_addr = align_up(fadt_addr + fadt_len, 16);
    let dsdt_addr = align_up(madt_addr + madt.len() as u64, 16);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > limit {
        return Err(PlatformError::TooLarge {
            what: "ACPI tables",
            needed: end - base,
            available: limit.saturating_sub(base),
        });
    }

    let fadt = build_fadt(layout, dsdt_addr);
    let xsdt = build_xsdt(&[fadt_addr, madt_addr]);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    debug_assert_eq!(fadt.len() as u64, fadt_len);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);

    Ok(vec![
        GuestBlob {
            gpa: rsdp_addr,
            bytes: rsdp,
        },
        GuestBlob {
            gpa: xsdt_addr,
            bytes: xsdt,
        },
        GuestBlob {
            gpa: fadt_addr,
            bytes: fadt,
        },
        GuestBlob {
            gpa: madt_addr,
            bytes: madt,
        },
        GuestBlob {
            gpa: dsdt_addr,
            bytes: dsdt,
        },
    ])
}

/// An empty table (header only) with the stasis OEM and creator fields.
fn new_sdt(signature: [u8; 4], revision: u8) -> Sdt {
    let mut sdt = Sdt::new(
        signature,
        SDT_HEADER_LEN,
        revision,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    sdt.write_bytes(SDT_CREATOR_ID_OFFSET, &CREATOR_ID);
    sdt.write_u32(SDT_CREATOR_REVISION_OFFSET, CREATOR_REVISION);
    sdt
}

fn build_xsdt(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = new_sdt(*b"XSDT", 1);
    for entry in entries {
        xsdt.append_slice(&entry.to_le_bytes());
    }
    xsdt.as_slice().to_vec()
}

/// An 8-bit SystemIO generic address structure.
fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn build_fadt(layout: &PlatformLayout, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        // Hardware-reduced ACPI: no PM1/GPE blocks, PM timer, SCI or SMI
        // command port; sleep and reset go through the registers below.
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // WBINVD works (required of all ACPI 2.0+ systems).
        .flag(Flags::Wbinvd)
        // There are no fixed-feature power/sleep buttons.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.creator_id = CREATOR_ID;
    fadt.creator_revision = CREATOR_REVISION.to_le_bytes();
    // Bit 0 (LEGACY_DEVICES) stays clear: the ISA-style devices are all
    // enumerated in the DSDT, and Linux uses the bit only to allow PnP BIOS
    // probing. MSI_NOT_SUPPORTED and PCIE_ASPM_CONTROLS are set because the
    // platform has no PCI bus at all (virtio-mmio interrupts are IOAPIC pins);
    // whoever adds PCI with MSI/MSI-X (e.g. virtio-pci) must clear
    // MSI_NOT_SUPPORTED, or Linux will call pci_no_msi() and fall back to INTx.
    // CMOS_RTC_NOT_PRESENT (bit 5) stays clear: we emulate the RTC.
    fadt.iapc_boot_arch = (iapc_boot_arch::I8042
        | iapc_boot_arch::VGA_NOT_PRESENT
        | iapc_boot_arch::MSI_NOT_SUPPORTED
        | iapc_boot_arch::PCIE_ASPM_CONTROLS)
        .into();
    // The spec says hardware-reduced OSPMs ignore CENTURY, but Linux's
    // mc146818_get_time() reads it whenever it is nonzero; without it years
    // are guessed as 1970-2069.
    fadt.century = RTC_CENTURY_INDEX;
    fadt.reset_reg = io_port_gas(layout.reset_port);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_port_gas(layout.sleep_control_port);
    fadt.sleep_status_reg = io_port_gas(layout.sleep_status_port);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"STASISVM").into();
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

fn build_madt(layout: &PlatformLayout) -> Vec<u8> {
    let mut madt = new_sdt(*b"APIC", MADT_REVISION);
    madt.append_slice(&layout.lapic_addr.to_le_bytes());
    madt.append_slice(&MADT_PCAT_COMPAT.to_le_bytes());

    for id in 0..layout.num_vcpus {
        // Processor Local APIC: type, length, ACPI processor UID, APIC id, flags.
        let mut lapic = vec![MADT_TYPE_LAPIC, 8, id, id];
        lapic.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
        madt.append_slice(&lapic);
    }

    // I/O APIC: type, length, id, reserved, address, GSI base.
    let mut ioapic = vec![MADT_TYPE_IOAPIC, 12, layout.ioapic_id, 0];
    ioapic.extend_from_slice(&layout.ioapic_addr.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&ioapic);

    // No Interrupt Source Override structures. KVM_CREATE_IRQCHIP installs
    // kvm_setup_default_irq_routing(): GSI n -> IOAPIC pin n (and PIC pin n
    // for n < 16), so the in-kernel PIT's IRQ0 (injected as GSI 0) arrives on
    // IOAPIC pin 0. That is exactly the identity mapping ACPI assumes for ISA
    // IRQs without an override. The usual "ISA IRQ0 -> GSI 2" override is only
    // right for VMMs that re-route GSI 0 to pin 2 themselves (QEMU's
    // kvm_pc_setup_irq_routing does; Firecracker keeps KVM's routing and emits
    // no override, like us). All our ISA devices are edge/active-high, which
    // is the ISA bus default, so no override is needed for flags either.

    // Local APIC NMI: every processor's LINT1 is the NMI input (the virtual
    // wire setup KVM's LAPIC reset state expects); flags 0 = conforms to bus
    // (edge, active high).
    let mut nmi = vec![MADT_TYPE_LAPIC_NMI, 6, ALL_PROCESSORS];
    nmi.extend_from_slice(&0u16.to_le_bytes());
    nmi.push(1); // LINT#
    madt.append_slice(&nmi);

    madt.as_slice().to_vec()
}

/// Small "IRQNoFlags" resource descriptor (ISA IRQ, edge, active-high,
/// exclusive), as real firmware uses for legacy ISA devices. The crate only
/// offers the Extended Interrupt descriptor, whose numbers are GSIs.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22); // small item 0x04 (IRQ), 2 bytes of data
        sink.word(1u16 << self.0);
    }
}

/// QWordMemory resource descriptor for a region the device itself decodes
/// (ResourceConsumer, MinFixed, MaxFixed, non-cacheable, read-write). The
/// crate's `AddressSpace` always marks the range as a producer (a bridge
/// window), which is wrong for a device's own registers.
struct QWordMemoryConsumer {
    min: u64,
    max: u64,
}

impl Aml for QWordMemoryConsumer {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x8A); // large item 0x0A: QWord Address Space Descriptor
        sink.word(43); // length of the rest
        sink.byte(0); // resource type: memory
        sink.byte(0b1101); // consumer, positive decode, MinFixed, MaxFixed
        sink.byte(0b0001); // read-write, non-cacheable
        sink.qword(0); // granularity
        sink.qword(self.min);
        sink.qword(self.max);
        sink.qword(0); // translation offset
        sink.qword(self.max - self.min + 1); // length
    }
}

/// AML bytes already serialized.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// A `Device(name) { _HID (EISA id), _UID, _CRS }` for a legacy ISA device.
fn isa_device(name: &str, eisa_id: &str, uid: u32, resources: &[&dyn Aml]) -> RawAml {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new(eisa_id));
    let uid = aml::Name::new("_UID".into(), &uid);
    let crs = aml::Name::new(
        "_CRS".into(),
        &aml::ResourceTemplate::new(resources.to_vec()),
    );
    let mut bytes = Vec::new();
    aml::Device::new(name.into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut bytes);
    RawAml(bytes)
}

/// The VM generation ID device: `_HID "VMGENCTR"` (what Linux's vmgenid
/// driver matches), `_CID "VM_Gen_Counter"` (what Windows looks for), and
/// `ADDR`, a package of the low and high 32 bits of the ID's address.
fn vmgenid_device(addr: u64) -> RawAml {
    let hid = aml::Name::new("_HID".into(), &"VMGENCTR");
    let cid = aml::Name::new("_CID".into(), &"VM_Gen_Counter");
    let ddn = aml::Name::new("_DDN".into(), &"VM_Gen_Counter");
    let lo = (addr & 0xffff_ffff) as u32;
    let hi = (addr >> 32) as u32;
    let package = aml::Package::new(vec![&lo, &hi]);
    let addr = aml::Name::new("ADDR".into(), &package);
    let mut bytes = Vec::new();
    aml::Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr]).to_aml_bytes(&mut bytes);
    RawAml(bytes)
}

/// A hardware-reduced ACPI Generic Event Device (`ACPI0013`) whose
/// interrupt on `gsi` runs `_EVT`, which sends `Notify(\_SB.VGEN, 0x80)`:
/// how the VMM tells the guest that its VM generation ID changed (a
/// restore of a snapshot), as Linux's vmgenid driver and Windows expect.
fn ged_device(gsi: u32) -> RawAml {
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &0u8);
    // Edge-triggered, active-high, exclusive, like the virtio interrupts.
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
    let vgen = aml::Path::new("\\_SB_.VGEN");
    let notify = aml::Notify::new(&vgen, &0x80u8);
    let is_ours = aml::Equal::new(&aml::Arg(0), &gsi);
    let when = aml::If::new(&is_ours, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&when]);
    let mut bytes = Vec::new();
    aml::Device::new("GED_".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(&mut bytes);
    RawAml(bytes)
}

fn mmio_device(dev: &MmioDevice) -> RawAml {
    let hid = aml::Name::new("_HID".into(), &dev.hid);
    let uid = aml::Name::new("_UID".into(), &dev.uid);
    let last = dev.base + (dev.size - 1);
    let mem32;
    let mem64;
    let mem: &dyn Aml = match (u32::try_from(dev.base), u32::try_from(dev.size)) {
        (Ok(base), Ok(size)) if last <= u64::from(u32::MAX) => {
            mem32 = aml::Memory32Fixed::new(true, base, size);
            &mem32
        }
        _ => {
            mem64 = QWordMemoryConsumer {
                min: dev.base,
                max: last,
            };
            &mem64
        }
    };
    // Edge-triggered, active-high, exclusive: see MmioDevice::gsi. Linux's
    // virtio_mmio ACPI binding (LNRO0005) takes the first memory resource and
    // the first interrupt.
    let irq = aml::Interrupt::new(true, true, false, false, dev.gsi);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![mem, &irq]));
    let mut bytes = Vec::new();
    aml::Device::new(dev.name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut bytes);
    RawAml(bytes)
}

fn build_dsdt(layout: &PlatformLayout) -> Vec<u8> {
    let irqs = &layout.legacy_irqs;
    let mut devices: Vec<RawAml> = Vec::new();

    devices.push(isa_device(
        "COM1",
        "PNP0501",
        1,
        &[
            &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
            &IrqNoFlags(irqs.com1),
        ],
    ));
    devices.push(isa_device(
        "PS2K",
        "PNP0303",
        0,
        &[
            &aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
            &aml::IO::new(I8042_CMD_PORT, I8042_CMD_PORT, 1, 1),
            &IrqNoFlags(irqs.i8042_kbd),
        ],
    ));
    if let Some(aux) = irqs.i8042_aux {
        // The mouse shares the controller's ports, which the keyboard device
        // already claims; like real firmware, describe only its IRQ.
        devices.push(isa_device("PS2M", "PNP0F13", 0, &[&IrqNoFlags(aux)]));
    }
    devices.push(isa_device(
        "RTC0",
        "PNP0B00",
        0,
        &[
            &aml::IO::new(RTC_PORT, RTC_PORT, 1, 2),
            &IrqNoFlags(irqs.rtc),
        ],
    ));
    devices.extend(layout.mmio_devices.iter().map(mmio_device));
    if let Some(addr) = layout.vmgenid_addr {
        devices.push(vmgenid_device(addr));
        if let Some(gsi) = layout.vmgenid_ged_gsi {
            devices.push(ged_device(gsi));
        }
    }

    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();

    let mut body = Vec::new();
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);
    aml::Scope::new("_SB_".into(), children).to_aml_bytes(&mut body);

    let mut dsdt = new_sdt(*b"DSDT", DSDT_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum;

    #[test]
    fn irq_no_flags_encoding() {
        let mut v = Vec::new();
        IrqNoFlags(4).to_aml_bytes(&mut v);
        assert_eq!(v, [0x22, 0x10, 0x00]);
        let mut v = Vec::new();
        IrqNoFlags(12).to_aml_bytes(&mut v);
        assert_eq!(v, [0x22, 0x00, 0x10]);
    }

    #[test]
    fn header_fields() {
        let t = build_xsdt(&[0x1234]);
        assert_eq!(&t[0..4], b"XSDT");
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 44);
        assert_eq!(&t[10..16], b"STASIS");
        assert_eq!(&t[16..24], b"STASISVM");
        assert_eq!(&t[28..32], b"STAS");
        assert_eq!(checksum(&t), 0);
    }

    #[test]
    fn high_mmio_uses_qword_memory() {
        let dev = MmioDevice::virtio("VR00", 0, 0x1_0000_0000, 0x1000, 5);
        let RawAml(bytes) = mmio_device(&dev);
        let mut qword = vec![0x8A, 43, 0, 0, 0b1101, 0b0001];
        qword.extend_from_slice(&0u64.to_le_bytes());
        qword.extend_from_slice(&0x1_0000_0000u64.to_le_bytes());
        qword.extend_from_slice(&0x1_0000_0FFFu64.to_le_bytes());
        qword.extend_from_slice(&0u64.to_le_bytes());
        qword.extend_from_slice(&0x1000u64.to_le_bytes());
        assert!(bytes.windows(qword.len()).any(|w| w == qword));

        let dev = MmioDevice::virtio("VR00", 0, 0xD000_0000, 0x1000, 5);
        let RawAml(bytes) = mmio_device(&dev);
        let mem32 = [0x86, 9, 0, 1, 0, 0, 0, 0xD0, 0, 0x10, 0, 0];
        assert!(bytes.windows(mem32.len()).any(|w| w == mem32));
        // Extended interrupt: consumer, edge, active-high, exclusive, GSI 5.
        let irq = [0x89, 6, 0, 0b0011, 1, 5, 0, 0, 0];
        assert!(bytes.windows(irq.len()).any(|w| w == irq));
    }
}
