//! The stasis on-disk snapshot format.
//!
//! A snapshot is a directory:
//!
//! * `manifest.json`: self-describing, checksummed, readable with `jq`
//!   ([`Manifest`], [`ManifestBody`]);
//! * `state.bin`: named, instance-keyed, versioned state sections, each
//!   8-byte aligned ([`SectionEntry`], [`SectionState`]);
//! * `memory.img`: the guest memory image, sparse (all-zero pages are
//!   holes), each RAM region at a 2 MiB-aligned file offset so restore can
//!   `mmap(MAP_PRIVATE)` it ([`MemoryLayout`], [`MemoryRegion`]).
//!
//! [`SnapshotWriter`] writes one crash-safely (a temporary sibling
//! directory, renamed into place atomically on commit);
//! [`SnapshotReader`] opens one, checking everything before handing out
//! offsets, and [`SnapshotReader::verify`] checks every checksum.
//! [`summary`] and [`summary_json`] describe one for `stasis inspect`.
//!
//! The complete specification, the versioning rules and the compatibility
//! promise are in `docs/FORMAT.md`. This crate needs no KVM.

#![warn(missing_docs)]

mod blocks;
mod bounded;
mod chain;
mod crc;
mod error;
mod fsutil;
pub use fsutil::{checksum_file, file_kind, open_regular, OpenRegularError};
pub mod hex_bytes;
mod inspect;
mod manifest;
mod memory_image;
mod merge;
mod page_map;
mod progress;
mod reader;
mod section;
pub mod text;
mod working_set;
mod writer;

pub use blocks::FILL_BLOCK;
pub use chain::{parent_path, SnapshotChain, MAX_CHAIN_LEN};
pub use error::{Error, Result};
pub use inspect::{format_bytes, format_unix_ms, summary, summary_json, summary_of};
pub use manifest::{
    decode_manifest, encode_manifest, seal_manifest_body, validate_body, CpuInfo, CpuidEntry,
    GuestCpuRecord, Manifest, ManifestBody, MemoryLayout, MemoryRegion, PageMapRef, ParentRef,
    Producer, SectionEntry, MAX_SECTION_SIZE,
};
pub use memory_image::{ChunkSpan, MemoryImage, MemoryRegionSource, MemoryWriteStats};
pub use merge::merge_chain;
pub use page_map::{PageMap, PageSource};
pub use progress::{Progress, ProgressSnapshot};
pub use reader::{BadChunk, BadSection, SnapshotReader, VerifyReport};
pub use section::{
    add_section, check_known, decode_json, decode_section, encode_section, read_section,
    summarize_warnings, KnownSections, SectionSet, SectionSink, SectionSource, SectionState,
    SectionWarning,
};
pub use working_set::{
    read_working_set, write_working_set, WorkingSet, WORKING_SET_FILE, WORKING_SET_VERSION,
};
pub use writer::{remove_stale_temp_dirs, CommitStats, ManifestInput, SnapshotWriter};

/// The `format` value of every manifest.
pub const FORMAT_NAME: &str = "stasis-snapshot";
/// The `format_version` this build writes.
pub const FORMAT_VERSION: u32 = 1;
/// The `format_version` of diff snapshots (a parent and a page map).
pub const DIFF_FORMAT_VERSION: u32 = 2;
/// The newest `format_version` this build reads (it reads all older ones).
pub const MAX_FORMAT_VERSION: u32 = 2;
/// Name of a diff snapshot's page map file.
pub const PAGE_MAP_FILE: &str = "page-map.bin";

/// Name of the manifest file.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the state file this build writes.
pub const STATE_FILE: &str = "state.bin";
/// Name of the memory image this build writes.
pub const MEMORY_FILE: &str = "memory.img";

/// Page size of the memory image: the unit of hole detection.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a memory checksum chunk.
pub const CHUNK_SIZE: u64 = 2 << 20;
/// Alignment of every region's file offset in the memory image.
pub const REGION_ALIGN: u64 = 2 << 20;
/// Alignment of every section's offset in `state.bin`.
pub const SECTION_ALIGN: u64 = 8;
/// Largest `manifest.json` a reader accepts (a 1 TiB guest's is ~6 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 256 << 20;

/// Computes the CRC-32C (Castagnoli) of `len` zero bytes appended to a
/// stream whose CRC so far is `crc`, without hashing them; this is how a
/// hole contributes to a memory chunk's checksum.
pub fn crc32c_append_zeros(crc: u32, len: u64) -> u32 {
    crc::append_zeros(crc, len)
}
