//! Where a restored VM's output goes, and what a snapshot may choose.
//!
//! A snapshot records the serial and console destinations of the VM it
//! was taken from, as host paths. A snapshot can come from someone else,
//! so a destination it names (one the user did not give again on the
//! command line) is used only if using it cannot harm a file of the
//! user's and creates nothing: a socket is there (a socket destination,
//! replaced), or a file stasis itself created for output (it bears
//! [`crate::devices::output_file::OUTPUT_XATTR`]). No destination, saved
//! or given, may lie inside the snapshot's directory. Restore says which
//! saved destinations it uses.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use stasis_config::{SerialConfig, VmConfig};

use super::restore::{RestoreError, RestoreOverrides};
use crate::devices::output_file::is_marked;

/// One output destination of a configuration.
struct Output<'a> {
    /// `serial`, or `console 'ID'`.
    what: String,
    /// The flag that overrides it.
    flag: String,
    dest: &'a SerialConfig,
    /// Read from the snapshot (not given again by the user).
    saved: bool,
}

fn outputs<'a>(config: &'a VmConfig, overrides: &RestoreOverrides) -> Vec<Output<'a>> {
    let mut all = vec![Output {
        what: "serial".into(),
        flag: "--serial".into(),
        dest: &config.serial,
        saved: overrides.serial.is_none(),
    }];
    for c in &config.console {
        all.push(Output {
            what: format!("console '{}'", c.id),
            flag: format!("--console-path {}=DEST", c.id),
            dest: &c.output,
            saved: !overrides.console_outputs.iter().any(|(id, _)| *id == c.id),
        });
    }
    all
}

/// `path`'s directory, resolved (for comparing with the snapshot's).
fn resolved_dir(path: &Path) -> Option<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::canonicalize(dir).ok()
}

/// Checks every output destination of `config` for a restore from the
/// snapshot in `snapshot_dir` (`None`: a migration, whose configuration
/// came over the network) and returns one line for each destination
/// taken from the saved configuration, to show the user.
pub fn check(
    config: &VmConfig,
    overrides: &RestoreOverrides,
    snapshot_dir: Option<&Path>,
) -> Result<Vec<String>, RestoreError> {
    let snap = snapshot_dir.and_then(|d| std::fs::canonicalize(d).ok());
    let mut notices = Vec::new();
    for o in outputs(config, overrides) {
        let (path, is_socket) = match o.dest {
            SerialConfig::File { path } => (path, false),
            SerialConfig::Socket { path } => (path, true),
            SerialConfig::Stdout | SerialConfig::Null => continue,
        };
        let refuse = |why: String| RestoreError::Output {
            what: o.what.clone(),
            dest: o.dest.to_string(),
            message: format!("{why}; choose another destination with {}", o.flag),
        };
        if let (Some(snap), Some(dir)) = (&snap, resolved_dir(path)) {
            if dir.starts_with(snap) {
                return Err(refuse(
                    "it is inside the snapshot's directory, which a restore never changes".into(),
                ));
            }
        }
        if !o.saved {
            continue;
        }
        match std::fs::symlink_metadata(path) {
            // A restore creates nothing at a path a snapshot names: the
            // guest, whose memory the snapshot also chose, would write the
            // new file's contents (a missing ~/.ssh/authorized_keys, a
            // cron file).
            Err(_) => {
                return Err(refuse(
                    "nothing is there, and a restore never creates a file or socket at a path read from a snapshot; give the destination again to create it".into(),
                ))
            }
            Ok(md) if is_socket && md.file_type().is_socket() => {}
            Ok(md) if is_socket => {
                return Err(refuse(format!(
                    "the snapshot names it as a socket, but {} is there",
                    stasis_snapshot::file_kind(md.mode())
                )))
            }
            Ok(md) if !md.is_file() => {
                return Err(refuse(format!(
                    "{} is there, not a regular file",
                    stasis_snapshot::file_kind(md.mode())
                )))
            }
            Ok(_) if !is_marked(path) => {
                return Err(refuse(
                    "a file is there that stasis did not create for a VM's output, and a destination read from a snapshot is never written into someone's file".into(),
                ))
            }
            Ok(_) => {}
        }
        notices.push(format!(
            "{} output goes to {}, as saved in the snapshot (change with {})",
            o.what, o.dest, o.flag
        ));
    }
    Ok(notices)
}
