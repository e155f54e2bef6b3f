//! Post-copy: the destination runs the VM before all of its memory has
//! arrived. At the switchover the source names the pages the guest wrote
//! since they were last sent (stale-pages frames), the destination drops
//! them and registers guest RAM with a userfaultfd, and the VM starts.
//! A vCPU, KVM or a device thread touching a dropped page blocks in the
//! kernel until the page arrives; the destination asks for it (a
//! page-request frame) while the source streams every stale page in the
//! background, requested ones first.
//!
//! * [`serve`]: the source's side after the state is sent.
//! * [`target`]: the destination's side: dropping the stale pages, the
//!   fault thread that asks for them, the thread that puts them in place.
//!
//! Once the destination has said the VM runs there, the VM's memory is in
//! two places: a lost link or a failed side loses the VM (docs/MIGRATION.md
//! §12). Both sides then end with exit status 9 and say so.

pub mod serve;
pub mod target;

use std::sync::atomic::{AtomicU8, Ordering};

use stasis_migration::PAGE_SIZE;

/// How many bytes the destination asks for around a faulting page: the
/// guest tends to touch neighbouring pages next.
pub const REQUEST_CHUNK: u64 = 64 << 10;

/// The process exit status of a VM lost in post-copy (on both sides).
pub const EXIT_POSTCOPY_LOST: i32 = 9;

/// On the destination: whether it told the source the VM runs here, or
/// post-copy failed first. Exactly one of the two happens first, so a
/// destination never confirms a VM whose pages stopped coming, and a
/// failure is "lost" only after the confirmation.
#[derive(Debug, Default)]
pub struct Commit(AtomicU8);

const OPEN: u8 = 0;
const FAILED: u8 = 1;
const RESUMED: u8 = 2;

impl Commit {
    /// About to say resumed: `false` if post-copy failed first.
    pub fn resume(&self) -> bool {
        self.0
            .compare_exchange(OPEN, RESUMED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Post-copy failed: `Some(false)` before resumed (the source keeps
    /// the VM), `Some(true)` after (the VM is lost), `None` if a failure
    /// was already reported.
    pub fn fail(&self) -> Option<bool> {
        match self
            .0
            .compare_exchange(OPEN, FAILED, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Some(false),
            Err(RESUMED) => {
                self.0.store(FAILED, Ordering::SeqCst);
                Some(true)
            }
            Err(_) => None,
        }
    }
}

/// The stale pages: sorted, non-overlapping guest-physical ranges, with
/// each page's index among all of them.
#[derive(Debug, Clone, Default)]
pub struct StaleSet {
    /// `(start, len, index of the first page)`.
    ranges: Vec<(u64, u64, u64)>,
    pages: u64,
}

impl StaleSet {
    /// From ranges in any order; overlapping or touching ranges merge.
    pub fn new(mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, len) in ranges {
            match merged.last_mut() {
                Some((s, l)) if *s + *l >= start => *l = (*l).max(start + len - *s),
                _ => merged.push((start, len)),
            }
        }
        let mut out = Vec::with_capacity(merged.len());
        let mut pages = 0;
        for (start, len) in merged {
            out.push((start, len, pages));
            pages += len / PAGE_SIZE as u64;
        }
        Self { ranges: out, pages }
    }

    /// Number of stale pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The ranges, in address order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|&(s, l, _)| (s, l))
    }

    /// The index of the stale page at `gpa`, if it is one.
    pub fn index(&self, gpa: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|&(s, _, _)| s <= gpa);
        let &(start, len, first) = self.ranges.get(i.checked_sub(1)?)?;
        (gpa < start + len).then(|| first + (gpa - start) / PAGE_SIZE as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_pages_merge_and_index() {
        let s = StaleSet::new(vec![(0x5000, 0x2000), (0x1000, 0x1000), (0x2000, 0x1000)]);
        assert_eq!(
            s.ranges().collect::<Vec<_>>(),
            vec![(0x1000, 0x2000), (0x5000, 0x2000)]
        );
        assert_eq!(s.pages(), 4);
        assert_eq!(s.index(0x1000), Some(0));
        assert_eq!(s.index(0x2000), Some(1));
        assert_eq!(s.index(0x3000), None);
        assert_eq!(s.index(0x6000), Some(3));
        assert_eq!(s.index(0x7000), None);
        assert_eq!(s.index(0), None);
    }
}
