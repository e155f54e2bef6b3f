//! virtio-blk (device type 2) on a disk image: raw or qcow2, through
//! [`stasis_disk::DiskBackend`].
//!
//! One request queue. Requests: read, write, flush (the image's writes and
//! metadata durable before the request completes), get-id (the device id,
//! truncated to 20 bytes), discard (a hole punched in a raw image, clusters
//! released in a qcow2 one). A read-only disk offers
//! `VIRTIO_BLK_F_RO`, opens the image read-only, and fails writes and
//! discards with `VIRTIO_BLK_S_IOERR` without touching the image. Every
//! request is executed by the device's I/O thread, in batches (see the
//! module docs of [`super`]).
//!
//! Data moves between the image and guest memory without a copy through
//! the VMM ([`buffers`] hands the request's guest buffers to the backend as
//! I/O slices: `preadv`/`pwritev` for raw images).
//!
//! A checkpoint changes the image under a paused device
//! ([`Block::checkpoint_disk`]): a qcow2 internal snapshot taken or
//! applied, or the disk moved onto a new overlay.
//!
//! The image is locked with `flock` (exclusive for a writable disk, shared
//! for a read-only one), so two VMs cannot write one image at once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use stasis_config::DiskConfig;
use stasis_disk::{DiskBackend, DiskFormat};
use virtio_queue::{DescriptorChain, QueueT};

use super::state::BackendState;
use super::{DeviceContext, VirtioDevice, VirtioError, TYPE_BLOCK};
use crate::memory::GuestRam;

/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_FLUSH`: flush requests (a write-back cache).
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// `VIRTIO_BLK_F_DISCARD`: discard requests.
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Get the device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error (also: writes to a read-only disk, out-of-range).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Sector size of the virtio-blk interface.
pub const SECTOR_SIZE: u64 = 512;
/// The request queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// `seg_max`: data segments per request (the queue size less the header
/// and status descriptors).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// `max_discard_sectors`: 2 GiB per segment.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// `max_discard_seg`.
pub const MAX_DISCARD_SEG: u32 = 32;
/// `discard_sector_alignment`: 4 KiB, the usual file-system block.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Length of the id string returned by get-id.
pub const ID_BYTES: usize = 20;
/// Size of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and
/// its padding.
pub const CONFIG_SIZE: usize = 0x3c;

mod buffers;
use buffers::RequestBuffers;

/// Length of a request's header (`struct virtio_blk_outhdr`).
const HEADER: usize = 16;

/// A virtio-blk disk.
pub struct Block {
    id: String,
    path: PathBuf,
    backend: Box<dyn DiskBackend>,
    /// Holds the image's `flock` (a descriptor of its own: imago opens
    /// the image itself).
    lock: File,
    /// Shared `flock`s on the images this disk froze under overlays.
    frozen_locks: Vec<File>,
    size: u64,
    readonly: bool,
    config: Vec<u8>,
    bufs: RequestBuffers,
    warnings: super::GuestWarnings,
}

impl Block {
    /// Opens (and locks) the image `cfg` names.
    pub fn open(cfg: &DiskConfig) -> Result<Self, VirtioError> {
        let err = |message: String| VirtioError::Backend {
            kind: "virtio-blk",
            id: cfg.id.clone(),
            message,
        };
        let file = File::open(&cfg.path).map_err(|e| {
            err(format!(
                "cannot open disk image {}: {e}",
                cfg.path.display()
            ))
        })?;
        let meta = file
            .metadata()
            .map_err(|e| err(format!("cannot stat {}: {e}", cfg.path.display())))?;
        if !meta.is_file() {
            return Err(err(format!("{} is not a regular file", cfg.path.display())));
        }
        let op = if cfg.readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(if e.kind() == std::io::ErrorKind::WouldBlock {
                format!(
                    "disk image {} is in use by another VM (it holds a {} lock)",
                    cfg.path.display(),
                    if cfg.readonly {
                        "write"
                    } else {
                        "read or write"
                    }
                )
            } else {
                format!("cannot lock {}: {e}", cfg.path.display())
            }));
        }
        // Locked before the backend opens it: a qcow2 image left dirty is
        // repaired on open, which only its one user may do.
        let backend = stasis_disk::open(&cfg.path, cfg.format, cfg.readonly).map_err(|e| {
            err(format!(
                "cannot open disk image {}: {e}",
                cfg.path.display()
            ))
        })?;
        let size = backend.size();
        if !size.is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                "virtio-blk '{}': {} is {size} bytes, not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible to the guest",
                cfg.id,
                cfg.path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Self::from_backend(&cfg.id, backend, file, cfg.readonly))
    }

    fn from_backend(id: &str, backend: Box<dyn DiskBackend>, lock: File, readonly: bool) -> Self {
        let size = backend.size();
        Self {
            id: id.to_string(),
            path: backend.path().to_path_buf(),
            backend,
            lock,
            frozen_locks: Vec::new(),
            size,
            readonly,
            config: config_space(size / SECTOR_SIZE),
            bufs: RequestBuffers::default(),
            warnings: Default::default(),
        }
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image's format.
    pub fn format(&self) -> DiskFormat {
        self.backend.format()
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Executes one request; returns the number of bytes written into the
    /// chain's device-writable part (status byte included).
    fn execute(&mut self, mem: &GuestRam, chain: DescriptorChain<&GuestRam>) -> u32 {
        let mut bufs = std::mem::take(&mut self.bufs);
        let written = self.execute_in(&mut bufs, mem, chain);
        self.bufs = bufs;
        written
    }

    fn execute_in(
        &mut self,
        bufs: &mut RequestBuffers,
        mem: &GuestRam,
        chain: DescriptorChain<&GuestRam>,
    ) -> u32 {
        if let Err(e) = bufs.load(mem, chain) {
            self.warnings.warn(
                "virtio-blk",
                &self.id,
                format_args!("bad request chain: {e}"),
            );
            return 0;
        }
        let writable = bufs.writable_len();
        if writable == 0 {
            self.warnings.warn(
                "virtio-blk",
                &self.id,
                format_args!("request without a status byte"),
            );
            return 0;
        }
        // The status is the last writable byte; data comes before it.
        let room = writable - 1;
        let mut header = [0u8; HEADER];
        let (status, data_written) = if !bufs.read_bytes(0, &mut header) {
            self.warnings.warn(
                "virtio-blk",
                &self.id,
                format_args!("request header too short"),
            );
            (VIRTIO_BLK_S_IOERR, 0)
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            match kind {
                VIRTIO_BLK_T_IN => self.read(bufs, sector, room),
                VIRTIO_BLK_T_OUT => (self.write(bufs, sector), 0),
                VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
                VIRTIO_BLK_T_GET_ID => self.get_id(bufs, room),
                VIRTIO_BLK_T_DISCARD => (self.discard(bufs), 0),
                other => {
                    tracing::debug!("virtio-blk '{}': unsupported request {other}", self.id);
                    (VIRTIO_BLK_S_UNSUPP, 0)
                }
            }
        };
        bufs.write_bytes(room, &[status]);
        (data_written + 1) as u32
    }

    /// Checks that `len` bytes at `sector` are within the disk and whole
    /// sectors; returns the byte offset.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            tracing::debug!(
                "virtio-blk '{}': {len}-byte request is not whole sectors",
                self.id
            );
            return None;
        }
        let off = sector.checked_mul(SECTOR_SIZE)?;
        let end = off.checked_add(len)?;
        if end > self.capacity() * SECTOR_SIZE {
            tracing::debug!(
                "virtio-blk '{}': request {off:#x}+{len:#x} beyond the disk's {} sectors",
                self.id,
                self.capacity()
            );
            return None;
        }
        Some(off)
    }

    /// Reads into the `len` writable bytes before the status; returns
    /// the status and the bytes written.
    fn read(&mut self, bufs: &mut RequestBuffers, sector: u64, len: usize) -> (u8, usize) {
        let Some(off) = self.range(sector, len as u64) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        match bufs.read_into_guest(self.backend.as_ref(), 0, len, off) {
            Ok(()) => (VIRTIO_BLK_S_OK, len),
            Err(e) => {
                tracing::warn!("virtio-blk '{}': read at {off:#x}: {e}", self.id);
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    /// Writes the readable bytes after the header.
    fn write(&mut self, bufs: &mut RequestBuffers, sector: u64) -> u8 {
        if self.readonly {
            return VIRTIO_BLK_S_IOERR;
        }
        let len = bufs.readable_len() - HEADER;
        let Some(off) = self.range(sector, len as u64) else {
            return VIRTIO_BLK_S_IOERR;
        };
        match bufs.write_from_guest(self.backend.as_ref(), HEADER, len, off) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                tracing::warn!("virtio-blk '{}': write at {off:#x}: {e}", self.id);
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    fn flush(&mut self) -> u8 {
        if self.readonly {
            return VIRTIO_BLK_S_OK;
        }
        match self.backend.flush() {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                tracing::warn!("virtio-blk '{}': flush: {e}", self.id);
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    /// Writes the id into the `room` writable bytes before the status
    /// (truncated to them); returns the status and the bytes written.
    fn get_id(&mut self, bufs: &RequestBuffers, room: usize) -> (u8, usize) {
        let mut id = [0u8; ID_BYTES];
        let n = self.id.len().min(ID_BYTES);
        id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
        let len = room.min(ID_BYTES);
        if bufs.write_bytes(0, &id[..len]) {
            (VIRTIO_BLK_S_OK, len)
        } else {
            (VIRTIO_BLK_S_IOERR, 0)
        }
    }

    fn discard(&mut self, bufs: &RequestBuffers) -> u8 {
        if self.readonly {
            return VIRTIO_BLK_S_IOERR;
        }
        let len = bufs.readable_len() - HEADER;
        if len == 0 || !len.is_multiple_of(16) || len / 16 > MAX_DISCARD_SEG as usize {
            tracing::debug!(
                "virtio-blk '{}': discard with {len} bytes of segments",
                self.id
            );
            return VIRTIO_BLK_S_UNSUPP;
        }
        let mut segments = Vec::with_capacity(len / 16);
        for i in 0..len / 16 {
            let mut seg = [0u8; 16];
            if !bufs.read_bytes(HEADER + 16 * i, &mut seg) {
                return VIRTIO_BLK_S_IOERR;
            }
            let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
            if flags != 0 {
                return VIRTIO_BLK_S_UNSUPP;
            }
            if sectors > MAX_DISCARD_SECTORS {
                return VIRTIO_BLK_S_IOERR;
            }
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let Some(off) = self.range(sector, bytes) else {
                return VIRTIO_BLK_S_IOERR;
            };
            segments.push((off, bytes));
        }
        for (off, bytes) in segments {
            if bytes == 0 {
                continue;
            }
            if let Err(e) = self.backend.discard(off, bytes) {
                tracing::warn!("virtio-blk '{}': discard at {off:#x}: {e}", self.id);
                return VIRTIO_BLK_S_IOERR;
            }
        }
        VIRTIO_BLK_S_OK
    }
}

impl Block {
    /// Changes the image under the paused device for a checkpoint.
    fn checkpoint(&mut self, op: &super::DiskCheckpointOp) -> std::io::Result<()> {
        use super::DiskCheckpointOp as Op;
        if *op == Op::Close {
            let flushed = self.sync_backend();
            let closed = stasis_disk::ClosedDisk::replacing(self.backend.as_ref());
            self.backend = Box::new(closed);
            // SAFETY: flock on an fd we own; no memory is involved.
            unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_UN) };
            self.frozen_locks.clear();
            return flushed;
        }
        if self.readonly {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the disk is read-only",
            ));
        }
        match op {
            Op::Close => Ok(()),
            Op::TakeInternal(name) => self.backend.take_internal_snapshot(name),
            Op::DeleteInternal(name) => self.backend.delete_internal_snapshot(name),
            Op::Flush => self.backend.flush(),
            Op::Overlay(path) => {
                stasis_disk::switch_to_overlay(&mut self.backend, path)?;
                self.path = path.clone();
                // The exclusive lock moves to the image the guest now
                // writes; the frozen image keeps a shared one, so nothing
                // rewrites it in place while this VM reads it.
                // SAFETY: flock on an fd we own; no memory is involved.
                unsafe { libc::flock(self.lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
                match File::open(path) {
                    Ok(lock) => {
                        // SAFETY: as above.
                        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }
                            != 0
                        {
                            tracing::warn!(
                                "virtio-blk '{}': cannot lock {}: {}",
                                self.id,
                                path.display(),
                                std::io::Error::last_os_error()
                            );
                        }
                        let frozen = std::mem::replace(&mut self.lock, lock);
                        self.frozen_locks.push(frozen);
                    }
                    Err(e) => tracing::warn!(
                        "virtio-blk '{}': cannot open {} to lock it: {e}",
                        self.id,
                        path.display()
                    ),
                }
                Ok(())
            }
        }
    }
}

/// `struct virtio_blk_config` for a disk of `capacity` sectors.
pub fn config_space(capacity: u64) -> Vec<u8> {
    let mut c = vec![0u8; CONFIG_SIZE];
    c[0x00..0x08].copy_from_slice(&capacity.to_le_bytes());
    c[0x0c..0x10].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[0x24..0x28].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[0x28..0x2c].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[0x2c..0x30].copy_from_slice(&DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn kind(&self) -> &'static str {
        "virtio-blk"
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let f = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD;
        if self.readonly {
            f | VIRTIO_BLK_F_RO
        } else {
            f
        }
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn process_queue(&mut self, index: usize, ctx: &mut DeviceContext) -> bool {
        let mem = ctx.mem;
        let mut completed = 0;
        let mut bytes = 0u64;
        let mut more = false;
        while let Some(chain) = ctx.queues[index].pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let size: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
            let len = self.execute(mem, chain);
            if let Err(e) = ctx.queues[index].add_used(mem, head, len) {
                tracing::warn!("virtio-blk '{}': cannot complete request: {e}", self.id);
                break;
            }
            completed += 1;
            bytes += size;
            if completed >= super::BATCH || bytes >= super::BATCH_BYTES {
                more = true;
                break;
            }
        }
        if completed > 0 {
            ctx.signal_used(index);
        }
        more
    }

    fn sync_backend(&self) -> std::io::Result<()> {
        if self.readonly {
            Ok(())
        } else {
            self.backend.flush()
        }
    }

    fn hand_over_backend(&self, release: bool) -> std::io::Result<()> {
        let op = match (release, self.readonly) {
            (true, _) => libc::LOCK_UN,
            (false, true) => libc::LOCK_SH | libc::LOCK_NB,
            (false, false) => libc::LOCK_EX | libc::LOCK_NB,
        };
        // SAFETY: flock on an fd we own; no memory is involved.
        if unsafe { libc::flock(self.lock.as_raw_fd(), op) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot lock disk image {} again: {e}", self.path.display()),
            ));
        }
        Ok(())
    }

    fn disk_image(&self) -> Option<super::DiskImage> {
        Some(super::DiskImage {
            id: self.id.clone(),
            path: self.path.clone(),
            format: self.backend.format(),
            readonly: self.readonly,
            size: self.size,
        })
    }

    fn checkpoint_disk(&mut self, op: &super::DiskCheckpointOp) -> Option<std::io::Result<()>> {
        Some(self.checkpoint(op))
    }

    fn save_backend(&self) -> BackendState {
        BackendState::Block {
            path: self.path.clone(),
            size: self.size,
            readonly: self.readonly,
        }
    }
}

#[cfg(test)]
mod tests;
