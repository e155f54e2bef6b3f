//! Loader tests against real images: the guest kit's ELF (always built) and
//! Debian's cloud kernel bzImage (CI installs `linux-image-cloud-amd64`).
//! They need guest memory but no KVM.

use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use stasis_config::{BootProtocol, MemoryBackend, VmConfig};
use vm_memory::{Bytes, GuestAddress};

use super::pvh::XEN_HVM_START_MAGIC_VALUE;
use super::*;
use crate::layout;
use crate::memory;

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("stasis-boot-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn debian_bzimage() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
        })
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "this test needs Debian's cloud kernel in /boot: \
             apt-get install linux-image-cloud-amd64 (.ci/run does)"
        )
    })
}

fn read<T: vm_memory::ByteValued>(mem: &crate::memory::GuestRam, at: u64) -> T {
    mem.read_obj(GuestAddress(at)).unwrap()
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: plain C struct of integers.
unsafe impl vm_memory::ByteValued for StartInfo {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: plain C struct of integers.
unsafe impl vm_memory::ByteValued for MemmapEntry {}

fn cstring_at(mem: &crate::memory::GuestRam, at: u64) -> String {
    let mut buf = vec![0u8; 256];
    mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
    let end = buf.iter().position(|&b| b == 0).unwrap();
    String::from_utf8(buf[..end].to_vec()).unwrap()
}

#[test]
fn debian_bzimage_gets_a_proper_zero_page() {
    let kernel = debian_bzimage();
    let dir = TempDir::new("bz");
    let initrd = dir.0.join("initrd");
    std::fs::write(&initrd, vec![0xabu8; 3 * 4096 + 17]).unwrap();
    let mut cfg = VmConfig::new("t", &kernel);
    cfg.cmdline = "console=ttyS0 root=/dev/vda".into();
    cfg.initrd = Some(initrd);
    let mem = memory::allocate(256, MemoryBackend::Anonymous).unwrap();
    let info = load(&cfg, &mem, layout::ACPI_START).unwrap();
    assert_eq!(info.entry.protocol, ResolvedProtocol::Linux64);
    assert_eq!(info.entry.entry, layout::HIMEM_START + 0x200);

    let zp: boot_params = read(&mem, layout::ZERO_PAGE_ADDR);
    let hdr = zp.hdr;
    assert_eq!(
        { hdr.header },
        0x5372_6448,
        "HdrS magic kept from the image"
    );
    assert!({ hdr.version } >= 0x20c, "modern boot protocol");
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_ne!({ hdr.loadflags } & 1, 0, "LOADED_HIGH");
    assert_eq!({ hdr.cmd_line_ptr } as u64, layout::CMDLINE_ADDR);
    assert_eq!(
        cstring_at(&mem, layout::CMDLINE_ADDR),
        "console=ttyS0 root=/dev/vda"
    );

    // initrd: page-aligned, below the kernel's limit and low RAM's end, bytes in place.
    let (addr, size) = ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64);
    assert_eq!(size, 3 * 4096 + 17);
    assert_eq!(addr % 4096, 0);
    assert!(addr + size <= 256 << 20);
    assert!(addr + size <= u64::from(hdr.initrd_addr_max) + 1);
    let mut b = [0u8; 1];
    mem.read_slice(&mut b, GuestAddress(addr + size - 1))
        .unwrap();
    assert_eq!(b[0], 0xab);

    // e820: usable low memory, reserved up to 1 MiB, the rest usable.
    let n = zp.e820_entries as usize;
    let e: Vec<(u64, u64, u32)> = zp.e820_table[..n]
        .iter()
        .map(|x| ({ x.addr }, { x.size }, { x.r#type }))
        .collect();
    assert_eq!(
        e,
        vec![
            (0, layout::LOW_RESERVED_START, 1),
            (
                layout::LOW_RESERVED_START,
                layout::HIMEM_START - layout::LOW_RESERVED_START,
                2
            ),
            (layout::HIMEM_START, (256 << 20) - layout::HIMEM_START, 1),
        ]
    );
}

#[test]
fn debian_bzimage_refuses_pvh() {
    let mut cfg = VmConfig::new("t", debian_bzimage());
    cfg.boot = BootProtocol::Pvh;
    let mem = memory::allocate(64, MemoryBackend::Anonymous).unwrap();
    let err = load(&cfg, &mem, layout::ACPI_START).unwrap_err();
    assert!(
        err.to_string().contains("PVH needs an ELF vmlinux"),
        "{err}"
    );
}

fn guest_elf(dir: &Path) -> PathBuf {
    stasis_guestkit::write_guest(dir).unwrap()
}

#[test]
fn elf_with_pvh_note_boots_through_pvh_by_default() {
    let dir = TempDir::new("pvh");
    let mut cfg = VmConfig::new("t", guest_elf(&dir.0));
    cfg.cmdline = "workload=heartbeat".into();
    let mem = memory::allocate(5 * 1024, MemoryBackend::Anonymous).unwrap(); // spans the MMIO hole
    let info = load(&cfg, &mem, layout::ACPI_START).unwrap();
    assert_eq!(info.entry.protocol, ResolvedProtocol::Pvh);
    let si: StartInfo = read(&mem, layout::PVH_START_INFO_ADDR);
    let si = si.0;
    assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
    assert_eq!(si.rsdp_paddr, layout::ACPI_START);
    assert_eq!(cstring_at(&mem, si.cmdline_paddr), "workload=heartbeat");
    let entries: Vec<(u64, u64, u32)> = (0..si.memmap_entries as u64)
        .map(|i| {
            let e: MemmapEntry = read(&mem, si.memmap_paddr + i * 24);
            (e.0.addr, e.0.size, e.0.type_)
        })
        .collect();
    assert_eq!(entries.len(), 4);
    assert_eq!(
        entries[2],
        (
            layout::HIMEM_START,
            layout::MMIO_HOLE_START - layout::HIMEM_START,
            1
        )
    );
    assert_eq!(
        entries[3],
        (layout::FOUR_GIB, (5u64 << 30) - layout::MMIO_HOLE_START, 1)
    );
}

#[test]
fn elf_can_use_the_linux_64_bit_entry() {
    let dir = TempDir::new("elf64");
    let mut cfg = VmConfig::new("t", guest_elf(&dir.0));
    cfg.boot = BootProtocol::Linux;
    let mem = memory::allocate(64, MemoryBackend::Anonymous).unwrap();
    let info = load(&cfg, &mem, layout::ACPI_START).unwrap();
    assert_eq!(info.entry.protocol, ResolvedProtocol::Linux64);
    let e_entry = u64::from_le_bytes(stasis_guestkit::GUEST_ELF[24..32].try_into().unwrap());
    assert_eq!(info.entry.entry, e_entry);
    let zp: boot_params = read(&mem, layout::ZERO_PAGE_ADDR);
    assert_eq!({ zp.hdr.header }, 0x5372_6448, "synthesised HdrS");
    assert_eq!({ zp.hdr.boot_flag }, 0xaa55);
    // The identity map covers the kernel: PML4[0] -> PDPT, PD[0] maps 0..2M.
    let pml4: u64 = read(&mem, layout::PML4_ADDR);
    assert_eq!(pml4 & !0xfff, layout::PDPT_ADDR);
    let pd0: u64 = read(&mem, layout::PD_ADDR);
    assert_eq!(pd0 & 0x83, 0x83, "present, writable, 2 MiB");
}

#[test]
fn initrd_too_large_is_refused_by_name() {
    let dir = TempDir::new("bigrd");
    let initrd = dir.0.join("initrd");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(40 << 20).unwrap();
    let mut cfg = VmConfig::new("t", guest_elf(&dir.0));
    cfg.initrd = Some(initrd);
    let mem = memory::allocate(32, MemoryBackend::Anonymous).unwrap();
    let err = load(&cfg, &mem, layout::ACPI_START).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("initrd of 41943040 bytes does not fit"),
        "{err}"
    );
}
