//! `stasis migrate NAME tcp:HOST:PORT|unix:PATH` (a client of the source
//! VM's API) and `stasis receive --listen tcp:ADDR:PORT|unix:PATH` (a VMM
//! waiting for one VM; on a UNIX socket, a local upgrade).

use std::io::{BufReader, BufWriter};
use std::sync::atomic::Ordering;

use stasis_api::{ApiClient, ApiServer, MigrateRequest};
use stasis_migration::{secure, Auth, Key, Role};
use stasis_snapshot::{format_bytes, Progress};
use stasis_vmm::migrate::destination::Incoming;
use stasis_vmm::migrate::MigrationReport;
use stasis_vmm::Vm;

use crate::cli::{MigrateArgs, ReceiveArgs};
use crate::jobs::EXIT_INTERRUPTED;
use crate::run::{api_socket_path, serve_then, EXIT_START_FAILED};

/// Exit status of a migration that failed (the VM runs on at the source).
pub const EXIT_MIGRATION_FAILED: i32 = 1;

fn fail(e: impl std::fmt::Display) -> i32 {
    eprintln!("stasis: {e}");
    EXIT_MIGRATION_FAILED
}

/// `stasis migrate`.
pub fn migrate(args: &MigrateArgs) -> i32 {
    let interrupts = crate::signals::count_interrupts();
    let client = match ApiClient::for_vm(&args.name) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    // The secrets are read here, by the user's own process, and sent: the
    // VMM is confined to its state directories (docs/SECURITY.md §3).
    let (psk_file, psk_hex) = match &args.psk {
        None => (None, None),
        Some(p) => match (std::path::absolute(p), stasis_migration::Key::from_file(p)) {
            (Ok(abs), Ok(key)) => (
                Some(abs.display().to_string()),
                Some(key.bytes().iter().map(|b| format!("{b:02x}")).collect()),
            ),
            (Err(e), _) => return fail(format!("{}: {e}", p.display())),
            (_, Err(e)) => return fail(e),
        },
    };
    let abs = |p: &std::path::Path| {
        std::path::absolute(p)
            .map(|p| p.display().to_string())
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let (tls, tls_pem) = match args.tls.files() {
        Some(f) => match (abs(&f.cert), abs(&f.key), abs(&f.ca), f.read()) {
            (Ok(cert), Ok(key), Ok(ca), Ok(pem)) => {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                (
                    Some(stasis_api::TlsPaths { cert, key, ca }),
                    Some(stasis_api::TlsPaths {
                        cert: text(&pem.cert),
                        key: text(&pem.key),
                        ca: text(&pem.ca),
                    }),
                )
            }
            (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => return fail(e),
        },
        None => (None, None),
    };
    let destination = args.destination.to_string();
    if args.postcopy || args.postcopy_after.is_some() {
        eprintln!(
            "stasis: warning: post-copy allowed: once the destination runs the VM with part of its memory still here, a lost link or a failure of either side loses the VM"
        );
    }
    let request = MigrateRequest {
        destination: destination.clone(),
        mode: Some(args.mode.clone()),
        max_downtime_ms: Some(args.max_downtime),
        max_rounds: Some(args.max_rounds),
        max_time_s: Some(args.max_time),
        auto_converge: Some(!args.no_auto_converge),
        compress: Some(args.compress.clone()),
        postcopy: Some(args.postcopy || args.postcopy_after.is_some()),
        postcopy_after_rounds: args.postcopy_after,
        connections: Some(args.connections),
        psk_file,
        psk_hex,
        tls,
        tls_pem,
        insecure: args.insecure,
        detach: args.detach,
    };
    if args.detach {
        return match client.migrate(&request) {
            Ok(v) if args.json => {
                println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
                0
            }
            Ok(v) => {
                let job = v
                    .get("job")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                println!(
                    "migration of '{}' to {destination} started as job {job}; follow it with `stasis jobs {} {job} --wait`",
                    args.name, args.name
                );
                0
            }
            Err(e) => fail(e),
        };
    }
    let result = {
        let worker = client.clone();
        crate::jobs::follow_request(&client, &destination, &interrupts, move || {
            worker.migrate(&request)
        })
    };
    let Some(result) = result else {
        eprintln!(
            "stasis: stopped waiting; the migration goes on in VM '{}'",
            args.name
        );
        return EXIT_INTERRUPTED;
    };
    let value = match result {
        Ok(v) => v,
        Err(e) if e.to_string().contains("the VM is lost") => {
            eprintln!(
                "stasis: migration of '{}' to {destination} failed in post-copy: {e}",
                args.name
            );
            return stasis_vmm::migrate::postcopy::EXIT_POSTCOPY_LOST;
        }
        Err(e) => {
            eprintln!(
                "stasis: migration of '{}' to {destination} failed; the VM runs on here: {e}",
                args.name
            );
            return if interrupts.load(Ordering::SeqCst) > 0 {
                EXIT_INTERRUPTED
            } else {
                EXIT_MIGRATION_FAILED
            };
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("serializes")
        );
        return 0;
    }
    match serde_json::from_value::<MigrationReport>(value) {
        Ok(r) => {
            print_report(&args.name, &r);
            0
        }
        Err(e) => fail(format!(
            "the VM migrated, but its report cannot be read: {e}"
        )),
    }
}

fn print_report(name: &str, r: &MigrationReport) {
    println!(
        "'{name}' migrated to {} ({}, {}): downtime {:.1} ms, total {:.1} ms, {} sent",
        r.destination,
        r.mode,
        r.destination_software,
        r.downtime_ms,
        r.total_ms,
        format_bytes(r.bytes_sent)
    );
    for round in &r.rounds {
        println!(
            "  round {:>2}{}: {:>8} pages ({} zero), {:>10} in {:.1} ms",
            round.round,
            if round.paused { " (paused)" } else { "" },
            round.pages,
            round.zero_pages,
            format_bytes(round.bytes),
            round.ms
        );
    }
    if r.throttle_percent > 0 {
        println!(
            "  auto-converge throttled the vCPUs up to {}%",
            r.throttle_percent
        );
    }
    if r.postcopy_pages > 0 {
        println!(
            "  post-copy: {} pages sent after the destination ran the VM ({} ranges asked for by page faults), in {:.1} ms",
            r.postcopy_pages, r.postcopy_requests, r.postcopy_ms
        );
    }
}

/// `stasis receive`: returns the process exit status.
pub fn receive(args: ReceiveArgs) -> i32 {
    match receive_vm(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stasis: no VM received on {}: {e}", args.listen);
            EXIT_START_FAILED
        }
    }
}

/// How the receiver authenticates its source.
fn receiver_auth(args: &ReceiveArgs) -> Result<Auth, String> {
    if let Some(files) = args.tls.files() {
        return Ok(Auth::Tls(stasis_migration::TlsAuth::from_files(&files)?));
    }
    match (&args.psk, args.insecure) {
        (Some(p), _) => Ok(Auth::Psk(Key::from_file(p)?)),
        // Only this user (or root) can connect to the socket; the peer's
        // user is checked again when it connects.
        (None, _) if args.listen.is_local() => Ok(Auth::None),
        (None, true) if args.listen.is_loopback() => Ok(Auth::None),
        (None, true) => Err(format!(
            "--insecure is allowed only on a loopback address, not {}: give --psk FILE",
            args.listen
        )),
        (None, false) => Err(
            "a receiver needs authentication: --psk FILE (the key file the source uses too), mutual TLS (--tls-cert, --tls-key, --tls-ca), or --insecure on a loopback address"
                .into(),
        ),
    }
}

fn receive_vm(args: &ReceiveArgs) -> Result<i32, String> {
    let auth = receiver_auth(args)?;
    let become_user = args.privileges.identity()?;
    if become_user.is_some() && args.listen.is_local() {
        return Err(
            "--user is for tcp: listeners; a local upgrade needs no root: run stasis receive as the user the source VM runs as"
                .into(),
        );
    }
    let overrides = args.vm.overrides();
    let listener = args
        .listen
        .listen()
        .map_err(|e| format!("cannot listen: {e}"))?;
    let local = listener.address().map_err(|e| e.to_string())?;
    eprintln!("stasis: waiting for a migration on {local}");
    let (stream, peer) = listener.accept().map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let read_half = stream.try_clone().map_err(|e| e.to_string())?;
    let source_pid = stream.peer_pid();
    let handover = match stream.carries_files() {
        true => Some(stream.try_clone().map_err(|e| e.to_string())?),
        false => None,
    };
    let (r, w) = secure(read_half, stream, Role::Destination, &auth)
        .map_err(|e| format!("connection from {peer}: {e}"))?;
    let mut incoming = Incoming::start(BufReader::with_capacity(1 << 20, r), BufWriter::new(w))
        .map_err(|e| format!("connection from {peer}: {e}"))?;
    if let Some(stream) = handover {
        incoming = incoming
            .with_handover(stream)
            .map_err(|e| format!("connection from {peer}: {e}"))?;
    }
    let mut bound = None;
    let config = incoming
        .check(&overrides, |config| {
            if let Some(id) = become_user {
                // The socket is bound as the user once the VM exists.
                let socket = crate::run::user_socket_path(config, id);
                crate::confinement::prepare(
                    config,
                    &args.sandbox,
                    &socket,
                    &Default::default(),
                    Some(id),
                )?;
                bound = Some((None, socket, false));
                return Ok(());
            }
            let socket = api_socket_path(config)?;
            // A local upgrade in the same runtime directory: the control
            // socket is the source's own, taken over once the VM runs here.
            let takeover = source_pid.is_some()
                && stasis_vmm::migrate::transport::listener_pid(&socket) == source_pid;
            let server = match takeover {
                true => ApiServer::bind_takeover(&socket),
                false => ApiServer::bind(&socket),
            }
            .map_err(|e| e.to_string())?;
            // Confined before any thread of the arriving VM exists: its
            // configuration is known only now.
            crate::confinement::prepare(config, &args.sandbox, &socket, &Default::default(), None)?;
            bound = Some((Some(server), socket, takeover));
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    let (server, socket, takeover) = bound.expect("an accepted VM has its socket");
    for _ in 0..incoming.lanes_expected() {
        let (stream, peer) = listener
            .accept_within(stasis_vmm::migrate::IO_TIMEOUT)
            .map_err(|e| format!("waiting for the source's further connections: {e}"))?;
        let rh = stream.try_clone().map_err(|e| e.to_string())?;
        let (r, w) = secure(rh, stream, Role::Destination, &auth)
            .map_err(|e| format!("further connection from {peer}: {e}"))?;
        incoming
            .join(
                Box::new(BufReader::with_capacity(1 << 20, r)),
                Box::new(BufWriter::new(w)),
            )
            .map_err(|e| format!("further connection from {peer}: {e}"))?;
    }
    drop(listener);
    // The source's socket is never removed from here; a taken-over one is
    // ours only once serving starts.
    if server.is_some() {
        crate::panics::install(&config.name, if takeover { vec![] } else { vec![socket] });
    }
    eprintln!(
        "stasis: receiving '{}' from {peer} ({}, {} MiB)",
        config.name, incoming.source_software, config.memory_mib
    );
    let progress = Progress::new();
    let arrival = match incoming.receive(config, &progress) {
        Ok(a) => a,
        Err(e) => {
            incoming.refuse(&e.to_string());
            return Err(e.to_string());
        }
    };
    for w in stasis_snapshot::summarize_warnings(&arrival.warnings) {
        eprintln!("stasis: warning: {w}");
    }
    let mut arrival = arrival;
    if let Some(target) = arrival.postcopy.take() {
        eprintln!(
            "stasis: post-copy: the VM starts here with {} pages still on the source",
            target.stale_pages()
        );
        let lost = std::sync::Arc::new(|message: String, after_resumed: bool| {
            let code = match after_resumed {
                true => stasis_vmm::migrate::postcopy::EXIT_POSTCOPY_LOST,
                false => EXIT_START_FAILED,
            };
            crate::panics::fatal_exit(&message, code)
        });
        if let Err(e) = incoming.start_postcopy(target, lost) {
            incoming.refuse(&e.to_string());
            return Err(e.to_string());
        }
    }
    // From here on the VM is this process's: termination signals end it
    // cleanly (blocked before its threads exist, so they inherit it).
    crate::signals::block_termination_signals();
    let vm = match Vm::arrive(
        &arrival.config,
        arrival.memory,
        &arrival.state,
        &arrival.cpu,
    ) {
        Ok(vm) => vm,
        Err(e) => {
            let reason = format!("the destination cannot build the VM: {e}");
            incoming.refuse(&reason);
            return Err(reason);
        }
    };
    if arrival.memory_handed_over {
        eprintln!(
            "stasis: received '{}': memory handed over as files, {} of state in {:.1} ms",
            arrival.config.name,
            format_bytes(arrival.bytes),
            started.elapsed().as_secs_f64() * 1e3
        );
    } else {
        eprintln!(
            "stasis: received '{}': {} pages in {} rounds, {} in {:.1} ms",
            arrival.config.name,
            arrival.pages,
            arrival.rounds,
            format_bytes(arrival.bytes),
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    // With --user, root goes now that the VM exists; the socket follows.
    let server = match (server, become_user) {
        (Some(server), _) => server,
        (None, Some(id)) => match crate::run::bind_as(&arrival.config, id) {
            Ok(server) => server,
            Err(e) => {
                incoming.refuse(&e);
                return Err(e);
            }
        },
        (None, None) => unreachable!("a server is bound unless --user"),
    };
    stasis_failpoint::hit("migrate.before_confirm");
    let cfg = arrival.config;
    serve_then(
        vm,
        &cfg,
        server,
        "running after migration",
        move |control| {
            incoming
                .confirm()
                .map_err(|e| format!("cannot tell the source that the VM runs here: {e}"))?;
            announce(control.clone());
            Ok(())
        },
    )
}

/// Tells the network where the guest is now: each network card sends a
/// reverse-ARP announcement at once and twice more (50 and 150 ms later),
/// as switches may miss the first.
fn announce(control: stasis_vmm::VmControl) {
    if control.description().config.net.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("net-announce".into())
        .spawn(move || {
            for wait in [0, 50, 100] {
                std::thread::sleep(std::time::Duration::from_millis(wait));
                control.announce_network();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot announce the guest on the network: {e}");
    }
}
