//! Where a migration goes, or where a receiver listens: `tcp:HOST:PORT`
//! (a name or an address, IPv6 in brackets), or `unix:PATH` (a local
//! upgrade: another stasis process on this host).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;

use super::transport::{MigrationListener, MigrationStream};
use super::IO_TIMEOUT;

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationAddress {
    /// A TCP host and port.
    Tcp {
        /// The host, as given.
        host: String,
        /// The port.
        port: u16,
    },
    /// A UNIX socket on this host: a local upgrade, where guest memory
    /// and taps are handed over as file descriptors.
    Unix {
        /// The socket's path.
        path: PathBuf,
    },
}

impl std::str::FromStr for MigrationAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            Err(format!(
                "invalid migration address '{s}': {why} (expected tcp:HOST:PORT, e.g. tcp:10.0.0.2:4444 or tcp:[::1]:4444, or unix:PATH)"
            ))
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return bad("no path");
            }
            if path.len() >= 108 {
                return bad("a UNIX socket path must be shorter than 108 bytes");
            }
            return Ok(Self::Unix { path: path.into() });
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            return bad("unknown transport");
        };
        let Some((host, port)) = rest.rsplit_once(':') else {
            return bad("no port");
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return bad("no host");
        }
        match port.parse::<u16>() {
            Ok(port) => Ok(Self::Tcp {
                host: host.to_string(),
                port,
            }),
            Err(_) => bad("the port is not a number from 0 to 65535"),
        }
    }
}

impl std::fmt::Display for MigrationAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

impl MigrationAddress {
    fn socket_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        match self {
            Self::Tcp { host, port } => Ok((host.as_str(), *port).to_socket_addrs()?.collect()),
            Self::Unix { .. } => Ok(Vec::new()),
        }
    }

    /// Whether this is a local upgrade's UNIX socket.
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Unix { .. })
    }

    /// Whether every address this names is a loopback one (where a
    /// receiver may run without authentication if told so).
    pub fn is_loopback(&self) -> bool {
        self.socket_addrs()
            .map(|a| !a.is_empty() && a.iter().all(|a| a.ip().is_loopback()))
            .unwrap_or(false)
    }

    /// Connects, with the stall timeout set both ways.
    pub fn connect(&self) -> std::io::Result<MigrationStream> {
        if let Self::Unix { path } = self {
            let s = MigrationStream::Unix(std::os::unix::net::UnixStream::connect(path)?);
            s.set_timeouts()?;
            return Ok(s);
        }
        let mut last = None;
        for a in self.socket_addrs()? {
            match TcpStream::connect_timeout(&a, IO_TIMEOUT) {
                Ok(s) => {
                    let s = MigrationStream::Tcp(s);
                    s.set_timeouts()?;
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other(format!("{self} names no address"))))
    }

    /// Listens for the one incoming migration.
    pub fn listen(&self) -> std::io::Result<MigrationListener> {
        match self {
            Self::Unix { path } => MigrationListener::bind_unix(path),
            Self::Tcp { .. } => {
                let addrs = self.socket_addrs()?;
                Ok(MigrationListener::Tcp(std::net::TcpListener::bind(
                    addrs.as_slice(),
                )?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        for s in [
            "tcp:10.0.0.2:4444",
            "tcp:[::1]:80",
            "tcp:localhost:1",
            "unix:/run/x.sock",
        ] {
            let a: MigrationAddress = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        let a: MigrationAddress = "tcp:127.0.0.1:9".parse().unwrap();
        assert!(a.is_loopback());
        let a: MigrationAddress = "tcp:10.1.2.3:9".parse().unwrap();
        assert!(!a.is_loopback());
        let a: MigrationAddress = "unix:/tmp/u".parse().unwrap();
        assert!(a.is_local() && !a.is_loopback());
        for bad in [
            "10.0.0.2:4444",
            "tcp:host",
            "tcp::44",
            "tcp:h:99999",
            "udp:h:1",
            "unix:",
        ] {
            let e = bad.parse::<MigrationAddress>().unwrap_err();
            assert!(e.contains("expected tcp:HOST:PORT"), "{e}");
        }
    }
}
