//! x86_64 platform description tables for stasis guests.
//!
//! This crate only produces bytes and the guest-physical addresses they belong
//! at; the VMM copies them into guest memory. It needs no KVM.
//!
//! * [`acpi_tables()`] builds RSDP, XSDT, FADT (hardware-reduced ACPI), MADT and
//!   a DSDT describing the legacy devices and virtio-mmio devices.
//! * [`mp_table`] builds an Intel MultiProcessor Specification 1.4 table for
//!   guests booted without ACPI (`acpi=off`) or that only understand MP tables.
//!
//! # Interrupt routing
//!
//! Both tables describe the routing of KVM's *default* GSI routing table
//! (`kvm_setup_default_irq_routing`, installed by `KVM_CREATE_IRQCHIP`):
//! GSI *n* drives IOAPIC pin *n* (and, for *n* < 16, PIC pin *n*). ISA IRQ 0
//! (the PIT) therefore arrives on IOAPIC pin 0, not pin 2 as on real
//! chipsets, so **no** ISA IRQ0 → GSI 2 override is emitted. QEMU only emits
//! that override because it replaces KVM's routing table
//! (`kvm_pc_setup_irq_routing` routes GSI 0 to IOAPIC pin 2); if the VMM ever
//! installs its own routing it must keep GSI *n* → pin *n* for these tables to
//! stay true. See [`IOAPIC_NUM_PINS`].

#![deny(missing_docs)]

mod acpi;
mod mptable;

pub use acpi::acpi_tables;
pub use mptable::mp_table;

/// Where [`acpi_tables()`] is normally asked to put the RSDP: the start of the
/// BIOS read-only area that OSes scan (0xE0000..0x100000) for "RSD PTR ".
pub const RSDP_ADDR: u64 = 0xE_0000;

/// End (exclusive) of the legacy BIOS area scanned for the RSDP.
pub const BIOS_AREA_END: u64 = 0x10_0000;

/// Usual address for the MP floating pointer structure: the last KiB of base
/// memory (639 KiB), which Linux scans; reserve 0x9FC00..0xA0000 in the e820
/// map. One KiB holds the MP table for up to 40 vCPUs (a few less with
/// virtio-mmio GSIs of 16 and up); for more, use a larger limit (the table
/// grows upward, so the memory there must be backed) or place it in
/// 0xF0000..0x100000, which Linux also scans.
pub const MPTABLE_ADDR: u64 = 0x9_FC00;

/// Default IOAPIC MMIO base.
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;

/// Default local APIC MMIO base.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;

/// Number of redirection entries (pins) of KVM's in-kernel IOAPIC; valid GSIs
/// are `0..IOAPIC_NUM_PINS`.
pub const IOAPIC_NUM_PINS: u32 = 24;

/// I/O port base of COM1 (8 ports).
pub const COM1_PORT: u16 = 0x3F8;

/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;

/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;

/// CMOS RTC index port (the data port follows it).
pub const RTC_PORT: u16 = 0x70;

/// The ACPI sleep type the DSDT's `\_S5_` package advertises. In
/// hardware-reduced mode Linux powers off by writing
/// `(SLP_TYP << 2) | SLP_EN(1 << 5)` = `0x34` to the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Legacy ISA devices the platform emulates and their ISA IRQs.
///
/// The ports are the fixed PC ones ([`COM1_PORT`], [`I8042_DATA_PORT`],
/// [`I8042_CMD_PORT`], [`RTC_PORT`]); with KVM's default routing ISA IRQ *n*
/// is GSI *n*.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegacyIrqs {
    /// COM1 (ports 0x3F8-0x3FF); normally 4.
    pub com1: u8,
    /// i8042 keyboard port (ports 0x60 and 0x64); normally 1.
    pub i8042_kbd: u8,
    /// i8042 auxiliary (mouse) port, normally `Some(12)` if the i8042 emulates
    /// one. With `None` no `PNP0F13` device is described and Linux sets
    /// `i8042.noaux` by itself, skipping the AUX probe.
    pub i8042_aux: Option<u8>,
    /// CMOS RTC (ports 0x70-0x71); normally 8.
    pub rtc: u8,
}

impl Default for LegacyIrqs {
    fn default() -> Self {
        LegacyIrqs {
            com1: 4,
            i8042_kbd: 1,
            i8042_aux: None,
            rtc: 8,
        }
    }
}

/// A virtio-mmio device to describe in the DSDT (and MP table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Four-character ACPI name, e.g. `"VR00"` (`A-Z`, `0-9`, `_`, not
    /// starting with a digit).
    pub name: String,
    /// `_HID`, normally `"LNRO0005"` (Linux's virtio-mmio ACPI id).
    pub hid: String,
    /// `_UID`, unique among devices with the same `_HID`.
    pub uid: u32,
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Size of the register window in bytes (normally 0x1000).
    pub size: u64,
    /// GSI (= IOAPIC pin) of the device's interrupt. Described as
    /// edge-triggered, active-high, exclusive: KVM's irqfd (without a resample
    /// fd) injects a 0→1→0 pulse, which a level-triggered pin would treat as
    /// a level with no way to re-assert while the device still has work.
    pub gsi: u32,
}

impl MmioDevice {
    /// A virtio-mmio device (`_HID` "LNRO0005").
    pub fn virtio(name: &str, uid: u32, base: u64, size: u64, gsi: u32) -> Self {
        MmioDevice {
            name: name.to_string(),
            hid: "LNRO0005".to_string(),
            uid,
            base,
            size,
            gsi,
        }
    }
}

/// Everything the platform tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformLayout {
    /// Number of vCPUs; their local APIC ids (and ACPI processor UIDs) are
    /// `0..num_vcpus`, APIC id 0 being the bootstrap processor.
    pub num_vcpus: u8,
    /// IOAPIC MMIO base (normally [`IOAPIC_ADDR`]).
    pub ioapic_addr: u32,
    /// IOAPIC id; must differ from every vCPU's APIC id and from 0xFF.
    pub ioapic_id: u8,
    /// Local APIC MMIO base (normally [`LAPIC_ADDR`]).
    pub lapic_addr: u32,
    /// Legacy ISA devices and their IRQs.
    pub legacy_irqs: LegacyIrqs,
    /// virtio-mmio devices.
    pub mmio_devices: Vec<MmioDevice>,
    /// ACPI sleep control register I/O port (8 bits).
    pub sleep_control_port: u16,
    /// ACPI sleep status register I/O port (8 bits).
    pub sleep_status_port: u16,
    /// ACPI reset register I/O port (8 bits); the guest writes
    /// [`RESET_VALUE`] to it to reboot.
    pub reset_port: u16,
    /// Guest physical address of the 16-byte VM generation ID, if the VM
    /// has one (described by a `VGEN` device in the DSDT).
    pub vmgenid_addr: Option<u64>,
    /// The GSI of the Generic Event Device that notifies the guest of a
    /// new VM generation ID (`GED_` in the DSDT; only with
    /// `vmgenid_addr`).
    pub vmgenid_ged_gsi: Option<u32>,
}

/// The value the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 0x01;

impl PlatformLayout {
    /// The standard layout for `num_vcpus` vCPUs: IOAPIC at 0xFEC00000 with
    /// id `num_vcpus`, LAPIC at 0xFEE00000, default legacy IRQs, no virtio-mmio
    /// devices, sleep control/status at 0x3C0/0x3C1 and reset at 0x3C2.
    pub fn new(num_vcpus: u8) -> Self {
        PlatformLayout {
            num_vcpus,
            ioapic_addr: IOAPIC_ADDR,
            ioapic_id: num_vcpus,
            lapic_addr: LAPIC_ADDR,
            legacy_irqs: LegacyIrqs::default(),
            mmio_devices: Vec::new(),
            sleep_control_port: 0x3C0,
            sleep_status_port: 0x3C1,
            reset_port: 0x3C2,
            vmgenid_addr: None,
            vmgenid_ged_gsi: None,
        }
    }

    /// Checks the layout for things no table could describe correctly.
    pub fn validate(&self) -> Result<(), PlatformError> {
        if self.num_vcpus == 0 {
            return Err(PlatformError::NoVcpus);
        }
        if self.ioapic_id == 0xFF || self.ioapic_id < self.num_vcpus {
            return Err(PlatformError::IoapicIdConflict(self.ioapic_id));
        }
        let l = &self.legacy_irqs;
        let legacy = [Some(l.com1), Some(l.i8042_kbd), l.i8042_aux, Some(l.rtc)];
        for irq in legacy.into_iter().flatten() {
            if irq >= 16 {
                return Err(PlatformError::InvalidLegacyIrq(irq));
            }
        }
        for (i, dev) in self.mmio_devices.iter().enumerate() {
            let bad = |reason: &'static str| PlatformError::InvalidMmioDevice {
                name: dev.name.clone(),
                reason,
            };
            if !is_valid_acpi_name(&dev.name) {
                return Err(bad("name is not a 4-character ACPI name"));
            }
            if RESERVED_DEVICE_NAMES.contains(&dev.name.as_str()) {
                return Err(bad("name is used by a legacy device"));
            }
            if self.mmio_devices[..i].iter().any(|d| d.name == dev.name) {
                return Err(bad("name is used twice"));
            }
            if dev.hid.is_empty()
                || dev.hid.len() > 8
                || !dev.hid.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(bad("_HID is not a 1-8 character alphanumeric id"));
            }
            if dev.size == 0 || dev.base.checked_add(dev.size).is_none() {
                return Err(bad("register window is empty or wraps"));
            }
            if dev.gsi >= IOAPIC_NUM_PINS {
                return Err(bad("GSI is beyond the IOAPIC's pins"));
            }
        }
        Ok(())
    }
}

/// Names of the devices the DSDT always contains (under `\_SB_`).
const RESERVED_DEVICE_NAMES: [&str; 4] = ["COM1", "PS2K", "PS2M", "RTC0"];

fn is_valid_acpi_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 4
        && (b[0].is_ascii_uppercase() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
}

/// Bytes to be copied into guest memory at `gpa`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestBlob {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl GuestBlob {
    /// Guest-physical address one past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + self.bytes.len() as u64
    }
}

/// Why the tables could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    /// `num_vcpus` is 0.
    #[error("the platform needs at least one vCPU")]
    NoVcpus,
    /// The IOAPIC id collides with a vCPU's APIC id or is the broadcast id.
    #[error("IOAPIC id {0} collides with a vCPU APIC id or is 0xFF")]
    IoapicIdConflict(u8),
    /// A legacy device was given an IRQ outside 0..16.
    #[error("legacy ISA IRQ {0} is not in 0..16")]
    InvalidLegacyIrq(u8),
    /// A virtio-mmio device cannot be described.
    #[error("MMIO device {name:?}: {reason}")]
    InvalidMmioDevice {
        /// The device's ACPI name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The base address is not suitably aligned or not where guests look.
    #[error("{what} at {addr:#x}: {reason}")]
    BadAddress {
        /// Which structure.
        what: &'static str,
        /// The address asked for.
        addr: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The tables do not fit in `[base, limit)`.
    #[error("{what} need {needed} bytes but only {available} are available")]
    TooLarge {
        /// Which tables.
        what: &'static str,
        /// Bytes needed from `base`.
        needed: u64,
        /// `limit - base`.
        available: u64,
    },
}

/// Two's-complement checksum byte that makes `data` (with this byte added)
/// sum to zero.
pub(crate) fn checksum(data: &[u8]) -> u8 {
    data.iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Rounds `v` up to a multiple of `align` (a power of two).
pub(crate) fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_layouts() {
        assert_eq!(
            PlatformLayout::new(0).validate(),
            Err(PlatformError::NoVcpus)
        );
        let mut l = PlatformLayout::new(4);
        l.ioapic_id = 2;
        assert_eq!(l.validate(), Err(PlatformError::IoapicIdConflict(2)));
        let mut l = PlatformLayout::new(255);
        assert_eq!(l.validate(), Err(PlatformError::IoapicIdConflict(255)));
        l.ioapic_id = 0xFE;
        assert!(matches!(
            l.validate(),
            Err(PlatformError::IoapicIdConflict(_))
        ));

        for (name, gsi) in [
            ("vr00", 5),
            ("0R00", 5),
            ("VR0", 5),
            ("COM1", 5),
            ("VR00", 24),
        ] {
            let mut l = PlatformLayout::new(1);
            l.mmio_devices
                .push(MmioDevice::virtio(name, 0, 0xD000_0000, 0x1000, gsi));
            assert!(
                matches!(l.validate(), Err(PlatformError::InvalidMmioDevice { .. })),
                "{name} {gsi}"
            );
        }
        let mut l = PlatformLayout::new(1);
        l.mmio_devices
            .push(MmioDevice::virtio("VR00", 0, 0xD000_0000, 0x1000, 5));
        l.mmio_devices
            .push(MmioDevice::virtio("VR00", 1, 0xD000_1000, 0x1000, 6));
        assert!(l.validate().is_err());
        l.mmio_devices[1].name = "VR01".into();
        assert_eq!(l.validate(), Ok(()));
        l.legacy_irqs.com1 = 16;
        assert_eq!(l.validate(), Err(PlatformError::InvalidLegacyIrq(16)));
    }

    #[test]
    fn checksum_zeroes_sum() {
        let data = [1u8, 2, 3, 250];
        let c = checksum(&data);
        let sum = data.iter().fold(c, |a, b| a.wrapping_add(*b));
        assert_eq!(sum, 0);
        assert_eq!(checksum(&[]), 0);
    }
}
