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
    #[error("vCPU {vcpu}: saved XSAVE area is {saved} bytes but this host's KVM handles {host} (KVM_CAP_XSAVE2)")]
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

/// Reads the state of a paused vCPU. `msr_indices` is the list of MSRs
/// this host's KVM can read ([`readable_msrs`]); `xsave_size` is
/// `KVM_CAP_XSAVE2` (at least 4096).
pub fn save_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    msr_indices: &[u32],
    xsave_size: usize,
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
    let xsave = get_xsave(vcpu, xsave_size).map_err(kvm("KVM_GET_XSAVE2"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let debug = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?;
    let tsc_khz = vcpu.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?;
    let mut msrs = Msrs::from_entries(
        &msr_indices
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
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    if n < msr_indices.len() {
        // Probed readable at start; refusing beats a snapshot without it.
        return Err(VcpuStateError::MsrRead {
            vcpu: index,
            index: msr_indices[n],
        });
    }
    let msrs = msrs.as_slice()[..n]
        .iter()
        .map(|e| MsrValue {
            index: e.index,
            value: e.data,
        })
        .collect();
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

fn xsave_fam_len(xsave_size: usize) -> usize {
    let base = std::mem::size_of::<kvm_bindings::kvm_xsave>();
    xsave_size.saturating_sub(base).div_ceil(4)
}

fn get_xsave(vcpu: &VcpuFd, xsave_size: usize) -> Result<Vec<u8>, kvm_ioctls::Error> {
    let mut xs = Xsave::new(xsave_fam_len(xsave_size)).expect("XSAVE size fits the FAM limit");
    // SAFETY: the buffer was sized from KVM_CAP_XSAVE2, as the ioctl needs.
    unsafe { vcpu.get_xsave2(&mut xs) }?;
    let mut bytes = Vec::with_capacity(xsave_size.max(4096));
    for w in xs.as_fam_struct_ref().xsave.region.iter() {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    for w in xs.as_slice() {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    Ok(bytes)
}

fn set_xsave(
    vcpu: &VcpuFd,
    index: u32,
    bytes: &[u8],
    host_size: usize,
) -> Result<(), VcpuStateError> {
    if bytes.len() < 4096 || !bytes.len().is_multiple_of(4) || bytes.len() > host_size.max(4096) {
        return Err(VcpuStateError::XsaveSize {
            vcpu: index,
            saved: bytes.len(),
            host: host_size,
        });
    }
    let mut xs = Xsave::new(xsave_fam_len(host_size)).expect("XSAVE size fits the FAM limit");
    let mut words = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")));
    // SAFETY: we only overwrite the fixed region's words; the FAM length
    // field is left as Xsave::new set it.
    let fam: &mut kvm_xsave2 = unsafe { xs.as_mut_fam_struct() };
    for w in fam.xsave.region.iter_mut() {
        *w = words.next().unwrap_or(0);
    }
    for w in xs.as_mut_slice() {
        *w = words.next().unwrap_or(0);
    }
    // SAFETY: the buffer is sized for this host's KVM_CAP_XSAVE2.
    unsafe { vcpu.set_xsave2(&xs) }.map_err(|source| VcpuStateError::Kvm {
        vcpu: index,
        what: "KVM_SET_XSAVE2",
        source,
    })
}

/// Puts a saved state into a freshly created vCPU.
pub fn restore_vcpu(
    vcpu: &VcpuFd,
    state: &VcpuState,
    xsave_size: usize,
) -> Result<(), VcpuStateError> {
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
    // 2. TSC frequency: if this host's differs by more than 250 ppm, ask
    //    KVM to scale; hosts without TSC scaling keep their own rate (the
    //    guest's kvmclock is correct either way; a guest that calibrated its
    //    TSC by hand runs its TSC-based timers at the wrong rate).
    if let Ok(now) = vcpu.get_tsc_khz() {
        let diff = (i64::from(now) - i64::from(state.tsc_khz)).unsigned_abs();
        if diff * 4000 > u64::from(state.tsc_khz) {
            if let Err(e) = vcpu.set_tsc_khz(state.tsc_khz) {
                tracing::warn!(
                    "vCPU {index}: saved TSC rate is {} kHz, this host runs at {now} kHz and cannot scale it ({e})",
                    state.tsc_khz
                );
            }
        }
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
    set_xsave(vcpu, index, &state.xsave, xsave_size)?;
    vcpu.set_debug_regs(&abi::from_bytes("kvm_debugregs", &state.debug_regs).map_err(size)?)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    // 6. The local APIC after sregs (APIC base) and before the MSRs (the
    //    TSC deadline MSR only sticks with the timer in TSC-deadline mode).
    vcpu.set_lapic(&abi::from_bytes("kvm_lapic_state", &state.lapic).map_err(size)?)
        .map_err(kvm("KVM_SET_LAPIC"))?;
    // 7. MSRs, with the TSC first and the TSC deadline last: the deadline
    //    is relative to the TSC.
    let mut ordered: Vec<&MsrValue> = state.msrs.iter().collect();
    ordered.sort_by_key(|m| match m.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    let entries: Vec<kvm_msr_entry> = ordered
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
            set,
            total: entries.len(),
            index: entries[set].index,
        });
    }
    // 8. Pending events last: earlier calls may clear them.
    vcpu.set_vcpu_events(&abi::from_bytes("kvm_vcpu_events", &state.vcpu_events).map_err(size)?)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
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
        let entries: Vec<kvm_msr_entry> = candidates
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("MSR index list fits");
        let n = vcpu.get_msrs(&mut msrs)?;
        readable.extend_from_slice(&candidates[..n]);
        // Entry n failed: skip it and go on with the rest.
        candidates.drain(..(n + 1).min(candidates.len()));
    }
    Ok(readable)
}
