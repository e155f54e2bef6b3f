//! Which pages of guest RAM were written since the last look: the dirty
//! log that live migration's pre-copy rounds read.
//!
//! Built on userfaultfd's asynchronous write protection and the
//! `PAGEMAP_SCAN` ioctl of `/proc/self/pagemap` (Linux 6.7), not on KVM's
//! dirty log: every writer of guest memory is seen, whoever it is (a vCPU
//! through KVM, KVM itself, a virtio device's I/O thread reading a disk
//! into a guest buffer, the VMM), because each write to a protected page
//! takes a fault in the host kernel, which unprotects the page and marks
//! it written without waking any thread of ours. One `PAGEMAP_SCAN` call
//! then lists the written pages of a range and protects them again,
//! atomically per page table. KVM's dirty log would miss device writes and
//! needs a bitmap per memory slot. The first scan reports every page
//! (none was protected yet, touched or not) and protects them all.
//!
//! Written by hand: no crate wraps `PAGEMAP_SCAN`; it is one ioctl and two
//! structures fixed by `linux/fs.h`, pinned by the tests below.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestRam;
use crate::uffd::{
    Userfaultfd, FEATURE_PAGEFAULT_FLAG_WP, FEATURE_WP_ASYNC, FEATURE_WP_UNPOPULATED,
    REGISTER_MODE_WP,
};

/// Size of a page the log reports.
pub const PAGE: u64 = 4096;

/// `struct pm_scan_arg` (`linux/fs.h`).
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region` (`linux/fs.h`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;
/// Write-protect the pages that match (`PM_SCAN_WP_MATCHING`).
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail on a range not registered for asynchronous write protection
/// (`PM_SCAN_CHECK_WPASYNC`).
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// The page was written since it was last protected (`PAGE_IS_WRITTEN`).
const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Regions one ioctl returns at most; the scan resumes where it stopped.
const REGIONS_PER_CALL: usize = 4096;

/// A guest-physical range of RAM and where it is mapped in this process.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    gpa: u64,
    host: u64,
    len: u64,
}

/// The dirty log of a VM's RAM; while it lives, every write to RAM is
/// recorded. Dropping it stops tracking (protection and registration go).
#[derive(Debug)]
pub struct DirtyLog {
    uffd: Userfaultfd,
    pagemap: Arc<File>,
    ranges: Vec<Tracked>,
    buf: Vec<PageRegion>,
}

/// Why this kernel cannot track dirty pages, or `None` when it can.
pub fn unavailable_reason() -> Option<String> {
    match Userfaultfd::offered_features() {
        Err(e) => Some(format!("userfaultfd is not available: {e}")),
        Ok(f) if f & FEATURE_WP_ASYNC == 0 => {
            Some("this kernel lacks asynchronous userfaultfd write protection (Linux 6.7)".into())
        }
        Ok(_) => None,
    }
}

/// `/proc/self/pagemap`, opened by [`keep_pagemap_open`].
static KEPT_PAGEMAP: OnceLock<Arc<File>> = OnceLock::new();

/// Opens `/proc/self/pagemap` and keeps it for the life of the process: a
/// process that gives root up (`--user`) is no longer dumpable, and its
/// `/proc/self` files then belong to root, so it could not open it later.
pub fn keep_pagemap_open() -> io::Result<()> {
    if KEPT_PAGEMAP.get().is_none() {
        let _ = KEPT_PAGEMAP.set(Arc::new(File::open("/proc/self/pagemap")?));
    }
    Ok(())
}

impl DirtyLog {
    /// Starts tracking every region of `mem`. Nothing is protected yet:
    /// the first [`DirtyLog::collect`] reports all of RAM and protects it.
    pub fn start(mem: &GuestRam) -> io::Result<DirtyLog> {
        let uffd = Userfaultfd::new(
            FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED,
        )?;
        let pagemap = match KEPT_PAGEMAP.get() {
            Some(kept) => kept.clone(),
            None => Arc::new(File::open("/proc/self/pagemap")?),
        };
        let mut log = DirtyLog {
            uffd,
            pagemap,
            ranges: Vec::new(),
            buf: vec![PageRegion::default(); REGIONS_PER_CALL],
        };
        for r in mem.iter() {
            let t = Tracked {
                gpa: r.start_addr().0,
                host: r.as_ptr() as u64,
                len: r.len(),
            };
            log.uffd.register(t.host, t.len, REGISTER_MODE_WP)?;
            log.ranges.push(t);
        }
        Ok(log)
    }

    /// Guest-physical ranges `(gpa, len)` of the pages written since the
    /// last call (all of RAM on the first), in address order and
    /// merged where adjacent; they are write-protected again as they are
    /// reported, so a write after this call shows in the next. Returns the
    /// bytes reported.
    pub fn collect(&mut self, out: &mut Vec<(u64, u64)>) -> io::Result<u64> {
        out.clear();
        let mut total = 0;
        for t in self.ranges.clone() {
            let end = t.host + t.len;
            let mut start = t.host;
            while start < end {
                let mut arg = PmScanArg {
                    size: std::mem::size_of::<PmScanArg>() as u64,
                    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    start,
                    end,
                    vec: self.buf.as_mut_ptr() as u64,
                    vec_len: self.buf.len() as u64,
                    category_mask: PAGE_IS_WRITTEN,
                    return_mask: PAGE_IS_WRITTEN,
                    ..Default::default()
                };
                // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to
                // `vec_len` writable page_region entries owned by `self.buf`,
                // which outlives the call; the range is our own mapping.
                let n =
                    unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    return Err(io::Error::new(e.kind(), format!("PAGEMAP_SCAN: {e}")));
                }
                for r in &self.buf[..n as usize] {
                    let gpa = t.gpa + (r.start - t.host);
                    let len = r.end - r.start;
                    total += len;
                    match out.last_mut() {
                        Some((g, l)) if *g + *l == gpa => *l += len,
                        _ => out.push((gpa, len)),
                    }
                }
                if arg.walk_end <= start {
                    return Err(io::Error::other(format!(
                        "PAGEMAP_SCAN made no progress at {start:#x}"
                    )));
                }
                start = arg.walk_end;
            }
        }
        Ok(total)
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        for t in &self.ranges {
            if let Err(e) = self.uffd.write_protect(t.host, t.len, false) {
                tracing::error!("cannot remove write protection from guest RAM: {e}");
            }
            if let Err(e) = self.uffd.unregister(t.host, t.len) {
                tracing::error!("cannot unregister guest RAM from userfaultfd: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn abi_matches_linux_fs_h() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(PAGEMAP_SCAN, 0xC060_6610);
    }

    #[test]
    fn written_pages_are_reported_once_each_after_a_first_look_at_everything() {
        if let Some(why) = unavailable_reason() {
            panic!("dirty tracking is not available on this host: {why}");
        }
        let mem = GuestRam::from_ranges(&[(GuestAddress(0x10_0000), 8 << 20)]).unwrap();
        let host = mem.iter().next().unwrap().as_ptr();
        let mut log = DirtyLog::start(&mem).unwrap();
        let mut out = Vec::new();
        // The first look reports everything (never-touched pages count as
        // written: they were never protected) and protects it all.
        assert_eq!(log.collect(&mut out).unwrap(), 8 << 20);
        assert_eq!(out, vec![(0x10_0000, 8 << 20)]);
        assert_eq!(log.collect(&mut out).unwrap(), 0, "all protected now");
        // SAFETY: offsets inside the 8 MiB mapping owned by `mem`.
        let poke = |off: usize| unsafe { host.add(off).write_volatile(1) };
        poke(0);
        poke(4096 * 5);
        poke(4096 * 6);
        poke((8 << 20) - 1);
        assert_eq!(log.collect(&mut out).unwrap(), 4 * PAGE);
        assert_eq!(
            out,
            vec![
                (0x10_0000, PAGE),
                (0x10_0000 + 5 * PAGE, 2 * PAGE),
                (0x10_0000 + (8 << 20) - PAGE, PAGE)
            ]
        );
        assert_eq!(log.collect(&mut out).unwrap(), 0, "protected again");
        poke(4096 * 6 + 8);
        assert_eq!(log.collect(&mut out).unwrap(), PAGE);
        assert_eq!(out, vec![(0x10_0000 + 6 * PAGE, PAGE)]);
        // Reads are not writes.
        // SAFETY: as above.
        let _ = unsafe { host.add(4096 * 100).read_volatile() };
        assert_eq!(log.collect(&mut out).unwrap(), 0);
        drop(log);
        poke(4096 * 7);
    }
}
