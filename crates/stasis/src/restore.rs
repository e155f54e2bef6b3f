//! `stasis restore DIR`: start a VM from a snapshot, in the foreground.

use std::sync::Arc;
use std::time::Duration;

use stasis_api::ApiServer;
use stasis_vmm::persist::load::EXIT_MEMORY_DAMAGED;
use stasis_vmm::persist::restore::{self, LoadOptions, RestoreMode, WorkingSetUse};
use stasis_vmm::VmControl;

use crate::cli::RestoreArgs;
use crate::run::{api_socket_path, serve, EXIT_START_FAILED};
use crate::signals;

/// Runs `stasis restore`; returns the process exit status.
pub fn restore(args: RestoreArgs) -> i32 {
    signals::block_termination_signals();
    match restore_vm(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stasis: cannot restore {}: {e}", args.dir.display());
            EXIT_START_FAILED
        }
    }
}

fn restore_vm(args: &RestoreArgs) -> Result<i32, String> {
    let mut overrides = args.vm.overrides();
    if args.checkpoint {
        crate::checkpoints::prepare_restore(&args.dir, &mut overrides)?;
    }
    if args.mode != RestoreMode::Background
        && (args.record_working_set.is_some()
            || args.ignore_working_set
            || args.fill_threads.is_some())
    {
        return Err(format!(
            "--record-working-set, --ignore-working-set and --fill-threads are for --mode background (not {})",
            args.mode
        ));
    }
    let started = std::time::Instant::now();
    let plan = restore::prepare(&args.dir, &overrides).map_err(|e| e.to_string())?;
    for w in stasis_snapshot::summarize_warnings(&plan.warnings) {
        eprintln!("stasis: warning: {w}");
    }
    for line in &plan.outputs {
        eprintln!("stasis: {line}");
    }
    let working_set = match (args.record_working_set, args.ignore_working_set) {
        (Some(ms), _) => WorkingSetUse::Record(Duration::from_millis(ms)),
        (None, true) => WorkingSetUse::Ignore,
        (None, false) => WorkingSetUse::Use,
    };
    let become_user = args.privileges.identity()?;
    // The snapshot and its parents are read; a recorded working set is
    // written beside the snapshot.
    let snapshot_dirs = crate::confinement::SnapshotDirs {
        read: plan
            .chain
            .members()
            .map(|m| m.dir().to_path_buf())
            .collect(),
        write: args.record_working_set.map(|_| args.dir.clone()),
    };
    let server = match become_user {
        Some(id) => {
            let socket = crate::run::user_socket_path(&plan.config, id);
            crate::confinement::prepare(
                &plan.config,
                &args.sandbox,
                &socket,
                &snapshot_dirs,
                Some(id),
            )?;
            None
        }
        None => {
            let socket = api_socket_path(&plan.config)?;
            let server = ApiServer::bind(&socket).map_err(|e| e.to_string())?;
            crate::panics::install(&plan.config.name, vec![socket.clone()]);
            crate::confinement::prepare(
                &plan.config,
                &args.sandbox,
                &socket,
                &snapshot_dirs,
                None,
            )?;
            Some(server)
        }
    };
    let options = LoadOptions {
        mode: args.mode,
        skip_verify: args.no_verify,
        working_set,
        fill_threads: args.fill_threads.map(usize::from),
        on_fatal: Some(Arc::new(|message: String| {
            crate::panics::fatal_exit(&message, EXIT_MEMORY_DAMAGED)
        })),
    };
    // Verifying a large memory image (lazy, eager) takes a while: show
    // progress on a terminal.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_pct = u64::MAX;
    let mut progress = |done: u64, total: u64| {
        let pct = done * 100 / total.max(1);
        if tty && pct != last_pct {
            last_pct = pct;
            eprint!("\rstasis: verifying the memory image: {pct:3}%");
            if pct == 100 {
                eprintln!();
            }
        }
    };
    let loaded = restore::load_memory(&plan, &options, &mut progress).map_err(|e| e.to_string())?;
    for n in &loaded.notes {
        eprintln!("stasis: warning: {n}");
    }
    let (load_time, working_set_blocks) = (loaded.elapsed, loaded.working_set_blocks);
    let vm = plan.build_vm(loaded).map_err(|e| e.to_string())?;
    // With --user, root goes now that the VM exists; the socket follows.
    let server = match (server, become_user) {
        (Some(s), _) => s,
        (None, Some(id)) => crate::run::bind_as(&plan.config, id)?,
        (None, None) => unreachable!("a server is bound unless --user"),
    };
    let gen = vm.control().vmgenid().generation();
    let how = match (args.mode, &working_set) {
        (RestoreMode::Background, WorkingSetUse::Record(d)) => format!(
            "background memory, recording the working set for {} ms",
            d.as_millis()
        ),
        (RestoreMode::Background, _) if working_set_blocks > 0 => format!(
            "background memory, working set of {} MiB first",
            working_set_blocks as u64 * (stasis_snapshot::FILL_BLOCK >> 20)
        ),
        (mode, _) => format!("{mode} memory"),
    };
    eprintln!(
        "stasis: restored '{}' from {} ({how}, loaded in {:.1} ms, ready in {:.1} ms, generation {gen})",
        plan.config.name,
        args.dir.display(),
        load_time.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3,
    );
    if args.mode == RestoreMode::Background {
        report_resident(vm.control(), plan.config.name.clone());
    }
    let cfg = plan.config.clone();
    drop(plan);
    serve(vm, &cfg, server, "running")
}

/// Says on standard error when a background restore's memory is all
/// there, and what it took.
fn report_resident(control: VmControl, name: String) {
    let spawned = std::thread::Builder::new()
        .name("restore-report".into())
        .spawn(move || {
            stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Job);
            if control.wait_memory_resident().is_err() {
                return;
            }
            let Some(s) = control.memory_fill() else {
                return;
            };
            let mut extra = String::new();
            if s.prefetched_blocks > 0 {
                extra += &format!(", {} working-set blocks first", s.prefetched_blocks);
            }
            if let Some(n) = s.working_set_recorded {
                extra += &format!(", working set of {n} blocks recorded");
            }
            eprintln!(
                "stasis: memory of '{name}' resident: {} of {} MiB filled in {:.1} ms ({} blocks for {} guest faults, {} of zeros left to the kernel, placed by {}{extra})",
                s.filled_bytes >> 20,
                s.total_bytes >> 20,
                s.resident_ms.unwrap_or(0.0),
                s.fault_fills,
                s.faults,
                s.zero_blocks,
                s.placement,
            );
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the restore report thread: {e}");
    }
}
