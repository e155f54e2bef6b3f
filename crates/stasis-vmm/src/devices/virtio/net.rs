//! virtio-net (device type 1) on a host tap device.
//!
//! Queues: receive (0) and transmit (1). Features: `VIRTIO_NET_F_MAC`
//! (the MAC is in the configuration space); no offloads, so every frame is
//! preceded by a 12-byte `virtio_net_hdr_v1` that is all zeros except
//! `num_buffers` = 1 on receive, and that is dropped on transmit.
//!
//! Both run in the device's I/O thread. Transmit when queue 1 is notified;
//! receive when the tap has frames: the thread polls the tap while the device is live,
//! running and has receive buffers, and moves frames into buffers with the
//! transport mutex held. When the receive queue is empty it stops polling
//! the tap (frames wait in the tap's queue, or the kernel drops them) until
//! the driver notifies queue 0.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use stasis_config::MacAddr;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::state::BackendState;
use super::tap::Tap;
use super::{DeviceContext, VirtioDevice, VirtioError, WorkerSpec, TYPE_NET};

/// `VIRTIO_NET_F_MAC`: the device has a MAC address in its config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of `struct virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
/// The largest frame moved (a 64 KiB IP packet plus an Ethernet header).
pub const MAX_FRAME: usize = 65536 + 14;
/// Both queues' maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// Frames received per worker wake-up before the mutex is released.
const RX_BATCH: usize = 64;

/// Where frames come from and go: the tap, or a datagram socket in tests.
pub trait FrameIo: Send + Sync + AsRawFd {
    /// Reads one frame (non-blocking: `WouldBlock` when none waits).
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize>;
    /// A name for messages and the saved state.
    fn name(&self) -> String;
}

impl FrameIo for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        Tap::write_frame(self, frame)
    }
    fn name(&self) -> String {
        Tap::name(self).to_string()
    }
}

/// The frame that tells switches where the guest's MAC is now, as QEMU
/// and hypervisors after it send after a migration: a broadcast reverse-ARP
/// request (EtherType 0x8035, RFC 903) from and about `mac`, padded to the
/// Ethernet minimum. Guests need no driver support for it (unlike
/// `VIRTIO_NET_F_GUEST_ANNOUNCE`).
pub fn rarp_announcement(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac); // sender hardware address
    f[32..38].copy_from_slice(&mac); // target hardware address
    f
}

/// A virtio-net device.
pub struct Net {
    id: String,
    io: Arc<dyn FrameIo>,
    mac: MacAddr,
    config: [u8; 6],
    /// The worker polls the tap only while this is set.
    want_rx: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    live: bool,
    running: bool,
    frame: Vec<u8>,
}

impl Net {
    /// A device on the tap `tap` with address `mac`.
    pub fn open(id: &str, tap: &str, mac: MacAddr) -> Result<Self, VirtioError> {
        let tap = Tap::open(tap).map_err(|message| VirtioError::Backend {
            kind: "virtio-net",
            id: id.to_string(),
            message,
        })?;
        Self::with_io(id, Arc::new(tap), mac)
    }

    /// A device on any frame source (tests use a socket pair).
    pub fn with_io(id: &str, io: Arc<dyn FrameIo>, mac: MacAddr) -> Result<Self, VirtioError> {
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VirtioError::Host {
            kind: "virtio-net",
            id: id.to_string(),
            what: "cannot create the wake-up eventfd",
            source,
        })?;
        Ok(Self {
            id: id.to_string(),
            io,
            mac,
            config: mac.0,
            want_rx: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(wake),
            live: false,
            running: false,
            frame: vec![0; NET_HDR_LEN + MAX_FRAME],
        })
    }

    /// The MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Tells the worker whether to poll the tap.
    fn want(&self, want: bool) {
        let want = want && self.live && self.running;
        if self.want_rx.swap(want, Ordering::SeqCst) != want && want {
            let _ = self.wake.write(1);
        }
    }

    fn transmit(&mut self, ctx: &mut DeviceContext) -> bool {
        let mem = ctx.mem;
        let mut completed = 0usize;
        while let Some(chain) = ctx.queues[TX_QUEUE].pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut r) => {
                    let len = r.available_bytes();
                    if !(NET_HDR_LEN..=NET_HDR_LEN + MAX_FRAME).contains(&len) {
                        tracing::debug!("virtio-net '{}': dropped {len}-byte TX buffer", self.id);
                    } else if r.read_exact(&mut self.frame[..len]).is_ok() {
                        if let Err(e) = self.io.write_frame(&self.frame[NET_HDR_LEN..len]) {
                            tracing::debug!("virtio-net '{}': tap write: {e}", self.id);
                        }
                    }
                }
                Err(e) => tracing::warn!("virtio-net '{}': bad TX chain: {e}", self.id),
            }
            if let Err(e) = ctx.queues[TX_QUEUE].add_used(mem, head, 0) {
                tracing::warn!("virtio-net '{}': cannot complete TX: {e}", self.id);
                break;
            }
            completed += 1;
            if completed >= super::BATCH {
                break;
            }
        }
        if completed > 0 {
            ctx.signal_used(TX_QUEUE);
        }
        completed >= super::BATCH
    }

    fn receive(&mut self, ctx: &mut DeviceContext) {
        let mem = ctx.mem;
        let mut delivered = false;
        // Whether to keep polling the tap: yes when it ran dry or the batch
        // ended (poll then returns at once), no without buffers or on an
        // error (until the driver notifies queue 0 again).
        let mut poll_tap = true;
        for _ in 0..RX_BATCH {
            let q = &mut ctx.queues[RX_QUEUE];
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // No buffers: stop polling until the driver adds some.
                poll_tap = false;
                break;
            };
            let n = match self.io.read_frame(&mut self.frame[NET_HDR_LEN..]) {
                Ok(n) => n,
                Err(e) => {
                    q.go_to_previous_position();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::warn!("virtio-net '{}': tap read: {e}", self.id);
                        poll_tap = false;
                    }
                    break;
                }
            };
            let hdr = &mut self.frame[..NET_HDR_LEN];
            hdr.fill(0);
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
            let head = chain.head_index();
            let mut w = match chain.writer(mem) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!("virtio-net '{}': bad RX chain: {e}", self.id);
                    let _ = q.add_used(mem, head, 0);
                    delivered = true;
                    continue;
                }
            };
            if w.available_bytes() < NET_HDR_LEN + n {
                // Too small for this frame: drop the frame, keep the buffer.
                tracing::debug!(
                    "virtio-net '{}': dropped a {n}-byte frame (RX buffer of {} bytes)",
                    self.id,
                    w.available_bytes()
                );
                q.go_to_previous_position();
                continue;
            }
            let len = NET_HDR_LEN + n;
            let _ = w.write_all(&self.frame[..len]);
            if let Err(e) = q.add_used(mem, head, len as u32) {
                tracing::warn!("virtio-net '{}': cannot complete RX: {e}", self.id);
                poll_tap = false;
                break;
            }
            delivered = true;
        }
        if delivered {
            ctx.signal_used(RX_QUEUE);
        }
        self.want(poll_tap);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn kind(&self) -> &'static str {
        "virtio-net"
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, _ctx: &mut DeviceContext) {
        self.live = true;
        self.want(true);
    }

    fn reset(&mut self) {
        self.live = false;
        self.want(false);
    }

    fn process_queue(&mut self, index: usize, ctx: &mut DeviceContext) -> bool {
        match index {
            RX_QUEUE => {
                self.want(true);
                false
            }
            TX_QUEUE => self.transmit(ctx),
            _ => false,
        }
    }

    fn backend_ready(&mut self, ctx: &mut DeviceContext) {
        if self.live && self.running {
            self.receive(ctx);
        }
    }

    fn set_running(&mut self, running: bool) {
        self.running = running;
        self.want(running);
    }

    fn worker(&self) -> Option<WorkerSpec> {
        Some(WorkerSpec {
            fd: self.io.as_raw_fd(),
            want: self.want_rx.clone(),
            wake: self.wake.clone(),
        })
    }

    fn handover_file(&self) -> Option<std::io::Result<(String, std::fs::File)>> {
        // SAFETY: the descriptor belongs to `self.io`, which lives as long
        // as `self`; it is only borrowed to be duplicated.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.io.as_raw_fd()) };
        Some(
            fd.try_clone_to_owned()
                .map(|owned| (self.io.name(), std::fs::File::from(owned))),
        )
    }

    fn announce(&self) {
        if let Err(e) = self.io.write_frame(&rarp_announcement(self.config)) {
            tracing::warn!("virtio-net '{}': cannot announce the guest: {e}", self.id);
        }
    }

    fn save_backend(&self) -> BackendState {
        BackendState::Net {
            tap: self.io.name(),
            mac: self.mac.to_string(),
        }
    }
}

impl AsRawFd for Net {
    fn as_raw_fd(&self) -> RawFd {
        self.io.as_raw_fd()
    }
}

#[cfg(test)]
mod tests;
