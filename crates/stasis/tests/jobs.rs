//! Long operations as jobs: a snapshot started with `--detach` is followed
//! to its end through `GET /v1/jobs/ID`; one cancelled half way (by
//! `stasis cancel`, and by Ctrl-C on a waiting `stasis snapshot`) leaves
//! the previous snapshot at its path intact, no temporary files, and the
//! guest running.
//!
//! "Half way" is made certain, not likely: a failpoint lets the first
//! memory batches of the cancelled snapshot through at once and holds each
//! later one for seconds, so the job is inside its memory copy, with bytes
//! done and bytes left, when the cancel is sent; the test checks that
//! before it cancels.

mod common;
use common::*;
use stasis_api::ApiClient;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// Guest memory of the cancel tests, and the memory batches a snapshot of
/// it copies (16 MiB each: 8 chunks of 2 MiB; one RAM region).
const MEMORY_MIB: u64 = 128;
const BATCHES: u64 = MEMORY_MIB / 16;

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", err_text(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Temporary or displaced snapshot directories next to `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

/// Polls job `id` until `pred` holds for it.
fn wait_job(
    client: &ApiClient,
    id: u64,
    what: &str,
    pred: impl Fn(&stasis_api::JobInfo) -> bool,
) -> stasis_api::JobInfo {
    let deadline = Instant::now() + T;
    loop {
        let j = client.job(id).unwrap();
        if pred(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} never {what}: {j:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn guest_runs(vm: &mut VmProcess) {
    let n = vm.tagged("HB").len();
    vm.wait_tagged("HB", n + 2, T);
    let out = vm.cli(&["status", &vm.name, "--json"]);
    assert_eq!(json(&out)["state"], "running");
}

#[test]
fn a_detached_snapshot_is_followed_to_its_result() {
    require_kvm();
    let mut vm = VmProcess::start("job-detach", VmOpts::default());
    vm.wait_socket();
    vm.wait_tagged("HB", 2, T);
    let dir = vm.scratch.join("detached");
    let out = vm.cli(&[
        "snapshot",
        &vm.name,
        dir.to_str().unwrap(),
        "--detach",
        "--json",
    ]);
    let accepted = json(&out);
    let id = accepted["job"].as_u64().unwrap();
    assert_eq!(accepted["location"], format!("/v1/jobs/{id}"));
    let out = vm.cli(&["jobs", &vm.name, &id.to_string(), "--wait", "--json"]);
    let job = json(&out);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["kind"], "snapshot");
    assert_eq!(job["target"], dir.to_str().unwrap());
    assert_eq!(job["result"]["path"], dir.to_str().unwrap());
    assert!(job["result"]["pause_ms"].as_f64().unwrap() > 0.0, "{job}");
    assert!(job["elapsed_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(job["cancellable"], false);
    let out = vm.cli(&["verify", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", err_text(&out));
    let out = vm.cli(&["jobs", &vm.name, "--json"]);
    let list = json(&out);
    assert_eq!(list[0]["id"].as_u64(), Some(id), "{list}");
    let text = String::from_utf8_lossy(&vm.cli(&["jobs", &vm.name]).stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with(&format!("{id} ")) && l.contains("succeeded")),
        "{text}"
    );
    // The API's answers about jobs that do not exist or have ended.
    let client = ApiClient::at(vm.socket());
    let (status, body) = client.request("GET", "/v1/jobs/999", None).unwrap();
    assert_eq!((status, body["error"].as_str()), (404, Some("no job 999")));
    let (status, body) = client
        .request("DELETE", &format!("/v1/jobs/{id}"), None)
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("already ended"),
        "{body}"
    );
    let out = vm.cli(&["cancel", &vm.name, &id.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out).contains("already ended"),
        "{}",
        err_text(&out)
    );
    guest_runs(&mut vm);
}

#[test]
fn a_snapshot_cancelled_half_way_leaves_the_previous_one_and_the_guest_running() {
    require_kvm();
    // The first snapshot's batches and the second's first batch go through
    // at once; every later batch waits 3 s before its safe point.
    let fp = format!(
        "writer.memory_batch={}*sleep(0);writer.memory_batch=sleep(3000)",
        BATCHES + 1
    );
    let memory = format!("{MEMORY_MIB}M");
    let mut vm = VmProcess::start(
        "job-cancel",
        VmOpts {
            memory: &memory,
            env: vec![("STASIS_FAILPOINTS".into(), fp)],
            ..Default::default()
        },
    );
    vm.wait_socket();
    vm.wait_tagged("HB", 2, T);
    let dir = vm.scratch.join("snap");
    let first = vm.snapshot(&dir, false);
    assert_eq!(first["memory_bytes"].as_u64(), Some(MEMORY_MIB << 20));
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();

    let client = ApiClient::at(vm.socket());
    let accepted = client
        .snapshot_detached(dir.to_str().unwrap(), false)
        .unwrap();
    let id = accepted.job;
    let halfway = wait_job(&client, id, "copied memory", |j| {
        j.phase.starts_with("copying memory") && j.done_bytes > 0
    });
    assert!(
        halfway.done_bytes < halfway.total_bytes && halfway.cancellable,
        "not half way: {halfway:?}"
    );
    // One long operation at a time: another snapshot is refused, naming
    // the running job.
    let other = vm.scratch.join("other");
    let out = vm.cli(&["snapshot", &vm.name, other.to_str().unwrap(), "--detach"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err_text(&out).contains(&format!("job {id} (snapshot to {})", dir.display())),
        "{}",
        err_text(&out)
    );
    let out = vm.cli(&["cancel", &vm.name, &id.to_string()]);
    assert!(out.status.success(), "{}", err_text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains(&format!("job {id} cancelled")), "{said}");
    let job = client.job(id).unwrap();
    assert_eq!(job.state, stasis_api::JobState::Cancelled, "{job:?}");
    assert!(job.error.unwrap().contains("cancelled"));

    assert_eq!(
        std::fs::read(dir.join("manifest.json")).unwrap(),
        manifest,
        "the previous snapshot's manifest changed"
    );
    let out = vm.cli(&["verify", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", err_text(&out));
    assert_eq!(leftovers(&dir), Vec::<String>::new());
    assert!(!other.exists());
    guest_runs(&mut vm);

    // Ctrl-C on a waiting `stasis snapshot` cancels its job (every batch
    // now waits 3 s, so it is still copying when the signal lands).
    let third = vm.scratch.join("third");
    let waiting = stasis_cmd()
        .env("STASIS_RUNTIME_DIR", &vm.runtime_dir)
        .args(["snapshot", &vm.name, third.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let running = {
        let deadline = Instant::now() + T;
        loop {
            let jobs = client.jobs().unwrap();
            if let Some(j) = jobs.into_iter().find(|j| {
                j.target == third.to_str().unwrap() && j.phase.starts_with("copying memory")
            }) {
                break j;
            }
            assert!(
                Instant::now() < deadline,
                "the third snapshot never started"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(waiting.id() as i32, libc::SIGINT) };
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", err_text(&out));
    assert!(
        err_text(&out).contains(&format!("cancelling job {}", running.id)),
        "{}",
        err_text(&out)
    );
    let job = client.job(running.id).unwrap();
    assert_eq!(job.state, stasis_api::JobState::Cancelled, "{job:?}");
    assert!(!third.exists());
    assert_eq!(leftovers(&third), Vec::<String>::new());
    guest_runs(&mut vm);
}
