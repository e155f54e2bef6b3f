//! Guest RAM: host mappings (anonymous with transparent huge pages, or a
//! shared memory file a local upgrade hands over), and their
//! registration with KVM.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use stasis_config::MemoryBackend;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    /// The memory file could not be made.
    #[error("cannot create a {mib} MiB memory file for guest RAM: {source}")]
    MemoryFile {
        /// Size asked for.
        mib: u64,
        /// The error.
        source: std::io::Error,
    },
    /// Memory files handed over do not make the RAM the VM needs.
    #[error("the guest memory handed over is unusable: {0}")]
    HandedOver(String),
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed: {source}")]
    Register {
        /// The slot.
        slot: u32,
        /// The error.
        source: kvm_ioctls::Error,
    },
}

/// Allocates `mib` MiB of guest RAM laid out around the MMIO hole, backed
/// as `backend` says. Anonymous RAM asks the host for transparent huge
/// pages: on shadow-paging hosts a first touch of a 4 KiB page costs tens
/// of microseconds, a 2 MiB page amortises that 512 times.
pub fn allocate(mib: u64, backend: MemoryBackend) -> Result<GuestRam, MemoryError> {
    let ranges = layout::ram_ranges(mib << 20);
    let mem = match backend {
        MemoryBackend::Anonymous => {
            let ranges: Vec<(GuestAddress, usize)> = ranges
                .into_iter()
                .map(|(start, len)| (GuestAddress(start), len as usize))
                .collect();
            GuestMemoryMmap::from_ranges(&ranges)
        }
        MemoryBackend::Memfd => {
            let file =
                memory_file(mib << 20).map_err(|source| MemoryError::MemoryFile { mib, source })?;
            let mut offset = 0;
            let mut with_files = Vec::new();
            for (start, len) in ranges {
                let f = file
                    .try_clone()
                    .map_err(|source| MemoryError::MemoryFile { mib, source })?;
                with_files.push((
                    GuestAddress(start),
                    len as usize,
                    Some(FileOffset::new(f, offset)),
                ));
                offset += len;
            }
            GuestMemoryMmap::from_ranges_with_files(with_files)
        }
    }
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

/// A new memory file of `len` bytes (`memfd_create`, close-on-exec),
/// sealed against shrinking and growing: a process it is handed to can
/// rely on every mapped page existing (a truncated file would fault the
/// guest with SIGBUS).
fn memory_file(len: u64) -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated string; the call makes a new
    // fd, which we own at once.
    let fd = unsafe {
        libc::memfd_create(
            c"stasis-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    // SAFETY: F_ADD_SEALS on a memfd we own, with seal flags only.
    let r = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// One region of guest RAM as a memory file: where it is in the guest,
/// how long, and where in the file.
#[derive(Debug)]
pub struct RegionFile {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Its length in bytes.
    pub size: u64,
    /// The file.
    pub file: File,
    /// Where the region starts in the file.
    pub offset: u64,
}

/// The memory files behind `mem`, one per region, if every region is a
/// shared file mapping (the `memfd` backend); `None` for anonymous or
/// privately mapped RAM, which a local upgrade copies instead.
pub fn region_files(mem: &GuestRam) -> std::io::Result<Option<Vec<RegionFile>>> {
    let mut out = Vec::new();
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            return Ok(None);
        };
        if region.flags() & libc::MAP_SHARED == 0 {
            return Ok(None);
        }
        out.push(RegionFile {
            gpa: region.start_addr().0,
            size: region.len(),
            file: fo.file().try_clone()?,
            offset: fo.start(),
        });
    }
    Ok(Some(out))
}

/// Whether some of `mem` is a private mapping of a file (a lazy restore's
/// snapshot memory file), which userfaultfd cannot write-protect; the
/// anonymous and `memfd` backends can be.
pub fn is_private_file_mapping(mem: &GuestRam) -> bool {
    mem.iter()
        .any(|r| r.file_offset().is_some() && r.flags() & libc::MAP_SHARED == 0)
}

/// Guest RAM of `mib` MiB from memory files handed over by another
/// process: each must be a regular file large enough for its region, and
/// the regions must be exactly the layout of `mib` MiB.
pub fn from_region_files(mib: u64, files: Vec<RegionFile>) -> Result<GuestRam, MemoryError> {
    let want = layout::ram_ranges(mib << 20);
    let bad = |m: String| MemoryError::HandedOver(m);
    if files.len() != want.len() {
        return Err(bad(format!(
            "{} regions where {mib} MiB of RAM has {}",
            files.len(),
            want.len()
        )));
    }
    let mut ranges = Vec::new();
    for (f, (start, len)) in files.into_iter().zip(want) {
        if f.gpa != start || f.size != len {
            return Err(bad(format!(
                "a region at {:#x} of {:#x} bytes where {mib} MiB of RAM has one at {start:#x} of {len:#x}",
                f.gpa, f.size
            )));
        }
        // SAFETY: fstat fills one `struct stat` we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `f.file` is an open fd and `st` outlives the call.
        if unsafe { libc::fstat(f.file.as_raw_fd(), &mut st) } != 0 {
            return Err(bad(format!("fstat: {}", std::io::Error::last_os_error())));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(bad("a region's file is not a memory file".into()));
        }
        // SAFETY: F_GET_SEALS reads the seals of an open fd; no memory.
        let seals = unsafe { libc::fcntl(f.file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(bad(format!(
                "the file of the region at {:#x} is not sealed against shrinking: the sender could cut pages from under the guest",
                f.gpa
            )));
        }
        let end = f.offset.checked_add(f.size);
        if end.is_none_or(|e| e > st.st_size as u64) {
            return Err(bad(format!(
                "the file of the region at {:#x} has {} bytes, too few for {:#x} bytes at offset {:#x}",
                f.gpa, st.st_size, f.size, f.offset
            )));
        }
        ranges.push((
            GuestAddress(f.gpa),
            f.size as usize,
            Some(FileOffset::new(f.file, f.offset)),
        ));
    }
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|source| MemoryError::Allocate { mib, source })
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
