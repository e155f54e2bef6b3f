//! userfaultfd: the kernel interface that lets a thread of the VMM handle
//! page faults on guest RAM (write-protect faults for copy-on-write
//! snapshots; missing-page faults for restores that fill RAM on demand).
//!
//! Written by hand rather than taken from the `userfaultfd` crate: that
//! crate's `-sys` part generates its bindings with bindgen at build time
//! and so needs libclang on every build machine, and its write-protect
//! support sits behind a feature flag; what the VMM needs is six ioctls and
//! one message layout, all fixed by the kernel ABI (`linux/userfaultfd.h`),
//! which the unit tests pin against the header's values.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `UFFD_API`: the only API version.
const UFFD_API: u64 = 0xAA;

/// Feature: write-protect faults are reported (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Feature: write-protecting a range also protects pages not yet
/// populated (`UFFD_FEATURE_WP_UNPOPULATED`, Linux 6.4), so that a first
/// write to a never-touched page faults too.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

/// Feature: asynchronous write protection (`UFFD_FEATURE_WP_ASYNC`,
/// Linux 6.7): the kernel resolves a write to a protected page itself,
/// unprotecting it and marking it written, with no message to read;
/// `PAGEMAP_SCAN` then reports and re-protects the written pages (see
/// [`crate::dirty`]).
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// Feature: `UFFDIO_MOVE` (Linux 6.8): pages, huge pages whole, are moved
/// from another anonymous mapping instead of copied.
pub const FEATURE_MOVE: u64 = 1 << 16;

/// Registration mode: missing-page faults.
pub const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Registration mode: write-protect faults.
pub const REGISTER_MODE_WP: u64 = 1 << 1;

const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `uffd_msg.event` of a page fault.
const EVENT_PAGEFAULT: u8 = 0x12;
/// Page-fault flag: the access was a write.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// Page-fault flag: the page was write-protected.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffdio_copy` and `struct uffdio_move` (same layout: dst, src,
/// len, mode, then the bytes done or a negative error).
#[repr(C)]
#[derive(Default)]
struct UffdioCopyOrMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    done: i64,
}

/// The kernel's `struct uffd_msg` (32 bytes), page-fault view.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

// ioctl numbers: _IOWR/_IOR(0xAA, nr, struct), as in linux/userfaultfd.h.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const READ_WRITE: u64 = 3;
const READ: u64 = 2;
const UFFDIO_API: u64 = ioc(READ_WRITE, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(READ_WRITE, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ioc(READ, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_WRITEPROTECT: u64 = ioc(READ_WRITE, 0x06, std::mem::size_of::<UffdioWriteprotect>());
const UFFDIO_COPY: u64 = ioc(READ_WRITE, 0x03, std::mem::size_of::<UffdioCopyOrMove>());
const UFFDIO_MOVE: u64 = ioc(READ_WRITE, 0x05, std::mem::size_of::<UffdioCopyOrMove>());

/// A page fault reported by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting host virtual address (page aligned by the kernel
    /// unless `UFFD_FEATURE_EXACT_ADDRESS` was asked for).
    pub address: u64,
    /// `PAGEFAULT_FLAG_*` bits.
    pub flags: u64,
}

impl PageFault {
    /// Whether this is a write to a write-protected page.
    pub fn is_write_protect(&self) -> bool {
        self.flags & PAGEFAULT_FLAG_WP != 0
    }
}

/// A userfaultfd file descriptor (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: u64,
}

fn ioctl<T>(fd: RawFd, request: u64, arg: &mut T, what: &str) -> io::Result<()> {
    // SAFETY: `arg` is the repr(C) structure the kernel expects for
    // `request` (sizes encoded in the request number are pinned by the unit
    // tests), and it lives for the duration of the call.
    let ret = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;

/// `/dev/userfaultfd`, opened by [`keep_device_open`] while the process
/// could.
static KEPT_DEVICE: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

/// Opens `/dev/userfaultfd` and keeps it for the life of the process, so
/// that a VMM that gives root up (`--user`) can still make userfaultfds
/// (live migration, background snapshots and restores): the device checks
/// who may use it when it is opened, and `USERFAULTFD_IOC_NEW` makes one
/// for the calling process's own memory only. Returns whether it was
/// opened (`false` on kernels before 6.1, which have no such device).
pub fn keep_device_open() -> io::Result<bool> {
    if KEPT_DEVICE.get().is_some() {
        return Ok(true);
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
    {
        Ok(f) => {
            let _ = KEPT_DEVICE.set(f);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// A new userfaultfd with `flags`: from the system call, or where that is
/// refused to this user (`vm.unprivileged_userfaultfd=0` without
/// `CAP_SYS_PTRACE`), from `/dev/userfaultfd` (Linux 6.1): the one kept
/// open by [`keep_device_open`], or else opened now (the administrator may
/// let a group open it).
fn open_uffd(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes flags only and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if raw >= 0 {
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) });
    }
    let refused = io::Error::last_os_error();
    if refused.raw_os_error() != Some(libc::EPERM) {
        return Err(refused);
    }
    let opened;
    let dev = match KEPT_DEVICE.get() {
        Some(kept) => kept,
        None => {
            opened = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/userfaultfd")
            {
                Ok(f) => f,
                Err(_) => return Err(refused),
            };
            &opened
        }
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument and
    // returns a new fd or -1; `dev` is open for the call.
    let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as RawFd) })
}

impl Userfaultfd {
    /// Opens a userfaultfd and negotiates `features` (all of them must be
    /// offered by the kernel, or the error names the missing ones).
    pub fn new(features: u64) -> io::Result<Userfaultfd> {
        let fd = open_uffd(libc::O_CLOEXEC | libc::O_NONBLOCK).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "userfaultfd: {e} (a user without CAP_SYS_PTRACE needs access to /dev/userfaultfd, e.g. group kvm and mode 0660, or vm.unprivileged_userfaultfd=1)"
                ),
            )
        })?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        if let Err(e) = ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api, "UFFDIO_API") {
            // Ask again without features to learn which ones are missing.
            let probe = Self::offered_features().unwrap_or(0);
            let missing = features & !probe;
            return Err(io::Error::new(
                e.kind(),
                format!("{e}; features missing from this kernel: {missing:#x}"),
            ));
        }
        Ok(Userfaultfd { fd, features })
    }

    /// The features this kernel offers.
    pub fn offered_features() -> io::Result<u64> {
        let fd = open_uffd(libc::O_CLOEXEC)?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api, "UFFDIO_API")?;
        Ok(api.features)
    }

    /// The features negotiated.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `len` bytes at host address `start` in `mode`
    /// (`REGISTER_MODE_*`).
    pub fn register(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        ioctl(
            self.fd.as_raw_fd(),
            UFFDIO_REGISTER,
            &mut reg,
            "UFFDIO_REGISTER",
        )
    }

    /// Unregisters a range (write protection on it is dropped and faulting
    /// threads are woken).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        ioctl(
            self.fd.as_raw_fd(),
            UFFDIO_UNREGISTER,
            &mut range,
            "UFFDIO_UNREGISTER",
        )
    }

    /// Write-protects a registered range (`protect`) or removes the
    /// protection; removing it wakes the threads that faulted on it.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            // (The kernel refuses DONTWAKE together with WP.)
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(
            self.fd.as_raw_fd(),
            UFFDIO_WRITEPROTECT,
            &mut wp,
            "UFFDIO_WRITEPROTECT",
        )
    }

    /// Copies `len` bytes from `src` (any readable memory of this process)
    /// into the missing pages at `dst` in a registered range, and wakes
    /// the threads that faulted there. The pages become ordinary (4 KiB)
    /// anonymous pages.
    pub fn copy(&self, dst: u64, src: u64, len: u64) -> io::Result<()> {
        self.copy_or_move(UFFDIO_COPY, "UFFDIO_COPY", dst, src, len)
    }

    /// Moves the pages at `src` (a private anonymous mapping of this
    /// process, populated, not shared) to the missing pages at `dst` in a
    /// registered range, and wakes the threads that faulted there. A
    /// transparent huge page moves whole when both addresses are 2 MiB
    /// aligned and `len` covers it: no copy, and the guest keeps a huge
    /// page. `src` is left unpopulated. Needs [`FEATURE_MOVE`].
    pub fn move_pages(&self, dst: u64, src: u64, len: u64) -> io::Result<()> {
        self.copy_or_move(UFFDIO_MOVE, "UFFDIO_MOVE", dst, src, len)
    }

    fn copy_or_move(
        &self,
        request: u64,
        what: &str,
        dst: u64,
        src: u64,
        len: u64,
    ) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let mut arg = UffdioCopyOrMove {
                dst: dst + done,
                src: src + done,
                len: len - done,
                mode: 0,
                done: 0,
            };
            match ioctl(self.fd.as_raw_fd(), request, &mut arg, what) {
                Ok(()) => return Ok(()),
                // Stopped part way (the kernel asks to come back, e.g. the
                // page tables changed meanwhile): go on from there.
                Err(_) if arg.done > 0 => done += arg.done as u64,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Wakes the threads waiting on faults in a range.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range, "UFFDIO_WAKE")
    }

    /// Reads the pending fault messages into `out` (cleared first); returns
    /// at once with none if nothing is pending. Events other than page
    /// faults are skipped (none are asked for).
    pub fn read_faults(&self, out: &mut Vec<PageFault>) -> io::Result<()> {
        out.clear();
        let mut msgs = [UffdMsg::default(); 16];
        loop {
            // SAFETY: the buffer is writable for its whole size; the kernel
            // writes whole messages only.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            let count = n as usize / std::mem::size_of::<UffdMsg>();
            out.extend(
                msgs[..count]
                    .iter()
                    .filter(|m| m.event == EVENT_PAGEFAULT)
                    .map(|m| PageFault {
                        address: m.address,
                        flags: m.flags,
                    }),
            );
            if count < msgs.len() {
                return Ok(());
            }
        }
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_matches_linux_userfaultfd_h() {
        // Values printed by a C program including <linux/userfaultfd.h>.
        assert_eq!(UFFDIO_API, 0xc018aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018aa06);
        assert_eq!(UFFDIO_COPY, 0xc028aa03);
        // Linux 6.8's header (newer than this host's libc headers).
        assert_eq!(UFFDIO_MOVE, 0xc028aa05);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(std::mem::offset_of!(UffdMsg, flags), 8);
        assert_eq!(std::mem::offset_of!(UffdMsg, address), 16);
    }

    /// A write to a protected page blocks until the handler removes the
    /// protection; the page holds the old value until then.
    #[test]
    fn write_protect_fault_round_trip() {
        let Ok(uffd) = Userfaultfd::new(FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_UNPOPULATED) else {
            panic!("userfaultfd with write-protect is needed (Linux 6.4+, root)");
        };
        let len = 4 << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as u64;
        // SAFETY: inside the mapping.
        unsafe { *(p as *mut u8) = 7 };
        uffd.register(base, len as u64, REGISTER_MODE_WP).unwrap();
        uffd.write_protect(base, len as u64, true).unwrap();
        let addr = base as usize + (3 << 20) + 5; // never touched before
        let writer = std::thread::spawn(move || {
            // SAFETY: inside the mapping, which outlives the thread (joined).
            unsafe {
                *(base as *mut u8) = 9;
                *(addr as *mut u8) = 1;
            }
        });
        let mut seen = Vec::new();
        let mut faults = Vec::new();
        while seen.len() < 2 {
            let mut pfd = libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            assert!(unsafe { libc::poll(&mut pfd, 1, 10_000) } > 0, "no fault");
            uffd.read_faults(&mut faults).unwrap();
            for f in &faults {
                assert!(f.is_write_protect(), "{f:?}");
                if seen.is_empty() {
                    // SAFETY: inside the mapping; protected pages are readable.
                    let old = unsafe { *(p as *const u8) };
                    assert_eq!(old, 7, "the write went through the protection");
                }
                seen.push(f.address);
                uffd.write_protect(f.address & !4095, 4096, false).unwrap();
            }
        }
        writer.join().unwrap();
        assert_eq!(seen, vec![base, addr as u64 & !4095]);
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(p, len) };
    }
}
