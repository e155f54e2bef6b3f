//! `stasis restore DIR`: start a VM from a snapshot, in the foreground.

use stasis_api::ApiServer;
use stasis_vmm::persist::restore::{self, RestoreOverrides};
use stasis_vmm::Vm;

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
    let overrides = RestoreOverrides {
        skip_memory_verify: args.no_verify,
        allow_tsc_mismatch: args.allow_tsc_mismatch,
        name: args.name.clone(),
        api_socket: args.api_socket.clone(),
        serial: args.serial.clone(),
        disk_paths: args
            .disk_paths
            .iter()
            .map(|(id, p)| (id.clone(), p.into()))
            .collect(),
        taps: args.taps.clone(),
        console_outputs: args.console_paths.clone(),
    };
    let started = std::time::Instant::now();
    // Verifying a large memory image takes a while: show progress on a
    // terminal.
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
    let plan = restore::prepare_with_progress(&args.dir, &overrides, &mut progress)
        .map_err(|e| e.to_string())?;
    for w in &plan.warnings {
        eprintln!("stasis: warning: {w}");
    }
    let socket = api_socket_path(&plan.config)?;
    let server = ApiServer::bind(&socket).map_err(|e| e.to_string())?;
    crate::panics::install(&plan.config.name, vec![socket.clone()]);
    let (memory, load) = restore::load_memory(&plan, args.mode).map_err(|e| e.to_string())?;
    let vm =
        Vm::restore(&plan.config, memory, &plan.state, &plan.cpu).map_err(|e| e.to_string())?;
    let gen = vm.control().vmgenid().generation();
    eprintln!(
        "stasis: restored '{}' from {} ({:?} memory, loaded in {:.1} ms, ready in {:.1} ms, generation {gen})",
        plan.config.name,
        args.dir.display(),
        args.mode,
        load.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3,
    );
    let cfg = plan.config.clone();
    drop(plan);
    serve(vm, &cfg, server, "running")
}
