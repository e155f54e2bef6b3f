//! What a migration destination (`stasis receive`) reads from the network,
//! through the calls it makes: [`stasis_migration::secure`] without
//! authentication (`--insecure`; with a key nothing is read before the
//! peer proved it), [`FrameReader::start`] and [`FrameReader::next_frame`]
//! (preamble, frame headers, checksums), the version handshake
//! ([`handshake::destination_hello`]), the VM description
//! ([`handshake::destination_check`], whose check runs
//! [`restore::configure`] on the sent configuration and parses the sent
//! CPU, as `Incoming::check` does before it asks KVM), then
//! [`Message::decode`] of every frame as `Incoming::receive` reads them:
//! memory batches ([`Message::memory_batch`], zstd ones decompressed),
//! sections into a [`SectionSet`], up to state-done; then the sections are
//! checked and decoded as the destination does ([`restore::saved_vcpus`],
//! and [`restore::state_from_sections`] when the VM has no disks and no
//! network cards, whose images and taps it would open on the host).
//! Guest memory is not written (the page receiver needs a VM's memory).
//!
//! Input: a mode byte, then the stream. Bit 0 clear: the rest is the
//! stream as it comes off the wire (authentication hello, preamble,
//! frames). Bit 0 set: the rest is records `u8 kind, u16 length (little
//! endian), payload`, which the source's own writer ([`FrameWriter`]) turns
//! into the stream, checksums right, so that the fuzzer reaches the
//! messages. Bit 1 set: no handshake, frames straight away (as a further
//! connection or post-copy reads them).
//!
//! Seeds: `make-seeds.sh` builds record streams from snapshot fixtures; a
//! capture of a real migration's source-to-destination bytes (`--insecure`
//! on loopback) is a raw seed once a 0x00 byte is put in front.

#![no_main]

use std::fmt::Display;
use std::io::BufReader;

use libfuzzer_sys::fuzz_target;
use stasis_migration::{
    handshake, secure, Auth, FrameKind, FrameReader, FrameWriter, Message, Role,
};
use stasis_snapshot::{CpuInfo, SectionSet, SectionSink, SectionSource};
use stasis_vmm::persist::restore::{self, RestoreOverrides};

/// An error as the message a user sees (its `Display` runs on the input).
fn text(e: impl Display) -> String {
    e.to_string()
}

/// The stream records stand for, written by the product's own writers.
fn framed(mut records: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    // A source's authentication hello: `secure` writes it, then fails to
    // read the (empty) peer's.
    let _ = secure(std::io::empty(), &mut wire, Role::Source, &Auth::None);
    let mut w = FrameWriter::start(wire).expect("writing to memory");
    while let [kind, lo, hi, rest @ ..] = records {
        let len = usize::from(u16::from_le_bytes([*lo, *hi]));
        let (payload, next) = rest.split_at(len.min(rest.len()));
        if let Some(kind) = FrameKind::from_u8(*kind) {
            w.write(kind, payload).expect("writing a small frame to memory");
        }
        records = next;
    }
    w.into_inner()
}

/// Receives `wire` as the destination does; the first error ends it.
fn receive(wire: &[u8], with_handshake: bool) -> Result<(), String> {
    let (r, w) = secure(wire, std::io::sink(), Role::Destination, &Auth::None).map_err(text)?;
    let mut w = FrameWriter::start(w).map_err(text)?;
    let mut r = FrameReader::start(BufReader::new(r)).map_err(text)?;
    let mut config = None;
    if with_handshake {
        handshake::destination_hello(&mut r, &mut w, "stasis-fuzz").map_err(text)?;
        handshake::destination_check(&mut r, &mut w, |d| {
            let c = restore::configure(&d.vm_config, &RestoreOverrides::default()).map_err(text)?;
            serde_json::from_value::<CpuInfo>(d.cpu.clone()).map_err(text)?;
            config = Some(c);
            Ok(())
        })
        .map_err(text)?;
    }
    let mut sections = SectionSet::new();
    let mut unpacked = Vec::new();
    while let Some(frame) = r.next_frame().map_err(text)? {
        let done = match Message::decode(&frame).map_err(text)? {
            m @ (Message::MemoryBatch(_) | Message::MemoryBatchZstd(_)) => {
                if let Some(batch) = m.memory_batch(&mut unpacked).map_err(text)? {
                    std::hint::black_box(batch.pages().count());
                }
                false
            }
            Message::Section(s) => {
                sections
                    .add_raw_section(s.name, s.instance, s.version, s.optional, s.bytes)
                    .map_err(text)?;
                false
            }
            Message::StateDone => true,
            _ => false,
        };
        r.recycle(frame);
        if done {
            break;
        }
    }
    stasis_snapshot::check_known(sections.entries(), &restore::known_section).map_err(text)?;
    let Some(config) = config else { return Ok(()) };
    let vcpus = restore::saved_vcpus(&sections, &config).map_err(text)?;
    if config.disk.is_empty() && config.net.is_empty() {
        restore::state_from_sections(&sections, &config, vcpus, None).map_err(text)?;
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let wire = if mode & 1 == 0 { rest.to_vec() } else { framed(rest) };
    let _ = receive(&wire, mode & 2 == 0);
});
