//! The control API's view of a VM: requests from the socket turned into
//! calls on [`VmControl`].

use std::time::{SystemTime, UNIX_EPOCH};

use std::path::Path;

use stasis_api::{
    ActionResponse, ApiHandler, ApiRequest, ApiResponse, CpuInfo, DeviceInfo, JobAccepted,
    MemoryFillInfo, MigrateRequest, SnapshotRequest, VmInfo, VmState,
};
use stasis_vmm::jobs::{CancelError, FailureKind, JobFailure, Jobs};
use stasis_vmm::persist::disks::DiskMode;
use stasis_vmm::persist::save::{self, SnapshotError, SnapshotMode, SnapshotOptions};
use stasis_vmm::{RunState, VmControl, VmError};

/// Serves one VM's API.
pub struct VmApi {
    /// The VM.
    pub control: VmControl,
    /// The socket path, for `VmInfo`.
    pub socket: String,
    /// Its long operations.
    pub jobs: Jobs,
}

fn api_state(s: RunState) -> VmState {
    match s {
        RunState::Paused => VmState::Paused,
        RunState::Stopping => VmState::Stopping,
        RunState::Created | RunState::Running => VmState::Running,
    }
}

/// The devices of `config` in slot order (disks, nets, rngs, consoles).
fn devices(config: &stasis_config::VmConfig) -> Vec<DeviceInfo> {
    let dev = |kind: &str, id: &str, backend: String| DeviceInfo {
        kind: kind.to_string(),
        id: id.to_string(),
        backend,
    };
    let disks = config.disk.iter().map(|d| {
        let ro = if d.readonly { " (read-only)" } else { "" };
        dev("disk", &d.id, format!("{}{ro}", d.path.display()))
    });
    let nets = config
        .net
        .iter()
        .map(|n| dev("net", &n.id, format!("tap {}", n.tap)));
    let rngs = config
        .rng
        .iter()
        .map(|r| dev("rng", &r.id, "getrandom".into()));
    let consoles = config
        .console
        .iter()
        .map(|c| dev("console", &c.id, c.output.to_string()));
    disks.chain(nets).chain(rngs).chain(consoles).collect()
}

impl VmApi {
    fn info(&self) -> VmInfo {
        let d = self.control.description();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        VmInfo {
            name: d.config.name.clone(),
            state: api_state(self.control.state()),
            pid: std::process::id(),
            vcpus: d.config.vcpus,
            memory_mib: d.config.memory_mib,
            kernel: d.config.kernel.display().to_string(),
            boot_protocol: d.boot_protocol.clone(),
            api_socket: self.socket.clone(),
            started_at_unix_ms: d.created_unix_ms,
            uptime_ms: now.saturating_sub(d.created_unix_ms),
            stasis_version: env!("CARGO_PKG_VERSION").to_string(),
            // The disks' current images (a checkpoint may have moved
            // them onto overlays).
            devices: devices(&self.control.current_config()),
            cpu: Some(CpuInfo {
                model: d.config.cpu_spec().to_string(),
                vendor: d.cpu_vendor.clone(),
                features: d.cpu.features.clone(),
                added_by_host: d.cpu.added_by_host.clone(),
                xcr0: d.cpu.xcr0,
                tsc_khz: d.tsc_khz,
            }),
            memory_fill: self.control.memory_fill().map(|f| MemoryFillInfo {
                resident: f.resident,
                total_bytes: f.total_bytes,
                filled_bytes: f.filled_bytes,
                faults: f.faults,
                fault_fills: f.fault_fills,
                prefetched_blocks: f.prefetched_blocks,
                zero_blocks: f.zero_blocks,
                resident_us: f.resident_ms.map(|ms| (ms * 1e3) as u64),
                error: f.error,
            }),
        }
    }
}

/// 409 when the request does not fit the VM's state, 500 otherwise.
fn error_response(e: &VmError) -> ApiResponse {
    let status = match e {
        VmError::BadState { .. } | VmError::Busy { .. } => 409,
        _ => 500,
    };
    ApiResponse::error(status, e.to_string())
}

/// What kind of failure a snapshot error is, for the job and its status.
fn snapshot_failure(e: SnapshotError) -> JobFailure {
    let kind = match &e {
        e if e.is_cancelled() => FailureKind::Cancelled,
        SnapshotError::Vm(VmError::BadState { .. } | VmError::Busy { .. }) => FailureKind::Conflict,
        SnapshotError::Format(
            stasis_snapshot::Error::RefuseOverwrite { .. }
            | stasis_snapshot::Error::NoParent { .. }
            | stasis_snapshot::Error::Parent { .. },
        )
        | SnapshotError::Background(_)
        | SnapshotError::DiskRefused(_) => FailureKind::BadRequest,
        _ => FailureKind::Internal,
    };
    JobFailure {
        kind,
        message: e.to_string(),
    }
}

fn failure_response(f: &JobFailure) -> ApiResponse {
    let status = match f.kind {
        FailureKind::BadRequest => 400,
        FailureKind::Conflict | FailureKind::Cancelled => 409,
        FailureKind::Internal => 500,
    };
    ApiResponse::error(status, f.message.clone())
}

/// The answer to a request that started a job: `202` with its id when
/// `detach`, else its result once it ends.
fn answer_job(
    started: Result<std::sync::Arc<stasis_vmm::jobs::Job>, stasis_vmm::jobs::JobBusy>,
    detach: bool,
) -> ApiResponse {
    let job = match started {
        Ok(job) => job,
        Err(busy) => return ApiResponse::error(409, busy.to_string()),
    };
    if detach {
        let location = format!("/v1/jobs/{}", job.id());
        return ApiResponse::json(
            202,
            &JobAccepted {
                job: job.id(),
                location: location.clone(),
            },
        )
        .with_header("Location", location);
    }
    match job.wait() {
        Ok(report) => ApiResponse::ok(&report),
        Err(f) => failure_response(&f),
    }
}

impl VmApi {
    /// Every snapshot is a job, so that it shows in `GET /v1/jobs` and can
    /// be cancelled; without `detach` the request waits for it.
    fn snapshot(&self, req: &SnapshotRequest) -> ApiResponse {
        let control = self.control.clone();
        let (path, stop, parent) = (req.path.clone(), req.stop, req.parent.clone());
        let mode = match req.mode.as_deref().map(str::parse::<SnapshotMode>) {
            None => SnapshotMode::Auto,
            Some(Ok(m)) => m,
            Some(Err(e)) => return ApiResponse::error(400, e),
        };
        let disk_mode = match req.disk_mode.as_deref().map(str::parse::<DiskMode>) {
            None => DiskMode::default(),
            Some(Ok(m)) => m,
            Some(Err(e)) => return ApiResponse::error(400, e),
        };
        if let Err(e) = stasis_sandbox::check_writable("snapshot target", Path::new(&req.path)) {
            return ApiResponse::error(403, e);
        }
        let started = self
            .jobs
            .start("snapshot", req.path.clone(), move |progress| {
                let opts = SnapshotOptions {
                    stop,
                    mode,
                    disk_mode,
                    parent: parent.map(std::path::PathBuf::from),
                    checkpoint: None,
                    progress: Some(progress),
                };
                // Same field names as stasis_api::SnapshotResponse, which the
                // CLI decodes it into (the snapshot tests go through it).
                save::snapshot(&control, Path::new(&path), &opts)
                    .map_err(snapshot_failure)
                    .and_then(|report| {
                        serde_json::to_value(&report).map_err(|e| JobFailure {
                            kind: FailureKind::Internal,
                            message: format!("cannot encode the snapshot report: {e}"),
                        })
                    })
            });
        answer_job(started, req.detach)
    }

    /// A checkpoint (or its deletion) is a job like a snapshot.
    fn checkpoint(&self, req: &stasis_api::types::CheckpointRequest) -> ApiResponse {
        use stasis_vmm::persist::checkpoint;
        let control = self.control.clone();
        let store = match &req.store {
            Some(s) => std::path::PathBuf::from(s),
            None => match checkpoint::default_store(&control) {
                Ok(s) => s,
                Err(e) => return ApiResponse::error(400, e),
            },
        };
        if let Err(e) = checkpoint::check_name(&req.name) {
            return ApiResponse::error(400, e);
        }
        if !req.delete {
            if let Err(e) = stasis_sandbox::check_writable("checkpoint", &store.join(&req.name)) {
                return ApiResponse::error(403, e);
            }
        }
        let spec = checkpoint::CheckpointSpec {
            name: req.name.clone(),
            external: req.external,
        };
        let delete = req.delete;
        let what = if delete {
            "checkpoint-delete"
        } else {
            "checkpoint"
        };
        let started = self.jobs.start(what, req.name.clone(), move |progress| {
            let failed = |message: String| JobFailure {
                kind: FailureKind::Internal,
                message,
            };
            let report = if delete {
                checkpoint::revert::delete(&store, &spec.name, Some(&control)).map(|d| {
                    serde_json::json!({ "deleted": spec.name, "store": store, "kept_images": d.kept_images })
                })
            } else {
                checkpoint::take(&control, &store, &spec, Some(progress))
                    .and_then(|r| serde_json::to_value(&r).map_err(|e| e.to_string()))
            };
            report.map_err(failed)
        });
        answer_job(started, req.detach)
    }

    /// Checks the checkpoint, then ends the VM; the process starts it
    /// again from the checkpoint once it is gone (see [`crate::rollback`]).
    fn rollback(&self, req: &stasis_api::types::RollbackRequest) -> ApiResponse {
        use stasis_vmm::persist::checkpoint;
        let store = match &req.store {
            Some(s) => std::path::PathBuf::from(s),
            None => match checkpoint::default_store(&self.control) {
                Ok(s) => s,
                Err(e) => return ApiResponse::error(400, e),
            },
        };
        let vm = self.control.description().config.name.clone();
        // Everything that can be checked is, before the VM stops: the
        // checkpoint, its state, and that its disks can be brought back.
        let found = checkpoint::tree::CheckpointTree::load(&store).and_then(|t| {
            let t = t.ok_or_else(|| format!("{} has no checkpoints", store.display()))?;
            if t.vm != vm {
                return Err(format!(
                    "the checkpoint store {} belongs to VM '{}', not '{vm}'",
                    store.display(),
                    t.vm
                ));
            }
            checkpoint::revert::check(&t, &store, &req.name)?;
            let dir = store.join(&req.name);
            stasis_snapshot::SnapshotReader::open(&dir).map_err(|e| e.to_string())?;
            Ok(dir)
        });
        let dir = match found {
            Ok(d) => d,
            Err(e) => return ApiResponse::error(404, e),
        };
        if self
            .jobs
            .list()
            .iter()
            .any(|j| j.state == stasis_vmm::jobs::JobState::Running)
        {
            return ApiResponse::error(409, "a job is running; wait for it or cancel it first");
        }
        let config = &self.control.description().config;
        crate::rollback::request(crate::rollback::Pending {
            checkpoint_dir: dir,
            vm,
            socket: self.socket.clone().into(),
            serial: config.serial.to_string(),
            consoles: config
                .console
                .iter()
                .map(|c| (c.id.clone(), c.output.to_string()))
                .collect(),
        });
        self.control.request_stop();
        ApiResponse::json(
            202,
            &ActionResponse {
                state: VmState::Stopping,
                message: format!(
                    "rolling back to checkpoint '{}': the VM stops and starts again from it",
                    req.name
                ),
                quiesce_us: None,
            },
        )
    }

    /// A migration is a job like a snapshot; see [`crate::migration`] for
    /// the receiving side.
    fn migrate(&self, req: &MigrateRequest) -> ApiResponse {
        let started = match crate::migrate_job::prepare(req) {
            Ok(plan) => {
                let control = self.control.clone();
                self.jobs
                    .start("migrate", req.destination.clone(), move |progress| {
                        crate::migrate_job::run(&control, plan, progress)
                    })
            }
            Err(message) => return ApiResponse::error(400, message),
        };
        answer_job(started, req.detach)
    }

    fn job(&self, id: u64) -> ApiResponse {
        match self.jobs.get(id) {
            Some(job) => ApiResponse::ok(&job.status()),
            None => ApiResponse::error(404, format!("no job {id}")),
        }
    }

    fn cancel_job(&self, id: u64) -> ApiResponse {
        match self.jobs.cancel(id) {
            Ok(job) => ApiResponse::json(202, &job.status()),
            Err(e @ CancelError::NotFound(_)) => ApiResponse::error(404, e.to_string()),
            Err(e) => ApiResponse::error(409, e.to_string()),
        }
    }
}

impl ApiHandler for VmApi {
    fn handle(&self, req: ApiRequest) -> ApiResponse {
        match req {
            ApiRequest::GetVm => ApiResponse::ok(&self.info()),
            ApiRequest::Pause => match self.control.pause() {
                Ok(q) => ApiResponse::ok(&ActionResponse {
                    state: VmState::Paused,
                    message: "all vCPUs paused".into(),
                    quiesce_us: Some((q.total_ms * 1e3) as u64),
                }),
                Err(e) => error_response(&e),
            },
            ApiRequest::Resume => match self.control.resume() {
                Ok(()) => ApiResponse::action(VmState::Running, "vCPUs running"),
                Err(e) => error_response(&e),
            },
            ApiRequest::Shutdown => {
                self.control.request_stop();
                ApiResponse::action(VmState::Stopping, "VM is stopping")
            }
            ApiRequest::Snapshot(req) => self.snapshot(&req),
            ApiRequest::Migrate(req) => self.migrate(&req),
            ApiRequest::Checkpoint(req) => self.checkpoint(&req),
            ApiRequest::Rollback(req) => self.rollback(&req),
            ApiRequest::ListJobs => {
                ApiResponse::ok(&serde_json::json!({ "jobs": self.jobs.list() }))
            }
            ApiRequest::GetJob(id) => self.job(id),
            ApiRequest::CancelJob(id) => self.cancel_job(id),
            _ => ApiResponse::error(501, "not implemented"),
        }
    }
}
