//! A client that hangs up early must not kill the VM process, even when
//! `SIGPIPE` has its default action (which terminates the process). This
//! file holds a single test because it changes a process-wide setting.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use stasis_api::{ApiClient, ApiRequest, ApiResponse, ApiServer, VmState};

use common::TempDir;

#[test]
fn early_hangup_with_default_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_DFL installs no handler
    // code; this test binary runs this single test.
    let previous = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    assert_ne!(previous, libc::SIG_ERR);

    let dir = TempDir::new();
    let path = dir.join("vm1.sock");
    let handler = |req: ApiRequest| {
        if req == ApiRequest::GetVm {
            // Give the client time to hang up before the response is sent.
            thread::sleep(Duration::from_millis(200));
        }
        ApiResponse::action(VmState::Running, "x".repeat(100_000))
    };
    let handle = ApiServer::bind(&path)
        .unwrap()
        .serve(Arc::new(handler))
        .unwrap();

    for _ in 0..3 {
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"GET /v1/vm HTTP/1.1\r\n\r\n").unwrap();
        drop(s);
    }
    thread::sleep(Duration::from_millis(500));
    // Still alive, still serving.
    ApiClient::at(&path).ping().unwrap();
    drop(handle);
}
