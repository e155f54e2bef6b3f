//! A host tap device: `/dev/net/tun` attached with `TUNSETIFF` to an
//! existing tap interface, non-blocking, without `IFF_VNET_HDR` (no
//! offloads are offered to the guest, so the virtio-net header carries
//! nothing the tap would need). In a local upgrade the tap's descriptor
//! is handed over by the old process instead ([`inherit`]): a
//! single-queue tap cannot be attached twice.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNGETIFF` = `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// Taps handed over by a local upgrade's source, by interface name, until
/// a network card takes them.
static INHERITED: Mutex<Vec<(String, File)>> = Mutex::new(Vec::new());

/// Keeps `file`, a tap descriptor handed over by another stasis, for the
/// network card on tap `name` to take instead of attaching anew. It must
/// be a tap attached to `name`, as `TUNGETIFF` says.
pub fn inherit(name: &str, file: File) -> Result<(), String> {
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: TUNGETIFF writes one `struct ifreq`, which `req` is (40
    // bytes, C layout), and it outlives the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF as _, &mut req) };
    if r != 0 {
        return Err(format!(
            "the descriptor handed over for tap '{name}' is not a tap: {}",
            io::Error::last_os_error()
        ));
    }
    let len = req.name.iter().position(|&b| b == 0).unwrap_or(16);
    let attached = String::from_utf8_lossy(&req.name[..len]);
    if attached != name || req.flags & IFF_TAP == 0 {
        return Err(format!(
            "the descriptor handed over for tap '{name}' is attached to '{attached}'"
        ));
    }
    // SAFETY: F_GETFL/F_SETFL on an fd we own; only O_NONBLOCK is added.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    INHERITED
        .lock()
        .expect("tap registry")
        .push((name.to_string(), file));
    Ok(())
}

/// Whether a tap descriptor for `name` was handed over and not yet taken.
pub fn is_inherited(name: &str) -> bool {
    INHERITED
        .lock()
        .expect("tap registry")
        .iter()
        .any(|(n, _)| n == name)
}
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as `TUNSETIFF` uses it: the name, the flags, padding to
/// the full 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap interface `name`. Fails with a message
    /// naming the cause: no such interface, not a tap, busy, no permission.
    pub fn open(name: &str) -> Result<Self, String> {
        {
            let mut inherited = INHERITED.lock().expect("tap registry");
            if let Some(i) = inherited.iter().position(|(n, _)| n == name) {
                let (name, file) = inherited.swap_remove(i);
                return Ok(Self { file, name });
            }
        }
        let sys = Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(format!(
                "tap device '{name}' does not exist (create it with `ip tuntap add dev {name} mode tap` and bring it up)"
            ));
        }
        if !sys.join("tun_flags").exists() {
            return Err(format!("network interface '{name}' is not a tap device"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        if name.len() >= req.name.len() {
            return Err(format!("tap name '{name}' is too long"));
        }
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
        // `req` is (40 bytes, C layout), and it outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => format!("tap device '{name}' is in use by another process"),
                Some(libc::EPERM) => format!(
                    "no permission to attach to tap device '{name}' (it belongs to another user, or CAP_NET_ADMIN is needed)"
                ),
                Some(libc::EINVAL) => format!(
                    "tap device '{name}' cannot be attached as a single-queue tap without packet information (was it created with other flags?): {e}"
                ),
                _ => format!("cannot attach to tap device '{name}': {e}"),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
