//! Failpoints: named places in stasis where a test can make something
//! happen (a panic, a delay, a pause) to reach a race or a crash window on
//! purpose instead of by luck.
//!
//! They are configured by the environment variable `STASIS_FAILPOINTS`,
//! read once: `name=action` pairs separated by `;`. Actions:
//!
//! | action | effect |
//! |---|---|
//! | `panic` | panics with `failpoint NAME` |
//! | `sleep(MS)` | sleeps MS milliseconds |
//! | `hold` | prints `STASIS-FAILPOINT NAME` on standard error, then blocks the thread for good (a test kills the process knowing where it is) |
//! | `N*ACTION` | performs ACTION the first N times only |
//!
//! A name may be given more than once: the first entry that still fires
//! acts, so `p=100*sleep(0);p=panic` panics on the 101st hit.
//!
//! Without the variable every [`hit`] is one relaxed atomic load. Written
//! here rather than taken from the `fail` crate: a test here needs "say
//! that this point was reached, then stop" as one action, and hot paths
//! (vCPU exits) need the disabled case to cost nothing measurable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that configures failpoints.
pub const ENV: &str = "STASIS_FAILPOINTS";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Panic,
    Sleep(u64),
    Hold,
}

#[derive(Debug)]
struct Point {
    name: String,
    action: Action,
    /// How many more times it fires (`u64::MAX`: always).
    left: AtomicU64,
}

static ANY: AtomicBool = AtomicBool::new(false);
static POINTS: OnceLock<Vec<Point>> = OnceLock::new();

fn parse_action(s: &str) -> Option<(Action, u64)> {
    let (count, action) = match s.split_once('*') {
        Some((n, a)) => (n.trim().parse().ok()?, a.trim()),
        None => (u64::MAX, s.trim()),
    };
    let action = match action {
        "panic" => Action::Panic,
        "hold" => Action::Hold,
        a => {
            let ms = a.strip_prefix("sleep(")?.strip_suffix(')')?;
            Action::Sleep(ms.trim().parse().ok()?)
        }
    };
    Some((action, count))
}

fn parse(spec: &str) -> Vec<Point> {
    spec.split(';')
        .filter(|p| !p.trim().is_empty())
        .filter_map(|p| {
            let (name, action) = p.split_once('=')?;
            match parse_action(action) {
                Some((action, count)) => Some(Point {
                    name: name.trim().to_string(),
                    action,
                    left: AtomicU64::new(count),
                }),
                None => {
                    eprintln!("stasis: ignoring bad failpoint {p:?} in {ENV}");
                    None
                }
            }
        })
        .collect()
}

/// Reads `STASIS_FAILPOINTS`. Call once early (the first [`hit`] would do
/// it too, but only if something had set the flag).
pub fn init() {
    let points = POINTS.get_or_init(|| std::env::var(ENV).map(|s| parse(&s)).unwrap_or_default());
    ANY.store(!points.is_empty(), Ordering::Relaxed);
}

/// Whether any failpoint is configured.
pub fn enabled() -> bool {
    ANY.load(Ordering::Relaxed)
}

/// Passes the failpoint `name`: does what `STASIS_FAILPOINTS` says for it,
/// or nothing.
#[inline]
pub fn hit(name: &str) {
    if !ANY.load(Ordering::Relaxed) {
        return;
    }
    hit_slow(name);
}

#[cold]
fn hit_slow(name: &str) {
    let Some(points) = POINTS.get() else { return };
    for p in points.iter().filter(|p| p.name == name) {
        let fire = p
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u64::MAX => Some(u64::MAX),
                n => Some(n - 1),
            })
            .is_ok();
        if !fire {
            continue;
        }
        match p.action {
            Action::Panic => panic!("failpoint {name}"),
            Action::Sleep(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                return;
            }
            Action::Hold => {
                eprintln!("STASIS-FAILPOINT {name}");
                loop {
                    std::thread::park();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_actions_and_counts() {
        let p = parse("a=panic; b = 2*sleep(5);c=hold;bad=explode;;");
        let got: Vec<(&str, Action, u64)> = p
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.action.clone(),
                    p.left.load(Ordering::SeqCst),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", Action::Panic, u64::MAX),
                ("b", Action::Sleep(5), 2),
                ("c", Action::Hold, u64::MAX),
            ]
        );
    }

    #[test]
    fn disabled_points_do_nothing() {
        // No STASIS_FAILPOINTS in the test environment.
        init();
        hit("anything");
        assert!(!enabled() || std::env::var(ENV).is_ok());
    }
}
