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

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemory, Permissions};

use crate::memory::GuestRam;

/// The most `iovec`s one `preadv`/`pwritev` takes (`IOV_MAX`).
const IOV_MAX: usize = 1024;

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

    /// `iovec`s for bytes `at..at + len` of the readable or writable part,
    /// at most [`IOV_MAX`].
    fn iovecs(&mut self, writable: bool, at: usize, len: usize) -> &[libc::iovec] {
        let segs = if writable {
            &self.writable
        } else {
            &self.readable
        };
        self.iov.clear();
        self.iov.extend(
            Self::pieces(segs, at, len)
                .take(IOV_MAX)
                .map(|p| libc::iovec {
                    iov_base: p.addr as *mut libc::c_void,
                    iov_len: p.len,
                }),
        );
        &self.iov
    }

    /// Reads `len` bytes of `file` at `off` into writable bytes `at..`.
    pub fn pread(&mut self, file: &File, at: usize, len: usize, off: u64) -> io::Result<()> {
        self.transfer(file, true, at, len, off)
    }

    /// Writes readable bytes `at..at + len` to `file` at `off`.
    pub fn pwrite(&mut self, file: &File, at: usize, len: usize, off: u64) -> io::Result<()> {
        self.transfer(file, false, at, len, off)
    }

    fn transfer(
        &mut self,
        file: &File,
        into_guest: bool,
        at: usize,
        len: usize,
        off: u64,
    ) -> io::Result<()> {
        let total = if into_guest {
            self.writable_len()
        } else {
            self.readable_len()
        };
        if at + len > total {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the request's buffers are shorter than the transfer",
            ));
        }
        let fd = file.as_raw_fd();
        let mut done = 0;
        while done < len {
            let iov = self.iovecs(into_guest, at + done, len - done);
            let pos = (off + done as u64) as libc::off_t;
            // SAFETY: every iovec covers checked guest memory that stays
            // mapped while the caller holds it (writable pieces for a read
            // into the guest); the kernel reads or writes only those bytes.
            let n = unsafe {
                if into_guest {
                    libc::preadv(fd, iov.as_ptr(), iov.len() as libc::c_int, pos)
                } else {
                    libc::pwritev(fd, iov.as_ptr(), iov.len() as libc::c_int, pos)
                }
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        if into_guest {
                            "the image ended"
                        } else {
                            "the image took no more bytes"
                        },
                    ))
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}
