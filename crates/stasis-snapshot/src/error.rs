//! The one error type of this crate.
//!
//! Every variant's message is meant to be shown to a person as it is: it
//! names the file, field, section or chunk concerned.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong writing, reading or checking a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation failed; `context` says which one and on what path.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "writing memory.img at offset 0x200000".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The snapshot directory itself does not exist.
    #[error("{}: no such snapshot directory{}", dir.display(), hint)]
    DirMissing {
        /// The directory that was asked for.
        dir: PathBuf,
        /// Extra advice, e.g. about an interrupted replacement (may be empty).
        hint: String,
    },

    /// `manifest.json` is not in the snapshot directory.
    #[error("{}: manifest.json is missing (not a stasis snapshot, or an unfinished one)", dir.display())]
    ManifestMissing {
        /// The snapshot directory.
        dir: PathBuf,
    },

    /// `manifest.json` could not be parsed as JSON at all.
    #[error("manifest.json is truncated or not JSON: {0}")]
    ManifestNotJson(String),

    /// `manifest.json` is JSON, but not a stasis snapshot manifest.
    #[error("not a stasis snapshot: {0}")]
    NotASnapshot(String),

    /// The snapshot was written by a newer stasis with a newer format.
    #[error(
        "snapshot format version {found} is newer than this stasis supports (max {max}); upgrade stasis"
    )]
    FormatTooNew {
        /// The `format_version` found in the manifest.
        found: u64,
        /// The highest version this build reads.
        max: u32,
    },

    /// The manifest's outer fields are present but malformed.
    #[error("manifest.json is invalid: {0}")]
    ManifestInvalid(String),

    /// The manifest body's bytes do not match `body_crc32c`.
    #[error("manifest.json is corrupt: checksum mismatch (recorded {recorded:08x}, computed {computed:08x})")]
    ManifestChecksum {
        /// The checksum recorded in the manifest.
        recorded: u32,
        /// The checksum of the body bytes as found.
        computed: u32,
    },

    /// The manifest body did not parse into the expected structure.
    #[error("manifest.json body does not parse: {0}")]
    ManifestBody(String),

    /// A manifest field has a value that is impossible or inconsistent.
    #[error("invalid snapshot manifest: {field}: {detail}")]
    Invalid {
        /// The field, in a jq-like path, e.g. `memory.regions[1].file_offset`.
        field: String,
        /// What is wrong with it.
        detail: String,
    },

    /// A file the manifest refers to is missing.
    #[error("{}: {file} is missing", dir.display())]
    FileMissing {
        /// The snapshot directory.
        dir: PathBuf,
        /// The file name, e.g. `memory.img`.
        file: String,
    },

    /// A file of the snapshot is a link, a FIFO, a device or a directory.
    #[error("{file}: {detail}")]
    NotRegularFile {
        /// The file name, e.g. `state.bin`.
        file: String,
        /// What it is instead.
        detail: String,
    },

    /// A file has a different size than the manifest records.
    #[error(
        "{file} is {actual} bytes but the manifest records {expected} (truncated or replaced?)"
    )]
    FileSize {
        /// The file name, e.g. `memory.img`.
        file: String,
        /// The size recorded in the manifest.
        expected: u64,
        /// The size found on disk.
        actual: u64,
    },

    /// A section's bytes do not match its recorded checksum.
    #[error("section '{name}'/'{instance}' is corrupt: checksum mismatch (recorded {recorded:08x}, computed {computed:08x})")]
    SectionChecksum {
        /// Section name.
        name: String,
        /// Section instance.
        instance: String,
        /// The checksum recorded in the manifest.
        recorded: u32,
        /// The checksum of the bytes found in `state.bin`.
        computed: u32,
    },

    /// A section's payload could not be decoded into its state struct.
    #[error("section '{name}'/'{instance}' version {version} does not decode: {detail}")]
    SectionDecode {
        /// Section name.
        name: String,
        /// Section instance.
        instance: String,
        /// The version recorded for it.
        version: u32,
        /// What went wrong.
        detail: String,
    },

    /// A required section is not known to this build.
    #[error("snapshot needs section '{name}'/'{instance}' version {version}, which this stasis does not know")]
    UnknownSection {
        /// Section name.
        name: String,
        /// Section instance.
        instance: String,
        /// The version recorded for it.
        version: u32,
    },

    /// A required section has a version newer than this build supports.
    #[error("snapshot needs section '{name}'/'{instance}' version {version}, but this stasis reads it only up to version {max}; upgrade stasis")]
    SectionTooNew {
        /// Section name.
        name: String,
        /// Section instance.
        instance: String,
        /// The version recorded for it.
        version: u32,
        /// The highest version this build reads.
        max: u32,
    },

    /// A section was added twice, or with a bad name or instance.
    #[error("bad section '{name}'/'{instance}': {detail}")]
    BadSection {
        /// Section name.
        name: String,
        /// Section instance.
        instance: String,
        /// What is wrong.
        detail: String,
    },

    /// Guest memory handed to the writer is unusable (misaligned, overlapping...).
    #[error("bad memory region '{name}': {detail}")]
    BadRegion {
        /// Region name.
        name: String,
        /// What is wrong.
        detail: String,
    },

    /// The writer was used out of order (e.g. memory written twice).
    #[error("snapshot writer misuse: {0}")]
    Usage(String),

    /// The operation was cancelled before it committed; nothing at the
    /// target path changed.
    #[error("cancelled; nothing at the target path changed")]
    Cancelled,

    /// The target path exists and is something other than a snapshot.
    #[error("{} exists and is not a stasis snapshot; refusing to overwrite", dir.display())]
    RefuseOverwrite {
        /// The target path.
        dir: PathBuf,
    },

    /// A diff snapshot's parent is missing, another snapshot, changed, or
    /// does not fit.
    #[error("snapshot {}: its parent {message}", child.display())]
    Parent {
        /// The child snapshot.
        child: PathBuf,
        /// What is wrong with its parent.
        message: String,
    },
    /// The target path's parent directory does not exist.
    #[error("cannot create snapshot {}: parent directory {} does not exist", dir.display(), parent.display())]
    NoParent {
        /// The target path.
        dir: PathBuf,
        /// Its parent.
        parent: PathBuf,
    },

    /// A memory chunk read for a restore does not match its checksum.
    #[error("{}: {chunk}", path.display())]
    ChunkChecksum {
        /// The memory file.
        path: PathBuf,
        /// The chunk, where it is, and both checksums.
        chunk: crate::BadChunk,
    },

    /// `verify` found damage; each line names a section or a memory chunk.
    #[error("{}: snapshot verification failed:\n{}", dir.display(), problems.join("\n"))]
    VerifyFailed {
        /// The snapshot that failed.
        dir: PathBuf,
        /// One message per damaged section or chunk.
        problems: Vec<String>,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds a closure that wraps an [`io::Error`] with context, for `map_err`.
pub(crate) fn io_ctx<S: Into<String>>(context: S) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Shorthand for an [`Error::Invalid`].
pub(crate) fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        detail: detail.into(),
    }
}
