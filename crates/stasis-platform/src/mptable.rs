//! Intel MultiProcessor Specification 1.4 table.
//!
//! A 16-byte MP floating pointer structure at `base`, immediately followed by
//! the MP configuration table (base section only, no extended entries).

use crate::{checksum, GuestBlob, PlatformError, PlatformLayout, IOAPIC_NUM_PINS};

/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Local APIC version reported for each processor (KVM's LAPIC: integrated
/// xAPIC, version 0x14).
const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version (KVM's IOAPIC reports 0x11).
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature: family 6, model 0, stepping 0 (stepping in bits 3:0, model
/// 7:4, family 11:8). Guests read the real values from CPUID; this only needs
/// to be plausible.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX feature flags: FPU (bit 0) and on-chip APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// IOAPIC entry flag: usable.
const IOAPIC_ENABLED: u8 = 1;

/// Interrupt types of interrupt assignment entries.
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Interrupt flags: polarity and trigger "conform to the bus" (ISA: edge,
/// active high).
const INT_FLAGS_CONFORMING: u16 = 0;
/// Interrupt flags: active high (PO = 01), edge triggered (EL = 01).
const INT_FLAGS_EDGE_HIGH: u16 = 0b0101;

/// The only bus: ISA, id 0.
const ISA_BUS_ID: u8 = 0;
/// Destination "all local APICs".
const ALL_LAPICS: u8 = 0xFF;

/// Number of base-table entries for `layout` (used by tests and for sizing).
fn entry_count(layout: &PlatformLayout) -> usize {
    usize::from(layout.num_vcpus) + 1 + 1 + 16 + extra_irqs(layout).len() + 2
}

/// GSIs of virtio-mmio devices that are not ISA IRQs 0-15 already listed.
fn extra_irqs(layout: &PlatformLayout) -> Vec<u8> {
    let mut gsis: Vec<u8> = layout
        .mmio_devices
        .iter()
        .filter(|d| d.gsi >= 16 && d.gsi < IOAPIC_NUM_PINS)
        .map(|d| d.gsi as u8)
        .collect();
    gsis.sort_unstable();
    gsis.dedup();
    gsis
}

/// Builds an MP table for `layout` at `base` (the floating pointer; the
/// configuration table follows it), within `[base, limit)`.
///
/// `base` must be 16-byte aligned and below 4 GiB. Linux finds the floating
/// pointer only in the first KiB of memory, the last KiB of base memory
/// (0x9FC00 with 640 KiB), the first KiB of the EBDA or 0xF0000..0x100000;
/// the caller must mark `[base, limit)` reserved in the e820 map.
///
/// Interrupt assignments follow KVM's default routing (see the crate docs):
/// ISA IRQ *n* → IOAPIC pin *n* for *n* in 0..16 (including IRQ 2, unused),
/// plus an edge/active-high entry for each virtio-mmio GSI ≥ 16 so guests
/// booted with `acpi=off` program those pins correctly. LINT0 of every local
/// APIC is ExtINT (the 8259 virtual wire) and LINT1 is NMI.
pub fn mp_table(
    layout: &PlatformLayout,
    base: u64,
    limit: u64,
) -> Result<Vec<GuestBlob>, PlatformError> {
    layout.validate()?;
    if base & 0xF != 0 {
        return Err(PlatformError::BadAddress {
            what: "MP floating pointer",
            addr: base,
            reason: "not 16-byte aligned",
        });
    }
    let table_addr = base + FLOATING_LEN as u64;
    let table_len = HEADER_LEN
        + 20 * usize::from(layout.num_vcpus)
        + 8 * (entry_count(layout) - usize::from(layout.num_vcpus));
    let end = table_addr + table_len as u64;
    if end > limit {
        return Err(PlatformError::TooLarge {
            what: "MP table",
            needed: end - base,
            available: limit.saturating_sub(base),
        });
    }
    let table_addr32 = u32::try_from(table_addr).map_err(|_| PlatformError::BadAddress {
        what: "MP configuration table",
        addr: table_addr,
        reason: "above 4 GiB",
    })?;

    let mut entries: Vec<u8> = Vec::with_capacity(table_len - HEADER_LEN);
    for id in 0..layout.num_vcpus {
        let mut flags = CPU_ENABLED;
        if id == 0 {
            flags |= CPU_BOOTSTRAP;
        }
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[
        ENTRY_IOAPIC,
        layout.ioapic_id,
        IOAPIC_VERSION,
        IOAPIC_ENABLED,
    ]);
    entries.extend_from_slice(&layout.ioapic_addr.to_le_bytes());

    let mut io_int = |irq: u8, flags: u16| {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&flags.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, layout.ioapic_id, irq]);
    };
    for irq in 0..16 {
        io_int(irq, INT_FLAGS_CONFORMING);
    }
    for gsi in extra_irqs(layout) {
        io_int(gsi, INT_FLAGS_EDGE_HIGH);
    }

    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, int_type]);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, lint]);
    }

    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"STASIS  "); // OEM id, 8 bytes
    table.extend_from_slice(b"STASISVM    "); // product id, 12 bytes
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&(entry_count(layout) as u16).to_le_bytes());
    table.extend_from_slice(&layout.lapic_addr.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    debug_assert_eq!(table.len(), table_len);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr32.to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(SPEC_REV);
    floating.push(0); // checksum, below
                      // Feature byte 1 = 0: a configuration table is present. Feature byte 2
                      // bit 7 (IMCRP) = 0: virtual wire mode, no IMCR to program.
    floating.extend_from_slice(&[0; 5]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(vec![GuestBlob {
        gpa: base,
        bytes: floating,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MmioDevice, MPTABLE_ADDR};

    #[test]
    fn fits_40_vcpus_in_one_kib() {
        let l = PlatformLayout::new(40);
        let blobs = mp_table(&l, MPTABLE_ADDR, MPTABLE_ADDR + 1024).unwrap();
        assert!(blobs[0].end() <= MPTABLE_ADDR + 1024);
        let l = PlatformLayout::new(41);
        assert!(matches!(
            mp_table(&l, MPTABLE_ADDR, MPTABLE_ADDR + 1024),
            Err(PlatformError::TooLarge { .. })
        ));
    }

    #[test]
    fn extra_irqs_dedup_and_skip_isa() {
        let mut l = PlatformLayout::new(1);
        l.mmio_devices = vec![
            MmioDevice::virtio("VR00", 0, 0xD000_0000, 0x1000, 5),
            MmioDevice::virtio("VR01", 1, 0xD000_1000, 0x1000, 17),
            MmioDevice::virtio("VR02", 2, 0xD000_2000, 0x1000, 16),
            MmioDevice::virtio("VR03", 3, 0xD000_3000, 0x1000, 17),
        ];
        assert_eq!(extra_irqs(&l), vec![16, 17]);
    }
}
