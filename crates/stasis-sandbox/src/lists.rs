//! The allow-lists, by kind of thread, and their compiled BPF programs.
//!
//! The lists are of system calls, not arguments: what a thread of a kind
//! may ask the kernel for at all. They are built from groups:
//!
//! * every thread: memory (`mmap`, `madvise`, ...), futexes, time, its
//!   own signals, `read`/`write`/`close` on descriptors it holds, exit;
//! * vCPU: `ioctl` (`KVM_RUN` and the vCPU state calls), `tgkill` (kicks);
//! * device I/O: vectored and positional file I/O, `fsync`, `fallocate`
//!   (discard), `epoll`, `accept4` (serial socket), and the file calls of
//!   disk checkpoints done in the I/O thread (open, rename, lock, clone);
//! * signals: `rt_sigtimedwait`;
//! * job: everything to write snapshots and checkpoints, migrate over TCP
//!   or a UNIX socket (with descriptors passed), serve `userfaultfd`, and
//!   start worker threads;
//! * API: a job's list (jobs are started from API threads and keep their
//!   filter) plus serving connections;
//! * main: the API's list plus what a rollback needs to build the VM
//!   again in the same process (KVM, sockets, directories).
//!
//! Nothing allows `execve`, `ptrace`, `mount`, `bpf`, `kexec_load`,
//! `init_module`, `setuid` and the like, `personality`, `process_vm_*`,
//! `keyctl`, or `io_uring_*`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

use crate::{Mode, ThreadKind};

const EVERY_THREAD: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
    libc::SYS_getrandom,
    libc::SYS_set_robust_list,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_prctl,
    // A thread adds its own filter and Landlock domain to the ones it
    // inherited (both only ever narrow).
    libc::SYS_seccomp,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
    // A panicking thread removes the API socket before the process ends
    // (Landlock bounds where a thread may remove anything).
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // glibc makes every thread change its ids when one does (--user).
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
];

/// `sendto`: a vCPU's serial output goes to the serial socket's client
/// from the vCPU thread (`send` on a connected socket).
const VCPU: &[i64] = &[libc::SYS_ioctl, libc::SYS_tgkill, libc::SYS_sendto];

const DEVICE_IO: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_openat,
    libc::SYS_renameat2,
    libc::SYS_renameat,
    libc::SYS_rename,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_flock,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_fchmod,
    libc::SYS_copy_file_range,
    libc::SYS_fadvise64,
    libc::SYS_tgkill,
];

const SIGNALS: &[i64] = &[libc::SYS_rt_sigtimedwait, libc::SYS_tgkill, libc::SYS_kill];

const JOB: &[i64] = &[
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_symlink,
    libc::SYS_link,
    libc::SYS_truncate,
    libc::SYS_chmod,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_getxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_open,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_mkdirat,
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_access,
    libc::SYS_getcwd,
    libc::SYS_sendfile,
    libc::SYS_splice,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_userfaultfd,
    libc::SYS_memfd_create,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_sched_setaffinity,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_msync,
    libc::SYS_mincore,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_getrusage,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_lgetxattr,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_rt_sigaction,
    // Memory-fill threads lower their own priority.
    libc::SYS_setpriority,
];

const API: &[i64] = &[libc::SYS_getppid];

/// A rollback rebuilds the VM in the main thread: KVM, guest memory,
/// devices, the control socket.
const MAIN: &[i64] = &[
    libc::SYS_rt_sigtimedwait,
    libc::SYS_mbind,
    libc::SYS_set_mempolicy,
    libc::SYS_get_mempolicy,
];

/// The system calls a thread of `kind` may make.
pub(crate) fn allowed(kind: ThreadKind) -> Vec<i64> {
    let groups: &[&[i64]] = match kind {
        ThreadKind::Vcpu => &[EVERY_THREAD, VCPU],
        ThreadKind::DeviceIo => &[EVERY_THREAD, DEVICE_IO],
        ThreadKind::Signals => &[EVERY_THREAD, SIGNALS],
        ThreadKind::Job => &[EVERY_THREAD, DEVICE_IO, VCPU, JOB],
        ThreadKind::Api => &[EVERY_THREAD, DEVICE_IO, VCPU, JOB, API],
        ThreadKind::Main => &[EVERY_THREAD, DEVICE_IO, VCPU, JOB, API, SIGNALS, MAIN],
    };
    let mut all: Vec<i64> = groups.iter().flat_map(|g| g.iter().copied()).collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Argument conditions on some calls of the guest-facing threads: a vCPU
/// thread may make only KVM's ioctls (type 0xAE, so no `TIOCSTI` on an
/// inherited terminal), and vCPU and signal threads may signal only
/// threads of their own process.
/// `TIOCSTI`: pushes a byte into a terminal's input.
const TIOCSTI: u32 = 0x5412;
/// `TIOCLINUX`: the Linux console's subcommands (one pastes a selection).
const TIOCLINUX: u32 = 0x541c;

fn conditions(kind: ThreadKind, nr: i64) -> Result<Vec<SeccompRule>, String> {
    use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond};
    let guest_facing = matches!(kind, ThreadKind::Vcpu | ThreadKind::Signals);
    let cond = |arg, len, op, value| Cond::new(arg, len, op, value).map_err(|e| e.to_string());
    let rule = |c: Vec<Cond>| SeccompRule::new(c).map_err(|e| e.to_string());
    if kind == ThreadKind::Vcpu && nr == libc::SYS_ioctl {
        return Ok(vec![rule(vec![cond(
            1,
            Len::Dword,
            Op::MaskedEq(0xff00),
            0xae00,
        )?])?]);
    }
    if kind == ThreadKind::DeviceIo && nr == libc::SYS_ioctl {
        // The types of the ioctls virtio devices and disk checkpoints make:
        // KVM's (interrupts), block devices' (sizes), FICLONE's and
        // FS_IOC_GETVERSION's (reflinks, disk identity), and the
        // terminal/TUN type 'T' (tap offloads, FIONBIO, TCGETS) but not
        // TIOCSTI or TIOCLINUX, which type into a terminal.
        let mut rules = Vec::new();
        for ty in [0xae00, 0x1200, 0x9400, 0x7600] {
            rules.push(rule(vec![cond(1, Len::Dword, Op::MaskedEq(0xff00), ty)?])?);
        }
        rules.push(rule(vec![
            cond(1, Len::Dword, Op::MaskedEq(0xff00), 0x5400)?,
            cond(1, Len::Dword, Op::Ne, u64::from(TIOCSTI))?,
            cond(1, Len::Dword, Op::Ne, u64::from(TIOCLINUX))?,
        ])?);
        return Ok(rules);
    }
    if guest_facing && nr == libc::SYS_tgkill {
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() } as u64;
        return Ok(vec![rule(vec![cond(0, Len::Dword, Op::Eq, pid)?])?]);
    }
    Ok(Vec::new())
}

fn build(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(kind)
        .into_iter()
        .map(|nr| Ok((nr, conditions(kind, nr)?)))
        .collect::<Result<_, String>>()?;
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// A kind's filter in a mode, compiled (or why it could not be).
type Compiled = (ThreadKind, Mode, Result<BpfProgram, String>);

/// The compiled filter of `kind` in `mode` (built once per process).
pub(crate) fn program(kind: ThreadKind, mode: Mode) -> Result<&'static BpfProgram, String> {
    static PROGRAMS: OnceLock<Vec<Compiled>> = OnceLock::new();
    let all = PROGRAMS.get_or_init(|| {
        ThreadKind::ALL
            .iter()
            .flat_map(|&k| [Mode::Kill, Mode::Log].map(|m| (k, m, build(k, m))))
            .collect()
    });
    all.iter()
        .find(|(k, m, _)| *k == kind && (*m == mode || (mode == Mode::Off && *m == Mode::Kill)))
        .map(|(_, _, p)| p.as_ref().map_err(Clone::clone))
        .unwrap_or_else(|| Err("no such filter".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_list_allows_what_a_vmm_never_needs() {
        for kind in ThreadKind::ALL {
            let list = allowed(kind);
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_bpf,
                libc::SYS_kexec_load,
                libc::SYS_init_module,
                libc::SYS_setuid,
                libc::SYS_process_vm_writev,
                libc::SYS_io_uring_setup,
                libc::SYS_syslog,
            ] {
                assert!(!list.contains(&nr), "{kind:?} allows {nr}");
            }
            assert!(build(kind, Mode::Kill).is_ok());
        }
        // The guest-facing threads open nothing, make no sockets and start
        // no threads.
        for kind in [ThreadKind::Vcpu, ThreadKind::Signals] {
            let list = allowed(kind);
            for nr in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_mkdirat,
                libc::SYS_renameat2,
            ] {
                assert!(!list.contains(&nr), "{kind:?} allows {nr}");
            }
        }
    }

    /// Set in the child the next test runs itself as: which ioctl it makes
    /// under the device I/O filter.
    const CHILD_ENV: &str = "STASIS_SANDBOX_TEST_IOCTL";

    #[test]
    fn device_io_threads_may_make_only_their_devices_ioctls() {
        use std::os::unix::process::ExitStatusExt;
        if let Ok(which) = std::env::var(CHILD_ENV) {
            let (fd, request): (i32, u64) = match which.as_str() {
                "fionbio" => (0, libc::FIONBIO),
                "kvm" => (0, 0xae00),
                "tiocsti" => (0, u64::from(TIOCSTI)),
                "tioclinux" => (0, u64::from(TIOCLINUX)),
                "siocgifflags" => (0, libc::SIOCGIFFLAGS),
                _ => unreachable!(),
            };
            let program = program(ThreadKind::DeviceIo, Mode::Kill).unwrap();
            seccompiler::apply_filter(program).unwrap();
            let mut arg = [0u8; 64];
            // SAFETY: an ioctl on standard input with a 64-byte buffer it
            // may fill; every request here fails or reads no more than that.
            unsafe { libc::ioctl(fd, request as _, arg.as_mut_ptr()) };
            std::process::exit(0);
        }
        let exe = std::env::current_exe().unwrap();
        for (which, allowed) in [
            ("fionbio", true),
            ("kvm", true),
            ("tiocsti", false),
            ("tioclinux", false),
            ("siocgifflags", false),
        ] {
            let status = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "lists::tests::device_io_threads_may_make_only_their_devices_ioctls",
                    "--test-threads",
                    "1",
                ])
                .env(CHILD_ENV, which)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            if allowed {
                assert_eq!(status.code(), Some(0), "{which}: {status:?}");
            } else {
                assert_eq!(status.signal(), Some(libc::SIGSYS), "{which}: {status:?}");
            }
        }
    }
}
