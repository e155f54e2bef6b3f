//! The JSON bodies of the control API.
//!
//! Bodies sent by clients reject unknown fields, so a typo is an error and
//! not a silently ignored option. Bodies sent by the server accept unknown
//! fields, so an older client keeps working against a newer VM that reports
//! more.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The run state of a VM, as the API reports it.
///
/// Serialized as a lowercase string: `"running"`, `"paused"`, `"stopping"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum VmState {
    /// The vCPUs are running.
    Running,
    /// The vCPUs are stopped; the VM can be resumed.
    Paused,
    /// The VM is shutting down; the process will exit.
    Stopping,
}

impl VmState {
    /// The state as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `GET /v1/vm` returns: a description of the running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM name (also the socket's file name without `.sock`).
    pub name: String,
    /// The current run state.
    pub state: VmState,
    /// The process id of the `stasis run` process.
    pub pid: u32,
    /// The number of vCPUs.
    pub vcpus: u32,
    /// The guest memory size in MiB.
    pub memory_mib: u64,
    /// The path of the kernel image the VM booted.
    pub kernel: String,
    /// The boot protocol used (for example `"linux"` or `"pvh"`).
    pub boot_protocol: String,
    /// The path of this control socket.
    pub api_socket: String,
    /// When the VM started, in milliseconds since the UNIX epoch.
    pub started_at_unix_ms: u64,
    /// How long the VM has been up, in milliseconds.
    pub uptime_ms: u64,
    /// The stasis version the VM runs.
    pub stasis_version: String,
    /// The VM's devices (virtio disks, network devices, entropy sources,
    /// consoles), in slot order. Absent from older servers.
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
    /// The guest's CPU: model and features. Absent from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuInfo>,
    /// A VM restored in background mode: how far its memory is filled.
    /// Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_fill: Option<MemoryFillInfo>,
}

/// How far a background restore has filled guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFillInfo {
    /// Whether all memory is resident (the fill is over).
    pub resident: bool,
    /// Bytes of guest memory.
    pub total_bytes: u64,
    /// Bytes filled from the snapshot so far (blocks of zeros excluded).
    pub filled_bytes: u64,
    /// Page faults the guest (or a device, or KVM) took on memory not
    /// yet filled.
    pub faults: u64,
    /// 2 MiB blocks filled because a fault asked for them.
    pub fault_fills: u64,
    /// Blocks of a recorded working set filled first.
    pub prefetched_blocks: u64,
    /// Blocks left to the kernel because they hold only zeros.
    pub zero_blocks: u64,
    /// Microseconds from the start of the fill until all was resident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_us: Option<u64>,
    /// Why the fill failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The CPU a VM's guest sees, as `GET /v1/vm` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// The CPU model with its feature changes, e.g. `x86-64-v2,+aes`.
    pub model: String,
    /// The CPU vendor (`AuthenticAMD`, `GenuineIntel`).
    pub vendor: String,
    /// Every feature the guest's CPUID advertises (Linux names).
    pub features: Vec<String>,
    /// Features the host's KVM shows the guest beyond the model (a KVM
    /// that cannot hide them).
    #[serde(default)]
    pub added_by_host: Vec<String>,
    /// The XSAVE components the guest may enable.
    pub xcr0: u64,
    /// The guest's TSC frequency in kHz.
    pub tsc_khz: u32,
}

/// One device of a VM, as `GET /v1/vm` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `disk`, `net`, `rng` or `console`.
    pub kind: String,
    /// The id the user gave it.
    pub id: String,
    /// What backs it on the host (image path, tap name, output), if
    /// anything.
    pub backend: String,
}

/// The body of every error response: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, in words meant for a person.
    pub error: String,
}

/// What the actions (`pause`, `resume`, `shutdown`) return on success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionResponse {
    /// The VM state after the action.
    pub state: VmState,
    /// What happened, in words meant for a person.
    pub message: String,
    /// For a pause: microseconds from the request until every vCPU, device
    /// thread and host input was at its safe point (0 when the VM was
    /// paused already). Absent for other actions and from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce_us: Option<u64>,
}

/// What `GET /v1/ping` returns: `{"ok": true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResponse {
    /// Always `true`.
    pub ok: bool,
}

/// The request body the actions accept: nothing, or the empty object `{}`.
///
/// It rejects any field, so a future option sent to a VM that does not know
/// it fails loudly instead of being ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> VmInfo {
        VmInfo {
            name: "vm1".into(),
            state: VmState::Paused,
            pid: 42,
            vcpus: 2,
            memory_mib: 512,
            kernel: "/boot/vmlinux".into(),
            boot_protocol: "pvh".into(),
            api_socket: "/run/stasis/vm1.sock".into(),
            started_at_unix_ms: 1_700_000_000_000,
            uptime_ms: 1234,
            stasis_version: "0.1.0".into(),
            devices: Vec::new(),
            cpu: None,
            memory_fill: None,
        }
    }

    #[test]
    fn vm_info_json_shape() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(
            v,
            json!({
                "name": "vm1", "state": "paused", "pid": 42, "vcpus": 2,
                "memory_mib": 512, "kernel": "/boot/vmlinux", "boot_protocol": "pvh",
                "api_socket": "/run/stasis/vm1.sock",
                "started_at_unix_ms": 1_700_000_000_000u64, "uptime_ms": 1234,
                "stasis_version": "0.1.0", "devices": []
            })
        );
        let back: VmInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn vm_info_tolerates_new_fields() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["migration"] = json!({"state": "none"});
        let back: VmInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn vm_info_from_an_older_server_without_devices() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v.as_object_mut().unwrap().remove("devices");
        let back: VmInfo = serde_json::from_value(v).unwrap();
        assert!(back.devices.is_empty());
    }

    #[test]
    fn states_are_lowercase() {
        for (state, s) in [
            (VmState::Running, "running"),
            (VmState::Paused, "paused"),
            (VmState::Stopping, "stopping"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), json!(s));
            assert_eq!(state.to_string(), s);
            assert_eq!(serde_json::from_value::<VmState>(json!(s)).unwrap(), state);
        }
        assert!(serde_json::from_value::<VmState>(json!("Running")).is_err());
    }

    #[test]
    fn empty_request_rejects_fields() {
        assert!(serde_json::from_str::<EmptyRequest>("{}").is_ok());
        let err = serde_json::from_str::<EmptyRequest>(r#"{"force":true}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `force`"), "{err}");
    }
}

/// The body of `PUT /v1/vm/checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// The checkpoint's name (1-64 letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// Freeze every disk and continue on new qcow2 overlays instead of
    /// qcow2 internal snapshots and reflink clones.
    #[serde(default)]
    pub external: bool,
    /// The checkpoint store; by default `<vm>.checkpoints` beside the
    /// VM's first writable disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// Delete checkpoint `name` instead of taking it.
    #[serde(default)]
    pub delete: bool,
    /// Answer at once with `202` and a job id.
    #[serde(default)]
    pub detach: bool,
}

/// The body of `PUT /v1/vm/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The checkpoint to go back (or forward) to.
    pub name: String,
    /// The checkpoint store; by default the VM's (see
    /// [`CheckpointRequest::store`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// The body of `PUT /v1/vm/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot directory. Its parent must exist; an older snapshot
    /// there is replaced atomically once the new one is durable.
    pub path: String,
    /// End the VM once the snapshot is durable (suspend).
    #[serde(default)]
    pub stop: bool,
    /// Answer at once with `202` and a job id instead of waiting for the
    /// snapshot (`GET /v1/jobs/ID` follows it).
    #[serde(default)]
    pub detach: bool,
    /// How memory is copied: `background` (copy-on-write while the guest
    /// runs; refused where the VM cannot), `stop-copy` (the guest stays
    /// paused while memory is copied) or `auto` (the default: background
    /// where possible, the response's `mode_note` says why not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// What a live snapshot does with each writable disk: `clone` (the
    /// default: a reflink clone into the snapshot, refused on filesystems
    /// without reflinks), `copy` (a full copy while the guest is paused)
    /// or `skip` (unsafe: the disk is not kept). A snapshot with `stop`
    /// leaves disks in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mode: Option<String>,
    /// Take a diff snapshot against this snapshot directory (a full
    /// snapshot or the newest of a chain): only pages that differ from it
    /// are stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// The body of `PUT /v1/vm/migrate`: send the running VM to a `stasis
/// receive` elsewhere. The VM ends here once the destination runs it; any
/// failure before that leaves it running here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Where the receiver listens: `tcp:HOST:PORT`, or `unix:PATH` for a
    /// local upgrade.
    pub destination: String,
    /// `live` (the default: pre-copy while the guest runs) or `warm` (the
    /// guest is paused for the whole transfer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Live: the longest pause to aim for, in ms (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Live: pre-copy rounds before giving up (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
    /// Live: seconds of pre-copy before giving up (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_time_s: Option<u64>,
    /// Live: slow the vCPUs down when the guest dirties memory faster than
    /// it can be sent (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<bool>,
    /// Memory batch compression: `none` (the default) or `zstd` (worth it
    /// on a link slower than the CPUs compress, about 1 GB/s per core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<String>,
    /// Live: switch to post-copy when pre-copy does not converge within
    /// the limits, instead of failing. After the switch a lost link loses
    /// the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<bool>,
    /// Live: switch to post-copy after this many pre-copy rounds (implies
    /// `postcopy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_after_rounds: Option<u32>,
    /// Connections memory travels on in parallel (default 1, at most 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// A file with the key shared with the receiver (`--psk`); read by
    /// the VMM, which must be able to open it (a confined VMM may open
    /// only its state directories: give `psk_hex` instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_file: Option<String>,
    /// The key itself, in hex, read by the client (`stasis migrate
    /// --psk FILE` sends this); wins over `psk_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_hex: Option<String>,
    /// Mutual TLS: this side's certificate, key (owner-only) and the CA of
    /// the receiver's certificate, as files the VMM reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsPaths>,
    /// Mutual TLS: the contents of those files, read by the client
    /// (`stasis migrate --tls-*` sends them); wins over `tls`'s files,
    /// which then only name them in messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_pem: Option<TlsPaths>,
    /// Send without authentication, to a receiver on a loopback address
    /// started with `--insecure`.
    #[serde(default)]
    pub insecure: bool,
    /// Answer at once with `202` and a job id.
    #[serde(default)]
    pub detach: bool,
}

/// Certificate files for mutual TLS (`stasis migrate --tls-cert ...`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// This side's certificate chain (PEM).
    pub cert: String,
    /// Its private key (PEM), readable by its owner only.
    pub key: String,
    /// The CA certificate the other side's certificate chains to (PEM).
    pub ca: String,
}

/// The answer to a request started as a job (`202 Accepted`); its
/// `Location` header names the job too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAccepted {
    /// The job's id.
    pub job: u64,
    /// Where to follow it: `/v1/jobs/ID`.
    pub location: String,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Still working.
    Running,
    /// Done; `result` holds what it produced.
    Succeeded,
    /// Stopped by an error; `error` says which.
    Failed,
    /// Stopped because it was cancelled; nothing it was making was put in
    /// place.
    Cancelled,
}

impl JobState {
    /// The state as it appears in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A job, as `GET /v1/jobs/ID` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// The job's id, unique within the VM's life.
    pub id: u64,
    /// What it does: `snapshot`.
    pub kind: String,
    /// What it works on (the snapshot directory).
    pub target: String,
    /// Where it is in its life.
    pub state: JobState,
    /// What it is doing now (once finished: what it did last).
    pub phase: String,
    /// Bytes of this phase done.
    pub done_bytes: u64,
    /// Bytes of this phase in all (0 when the phase moves no bytes).
    pub total_bytes: u64,
    /// Of `done_bytes`, those copied first because the guest was about to
    /// write them (background snapshots; absent from older servers).
    #[serde(default)]
    pub early_bytes: u64,
    /// Bytes per second in this phase so far, in MB/s (0 once finished).
    pub rate_mb_per_s: f64,
    /// Since it started (until it ended, once finished), in ms.
    pub elapsed_ms: f64,
    /// When it started, in ms since the UNIX epoch.
    pub started_unix_ms: u64,
    /// Whether `DELETE /v1/jobs/ID` can still stop it.
    pub cancellable: bool,
    /// Whether a cancel was asked for.
    pub cancel_requested: bool,
    /// The result once it succeeded (for a snapshot, a
    /// [`SnapshotResponse`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error once it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Figures of the job's own kind: for a migration its round, rate,
    /// dirty rate, expected downtime and bytes remaining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// What `GET /v1/jobs` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    /// The jobs the VM remembers (the running one and the last finished
    /// ones), newest first.
    pub jobs: Vec<JobInfo>,
}

/// The answer to a successful `PUT /v1/vm/snapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotResponse {
    /// The snapshot directory.
    pub path: String,
    /// How long the guest was paused, in milliseconds.
    pub pause_ms: f64,
    /// How long quiescing the VM took, in ms (absent from older servers).
    #[serde(default)]
    pub quiesce_ms: f64,
    /// From the request to a durable snapshot, in milliseconds.
    pub total_ms: f64,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Bytes of guest memory written (zero pages are holes).
    pub memory_written_bytes: u64,
    /// Size of the state sections in bytes.
    pub state_bytes: u64,
    /// Guest memory copied per second while paused, in MB/s.
    pub copy_mb_per_s: f64,
    /// Time spent making the files durable, in milliseconds.
    pub sync_ms: f64,
    /// Whether an older snapshot at the same path was replaced.
    pub replaced_existing: bool,
    /// Whether the VM was ended afterwards.
    pub stopped: bool,
    /// How memory was copied: `background` or `stop-copy` (absent from
    /// older servers, which always stopped the guest while copying).
    #[serde(default = "stop_copy")]
    pub mode: String,
    /// Why the snapshot was not taken in the background although it
    /// could have been asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode_note: Option<String>,
    /// Background: time spent write-protecting guest RAM inside the pause.
    #[serde(default)]
    pub protect_ms: f64,
    /// Background: from the resume to the last byte of memory copied.
    #[serde(default)]
    pub background_copy_ms: f64,
    /// Background: bytes copied ahead of their turn because the guest (or
    /// a device) was about to write them.
    #[serde(default)]
    pub early_copied_bytes: u64,
    /// Background: write-protect faults served.
    #[serde(default)]
    pub write_faults: u64,
    /// Time spent on the disks inside the pause (clones, copies), in ms.
    #[serde(default)]
    pub disk_ms: f64,
    /// Bytes of disk images copied inside the pause (`disk_mode` `copy`).
    #[serde(default)]
    pub disk_copied_bytes: u64,
    /// How each writable disk was saved.
    #[serde(default)]
    pub disks: Vec<SavedDiskInfo>,
    /// A diff snapshot's parent, as its manifest names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// How one writable disk was saved with a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDiskInfo {
    /// The disk's id.
    pub id: String,
    /// `clone`, `copy`, `in-place` or `skip`.
    pub saved: String,
    /// The image in the snapshot directory (clone, copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

fn stop_copy() -> String {
    "stop-copy".to_string()
}
