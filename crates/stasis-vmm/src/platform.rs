//! Writing the ACPI tables and the MP table into guest memory.

use stasis_platform::{GuestBlob, MmioDevice, PlatformLayout};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestRam;

/// Errors while building or writing the firmware tables.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The tables could not be built.
    #[error("cannot build firmware tables: {0}")]
    Build(#[from] stasis_platform::PlatformError),
    /// Writing them into guest memory failed.
    #[error("cannot write firmware tables at {gpa:#x}: {source}")]
    Write {
        /// Where.
        gpa: u64,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
}

/// The platform as the tables describe it, with `virtio_devices` virtio-mmio
/// devices in slots `0..virtio_devices` (ACPI names `VR00`, `VR01`, ...,
/// `_UID` = slot).
pub fn platform_layout(vcpus: u32, virtio_devices: usize) -> PlatformLayout {
    let mmio_devices = (0..virtio_devices)
        .filter_map(|slot| {
            let (base, gsi) = layout::virtio_mmio_slot(slot)?;
            Some(MmioDevice::virtio(
                &format!("VR{slot:02X}"),
                slot as u32,
                base,
                layout::VIRTIO_MMIO_SIZE,
                gsi,
            ))
        })
        .collect();
    PlatformLayout {
        mmio_devices,
        ioapic_addr: layout::IOAPIC_ADDR as u32,
        lapic_addr: layout::LAPIC_ADDR as u32,
        sleep_control_port: layout::ACPI_SLEEP_CONTROL_PORT,
        sleep_status_port: layout::ACPI_SLEEP_STATUS_PORT,
        reset_port: layout::ACPI_RESET_PORT,
        vmgenid_addr: Some(layout::VMGENID_ADDR),
        vmgenid_ged_gsi: Some(layout::GED_GSI),
        ..PlatformLayout::new(vcpus as u8)
    }
}

/// Writes the ACPI tables and the MP table; returns the RSDP's address.
pub fn write_tables(
    mem: &GuestRam,
    vcpus: u32,
    virtio_devices: usize,
) -> Result<u64, PlatformError> {
    let pl = platform_layout(vcpus, virtio_devices);
    let acpi = stasis_platform::acpi_tables(&pl, layout::ACPI_START, layout::ACPI_END)?;
    let mp = stasis_platform::mp_table(&pl, layout::MPTABLE_ADDR, layout::ACPI_START)?;
    for GuestBlob { gpa, bytes } in acpi.iter().chain(mp.iter()) {
        mem.write_slice(bytes, GuestAddress(*gpa))
            .map_err(|source| PlatformError::Write { gpa: *gpa, source })?;
    }
    Ok(layout::ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_devices_are_described_per_slot() {
        let pl = platform_layout(2, 3);
        pl.validate().unwrap();
        assert_eq!(pl.mmio_devices.len(), 3);
        let d = &pl.mmio_devices[2];
        assert_eq!(d.name, "VR02");
        assert_eq!(d.hid, "LNRO0005");
        assert_eq!((d.uid, d.base, d.size, d.gsi), (2, 0xd000_2000, 0x1000, 7));
        let all = platform_layout(1, layout::VIRTIO_MMIO_SLOTS);
        all.validate().unwrap();
        assert_eq!(all.mmio_devices[15].name, "VR0F");
        assert_eq!(all.mmio_devices[15].gsi, 23);
        // The tables build with every slot in use.
        stasis_platform::acpi_tables(&all, layout::ACPI_START, layout::ACPI_END).unwrap();
        stasis_platform::mp_table(&all, layout::MPTABLE_ADDR, layout::ACPI_START).unwrap();
    }
}
