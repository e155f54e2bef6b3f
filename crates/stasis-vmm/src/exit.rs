//! Why a VM stopped, and the process exit status each reason maps to.

use std::sync::mpsc::Sender;

/// Why the VM ended. The first reason reported wins; the VMM then stops
/// every vCPU and exits with [`ExitReason::exit_code`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered itself off (ACPI S5 through the sleep control
    /// register).
    GuestPoweroff,
    /// The guest asked for a reset (i8042 pulse, ACPI reset register).
    GuestReset {
        /// The device that carried the request.
        source: &'static str,
    },
    /// A vCPU hit a triple fault (`KVM_EXIT_SHUTDOWN`).
    TripleFault {
        /// The vCPU.
        vcpu: u32,
        /// Register summary at the fault.
        detail: String,
    },
    /// KVM could not emulate something (`KVM_EXIT_INTERNAL_ERROR`).
    KvmInternalError {
        /// The vCPU.
        vcpu: u32,
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// Register summary and extra data.
        detail: String,
    },
    /// `KVM_RUN` failed or returned something the VMM cannot handle.
    VcpuError {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        detail: String,
    },
    /// The VMM received SIGTERM or SIGINT.
    Signal(i32),
    /// A client asked the VM to stop (`stasis stop`, `PUT /v1/vm/shutdown`).
    StopRequested,
    /// The VM was suspended: snapshotted with `--stop`.
    Suspended {
        /// Where the snapshot is.
        path: String,
    },
    /// The VM moved to another stasis, which confirmed that it runs it.
    Migrated {
        /// Where it went.
        destination: String,
    },
    /// Post-copy failed after the destination ran the VM: part of its
    /// memory was here, part there; it is lost.
    MigrationLost {
        /// Where it went.
        destination: String,
        /// What failed.
        message: String,
    },
}

impl ExitReason {
    /// The process exit status for this reason:
    ///
    /// | status | reason |
    /// |---|---|
    /// | 0 | guest powered off, stop requested through the API, suspended to a snapshot, or migrated |
    /// | 3 | guest reset (stasis does not reboot in place) |
    /// | 4 | triple fault |
    /// | 5 | KVM internal error |
    /// | 6 | other vCPU error |
    /// | 9 | lost in post-copy |
    /// | 128+N | signal N (130 for SIGINT, 143 for SIGTERM) |
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::GuestPoweroff
            | Self::StopRequested
            | Self::Suspended { .. }
            | Self::Migrated { .. } => 0,
            Self::GuestReset { .. } => 3,
            Self::TripleFault { .. } => 4,
            Self::KvmInternalError { .. } => 5,
            Self::VcpuError { .. } => 6,
            Self::MigrationLost { .. } => 9,
            Self::Signal(n) => 128 + n,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestPoweroff => write!(f, "guest powered off"),
            Self::GuestReset { source } => write!(f, "guest requested a reset (via {source})"),
            Self::TripleFault { vcpu, detail } => {
                write!(f, "triple fault on vCPU {vcpu} ({detail})")
            }
            Self::KvmInternalError {
                vcpu,
                suberror,
                detail,
            } => write!(
                f,
                "KVM internal error on vCPU {vcpu}: suberror {suberror} ({}) ({detail})",
                internal_error_name(*suberror)
            ),
            Self::VcpuError { vcpu, detail } => write!(f, "vCPU {vcpu} failed: {detail}"),
            Self::Signal(n) => write!(f, "received {}", signal_name(*n)),
            Self::StopRequested => write!(f, "stopped on request"),
            Self::Suspended { path } => write!(f, "suspended to snapshot {path}"),
            Self::Migrated { destination } => {
                write!(f, "migrated to {destination}, where it runs now")
            }
            Self::MigrationLost {
                destination,
                message,
            } => write!(
                f,
                "lost in post-copy to {destination}: {message} (it ran there while part of its memory was here)"
            ),
        }
    }
}

fn internal_error_name(sub: u32) -> &'static str {
    match sub {
        1 => "instruction emulation failed",
        2 => "simultaneous exceptions",
        3 => "delivery event failed",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

fn signal_name(n: i32) -> String {
    match n {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("signal {n}"),
    }
}

/// Where devices and vCPU threads report that the VM must end.
#[derive(Clone, Debug)]
pub struct ExitSink(Sender<ExitReason>);

impl ExitSink {
    /// Wraps the sending side of the VMM's exit channel.
    pub fn new(tx: Sender<ExitReason>) -> Self {
        Self(tx)
    }

    /// Reports a reason. A closed channel means the VM is already ending.
    pub fn report(&self, reason: ExitReason) {
        let _ = self.0.send(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_per_kind() {
        let codes = [
            ExitReason::GuestPoweroff.exit_code(),
            ExitReason::GuestReset { source: "i8042" }.exit_code(),
            ExitReason::TripleFault {
                vcpu: 0,
                detail: String::new(),
            }
            .exit_code(),
            ExitReason::KvmInternalError {
                vcpu: 0,
                suberror: 1,
                detail: String::new(),
            }
            .exit_code(),
            ExitReason::Signal(libc::SIGTERM).exit_code(),
            ExitReason::Signal(libc::SIGINT).exit_code(),
        ];
        assert_eq!(codes, [0, 3, 4, 5, 143, 130]);
    }

    #[test]
    fn messages_name_the_reason() {
        assert_eq!(
            ExitReason::Signal(libc::SIGTERM).to_string(),
            "received SIGTERM"
        );
        assert!(ExitReason::KvmInternalError {
            vcpu: 1,
            suberror: 1,
            detail: "x".into()
        }
        .to_string()
        .contains("instruction emulation failed"));
    }
}
