//! A vCPU's complete architectural state: what a snapshot saves for each
//! vCPU and how it is put back.
//!
//! Order matters on restore (each step's reason is noted in
//! [`restore_vcpu`]); saving has one rule: the vCPU must be out of
//! `KVM_RUN` (paused), and `KVM_GET_VCPU_EVENTS` is read early, before any
//! other getter could disturb pending events.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_xcr, kvm_xcrs, kvm_xsave2, CpuId, Msrs, Xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use stasis_snapshot::{hex_bytes, SectionState};

use crate::abi::{self, AbiSizeError};

/// Errors saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Kvm {
        /// The vCPU.
        vcpu: u32,
        /// The ioctl.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A saved ABI struct has the wrong size.
    #[error("vCPU {vcpu}: {source}")]
    Size {
        /// The vCPU.
        vcpu: u32,
        /// What was wrong.
        source: AbiSizeError,
    },
    /// The saved XSAVE area is larger than this host's KVM handles.
    #[error("vCPU {vcpu}: saved XSAVE area is {saved} bytes (beyond the zero tail) but this host's KVM handles {host}")]
    XsaveSize {
        /// The vCPU.
        vcpu: u32,
        /// Saved size.
        saved: usize,
        /// Host size.
        host: usize,
    },
    /// KVM did not accept every saved MSR.
    #[error(
        "vCPU {vcpu}: KVM_SET_MSRS accepted {set} of {total} MSRs; MSR {index:#x} was refused"
    )]
    Msrs {
        /// The vCPU.
        vcpu: u32,
        /// How many were set.
        set: usize,
        /// How many there were.
        total: usize,
        /// The first one refused.
        index: u32,
    },
    /// An MSR that was readable when the VM started could not be read.
    #[error("vCPU {vcpu}: KVM_GET_MSRS could not read MSR {index:#x}")]
    MsrRead {
        /// The vCPU.
        vcpu: u32,
        /// The MSR.
        index: u32,
    },
    /// Too many CPUID entries or MSRs for KVM's arrays.
    #[error("vCPU {vcpu}: saved {what} has too many entries")]
    TooMany {
        /// The vCPU.
        vcpu: u32,
        /// CPUID or MSRs.
        what: &'static str,
    },
}

/// One segment register, cache included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

impl From<kvm_segment> for Segment {
    fn from(s: kvm_segment) -> Self {
        Self {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
        }
    }
}

impl From<Segment> for kvm_segment {
    fn from(s: Segment) -> Self {
        Self {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
            padding: 0,
        }
    }
}

/// A descriptor table register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// The general-purpose registers, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct GeneralRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

impl From<kvm_regs> for GeneralRegs {
    fn from(r: kvm_regs) -> Self {
        Self {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<GeneralRegs> for kvm_regs {
    fn from(r: GeneralRegs) -> Self {
        Self {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

/// Segment, control and descriptor-table registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

impl From<kvm_sregs> for SpecialRegs {
    fn from(s: kvm_sregs) -> Self {
        Self {
            cs: s.cs.into(),
            ds: s.ds.into(),
            es: s.es.into(),
            fs: s.fs.into(),
            gs: s.gs.into(),
            ss: s.ss.into(),
            tr: s.tr.into(),
            ldt: s.ldt.into(),
            gdt: DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

impl From<&SpecialRegs> for kvm_sregs {
    fn from(s: &SpecialRegs) -> Self {
        let dt = |d: DescriptorTable| kvm_dtable {
            base: d.base,
            limit: d.limit,
            padding: [0; 3],
        };
        Self {
            cs: s.cs.into(),
            ds: s.ds.into(),
            es: s.es.into(),
            fs: s.fs.into(),
            gs: s.gs.into(),
            ss: s.ss.into(),
            tr: s.tr.into(),
            ldt: s.ldt.into(),
            gdt: dt(s.gdt),
            idt: dt(s.idt),
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

/// One MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// MSR number.
    pub index: u32,
    /// Value.
    pub value: u64,
}

/// One extended control register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct XcrValue {
    /// XCR number (0 = XCR0).
    pub xcr: u32,
    /// Value.
    pub value: u64,
}

/// One CPUID leaf as the guest saw it: the manifest's type, so that a
/// vCPU section and the manifest's `cpu.cpuid` describe leaves alike.
pub use stasis_snapshot::CpuidEntry as CpuidLeaf;

/// A KVM CPUID entry as a saved leaf.
pub fn leaf_from_kvm(e: &kvm_cpuid_entry2) -> CpuidLeaf {
    CpuidLeaf {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

/// A saved leaf as a KVM CPUID entry.
pub fn leaf_to_kvm(l: &CpuidLeaf) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: l.function,
        index: l.index,
        flags: l.flags,
        eax: l.eax,
        ebx: l.ebx,
        ecx: l.ecx,
        edx: l.edx,
        ..Default::default()
    }
}

/// Everything saved for one vCPU: section `vcpu`, instance = vCPU index.
///
/// Fields whose layout KVM defines and keeps stable (`kvm_lapic_state`,
/// `kvm_vcpu_events`, `kvm_debugregs`, the XSAVE area) are kept as their
/// raw bytes, length-checked on restore; the rest are named fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (= its APIC id).
    pub index: u32,
    /// General-purpose registers.
    pub regs: GeneralRegs,
    /// Segment and control registers.
    pub sregs: SpecialRegs,
    /// The whole XSAVE area as `KVM_GET_XSAVE2` returned it (x87, SSE,
    /// AVX, AVX-512 state): never a reduced copy.
    #[serde(with = "hex_bytes")]
    pub xsave: Vec<u8>,
    /// Extended control registers (XCR0).
    pub xcrs: Vec<XcrValue>,
    /// `struct kvm_lapic_state` (the local APIC's register page).
    #[serde(with = "hex_bytes")]
    pub lapic: Vec<u8>,
    /// Every MSR KVM can save (`KVM_GET_MSR_INDEX_LIST`, readable ones).
    pub msrs: Vec<MsrValue>,
    /// `KVM_MP_STATE_*`.
    pub mp_state: u32,
    /// `struct kvm_vcpu_events`: pending exceptions, interrupts, NMIs, SMIs.
    #[serde(with = "hex_bytes")]
    pub vcpu_events: Vec<u8>,
    /// `struct kvm_debugregs`.
    #[serde(with = "hex_bytes")]
    pub debug_regs: Vec<u8>,
    /// The CPUID the vCPU had.
    pub cpuid: Vec<CpuidLeaf>,
    /// Its TSC frequency in kHz.
    pub tsc_khz: u32,
}

impl SectionState for VcpuState {
    const NAME: &'static str = "vcpu";
    const VERSION: u32 = 1;
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// How this host's KVM transfers a vCPU's XSAVE area. Only made from what
/// the running kernel reports, because the transfer size is a memory
/// safety matter: KVM copies as many bytes as *it* thinks the area has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XsaveIo(XsaveMethod);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XsaveMethod {
    /// `KVM_GET_XSAVE`/`KVM_SET_XSAVE`: 4096 bytes.
    Legacy,
    /// `KVM_GET_XSAVE2` and `KVM_SET_XSAVE` with the size
    /// `KVM_CAP_XSAVE2` reports (at least 4096).
    Xsave2(usize),
}

impl XsaveIo {
    /// The method this host's KVM supports: `KVM_GET_XSAVE2` where
    /// `KVM_CAP_XSAVE2` exists (Linux 5.17 and later), else the 4096-byte
    /// `KVM_GET_XSAVE`. Ask after [`super::cpuid::request_amx_permission`]:
    /// the size grows with the permission.
    pub fn for_host(kvm: &kvm_ioctls::Kvm) -> Self {
        match kvm.check_extension_int(kvm_ioctls::Cap::Xsave2) {
            n if n > 0 => Self(XsaveMethod::Xsave2(
                (n as usize).max(stasis_cpu::xsave::KVM_XSAVE_SIZE),
            )),
            _ => Self(XsaveMethod::Legacy),
        }
    }

    /// The legacy 4096-byte ioctls, where they move this kernel's whole
    /// XSAVE area (no `KVM_CAP_XSAVE2`, or one that reports 4096): what a
    /// kernel before 5.17 uses. `None` where the area is larger (then
    /// `KVM_SET_XSAVE` would read past a 4096-byte buffer).
    pub fn legacy(kvm: &kvm_ioctls::Kvm) -> Option<Self> {
        match kvm.check_extension_int(kvm_ioctls::Cap::Xsave2) {
            n if n as usize > stasis_cpu::xsave::KVM_XSAVE_SIZE => None,
            _ => Some(Self(XsaveMethod::Legacy)),
        }
    }

    /// Bytes per transfer.
    pub fn size(self) -> usize {
        match self.0 {
            XsaveMethod::Legacy => stasis_cpu::xsave::KVM_XSAVE_SIZE,
            XsaveMethod::Xsave2(n) => n,
        }
    }

    fn ioctl_name(self, get: bool) -> &'static str {
        match (self.0, get) {
            (XsaveMethod::Legacy, true) => "KVM_GET_XSAVE",
            (XsaveMethod::Xsave2(_), true) => "KVM_GET_XSAVE2",
            (_, false) => "KVM_SET_XSAVE",
        }
    }
}

/// How a vCPU's state is read: which MSRs, how the XSAVE area is
/// transferred and how much of it a snapshot keeps.
#[derive(Debug, Clone)]
pub struct SaveLayout {
    /// The MSRs to save ([`readable_msrs`] cut to the CPU model).
    pub msrs: Vec<u32>,
    /// How KVM transfers the XSAVE area.
    pub xsave_io: XsaveIo,
    /// Bytes of it a snapshot keeps: what the guest's XSAVE components
    /// need (at least 4096). Bytes beyond are kept too if any is not zero.
    pub xsave_keep: usize,
}

/// Reads the state of a paused vCPU.
pub fn save_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    layout: &SaveLayout,
) -> Result<VcpuState, VcpuStateError> {
    let kvm = |what: &'static str| {
        move |source| VcpuStateError::Kvm {
            vcpu: index,
            what,
            source,
        }
    };
    // Events first: they describe what is pending right now.
    let events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let mut xsave =
        get_xsave(vcpu, layout.xsave_io).map_err(kvm(layout.xsave_io.ioctl_name(true)))?;
    trim_zero_tail(&mut xsave, layout.xsave_keep);
    let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let debug = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?;
    let tsc_khz = vcpu.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
    let mut msrs = Vec::with_capacity(layout.msrs.len());
    for chunk in stasis_cpu::msr::chunks(&layout.msrs) {
        let mut buf = Msrs::from_entries(
            &chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| VcpuStateError::TooMany {
            vcpu: index,
            what: "MSR list",
        })?;
        let n = vcpu.get_msrs(&mut buf).map_err(kvm("KVM_GET_MSRS"))?;
        if n < chunk.len() {
            // Probed readable at start; refusing beats a snapshot without it.
            return Err(VcpuStateError::MsrRead {
                vcpu: index,
                index: chunk[n],
            });
        }
        msrs.extend(buf.as_slice()[..n].iter().map(|e| MsrValue {
            index: e.index,
            value: e.data,
        }));
    }
    Ok(VcpuState {
        index,
        regs: regs.into(),
        sregs: sregs.into(),
        xsave,
        xcrs: xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())]
            .iter()
            .map(|x| XcrValue {
                xcr: x.xcr,
                value: x.value,
            })
            .collect(),
        lapic: abi::to_bytes(&lapic),
        msrs,
        mp_state: mp_state.mp_state,
        vcpu_events: abi::to_bytes(&events),
        debug_regs: abi::to_bytes(&debug),
        cpuid: cpuid.as_slice().iter().map(leaf_from_kvm).collect(),
        tsc_khz,
    })
}

/// Cuts `bytes` to `keep` if everything beyond is zero (state of XSAVE
/// components the guest cannot enable); never drops a non-zero byte.
fn trim_zero_tail(bytes: &mut Vec<u8>, keep: usize) {
    if bytes.len() > keep && bytes[keep..].iter().all(|&b| b == 0) {
        bytes.truncate(keep);
    }
}

fn xsave_fam_len(xsave_size: usize) -> usize {
    let base = std::mem::size_of::<kvm_bindings::kvm_xsave>();
    xsave_size.saturating_sub(base).div_ceil(4)
}

fn get_xsave(vcpu: &VcpuFd, io: XsaveIo) -> Result<Vec<u8>, kvm_ioctls::Error> {
    let mut bytes = Vec::with_capacity(io.size());
    match io.0 {
        XsaveMethod::Legacy => {
            let xs = vcpu.get_xsave()?;
            for w in xs.region.iter() {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
        }
        XsaveMethod::Xsave2(size) => {
            let mut xs = Xsave::new(xsave_fam_len(size)).expect("XSAVE size fits the FAM limit");
            // SAFETY: `size` is this kernel's KVM_CAP_XSAVE2 (XsaveIo is
            // only made from it), the size the ioctl writes.
            unsafe { vcpu.get_xsave2(&mut xs) }?;
            for w in xs.as_fam_struct_ref().xsave.region.iter() {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
            for w in xs.as_slice() {
                bytes.extend_from_slice(&w.to_le_bytes());
            }
        }
    }
    Ok(bytes)
}

fn set_xsave(vcpu: &VcpuFd, index: u32, bytes: &[u8], io: XsaveIo) -> Result<(), VcpuStateError> {
    let size = io.size();
    // A saved area longer than this KVM transfers is fine if the excess
    // is zero (components the guest never enabled).
    let fits = bytes.len() <= size || bytes[size..].iter().all(|&b| b == 0);
    if bytes.len() < stasis_cpu::xsave::KVM_XSAVE_SIZE || !bytes.len().is_multiple_of(4) || !fits {
        return Err(VcpuStateError::XsaveSize {
            vcpu: index,
            saved: bytes.len(),
            host: size,
        });
    }
    let mut words = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")));
    let kvm = |what| {
        move |source| VcpuStateError::Kvm {
            vcpu: index,
            what,
            source,
        }
    };
    match io.0 {
        XsaveMethod::Legacy => {
            let mut xs = kvm_bindings::kvm_xsave::default();
            for w in xs.region.iter_mut() {
                *w = words.next().unwrap_or(0);
            }
            // SAFETY: Legacy is only made where this kernel's XSAVE area
            // is 4096 bytes (XsaveIo::legacy), so KVM reads exactly
            // sizeof(kvm_xsave).
            unsafe { vcpu.set_xsave(&xs) }.map_err(kvm(io.ioctl_name(false)))
        }
        XsaveMethod::Xsave2(size) => {
            let mut xs = Xsave::new(xsave_fam_len(size)).expect("XSAVE size fits the FAM limit");
            // SAFETY: we only overwrite the fixed region's words; the FAM
            // length field is left as Xsave::new set it.
            let fam: &mut kvm_xsave2 = unsafe { xs.as_mut_fam_struct() };
            for w in fam.xsave.region.iter_mut() {
                *w = words.next().unwrap_or(0);
            }
            for w in xs.as_mut_slice() {
                *w = words.next().unwrap_or(0);
            }
            // SAFETY: the buffer is sized for this kernel's KVM_CAP_XSAVE2.
            unsafe { vcpu.set_xsave2(&xs) }.map_err(kvm(io.ioctl_name(false)))
        }
    }
}

/// Offset of the LAPIC timer LVT register in `kvm_lapic_state`.
const APIC_LVTT: usize = 0x320;
const LVTT_MASKED: u32 = 1 << 16;
const LVTT_MODE_MASK: u32 = 0b11 << 17;
const LVTT_MODE_TSC_DEADLINE: u32 = 0b10 << 17;

/// Whether a saved LAPIC has its timer unmasked in TSC-deadline mode.
fn lapic_timer_in_deadline_mode(lapic: &[u8]) -> bool {
    lapic
        .get(APIC_LVTT..APIC_LVTT + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .is_some_and(|lvtt| {
            lvtt & LVTT_MASKED == 0 && lvtt & LVTT_MODE_MASK == LVTT_MODE_TSC_DEADLINE
        })
}

/// The MSRs to write on restore, in order: the TSC first and the TSC
/// deadline last (the deadline is relative to the TSC), without `skip`.
///
/// A TSC deadline of 0 with the timer unmasked in TSC-deadline mode is
/// written as the saved TSC instead: KVM clears the deadline when the
/// timer fires, and a snapshot taken between that and the interrupt's
/// delivery would otherwise come back with no timer armed and no
/// interrupt pending, leaving the vCPU without timer interrupts for good.
/// A deadline in the past fires at once; one early tick is harmless.
pub fn msrs_for_restore(state: &VcpuState, skip: &[u32]) -> Vec<MsrValue> {
    let mut ordered: Vec<MsrValue> = state
        .msrs
        .iter()
        .filter(|m| !skip.contains(&m.index))
        .copied()
        .collect();
    ordered.sort_by_key(|m| match m.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    let tsc = ordered
        .iter()
        .find(|m| m.index == MSR_IA32_TSC)
        .map(|m| m.value);
    if let (Some(tsc), true) = (tsc, lapic_timer_in_deadline_mode(&state.lapic)) {
        for m in ordered.iter_mut() {
            if m.index == MSR_IA32_TSC_DEADLINE && m.value == 0 {
                tracing::debug!(
                    "vCPU {}: TSC deadline 0 in TSC-deadline mode, armed at the saved TSC",
                    state.index
                );
                m.value = tsc.max(1);
            }
        }
    }
    ordered
}

/// How a saved vCPU is put back on this host.
#[derive(Debug, Clone)]
pub struct RestoreLayout {
    /// How KVM transfers the XSAVE area.
    pub xsave_io: XsaveIo,
    /// Scale the guest's TSC to its saved rate (`KVM_SET_TSC_KHZ`).
    pub scale_tsc: bool,
    /// Saved MSRs this host lacks and that hold no state (zero).
    pub skip_msrs: Vec<u32>,
}

/// Puts a saved state into a freshly created vCPU; returns the CPUID KVM
/// applied (some KVMs add features to what was saved).
pub fn restore_vcpu(
    vcpu: &VcpuFd,
    state: &VcpuState,
    layout: &RestoreLayout,
) -> Result<Vec<CpuidLeaf>, VcpuStateError> {
    let index = state.index;
    let kvm = |what: &'static str| {
        move |source| VcpuStateError::Kvm {
            vcpu: index,
            what,
            source,
        }
    };
    let size = |source| VcpuStateError::Size {
        vcpu: index,
        source,
    };
    // 1. CPUID first: KVM derives what the other state may contain (XSAVE
    //    features, MSRs that exist) from it.
    let cpuid = CpuId::from_entries(&state.cpuid.iter().map(leaf_to_kvm).collect::<Vec<_>>())
        .map_err(|_| VcpuStateError::TooMany {
            vcpu: index,
            what: "CPUID",
        })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let applied = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?;
    // 2. The TSC rate, when the restore decided to scale it (see
    //    stasis_cpu::tsc): before the TSC MSR is written.
    if layout.scale_tsc {
        vcpu.set_tsc_khz(state.tsc_khz)
            .map_err(kvm("KVM_SET_TSC_KHZ"))?;
    }
    // 3. MP state before registers: it decides whether the vCPU is waiting
    //    for a SIPI.
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(kvm("KVM_SET_MP_STATE"))?;
    // 4. Registers, then special registers (which set the APIC base and
    //    paging mode the rest depends on).
    vcpu.set_regs(&state.regs.into())
        .map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&(&state.sregs).into())
        .map_err(kvm("KVM_SET_SREGS"))?;
    // 5. XCR0 before the XSAVE area, so KVM accepts the components it holds.
    let mut xcrs = kvm_xcrs::default();
    for (slot, x) in xcrs.xcrs.iter_mut().zip(&state.xcrs) {
        *slot = kvm_xcr {
            xcr: x.xcr,
            reserved: 0,
            value: x.value,
        };
    }
    xcrs.nr_xcrs = state.xcrs.len().min(xcrs.xcrs.len()) as u32;
    vcpu.set_xcrs(&xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    set_xsave(vcpu, index, &state.xsave, layout.xsave_io)?;
    vcpu.set_debug_regs(&abi::from_bytes("kvm_debugregs", &state.debug_regs).map_err(size)?)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    // 6. The local APIC after sregs (APIC base) and before the MSRs (the
    //    TSC deadline MSR only sticks with the timer in TSC-deadline mode).
    vcpu.set_lapic(&abi::from_bytes("kvm_lapic_state", &state.lapic).map_err(size)?)
        .map_err(kvm("KVM_SET_LAPIC"))?;
    // 7. MSRs, in ioctl-sized chunks, TSC first and TSC deadline last.
    let ordered = msrs_for_restore(state, &layout.skip_msrs);
    let total = ordered.len();
    let mut done = 0;
    for chunk in stasis_cpu::msr::chunks(&ordered) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany {
            vcpu: index,
            what: "MSR list",
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(VcpuStateError::Msrs {
                vcpu: index,
                set: done + set,
                total,
                index: entries[set].index,
            });
        }
        done += set;
    }
    // 8. Pending events last: earlier calls may clear them.
    vcpu.set_vcpu_events(&abi::from_bytes("kvm_vcpu_events", &state.vcpu_events).map_err(size)?)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(applied.as_slice().iter().map(leaf_from_kvm).collect())
}

const MSR_MTRR_CAP: u32 = 0xfe;

/// Number of variable-range MTRR pairs (`MTRRcap[7:0]`), 0 if unreadable.
fn mtrr_variable_count(vcpu: &VcpuFd) -> u32 {
    let mut m = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_MTRR_CAP,
        ..Default::default()
    }])
    .expect("one MSR");
    match vcpu.get_msrs(&mut m) {
        Ok(1) => (m.as_slice()[0].data & 0xff) as u32,
        _ => 0,
    }
}

/// The MTRR MSRs: default type, fixed ranges, `variable` base/mask pairs.
fn mtrr_msrs(variable: u32) -> Vec<u32> {
    let mut v = vec![0x2ff, 0x250, 0x258, 0x259];
    v.extend(0x268..=0x26f);
    v.extend((0..variable.min(32) * 2).map(|i| 0x200 + i));
    v
}

/// The MSRs of `KVM_GET_MSR_INDEX_LIST` (plus the MTRRs) that `vcpu` can actually read on
/// this host (some listed ones fail on some hosts and would stop
/// `KVM_GET_MSRS` at the first failure).
pub fn readable_msrs(kvm: &kvm_ioctls::Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, kvm_ioctls::Error> {
    let list = kvm.get_msr_index_list()?;
    let mut candidates: Vec<u32> = list.as_slice().to_vec();
    // KVM's list leaves out the MTRRs, which the guest (and stasis at
    // boot) configures: add the default type, the fixed ranges and as many
    // variable pairs as MTRRcap says.
    let variable = mtrr_variable_count(vcpu);
    for m in mtrr_msrs(variable) {
        if !candidates.contains(&m) {
            candidates.push(m);
        }
    }
    let mut readable = Vec::with_capacity(candidates.len());
    while !candidates.is_empty() {
        let batch = candidates.len().min(stasis_cpu::msr::MAX_MSRS_PER_IOCTL);
        let entries: Vec<kvm_msr_entry> = candidates[..batch]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("one ioctl's worth of MSRs fits");
        let n = vcpu.get_msrs(&mut msrs)?;
        readable.extend_from_slice(&candidates[..n]);
        // Entry n failed (if n < batch): skip it and go on with the rest.
        candidates.drain(..(n + 1).min(batch));
    }
    Ok(readable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with(lvtt: u32, msrs: &[(u32, u64)]) -> VcpuState {
        let mut lapic = vec![0u8; 1024];
        lapic[APIC_LVTT..APIC_LVTT + 4].copy_from_slice(&lvtt.to_le_bytes());
        VcpuState {
            index: 0,
            regs: kvm_regs::default().into(),
            sregs: kvm_sregs::default().into(),
            xsave: vec![0; 4096],
            xcrs: vec![],
            lapic,
            msrs: msrs
                .iter()
                .map(|&(index, value)| MsrValue { index, value })
                .collect(),
            mp_state: 0,
            vcpu_events: vec![],
            debug_regs: vec![],
            cpuid: vec![],
            tsc_khz: 0,
        }
    }

    fn values(v: &[MsrValue]) -> Vec<(u32, u64)> {
        v.iter().map(|m| (m.index, m.value)).collect()
    }

    const DEADLINE_MODE: u32 = LVTT_MODE_TSC_DEADLINE | 0xec;

    #[test]
    fn restore_order_is_tsc_first_deadline_last() {
        let s = state_with(
            0,
            &[(MSR_IA32_TSC_DEADLINE, 9), (0x1a0, 1), (MSR_IA32_TSC, 5)],
        );
        assert_eq!(
            values(&msrs_for_restore(&s, &[])),
            vec![(MSR_IA32_TSC, 5), (0x1a0, 1), (MSR_IA32_TSC_DEADLINE, 9)]
        );
        assert_eq!(
            values(&msrs_for_restore(&s, &[0x1a0])),
            vec![(MSR_IA32_TSC, 5), (MSR_IA32_TSC_DEADLINE, 9)]
        );
    }

    #[test]
    fn zero_deadline_in_deadline_mode_is_armed_at_the_saved_tsc() {
        let msrs = [(MSR_IA32_TSC, 1_000), (MSR_IA32_TSC_DEADLINE, 0)];
        let armed = msrs_for_restore(&state_with(DEADLINE_MODE, &msrs), &[]);
        assert_eq!(values(&armed)[1], (MSR_IA32_TSC_DEADLINE, 1_000));
        // Masked timer, or another timer mode: a zero deadline stays zero.
        for lvtt in [DEADLINE_MODE | LVTT_MASKED, 0xec, (0b01 << 17) | 0xec] {
            let kept = msrs_for_restore(&state_with(lvtt, &msrs), &[]);
            assert_eq!(
                values(&kept)[1],
                (MSR_IA32_TSC_DEADLINE, 0),
                "lvtt {lvtt:#x}"
            );
        }
        // A non-zero deadline is kept as saved.
        let set = msrs_for_restore(
            &state_with(
                DEADLINE_MODE,
                &[(MSR_IA32_TSC, 1_000), (MSR_IA32_TSC_DEADLINE, 77)],
            ),
            &[],
        );
        assert_eq!(values(&set)[1], (MSR_IA32_TSC_DEADLINE, 77));
    }

    #[test]
    fn xsave_tail_is_trimmed_only_when_zero() {
        let mut v = vec![1u8; 4096];
        v.extend_from_slice(&[0; 4096]);
        trim_zero_tail(&mut v, 4096);
        assert_eq!(v.len(), 4096);
        let mut w = vec![0u8; 8192];
        w[5000] = 1;
        trim_zero_tail(&mut w, 4096);
        assert_eq!(w.len(), 8192, "a non-zero byte is never dropped");
    }
}
