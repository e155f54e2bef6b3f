//! Where control sockets live, and what a VM may be called.
//!
//! Every running VM listens on `<runtime dir>/<name>.sock`. The runtime
//! directory is chosen by [`runtime_dir`]; [`ensure_runtime_dir`] creates it
//! (mode 0700), [`socket_path_for`] names a VM's socket and
//! [`list_vm_sockets`] finds the sockets that are there.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The environment variable that overrides the runtime directory.
pub const RUNTIME_DIR_ENV: &str = "STASIS_RUNTIME_DIR";

/// The runtime directory used when running as root.
pub const ROOT_RUNTIME_DIR: &str = "/run/stasis";

/// The file-name suffix of a control socket.
pub const SOCKET_SUFFIX: &str = ".sock";

/// The longest VM name accepted, in characters.
pub const MAX_VM_NAME_LEN: usize = 64;

/// A VM name that [`validate_vm_name`] rejected, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM name {name:?}: {reason}")]
pub struct InvalidVmName {
    /// The name as given.
    pub name: String,
    /// What is wrong with it, in words.
    pub reason: String,
}

/// Checks that `name` can name a VM (and so a socket file).
///
/// A name is 1 to 64 characters from `A-Z a-z 0-9 . _ -` and does not start
/// with `.` or `-` (no hidden files, nothing that looks like a flag, no
/// `..`, no `/`).
pub fn validate_vm_name(name: &str) -> Result<(), InvalidVmName> {
    let fail = |reason: String| {
        Err(InvalidVmName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("the name is empty".to_string());
    }
    let len = name.chars().count();
    if len > MAX_VM_NAME_LEN {
        return fail(format!(
            "the name is {len} characters long; at most {MAX_VM_NAME_LEN} are allowed"
        ));
    }
    if let Some((pos, c)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return fail(format!(
            "character {c:?} at position {} is not allowed \
             (use letters, digits, '.', '_' and '-')",
            pos + 1
        ));
    }
    if let Some(first @ ('.' | '-')) = name.chars().next() {
        return fail(format!("the name must not start with {first:?}"));
    }
    Ok(())
}

/// The runtime directory: where control sockets live.
///
/// In order: `$STASIS_RUNTIME_DIR` if set and not empty; `/run/stasis` when
/// running as root (effective uid 0); `$XDG_RUNTIME_DIR/stasis` if that
/// variable is set and not empty; otherwise `/tmp/stasis-<uid>`.
pub fn runtime_dir() -> PathBuf {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    choose_runtime_dir(
        std::env::var_os(RUNTIME_DIR_ENV),
        euid,
        std::env::var_os("XDG_RUNTIME_DIR"),
    )
}

/// The runtime directory of a VMM that gave up root to become `uid`
/// (`--user`): `$STASIS_RUNTIME_DIR` if set and not empty, otherwise
/// `/tmp/stasis-<uid>` (root's `$XDG_RUNTIME_DIR` is not that user's).
pub fn runtime_dir_of_user(uid: u32) -> PathBuf {
    choose_runtime_dir(std::env::var_os(RUNTIME_DIR_ENV), uid, None)
}

/// The rule behind [`runtime_dir`], free of the process environment.
fn choose_runtime_dir(
    explicit: Option<OsString>,
    euid: u32,
    xdg_runtime_dir: Option<OsString>,
) -> PathBuf {
    if let Some(dir) = explicit.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if euid == 0 {
        return PathBuf::from(ROOT_RUNTIME_DIR);
    }
    if let Some(xdg) = xdg_runtime_dir.filter(|d| !d.is_empty()) {
        return PathBuf::from(xdg).join("stasis");
    }
    PathBuf::from(format!("/tmp/stasis-{euid}"))
}

/// Creates the runtime directory ([`runtime_dir`]) if needed and returns it.
///
/// See [`ensure_private_dir`] for what is created and checked.
pub fn ensure_runtime_dir() -> io::Result<PathBuf> {
    let dir = runtime_dir();
    ensure_private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` (and missing parents) with mode 0700, or checks an existing
/// one.
///
/// An existing directory must be owned by the effective user: this stops
/// another user from planting `/tmp/stasis-<uid>` in advance. Its mode is
/// left alone (the sockets inside are 0600 in any case), so pointing
/// `$STASIS_RUNTIME_DIR` at a shared directory does not change that
/// directory's permissions.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create runtime directory {}: {e}", dir.display()),
            ))
        }
    }
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("runtime directory {} is not a directory", dir.display()),
        ));
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "runtime directory {} is owned by uid {}, not by this user (uid {euid})",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    Ok(())
}

/// The control socket path of the VM `name`: `<runtime dir>/<name>.sock`.
pub fn socket_path_for(name: &str) -> Result<PathBuf, InvalidVmName> {
    socket_path_in(&runtime_dir(), name)
}

/// The control socket path of the VM `name` inside `dir`.
pub fn socket_path_in(dir: &Path, name: &str) -> Result<PathBuf, InvalidVmName> {
    validate_vm_name(name)?;
    Ok(dir.join(format!("{name}{SOCKET_SUFFIX}")))
}

/// A control socket found in a runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSocket {
    /// The VM name (the file name without `.sock`).
    pub name: String,
    /// The socket's full path.
    pub path: PathBuf,
}

/// The control sockets in the runtime directory, sorted by name.
///
/// See [`list_vm_sockets_in`].
pub fn list_vm_sockets() -> io::Result<Vec<VmSocket>> {
    list_vm_sockets_in(&runtime_dir())
}

/// The control sockets in `dir`, sorted by name.
///
/// Only UNIX sockets named `<valid VM name>.sock` are listed. A socket may
/// be stale (its VM died without removing it); connecting tells. A missing
/// directory means no VMs and gives an empty list.
pub fn list_vm_sockets_in(dir: &Path) -> io::Result<Vec<VmSocket>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut sockets = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let Some(name) = file_name.strip_suffix(SOCKET_SUFFIX) else {
            continue;
        };
        if validate_vm_name(name).is_err() || !entry.file_type()?.is_socket() {
            continue;
        }
        sockets.push(VmSocket {
            name: name.to_string(),
            path: entry.path(),
        });
    }
    sockets.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        for name in [
            "a",
            "vm1",
            "my-vm",
            "my_vm.2",
            "A.b-c_d",
            "0",
            &"x".repeat(64),
        ] {
            assert_eq!(validate_vm_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn invalid_names_say_why() {
        let reason = |name: &str| validate_vm_name(name).unwrap_err().reason;
        assert!(reason("").contains("empty"));
        assert!(reason(&"x".repeat(65)).contains("65 characters"));
        assert!(reason(".hidden").contains("must not start with '.'"));
        assert!(reason("-flag").contains("must not start with '-'"));
        assert!(reason("..").contains("must not start"));
        assert!(reason("a/b").contains("'/' at position 2"));
        assert!(reason("a b").contains("' '"));
        assert!(reason("caf\u{e9}").contains("position 4"));
        let msg = validate_vm_name("a/b").unwrap_err().to_string();
        assert!(msg.starts_with("invalid VM name \"a/b\": "), "{msg}");
    }

    #[test]
    fn runtime_dir_precedence() {
        let some = |s: &str| Some(OsString::from(s));
        assert_eq!(
            choose_runtime_dir(some("/x/y"), 0, some("/run/user/0")),
            PathBuf::from("/x/y")
        );
        assert_eq!(
            choose_runtime_dir(some("/x/y"), 1000, None),
            PathBuf::from("/x/y")
        );
        assert_eq!(
            choose_runtime_dir(some(""), 0, some("/run/user/0")),
            PathBuf::from("/run/stasis")
        );
        assert_eq!(
            choose_runtime_dir(None, 0, some("/run/user/0")),
            PathBuf::from("/run/stasis")
        );
        assert_eq!(
            choose_runtime_dir(None, 1000, some("/run/user/1000")),
            PathBuf::from("/run/user/1000/stasis")
        );
        assert_eq!(
            choose_runtime_dir(None, 1000, some("")),
            PathBuf::from("/tmp/stasis-1000")
        );
        assert_eq!(
            choose_runtime_dir(None, 1000, None),
            PathBuf::from("/tmp/stasis-1000")
        );
    }

    #[test]
    fn socket_paths() {
        let dir = Path::new("/run/stasis");
        assert_eq!(
            socket_path_in(dir, "vm1").unwrap(),
            PathBuf::from("/run/stasis/vm1.sock")
        );
        assert!(socket_path_in(dir, "../etc/passwd").is_err());
    }
}
