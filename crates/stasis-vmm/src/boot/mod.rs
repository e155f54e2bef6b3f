//! Loading a kernel and preparing what its entry point expects.
//!
//! Two entry protocols are supported, chosen by [`BootProtocol`]:
//! - the Linux x86_64 boot protocol: a bzImage or ELF `vmlinux` entered in
//!   64-bit mode with `%rsi` pointing at the zero page ([`linux`]);
//! - PVH: an ELF kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note entered in
//!   32-bit protected mode with `%ebx` pointing at `hvm_start_info` ([`pvh`]).
//!
//! Both share the memory map ([`e820`]), the command line and the initrd
//! placement done here.

pub mod e820;
pub mod gdt;
pub mod linux;
pub mod paging;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use stasis_config::{BootProtocol, VmConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout;
use crate::memory::GuestRam;

/// What the vCPU setup needs to know to start the boot processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// Guest physical address of the first instruction.
    pub entry: u64,
    /// The protocol the entry expects.
    pub protocol: ResolvedProtocol,
}

/// The protocol actually used once `auto` has been resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedProtocol {
    /// 64-bit Linux boot protocol, `%rsi` = zero page.
    Linux64,
    /// PVH, `%ebx` = start info.
    Pvh,
}

impl std::fmt::Display for ResolvedProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Linux64 => "linux",
            Self::Pvh => "pvh",
        })
    }
}

/// Ways loading a kernel can fail.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initrd file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel is neither an ELF nor a bzImage.
    #[error("kernel {0} is neither an ELF executable nor a bzImage (no ELF magic, no 'HdrS' boot header)")]
    UnknownFormat(String),
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The file.
        path: String,
        /// What the loader said.
        source: linux_loader::loader::Error,
    },
    /// PVH was asked for but the image has no PVH entry.
    #[error("kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use --boot linux")]
    NoPvhEntry(String),
    /// PVH was asked for a bzImage.
    #[error("kernel {0} is a bzImage; PVH needs an ELF vmlinux (use --boot linux or auto)")]
    PvhNeedsElf(String),
    /// The bzImage is too old for the 64-bit entry.
    #[error("kernel {path} uses boot protocol {version:#x}; the 64-bit entry needs 2.06 or later")]
    OldBootProtocol {
        /// The file.
        path: String,
        /// The version in its header.
        version: u16,
    },
    /// The initrd does not fit in guest memory.
    #[error("initrd of {size} bytes does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
        /// The highest address it may reach.
        limit: u64,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the initrd went.
#[derive(Debug, Clone, Copy)]
pub struct InitrdPlacement {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

enum ImageKind {
    Elf,
    BzImage,
}

fn image_kind(file: &mut File, path: &str) -> Result<ImageKind, BootError> {
    let io = |source| BootError::Io {
        what: "kernel",
        path: path.to_string(),
        source,
    };
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let n = read_up_to(file, &mut head).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(ImageKind::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(ImageKind::BzImage)
    } else {
        Err(BootError::UnknownFormat(path.to_string()))
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Everything [`load`] did, for the vCPU setup and for `stasis status`.
#[derive(Debug, Clone)]
pub struct BootInfo {
    /// Where to start the boot processor.
    pub entry: EntryPoint,
    /// The initrd, if any.
    pub initrd: Option<InitrdPlacement>,
}

/// Loads the kernel (and initrd, command line) named by `config` into `mem`
/// and writes the boot structures of the chosen protocol. `rsdp` is the
/// guest address of the ACPI RSDP, which PVH passes explicitly.
pub fn load(config: &VmConfig, mem: &GuestRam, rsdp: u64) -> Result<BootInfo, BootError> {
    let path = config.kernel.display().to_string();
    let mut file = File::open(&config.kernel).map_err(|source| BootError::Io {
        what: "kernel",
        path: path.clone(),
        source,
    })?;
    let load_err = |source| BootError::Load {
        path: path.clone(),
        source,
    };
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let (entry, kernel_end, header) = match image_kind(&mut file, &path)? {
        ImageKind::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            let pvh = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
                _ => None,
            };
            let entry = match (config.boot, pvh) {
                (BootProtocol::Auto | BootProtocol::Pvh, Some(a)) => EntryPoint {
                    entry: a,
                    protocol: ResolvedProtocol::Pvh,
                },
                (BootProtocol::Pvh, None) => return Err(BootError::NoPvhEntry(path)),
                (BootProtocol::Auto | BootProtocol::Linux, _) => EntryPoint {
                    entry: elf_entry(&mut file, &path)?,
                    protocol: ResolvedProtocol::Linux64,
                },
            };
            (entry, r.kernel_end, None)
        }
        ImageKind::BzImage => {
            if config.boot == BootProtocol::Pvh {
                return Err(BootError::PvhNeedsElf(path));
            }
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            let hdr = r
                .setup_header
                .expect("bzImage loader always returns a header");
            if hdr.version < 0x206 {
                return Err(BootError::OldBootProtocol {
                    path,
                    version: hdr.version,
                });
            }
            // The 64-bit entry is 0x200 bytes into the protected-mode kernel.
            let entry = EntryPoint {
                entry: r.kernel_load.0 + 0x200,
                protocol: ResolvedProtocol::Linux64,
            };
            (entry, r.kernel_end, Some(hdr))
        }
    };

    write_cmdline(mem, &config.cmdline)?;
    let initrd = match &config.initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_end, header.as_ref())?),
        None => None,
    };
    let cmdline_size = config.cmdline.len() as u32 + 1;
    match entry.protocol {
        ResolvedProtocol::Linux64 => {
            paging::write_identity_map(mem)?;
            gdt::write_boot_gdt(mem, false)?;
            linux::write_zero_page(mem, header, cmdline_size, initrd)?;
        }
        ResolvedProtocol::Pvh => {
            gdt::write_boot_gdt(mem, true)?;
            pvh::write_start_info(mem, initrd, rsdp)?;
        }
    }
    Ok(BootInfo { entry, initrd })
}

/// Reads `e_entry` from an ELF header (linux-loader does not return it).
fn elf_entry(file: &mut File, path: &str) -> Result<u64, BootError> {
    let io = |source| BootError::Io {
        what: "kernel",
        path: path.to_string(),
        source,
    };
    let mut hdr = [0u8; 32];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.read_exact(&mut hdr).map_err(io)?;
    Ok(u64::from_le_bytes(hdr[24..32].try_into().expect("8 bytes")))
}

fn write_cmdline(mem: &GuestRam, cmdline: &str) -> Result<(), BootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(|source| BootError::GuestWrite {
            what: "command line",
            source,
        })
}

/// Places the initrd page-aligned as high as possible in low memory (below
/// the MMIO hole and below the kernel's `initrd_addr_max`), as bootloaders do.
fn load_initrd(
    mem: &GuestRam,
    path: &Path,
    kernel_end: u64,
    header: Option<&setup_header>,
) -> Result<InitrdPlacement, BootError> {
    let shown = path.display().to_string();
    let io = |source| BootError::Io {
        what: "initrd",
        path: shown.clone(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let low_end = mem
        .iter()
        .next()
        .map(vm_memory::GuestMemoryRegion::len)
        .unwrap_or(0);
    let mut limit = low_end.min(layout::MMIO_HOLE_START);
    if let Some(h) = header {
        if h.initrd_addr_max != 0 {
            limit = limit.min(u64::from(h.initrd_addr_max) + 1);
        }
    }
    let addr = limit.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end.max(layout::HIMEM_START) => a,
        _ => {
            return Err(BootError::InitrdTooLarge {
                size,
                kernel_end,
                limit,
            })
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::GuestWrite {
            what: "initrd",
            source,
        })?;
    Ok(InitrdPlacement { addr, size })
}

#[cfg(test)]
mod tests;
