//! State section payloads, through what a restore and a migration
//! destination do with them: the sections go into a
//! [`stasis_snapshot::SectionSet`] (as `Incoming::receive` collects them,
//! [`SectionSink::add_raw_section`]), are checked against what this build
//! knows ([`stasis_snapshot::check_known`] with [`restore::known_section`]),
//! and are decoded by [`restore::saved_vcpus`] (each vCPU checked against
//! the architectural invariants) and [`restore::state_from_sections`] for
//! a fixed configuration. Every payload is also decoded on its own with
//! [`stasis_snapshot::decode_section`] as the state type its name says
//! (every type `known_section` lists).
//!
//! The configuration has no disks and no network cards: for those,
//! `state_from_sections` opens the image or the tap on the host. Nothing
//! here needs `/dev/kvm`.
//!
//! Input: a header byte (bits 0-1: vCPUs - 1; bit 2: a virtio-rng `rng0`;
//! bit 3: a virtio-console `con0`), then records until the input ends:
//!
//! ```text
//! u8  tag: bit 7 optional; bits 0-6 index into KNOWN, else a name follows
//! [u8 length, name]   only if the index is past KNOWN
//! u8  version
//! u8  instance length, instance
//! u16 payload length (little endian, cut to what is left), payload
//! ```
//!
//! Seeds: `make-seeds.sh` turns the sections of snapshot fixtures into
//! records.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stasis_config::{ConsoleConfig, RngConfig, SerialConfig, VmConfig};
use stasis_snapshot::{decode_section, SectionSet, SectionSink, SectionSource, SectionState};
use stasis_vmm::cpu::state::VcpuState;
use stasis_vmm::devices::rtc::CmosRtcState;
use stasis_vmm::devices::serial::SerialDeviceState;
use stasis_vmm::devices::virtio::state::{
    VirtioBlkState, VirtioConsoleState, VirtioNetState, VirtioRngState,
};
use stasis_vmm::devices::vmgenid::VmGenIdState;
use stasis_vmm::persist::disks::DiskImageState;
use stasis_vmm::persist::restore;
use stasis_vmm::vm_state::{ClockState, IrqchipState, PitState};

/// Decodes `$payload` as the state type called `$name`, for each type.
macro_rules! decode_as {
    ($name:expr, $instance:expr, $version:expr, $payload:expr; $($t:ty),+ $(,)?) => {
        $(if $name == <$t as SectionState>::NAME {
            let _ = decode_section::<$t>($instance, $version, $payload).map_err(|e| e.to_string());
        })+
    };
}

/// The names of the sections a restore reads, by tag index.
const KNOWN: [&str; 12] = [
    VcpuState::NAME,
    IrqchipState::NAME,
    PitState::NAME,
    ClockState::NAME,
    SerialDeviceState::NAME,
    CmosRtcState::NAME,
    VmGenIdState::NAME,
    VirtioBlkState::NAME,
    VirtioNetState::NAME,
    VirtioRngState::NAME,
    VirtioConsoleState::NAME,
    DiskImageState::NAME,
];

/// The configuration the header byte chooses.
fn config(header: u8) -> VmConfig {
    let mut c = VmConfig::new("fuzz", "/nonexistent/vmlinux");
    c.vcpus = 1 + u32::from(header & 3);
    c.serial = SerialConfig::Null;
    if header & 4 != 0 {
        c.rng.push(RngConfig { id: "rng0".into() });
    }
    if header & 8 != 0 {
        c.console.push(ConsoleConfig { id: "con0".into(), output: SerialConfig::Null });
    }
    c
}

/// Takes `n` bytes (fewer if fewer are left) off the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    head
}

/// Takes one byte, or `None` at the end.
fn byte(data: &mut &[u8]) -> Option<u8> {
    take(data, 1).first().copied()
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let Some(header) = byte(&mut data) else { return };
    let config = config(header);
    let mut sections = SectionSet::new();
    while let Some(tag) = byte(&mut data) {
        let name = match KNOWN.get(usize::from(tag & 0x7f)) {
            Some(n) => n.to_string(),
            None => {
                let n = usize::from(byte(&mut data).unwrap_or(0));
                String::from_utf8_lossy(take(&mut data, n)).into_owned()
            }
        };
        let version = u32::from(byte(&mut data).unwrap_or(0));
        let n = usize::from(byte(&mut data).unwrap_or(0));
        let instance = String::from_utf8_lossy(take(&mut data, n)).into_owned();
        let len = take(&mut data, 2);
        let len = usize::from(len.first().copied().unwrap_or(0))
            | usize::from(len.get(1).copied().unwrap_or(0)) << 8;
        let payload = take(&mut data, len);

        decode_as!(name, &instance, version, payload;
            VcpuState, IrqchipState, PitState, ClockState, SerialDeviceState, CmosRtcState,
            VmGenIdState, VirtioBlkState, VirtioNetState, VirtioRngState, VirtioConsoleState,
            DiskImageState);
        // A refused section (bad name, sent twice, too many) ends a
        // migration; here it is left out and the rest goes on.
        let _ = sections.add_raw_section(&name, &instance, version, tag & 0x80 != 0, payload);
    }

    if let Err(e) = stasis_snapshot::check_known(sections.entries(), &restore::known_section) {
        let _ = e.to_string();
        return;
    }
    let state = restore::saved_vcpus(&sections, &config)
        .and_then(|vcpus| restore::state_from_sections(&sections, &config, vcpus, None));
    if let Err(e) = state {
        let _ = e.to_string();
    }
});
