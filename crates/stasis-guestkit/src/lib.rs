//! The stasis guest kit: a small freestanding x86_64 test guest, built from
//! C and GNU assembly sources in `guests/` at cargo build time (gcc + GNU ld),
//! and embedded here as [`GUEST_ELF`].
//!
//! # Image
//!
//! One ELF64 `ET_EXEC` image linked at physical = virtual `0x100000`:
//! two `PT_LOAD`s (text, data; `.bss`/stacks are `memsz > filesz`) and a
//! `PT_NOTE` with a Xen note (`"Xen"`, type 18 = `XEN_ELFNOTE_PHYS32_ENTRY`)
//! holding the 32-bit PVH entry. `e_entry` is the 64-bit Linux boot protocol
//! entry (`RSI` = zero page). Boot it with `--boot linux` or `--boot pvh`.
//!
//! CPL0 only sets up GDT/IDT/TSS, CR0/CR4/XCR0 and the LAPIC and then runs
//! everything else at CPL3 (`IOPL=3`, `IF=1`); ring 3 reaches ring 0 through
//! `int 0x80`. APs are started (INIT-SIPI-SIPI, trampoline at `0x8000`) only
//! with `smp=1`; the CPU count comes from the ACPI MADT, else the MP table.
//!
//! # Command line
//!
//! Whitespace-separated `key=value`; unknown keys (e.g. `console=ttyS0`) are
//! ignored. Numbers are decimal or `0x` hex. Periods are measured with the TSC.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `workload` | `heartbeat` | `heartbeat`, `memory`, `registers`, `timer`, `action` (else `GUEST-ERROR what=unknown-workload` and halt) |
//! | `smp` | `0` | `1`: start all APs from the MADT/MP table, every CPU runs the workload |
//! | `tsc_khz` | – | TSC kHz if CPUID `0x40000010` does not give it (else 2000000, `tsc_src=default`) |
//! | `report_ms` | `1000` | period of `MEM-PROGRESS`, `REGS`, `TIMER` lines |
//! | `hb_ms` | `100` | heartbeat period |
//! | `mem_mib` | `64` | memory workload size (all CPUs together), clamped to usable RAM above the image |
//! | `mem_rate` | `0` | pages per second per CPU, `0` = unlimited |
//! | `mem_inject` | `0` | test only: corrupt each CPU's last page after pass N (pass N+1 reports `MEM-BAD`) |
//! | `regs_hold_ms` | `20` | time the registers are held per round |
//! | `regs_inject` | `0` | test only: corrupt the saved registers of round N (`REGS-MISMATCH`) |
//! | `timer_hz` | `100` | LAPIC timer rate |
//! | `after_ms` | `200` | delay before the action |
//! | `do` | – | `reset`, `shutdown`, `acpi-reset`, `triple-fault`, `mmio-exec`, `halt`, `ud2` (ring-3 #UD → `GUEST-EXCEPTION`) |
//! | `mmio_addr` | `0xD0000000` | target of `do=mmio-exec` |
//!
//! # Output (COM1, one line per event)
//!
//! Tag first, then `key=value` pairs; numbers are decimal unless the key
//! ends in `_hex` (and `error`/`rip`/`cs` of `GUEST-EXCEPTION`, which are
//! hex). Lines of different CPUs never interleave. [`parse_line`] parses
//! them; `guests/README.md` has the details of each line.
//!
//! * `STASIS-GUEST boot proto=<linux64|pvh> cpus=<n> acpi=<ok|missing|bad-checksum:<RSDP|RSDP-ext|XSDT|RSDT|MADT>> mptable=<ok|missing|bad> tsc_khz=<n> tsc_src=<cpuid|cmdline|default> xcr0_hex=<x> avx512=<0|1> mem_mib=<n> workload=<name> cmdline="<command line>"`
//!   — once, from the BSP (`"` in the command line is shown as `'`).
//! * `PLATFORM cpus=<n> cpu_src=<acpi|mptable|default> acpi_cpus=<n> mptable_cpus=<n> apic_ids=<a,b,..> e820_entries=<n> avx=<0|1> smp=<0|1> svc_trap=<int80|ud|gp> pio_emulated=<n>`
//!   — once; `svc_trap` tells how the host delivered ring 3's `int 0x80`
//!   (natively, or as #UD/#GP that the guest turned into the service call),
//!   `pio_emulated` how many ring-3 port accesses the #GP handler emulated.
//! * `E820 index=<i> addr_hex=<x> size_hex=<x> type=<n>` — once per entry.
//! * `SMP-START expected=<n> started=<n> wait_ms=<n>` — with `smp=1`, after
//!   the APs came up or 2 s passed (missing ones: `GUEST-ERROR what=ap-timeout cpu=<id>`).
//! * `CPU-UP cpu=<apic id>` — each CPU as it enters the workload.
//! * `GUEST-ERROR what=<token> ...` — e.g. `pvh-bad-magic magic_hex=`,
//!   `unknown-workload name=`, `unknown-action do=`, `mem-clamped`,
//!   `ap-timeout`, `action-returned`, `bad-number key=`.
//! * `GUEST-EXCEPTION cpu=<id> vector=<n> error=<hex> rip=<hex> cs=<hex>` —
//!   any CPU exception (except the emulated ring-3 port I/O #GP and a
//!   ring-3 `int 0x80` that arrives as #UD/#GP); the CPU halts.
//! * heartbeat: `HB cpu=<id> seq=<n> counter=<n> tsc=<n>` every `hb_ms`; `seq`
//!   starts at 1 and increases by 1, `counter` increases monotonically.
//! * memory: `MEM-CONFIG cpu= requested_mib= available_mib= used_mib= clamped=<0|1> pages= first_page_hex= ranges= rate=`,
//!   then per pass `MEM cpu= pass= pages= verified= bad= total_bad=`
//!   (`verified` = pages checked this pass, 0 in pass 1; `bad` = of those, failed),
//!   `MEM-PROGRESS cpu= pass= done=` at most every `report_ms`, and for the
//!   first bad page of a pass `MEM-BAD cpu= page_hex= pass= want= found_pass= reason=<magic|addr|pass|checksum>`.
//! * registers: `REGS-CONFIG cpu= xcr0_hex= xsave_size= avx= avx512= kmovq= hold_ms=`,
//!   then `REGS cpu= round= checks= mismatches= avx=<0|1> avx512=<0|1>` every
//!   `report_ms` (totals) and `REGS-MISMATCH cpu= round= reg=<name> want_hex= got_hex=`
//!   (at most 4 per round; `reg` is `rax`..`r15`, `st<i>.q<j>`, `xmm<i>.q<j>`,
//!   `ymm<i>.q<2|3>`, `zmm<i>.q<j>`, `k<i>.q0`).
//! * timer: `TIMER-START cpu= hz= lapic_count= mode=periodic`, then
//!   `TIMER cpu= ticks= hz_x100= tsc=` every `report_ms` (`hz_x100` = rate over
//!   the last interval × 100).
//! * action: `ACTION do=<x> cpu=<id>` just before doing it (`reset`: `out
//!   0x64,0xFE`; `shutdown`: `out 0x3C0,0x34`; `acpi-reset`: `out 0x3C2,0x01`;
//!   `triple-fault`: zero-limit IDT + `ud2` at CPL0; `mmio-exec`: jump to
//!   `mmio_addr` at CPL0; `halt`: `cli; hlt` forever); if the guest is still
//!   running 1 s later: `GUEST-ERROR what=action-returned`. With `smp=1` every
//!   CPU does it, so usually only the first `ACTION` line gets out.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// The guest ELF image, built from `guests/` by build.rs.
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/stasis-guest.elf"));

/// File name used by [`write_guest`].
pub const GUEST_FILE_NAME: &str = "stasis-guest.elf";

/// Line tag of the boot line.
pub const BOOT_TAG: &str = "STASIS-GUEST";

/// Writes [`GUEST_ELF`] to `dir/stasis-guest.elf` and returns the path.
pub fn write_guest(dir: &Path) -> io::Result<PathBuf> {
    let path = dir.join(GUEST_FILE_NAME);
    std::fs::write(&path, GUEST_ELF)?;
    Ok(path)
}

/// One parsed guest output line: tag, bare words and `key=value` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLine {
    /// First token, e.g. `HB`, `MEM`, `STASIS-GUEST`.
    pub tag: String,
    /// Tokens without `=` after the tag (e.g. `boot`).
    pub words: Vec<String>,
    /// `key=value` pairs (a value may be double-quoted).
    pub fields: BTreeMap<String, String>,
}

impl GuestLine {
    /// Raw value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// Numeric value of `key`: hex for keys ending in `_hex` and for
    /// `error`/`rip`/`cs` of `GUEST-EXCEPTION`, decimal otherwise.
    pub fn num(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        let hex = key.ends_with("_hex")
            || (self.tag == "GUEST-EXCEPTION" && matches!(key, "error" | "rip" | "cs"));
        if hex {
            u64::from_str_radix(v, 16).ok()
        } else {
            v.parse().ok()
        }
    }
}

/// Parses one guest output line (trailing `\r`/`\n` ignored). Returns `None`
/// for an empty line.
pub fn parse_line(line: &str) -> Option<GuestLine> {
    let line = line.trim_end_matches(['\r', '\n']);
    let mut rest = line.trim_start();
    let tag_end = rest.find(' ').unwrap_or(rest.len());
    let tag = &rest[..tag_end];
    if tag.is_empty() {
        return None;
    }
    rest = &rest[tag_end..];
    let mut words = Vec::new();
    let mut fields = BTreeMap::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let tok_end = rest.find([' ', '=']).unwrap_or(rest.len());
        let key = &rest[..tok_end];
        if !rest[tok_end..].starts_with('=') {
            words.push(key.to_string());
            rest = &rest[tok_end..];
            continue;
        }
        let after = &rest[tok_end + 1..];
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        fields.insert(key.to_string(), value.to_string());
        rest = next;
    }
    Some(GuestLine {
        tag: tag.to_string(),
        words,
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16le(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32le(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64le(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    struct Phdr {
        p_type: u32,
        offset: u64,
        vaddr: u64,
        paddr: u64,
        filesz: u64,
        memsz: u64,
    }

    fn phdrs(elf: &[u8]) -> Vec<Phdr> {
        let phoff = u64le(elf, 0x20) as usize;
        let phentsize = u16le(elf, 0x36) as usize;
        let phnum = u16le(elf, 0x38) as usize;
        assert_eq!(phentsize, 56);
        (0..phnum)
            .map(|i| {
                let p = phoff + i * phentsize;
                Phdr {
                    p_type: u32le(elf, p),
                    offset: u64le(elf, p + 8),
                    vaddr: u64le(elf, p + 16),
                    paddr: u64le(elf, p + 24),
                    filesz: u64le(elf, p + 32),
                    memsz: u64le(elf, p + 40),
                }
            })
            .collect()
    }

    /// Returns the descriptor of the Xen PHYS32_ENTRY note, if any.
    fn xen_pvh_entry(elf: &[u8]) -> Option<u32> {
        for ph in phdrs(elf).iter().filter(|p| p.p_type == 4) {
            let mut o = ph.offset as usize;
            let end = o + ph.filesz as usize;
            while o + 12 <= end {
                let namesz = u32le(elf, o) as usize;
                let descsz = u32le(elf, o + 4) as usize;
                let ntype = u32le(elf, o + 8);
                let name = &elf[o + 12..o + 12 + namesz];
                let desc = o + 12 + namesz.div_ceil(4) * 4;
                if name == b"Xen\0" && ntype == 18 && descsz >= 4 {
                    return Some(u32le(elf, desc));
                }
                o = desc + descsz.div_ceil(4) * 4;
            }
        }
        None
    }

    fn in_load(elf: &[u8], addr: u64) -> bool {
        phdrs(elf)
            .iter()
            .any(|p| p.p_type == 1 && addr >= p.paddr && addr < p.paddr + p.filesz)
    }

    #[test]
    fn elf_header() {
        let e = GUEST_ELF;
        assert_eq!(&e[..4], b"\x7fELF");
        assert_eq!(e[4], 2, "ELFCLASS64");
        assert_eq!(e[5], 1, "little endian");
        assert_eq!(u16le(e, 0x10), 2, "ET_EXEC");
        assert_eq!(u16le(e, 0x12), 62, "EM_X86_64");
    }

    #[test]
    fn loads_at_one_mib_identity() {
        let ph = phdrs(GUEST_ELF);
        let loads: Vec<_> = ph.iter().filter(|p| p.p_type == 1).collect();
        assert!(!loads.is_empty());
        for p in &loads {
            assert_eq!(p.vaddr, p.paddr);
            assert!(p.paddr >= 0x100000);
            assert!(p.memsz >= p.filesz);
        }
        assert_eq!(loads.iter().map(|p| p.paddr).min(), Some(0x100000));
    }

    #[test]
    fn entry_inside_load_segment() {
        let entry = u64le(GUEST_ELF, 0x18);
        assert!(
            in_load(GUEST_ELF, entry),
            "e_entry {entry:#x} not in a PT_LOAD"
        );
    }

    #[test]
    fn xen_pvh_note() {
        let pvh = xen_pvh_entry(GUEST_ELF).expect("PT_NOTE with Xen note type 18");
        assert!(
            in_load(GUEST_ELF, u64::from(pvh)),
            "PVH entry {pvh:#x} not in a PT_LOAD"
        );
        assert_ne!(u64::from(pvh), u64le(GUEST_ELF, 0x18));
    }

    #[test]
    fn write_guest_roundtrip() {
        let dir = std::env::temp_dir().join(format!("stasis-guestkit-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = write_guest(&dir).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), GUEST_ELF);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parse_boot_line() {
        let l = parse_line(
            "STASIS-GUEST boot proto=pvh cpus=2 acpi=ok mptable=missing tsc_khz=2000000 \
             tsc_src=default xcr0_hex=e7 avx512=1 mem_mib=255 workload=heartbeat \
             cmdline=\"console=ttyS0 workload=heartbeat\"\r\n",
        )
        .unwrap();
        assert_eq!(l.tag, BOOT_TAG);
        assert_eq!(l.words, vec!["boot".to_string()]);
        assert_eq!(l.get("proto"), Some("pvh"));
        assert_eq!(l.num("cpus"), Some(2));
        assert_eq!(l.num("xcr0_hex"), Some(0xe7));
        assert_eq!(l.get("cmdline"), Some("console=ttyS0 workload=heartbeat"));
    }

    #[test]
    fn parse_exception_line() {
        let l = parse_line("GUEST-EXCEPTION cpu=1 vector=13 error=0 rip=100abc cs=2b").unwrap();
        assert_eq!(l.num("vector"), Some(13));
        assert_eq!(l.num("rip"), Some(0x100abc));
        assert_eq!(l.num("cs"), Some(0x2b));
        assert!(parse_line("  \n").is_none());
    }
}
