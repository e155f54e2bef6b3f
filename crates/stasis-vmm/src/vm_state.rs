//! VM-wide KVM state: the in-kernel interrupt controllers, the PIT and
//! the KVM clock. Saved while every vCPU is paused.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use stasis_snapshot::{hex_bytes, SectionState};

use crate::abi::{self, AbiSizeError};

/// Errors saving or restoring VM-wide state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A saved struct has the wrong size.
    #[error(transparent)]
    Size(#[from] AbiSizeError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { what, source }
}

/// The in-kernel PICs and IOAPIC: section `kvm.irqchip`, each chip as the
/// raw `struct kvm_irqchip` KVM returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqchipState {
    /// The master 8259.
    #[serde(with = "hex_bytes")]
    pub pic_master: Vec<u8>,
    /// The slave 8259.
    #[serde(with = "hex_bytes")]
    pub pic_slave: Vec<u8>,
    /// The IOAPIC (redirection table included).
    #[serde(with = "hex_bytes")]
    pub ioapic: Vec<u8>,
}

impl SectionState for IrqchipState {
    const NAME: &'static str = "kvm.irqchip";
    const VERSION: u32 = 1;
}

/// The in-kernel PIT: section `kvm.pit`, the raw `struct kvm_pit_state2`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// `struct kvm_pit_state2`.
    #[serde(with = "hex_bytes")]
    pub pit: Vec<u8>,
}

impl SectionState for PitState {
    const NAME: &'static str = "kvm.pit";
    const VERSION: u32 = 1;
}

/// The KVM clock (the guest's kvmclock base): section `kvm.clock`.
///
/// Restored as saved: guest time resumes where it stopped, so it neither
/// jumps over the time the VM spent saved nor runs backwards. (Guest wall
/// clocks catch up through NTP or the RTC, as after any suspend.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// Nanoseconds of the KVM clock when saved.
    pub clock_ns: u64,
}

impl SectionState for ClockState {
    const NAME: &'static str = "kvm.clock";
    const VERSION: u32 = 1;
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<Vec<u8>, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(abi::to_bytes(&chip))
}

fn set_chip(vm: &VmFd, what: &'static str, chip_id: u32, bytes: &[u8]) -> Result<(), VmStateError> {
    let mut chip: kvm_irqchip = abi::from_bytes(what, bytes)?;
    // The chip id comes from where it is restored to, not from the bytes.
    chip.chip_id = chip_id;
    vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))
}

/// Reads the VM-wide state.
pub fn save(vm: &VmFd) -> Result<(IrqchipState, PitState, ClockState), VmStateError> {
    let irqchip = IrqchipState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
    };
    let pit = PitState {
        pit: abi::to_bytes(&vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?),
    };
    let clock = ClockState {
        clock_ns: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?.clock,
    };
    Ok((irqchip, pit, clock))
}

/// Restores the VM-wide state into a VM whose irqchip and PIT exist.
pub fn restore(
    vm: &VmFd,
    irqchip: &IrqchipState,
    pit: &PitState,
    clock: &ClockState,
) -> Result<(), VmStateError> {
    set_chip(
        vm,
        "kvm_irqchip (PIC master)",
        KVM_IRQCHIP_PIC_MASTER,
        &irqchip.pic_master,
    )?;
    set_chip(
        vm,
        "kvm_irqchip (PIC slave)",
        KVM_IRQCHIP_PIC_SLAVE,
        &irqchip.pic_slave,
    )?;
    set_chip(
        vm,
        "kvm_irqchip (IOAPIC)",
        KVM_IRQCHIP_IOAPIC,
        &irqchip.ioapic,
    )?;
    vm.set_pit2(&abi::from_bytes("kvm_pit_state2", &pit.pit)?)
        .map_err(kvm("KVM_SET_PIT2"))?;
    let data = kvm_clock_data {
        clock: clock.clock_ns,
        ..Default::default()
    };
    vm.set_clock(&data).map_err(kvm("KVM_SET_CLOCK"))
}
