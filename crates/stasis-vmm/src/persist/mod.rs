//! Snapshots of a running VM and VMs restored from them, on top of the
//! format crate (`stasis-snapshot`): [`save`] writes what
//! [`crate::VmControl::capture`] and guest memory hold; [`restore`] checks
//! that this host can run a snapshot and rebuilds the VM.
//!
//! Sections written (name / instance, all version 1):
//!
//! | section | instance | owner |
//! |---|---|---|
//! | `vcpu` | vCPU index | [`crate::cpu::state::VcpuState`] |
//! | `kvm.irqchip` | `0` | [`crate::vm_state::IrqchipState`] |
//! | `kvm.pit` | `0` | [`crate::vm_state::PitState`] |
//! | `kvm.clock` | `0` | [`crate::vm_state::ClockState`] |
//! | `serial` | `com1` | [`crate::devices::serial::SerialDeviceState`] |
//! | `rtc` | `cmos` | [`crate::devices::rtc::CmosRtcState`] |
//! | `vmgenid` | `0` | [`crate::devices::vmgenid::VmGenIdState`] |
//! | `virtio-blk` | device id | [`crate::devices::virtio::state::VirtioBlkState`] |
//! | `virtio-net` | device id | [`crate::devices::virtio::state::VirtioNetState`] |
//! | `virtio-rng` | device id | [`crate::devices::virtio::state::VirtioRngState`] |
//! | `virtio-console` | device id | [`crate::devices::virtio::state::VirtioConsoleState`] |
//! | `disk-image` | disk id | [`disks::DiskImageState`]: how a writable disk was saved (clone, copy, in place, skipped) and the identity a restore checks |
//!
//! Each virtio section holds both the device's virtio-mmio transport
//! (slot, features, status, interrupt status, config space, queues) and
//! what it needs of its backend (disk: path, size, read-only; net: tap,
//! MAC; console: output). The device ids come from the saved
//! configuration; a restore refuses a snapshot whose configuration names
//! a device without a section.

pub mod background;
pub mod checkpoint;
pub mod compat;
pub mod disks;
pub mod fill;
pub mod load;
pub mod outputs;
pub mod restore;
pub mod save;

/// Instance name of VM-wide singleton sections.
pub const SINGLETON: &str = "0";
/// Instance name of COM1's section.
pub const COM1: &str = "com1";
/// Instance name of the CMOS RTC's section.
pub const CMOS: &str = "cmos";

/// Writes every section of a VM's captured state to `sink` (a snapshot's
/// state file or a migration stream): the one place that decides which
/// sections a VM's state consists of.
pub fn write_sections(
    state: &crate::vm::CapturedState,
    sink: &mut dyn stasis_snapshot::SectionSink,
) -> stasis_snapshot::Result<()> {
    use stasis_snapshot::add_section;
    for v in &state.vcpus {
        add_section(sink, &v.index.to_string(), false, v)?;
    }
    add_section(sink, SINGLETON, false, &state.irqchip)?;
    add_section(sink, SINGLETON, false, &state.pit)?;
    add_section(sink, SINGLETON, false, &state.clock)?;
    add_section(sink, COM1, false, &state.serial)?;
    add_section(sink, CMOS, false, &state.rtc)?;
    add_section(sink, SINGLETON, true, &state.vmgenid)?;
    for v in &state.virtio {
        v.write_to(sink)?;
    }
    Ok(())
}
