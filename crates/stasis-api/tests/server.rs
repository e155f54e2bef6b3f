//! The server and client over real UNIX sockets, with real threads.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use stasis_api::http::{self, MAX_BODY_BYTES, MAX_HEAD_BYTES};
use stasis_api::runtime::{ensure_private_dir, list_vm_sockets_in};
use stasis_api::{
    ApiClient, ApiRequest, ApiResponse, ApiServer, ApiServerHandle, ClientError, ServerError,
    VmState,
};

use common::{error_of, exchange, json, serve_vm, TempDir};

#[test]
fn every_endpoint_round_trips() {
    let dir = TempDir::new();
    let (vm, handle) = serve_vm(&dir, "vm1");
    let client = ApiClient::for_vm_in(dir.path(), "vm1").unwrap();
    assert_eq!(client.socket_path(), handle.path());

    client.ping().unwrap();

    let info = client.get_vm().unwrap();
    assert_eq!(info, vm.info());
    assert_eq!(info.state, VmState::Running);

    let paused = client.pause().unwrap();
    assert_eq!(paused.state, VmState::Paused);
    assert_eq!(paused.message, "all vCPUs paused");
    assert_eq!(client.get_vm().unwrap().state, VmState::Paused);

    match client.pause().unwrap_err() {
        ClientError::Api {
            name,
            status,
            message,
        } => {
            assert_eq!((name.as_str(), status), ("vm1", 409));
            assert_eq!(message, "VM is already paused");
        }
        other => panic!("unexpected {other:?}"),
    }

    assert_eq!(client.resume().unwrap().state, VmState::Running);
    assert_eq!(client.shutdown().unwrap().state, VmState::Stopping);
    assert_eq!(*vm.state.lock().unwrap(), VmState::Stopping);

    // The generic call, with and without a body.
    let (status, body) = client.request("GET", "/v1/vm", None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["state"], "stopping");
    let (status, body) = client
        .request("PUT", "/v1/vm/pause", Some(&json!({})))
        .unwrap();
    assert_eq!(status, 409);
    assert_eq!(body, json!({"error": "VM is stopping"}));
    let (status, body) = client.request("GET", "/v1/ping", None).unwrap();
    assert_eq!((status, body), (200, json!({"ok": true})));
}

#[test]
fn response_head_is_complete() {
    let dir = TempDir::new();
    let (_vm, handle) = serve_vm(&dir, "vm1");
    let mut stream = UnixStream::connect(handle.path()).unwrap();
    stream
        .write_all(b"GET /v1/ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    assert_eq!(
        raw,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\
         Connection: close\r\n\r\n{\"ok\":true}\n"
    );
}

#[test]
fn unknown_path_is_404() {
    let dir = TempDir::new();
    let (_vm, handle) = serve_vm(&dir, "vm1");
    let resp = exchange(handle.path(), b"GET /v1/nothing HTTP/1.1\r\n\r\n");
    assert_eq!(resp.status, 404);
    assert_eq!(error_of(&resp), "no endpoint at /v1/nothing");

    let client = ApiClient::at(handle.path());
    match client.call::<serde_json::Value>("GET", "/v1/nothing", None) {
        Err(ClientError::Api { status: 404, .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn wrong_method_is_405_with_allow() {
    let dir = TempDir::new();
    let (_vm, handle) = serve_vm(&dir, "vm1");
    let resp = exchange(handle.path(), b"DELETE /v1/vm HTTP/1.1\r\n\r\n");
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("Allow"), Some("GET"));
    assert!(error_of(&resp).contains("method DELETE is not allowed on /v1/vm"));

    let resp = exchange(handle.path(), b"GET /v1/vm/pause HTTP/1.1\r\n\r\n");
    assert_eq!(resp.status, 405);
    assert_eq!(resp.header("allow"), Some("PUT"));
}

#[test]
fn bad_json_is_400() {
    let dir = TempDir::new();
    let (vm, handle) = serve_vm(&dir, "vm1");
    let resp = exchange(
        handle.path(),
        b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 9\r\n\r\n{\"force\":",
    );
    assert_eq!(resp.status, 400);
    assert!(error_of(&resp).starts_with("invalid JSON request body"));

    let resp = exchange(
        handle.path(),
        b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 14\r\n\r\n{\"force\":true}",
    );
    assert_eq!(resp.status, 400);
    assert!(error_of(&resp).contains("unknown field `force`"));
    // Nothing happened to the VM.
    assert_eq!(*vm.state.lock().unwrap(), VmState::Running);

    // A malformed request line is a 400 too.
    let resp = exchange(handle.path(), b"GET  HTTP/1.1\r\n\r\n");
    assert_eq!(resp.status, 400);
}

#[test]
fn body_without_length_is_411() {
    let dir = TempDir::new();
    let (vm, handle) = serve_vm(&dir, "vm1");
    let resp = exchange(handle.path(), b"PUT /v1/vm/pause HTTP/1.1\r\n\r\n{}");
    assert_eq!(resp.status, 411);
    assert!(error_of(&resp).contains("Content-Length"));
    assert_eq!(*vm.state.lock().unwrap(), VmState::Running);

    // Without a body and without a length, a PUT is fine (curl -X PUT).
    let resp = exchange(handle.path(), b"PUT /v1/vm/pause HTTP/1.1\r\n\r\n");
    assert_eq!(resp.status, 200);
}

#[test]
fn invalid_length_is_400() {
    let dir = TempDir::new();
    let (_vm, handle) = serve_vm(&dir, "vm1");
    let resp = exchange(
        handle.path(),
        b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 2x\r\n\r\n{}",
    );
    assert_eq!(resp.status, 400);
    assert!(error_of(&resp).contains("invalid Content-Length"));
}

#[test]
fn chunked_is_501() {
    let dir = TempDir::new();
    let (vm, handle) = serve_vm(&dir, "vm1");
    let resp = exchange(
        handle.path(),
        b"PUT /v1/vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    );
    assert_eq!(resp.status, 501);
    assert!(error_of(&resp).contains("Transfer-Encoding \"chunked\" is not supported"));
    assert_eq!(*vm.state.lock().unwrap(), VmState::Running);
}

#[test]
fn expect_100_continue() {
    let dir = TempDir::new();
    let (vm, handle) = serve_vm(&dir, "vm1");
    let mut body = vec![b' '; 2000];
    body.extend_from_slice(b"{}");
    let mut stream = UnixStream::connect(handle.path()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "PUT /v1/vm/pause HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    )
    .unwrap();
    // The go-ahead comes before any body byte is sent.
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    assert_eq!(*vm.state.lock().unwrap(), VmState::Running);
    stream.write_all(&body).unwrap();
    let resp = http::read_response(&mut stream).unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(json(&resp)["state"], "paused");
}

#[test]
fn expect_100_continue_with_oversize_body_gets_413_without_go_ahead() {
    let dir = TempDir::new();
    let (_vm, handle) = serve_vm(&dir, "vm1");
    let mut stream = UnixStream::connect(handle.path()).unwrap();
    write!(
        stream,
        "PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        MAX_BODY_BYTES + 1
    )
    .unwrap();
    let resp = http::read_response(&mut stream).unwrap();
    assert_eq!(resp.status, 413);
}

#[test]
fn oversize_head_is_431() {
    let dir = TempDir::new();
    let (_vm, handle) = serve_vm(&dir, "vm1");
    let raw = format!(
        "GET /v1/vm HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(MAX_HEAD_BYTES)
    );
    let resp = exchange(handle.path(), raw.as_bytes());
    assert_eq!(resp.status, 431);
    assert!(error_of(&resp).contains("larger than 16384 bytes"));

    // Just under the limit is fine.
    let raw = format!(
        "GET /v1/vm HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(MAX_HEAD_BYTES - 100)
    );
    assert_eq!(exchange(handle.path(), raw.as_bytes()).status, 200);
}

#[test]
fn oversize_body_is_413_even_when_sent() {
    let dir = TempDir::new();
    let (_vm, handle) = serve_vm(&dir, "vm1");
    // The whole 2 MiB body is sent without waiting: the server answers
    // early and the client still reads that answer.
    let mut raw = format!(
        "PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        2 * MAX_BODY_BYTES
    )
    .into_bytes();
    raw.resize(raw.len() + 2 * MAX_BODY_BYTES, b' ');
    let resp = exchange(handle.path(), &raw);
    assert_eq!(resp.status, 413);
    assert!(error_of(&resp).contains("larger than the limit of 1048576 bytes"));

    // Through the client too.
    let client = ApiClient::at(handle.path());
    let big = json!({ "pad": "x".repeat(2 * MAX_BODY_BYTES) });
    let (status, _) = client.request("PUT", "/v1/vm/pause", Some(&big)).unwrap();
    assert_eq!(status, 413);

    // A body of exactly the limit is read (and then refused as JSON).
    let mut raw = format!(
        "PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY_BYTES
    )
    .into_bytes();
    raw.resize(raw.len() + MAX_BODY_BYTES - 1, b' ');
    raw.push(b'x');
    let resp = exchange(handle.path(), &raw);
    assert_eq!(resp.status, 400);
}

#[test]
fn socket_mode_is_0600() {
    let dir = TempDir::new();
    let path = dir.join("vm1.sock");
    let server = ApiServer::bind(&path).unwrap();
    let meta = fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    drop(server);
    assert!(
        !path.exists(),
        "dropping an unserved server removes the socket"
    );
}

#[test]
fn second_bind_on_live_socket_fails() {
    let dir = TempDir::new();
    let (_vm, handle) = serve_vm(&dir, "vm1");
    let err = ApiServer::bind(handle.path()).unwrap_err();
    assert!(
        matches!(err, ServerError::AlreadyInUse { ref path } if path == handle.path()),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("a VM already owns the control socket"),
        "{msg}"
    );
    // The first server is untouched.
    ApiClient::at(handle.path()).ping().unwrap();
}

#[test]
fn stale_socket_is_replaced() {
    let dir = TempDir::new();
    let path = dir.join("vm1.sock");
    // A socket file nobody listens on: what a killed VM leaves behind.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    match ApiClient::at(&path).ping().unwrap_err() {
        err @ ClientError::NotRunning { .. } => assert_eq!(
            err.to_string(),
            format!("VM vm1 is not running (stale socket {})", path.display())
        ),
        other => panic!("unexpected {other:?}"),
    }

    let handle = ApiServer::bind(&path)
        .unwrap()
        .serve(common::TestVm::new("vm1", &path))
        .unwrap();
    ApiClient::at(&path).ping().unwrap();
    drop(handle);
}

#[test]
fn non_socket_file_is_never_replaced() {
    let dir = TempDir::new();
    let path = dir.join("vm1.sock");
    fs::write(&path, "precious").unwrap();
    let err = ApiServer::bind(&path).unwrap_err();
    assert!(matches!(err, ServerError::NotASocket { .. }), "{err:?}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn too_long_path_is_refused() {
    let dir = TempDir::new();
    let path = dir.join(&format!("{}.sock", "v".repeat(110)));
    let err = ApiServer::bind(path).unwrap_err();
    assert!(
        matches!(err, ServerError::PathTooLong { max: 107, .. }),
        "{err:?}"
    );
}

/// Runs `f` on another thread; fails the test if it has not returned
/// within a minute (a hang detector, not a speed check: every wait in the
/// code under test is set far beyond it).
fn without_hanging<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what} hangs"))
}

/// A day: waits the code must never sit out.
const FOREVER: Duration = Duration::from_secs(86_400);

#[test]
fn shutdown_removes_the_socket() {
    let dir = TempDir::new();
    let path = dir.join("vm1.sock");
    let vm = common::TestVm::new("vm1", &path);
    let handle = ApiServer::bind(&path)
        .unwrap()
        .with_drain_timeout(FOREVER)
        .serve(vm)
        .unwrap();
    assert!(path.exists());
    // With no connection in flight, shutdown does not wait for one.
    let handle = without_hanging("shutdown without connections", move || {
        handle.shutdown();
        handle
    });
    assert!(!path.exists());
    handle.shutdown(); // idempotent
    drop(handle);

    let err = ApiClient::for_vm_in(dir.path(), "vm1")
        .unwrap()
        .ping()
        .unwrap_err();
    assert!(matches!(err, ClientError::NoSuchVm { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("no VM named vm1 (no socket at {})", path.display())
    );

    // Dropping the handle removes it as well.
    let (_vm, handle) = serve_vm(&dir, "vm2");
    let path = handle.path().to_path_buf();
    drop(handle);
    assert!(!path.exists());
}

#[test]
fn shutdown_leaves_a_newer_socket_alone() {
    let dir = TempDir::new();
    let (_vm, old) = serve_vm(&dir, "vm1");
    let path = old.path().to_path_buf();
    // Someone removed our socket and a new VM bound the same name.
    fs::remove_file(&path).unwrap();
    let (_vm2, new) = serve_vm(&dir, "vm1");
    drop(old);
    assert!(path.exists());
    ApiClient::at(&path).ping().unwrap();
    drop(new);
    assert!(!path.exists());
}

#[test]
fn handler_may_shut_the_server_down() {
    let dir = TempDir::new();
    let path = dir.join("vm1.sock");
    let slot: Arc<OnceLock<ApiServerHandle>> = Arc::new(OnceLock::new());
    let handler = {
        let slot = Arc::clone(&slot);
        move |req: ApiRequest| match req {
            ApiRequest::Shutdown => {
                slot.get().unwrap().shutdown();
                ApiResponse::action(VmState::Stopping, "bye")
            }
            _ => ApiResponse::error(501, "no"),
        }
    };
    // Were the handler to wait for connections in flight, its own among
    // them, it would wait for ever.
    let handle = ApiServer::bind(&path)
        .unwrap()
        .with_drain_timeout(FOREVER)
        .serve(Arc::new(handler))
        .unwrap();
    slot.set(handle).unwrap();
    let client = ApiClient::at(&path);
    let resp = without_hanging("a handler shutting its own server down", move || {
        client.shutdown()
    })
    .unwrap();
    assert_eq!(resp.message, "bye");
    assert!(!path.exists());
}

#[test]
fn handler_panic_is_500_and_server_survives() {
    let dir = TempDir::new();
    let path = dir.join("vm1.sock");
    let handler = |req: ApiRequest| match req {
        ApiRequest::Pause => panic!("test panic in handler"),
        _ => ApiResponse::action(VmState::Running, "fine"),
    };
    let handle = ApiServer::bind(&path)
        .unwrap()
        .serve(Arc::new(handler))
        .unwrap();
    let client = ApiClient::at(&path);
    match client.pause().unwrap_err() {
        ClientError::Api {
            status, message, ..
        } => {
            assert_eq!(status, 500);
            assert!(message.contains("panicked"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(client.resume().unwrap().message, "fine");
    drop(handle);
}

#[test]
fn a_stalled_client_does_not_block_others() {
    let dir = TempDir::new();
    let path = dir.join("vm1.sock");
    let vm = common::TestVm::new("vm1", &path);
    // The stalled client would hold a server that serves connections one
    // by one for a day.
    let handle = ApiServer::bind(&path)
        .unwrap()
        .with_timeouts(FOREVER, FOREVER)
        .serve(vm)
        .unwrap();
    let mut stalled = UnixStream::connect(&path).unwrap();
    stalled.write_all(b"GET /v1/vm HTTP/1.1\r\n").unwrap();
    let client = ApiClient::at(&path);
    without_hanging("pings beside a stalled client", move || {
        for _ in 0..5 {
            client.ping().unwrap();
        }
    });
    drop(stalled);
    drop(handle);
}

#[test]
fn slow_clients_time_out() {
    let dir = TempDir::new();
    let path = dir.join("vm1.sock");
    let vm = common::TestVm::new("vm1", &path);
    let handle = ApiServer::bind(&path)
        .unwrap()
        .with_timeouts(Duration::from_millis(500), Duration::from_millis(1000))
        .serve(vm)
        .unwrap();

    // One client sends half a head and stalls: 408 once a read stalls.
    let mut stalled = UnixStream::connect(&path).unwrap();
    stalled.write_all(b"GET /v1/vm HTTP/1.1\r\n").unwrap();
    let resp = http::read_response(&mut stalled).unwrap();
    assert_eq!(resp.status, 408);

    // Another trickles a byte at a time, faster than the per-read timeout
    // but never finishing: the overall deadline cuts it off (its writes
    // fail once the server has closed the connection).
    let cut_off = without_hanging("a trickling client", move || {
        let mut s = UnixStream::connect(&path).unwrap();
        for b in b"GET /v1/vm HTTP/1.1\r\nX-Slow: ".iter().cycle() {
            if s.write_all(&[*b]).is_err() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    });
    assert!(cut_off);
    drop(handle);
}

#[test]
fn too_many_connections_get_503() {
    let dir = TempDir::new();
    let path = dir.join("vm1.sock");
    let vm = common::TestVm::new("vm1", &path);
    let handle = ApiServer::bind(&path)
        .unwrap()
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(2))
        .serve(vm)
        .unwrap();
    // Fill every slot with an idle connection, and make sure each is
    // being served (so it counts) by waiting for a ping to get through.
    let idle: Vec<UnixStream> = (0..stasis_api::server::MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(200));
    let resp = exchange(&path, b"GET /v1/ping HTTP/1.1\r\n\r\n");
    assert_eq!(resp.status, 503);
    assert!(error_of(&resp).contains("too many"));
    drop(idle);
    // Slots free up as the idle connections close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match ApiClient::at(&path).ping() {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("server did not recover: {e}"),
        }
    }
    drop(handle);
}

#[test]
fn concurrent_clients() {
    let dir = TempDir::new();
    let (_vm, handle) = serve_vm(&dir, "vm1");
    let path = handle.path().to_path_buf();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            thread::spawn(move || {
                for _ in 0..20 {
                    assert_eq!(ApiClient::at(&path).get_vm().unwrap().name, "vm1");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn client_reports_missing_and_invalid_vms() {
    let dir = TempDir::new();
    let err = ApiClient::for_vm_in(dir.path(), "../x").unwrap_err();
    assert!(matches!(err, ClientError::InvalidName(_)), "{err:?}");
    assert!(err.to_string().starts_with("invalid VM name \"../x\""));

    let client = ApiClient::for_vm_in(dir.path(), "ghost").unwrap();
    let err = client.get_vm().unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no VM named ghost (no socket at {})",
            dir.join("ghost.sock").display()
        )
    );
}

#[test]
fn client_times_out_on_a_silent_server() {
    let dir = TempDir::new();
    let path = dir.join("mute.sock");
    // A listener that accepts but never answers.
    let listener = UnixListener::bind(&path).unwrap();
    let keeper = thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        thread::sleep(Duration::from_millis(800));
        drop(conn);
    });
    let err = ApiClient::at(&path)
        .with_timeout(Duration::from_millis(200))
        .ping()
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert_eq!(err.to_string(), "VM mute did not answer within 0.2s");
    keeper.join().unwrap();
}

#[test]
fn client_reports_garbage_as_protocol_error() {
    let dir = TempDir::new();
    let path = dir.join("odd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        conn.write_all(b"SSH-2.0-OpenSSH\r\n\r\n").unwrap();
    });
    let err = ApiClient::at(&path).ping().unwrap_err();
    assert!(matches!(err, ClientError::Protocol { .. }), "{err:?}");
    assert!(err
        .to_string()
        .starts_with("protocol error talking to VM odd"));
    server.join().unwrap();
}

#[test]
fn listing_sockets() {
    let dir = TempDir::new();
    let (_b, hb) = serve_vm(&dir, "beta");
    let (_a, ha) = serve_vm(&dir, "alpha");
    fs::write(dir.join("notes.txt"), "").unwrap();
    fs::write(dir.join("plain.sock"), "").unwrap(); // not a socket
    drop(UnixListener::bind(dir.join("stale.sock")).unwrap());
    drop(UnixListener::bind(dir.join(".hidden.sock")).unwrap());

    let names: Vec<String> = list_vm_sockets_in(dir.path())
        .unwrap()
        .into_iter()
        .map(|s| {
            assert_eq!(s.path, dir.join(&format!("{}.sock", s.name)));
            s.name
        })
        .collect();
    assert_eq!(names, ["alpha", "beta", "stale"]);
    assert!(list_vm_sockets_in(&dir.join("missing")).unwrap().is_empty());
    drop((ha, hb));
}

#[test]
fn private_dir_is_created_0700() {
    let dir = TempDir::new();
    let nested = dir.join("a/b/stasis");
    ensure_private_dir(&nested).unwrap();
    let mode = fs::metadata(&nested).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // Again is fine.
    ensure_private_dir(&nested).unwrap();
    // A file is not a directory.
    fs::write(dir.join("file"), "").unwrap();
    assert!(ensure_private_dir(&dir.join("file")).is_err());
}
