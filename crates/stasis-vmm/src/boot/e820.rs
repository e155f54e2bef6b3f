//! The guest memory map as both boot protocols describe it.

use crate::layout;
use crate::memory::GuestRam;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved (firmware areas, tables).
pub const E820_RESERVED: u32 = 2;

/// One entry of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map: conventional memory up to the VM generation ID page,
/// from there to 1 MiB reserved (generation ID, MP table, ACPI tables), then every RAM
/// region from 1 MiB up.
pub fn memory_map(mem: &GuestRam) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: layout::LOW_RESERVED_START,
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: layout::LOW_RESERVED_START,
            size: layout::HIMEM_START - layout::LOW_RESERVED_START,
            kind: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(layout::HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(MemoryMapEntry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}
