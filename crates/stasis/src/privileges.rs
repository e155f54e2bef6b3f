//! `--user` and `--group`: a VMM started as root gives root up once its
//! VM exists. Everything that needs root (opening `/dev/kvm`, taps, disks
//! and output files, creating the VM) is done by then; the API socket is
//! created afterwards, as the new user, in that user's runtime directory,
//! so the user can reach it and root's is never exposed.
//!
//! Written by hand over libc: no maintained crate does this small, exact
//! sequence (clear supplementary groups, set the group, set the user,
//! check that root cannot be regained).

use std::ffi::CString;

use clap::Args;

/// Who the VMM becomes once its VM is set up.
#[derive(Debug, Clone, Default, Args)]
pub struct PrivilegeArgs {
    /// Once the VM is set up (KVM, taps, disks and output files opened),
    /// become this user (a name or a numeric uid) and create the API
    /// socket as that user, in its runtime directory
    /// ($STASIS_RUNTIME_DIR, or /tmp/stasis-UID). Needs root.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// With --user: the group to become (a name or a numeric gid); the
    /// default is the user's primary group. Supplementary groups are
    /// cleared.
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<String>,
}

/// A user and group to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
}

/// `(uid, primary gid)` of user `name`, from the password database.
fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    let c = CString::new(name).map_err(|_| format!("--user {name:?}: contains a NUL byte"))?;
    // SAFETY: `passwd` is plain data (integers and pointers); all-zero is
    // valid, and it is only read after getpwnam_r filled it.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is
    // NUL-terminated, `pw` and `buf` outlive it and `buf.len()` is its
    // size; getpwnam_r writes only into them and `out`.
    let r = unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return Err(format!("--user {name}: no such user"));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

/// The gid of group `name`, from the group database.
fn lookup_group(name: &str) -> Result<u32, String> {
    let c = CString::new(name).map_err(|_| format!("--group {name:?}: contains a NUL byte"))?;
    // SAFETY: `group` is plain data; all-zero is valid, and it is only read
    // after getgrnam_r filled it.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 64 << 10];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `lookup_user`.
    let r = unsafe { libc::getgrnam_r(c.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return Err(format!("--group {name}: no such group"));
    }
    Ok(gr.gr_gid)
}

impl PrivilegeArgs {
    /// The identity to become, or `None` without `--user`. Checked before
    /// anything is created: a wrong name fails at once.
    pub fn identity(&self) -> Result<Option<Identity>, String> {
        let Some(user) = &self.user else {
            return Ok(None);
        };
        let (uid, primary) = match user.parse::<u32>() {
            Ok(uid) => (uid, None),
            Err(_) => {
                let (u, g) = lookup_user(user)?;
                (u, Some(g))
            }
        };
        let gid = match &self.group {
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => lookup_group(g)?,
            },
            None => primary.ok_or_else(|| {
                format!("--user {user}: a numeric uid needs --group (there is no primary group to take)")
            })?,
        };
        if uid == 0 {
            return Err("--user: becoming root is not giving root up".into());
        }
        if gid == 0 {
            return Err(
                "--group: the root group (gid 0) is not giving root up; name the user's own group"
                    .into(),
            );
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("--user needs stasis to be started as root".into());
        }
        Ok(Some(Identity { uid, gid }))
    }
}

/// Becomes `id` for good, in every thread (glibc applies set*id to all
/// of a process's threads): supplementary groups cleared, then the group,
/// then the user; and checks that root cannot be regained.
pub fn become_user(id: Identity) -> Result<(), String> {
    let fail = |what: &str| {
        format!(
            "cannot give up root ({what}): {}",
            std::io::Error::last_os_error()
        )
    };
    // Userfaultfds (live migration, background snapshots and restores)
    // come from /dev/userfaultfd once root is gone: opened now, kept.
    match stasis_vmm::uffd::keep_device_open() {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "this kernel has no /dev/userfaultfd: as uid {}, live migration and background snapshots and restores need vm.unprivileged_userfaultfd=1",
            id.uid
        ),
        Err(e) => tracing::warn!("cannot open /dev/userfaultfd before giving root up: {e}"),
    }
    // Once root is gone the process is not dumpable and /proc/self is
    // root's: dirty-page tracking's pagemap is opened now.
    if let Err(e) = stasis_vmm::dirty::keep_pagemap_open() {
        tracing::warn!("cannot open /proc/self/pagemap before giving root up: {e}");
    }
    // SAFETY: setgroups with a count of 0 reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(fail("setgroups"));
    }
    // SAFETY: setresgid/setresuid take plain integers.
    if unsafe { libc::setresgid(id.gid, id.gid, id.gid) } != 0 {
        return Err(fail("setresgid"));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(id.uid, id.uid, id.uid) } != 0 {
        return Err(fail("setresuid"));
    }
    // The raw system call, in this thread only: glibc's setuid would ask
    // every thread to make it, and the filtered ones may not.
    // SAFETY: setuid(0) only asks; it must fail now.
    if unsafe { libc::syscall(libc::SYS_setuid, 0) } == 0 {
        return Err("gave up root, but setuid(0) still succeeds".into());
    }
    // SAFETY: getuid/geteuid/getgid/getegid have no preconditions.
    let (uid, euid, gid, egid) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
        )
    };
    if (uid, euid, gid, egid) != (id.uid, id.uid, id.gid, id.gid) {
        return Err(format!(
            "gave up root, but runs as uid {uid}/{euid}, gid {gid}/{egid}"
        ));
    }
    tracing::info!("running as uid {}, gid {} from now on", id.uid, id.gid);
    Ok(())
}
