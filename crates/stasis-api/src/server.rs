//! The control socket server: bind a VM's socket, answer requests.
//!
//! [`ApiServer::bind`] claims the socket path (refusing one that a live VM
//! answers on, replacing a stale one), and [`ApiServer::serve`] starts the
//! accept loop on its own thread and returns an [`ApiServerHandle`]. Each
//! connection is served on a short-lived thread of its own: one request,
//! one response, then the connection closes. The VM plugs in through
//! [`ApiHandler`].
//!
//! # Socket permissions
//!
//! The socket is made mode 0600 between `bind(2)` and `listen(2)`. Until
//! `listen(2)` nobody can connect to it whatever its mode (a connect gets
//! `ECONNREFUSED`), so there is no window in which a looser mode matters.
//! Changing the umask instead would affect every thread of the VMM, which
//! may be creating other files at the same time.

use std::cell::Cell;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::http;
use crate::routes::{self, ApiRequest, ApiResponse};
use crate::runtime::{self, InvalidVmName};
use crate::sock::NoSigPipe;
use crate::types::PingResponse;

/// How long one read or write on a connection may block, by default.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client has to send its whole request, by default.
pub const DEFAULT_REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// The most connections served at once; more are answered 503.
pub const MAX_CONNECTIONS: usize = 16;

/// How long [`ApiServerHandle::shutdown`] waits for connections in flight
/// (for example the one that asked for the shutdown) to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// The `listen(2)` backlog.
const BACKLOG: libc::c_int = 64;

/// How long a connection is drained after an early error response, so
/// the client reads the response rather than a reset.
const LINGER: Duration = Duration::from_secs(1);

/// The most bytes discarded while lingering.
const LINGER_BYTES: usize = 4 * 1024 * 1024;

/// What the VM core implements to answer API requests.
///
/// `handle` is called on a connection thread, possibly from several threads
/// at once, and should return promptly: the client waits for it. It never
/// sees [`ApiRequest::Ping`], which the server answers itself. A panic in
/// `handle` becomes a 500 response.
///
/// Any `Fn(ApiRequest) -> ApiResponse + Send + Sync` is a handler.
pub trait ApiHandler: Send + Sync {
    /// Answers one request.
    fn handle(&self, req: ApiRequest) -> ApiResponse;
}

impl<F> ApiHandler for F
where
    F: Fn(ApiRequest) -> ApiResponse + Send + Sync,
{
    fn handle(&self, req: ApiRequest) -> ApiResponse {
        self(req)
    }
}

/// Why the server could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Another process accepted a connection on the socket: a VM owns it.
    #[error("a VM already owns the control socket {path} (it accepts connections); stop that VM or choose another name")]
    AlreadyInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket is at the path; it is left alone.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The path does not fit in a `sockaddr_un`.
    #[error("socket path {path} is {len} bytes long; UNIX sockets allow at most {max}")]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The longest path that fits.
        max: usize,
    },
    /// The VM name is not valid.
    #[error(transparent)]
    InvalidName(#[from] InvalidVmName),
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The socket file this server created; removed when dropped, but only if
/// the path still names that very file (same device and inode), so a
/// socket some later VM bound at the same path is never removed.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the socket file if it is still ours.
    fn remove(&self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Timeouts for connections.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    io: Duration,
    request: Duration,
    drain: Duration,
}

/// A bound control socket, not yet serving. Dropping it removes the
/// socket file.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    file: SocketFile,
    timeouts: Timeouts,
    /// A takeover: the path the socket moves to when serving starts.
    takeover: Option<PathBuf>,
}

impl ApiServer {
    /// Binds a control socket at `path` with mode 0600.
    ///
    /// If a socket already exists there and accepts a connection, this
    /// fails with [`ServerError::AlreadyInUse`]; if nobody answers (the VM
    /// that made it died), the stale socket is removed and replaced. A
    /// non-socket file at `path` is never removed. The parent directory
    /// must exist.
    pub fn bind(path: impl AsRef<Path>) -> Result<ApiServer, ServerError> {
        let path = path.as_ref();
        clear_stale_socket(path)?;
        let (listener, file) = bind_listener(path)?;
        Ok(ApiServer {
            listener,
            file,
            timeouts: Timeouts {
                io: DEFAULT_IO_TIMEOUT,
                request: DEFAULT_REQUEST_DEADLINE,
                drain: DRAIN_TIMEOUT,
            },
            takeover: None,
        })
    }

    /// Binds a control socket that will take `path` over from the process
    /// serving it now (a local upgrade's old stasis): it is bound beside
    /// it (`PATH.new-PID`) and renamed over `path` when serving starts, so
    /// that new clients reach this process from then on while the old one
    /// finishes the connections it has. The old process never removes the
    /// new socket (it removes only the socket file it made).
    pub fn bind_takeover(path: impl AsRef<Path>) -> Result<ApiServer, ServerError> {
        let path = path.as_ref();
        let mut beside = path.as_os_str().to_owned();
        beside.push(format!(".new-{}", std::process::id()));
        let mut server = ApiServer::bind(PathBuf::from(beside))?;
        server.takeover = Some(path.to_path_buf());
        Ok(server)
    }

    /// Binds the control socket of the VM `name` in the runtime directory,
    /// creating that directory (mode 0700) if needed.
    pub fn bind_vm(name: &str) -> Result<ApiServer, ServerError> {
        runtime::validate_vm_name(name)?;
        let dir = runtime::ensure_runtime_dir().map_err(|source| ServerError::Io {
            what: "cannot prepare the runtime directory",
            path: runtime::runtime_dir(),
            source,
        })?;
        ApiServer::bind(runtime::socket_path_in(&dir, name)?)
    }

    /// The socket path (for a takeover, the path it takes over).
    pub fn path(&self) -> &Path {
        self.takeover.as_deref().unwrap_or(&self.file.path)
    }

    /// Sets how long one read or write may block (`io`) and how long a
    /// client has to send its whole request (`request`). Zero durations are
    /// raised to one millisecond.
    pub fn with_timeouts(mut self, io: Duration, request: Duration) -> ApiServer {
        let floor = Duration::from_millis(1);
        self.timeouts = Timeouts {
            io: io.max(floor),
            request: request.max(floor),
            drain: self.timeouts.drain,
        };
        self
    }

    /// Sets how long [`ApiServerHandle::shutdown`] waits for connections in
    /// flight (default [`DRAIN_TIMEOUT`]).
    pub fn with_drain_timeout(mut self, drain: Duration) -> ApiServer {
        self.timeouts.drain = drain;
        self
    }

    /// Starts answering requests with `handler` on a new thread.
    ///
    /// The returned handle stops the server and removes the socket file
    /// when [`shut down`](ApiServerHandle::shutdown) or dropped.
    pub fn serve(self, handler: Arc<dyn ApiHandler>) -> Result<ApiServerHandle, ServerError> {
        let ApiServer {
            listener,
            mut file,
            timeouts,
            takeover,
        } = self;
        if let Some(path) = takeover {
            // Not fatal: the VM runs here already; it stays reachable at
            // the socket's own path.
            match fs::rename(&file.path, &path) {
                Ok(()) => file.path = path,
                Err(e) => eprintln!(
                    "stasis: warning: cannot move the control socket over {}: {e}; it stays at {}",
                    path.display(),
                    file.path.display()
                ),
            }
        }
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared::default());
        let thread = {
            let listener = Arc::clone(&listener);
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("stasis-api".into())
                .spawn(move || {
                    stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Api);
                    accept_loop(&listener, &shared, &handler, timeouts)
                })
                .map_err(|source| ServerError::Io {
                    what: "cannot start the API thread for",
                    path: file.path.clone(),
                    source,
                })?
        };
        Ok(ApiServerHandle {
            listener,
            shared,
            thread: Mutex::new(Some(thread)),
            file,
            drain: timeouts.drain,
        })
    }
}

/// Checks what is at `path` before binding: nothing is fine, a live socket
/// is an error, a stale socket is removed, anything else is an error.
fn clear_stale_socket(path: &Path) -> Result<(), ServerError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Io {
                what: "cannot inspect",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::AlreadyInUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ServerError::Io {
                what: "cannot remove the stale socket",
                path: path.to_path_buf(),
                source,
            }),
        },
        Err(source) => Err(ServerError::Io {
            what: "cannot check the existing socket",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `socket(2)`, `bind(2)`, `chmod 0600`, `listen(2)`, in that order.
fn bind_listener(path: &Path) -> Result<(UnixListener, SocketFile), ServerError> {
    let io_err = |what: &'static str, source: io::Error| ServerError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is a plain C struct for which all-zero bytes is a
    // valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // One byte stays zero: the terminating NUL.
    let max = addr.sun_path.len() - 1;
    if bytes.len() > max {
        return Err(ServerError::PathTooLong {
            path: path.to_path_buf(),
            len: bytes.len(),
            max,
        });
    }
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(io_err(
            "invalid socket path",
            io::Error::new(io::ErrorKind::InvalidInput, "empty or contains NUL"),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let addr_len =
        (std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1) as libc::socklen_t;

    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io_err(
            "cannot create a socket for",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    // SAFETY: `addr` is an initialized sockaddr_un that outlives the call,
    // and `addr_len` covers the family, the path and its NUL, which is no
    // more than its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            addr_len,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            // Someone bound the path since we looked.
            return Err(ServerError::AlreadyInUse {
                path: path.to_path_buf(),
            });
        }
        return Err(io_err("cannot bind", e));
    }

    // The file exists from here on; removing it on any error below.
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) => {
            let _ = fs::remove_file(path);
            return Err(io_err("cannot inspect the new socket", e));
        }
    };
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| io_err("cannot set mode 0600 on", e))?;
    // SAFETY: `fd` is a valid socket descriptor; listen(2) takes no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } < 0 {
        return Err(io_err("cannot listen on", io::Error::last_os_error()));
    }
    Ok((UnixListener::from(fd), file))
}

/// State shared by the handle, the accept loop and connection threads.
#[derive(Default)]
struct Shared {
    /// Set once shutdown starts.
    stopping: AtomicBool,
    /// The number of connections being served.
    active: Mutex<usize>,
    /// Signalled when `active` drops.
    idle: Condvar,
}

impl Shared {
    fn active(&self) -> MutexGuard<'_, usize> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a new connection, unless [`MAX_CONNECTIONS`] are in flight.
    fn enter(self: &Arc<Self>) -> Option<ActiveGuard> {
        let mut active = self.active();
        if *active >= MAX_CONNECTIONS {
            return None;
        }
        *active += 1;
        Some(ActiveGuard(Arc::clone(self)))
    }
}

/// One counted connection; uncounted when dropped.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        *self.0.active() -= 1;
        self.0.idle.notify_all();
    }
}

thread_local! {
    /// Whether this thread is a connection thread (so that a handler
    /// shutting the server down does not wait for itself).
    static IN_CONNECTION: Cell<bool> = const { Cell::new(false) };
}

/// A running server. Shutting it down (or dropping it) stops accepting,
/// removes the socket file, and waits briefly for connections in flight.
#[derive(Debug)]
pub struct ApiServerHandle {
    listener: Arc<UnixListener>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    file: SocketFile,
    drain: Duration,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stopping", &self.stopping.load(Ordering::SeqCst))
            .field("active", &*self.active())
            .finish()
    }
}

impl ApiServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Stops the server: removes the socket file, wakes and ends the
    /// accept loop, and waits up to [`DRAIN_TIMEOUT`] (or what
    /// [`ApiServer::with_drain_timeout`] set) for connections in flight to
    /// send their responses.
    ///
    /// Safe to call more than once and from any thread, including from an
    /// [`ApiHandler`] (which then does not wait for its own connection).
    pub fn shutdown(&self) {
        if !self.shared.stopping.swap(true, Ordering::SeqCst) {
            self.file.remove();
            // SAFETY: the descriptor stays open while `self.listener` lives.
            // shutdown(2) on a listening socket makes a blocked (or later)
            // accept(2) fail with EINVAL, which ends the accept loop.
            unsafe {
                libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        let own = usize::from(IN_CONNECTION.with(Cell::get));
        let deadline = Instant::now() + self.drain;
        let mut active = self.shared.active();
        while *active > own {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            active = self
                .shared
                .idle
                .wait_timeout(active, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Accepts connections until shutdown, each served on its own thread.
fn accept_loop(
    listener: &UnixListener,
    shared: &Arc<Shared>,
    handler: &Arc<dyn ApiHandler>,
    timeouts: Timeouts,
) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Out of descriptors or memory, say: back off, do not spin.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(guard) = shared.enter() else {
            refuse_busy(stream);
            continue;
        };
        let handler = Arc::clone(handler);
        // If the thread cannot start, the closure (with the stream and the
        // guard) is dropped: the client sees the connection close.
        let _ = thread::Builder::new()
            .name("stasis-api-conn".into())
            .spawn(move || {
                let _guard = guard;
                stasis_sandbox::enter_or_warn(stasis_sandbox::ThreadKind::Api);
                IN_CONNECTION.with(|c| c.set(true));
                serve_connection(stream, handler.as_ref(), timeouts);
            });
    }
}

/// Answers 503 on the accept thread, quickly, when too many connections
/// are in flight.
fn refuse_busy(stream: UnixStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let resp = ApiResponse::error(503, "too many API connections at once; retry shortly");
    let _ = http::write_response(&mut NoSigPipe(&stream), &resp.to_http());
}

/// A connection whose reads end at an overall deadline.
struct DeadlineStream<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
    io_timeout: Duration,
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream
            .set_read_timeout(Some(remaining.min(self.io_timeout)))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        NoSigPipe(self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads one request, answers it, closes.
fn serve_connection(stream: UnixStream, handler: &dyn ApiHandler, timeouts: Timeouts) {
    let _ = stream.set_write_timeout(Some(timeouts.io));
    let mut conn = DeadlineStream {
        stream: &stream,
        deadline: Instant::now() + timeouts.request,
        io_timeout: timeouts.io,
    };
    let (resp, complete) = match http::read_request(&mut conn) {
        Ok(req) => (respond(handler, &req), true),
        Err(e) => match e.status() {
            Some(status) => (ApiResponse::error(status, e.to_string()), false),
            None => return,
        },
    };
    if http::write_response(&mut conn, &resp.to_http()).is_err() {
        return;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    if !complete {
        linger(&stream);
    }
}

/// Routes a request and has it answered.
fn respond(handler: &dyn ApiHandler, req: &http::Request) -> ApiResponse {
    match routes::route(&req.method, &req.path, &req.body) {
        Err(resp) => resp,
        Ok(ApiRequest::Ping) => ApiResponse::ok(&PingResponse { ok: true }),
        Ok(req) => catch_unwind(AssertUnwindSafe(|| handler.handle(req))).unwrap_or_else(|_| {
            ApiResponse::error(500, "internal error: the request handler panicked")
        }),
    }
}

/// Discards what the client still sends after an early error response,
/// for a bounded time, so that closing does not reset the connection
/// before the client has read the response.
fn linger(stream: &UnixStream) {
    let deadline = Instant::now() + LINGER;
    let mut buf = [0u8; 8192];
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || stream.set_read_timeout(Some(remaining)).is_err() {
            return;
        }
        match (&mut &*stream).read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => discarded += n,
        }
    }
}
