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
//! The `disk`, `diskbench`, `net` and `rng` workloads drive virtio-mmio devices (virtio
//! 1.x, register layout version 2) found in the windows `0xD0000000 +
//! n * 0x1000`, `n < 16`, from ring 3 by polling split virtqueues: no
//! interrupts, no CPL0 work. [`disk`] and [`net`] describe the block stamps
//! and Ethernet frames for host-side checks; `guests/net-responder.py`
//! answers the `net` workload's frames on a tap.
//!
//! # Command line
//!
//! Whitespace-separated `key=value`; unknown keys (e.g. `console=ttyS0`) are
//! ignored. Numbers are decimal or `0x` hex. Periods are measured with the TSC.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `workload` | `heartbeat` | `heartbeat`, `memory`, `registers`, `timer`, `action`, `disk`, `diskbench`, `net`, `rng` (else `GUEST-ERROR what=unknown-workload` and halt) |
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
//! | `disk_index` / `disk_slot` | `0` / – | `disk`, `diskbench`: the N-th virtio-blk device in slot order, or the one in MMIO slot N |
//! | `disk_start` | `0` | `disk`: first block of the region, in 4 KiB blocks |
//! | `disk_blocks` | `256` | `disk`: region size in 4 KiB blocks (clamped to the capacity) |
//! | `disk_verify_only` | `0` | `disk`: `1` = only check the stamps already on the disk (one `DISK` line), then halt |
//! | `disk_pass_ms` | `0` | `disk`: minimum duration of a pass |
//! | `bench_mode` | `randread4k` | `diskbench`: `randread4k`, `randwrite4k` (4 KiB at uniformly random 4 KiB-aligned offsets, fixed xorshift seed), `seqread1m`, `seqwrite1m` (1 MiB requests from offset 0, wrapping); writes overwrite the disk with a fixed pattern |
//! | `bench_ms` | `2000` | `diskbench`: measured time, after 200 ms of warm-up |
//! | `bench_qd` | `8` | `diskbench`: requests kept in flight (clamped to `qd_max`: queue size / descriptors per request, and buffer RAM) |
//! | `net_index` / `net_slot` | `0` / – | `net`: which virtio-net device |
//! | `net_ms` | `100` | `net`: one frame every N ms |
//! | `rng_index` / `rng_slot` | `0` / – | `rng`: which virtio-rng device |
//! | `rng_bytes` | `64` | `rng`: bytes per request (1..4096) |
//! | `rng_ms` | `10` | `rng`: one request every N ms (0 = back to back) |
//! | `virtio_timeout_ms` | `2000` | a virtio request pending this long (running time) gives `GUEST-ERROR what=virtio-timeout` |
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
//! * `PLATFORM cpus=<n> cpu_src=<acpi|mptable|default> acpi_cpus=<n> mptable_cpus=<n> apic_ids=<a,b,..> e820_entries=<n> avx=<0|1> smp=<0|1> svc_trap=<int80|ud|gp> pio_emulated=<n> virtio_devices=<n>`
//!   — once; `svc_trap` tells how the host delivered ring 3's `int 0x80`
//!   (natively, or as #UD/#GP that the guest turned into the service call),
//!   `pio_emulated` how many ring-3 port accesses the #GP handler emulated.
//! * `E820 index=<i> addr_hex=<x> size_hex=<x> type=<n>` — once per entry.
//! * `VIRTIO slot=<n> addr_hex=<x> device_id=<n> version=<n> vendor_hex=<x> type=<net|blk|rng|...>`
//!   — once per virtio-mmio window that reads the magic value, at every boot.
//! * `SMP-START expected=<n> started=<n> wait_ms=<n>` — with `smp=1`, after
//!   the APs came up or 2 s passed (missing ones: `GUEST-ERROR what=ap-timeout cpu=<id>`).
//! * `CPU-UP cpu=<apic id>` — each CPU as it enters the workload.
//! * `GUEST-ERROR what=<token> ...` — e.g. `pvh-bad-magic magic_hex=`,
//!   `unknown-workload name=`, `unknown-action do=`, `mem-clamped`,
//!   `ap-timeout`, `action-returned`, `bad-number key=`; virtio:
//!   `virtio-no-device type= index=|slot=`, `virtio-init slot= reason=
//!   value_hex= status_hex=`, `virtio-timeout dev= slot= queue= op= waited_ms=
//!   avail_idx= used_idx= last_used= in_flight= status_hex= isr_hex=` (a
//!   request pending `virtio_timeout_ms`; the guest keeps waiting),
//!   `virtio-late ... waited_ms=` (it completed after all), `virtio-bad-used
//!   reason=<id-out-of-range|id-not-in-flight|used-idx-ahead>`,
//!   `virtio-used-len op= want= got=`, `virtio-net-num-buffers value=`,
//!   `disk-io-error op= block= status=`, `disk-no-blocks`; diskbench:
//!   `diskbench-bad-mode mode=`, `diskbench-read-only`,
//!   `diskbench-queue-too-small`, `diskbench-no-buffer-memory`.
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
//! * virtio workloads (BSP only; APs halt): `VIRTIO-INIT slot= type= offered_hex=
//!   features_hex= queue_sizes=<a[,b]> status_hex=` after DRIVER_OK.
//! * disk: `DISK-CONFIG index= capacity_sectors= ro=<0|1> flush=<0|1> id=<string>
//!   id_status= slot= blk_size= start= blocks= clamped=<0|1> mode=<write|verify>`,
//!   then per pass `DISK index= pass= written= verified= bad= total_bad=` (pass p
//!   reads and checks pass p-1's stamps, writes pass p's, flushes if `flush=1`),
//!   and `DISK-BAD index= block= want_pass= found_pass= reason=<magic|block|pass|checksum|io|write-io>`
//!   for the first bad block of a pass. Read-only device (`DISK-RO index= slot=
//!   capacity_sectors= action=verify-only`) or `disk_verify_only=1`: one
//!   `DISK index= pass=<P> written=0 verified= bad= total_bad= older= mode=verify`
//!   (P from the first block's stamp; blocks may hold P or P-1, `older` counts
//!   P-1), then halt.
//! * diskbench: `DISKBENCH-CONFIG index= slot= mode= capacity_sectors= req_bytes=
//!   segs= size_max= seg_max= qd= qd_max= clamped=<0|1> bench_ms= warmup_ms=200`
//!   (`req_bytes` is below 1 MiB / 4 KiB only if the device's `seg_max` ×
//!   `size_max` or the capacity force it), then after warm-up + `bench_ms` one
//!   `DISKBENCH mode=<mode> qd=<n> ops=<n> bytes=<n> ms=<n> iops=<n> mb_s_x100=<n> errors=<n>`
//!   (`ops` = requests completed OK in the window, `bytes` = `ops × req_bytes`,
//!   `mb_s_x100` = 10^6-byte MB/s × 100, `errors` = bad status or used
//!   length) and halt.
//! * net: `NET-CONFIG index= slot= mac= mac_src=<config|generated> rx_bufs= tx_bufs= net_ms=`,
//!   then every `report_ms` `NET mac=<xx:..> sent= received= replies= bad=
//!   last_reply_seq= tx_done= tx_full=`; `NET-BAD reason=<checksum|mac|seq> seq= sent= len=`
//!   for the first 4 bad replies. Frame format: [`net`].
//! * rng: `RNG-CONFIG index= slot= bytes= rng_ms=`, then every `report_ms`
//!   `RNG requests= bytes= last_hex=<first 8 bytes of the last request> distinct=<byte values seen, of 256>`.

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

pub mod disk {
    //! The block stamps of the `disk` workload, so that host-side tests can
    //! check (or prepare) a disk image the guest wrote (or will read).
    //!
    //! A stamped block is 4 KiB of little-endian u64 words: `0` [`MAGIC`]
    //! (`"STASDISK"`), `1` pass, `2` block number (absolute, in 4 KiB units from
    //! the start of the disk), `3` checksum (FNV-1a over words 4..511, one u64
    //! per step), `4..511` splitmix64 words derived from (block, pass).

    /// Word 0 of every stamped block: the bytes `STASDISK`.
    pub const MAGIC: u64 = 0x4B53_4944_5341_5453;
    /// Size of one workload block.
    pub const BLOCK_SIZE: usize = 4096;
    const WORDS: usize = BLOCK_SIZE / 8;

    fn mix64(z: u64) -> u64 {
        let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn checksum(words: &[u64]) -> u64 {
        words[4..].iter().fold(0xCBF2_9CE4_8422_2325, |c, &w| {
            (c ^ w).wrapping_mul(0x0100_0000_01B3)
        })
    }

    fn words(data: &[u8]) -> Vec<u64> {
        data.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }

    /// The block the guest writes for `block` in `pass`.
    pub fn stamp(block: u64, pass: u64) -> Vec<u8> {
        let mut w = vec![0u64; WORDS];
        let mut st = block.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ pass.wrapping_mul(0xD1B5_4A32_D192_ED03)
            ^ MAGIC;
        for x in &mut w[4..] {
            st = st.wrapping_add(0x9E37_79B9_7F4A_7C15);
            *x = mix64(st);
        }
        w[0] = MAGIC;
        w[1] = pass;
        w[2] = block;
        w[3] = checksum(&w);
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Why a block is not a valid stamp (the `reason=` of `DISK-BAD`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum BadBlock {
        /// Shorter than [`BLOCK_SIZE`].
        Short,
        /// Word 0 is not [`MAGIC`].
        Magic,
        /// The stamp names another block.
        Block(u64),
        /// Words 4..511 do not match the checksum in word 3.
        Checksum,
    }

    /// Checks that `data` holds a valid stamp of `block`; returns its pass.
    pub fn check(data: &[u8], block: u64) -> Result<u64, BadBlock> {
        if data.len() < BLOCK_SIZE {
            return Err(BadBlock::Short);
        }
        let w = words(&data[..BLOCK_SIZE]);
        if w[0] != MAGIC {
            return Err(BadBlock::Magic);
        }
        if w[2] != block {
            return Err(BadBlock::Block(w[2]));
        }
        if checksum(&w) != w[3] {
            return Err(BadBlock::Checksum);
        }
        Ok(w[1])
    }
}

pub mod net {
    //! The Ethernet frames of the `net` workload, for responders on the host
    //! side of the guest's network device.
    //!
    //! The guest broadcasts 60-byte frames (no FCS) with EtherType
    //! [`ETHERTYPE`]; payload (offsets from the end of the 14-byte Ethernet
    //! header): `0..8` [`REQUEST_MAGIC`], `8..14` the guest's MAC, `14..16`
    //! zero, `16..24` sequence number (u64 LE, from 1), `24..32` FNV-1a 64 of
    //! payload bytes `0..24` (u64 LE), then zero padding. A reply has the same
    //! layout with [`REPLY_MAGIC`], the guest's MAC and sequence number echoed
    //! and the checksum recomputed; [`reply_for`] builds one.

    /// EtherType of the workload's frames (IEEE local experimental 2).
    pub const ETHERTYPE: u16 = 0x88B5;
    /// Payload magic of a guest's frame.
    pub const REQUEST_MAGIC: &[u8; 8] = b"STASISNT";
    /// Payload magic of a reply.
    pub const REPLY_MAGIC: &[u8; 8] = b"STASISRP";
    /// Length of the frames the guest sends (and of [`reply_for`]'s).
    pub const FRAME_LEN: usize = 60;

    /// FNV-1a, 64-bit, over bytes.
    pub fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xCBF2_9CE4_8422_2325, |c, &b| {
            (c ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
        })
    }

    fn parse(frame: &[u8], magic: &[u8; 8]) -> Option<([u8; 6], u64)> {
        if frame.len() < 14 + 32 || frame[12..14] != ETHERTYPE.to_be_bytes() {
            return None;
        }
        let p = &frame[14..];
        if &p[..8] != magic {
            return None;
        }
        let sum = u64::from_le_bytes(p[24..32].try_into().ok()?);
        if fnv1a(&p[..24]) != sum {
            return None;
        }
        let mac = p[8..14].try_into().ok()?;
        let seq = u64::from_le_bytes(p[16..24].try_into().ok()?);
        Some((mac, seq))
    }

    /// The guest's MAC and sequence number, if `frame` (an Ethernet frame
    /// without virtio header) is a valid guest frame.
    pub fn parse_request(frame: &[u8]) -> Option<([u8; 6], u64)> {
        parse(frame, REQUEST_MAGIC)
    }

    /// Same for a reply frame.
    pub fn parse_reply(frame: &[u8]) -> Option<([u8; 6], u64)> {
        parse(frame, REPLY_MAGIC)
    }

    /// Builds a reply frame from `src_mac` to the guest that sent `frame`;
    /// `None` if `frame` is not a valid guest frame.
    pub fn reply_for(frame: &[u8], src_mac: [u8; 6]) -> Option<Vec<u8>> {
        let (mac, seq) = parse_request(frame)?;
        Some(build(REPLY_MAGIC, mac, src_mac, mac, seq))
    }

    /// Builds a frame of the workload's format: `dst`, `src`, payload with
    /// `magic`, `mac` and `seq`.
    pub fn build(magic: &[u8; 8], dst: [u8; 6], src: [u8; 6], mac: [u8; 6], seq: u64) -> Vec<u8> {
        let mut f = vec![0u8; FRAME_LEN];
        f[0..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        f[14..22].copy_from_slice(magic);
        f[22..28].copy_from_slice(&mac);
        f[30..38].copy_from_slice(&seq.to_le_bytes());
        let sum = fnv1a(&f[14..38]);
        f[38..46].copy_from_slice(&sum.to_le_bytes());
        f
    }
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

    /// The static page tables map the virtio-mmio windows (0xD0000000 to
    /// 0xD0FFFFFF) and the IOAPIC/LAPIC pages uncached (PCD|PWT), the rest
    /// of the 64 GiB identity map write-back.
    #[test]
    fn page_tables_uncache_device_windows() {
        let ph = phdrs(GUEST_ELF);
        let data = ph
            .iter()
            .filter(|p| p.p_type == 1)
            .map(|p| &GUEST_ELF[p.offset as usize..(p.offset + p.filesz) as usize])
            .find_map(|seg| {
                // The page directory entry of 2 MiB page 1 is 0x200087, of
                // page 2 0x400087: find the directory by its first entries.
                (0..seg.len().saturating_sub(24)).step_by(8).find_map(|o| {
                    (u64le(seg, o) == 0x87 && u64le(seg, o + 8) == 0x20_0087).then(|| &seg[o..])
                })
            })
            .expect("page directory in a PT_LOAD");
        let entry = |n: usize| u64le(data, 8 * n);
        for n in 0..(64 * 512) {
            let uncached = (0x680..0x688).contains(&n) || n == 0x7f6 || n == 0x7f7;
            let want = ((n as u64) << 21) | if uncached { 0x9f } else { 0x87 };
            assert_eq!(entry(n), want, "PD entry {n:#x}");
        }
    }

    #[test]
    fn disk_stamp_roundtrip() {
        let b = disk::stamp(42, 7);
        assert_eq!(b.len(), disk::BLOCK_SIZE);
        assert_eq!(disk::check(&b, 42), Ok(7));
        assert_eq!(disk::check(&b, 43), Err(disk::BadBlock::Block(42)));
        let mut c = b.clone();
        c[1000] ^= 0x10;
        assert_eq!(disk::check(&c, 42), Err(disk::BadBlock::Checksum));
        let mut m = b.clone();
        m[0] ^= 1;
        assert_eq!(disk::check(&m, 42), Err(disk::BadBlock::Magic));
        assert_eq!(disk::check(&b[..100], 42), Err(disk::BadBlock::Short));
        assert_ne!(disk::stamp(42, 8), b);
    }

    /// Known answers taken from a disk image the guest wrote (pass 0x7fc of
    /// blocks 3, 7 and 18): word 3 is the checksum of all 508 data words.
    #[test]
    fn disk_stamp_matches_guest() {
        for (block, sum) in [
            (3u64, 0xa065_accf_cd30_19b1u64),
            (7, 0xfb29_3ecb_fbb7_931c),
            (18, 0x7db5_79cb_1754_2152),
        ] {
            let b = disk::stamp(block, 0x7fc);
            assert_eq!(u64le(&b, 0), disk::MAGIC);
            assert_eq!(&b[..8], b"STASDISK");
            assert_eq!(u64le(&b, 24), sum, "block {block}");
        }
    }

    #[test]
    fn net_frames() {
        let guest = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let host = [0x02, 0, 0, 0, 0, 1];
        let req = net::build(net::REQUEST_MAGIC, [0xff; 6], guest, guest, 9);
        assert_eq!(req.len(), net::FRAME_LEN);
        assert_eq!(&req[12..14], &[0x88, 0xb5]);
        assert_eq!(net::parse_request(&req), Some((guest, 9)));
        assert_eq!(net::parse_reply(&req), None);
        let rep = net::reply_for(&req, host).unwrap();
        assert_eq!(&rep[0..6], &guest);
        assert_eq!(&rep[6..12], &host);
        assert_eq!(net::parse_reply(&rep), Some((guest, 9)));
        assert_eq!(net::reply_for(&rep, host), None, "a reply is not a request");
        let mut bad = req.clone();
        bad[30] ^= 1; // sequence number, checksum no longer matches
        assert_eq!(net::parse_request(&bad), None);
        assert_eq!(net::parse_request(&req[..40]), None);
    }

    #[test]
    fn parse_virtio_lines() {
        let v = parse_line(
            "VIRTIO slot=1 addr_hex=d0001000 device_id=2 version=2 vendor_hex=0 type=blk",
        )
        .unwrap();
        assert_eq!(v.num("slot"), Some(1));
        assert_eq!(v.num("addr_hex"), Some(0xd000_1000));
        assert_eq!(v.num("device_id"), Some(2));
        let d = parse_line(
            "DISK-CONFIG index=0 capacity_sectors=16384 ro=0 flush=1 id=stasis-test-blk id_status=0 \
             slot=1 blk_size=512 start=0 blocks=256 clamped=0 mode=write",
        )
        .unwrap();
        assert_eq!(d.get("id"), Some("stasis-test-blk"));
        assert_eq!(d.num("capacity_sectors"), Some(16384));
        let n = parse_line(
            "NET mac=52:54:00:12:34:56 sent=6 received=5 replies=5 bad=0 last_reply_seq=5 tx_done=5 tx_full=0",
        )
        .unwrap();
        assert_eq!(n.get("mac"), Some("52:54:00:12:34:56"));
        assert_eq!(n.num("last_reply_seq"), Some(5));
        let r = parse_line("RNG requests=101 bytes=6464 last_hex=fa2fa59a9df023fd distinct=256")
            .unwrap();
        assert_eq!(r.num("last_hex"), Some(0xfa2f_a59a_9df0_23fd));
        assert_eq!(r.num("distinct"), Some(256));
    }

    #[test]
    fn parse_diskbench_line() {
        let l = parse_line(
            "DISKBENCH mode=seqwrite1m qd=8 ops=9248 bytes=9697230848 ms=2000 iops=4624 \
             mb_s_x100=484861 errors=0\r\n",
        )
        .unwrap();
        assert_eq!(l.tag, "DISKBENCH");
        assert_eq!(l.get("mode"), Some("seqwrite1m"));
        assert_eq!(l.num("bytes"), Some(9_697_230_848));
        assert_eq!(l.num("mb_s_x100"), Some(484_861));
        assert_eq!(l.num("errors"), Some(0));
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
