//! Landlock: once a VM is set up, its threads may open only what its
//! configuration names and the directories the user allows for state.
//!
//! [`prepare`] builds one ruleset from a [`FsPolicy`] before the VM's
//! threads exist; every thread then restricts itself with it as it
//! enters its seccomp filter ([`crate::enter`]), because Landlock, like
//! seccomp, applies to the thread that asks (and the threads it creates
//! afterwards). [`check_writable`] is stasis's own check of a snapshot,
//! checkpoint or working-set target, made before it tries, so that the
//! user gets a clear error rather than `EACCES` from Landlock.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use landlock::{
    path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetStatus, ABI,
};

use crate::SandboxError;

/// What a confined VMM may reach in the file system.
#[derive(Debug, Clone, Default)]
pub struct FsPolicy {
    /// Directories whose whole tree may be read, written, created in and
    /// removed from, and which snapshots and checkpoints may target: the
    /// state directories and the directories of writable disks (overlays,
    /// reflink clones, checkpoint stores).
    pub state_dirs: Vec<PathBuf>,
    /// Directories the VMM itself writes in, which are not offered for
    /// state: a restored snapshot whose working set is recorded.
    pub private_dirs: Vec<PathBuf>,
    /// Directories where the VMM only binds and removes sockets: the
    /// runtime directory (its API socket; a rollback binds it again, a
    /// local upgrade renames its own over it) and the directories of
    /// output sockets. It may create sockets and remove files there,
    /// and nothing else: no file is written or made in them.
    pub socket_dirs: Vec<PathBuf>,
    /// Directories whose tree may only be read (a restored snapshot and
    /// its parents).
    pub read_dirs: Vec<PathBuf>,
    /// Single files that may be opened for reading and writing (the KVM
    /// and TUN devices, for a rollback that builds the VM again).
    pub files: Vec<PathBuf>,
}

/// How far confinement went on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confinement {
    /// Every rule is enforced.
    Full,
    /// The kernel's Landlock is older than this build's: some rights
    /// cannot be restricted.
    Partial,
    /// The kernel has no Landlock: the VMM runs unconfined.
    None,
}

struct Prepared {
    ruleset: Option<RulesetCreated>,
    writable: Vec<PathBuf>,
}

static PREPARED: OnceLock<Prepared> = OnceLock::new();

/// The Landlock ABI this build asks for (Linux 6.10: rights up to
/// `IOCTL_DEV`); an older kernel enforces what it can.
const TARGET: ABI = ABI::V5;

/// Builds the ruleset of `policy` for this process's threads (the first
/// call wins) and says how much of it this kernel enforces.
pub fn prepare(policy: &FsPolicy) -> Result<Confinement, SandboxError> {
    let fail = |e: &dyn std::fmt::Display| SandboxError(format!("cannot prepare Landlock: {e}"));
    let all = AccessFs::from_all(TARGET);
    let read = AccessFs::from_read(TARGET);
    let existing = |list: &[PathBuf]| -> Vec<PathBuf> {
        list.iter().filter(|p| p.exists()).cloned().collect()
    };
    let ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(|e| fail(&e))?
        .create()
        .map_err(|e| fail(&e))?
        .add_rules(path_beneath_rules(existing(&policy.state_dirs), all))
        .map_err(|e| fail(&e))?
        .add_rules(path_beneath_rules(existing(&policy.private_dirs), all))
        .map_err(|e| fail(&e))?
        .add_rules(path_beneath_rules(
            existing(&policy.socket_dirs),
            AccessFs::MakeSock | AccessFs::RemoveFile,
        ))
        .map_err(|e| fail(&e))?
        .add_rules(path_beneath_rules(existing(&policy.read_dirs), read))
        .map_err(|e| fail(&e))?
        .add_rules(path_beneath_rules(
            existing(&policy.files),
            AccessFs::from_file(TARGET),
        ))
        .map_err(|e| fail(&e))?;
    // Ask the kernel now, on a throwaway thread, how much it enforces.
    let probe = ruleset.try_clone().map_err(|e| fail(&e))?;
    let status = std::thread::spawn(move || probe.restrict_self())
        .join()
        .map_err(|_| SandboxError("the Landlock probe thread panicked".into()))?
        .map_err(|e| fail(&e))?;
    let confinement = match status.ruleset {
        RulesetStatus::FullyEnforced => Confinement::Full,
        RulesetStatus::PartiallyEnforced => Confinement::Partial,
        RulesetStatus::NotEnforced => Confinement::None,
    };
    let writable = policy
        .state_dirs
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .collect();
    let _ = PREPARED.set(Prepared {
        ruleset: (confinement != Confinement::None).then_some(ruleset),
        writable,
    });
    Ok(confinement)
}

/// Restricts the calling thread with the prepared ruleset, if any.
pub(crate) fn restrict_thread() -> Result<(), SandboxError> {
    let Some(Prepared {
        ruleset: Some(ruleset),
        ..
    }) = PREPARED.get()
    else {
        return Ok(());
    };
    let fail = |e: &dyn std::fmt::Display| SandboxError(format!("cannot apply Landlock: {e}"));
    ruleset
        .try_clone()
        .map_err(|e| fail(&e))?
        .restrict_self()
        .map_err(|e| fail(&e))?;
    Ok(())
}

/// The directories a confined VMM may write, resolved (empty when none
/// were prepared).
pub fn writable_dirs() -> Vec<PathBuf> {
    PREPARED
        .get()
        .map(|p| p.writable.clone())
        .unwrap_or_default()
}

/// Checks, before trying, that `target` (a file or directory to create or
/// replace) lies inside a directory the VMM may write: its nearest
/// existing ancestor, resolved, is inside one of them. `what` names the
/// target in the error (`snapshot target`, `checkpoint store`). Nothing
/// is checked when no policy was prepared (a VMM without Landlock).
pub fn check_writable(what: &str, target: &Path) -> Result<(), String> {
    let Some(p) = PREPARED.get() else {
        return Ok(());
    };
    // Test hook: leave the refusal to Landlock, to show it enforces.
    if std::env::var_os("STASIS_TEST_SKIP_WRITE_CHECK").is_some() {
        return Ok(());
    }
    // `..` after a directory that does not exist yet would be resolved
    // only when it is created: refused rather than guessed at.
    if target
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!(
            "{what} {}: a path with '..' in it is not accepted here; give it without",
            target.display()
        ));
    }
    // The target is written beside itself first (a temporary sibling,
    // renamed into place): its directory must be writable.
    let target_dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let absolute = if target_dir.is_absolute() {
        target_dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("{what} {}: {e}", target.display()))?
            .join(target_dir)
    };
    let mut existing = absolute.as_path();
    let resolved = loop {
        match std::fs::canonicalize(existing) {
            Ok(r) => break r,
            Err(_) => match existing.parent() {
                Some(parent) => existing = parent,
                None => return Err(format!("{what} {}: no part of it exists", target.display())),
            },
        }
    };
    if p.writable.iter().any(|d| resolved.starts_with(d)) {
        return Ok(());
    }
    let allowed: Vec<String> = p.writable.iter().map(|d| d.display().to_string()).collect();
    Err(format!(
        "{what} {} is outside the directories this VM may write ({}); start the VM with --state-dir for another",
        target.display(),
        if allowed.is_empty() {
            "none".to_string()
        } else {
            allowed.join(", ")
        }
    ))
}
