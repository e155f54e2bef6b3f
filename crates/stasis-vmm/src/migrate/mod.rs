//! Moving a running VM to another stasis: the VM side of the migration
//! protocol (`stasis-migration`, docs/MIGRATION.md).
//!
//! * [`source`]: `stasis migrate`: the handshake, pre-copy rounds from the
//!   dirty log ([`crate::dirty`]) while the guest runs (live) or one copy
//!   while it is paused (warm), then the switchover: pause, last pages,
//!   state sections (written by [`crate::persist::write_sections`], as a
//!   snapshot writes them), disks handed over, and the VM ends only once
//!   the destination says it runs it. Any failure before that resumes the
//!   guest here as it was.
//! * [`destination`]: `stasis receive`: checks the VM before any memory
//!   moves, fills fresh guest memory from the batches, gathers the
//!   sections, and hands back what [`crate::Vm::arrive`] builds the VM
//!   from.
//! * [`pages`]: guest pages into batches and back.
//! * [`lanes`]: further connections that carry memory in parallel.
//! * [`postcopy`]: the destination runs the VM first and pulls the pages
//!   it still lacks.
//! * [`address`]: where a migration goes (`tcp:HOST:PORT`, `unix:PATH`).
//! * [`transport`]: the connection, and on a UNIX socket the hand-over
//!   of file descriptors (a local upgrade: memory files and taps go to
//!   the new process instead of being copied or reopened).

pub mod address;
pub mod destination;
pub mod lanes;
pub mod pages;
pub mod postcopy;
pub mod source;
pub mod transport;

use std::time::Duration;

pub use address::MigrationAddress;
pub use transport::{MigrationListener, MigrationStream};

/// How long a connection may stall (no byte read or written) before the
/// migration fails: a dead peer or a cut link is found out in this time,
/// and it bounds how long a paused source waits for the destination's
/// confirmation after sending all state.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

/// The software both sides name in the handshake.
pub fn software() -> String {
    format!("stasis {}", env!("CARGO_PKG_VERSION"))
}

/// How memory moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// Pre-copy rounds while the guest runs, then a short pause for what
    /// it wrote last.
    #[default]
    Live,
    /// The guest is paused for the whole transfer.
    Warm,
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "live" => Ok(Self::Live),
            "warm" => Ok(Self::Warm),
            _ => Err(format!(
                "unknown migration mode '{s}' (expected live or warm)"
            )),
        }
    }
}

impl std::fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Live => "live",
            Self::Warm => "warm",
        })
    }
}

/// Why a migration failed. Before switchover the source VM runs on in
/// every case.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The stream or the peer failed (connection, protocol, refusal).
    #[error(transparent)]
    Protocol(#[from] stasis_migration::Error),
    /// The VM could not do what the migration needed.
    #[error(transparent)]
    Vm(#[from] crate::VmError),
    /// Asked to stop (`DELETE /v1/jobs/ID`, Ctrl-C).
    #[error("migration cancelled")]
    Cancelled,
    /// Pre-copy did not converge within the limits.
    #[error("{0}")]
    NotConverged(String),
    /// Something this host cannot do or a local failure.
    #[error("{0}")]
    Local(String),
    /// Post-copy failed after the destination ran the VM: it is lost (the
    /// source has ended it).
    #[error("the VM is lost: {0}")]
    PostcopyLost(String),
}

impl From<stasis_snapshot::Error> for MigrateError {
    fn from(e: stasis_snapshot::Error) -> Self {
        match e {
            stasis_snapshot::Error::Cancelled => MigrateError::Cancelled,
            e => MigrateError::Local(e.to_string()),
        }
    }
}

/// One pass over memory, as the report gives it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundReport {
    /// 1 = all of memory; the last round is the one while paused.
    pub round: u32,
    /// Pages sent (zero pages included: they travel as an entry only).
    pub pages: u64,
    /// Of them, pages of zeros.
    pub zero_pages: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// How long it took, in ms.
    pub ms: f64,
    /// Whether the guest was paused during it.
    pub paused: bool,
}

/// What a finished migration did (the job's result on the source).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MigrationReport {
    /// Where the VM went.
    pub destination: String,
    /// `live` or `warm`, or `local` when guest memory was handed over as
    /// files (a local upgrade: only state was sent).
    pub mode: String,
    /// From the pause on the source until the destination said the VM
    /// runs there, in ms.
    pub downtime_ms: f64,
    /// The whole migration, in ms.
    pub total_ms: f64,
    /// Bytes sent, all frames.
    pub bytes_sent: u64,
    /// Bytes of state sections.
    pub state_bytes: u64,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Each pass over memory.
    pub rounds: Vec<RoundReport>,
    /// The highest vCPU throttle auto-converge applied, in percent.
    pub throttle_percent: u32,
    /// The destination's software.
    pub destination_software: String,
    /// Bytes sent on each connection (`--connections`), the first one
    /// first.
    #[serde(default)]
    pub bytes_per_connection: Vec<u64>,
    /// Post-copy: pages sent after the destination ran the VM (0 without
    /// post-copy).
    #[serde(default)]
    pub postcopy_pages: u64,
    /// Post-copy: ranges the destination asked for while they were
    /// missing.
    #[serde(default)]
    pub postcopy_requests: u64,
    /// Post-copy: from the destination running the VM to its last page,
    /// in ms.
    #[serde(default)]
    pub postcopy_ms: f64,
}
