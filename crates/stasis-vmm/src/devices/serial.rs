//! COM1: a 16550A UART (vm-superio) whose output goes to stdout, a file, a
//! UNIX socket, or nowhere, and whose interrupt is an irqfd.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use stasis_config::SerialConfig;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Raises the UART's interrupt through an eventfd bound to a GSI (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The UART with its output sink.
pub type Uart = Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// COM1 on the port bus.
pub struct SerialPort(pub Arc<Mutex<Uart>>, pub Arc<SerialInput>);

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = self.0.lock().expect("uart lock").read(offset as u8);
        // A read of the receive buffer made room in the FIFO.
        if offset == 0 {
            self.1.refill();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Err(e) = self
            .0
            .lock()
            .expect("uart lock")
            .write(offset as u8, data[0])
        {
            tracing::debug!("serial write: {e}");
        }
    }
}

/// What a socket client sends to COM1: it waits here and moves into the
/// UART's receive FIFO as the guest makes room, so nothing is dropped and
/// order is kept. While quiesced ([`crate::quiesce::Quiesce`]) input is
/// only buffered: it touches neither the UART's registers nor its
/// interrupt until resumed, so a pause or snapshot sees the UART and the
/// interrupt controllers as the guest left them. Bytes still waiting are
/// saved with the serial port's state and delivered after a restore.
pub struct SerialInput {
    uart: Arc<Mutex<Uart>>,
    state: Mutex<InputState>,
}

#[derive(Debug, Default)]
struct InputState {
    pending: VecDeque<u8>,
    held: bool,
}

/// The most input held for the guest (beyond it, bytes are dropped).
const MAX_PENDING_INPUT: usize = 64 * 1024;

impl SerialInput {
    /// Input for `uart`, held until the VM starts, with `pending` bytes
    /// (from a snapshot) first.
    pub fn new(uart: Arc<Mutex<Uart>>, pending: &[u8]) -> Self {
        Self {
            uart,
            state: Mutex::new(InputState {
                pending: pending.iter().copied().collect(),
                held: true,
            }),
        }
    }

    /// Bytes from the host side.
    pub fn push(&self, bytes: &[u8]) {
        let mut st = self.state.lock().expect("serial input lock");
        let room = MAX_PENDING_INPUT.saturating_sub(st.pending.len());
        if bytes.len() > room {
            tracing::debug!(
                "serial input: {} bytes dropped (buffer full)",
                bytes.len() - room
            );
        }
        st.pending.extend(&bytes[..bytes.len().min(room)]);
        if !st.held {
            self.pump(&mut st);
        }
    }

    /// The guest read from the FIFO: top it up.
    pub fn refill(&self) {
        let mut st = self.state.lock().expect("serial input lock");
        if !st.held && !st.pending.is_empty() {
            self.pump(&mut st);
        }
    }

    /// Bytes waiting for room in the FIFO (saved with the port's state).
    pub fn pending(&self) -> Vec<u8> {
        self.state
            .lock()
            .expect("serial input lock")
            .pending
            .iter()
            .copied()
            .collect()
    }

    fn pump(&self, st: &mut InputState) {
        let mut uart = self.uart.lock().expect("uart lock");
        let n = uart.fifo_capacity().min(st.pending.len());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = st.pending.drain(..n).collect();
        if let Err(e) = uart.enqueue_raw_bytes(&chunk) {
            tracing::debug!("serial input: {e}");
        }
    }
}

impl crate::quiesce::Quiesce for SerialInput {
    fn name(&self) -> String {
        "serial input".into()
    }
    fn request_quiesce(&self) {
        self.state.lock().expect("serial input lock").held = true;
    }
    fn wait_quiesced(&self) {
        // Input moves only under this lock, which `request_quiesce` held.
    }
    fn resume(&self) {
        let mut st = self.state.lock().expect("serial input lock");
        st.held = false;
        self.pump(&mut st);
    }
}

/// Errors opening the serial output.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The output file could not be opened.
    #[error("cannot open serial output file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The socket could not be created.
    #[error("cannot listen on serial socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The eventfd for the interrupt could not be created.
    #[error("cannot create the serial interrupt eventfd: {0}")]
    EventFd(io::Error),
    /// The saved state could not be loaded.
    #[error("saved serial state is invalid: {0}")]
    State(String),
}

/// Writes through to `inner`, flushing at each newline so that readers of
/// a file or pipe see whole lines promptly.
struct LineFlush<W: Write>(W);

impl<W: Write> Write for LineFlush<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        if buf[..n].contains(&b'\n') {
            self.0.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Output kept for a socket client that connects later (the last 64 KiB).
const SOCKET_BACKLOG: usize = 64 * 1024;

/// The output side of a serial socket: the connected client, if any, and
/// the recent output to replay when one connects.
#[derive(Default)]
struct SocketState {
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
}

struct SocketSink(Arc<Mutex<SocketState>>);

impl Write for SocketSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.0.lock().expect("serial socket lock");
        st.backlog.extend(buf);
        let excess = st.backlog.len().saturating_sub(SOCKET_BACKLOG);
        st.backlog.drain(..excess);
        if let Some(c) = st.client.as_mut() {
            if c.write_all(buf).is_err() {
                st.client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a socket client's input goes.
pub type InputSink = Box<dyn FnMut(&[u8]) + Send>;

/// An opened output destination (`stdout`, `file:`, `socket:`, `null`),
/// shared by COM1 and the virtio consoles.
pub struct Output {
    /// Where the guest's bytes go.
    pub writer: Box<dyn Write + Send>,
    socket: Option<(UnixListener, Arc<Mutex<SocketState>>, PathBuf)>,
}

impl Output {
    /// For a socket destination, starts the thread (named `thread_name`)
    /// that accepts one client at a time: it gets the recent output, then
    /// everything the guest prints, and what it sends goes to `input`. Does
    /// nothing for other destinations.
    pub fn start_socket(&mut self, thread_name: &str, input: InputSink) -> Result<(), SerialError> {
        let Some((listener, state, path)) = self.socket.take() else {
            return Ok(());
        };
        std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::DeviceIo);
                accept_loop(listener, state, input, path)
            })
            .map_err(|source| SerialError::Socket {
                path: PathBuf::new(),
                source,
            })?;
        Ok(())
    }
}

/// Opens the destination `config` names: appends to a file, binds a
/// socket (see [`Output::start_socket`]), or writes to stdout or nowhere.
pub fn open_output(config: &SerialConfig) -> Result<Output, SerialError> {
    let (writer, socket): (Box<dyn Write + Send>, Option<_>) = match config {
        SerialConfig::Stdout => (Box::new(LineFlush(io::stdout())), None),
        SerialConfig::Null => (Box::new(io::sink()), None),
        SerialConfig::File { path } => {
            let f = super::output_file::open_append(path).map_err(|source| SerialError::File {
                path: path.clone(),
                source,
            })?;
            (Box::new(LineFlush(f)), None)
        }
        SerialConfig::Socket { path } => {
            let listener = bind_socket(path)?;
            let state = Arc::new(Mutex::new(SocketState::default()));
            (
                Box::new(SocketSink(state.clone())),
                Some((listener, state, path.clone())),
            )
        }
    };
    Ok(Output { writer, socket })
}

/// Creates COM1 for `config`, raising its interrupt through `irq`, in its
/// power-on state or in `saved` state, with its host input.
/// For a socket, a thread accepts one client at a time: it gets the recent
/// output, then everything the guest prints, and what it sends goes to the
/// guest's receive FIFO through [`SerialInput`].
pub fn create(
    config: &SerialConfig,
    irq: EventFd,
    saved: Option<&SerialDeviceState>,
) -> Result<(Arc<Mutex<Uart>>, Arc<SerialInput>), SerialError> {
    let mut output = open_output(config)?;
    let out = std::mem::replace(&mut output.writer, Box::new(io::sink()));
    let uart = match saved {
        None => Serial::new(IrqTrigger(irq), out),
        Some(state) => Serial::from_state(
            &state.to_superio(),
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| SerialError::State(format!("{e:?}")))?,
    };
    let uart = Arc::new(Mutex::new(uart));
    let input = Arc::new(SerialInput::new(
        uart.clone(),
        saved
            .map(|s| s.pending_input.as_slice())
            .unwrap_or_default(),
    ));
    let sink = input.clone();
    output.start_socket("serial-socket", Box::new(move |bytes| sink.push(bytes)))?;
    Ok((uart, input))
}

fn bind_socket(path: &Path) -> Result<UnixListener, SerialError> {
    let err = |source| SerialError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(md) = std::fs::symlink_metadata(path) {
        // Only a socket nobody listens on is replaced: never a file.
        if !md.file_type().is_socket() {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "is {}, which a socket would replace",
                    stasis_snapshot::file_kind(md.mode())
                ),
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process is listening on it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    UnixListener::bind(path).map_err(err)
}

fn accept_loop(
    listener: UnixListener,
    state: Arc<Mutex<SocketState>>,
    mut input: InputSink,
    path: PathBuf,
) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        {
            let mut st = state.lock().expect("serial socket lock");
            let (a, b) = st.backlog.as_slices();
            if stream
                .write_all(a)
                .and_then(|_| stream.write_all(b))
                .is_err()
            {
                continue;
            }
            match stream.try_clone() {
                Ok(w) => st.client = Some(w),
                Err(_) => continue,
            }
        }
        let mut buf = [0u8; 256];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            input(&buf[..n]);
        }
        state.lock().expect("serial socket lock").client = None;
    }
    let _ = std::fs::remove_file(path);
}

/// COM1's saved state: section `serial`, instance `com1`. Mirrors
/// vm-superio's `SerialState` field by field (that struct has no serde
/// support, and our format must not change when the crate does).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes waiting in the receive FIFO.
    #[serde(with = "stasis_snapshot::hex_bytes")]
    pub rx_fifo: Vec<u8>,
    /// Host input not yet in the FIFO (it had no room, or the VM was
    /// paused when it arrived); absent in older snapshots.
    #[serde(default, with = "stasis_snapshot::hex_bytes")]
    pub pending_input: Vec<u8>,
}

impl stasis_snapshot::SectionState for SerialDeviceState {
    const NAME: &'static str = "serial";
    const VERSION: u32 = 1;
}

impl SerialDeviceState {
    /// The state of `uart`, with the host input still waiting for it.
    pub fn save(uart: &Uart, pending_input: Vec<u8>) -> Self {
        let s = uart.state();
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            rx_fifo: s.in_buffer,
            pending_input,
        }
    }

    /// The vm-superio state to rebuild the UART from.
    pub fn to_superio(&self) -> vm_superio::SerialState {
        vm_superio::SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.rx_fifo.clone(),
        }
    }
}
