//! Where the guest's serial port (COM1) output goes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The destination of COM1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum SerialConfig {
    /// The VMM's standard output (and, when it is a terminal or pipe,
    /// standard input feeds the guest).
    #[default]
    Stdout,
    /// Appended to a file.
    File {
        /// The file.
        path: PathBuf,
    },
    /// A UNIX stream socket the VMM listens on; one client at a time sees the
    /// output and can type into the guest.
    Socket {
        /// The socket path.
        path: PathBuf,
    },
    /// Discarded.
    Null,
}

/// A `--serial` argument that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid serial '{0}': expected stdout, null, file:PATH or socket:PATH")]
pub struct SerialParseError(pub String);

impl std::str::FromStr for SerialConfig {
    type Err = SerialParseError;
    /// Parses the command-line form: `stdout`, `null`, `file:PATH`, `socket:PATH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SerialParseError(s.to_string());
        match s.split_once(':') {
            None if s == "stdout" => Ok(Self::Stdout),
            None if s == "null" => Ok(Self::Null),
            Some(("file", p)) if !p.is_empty() => Ok(Self::File { path: p.into() }),
            Some(("socket", p)) if !p.is_empty() => Ok(Self::Socket { path: p.into() }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for SerialConfig {
    /// The command-line form, which [`std::str::FromStr`] parses back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::Null => f.write_str("null"),
            Self::File { path } => write!(f, "file:{}", path.display()),
            Self::Socket { path } => write!(f, "socket:{}", path.display()),
        }
    }
}

impl SerialConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        match self {
            Self::File { path } | Self::Socket { path } if path.as_os_str().is_empty() => {
                Err("path must not be empty".into())
            }
            Self::File { path } => match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
                    Err(format!("directory of {} does not exist", path.display()))
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }
}
