//! The source VMM's side of `PUT /v1/vm/migrate`: the request checked
//! (before a job starts), then the job: connect, authenticate, migrate.

use std::io::{BufReader, BufWriter};
use std::sync::Arc;
use std::time::Duration;

use stasis_api::MigrateRequest;
use stasis_migration::{secure, Auth, Key, Role};
use stasis_snapshot::Progress;
use stasis_vmm::jobs::{FailureKind, JobFailure, JobResult};
use stasis_vmm::migrate::source::{migrate, MigrateOptions};
use stasis_vmm::migrate::{MigrateError, MigrationAddress, MigrationMode};
use stasis_vmm::{VmControl, VmError};

/// A checked request.
pub struct Plan {
    address: MigrationAddress,
    auth: Auth,
    options: MigrateOptions,
}

/// Checks a request: the address, the mode and limits, the key.
pub fn prepare(req: &MigrateRequest) -> Result<Plan, String> {
    let address: MigrationAddress = req.destination.parse()?;
    let mode = match req.mode.as_deref() {
        None => MigrationMode::Live,
        Some(m) => m.parse()?,
    };
    let auth = match (&req.psk_file, req.insecure) {
        _ if req.tls.is_some() && (req.psk_file.is_some() || req.insecure) => {
            return Err("give TLS certificates, a key file or insecure, only one".into())
        }
        _ if req.tls.is_some() => {
            let t = req.tls.as_ref().expect("checked");
            let host = match &address {
                MigrationAddress::Tcp { host, .. } => host.clone(),
                MigrationAddress::Unix { .. } => "localhost".into(),
            };
            let tls = match &req.tls_pem {
                // Read by the client: this VMM may not open the files.
                Some(p) => stasis_migration::TlsAuth::from_pem(
                    &stasis_migration::TlsPem {
                        cert: p.cert.clone().into_bytes(),
                        key: p.key.clone().into_bytes(),
                        ca: p.ca.clone().into_bytes(),
                    },
                    [&t.cert, &t.key, &t.ca],
                )?,
                None => stasis_migration::TlsAuth::from_files(&stasis_migration::TlsFiles {
                    cert: t.cert.clone().into(),
                    key: t.key.clone().into(),
                    ca: t.ca.clone().into(),
                })?,
            };
            Auth::Tls(tls.for_server(&host))
        }
        (Some(_), true) => return Err("give a key file or insecure, not both".into()),
        (Some(p), false) => match &req.psk_hex {
            // Read by the client: this VMM may not open the file.
            Some(hex) => Auth::Psk(Key::new(decode_hex(hex).ok_or_else(|| {
                format!("psk_hex for {p}: not an even number of hex digits")
            })?)?),
            None => Auth::Psk(Key::from_file(std::path::Path::new(p))?),
        },
        // A UNIX socket is this host's: the receiver made it its user's
        // only, and checks who connects.
        (None, _) if address.is_local() => Auth::None,
        (None, true) if address.is_loopback() => Auth::None,
        (None, true) => {
            return Err(format!(
                "insecure migration is only allowed to a loopback address, not {address}: use a pre-shared key (--psk FILE) or mutual TLS (--tls-cert, --tls-key, --tls-ca)"
            ))
        }
        (None, false) => {
            return Err(
                "a migration needs authentication: a pre-shared key (--psk FILE, the receiver's too), mutual TLS (--tls-cert, --tls-key, --tls-ca), or --insecure to a receiver on a loopback address"
                    .into(),
            )
        }
    };
    let defaults = MigrateOptions::default();
    let postcopy = match (req.postcopy_after_rounds, req.postcopy) {
        (Some(n), _) => Some(n.max(1)),
        (None, Some(true)) => Some(u32::MAX),
        _ => None,
    };
    if postcopy.is_some() && mode == MigrationMode::Warm {
        return Err("post-copy is a way to end a live migration: not with --mode warm".into());
    }
    let options = MigrateOptions {
        mode,
        max_downtime: req
            .max_downtime_ms
            .map_or(defaults.max_downtime, Duration::from_millis),
        max_rounds: req.max_rounds.unwrap_or(defaults.max_rounds).max(1),
        max_time: req
            .max_time_s
            .map_or(defaults.max_time, Duration::from_secs),
        auto_converge: req.auto_converge.unwrap_or(defaults.auto_converge),
        compress: match req.compress.as_deref() {
            None | Some("none") => false,
            Some("zstd") => true,
            Some(other) => {
                return Err(format!(
                    "unknown compression '{other}' (expected none or zstd)"
                ))
            }
        },
        postcopy,
        connections: match req.connections.unwrap_or(1) {
            n if n > 1 && address.is_local() => {
                return Err(format!(
                    "{n} connections: a local upgrade (unix:) uses one connection"
                ))
            }
            n @ 1..=stasis_vmm::migrate::lanes::MAX_CONNECTIONS => n,
            n => {
                return Err(format!(
                    "{n} connections: from 1 to {}",
                    stasis_vmm::migrate::lanes::MAX_CONNECTIONS
                ))
            }
        },
        connector: None,
        destination: address.to_string(),
        progress: Arc::default(),
        handover: None,
    };
    Ok(Plan {
        address,
        auth,
        options,
    })
}

fn failure(e: MigrateError) -> JobFailure {
    let kind = match &e {
        MigrateError::Cancelled => FailureKind::Cancelled,
        MigrateError::Vm(VmError::BadState { .. } | VmError::Busy { .. }) => FailureKind::Conflict,
        MigrateError::Protocol(stasis_migration::Error::Refused { .. })
        | MigrateError::Protocol(stasis_migration::Error::Auth(_))
        | MigrateError::NotConverged(_) => FailureKind::BadRequest,
        _ => FailureKind::Internal,
    };
    JobFailure {
        kind,
        message: e.to_string(),
    }
}

/// The job: connects to the receiver and migrates the VM.
pub fn run(control: &VmControl, plan: Plan, progress: Arc<Progress>) -> JobResult {
    let Plan {
        address,
        auth,
        mut options,
    } = plan;
    options.progress = progress.clone();
    progress.phase("connecting", 0);
    let internal = |message: String| JobFailure {
        kind: FailureKind::Internal,
        message,
    };
    let stream = address
        .connect()
        .map_err(|e| internal(format!("cannot connect to {address}: {e}")))?;
    let clone = || stream.try_clone().map_err(|e| internal(e.to_string()));
    let (read_half, watched) = (clone()?, clone()?);
    if stream.carries_files() {
        options.handover = Some(Arc::new(clone()?));
    }
    // Further connections: opened and authenticated like the first; the
    // cancel watcher shuts them too.
    let watched = Arc::new(std::sync::Mutex::new(vec![watched]));
    options.connector = Some({
        let (address, auth, watched) = (address.clone(), auth.clone(), watched.clone());
        Arc::new(move || {
            let s = address.connect().map_err(|e| format!("{address}: {e}"))?;
            let (rh, wh) = (
                s.try_clone().map_err(|e| e.to_string())?,
                s.try_clone().map_err(|e| e.to_string())?,
            );
            watched.lock().expect("watched connections").push(wh);
            let (r, w) = secure(rh, s, Role::Source, &auth).map_err(|e| e.to_string())?;
            let r: stasis_vmm::migrate::lanes::LaneReader = Box::new(BufReader::new(r));
            let w: stasis_vmm::migrate::lanes::LaneWriter =
                Box::new(BufWriter::with_capacity(1 << 20, w));
            Ok((r, w))
        })
    });
    // A cancel must not wait for a stalled connection (a write blocks
    // until the stall timeout): it shuts the connection, and the blocked
    // call fails at once. Never once the switchover is committed.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (done, progress) = (done.clone(), progress.clone());
        std::thread::Builder::new()
            .name("migrate-cancel".into())
            .spawn(move || {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    let p = progress.read();
                    if p.cancel_requested && !p.committing {
                        for s in watched.lock().expect("watched connections").iter() {
                            let _ = s.shutdown();
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .map_err(|e| internal(format!("cannot start a thread: {e}")))?
    };
    let result = secure(read_half, stream, Role::Source, &auth)
        .map_err(MigrateError::Protocol)
        .and_then(|(r, w)| {
            migrate(
                control,
                BufReader::new(r),
                BufWriter::with_capacity(1 << 20, w),
                &options,
            )
        });
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = watcher.join();
    let report = result.map_err(|e| {
        let p = progress.read();
        failure(if p.cancel_requested && !p.committing {
            MigrateError::Cancelled
        } else {
            e
        })
    })?;
    serde_json::to_value(&report)
        .map_err(|e| internal(format!("cannot encode the migration report: {e}")))
}

/// Bytes from hex digits, or `None` if `s` is not an even number of them.
fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
