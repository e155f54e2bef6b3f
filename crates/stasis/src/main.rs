//! The `stasis` command: run VMs, and steer running ones by name.

mod api_glue;
mod checkpoints;
mod cli;
mod clients;
mod confinement;
mod cpu;
mod demo;
mod jobs;
mod migrate_job;
mod migration;
mod panics;
mod privileges;
mod restore;
mod rollback;
mod run;
mod signals;
mod snapshots;

use clap::Parser;

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    let cli = cli::Cli::parse();
    init_logging(&cli.log_level);
    stasis_failpoint::init();
    // The commands that run a VM choose their seccomp mode before any
    // thread exists.
    let seccomp = match &cli.command {
        cli::Command::Run(a) => Some((a.sandbox.seccomp, a.sandbox.require_sandbox)),
        cli::Command::Restore(a) => Some((a.sandbox.seccomp, a.sandbox.require_sandbox)),
        cli::Command::Receive(a) => Some((a.sandbox.seccomp, a.sandbox.require_sandbox)),
        _ => None,
    };
    if let Some((mode, required)) = seccomp {
        if required && mode == stasis_sandbox::Mode::Off {
            eprintln!("stasis: --require-sandbox and --seccomp=off contradict each other");
            std::process::exit(1);
        }
        if let Err(e) = stasis_sandbox::configure(mode) {
            eprintln!("stasis: {e}");
            std::process::exit(1);
        }
        if mode == stasis_sandbox::Mode::Off {
            eprintln!("stasis: WARNING: seccomp filters are off (--seccomp=off): a thread a guest takes over could make any system call");
        }
    }
    let mut code = match cli.command {
        cli::Command::Run(a) => run::run(a),
        cli::Command::Demo(a) => demo::demo(a),
        cli::Command::List => clients::list(),
        cli::Command::Status(a) => clients::status(&a),
        cli::Command::Pause(a) => clients::action(&a, "pause"),
        cli::Command::Resume(a) => clients::action(&a, "resume"),
        cli::Command::Stop(a) => clients::stop(&a),
        cli::Command::Snapshot(a) => snapshots::snapshot(&a),
        cli::Command::Jobs(a) => jobs::jobs(&a),
        cli::Command::Cancel(a) => jobs::cancel(&a),
        cli::Command::Restore(a) => restore::restore(a),
        cli::Command::Checkpoint(a) => checkpoints::checkpoint(&a),
        cli::Command::Checkpoints(a) => checkpoints::list(&a),
        cli::Command::Rollback(a) => rollback::rollback(&a),
        cli::Command::Migrate(a) => migration::migrate(&a),
        cli::Command::Receive(a) => migration::receive(a),
        cli::Command::Verify(a) => snapshots::verify(&a),
        cli::Command::Inspect(a) => snapshots::inspect(&a),
        cli::Command::Check(a) => cpu::check(&a),
        cli::Command::CpuModels(a) => cpu::cpu_models(&a),
    };
    // A VM rolled back to a checkpoint runs again in this process; only
    // after the stop the rollback asked for (status 0), not after a
    // signal or a failure that ended the VM first.
    while let Some(pending) = rollback::take() {
        if code != 0 {
            eprintln!(
                "stasis: the VM ended (exit status {code}) before its rollback to {}; not rolled back",
                pending.checkpoint_dir.display()
            );
            break;
        }
        code = rollback::perform(pending);
    }
    std::process::exit(code);
}
