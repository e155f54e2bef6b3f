//! virtio-console (device type 3) with one port and no optional features:
//! queue 0 receives (nothing is ever sent to the guest: the console is
//! output only), queue 1 transmits. What the guest transmits goes to the
//! same kinds of destination as COM1 (stdout, a file, a UNIX socket, or
//! nowhere; see [`crate::devices::serial::open_output`]), written in the
//! vCPU thread that notified queue 1.

use std::io::{Read, Write};

use stasis_config::SerialConfig;
use virtio_queue::QueueT;

use super::state::BackendState;
use super::{DeviceContext, VirtioDevice, VirtioError, TYPE_CONSOLE};
use crate::devices::serial;

/// Both queues' maximum size.
pub const QUEUE_SIZE: u16 = 64;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// The most bytes taken from one transmit buffer (the rest is dropped).
const MAX_WRITE: u64 = 1 << 20;
/// `struct virtio_console_config` (cols, rows, max_nr_ports, emerg_wr):
/// none of its fields is valid without a feature we offer, so all zero.
const CONFIG: [u8; 12] = [0; 12];

/// A virtio-console device.
pub struct Console {
    id: String,
    output: SerialConfig,
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
}

impl Console {
    /// Opens the output destination and creates the device. A socket
    /// destination accepts one client at a time; what it sends is dropped.
    pub fn open(id: &str, output: &SerialConfig) -> Result<Self, VirtioError> {
        let mut o = serial::open_output(output).map_err(|e| VirtioError::Backend {
            kind: "virtio-console",
            id: id.to_string(),
            message: e.to_string(),
        })?;
        o.start_socket(&format!("console-{id}"), Box::new(|_| {}))
            .map_err(|e| VirtioError::Backend {
                kind: "virtio-console",
                id: id.to_string(),
                message: e.to_string(),
            })?;
        Ok(Self::with_writer(id, output.clone(), o.writer))
    }

    /// A device writing to `out` (tests).
    pub fn with_writer(id: &str, output: SerialConfig, out: Box<dyn Write + Send>) -> Self {
        Self {
            id: id.to_string(),
            output,
            out,
            buf: Vec::new(),
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn kind(&self) -> &'static str {
        "virtio-console"
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> &[u8] {
        &CONFIG
    }

    fn process_queue(&mut self, index: usize, ctx: &mut DeviceContext) -> bool {
        if index != TX_QUEUE {
            // Receive buffers stay with the device; there is no input.
            return false;
        }
        let mem = ctx.mem;
        let mut completed = 0usize;
        while let Some(chain) = ctx.queues[index].pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut r) => {
                    self.buf.clear();
                    if (&mut r).take(MAX_WRITE).read_to_end(&mut self.buf).is_ok() {
                        if let Err(e) = self.out.write_all(&self.buf) {
                            tracing::debug!("virtio-console '{}': output: {e}", self.id);
                        }
                    }
                }
                Err(e) => tracing::warn!("virtio-console '{}': bad TX chain: {e}", self.id),
            }
            if let Err(e) = ctx.queues[index].add_used(mem, head, 0) {
                tracing::warn!("virtio-console '{}': cannot complete TX: {e}", self.id);
                break;
            }
            completed += 1;
            if completed >= super::BATCH {
                break;
            }
        }
        if completed > 0 {
            let _ = self.out.flush();
            ctx.signal_used(index);
        }
        completed >= super::BATCH
    }

    fn save_backend(&self) -> BackendState {
        BackendState::Console {
            output: self.output.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::mmio::reg;
    use crate::devices::virtio::testutil::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let mem = memory();
        let out = Shared::default();
        let dev = Console::with_writer("con0", SerialConfig::Null, Box::new(out.clone()));
        let (mut t, _irq) = transport(Box::new(dev), &mem);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), TYPE_CONSOLE);
        let rx = MockSplitQueue::create(&mem, ring_addr(0), 8);
        let tx = MockSplitQueue::create(&mem, ring_addr(1), 8);
        init(&mut t, 0, &[&rx, &tx], 8);
        // Receive buffers are kept: there is no input.
        offer(&rx, 0, &[wo(0x20_0000, 64)]);
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(used_idx(&rx), 0);
        mem.write_slice(b"hello, ", GuestAddress(0x30_0000))
            .unwrap();
        mem.write_slice(b"world\n", GuestAddress(0x31_0000))
            .unwrap();
        offer(&tx, 0, &[ro(0x30_0000, 7), ro(0x31_0000, 6)]);
        wr(&mut t, reg::QUEUE_NOTIFY, TX_QUEUE as u32);
        assert_eq!(used_idx(&tx), 1);
        assert_eq!(&out.0.lock().unwrap()[..], b"hello, world\n");
        assert_eq!(
            t.save_device(),
            crate::devices::virtio::VirtioDeviceState::Console(
                crate::devices::virtio::state::VirtioConsoleState {
                    id: "con0".into(),
                    transport: t.save(),
                    output: "null".into(),
                }
            )
        );
    }

    #[test]
    fn file_output_is_appended() {
        let f = TempFile::patterned(0);
        let cfg = SerialConfig::File { path: f.0.clone() };
        let mem = memory();
        let (mut t, _irq) = transport(Box::new(Console::open("c", &cfg).unwrap()), &mem);
        let rx = MockSplitQueue::create(&mem, ring_addr(0), 8);
        let tx = MockSplitQueue::create(&mem, ring_addr(1), 8);
        init(&mut t, 0, &[&rx, &tx], 8);
        mem.write_slice(b"line\n", GuestAddress(0x30_0000)).unwrap();
        offer(&tx, 0, &[ro(0x30_0000, 5)]);
        wr(&mut t, reg::QUEUE_NOTIFY, TX_QUEUE as u32);
        assert_eq!(std::fs::read(&f.0).unwrap(), b"line\n");
        let bad = SerialConfig::File {
            path: "/nonexistent/dir/x.log".into(),
        };
        let e = Console::open("c", &bad).err().unwrap().to_string();
        assert!(e.starts_with("virtio-console 'c': "), "{e}");
    }
}
