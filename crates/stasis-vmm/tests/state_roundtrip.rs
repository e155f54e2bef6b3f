//! Save → restore → save on real KVM gives the same state, for the parts
//! the guest kit does not exercise by itself (IOAPIC routing, PIC masks,
//! PIT counters, the KVM clock, debug registers, MSRs).

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use stasis_vmm::abi;
use stasis_vmm::cpu::state::{
    readable_msrs, restore_vcpu, save_vcpu, RestoreLayout, SaveLayout, XsaveIo,
};
use stasis_vmm::vm_state;

fn kvm() -> Kvm {
    Kvm::new().unwrap_or_else(|e| panic!("this test needs KVM: cannot open /dev/kvm ({e})"))
}

fn new_vm(kvm: &Kvm) -> VmFd {
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    vm
}

#[test]
fn vm_wide_state_round_trips() {
    let kvm = kvm();
    let a = new_vm(&kvm);
    // Non-default state: an IOAPIC redirection entry, PIC masks, a PIT
    // counter, and a clock far from zero.
    let mut chip = kvm_bindings::kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    a.get_irqchip(&mut chip).unwrap();
    // SAFETY: chip_id is IOAPIC, so the ioapic member is the valid one.
    unsafe {
        chip.chip.ioapic.redirtbl[4].bits = 0x0000_0000_0000_0031; // vector 0x31, unmasked
        chip.chip.ioapic.redirtbl[9].bits = 0x0100_0000_0001_8042; // masked, level, dest 1
    }
    a.set_irqchip(&chip).unwrap();
    let mut pic = kvm_bindings::kvm_irqchip {
        chip_id: kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
        ..Default::default()
    };
    a.get_irqchip(&mut pic).unwrap();
    // chip_id is a PIC, so the pic member is the one KVM reads.
    pic.chip.pic.imr = 0xb8;
    a.set_irqchip(&pic).unwrap();
    let mut pit = a.get_pit2().unwrap();
    pit.channels[0].count = 11932;
    pit.channels[0].mode = 2;
    a.set_pit2(&pit).unwrap();
    a.set_clock(&kvm_bindings::kvm_clock_data {
        clock: 123_456_789_000,
        ..Default::default()
    })
    .unwrap();

    let (irq, pit_s, clock) = vm_state::save(&a).unwrap();
    assert!(clock.clock_ns >= 123_456_789_000);
    let b = new_vm(&kvm);
    vm_state::restore(&b, &irq, &pit_s, &clock).unwrap();
    let (irq2, pit2, clock2) = vm_state::save(&b).unwrap();
    assert_eq!(irq2, irq, "irqchip state differs after restore");
    let p1: kvm_bindings::kvm_pit_state2 = abi::from_bytes("pit", &pit_s.pit).unwrap();
    let p2: kvm_bindings::kvm_pit_state2 = abi::from_bytes("pit", &pit2.pit).unwrap();
    assert_eq!(p2.channels[0].count, 11932);
    assert_eq!(p2.channels[0].mode, p1.channels[0].mode);
    // The clock resumes from the saved value: neither back in time nor
    // jumped by the time between save and restore (allow 1 s of test time).
    assert!(clock2.clock_ns >= clock.clock_ns);
    assert!(
        clock2.clock_ns < clock.clock_ns + 1_000_000_000,
        "{clock:?} -> {clock2:?}"
    );
}

fn vcpu_with_state(vm: &VmFd) -> VcpuFd {
    let vcpu = vm.create_vcpu(0).unwrap();
    let kvm = kvm();
    let base =
        stasis_cpu::cpuid::host_base(&stasis_vmm::cpu::cpuid::supported(&kvm).unwrap(), true);
    stasis_vmm::cpu::cpuid::set_for_vcpu(&vcpu, &base, 0, 1).unwrap();
    vcpu
}

fn layout(msrs: Vec<u32>, xsave_io: XsaveIo) -> (SaveLayout, RestoreLayout) {
    (
        SaveLayout {
            msrs,
            xsave_io,
            xsave_keep: 4096,
        },
        RestoreLayout {
            xsave_io,
            scale_tsc: false,
            skip_msrs: vec![],
        },
    )
}

#[test]
fn vcpu_state_round_trips() {
    let kvm = kvm();
    let io = XsaveIo::for_host(&kvm);
    let a = new_vm(&kvm);
    let va = vcpu_with_state(&a);
    let mut regs = va.get_regs().unwrap();
    regs.rax = 0x1111_2222_3333_4444;
    regs.r15 = 0xdead_beef;
    regs.rip = 0x10_0000;
    regs.rflags = 0x202;
    va.set_regs(&regs).unwrap();
    let mut dr = va.get_debug_regs().unwrap();
    dr.db[1] = 0x4000;
    dr.dr7 = 0x4 | 0x400; // DR1 enabled locally
    va.set_debug_regs(&dr).unwrap();
    let msrs_list = readable_msrs(&kvm, &va).unwrap();
    assert!(msrs_list.contains(&0x10), "TSC must be saved");
    assert!(msrs_list.contains(&0x2ff), "MTRRdefType must be saved");
    let m = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: 0x2ff,
        data: (1 << 11) | 6,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(va.set_msrs(&m).unwrap(), 1);
    let (save, restore) = layout(msrs_list, io);
    let saved = save_vcpu(&va, 0, &save).unwrap();

    let b = new_vm(&kvm);
    let vb = b.create_vcpu(0).unwrap();
    restore_vcpu(&vb, &saved, &restore).unwrap();
    let again = save_vcpu(&vb, 0, &save).unwrap();
    assert_eq!(again.regs, saved.regs);
    assert_eq!(again.sregs, saved.sregs);
    assert_eq!(again.xsave, saved.xsave);
    assert_eq!(again.xcrs, saved.xcrs);
    assert_eq!(again.debug_regs, saved.debug_regs);
    assert_eq!(again.mp_state, saved.mp_state);
    assert_eq!(again.cpuid, saved.cpuid);
    let mtrr_def = again.msrs.iter().find(|m| m.index == 0x2ff).unwrap();
    assert_eq!(mtrr_def.value, (1 << 11) | 6, "MTRRs not restored");
    // MSRs: identical, except the TSC, which kept counting.
    for (x, y) in saved.msrs.iter().zip(&again.msrs) {
        assert_eq!(x.index, y.index);
        if x.index != 0x10 {
            assert_eq!(x.value, y.value, "MSR {:#x}", x.index);
        } else {
            assert!(y.value >= x.value, "TSC went backwards");
        }
    }
    // A truncated LAPIC blob is refused by name, not used.
    let mut bad = saved.clone();
    bad.lapic.truncate(100);
    let e = restore_vcpu(&b.create_vcpu(1).unwrap(), &bad, &restore).unwrap_err();
    assert!(e.to_string().contains("kvm_lapic_state"), "{e}");
}

/// Kernels before 5.17 have no KVM_GET_XSAVE2: the 4096-byte ioctls carry
/// the same state, and areas saved either way restore the other way.
#[test]
fn legacy_and_xsave2_transfers_are_interchangeable() {
    let kvm = kvm();
    let a = new_vm(&kvm);
    let va = vcpu_with_state(&a);
    let msrs = readable_msrs(&kvm, &va).unwrap();
    let host = XsaveIo::for_host(&kvm);
    let Some(legacy) = XsaveIo::legacy(&kvm) else {
        // This kernel's XSAVE area is larger than the legacy ioctls move
        // (AMX): they must not be used, and nothing can be compared.
        assert!(host.size() > 4096);
        return;
    };
    // Non-default x87/SSE state, planted in the XSAVE area the way a guest
    // leaves it (KVM_SET_FPU would not mark it in use in the header): the
    // x87 control word, XMM3, and XSTATE_BV with x87|SSE.
    let (save_host, restore_host) = layout(msrs.clone(), host);
    let mut planted = save_vcpu(&va, 0, &save_host).unwrap();
    planted.xsave[0..2].copy_from_slice(&0x027fu16.to_le_bytes());
    planted.xsave[160 + 48..160 + 64].fill(0xab);
    planted.xsave[512] |= 0b11;
    restore_vcpu(&va, &planted, &restore_host).unwrap();
    for (from, to) in [(legacy, host), (host, legacy)] {
        let (save_from, _) = layout(msrs.clone(), from);
        let (save_to, restore_to) = layout(msrs.clone(), to);
        let saved = save_vcpu(&va, 0, &save_from).unwrap();
        assert_eq!(saved.xsave.len(), 4096, "{from:?}");
        let b = new_vm(&kvm);
        let vb = b.create_vcpu(0).unwrap();
        restore_vcpu(&vb, &saved, &restore_to).unwrap();
        let fb = vb.get_fpu().unwrap();
        assert_eq!(fb.fcw, 0x027f, "{from:?} -> {to:?}");
        assert_eq!(fb.xmm[3], [0xab; 16], "{from:?} -> {to:?}");
        assert_eq!(save_vcpu(&vb, 0, &save_to).unwrap().xsave, saved.xsave);
    }
    // A saved area longer than the legacy ioctl takes is refused unless
    // the excess is zero.
    let mut long = save_vcpu(&va, 0, &save_host).unwrap();
    long.xsave.resize(8192, 0);
    let (_, legacy_restore) = layout(msrs.clone(), legacy);
    restore_vcpu(&a.create_vcpu(1).unwrap(), &long, &legacy_restore).unwrap();
    long.xsave[6000] = 1;
    let e = restore_vcpu(&a.create_vcpu(2).unwrap(), &long, &legacy_restore).unwrap_err();
    assert!(
        e.to_string().contains("saved XSAVE area is 8192 bytes"),
        "{e}"
    );
}

/// KVM takes at most 255 MSRs per KVM_GET_MSRS / KVM_SET_MSRS: longer
/// lists go in chunks.
#[test]
fn msr_lists_longer_than_one_ioctl_round_trip() {
    let kvm = kvm();
    let a = new_vm(&kvm);
    let va = vcpu_with_state(&a);
    let readable = readable_msrs(&kvm, &va).unwrap();
    let mut long = Vec::new();
    while long.len() <= 600 {
        long.extend_from_slice(&readable);
    }
    let (save, restore) = layout(long.clone(), XsaveIo::for_host(&kvm));
    let saved = save_vcpu(&va, 0, &save).unwrap();
    assert_eq!(saved.msrs.len(), long.len());
    let b = new_vm(&kvm);
    let vb = b.create_vcpu(0).unwrap();
    restore_vcpu(&vb, &saved, &restore).unwrap();
    let again = save_vcpu(&vb, 0, &save).unwrap();
    assert_eq!(again.msrs.len(), long.len());
    let pat = |s: &stasis_vmm::cpu::state::VcpuState| {
        s.msrs
            .iter()
            .filter(|m| m.index == 0x277)
            .map(|m| m.value)
            .collect::<Vec<_>>()
    };
    assert_eq!(pat(&again), pat(&saved));
}
