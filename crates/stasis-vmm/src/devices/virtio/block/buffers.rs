//! A virtio-blk request's guest buffers as host memory, so that the image's
//! bytes move once, in the kernel, straight between the file and guest
//! memory (`preadv`/`pwritev`).
//!
//! Written here rather than taken from the virtio-queue crate: its
//! `Reader`/`Writer` copy through a buffer of the caller's and allocate
//! per request, which at small requests costs as much as the read itself.
//! Framing is free-form, as virtio 1.x requires (2.7.4, "message framing":
//! the device makes no assumption about how descriptors divide a request):
//! the header, the data and the status byte are byte ranges of the
//! chain's device-readable and device-writable parts, wherever descriptor
//! boundaries fall.
//!
//! Guest memory has no dirty bitmap (`GuestMemoryMmap<()>`): when one comes
//! (live migration must see device writes, which KVM's dirty log does not),
//! the writable ranges get marked where [`RequestBuffers::pread`] and
//! [`RequestBuffers::write_bytes`] fill them.

use std::io::{self, IoSlice, IoSliceMut};

use stasis_disk::DiskBackend;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, Permissions};

use crate::memory::GuestRam;

/// One piece of guest memory, as a host address and length.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: usize,
    len: usize,
}

/// The buffers of one request; kept across requests to reuse their
/// allocations. Valid only while the guest memory given to
/// [`RequestBuffers::load`] is borrowed: [`super::Block`] loads and uses
/// them within one request.
#[derive(Debug, Default)]
pub struct RequestBuffers {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    /// Scratch for the `iovec`s of one transfer.
    iov: Vec<libc::iovec>,
}

// SAFETY: the segments are plain addresses into guest memory, used only by
// the thread that loaded them while it holds the guest memory borrow; the
// `iovec`s are scratch built from them on that thread.
unsafe impl Send for RequestBuffers {}

impl RequestBuffers {
    /// Takes the request's descriptors. Fails if one lies outside guest
    /// memory, or a device-readable one follows a device-writable one.
    pub fn load(
        &mut self,
        mem: &GuestRam,
        chain: DescriptorChain<&GuestRam>,
    ) -> Result<(), String> {
        self.readable.clear();
        self.writable.clear();
        for desc in chain {
            let write = desc.is_write_only();
            if !write && !self.writable.is_empty() {
                return Err("a device-readable descriptor follows a device-writable one".into());
            }
            let access = if write {
                Permissions::Write
            } else {
                Permissions::Read
            };
            let slices = mem
                .get_slices(desc.addr(), desc.len() as usize, access)
                .map_err(|e| format!("descriptor at {:#x}: {e}", desc.addr().0))?;
            for slice in slices {
                let slice =
                    slice.map_err(|e| format!("descriptor at {:#x}: {e}", desc.addr().0))?;
                let seg = Segment {
                    addr: slice.ptr_guard_mut().as_ptr() as usize,
                    len: slice.len(),
                };
                if write {
                    self.writable.push(seg);
                } else {
                    self.readable.push(seg);
                }
            }
        }
        Ok(())
    }

    /// Bytes the device may read.
    pub fn readable_len(&self) -> usize {
        self.readable.iter().map(|s| s.len).sum()
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> usize {
        self.writable.iter().map(|s| s.len).sum()
    }

    /// The pieces of `segs` that make up bytes `at..at + len`.
    fn pieces(segs: &[Segment], at: usize, len: usize) -> impl Iterator<Item = Segment> + '_ {
        let mut skip = at;
        let mut left = len;
        segs.iter().filter_map(move |s| {
            if left == 0 {
                return None;
            }
            if skip >= s.len {
                skip -= s.len;
                return None;
            }
            let n = (s.len - skip).min(left);
            let piece = Segment {
                addr: s.addr + skip,
                len: n,
            };
            skip = 0;
            left -= n;
            Some(piece)
        })
    }

    /// Copies readable bytes `at..at + out.len()` into `out`; false if the
    /// request is shorter.
    pub fn read_bytes(&self, at: usize, out: &mut [u8]) -> bool {
        if at + out.len() > self.readable_len() {
            return false;
        }
        let mut done = 0;
        for p in Self::pieces(&self.readable, at, out.len()) {
            // SAFETY: `p` lies within a guest memory slice that `load`
            // checked and that stays mapped while the caller holds the
            // guest memory; `out` is ours. The guest may write the bytes
            // meanwhile: it gets what it gets, as with any device.
            unsafe {
                std::ptr::copy_nonoverlapping(p.addr as *const u8, out[done..].as_mut_ptr(), p.len)
            };
            done += p.len;
        }
        true
    }

    /// Copies `data` into writable bytes `at..at + data.len()`; false if
    /// the request is shorter.
    pub fn write_bytes(&self, at: usize, data: &[u8]) -> bool {
        if at + data.len() > self.writable_len() {
            return false;
        }
        let mut done = 0;
        for p in Self::pieces(&self.writable, at, data.len()) {
            // SAFETY: as in `read_bytes`, the destination is checked guest
            // memory the device may write.
            unsafe {
                std::ptr::copy_nonoverlapping(data[done..].as_ptr(), p.addr as *mut u8, p.len)
            };
            done += p.len;
        }
        true
    }

    /// The pieces of bytes `at..at + len` of the writable (`writable`) or
    /// readable part as `iovec`s in the reused scratch vector.
    fn fill_iov(&mut self, writable: bool, at: usize, len: usize) {
        let segs = if writable {
            &self.writable
        } else {
            &self.readable
        };
        self.iov.clear();
        self.iov
            .extend(Self::pieces(segs, at, len).map(|p| libc::iovec {
                iov_base: p.addr as *mut libc::c_void,
                iov_len: p.len,
            }));
    }

    /// Reads `len` bytes of the disk at `off` into writable bytes `at..`.
    pub fn read_into_guest(
        &mut self,
        disk: &dyn DiskBackend,
        at: usize,
        len: usize,
        off: u64,
    ) -> io::Result<()> {
        if at + len > self.writable_len() {
            return Err(short_buffers());
        }
        self.fill_iov(true, at, len);
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec` on Unix (std
        // guarantees it); each iovec covers guest memory that `load`
        // checked as device-writable and that stays mapped while the
        // caller holds the guest memory, and the slices live only for this
        // call (borrowing `self`). The guest may touch the bytes meanwhile:
        // it gets what it gets, as with any device.
        let slices = unsafe {
            std::slice::from_raw_parts_mut(
                self.iov.as_mut_ptr() as *mut IoSliceMut<'_>,
                self.iov.len(),
            )
        };
        disk.read_vectored_at(slices, off)
    }

    /// Writes readable bytes `at..at + len` to the disk at `off`.
    pub fn write_from_guest(
        &mut self,
        disk: &dyn DiskBackend,
        at: usize,
        len: usize,
        off: u64,
    ) -> io::Result<()> {
        if at + len > self.readable_len() {
            return Err(short_buffers());
        }
        self.fill_iov(false, at, len);
        // SAFETY: as in `read_into_guest`: `IoSlice` is ABI-compatible with
        // `iovec`, over checked guest memory the device may read, for the
        // duration of this call.
        let slices = unsafe {
            std::slice::from_raw_parts(self.iov.as_ptr() as *const IoSlice<'_>, self.iov.len())
        };
        disk.write_vectored_at(slices, off)
    }
}

fn short_buffers() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "the request's buffers are shorter than the transfer",
    )
}
