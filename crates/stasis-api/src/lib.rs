//! The stasis control API: HTTP/1.1 with JSON bodies over a per-VM UNIX
//! socket.
//!
//! Every running VM (a `stasis run` process) listens on
//! `<runtime dir>/<name>.sock` (see [`runtime`]). Clients are
//! `curl --unix-socket` and the `stasis` subcommands, which use
//! [`ApiClient`]. The VM core answers requests by implementing
//! [`ApiHandler`] and passing it to [`ApiServer::serve`].
//!
//! The pieces, one job each:
//! - [`runtime`]: where sockets live and what a VM may be called;
//! - [`http`]: a minimal, strict HTTP/1.1 message layer;
//! - [`types`]: the JSON bodies;
//! - [`routes`]: the endpoint table, from (method, path, body) to an
//!   [`ApiRequest`];
//! - [`server`]: the socket server;
//! - [`client`]: the client.
//!
//! Nothing here needs KVM. The protocol is described for people in
//! `docs/API.md` and for tools in `docs/openapi.yaml`.

#![warn(missing_docs)]

pub mod client;
pub mod http;
pub mod routes;
pub mod runtime;
pub mod server;
mod sock;
pub mod types;

pub use client::{ApiClient, ClientError};
pub use routes::{ApiRequest, ApiResponse};
pub use runtime::{
    ensure_runtime_dir, list_vm_sockets, runtime_dir, socket_path_for, validate_vm_name,
    InvalidVmName, VmSocket,
};
pub use server::{ApiHandler, ApiServer, ApiServerHandle, ServerError};
pub use types::{
    ActionResponse, CpuInfo, DeviceInfo, EmptyRequest, ErrorBody, JobAccepted, JobInfo, JobList,
    JobState, MemoryFillInfo, MigrateRequest, PingResponse, SavedDiskInfo, SnapshotRequest,
    SnapshotResponse, TlsPaths, VmInfo, VmState,
};
