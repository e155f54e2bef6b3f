//! `stasis rollback NAME CKPT`: a running VM goes back (or forward) to a
//! checkpoint.
//!
//! The VM's process does it in place: the API request is checked (the
//! checkpoint exists and its state reads), the VM stops, and once it is
//! gone (its disks released) the same process restores the checkpoint
//! (`stasis restore --checkpoint`) under the same name and API socket. A
//! supervisor keeps the process it started; the client waits until the
//! VM answers again, running from the checkpoint.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stasis_api::types::RollbackRequest;
use stasis_api::ApiClient;

use crate::cli::RollbackArgs;

/// A rollback the VM's process performs once its VM has stopped.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The checkpoint's directory (STORE/CKPT).
    pub checkpoint_dir: PathBuf,
    /// The VM's name.
    pub vm: String,
    /// Its API socket.
    pub socket: PathBuf,
    /// Where its serial output goes now (`--serial` syntax): the restore
    /// keeps it there, as the user chose it.
    pub serial: String,
    /// Where each console's output goes now, by device id.
    pub consoles: Vec<(String, String)>,
}

static PENDING: Mutex<Option<Pending>> = Mutex::new(None);

/// Records the rollback to perform when the VM has stopped.
pub fn request(p: Pending) {
    *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
}

/// The rollback requested, if any (taken).
pub fn take() -> Option<Pending> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Runs the VM again from the pending checkpoint; returns the exit status
/// of that run (which may itself roll back again: the caller loops).
pub fn perform(p: Pending) -> i32 {
    eprintln!(
        "stasis: rolling '{}' back to checkpoint {}",
        p.vm,
        p.checkpoint_dir.display()
    );
    let mut argv: Vec<String> = [
        "stasis",
        "restore",
        &p.checkpoint_dir.display().to_string(),
        "--checkpoint",
        "--name",
        &p.vm,
        "--api-socket",
        &p.socket.display().to_string(),
        "--serial",
        &p.serial,
    ]
    .map(String::from)
    .into();
    for (id, dest) in &p.consoles {
        argv.push("--console-path".into());
        argv.push(format!("{id}={dest}"));
    }
    match <crate::cli::Cli as clap::Parser>::try_parse_from(argv) {
        Ok(crate::cli::Cli {
            command: crate::cli::Command::Restore(args),
            ..
        }) => crate::restore::restore(args),
        Ok(_) => unreachable!("parsed a restore command"),
        Err(e) => {
            eprintln!("stasis: cannot roll back: {e}");
            crate::run::EXIT_START_FAILED
        }
    }
}

/// `stasis rollback NAME CKPT [--store DIR]`.
pub fn rollback(args: &RollbackArgs) -> i32 {
    let fail = |e: String| {
        eprintln!("stasis: {e}");
        1
    };
    let client = match ApiClient::for_vm(&args.name) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    let before = match client.get_vm() {
        Ok(i) => i,
        Err(e) => return fail(e.to_string()),
    };
    let store = match args.store.as_deref().map(std::path::absolute).transpose() {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let req = RollbackRequest {
        name: args.checkpoint.clone(),
        store: store.map(|s| s.display().to_string()),
    };
    let body = serde_json::to_value(&req).expect("serializes");
    let started = Instant::now();
    if let Err(e) = client.call::<serde_json::Value>("PUT", "/v1/vm/rollback", Some(&body)) {
        return fail(format!("cannot roll '{}' back: {e}", args.name));
    }
    // The same process answers again once the VM runs from the
    // checkpoint (a new start time).
    let deadline = started + Duration::from_secs(args.timeout);
    loop {
        if let Ok(info) = client.get_vm() {
            if info.started_at_unix_ms > before.started_at_unix_ms {
                println!(
                    "'{}' runs from checkpoint '{}' ({:.0} ms)",
                    args.name,
                    args.checkpoint,
                    started.elapsed().as_secs_f64() * 1e3
                );
                return 0;
            }
        }
        if !std::path::Path::new(&format!("/proc/{}", before.pid)).exists() {
            return fail(format!(
                "the process of '{}' ended instead of running from checkpoint '{}' (see its standard error)",
                args.name, args.checkpoint
            ));
        }
        if Instant::now() > deadline {
            return fail(format!(
                "'{}' did not come back from checkpoint '{}' within {} s (see the VM's standard error)",
                args.name, args.checkpoint, args.timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
