//! The `SIGSYS` handler: what a thread that made a forbidden system call
//! says before the process ends. It runs inside the filtered thread, so
//! it uses only `write` and `exit_group`, which every list allows, and
//! formats into a buffer on its stack (no allocation).

use std::cell::Cell;

use crate::ThreadKind;

thread_local! {
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// The exit status of a process ended by a forbidden system call:
/// 128 + `SIGSYS`, as a shell shows a death by that signal.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// The kind the calling thread confined itself as, if any.
pub(crate) fn current() -> Option<ThreadKind> {
    KIND.with(|k| k.get())
}

/// Whether the calling thread already installed the filter of `kind`.
pub(crate) fn installed(kind: ThreadKind) -> bool {
    KIND.with(|k| k.get()) == Some(kind)
}

/// Records the calling thread's kind and name for the message.
pub(crate) fn remember(kind: ThreadKind) {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into the
    // buffer, which has 16.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    KIND.with(|k| k.set(Some(kind)));
    NAME.with(|n| n.set(name));
}

/// Installs the handler for the whole process.
pub(crate) fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler has the
    // SA_SIGINFO signature; sigemptyset gets a valid mask pointer.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A fixed buffer a message is written into.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    /// Writes the line to standard error and ends the process with
    /// [`EXIT_STATUS`].
    fn print_and_exit(&self) -> ! {
        // SAFETY: write(2) to standard error from a buffer of `len` bytes,
        // then exit_group: both allowed in every list, both
        // async-signal-safe.
        unsafe {
            libc::write(2, self.buf.as_ptr().cast(), self.len);
            libc::_exit(EXIT_STATUS)
        }
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Where the kernel puts the number of the system call in a `SIGSYS`
/// `siginfo_t` on x86-64: after signo, errno, code and padding (16
/// bytes), the call's address (8 bytes), then the number (an `int`).
const SI_SYSCALL_OFFSET: usize = 24;

/// `si_code` of a `SIGSYS` raised by a seccomp filter (`SYS_SECCOMP`).
const SYS_SECCOMP: i32 = 1;

/// Where `si_code` is in a `siginfo_t`: after signo and errno.
const SI_CODE_OFFSET: usize = 8;

/// Where the sender's pid is in a `siginfo_t` of a signal sent with
/// `kill` or `tgkill`: after signo, errno, code and padding.
const SI_PID_OFFSET: usize = 16;

/// Reads the `int` at `offset` of `info`.
///
/// # Safety
/// `info` points to a whole `siginfo_t` (128 bytes) and `offset + 4` is
/// at most 128.
unsafe fn siginfo_int(info: *const libc::siginfo_t, offset: usize) -> i32 {
    // SAFETY: in bounds by the caller's promise; siginfo_t is 8-aligned
    // and every offset used is a multiple of 4.
    unsafe { info.cast::<u8>().add(offset).cast::<i32>().read() }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO.
    let code = unsafe { siginfo_int(info, SI_CODE_OFFSET) };
    if code != SYS_SECCOMP {
        // Sent by a process, not raised by a filter: ends the VMM as
        // SIGSYS's default action would, saying who sent it.
        // SAFETY: as above; kill and tgkill fill in the sender's pid.
        let pid = unsafe { siginfo_int(info, SI_PID_OFFSET) };
        line.push(b"stasis: SIGSYS sent by process ");
        line.push_number(u64::from(pid.unsigned_abs()));
        line.push(b" (not a forbidden system call); the VMM ends\n");
        line.print_and_exit();
    }
    // SAFETY: a seccomp SIGSYS carries the system call's number at its
    // documented place.
    let nr = unsafe { siginfo_int(info, SI_SYSCALL_OFFSET) };
    line.push(b"stasis: seccomp: thread '");
    let name = NAME.with(|n| n.get());
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(&name[..end]);
    line.push(b"' (");
    line.push(
        KIND.with(|k| k.get())
            .map_or("unknown", ThreadKind::name)
            .as_bytes(),
    );
    line.push(b") made a forbidden system call: ");
    line.push(
        crate::names::syscall_name(i64::from(nr))
            .unwrap_or("unknown")
            .as_bytes(),
    );
    line.push(b" (");
    line.push_number(u64::from(nr.unsigned_abs()));
    line.push(b"); the VMM ends\n");
    line.print_and_exit();
}
