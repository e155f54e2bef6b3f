//! The VM generation ID (Microsoft's "Virtual Machine Generation ID"
//! device): a 128-bit identifier in guest memory, described in the DSDT
//! (`_CID "VM_Gen_Counter"`, `ADDR` = its address), that changes whenever
//! the VM may have been duplicated — here, on every restore. Guests use it
//! to reseed random number generators and to tell that they are clones.
//!
//! stasis also writes a little-endian u64 restore counter right after the
//! 16-byte ID (an extension: 0 for a booted VM, +1 for every restore along
//! the snapshot chain), which simple guests can read without ACPI.
//!
//! When a restored VM starts, the guest is told: the VMM raises an edge on
//! the GSI of the DSDT's Generic Event Device (`GED_`, `ACPI0013`), whose
//! `_EVT` method does `Notify(\_SB.VGEN, 0x80)`, which Linux's vmgenid
//! driver (and Windows) take as "the ID changed": Linux then reseeds its
//! random number generator, so clones of one snapshot stop sharing its
//! state. See [`notify_guest`].

use vm_memory::{Bytes, GuestAddress};

use crate::layout::VMGENID_ADDR;
use crate::memory::GuestRam;

/// The device's saved state: section `vmgenid`, instance `0` (optional: a
/// reader that does not know it loses nothing the guest needs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmGenIdState {
    /// The current generation ID.
    #[serde(with = "stasis_snapshot::hex_bytes")]
    pub id: Vec<u8>,
    /// How many restores led to this VM.
    pub generation: u64,
}

impl stasis_snapshot::SectionState for VmGenIdState {
    const NAME: &'static str = "vmgenid";
    const VERSION: u32 = 1;
}

/// The generation ID and counter of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmGenId {
    id: [u8; 16],
    generation: u64,
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most id.len() bytes into our buffer.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        // Fall back to time and pid: unique enough to tell clones apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id.copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    // RFC 4122 version 4, variant 1.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

impl VmGenId {
    /// A fresh ID for a booted VM (generation 0).
    pub fn new() -> Self {
        Self {
            id: random_id(),
            generation: 0,
        }
    }

    /// The ID for a VM restored from `saved`: a new ID, the next generation.
    pub fn after_restore(saved: &VmGenIdState) -> Self {
        Self {
            id: random_id(),
            // A restore refuses a generation that cannot be advanced.
            generation: saved.generation.saturating_add(1),
        }
    }

    /// The ID of a VM that goes on elsewhere (a live migration): the same
    /// ID and generation (a malformed saved ID is replaced, as by a
    /// restore).
    pub fn resume(saved: &VmGenIdState) -> Self {
        match <[u8; 16]>::try_from(saved.id.as_slice()) {
            Ok(id) => Self {
                id,
                generation: saved.generation,
            },
            Err(_) => Self::after_restore(saved),
        }
    }

    /// Writes the ID and counter where the DSDT says they are.
    pub fn write(&self, mem: &GuestRam) -> Result<(), vm_memory::GuestMemoryError> {
        mem.write_slice(&self.id, GuestAddress(VMGENID_ADDR))?;
        mem.write_obj(self.generation, GuestAddress(VMGENID_ADDR + 16))
    }

    /// The state to save.
    pub fn save(&self) -> VmGenIdState {
        VmGenIdState {
            id: self.id.to_vec(),
            generation: self.generation,
        }
    }

    /// The restore counter.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// Tells the guest its VM generation ID changed: one edge on the GED's GSI
/// through `irqfd` (an eventfd registered as irqfd for
/// [`crate::layout::GED_GSI`]).
pub fn notify_guest(irqfd: &vmm_sys_util::eventfd::EventFd) {
    if let Err(e) = irqfd.write(1) {
        tracing::warn!("cannot notify the guest of its new VM generation ID: {e}");
    }
}

impl Default for VmGenId {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restores_get_new_ids_and_count_up() {
        let a = VmGenId::new();
        let b = VmGenId::after_restore(&a.save());
        let c = VmGenId::after_restore(&a.save());
        assert_ne!(a.id, b.id);
        assert_ne!(b.id, c.id);
        assert_eq!((a.generation(), b.generation(), c.generation()), (0, 1, 1));
        assert_eq!(a.id[6] >> 4, 4);
    }
}
