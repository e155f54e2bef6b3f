//! Drives the server with the real `curl --unix-socket`, as a person would.
//!
//! These tests need `curl` on PATH and fail (not skip) without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use stasis_api::VmState;

use common::{serve_vm, TempDir};

/// The curl binary on PATH; panics with a clear message if there is none.
fn curl() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("curl"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "curl is needed for this test but was not found on PATH; \
                 install it (for example `apt-get install curl`)"
            )
        })
}

/// Runs curl against the socket with `args`, adding `-sS` and a 10 s cap.
fn run_curl(socket: &Path, args: &[&str]) -> Output {
    let out = Command::new(curl())
        .arg("-sS")
        .arg("--max-time")
        .arg("10")
        .arg("--unix-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("cannot run curl");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs curl and returns (HTTP status, JSON body); the body comes first on
/// stdout, then a line with the status from `-w`.
fn curl_json(socket: &Path, args: &[&str]) -> (u16, Value) {
    let mut all = args.to_vec();
    all.extend(["-w", "\n%{http_code}"]);
    let out = run_curl(socket, &all);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (body, code) = stdout.trim_end().rsplit_once('\n').unwrap();
    (code.parse().unwrap(), serde_json::from_str(body).unwrap())
}

#[test]
fn curl_get_and_put() {
    let dir = TempDir::new();
    let (vm, handle) = serve_vm(&dir, "vm1");
    let sock = handle.path();

    // GET, and the output ends its line.
    let out = run_curl(sock, &["http://localhost/v1/vm"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("}\n"), "{text:?}");
    let info: stasis_api::VmInfo = serde_json::from_str(&text).unwrap();
    assert_eq!(info, vm.info());

    let (code, body) = curl_json(sock, &["http://localhost/v1/ping"]);
    assert_eq!((code, body), (200, serde_json::json!({"ok": true})));

    // PUT without a body (no Content-Length at all).
    let (code, body) = curl_json(sock, &["-X", "PUT", "http://localhost/v1/vm/pause"]);
    assert_eq!(code, 200);
    assert_eq!(body["state"], "paused");
    assert_eq!(*vm.state.lock().unwrap(), VmState::Paused);

    // PUT with `-d '{}'` (sent as a form by curl; the type is not checked).
    let (code, body) = curl_json(
        sock,
        &["-X", "PUT", "-d", "{}", "http://localhost/v1/vm/resume"],
    );
    assert_eq!(code, 200);
    assert_eq!(body["state"], "running");

    // Conflicts come back as JSON errors.
    let (code, body) = curl_json(sock, &["-X", "PUT", "http://localhost/v1/vm/resume"]);
    assert_eq!(code, 409);
    assert_eq!(body["error"], "VM is not paused");

    let (code, body) = curl_json(
        sock,
        &[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{}",
            "http://localhost/v1/vm/shutdown",
        ],
    );
    assert_eq!((code, body["state"].as_str()), (200, Some("stopping")));
}

#[test]
fn curl_errors() {
    let dir = TempDir::new();
    let (_vm, handle) = serve_vm(&dir, "vm1");
    let sock = handle.path();

    let (code, body) = curl_json(sock, &["http://localhost/v1/nope"]);
    assert_eq!(code, 404);
    assert_eq!(body["error"], "no endpoint at /v1/nope");

    // 405 carries Allow (see the head with -i).
    let out = run_curl(sock, &["-i", "-X", "POST", "http://localhost/v1/vm"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nAllow: GET\r\n"), "{text}");
    assert!(
        text.contains("\r\nContent-Type: application/json\r\n"),
        "{text}"
    );

    let (code, body) = curl_json(
        sock,
        &[
            "-X",
            "PUT",
            "-d",
            "{\"hard\":true}",
            "http://localhost/v1/vm/shutdown",
        ],
    );
    assert_eq!(code, 400);
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("unknown field `hard`"));
}

#[test]
fn curl_large_body_gets_100_continue_or_413_before_sending_it() {
    let dir = TempDir::new();
    let (vm, handle) = serve_vm(&dir, "vm1");
    let sock = handle.path();

    // Older curl sends `Expect: 100-continue` for bodies over 1 KiB, newer
    // curl (7.87 on) for bodies over 1 MiB; either way it then waits for
    // the go-ahead, by default a second, then sends the body anyway. Ask
    // for it explicitly so that every curl version takes this path, and
    // make curl wait 60 s: longer than its 10 s limit, so a server that
    // does not answer at once makes curl fail instead of being slow.
    let body_file = dir.join("body.json");
    std::fs::write(&body_file, format!("{}{{}}", " ".repeat(4000))).unwrap();
    let data = format!("@{}", body_file.display());
    let out = run_curl(
        sock,
        &[
            "-v",
            "--expect100-timeout",
            "60",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/json",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            &data,
            "http://localhost/v1/vm/pause",
        ],
    );
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(trace.contains("Expect: 100-continue"), "{trace}");
    assert!(trace.contains("HTTP/1.1 100 Continue"), "{trace}");
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["state"], "paused");
    assert_eq!(*vm.state.lock().unwrap(), VmState::Paused);

    // Over the 1 MiB limit (where every curl asks to continue by itself):
    // refused with 413 before the body is sent.
    std::fs::write(&body_file, " ".repeat(2 << 20)).unwrap();
    let out = run_curl(
        sock,
        &[
            "-v",
            "--expect100-timeout",
            "60",
            "-X",
            "PUT",
            "--data-binary",
            &data,
            "-w",
            "\n%{http_code}",
            "http://localhost/v1/vm/resume",
        ],
    );
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(trace.contains("Expect: 100-continue"), "{trace}");
    assert!(!trace.contains("100 Continue"), "{trace}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (body, code) = stdout.trim_end().rsplit_once('\n').unwrap();
    assert_eq!(code, "413");
    let body: Value = serde_json::from_str(body).unwrap();
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("larger than the limit"));
    assert_eq!(*vm.state.lock().unwrap(), VmState::Paused);
}
