//! Guest RAM: anonymous host mappings, transparent huge pages, and their
//! registration with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;

/// The guest's RAM.
pub type GuestRam = GuestMemoryMmap<()>;

/// Errors while setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map the guest's RAM.
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        /// Size asked for.
        mib: u64,
        /// What vm-memory said.
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed: {source}")]
    Register {
        /// The slot.
        slot: u32,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

/// Allocates `mib` MiB of guest RAM laid out around the MMIO hole, and asks
/// the host to back it with transparent huge pages: on shadow-paging hosts
/// a first touch of a 4 KiB page costs tens of microseconds, a 2 MiB page
/// amortises that 512 times.
pub fn allocate(mib: u64) -> Result<GuestRam, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mib << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|source| MemoryError::Allocate { mib, source })?;
    for region in mem.iter() {
        // SAFETY: the range is exactly one mapping we own; MADV_HUGEPAGE
        // only changes how the kernel backs it, never its contents.
        let ret = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if ret != 0 {
            tracing::debug!(
                "madvise(MADV_HUGEPAGE) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(mem)
}

/// Registers every region of `mem` with KVM, slot numbers from 0.
pub fn register(vm: &VmFd, mem: &GuestRam) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host mapping outlives the VM: the `GuestRam` is owned
        // by the `Vm`, which drops the VmFd first.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}
