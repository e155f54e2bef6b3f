//! virtio-rng (device type 4): one request queue whose buffers are filled
//! from the host's `getrandom(2)`, in the vCPU thread that notified it.

use std::io::Write;

use virtio_queue::QueueT;

use super::state::BackendState;
use super::{DeviceContext, VirtioDevice, TYPE_RNG};

/// The request queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes given for one buffer.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A virtio-rng device.
pub struct Rng {
    id: String,
    buf: Vec<u8>,
}

impl Rng {
    /// A new entropy device.
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            buf: Vec::new(),
        }
    }
}

/// Fills `buf` from `getrandom(2)`.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // which is valid and exclusively borrowed for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn kind(&self) -> &'static str {
        "virtio-rng"
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> &[u8] {
        &[]
    }

    fn process_queue(&mut self, index: usize, ctx: &mut DeviceContext) -> bool {
        let mem = ctx.mem;
        let mut completed = 0usize;
        while let Some(chain) = ctx.queues[index].pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match chain.writer(mem) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(MAX_REQUEST);
                    self.buf.resize(n, 0);
                    match fill_random(&mut self.buf) {
                        Ok(()) => {
                            let _ = w.write_all(&self.buf);
                            w.bytes_written()
                        }
                        Err(e) => {
                            tracing::warn!("virtio-rng '{}': getrandom: {e}", self.id);
                            0
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("virtio-rng '{}': bad request chain: {e}", self.id);
                    0
                }
            };
            if let Err(e) = ctx.queues[index].add_used(mem, head, len as u32) {
                tracing::warn!("virtio-rng '{}': cannot complete request: {e}", self.id);
                break;
            }
            completed += 1;
            if completed >= super::BATCH {
                break;
            }
        }
        if completed > 0 {
            ctx.signal_used(index);
        }
        completed >= super::BATCH
    }

    fn save_backend(&self) -> BackendState {
        BackendState::Rng
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::devices::virtio::mmio::reg;
    use crate::devices::virtio::testutil::*;

    #[test]
    fn buffers_are_filled_with_entropy() {
        let mem = memory();
        let (mut t, _irq) = transport(Box::new(Rng::new("rng0")), &mem);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), TYPE_RNG);
        let vq = MockSplitQueue::create(&mem, ring_addr(0), 8);
        init(&mut t, 0, &[&vq], 8);
        offer(&vq, 0, &[wo(0x20_0000, 256)]);
        offer(&vq, 1, &[wo(0x30_0000, 128 << 10)]);
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(used_idx(&vq), 2);
        assert_eq!(used(&vq, 0), (0, 256));
        // At most MAX_REQUEST per buffer.
        assert_eq!(used(&vq, 1), (1, MAX_REQUEST as u32));
        let a = read_mem(&mem, 0x20_0000, 256);
        assert!(a.iter().filter(|&&b| b == 0).count() < 32, "{a:?}");
        assert!(read_mem(&mem, 0x30_0000 + MAX_REQUEST as u64, 64)
            .iter()
            .all(|&b| b == 0));
    }
}
