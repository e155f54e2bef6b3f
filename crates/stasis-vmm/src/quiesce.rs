//! One protocol for stopping the world at an instant: every thread that
//! can change guest-visible state (vCPUs, device I/O threads, host input
//! feeding the serial port) implements [`Quiesce`], and [`quiesce_all`]
//! brings them all to their safe points together.
//!
//! A safe point is where nothing the guest can see is half done: a vCPU
//! parked between two `KVM_RUN`s with no port or MMIO instruction left for
//! KVM to finish; a device thread between two batches of requests, each
//! request either completed (used ring written, interrupt raised) or not
//! yet taken from the available ring; host input held in a buffer without
//! touching device registers or raising interrupts. Pause, snapshots and
//! (later) migration and checkpoints all quiesce through [`quiesce_all`]; adding
//! a device that runs on its own means implementing this trait beside it.

use std::time::{Duration, Instant};

/// A part of the VM that runs on its own and can be held at a safe point.
pub trait Quiesce: Send + Sync {
    /// What it is, for messages and reports (`vCPUs`, `virtio-blk 'root'`).
    fn name(&self) -> String;
    /// Asks it to reach its safe point; returns at once.
    fn request_quiesce(&self);
    /// Blocks until it is at its safe point (after
    /// [`Quiesce::request_quiesce`]). Never gives up: a busy host may
    /// delay it, but every part reaches its safe point in bounded work.
    fn wait_quiesced(&self);
    /// Lets it run again.
    fn resume(&self);
}

/// How long quiescing took, as a pause or snapshot reports it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct QuiesceReport {
    /// From the request to every part at its safe point, in ms.
    pub total_ms: f64,
    /// The slowest part.
    pub slowest: String,
}

/// Asks every part at once, then waits for each: the latency is that of
/// the slowest part, not the sum.
pub fn quiesce_all(parts: &[&dyn Quiesce]) -> QuiesceReport {
    let started = Instant::now();
    for p in parts {
        p.request_quiesce();
    }
    let mut slowest = (Duration::ZERO, String::new());
    for p in parts {
        p.wait_quiesced();
        let t = started.elapsed();
        if t > slowest.0 {
            slowest = (t, p.name());
        }
    }
    QuiesceReport {
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        slowest: slowest.1,
    }
}

/// Lets every part run again, in the reverse order.
pub fn resume_all(parts: &[&dyn Quiesce]) {
    for p in parts.iter().rev() {
        p.resume();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Part(&'static str, Arc<Mutex<Vec<String>>>);

    impl Quiesce for Part {
        fn name(&self) -> String {
            self.0.into()
        }
        fn request_quiesce(&self) {
            self.1.lock().unwrap().push(format!("request {}", self.0));
        }
        fn wait_quiesced(&self) {
            self.1.lock().unwrap().push(format!("wait {}", self.0));
        }
        fn resume(&self) {
            self.1.lock().unwrap().push(format!("resume {}", self.0));
        }
    }

    #[test]
    fn all_are_asked_before_any_is_waited_for_and_resumed_in_reverse() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (Part("a", log.clone()), Part("b", log.clone()));
        let parts: [&dyn Quiesce; 2] = [&a, &b];
        let r = quiesce_all(&parts);
        resume_all(&parts);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "request a",
                "request b",
                "wait a",
                "wait b",
                "resume b",
                "resume a"
            ]
        );
        assert!(r.total_ms >= 0.0);
    }
}
