//! The one error type of the protocol crate. Every message names what was
//! wrong, in terms a person running `stasis migrate` can act on.

use std::io;

/// Everything that can go wrong reading or writing a migration stream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed; `context` says while doing what.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The peer did not start with the stasis preamble: not a stasis
    /// migration stream (another program, or a wrong port).
    #[error("not a stasis migration stream (it began with {found})")]
    NotMigrationStream {
        /// The first bytes received, escaped.
        found: String,
    },
    /// The stream ended inside a frame.
    #[error("the stream ended inside {what}")]
    Truncated {
        /// Which part.
        what: String,
    },
    /// A frame claims more payload than any frame may carry.
    #[error("{kind} frame of {len} bytes is larger than the {max}-byte limit")]
    FrameTooLarge {
        /// The frame's kind.
        kind: String,
        /// The length it claims.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A frame's bytes do not match its checksum (damaged in transit).
    #[error("{kind} frame damaged: checksum mismatch (recorded {recorded:08x}, computed {computed:08x})")]
    FrameChecksum {
        /// The frame's kind.
        kind: String,
        /// Checksum in the frame.
        recorded: u32,
        /// Checksum of what arrived.
        computed: u32,
    },
    /// A frame header has fields this version does not define.
    #[error("bad frame header: {0}")]
    BadHeader(String),
    /// A frame kind this protocol version does not have.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A payload that does not decode as its kind says.
    #[error("{kind} frame: {message}")]
    Decode {
        /// The frame's kind.
        kind: String,
        /// What is wrong.
        message: String,
    },
    /// The two sides have no protocol version in common.
    #[error(
        "no protocol version in common: this side speaks {}..={}, the peer {}..={}",
        ours.0, ours.1, theirs.0, theirs.1
    )]
    NoCommonVersion {
        /// Our range.
        ours: (u32, u32),
        /// Theirs.
        theirs: (u32, u32),
    },
    /// Authentication failed or the two sides disagree on it.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peer refused (versions, the VM, ...) and said why.
    #[error("the destination refused: {reason}")]
    Refused {
        /// Its reason.
        reason: String,
    },
    /// The peer sent a frame that does not belong at this point.
    #[error("expected {expected}, the peer sent {got}")]
    Unexpected {
        /// What the protocol expects here.
        expected: String,
        /// What arrived.
        got: String,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an I/O error with context, for `map_err`.
pub(crate) fn io_ctx(context: &str) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        context: context.to_string(),
        source,
    }
}
