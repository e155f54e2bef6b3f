//! Writing the ACPI tables and the MP table into guest memory.

use stasis_platform::{GuestBlob, PlatformLayout};
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

/// The platform as the tables describe it.
pub fn platform_layout(vcpus: u32) -> PlatformLayout {
    PlatformLayout {
        ioapic_addr: layout::IOAPIC_ADDR as u32,
        lapic_addr: layout::LAPIC_ADDR as u32,
        sleep_control_port: layout::ACPI_SLEEP_CONTROL_PORT,
        sleep_status_port: layout::ACPI_SLEEP_STATUS_PORT,
        reset_port: layout::ACPI_RESET_PORT,
        vmgenid_addr: Some(layout::VMGENID_ADDR),
        ..PlatformLayout::new(vcpus as u8)
    }
}

/// Writes the ACPI tables and the MP table; returns the RSDP's address.
pub fn write_tables(mem: &GuestRam, vcpus: u32) -> Result<u64, PlatformError> {
    let pl = platform_layout(vcpus);
    let acpi = stasis_platform::acpi_tables(&pl, layout::ACPI_START, layout::ACPI_END)?;
    let mp = stasis_platform::mp_table(&pl, layout::MPTABLE_ADDR, layout::ACPI_START)?;
    for GuestBlob { gpa, bytes } in acpi.iter().chain(mp.iter()) {
        mem.write_slice(bytes, GuestAddress(*gpa))
            .map_err(|source| PlatformError::Write { gpa: *gpa, source })?;
    }
    Ok(layout::ACPI_START)
}
