//! How far a long snapshot operation has come, and a way to stop it.
//!
//! One [`Progress`] is shared between the thread doing the work (the
//! writer and the VMM's snapshot code update it) and whoever watches it (a
//! job in the control API, a progress bar). Cancellation is cooperative:
//! the worker checks [`Progress::check`] at its safe points and stops there
//! with [`Error::Cancelled`]; once the result is being put into place
//! ([`Progress::enter_commit`]) it can no longer be stopped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Progress of one operation, shared between threads.
#[derive(Debug)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    early: AtomicU64,
    /// The phase and when it began.
    phase: Mutex<(&'static str, Instant)>,
    cancel: AtomicBool,
    committing: AtomicBool,
    /// Figures particular to the operation (a migration's round, dirty
    /// rate, expected downtime), as JSON for the job's status.
    detail: Mutex<Option<serde_json::Value>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// A consistent reading of a [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressSnapshot {
    /// What the operation is doing now.
    pub phase: &'static str,
    /// Bytes of this phase done.
    pub done: u64,
    /// Bytes of this phase in all (0 when unknown).
    pub total: u64,
    /// Of `done`, bytes copied ahead of their turn because the guest was
    /// about to write them (background snapshots).
    pub early: u64,
    /// How long the phase has been going.
    pub phase_elapsed: Duration,
    /// Whether a cancel was asked for.
    pub cancel_requested: bool,
    /// Whether it is past the point where it can be cancelled.
    pub committing: bool,
}

impl Progress {
    /// A fresh progress in phase `starting`.
    pub fn new() -> Self {
        Self {
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            early: AtomicU64::new(0),
            phase: Mutex::new(("starting", Instant::now())),
            cancel: AtomicBool::new(false),
            committing: AtomicBool::new(false),
            detail: Mutex::new(None),
        }
    }

    /// Enters `phase`, which moves `total` bytes (0 if it moves none).
    pub fn phase(&self, phase: &'static str, total: u64) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = (phase, Instant::now());
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.early.store(0, Ordering::Relaxed);
    }

    /// `bytes` of the phase's done bytes were copied early, because the
    /// guest was about to change them.
    pub fn add_early(&self, bytes: u64) {
        self.early.fetch_add(bytes, Ordering::Relaxed);
    }

    /// `bytes` more of the current phase are done.
    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Asks the operation to stop at its next safe point. Returns false if
    /// it is already committing its result (too late to stop).
    pub fn request_cancel(&self) -> bool {
        self.cancel.store(true, Ordering::SeqCst);
        !self.committing.load(Ordering::SeqCst)
    }

    /// At a safe point: [`Error::Cancelled`] if a cancel was asked for.
    pub fn check(&self) -> Result<()> {
        if self.cancel.load(Ordering::SeqCst) && !self.committing.load(Ordering::SeqCst) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// The last safe point: checks for a cancel, then marks the operation
    /// as committing (from here on it finishes).
    pub fn enter_commit(&self) -> Result<()> {
        self.check()?;
        self.committing.store(true, Ordering::SeqCst);
        // A cancel that raced in after the check is refused by
        // request_cancel (it sees `committing`), and this one lost.
        Ok(())
    }

    /// Sets the operation's own figures (shown as a job's `detail`).
    pub fn set_detail(&self, detail: serde_json::Value) {
        *self.detail.lock().unwrap_or_else(|p| p.into_inner()) = Some(detail);
    }

    /// The operation's own figures, if it has any.
    pub fn detail(&self) -> Option<serde_json::Value> {
        self.detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current state.
    pub fn read(&self) -> ProgressSnapshot {
        let (phase, since) = *self.phase.lock().unwrap_or_else(|p| p.into_inner());
        ProgressSnapshot {
            phase,
            phase_elapsed: since.elapsed(),
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            early: self.early.load(Ordering::Relaxed),
            cancel_requested: self.cancel.load(Ordering::SeqCst),
            committing: self.committing.load(Ordering::SeqCst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_is_honoured_until_commit() {
        let p = Progress::new();
        p.phase("copying memory", 100);
        p.add(40);
        assert_eq!(p.read().done, 40);
        p.check().unwrap();
        assert!(p.request_cancel());
        assert!(matches!(p.check(), Err(Error::Cancelled)));
        assert!(matches!(p.enter_commit(), Err(Error::Cancelled)));

        let q = Progress::new();
        q.enter_commit().unwrap();
        assert!(!q.request_cancel(), "too late once committing");
        q.check().unwrap();
        assert!(q.read().committing);
    }
}
