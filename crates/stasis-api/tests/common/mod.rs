//! Shared test helpers: temporary directories, a test VM handler, raw
//! exchanges over real UNIX sockets.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stasis_api::http::{self, ReceivedResponse};
use stasis_api::{
    ApiHandler, ApiRequest, ApiResponse, ApiServer, ApiServerHandle, VmInfo, VmState,
};

/// A private temporary directory, removed when dropped. Paths stay short
/// because UNIX socket paths are limited to 107 bytes.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = PathBuf::from(format!("/tmp/sapi-{}-{n}-{nanos:x}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A stand-in VM with a state machine like the real one: pause only when
/// running, resume only when paused, nothing once stopping.
pub struct TestVm {
    pub name: String,
    pub socket: PathBuf,
    pub state: Mutex<VmState>,
}

impl TestVm {
    pub fn new(name: &str, socket: &Path) -> Arc<TestVm> {
        Arc::new(TestVm {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            state: Mutex::new(VmState::Running),
        })
    }

    pub fn info(&self) -> VmInfo {
        VmInfo {
            name: self.name.clone(),
            state: *self.state.lock().unwrap(),
            pid: std::process::id(),
            vcpus: 2,
            memory_mib: 256,
            kernel: "/boot/vmlinux".into(),
            boot_protocol: "linux".into(),
            api_socket: self.socket.display().to_string(),
            started_at_unix_ms: 1_700_000_000_000,
            uptime_ms: 5,
            stasis_version: "0.1.0".into(),
            devices: Vec::new(),
            cpu: None,
            memory_fill: None,
        }
    }
}

impl ApiHandler for TestVm {
    fn handle(&self, req: ApiRequest) -> ApiResponse {
        let mut state = self.state.lock().unwrap();
        match (req, *state) {
            (ApiRequest::GetVm, _) => {
                drop(state);
                ApiResponse::ok(&self.info())
            }
            (_, VmState::Stopping) => ApiResponse::error(409, "VM is stopping"),
            (ApiRequest::Pause, VmState::Running) => {
                *state = VmState::Paused;
                ApiResponse::action(VmState::Paused, "all vCPUs paused")
            }
            (ApiRequest::Pause, _) => ApiResponse::error(409, "VM is already paused"),
            (ApiRequest::Resume, VmState::Paused) => {
                *state = VmState::Running;
                ApiResponse::action(VmState::Running, "vCPUs running")
            }
            (ApiRequest::Resume, _) => ApiResponse::error(409, "VM is not paused"),
            (ApiRequest::Shutdown, _) => {
                *state = VmState::Stopping;
                ApiResponse::action(VmState::Stopping, "VM is stopping")
            }
            (other, _) => ApiResponse::error(501, format!("{other:?} is not implemented")),
        }
    }
}

/// A served test VM named `name` in `dir`.
pub fn serve_vm(dir: &TempDir, name: &str) -> (Arc<TestVm>, ApiServerHandle) {
    let path = dir.join(&format!("{name}.sock"));
    let vm = TestVm::new(name, &path);
    let server = ApiServer::bind(&path).unwrap();
    let handle = server.serve(vm.clone()).unwrap();
    (vm, handle)
}

/// Sends `raw` bytes as they are and reads the response. A failed write
/// (the server answered early and closed) is not an error.
pub fn exchange(path: &Path, raw: &[u8]) -> ReceivedResponse {
    let mut stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(raw);
    http::read_response(&mut stream).unwrap()
}

/// The JSON body of a response.
pub fn json(resp: &ReceivedResponse) -> serde_json::Value {
    serde_json::from_slice(&resp.body).unwrap()
}

/// The `error` string of a response.
pub fn error_of(resp: &ReceivedResponse) -> String {
    json(resp)["error"].as_str().unwrap().to_string()
}
