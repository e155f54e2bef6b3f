//! The client side: talk to a running VM over its control socket.
//!
//! ```no_run
//! use stasis_api::ApiClient;
//!
//! let client = ApiClient::for_vm("web1")?;
//! let info = client.get_vm()?;
//! println!("{} is {}", info.name, info.state);
//! client.pause()?;
//! # Ok::<(), stasis_api::ClientError>(())
//! ```

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::http::{self, HttpError};
use crate::runtime::{self, InvalidVmName};
use crate::sock::NoSigPipe;
use crate::types::{
    ActionResponse, JobAccepted, JobInfo, JobList, MigrateRequest, PingResponse, SnapshotRequest,
    SnapshotResponse, VmInfo,
};

/// How long the client waits for the VM, by default (per read or write).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call to a VM failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The VM name is not valid.
    #[error(transparent)]
    InvalidName(#[from] InvalidVmName),
    /// "no VM named X (no socket at PATH)": there is no socket file, so no
    /// VM of that name runs (with this runtime directory).
    #[error("no VM named {name} (no socket at {path})")]
    NoSuchVm {
        /// The VM name.
        name: String,
        /// Where its socket would be.
        path: PathBuf,
    },
    /// "VM X is not running (stale socket PATH)": the socket file exists
    /// but nobody listens; the VM died without removing it.
    #[error("VM {name} is not running (stale socket {path})")]
    NotRunning {
        /// The VM name.
        name: String,
        /// The stale socket.
        path: PathBuf,
    },
    /// "cannot connect to VM X at PATH: ERROR": connecting failed for
    /// another reason, such as permission denied.
    #[error("cannot connect to VM {name} at {path}: {source}")]
    Connect {
        /// The VM name.
        name: String,
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// "VM X did not answer within N s": the VM accepted the connection but
    /// sent no response in time.
    #[error("VM {name} did not answer within {}s", timeout.as_secs_f64())]
    Timeout {
        /// The VM name.
        name: String,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// "protocol error talking to VM X: DETAIL": the exchange broke (I/O
    /// error, malformed HTTP, a body that is not the expected JSON).
    #[error("protocol error talking to VM {name}: {message}")]
    Protocol {
        /// The VM name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// "VM X answered STATUS: ERROR": the VM refused the request; `message`
    /// is the `error` string of its response.
    #[error("VM {name} answered {status}: {message}")]
    Api {
        /// The VM name.
        name: String,
        /// The HTTP status.
        status: u16,
        /// The server's `error` string.
        message: String,
    },
}

/// A client for one VM's control socket. Each call opens a connection,
/// sends one request and reads one response.
#[derive(Debug, Clone)]
pub struct ApiClient {
    name: String,
    path: PathBuf,
    timeout: Duration,
}

impl ApiClient {
    /// A client for the VM `name`, at its socket in the runtime directory.
    pub fn for_vm(name: &str) -> Result<ApiClient, ClientError> {
        Ok(ApiClient::named(name, runtime::socket_path_for(name)?))
    }

    /// A client for the VM `name`, at its socket in `dir`.
    pub fn for_vm_in(dir: &Path, name: &str) -> Result<ApiClient, ClientError> {
        Ok(ApiClient::named(name, runtime::socket_path_in(dir, name)?))
    }

    /// A client for the socket at `path`. The VM name used in messages is
    /// the file name without `.sock`.
    pub fn at(path: impl Into<PathBuf>) -> ApiClient {
        let path = path.into();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy())
            .map(|n| {
                n.strip_suffix(runtime::SOCKET_SUFFIX)
                    .unwrap_or(&n)
                    .to_string()
            })
            .unwrap_or_else(|| path.display().to_string());
        ApiClient::named(&name, path)
    }

    fn named(name: &str, path: PathBuf) -> ApiClient {
        ApiClient {
            name: name.to_string(),
            path,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets how long each read or write may wait for the VM.
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The VM name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// `GET /v1/ping`: succeeds if the VM's API answers.
    pub fn ping(&self) -> Result<(), ClientError> {
        self.call::<PingResponse>("GET", "/v1/ping", None)
            .map(|_| ())
    }

    /// `GET /v1/vm`: the VM's description.
    pub fn get_vm(&self) -> Result<VmInfo, ClientError> {
        self.call("GET", "/v1/vm", None)
    }

    /// `PUT /v1/vm/pause`: stops the vCPUs.
    pub fn pause(&self) -> Result<ActionResponse, ClientError> {
        self.call("PUT", "/v1/vm/pause", None)
    }

    /// `PUT /v1/vm/resume`: restarts the vCPUs.
    pub fn resume(&self) -> Result<ActionResponse, ClientError> {
        self.call("PUT", "/v1/vm/resume", None)
    }

    /// `PUT /v1/vm/shutdown`: stops the VM (the process exits).
    pub fn shutdown(&self) -> Result<ActionResponse, ClientError> {
        self.call("PUT", "/v1/vm/shutdown", None)
    }

    /// `PUT /v1/vm/snapshot`: writes a snapshot to `path` (on the VM's
    /// host) and, with `stop`, ends the VM once it is durable. Snapshots of
    /// large VMs take a while: the client's timeout is raised to at least
    /// an hour for this call.
    pub fn snapshot(&self, path: &str, stop: bool) -> Result<SnapshotResponse, ClientError> {
        self.take_snapshot(&SnapshotRequest {
            path: path.to_string(),
            stop,
            detach: false,
            mode: None,
            disk_mode: None,
            parent: None,
        })
    }

    /// `PUT /v1/vm/snapshot` with every field of the request (its `detach`
    /// is ignored: this waits for the snapshot).
    pub fn take_snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotResponse, ClientError> {
        let req = SnapshotRequest {
            detach: false,
            ..req.clone()
        };
        let body = serde_json::to_value(&req).map_err(|e| self.protocol(e.to_string()))?;
        let client = self
            .clone()
            .with_timeout(self.timeout.max(Duration::from_secs(3600)));
        client.call("PUT", "/v1/vm/snapshot", Some(&body))
    }

    /// `PUT /v1/vm/snapshot` with `detach`: starts the snapshot as a job
    /// and returns its id at once.
    pub fn snapshot_detached(&self, path: &str, stop: bool) -> Result<JobAccepted, ClientError> {
        self.start_snapshot(&SnapshotRequest {
            path: path.to_string(),
            stop,
            detach: true,
            mode: None,
            disk_mode: None,
            parent: None,
        })
    }

    /// `PUT /v1/vm/snapshot` with `detach` set: starts the snapshot as a
    /// job and returns its id at once.
    pub fn start_snapshot(&self, req: &SnapshotRequest) -> Result<JobAccepted, ClientError> {
        let req = SnapshotRequest {
            detach: true,
            ..req.clone()
        };
        let body = serde_json::to_value(&req).map_err(|e| self.protocol(e.to_string()))?;
        self.call("PUT", "/v1/vm/snapshot", Some(&body))
    }

    /// `PUT /v1/vm/migrate`: migrates the VM and waits until it runs on the
    /// destination (the answer is the migration report), or with
    /// `detach` starts the job and answers with its id.
    pub fn migrate(&self, req: &MigrateRequest) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::to_value(req).map_err(|e| self.protocol(e.to_string()))?;
        let client = self
            .clone()
            .with_timeout(self.timeout.max(Duration::from_secs(3600)));
        client.call("PUT", "/v1/vm/migrate", Some(&body))
    }

    /// `GET /v1/jobs`: the VM's jobs, newest first.
    pub fn jobs(&self) -> Result<Vec<JobInfo>, ClientError> {
        self.call::<JobList>("GET", "/v1/jobs", None)
            .map(|l| l.jobs)
    }

    /// `GET /v1/jobs/ID`.
    pub fn job(&self, id: u64) -> Result<JobInfo, ClientError> {
        self.call("GET", &format!("/v1/jobs/{id}"), None)
    }

    /// `DELETE /v1/jobs/ID`: asks the job to stop at its next safe point.
    pub fn cancel_job(&self, id: u64) -> Result<JobInfo, ClientError> {
        self.call("DELETE", &format!("/v1/jobs/{id}"), None)
    }

    /// Sends a request and decodes a 2xx response body as `T`. A non-2xx
    /// status is [`ClientError::Api`] with the server's `error` string.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ClientError> {
        let (status, value) = self.request(method, path, body)?;
        if !(200..300).contains(&status) {
            let message = match value.get("error").and_then(|e| e.as_str()) {
                Some(error) => error.to_string(),
                None if value.is_null() => http::reason_phrase(status).to_string(),
                None => value.to_string(),
            };
            return Err(ClientError::Api {
                name: self.name.clone(),
                status,
                message,
            });
        }
        serde_json::from_value(value)
            .map_err(|e| self.protocol(format!("unexpected response: {e}")))
    }

    /// Sends `method path` with an optional JSON body and returns the
    /// status and the JSON body (`null` if empty), whatever the status.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| self.protocol(format!("cannot encode the request body: {e}")))?;
        let mut stream = self.connect()?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .map_err(|e| self.protocol(e.to_string()))?;
        match http::write_request(&mut NoSigPipe(&stream), method, path, body.as_deref()) {
            Ok(()) => {}
            // The server may answer (say 413) and close before taking the
            // whole request; its answer is still there to read.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => return Err(self.io_error(e.into())),
        }
        let resp = http::read_response(&mut stream).map_err(|e| self.io_error(e))?;
        let value = if resp.body.iter().all(u8::is_ascii_whitespace) {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&resp.body)
                .map_err(|e| self.protocol(format!("the response body is not JSON: {e}")))?
        };
        Ok((resp.status, value))
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ClientError::NoSuchVm {
                name: self.name.clone(),
                path: self.path.clone(),
            },
            io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                name: self.name.clone(),
                path: self.path.clone(),
            },
            _ => ClientError::Connect {
                name: self.name.clone(),
                path: self.path.clone(),
                source,
            },
        })
    }

    fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol {
            name: self.name.clone(),
            message,
        }
    }

    fn io_error(&self, e: HttpError) -> ClientError {
        match e {
            HttpError::TimedOut => ClientError::Timeout {
                name: self.name.clone(),
                timeout: self.timeout,
            },
            e => self.protocol(e.to_string()),
        }
    }
}
