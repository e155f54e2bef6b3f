//! The stasis migration protocol (docs/MIGRATION.md), on its own: no KVM,
//! no VM, only bytes. The VM core feeds it pages and state sections and
//! reads them back on the other side; this crate frames them, negotiates
//! the protocol version, and refuses anything malformed with an error that
//! names what is wrong, never allocating more than a frame's bounded size.
//!
//! * [`frame`]: a stream is a preamble, then frames (kind, length, payload,
//!   CRC-32C);
//! * [`message`]: what the frames carry (handshake, VM description,
//!   memory batches, state sections, switchover);
//! * [`compress`]: zstd-compressed memory batches;
//! * [`negotiate`]: which protocol version two sides speak;
//! * [`handshake`]: the opening of a migration on either side (versions,
//!   then the VM), before any memory moves;
//! * [`auth`]: under the frames, who the peer is (a pre-shared key, or
//!   mutual TLS: [`tls`]) and an encrypted, tamper-evident stream.
//!
//! Written here rather than taken from a crate: the protocol is stasis's
//! own (QEMU's and Cloud Hypervisor's streams are theirs), and a framing
//! this small is less code than adapting a general-purpose one.

pub mod auth;
pub mod compress;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod tls;

pub use auth::{secure, Auth, ChannelReader, ChannelWriter, Key, Role};
pub use compress::CompressedBatch;
pub use error::{Error, Result};
pub use frame::{FrameKind, FrameReader, FrameWriter, MAX_PAYLOAD, PREAMBLE};
pub use message::{
    is_zero, BatchBuilder, FilesOffer, Hello, Join, MemoryBatch, MemoryFile, Message, PageEntry,
    Refusal, RoundEnd, Section, VmDescription, Welcome, MAX_BATCH_PAGES, MAX_RANGES, PAGE_SIZE,
};
pub use tls::{TlsAuth, TlsFiles, TlsPem};

/// The newest protocol version this build speaks. Version 2 added the
/// files and files-ready frames (a local upgrade's hand-over of memory
/// files and taps), zstd-compressed memory batches, post-copy, and
/// further connections (join, connection-done, the welcome's session
/// token); everything else is as in version 1.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest protocol version this build still speaks. A receiver always
/// accepts at least the version before its newest one.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The first protocol version with frames 11-19 (files, compressed
/// batches, post-copy, further connections).
pub const FILES_PROTOCOL_VERSION: u32 = 2;

/// Picks the protocol version for a peer that speaks `peer_min..=peer_max`:
/// the newest both speak, or an error naming both ranges.
pub fn negotiate(peer_min: u32, peer_max: u32) -> Result<u32> {
    let lo = peer_min.max(MIN_PROTOCOL_VERSION);
    let hi = peer_max.min(PROTOCOL_VERSION);
    if peer_min > peer_max || lo > hi {
        return Err(Error::NoCommonVersion {
            ours: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            theirs: (peer_min, peer_max),
        });
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_common_version_is_chosen_or_both_ranges_are_named() {
        assert_eq!(negotiate(1, 1).unwrap(), 1, "version 1 peers still served");
        assert_eq!(negotiate(1, 7).unwrap(), PROTOCOL_VERSION);
        let e = negotiate(3, 4).unwrap_err().to_string();
        assert_eq!(
            e,
            "no protocol version in common: this side speaks 1..=2, the peer 3..=4"
        );
        assert!(negotiate(3, 2).is_err(), "an empty range");
        assert!(negotiate(0, 0).is_err());
    }
}
