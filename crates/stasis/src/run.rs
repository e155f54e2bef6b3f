//! `stasis run`: build the configuration, start the VM and its API, wait
//! for it to end, and exit with a status that says why.

use std::path::PathBuf;
use std::sync::Arc;

use stasis_api::{runtime, ApiServer};
use stasis_config::VmConfig;
use stasis_vmm::{Vm, VmControl};

use crate::api_glue::VmApi;
use crate::cli::RunArgs;
use crate::confinement::SandboxArgs;
use crate::privileges::Identity;
use crate::signals;

/// Exit status for a configuration or start-up error.
pub const EXIT_START_FAILED: i32 = 1;

/// Merges `--config` with the flags (flags win).
pub fn build_config(args: &RunArgs) -> Result<VmConfig, String> {
    let mut cfg = match &args.config {
        Some(path) => VmConfig::from_toml_file(path).map_err(|e| e.to_string())?,
        None => {
            let kernel = args.kernel.clone().ok_or(
                "no kernel given: use --kernel PATH or a --config file with `kernel = ...`",
            )?;
            VmConfig::new(format!("vm-{}", std::process::id()), kernel)
        }
    };
    if let Some(v) = &args.name {
        cfg.name = v.clone();
    }
    if let Some(v) = args.vcpus {
        cfg.vcpus = v;
    }
    if let Some(v) = args.memory {
        cfg.memory_mib = v;
    }
    if let Some(v) = &args.kernel {
        cfg.kernel = v.clone();
    }
    if let Some(v) = &args.cmdline {
        cfg.cmdline = v.clone();
    }
    if let Some(v) = &args.initrd {
        cfg.initrd = Some(v.clone());
    }
    if let Some(v) = args.memory_backend {
        cfg.memory_backend = v;
    }
    if let Some(v) = args.boot {
        cfg.boot = v;
    }
    if let Some(v) = args.cpu {
        cfg.cpu = v;
    }
    if let Some(v) = &args.cpu_features {
        cfg.cpu_features = v.clone();
    }
    if let Some(v) = &args.serial {
        cfg.serial = v.clone();
    }
    if let Some(v) = &args.api_socket {
        cfg.api_socket = Some(v.clone());
    }
    merge_by_id(&mut cfg.disk, &args.disks, |d| &d.id);
    merge_by_id(&mut cfg.net, &args.nets, |n| &n.id);
    merge_by_id(&mut cfg.rng, &args.rngs, |r| &r.id);
    merge_by_id(&mut cfg.console, &args.consoles, |c| &c.id);
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Adds the devices given as flags to those of the file: a flag whose id
/// is already there replaces that entry, others are appended.
fn merge_by_id<T: Clone>(list: &mut Vec<T>, flags: &[T], id: impl Fn(&T) -> &String) {
    for f in flags {
        match list.iter_mut().find(|e| id(e) == id(f)) {
            Some(e) => *e = f.clone(),
            None => list.push(f.clone()),
        }
    }
}

/// The control socket path for `cfg`.
pub fn api_socket_path(cfg: &VmConfig) -> Result<PathBuf, String> {
    match &cfg.api_socket {
        Some(p) => Ok(p.clone()),
        None => {
            runtime::ensure_runtime_dir().map_err(|e| {
                format!(
                    "cannot create the runtime directory {}: {e}",
                    runtime::runtime_dir().display()
                )
            })?;
            runtime::socket_path_for(&cfg.name).map_err(|e| e.to_string())
        }
    }
}

/// Runs `stasis run`; returns the process exit status.
pub fn run(args: RunArgs) -> i32 {
    // Before any thread exists, so that every thread inherits the mask.
    signals::block_termination_signals();
    let cfg = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stasis: {e}");
            return EXIT_START_FAILED;
        }
    };
    if args.print_config {
        print!("{}", cfg.to_toml_string());
        return 0;
    }
    let become_user = match args.privileges.identity() {
        Ok(id) => id,
        Err(e) => {
            eprintln!("stasis: {e}");
            return EXIT_START_FAILED;
        }
    };
    match run_vm(&cfg, become_user, &args.sandbox) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stasis: VM '{}' failed to start: {e}", cfg.name);
            EXIT_START_FAILED
        }
    }
}

/// Creates, starts and waits for the VM; returns the exit status. With
/// `become_user`, root is given up once the VM exists, and the API socket
/// is created after that, as the user.
pub fn run_vm(
    cfg: &VmConfig,
    become_user: Option<Identity>,
    sandbox: &SandboxArgs,
) -> Result<i32, String> {
    let Some(id) = become_user else {
        let socket = api_socket_path(cfg)?;
        // Bind first: a second VM with the same name fails before it
        // allocates anything.
        let server = ApiServer::bind(&socket).map_err(|e| e.to_string())?;
        crate::panics::install(&cfg.name, vec![socket.clone()]);
        crate::confinement::prepare(cfg, sandbox, &socket, &Default::default(), None)?;
        let vm = Vm::create(cfg).map_err(|e| e.to_string())?;
        return serve(vm, cfg, server, "running");
    };
    let socket = user_socket_path(cfg, id);
    crate::confinement::prepare(cfg, sandbox, &socket, &Default::default(), Some(id))?;
    let vm = Vm::create(cfg).map_err(|e| e.to_string())?;
    let server = bind_as(cfg, id)?;
    serve(vm, cfg, server, "running")
}

/// Where the API socket of `cfg` goes for a VMM that becomes `id`.
pub fn user_socket_path(cfg: &VmConfig, id: Identity) -> PathBuf {
    match &cfg.api_socket {
        Some(p) => p.clone(),
        None => runtime::runtime_dir_of_user(id.uid).join(format!("{}.sock", cfg.name)),
    }
}

/// Gives root up for `id`, then binds the API socket of `cfg` as that
/// user (by default in its runtime directory).
pub fn bind_as(cfg: &VmConfig, id: Identity) -> Result<ApiServer, String> {
    crate::privileges::become_user(id)?;
    let socket = user_socket_path(cfg, id);
    if cfg.api_socket.is_none() {
        let dir = runtime::runtime_dir_of_user(id.uid);
        runtime::ensure_private_dir(&dir)
            .map_err(|e| format!("cannot create the runtime directory {}: {e}", dir.display()))?;
    }
    let server = ApiServer::bind(&socket).map_err(|e| e.to_string())?;
    crate::panics::install(&cfg.name, vec![socket]);
    Ok(server)
}

/// Serves a created VM's API, starts it, waits for it to end and returns
/// the exit status.
pub fn serve(vm: Vm, cfg: &VmConfig, server: ApiServer, verb: &str) -> Result<i32, String> {
    serve_then(vm, cfg, server, verb, |_| Ok(()))
}

/// [`serve`], calling `started` once the vCPUs run (a migration's
/// destination confirms then); if it fails, the VM is stopped and the
/// failure returned.
pub fn serve_then(
    mut vm: Vm,
    cfg: &VmConfig,
    server: ApiServer,
    verb: &str,
    started: impl FnOnce(&VmControl) -> Result<(), String>,
) -> Result<i32, String> {
    let socket = server.path().to_path_buf();
    let control = vm.control();
    let api = Arc::new(VmApi {
        control: control.clone(),
        socket: socket.display().to_string(),
        jobs: Default::default(),
    });
    let _signals = signals::forward_termination_signals(control.exit_sink());
    let d = control.description();
    let how = if d.boot_protocol == "restored" {
        "restored from a snapshot".to_string()
    } else {
        format!("{} boot", d.boot_protocol)
    };
    // Announced before the vCPUs start, so it never lands inside the
    // guest's first line on a shared terminal.
    eprintln!(
        "stasis: VM '{}' {verb}: {} vCPU(s), {} MiB, {how}, API socket {}",
        cfg.name,
        cfg.vcpus,
        cfg.memory_mib,
        socket.display()
    );
    // Setup is over: the main thread takes its filter before it starts the
    // vCPUs and the API (their threads add their own to it).
    stasis_sandbox::enter(stasis_sandbox::ThreadKind::Main).map_err(|e| e.to_string())?;
    vm.start().map_err(|e| e.to_string())?;
    if let Err(e) = started(&control) {
        control.request_stop();
        let reason = vm.wait();
        return Err(format!("{e}; the VM was stopped ({reason})"));
    }
    // Served once the VM runs: a client that connected earlier waits in
    // the socket's backlog instead of finding a VM that cannot be paused
    // yet.
    let handle = server.serve(api).map_err(|e| e.to_string())?;
    let reason = vm.wait();
    handle.shutdown();
    // The images are closed now, not when the last reference goes: a
    // rollback restores the VM in this process at once.
    control.close_disks();
    let code = reason.exit_code();
    eprintln!(
        "stasis: VM '{}' ended: {reason} (exit status {code})",
        cfg.name
    );
    Ok(code)
}
