//! Dropping root: after the sockets are bound and the kernel programs are loaded, attached and
//! pinned, Spooky can switch to an unprivileged user (`user:` in the configuration).
//!
//! What still works afterwards, and why: the UDP and admin sockets are already bound; BPF maps
//! are updated through file descriptors opened while privileged (Linux checks privileges when
//! maps and programs are created, not when an open map is read or written); the pin
//! directory (not the pins in it, which stay root's) is handed to the new user so that a clean
//! shutdown can still unpin. Configuration reloads must be able to read the configuration,
//! certificate and key files as that user.
//!
//! Then, with or without `user:`, [`lock_down`]: no capability is kept (effective, permitted,
//! inheritable, ambient), and `no_new_privs` is set, so nothing the process runs later can
//! gain any.

use crate::config::User;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Why the switch failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("switching to user {user:?} needs root (running as uid {uid})")]
    NotRoot { user: String, uid: u32 },
    #[error("{call} failed: {source}")]
    Sys {
        call: &'static str,
        source: std::io::Error,
    },
}

fn check(call: &'static str, rc: libc::c_int) -> Result<(), PrivilegeError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Sys {
            call,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Switches the whole process to `user` (and its primary group, no supplementary groups).
/// `pin_dir`, when it exists, is handed to the user first (with everything pinned in it).
///
/// # Errors
/// [`PrivilegeError`] when the process is not root, or a call fails;
/// the process keeps its identity then.
pub fn drop_to(user: &User, pin_dir: Option<&Path>) -> Result<(u32, u32), PrivilegeError> {
    let (uid, gid) = (user.uid, user.gid);
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == uid {
        return Ok((uid, gid));
    }
    if euid != 0 {
        return Err(PrivilegeError::NotRoot {
            user: user.name.clone(),
            uid: euid,
        });
    }
    if let Some(dir) = pin_dir.filter(|d| d.is_dir()) {
        // The directory only: the maps pinned in it stay root's, so that the service user
        // cannot open them anew (and rewrite `config` or `workers`); our own descriptors,
        // opened before, keep working.
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|source| {
            PrivilegeError::Sys {
                call: "chown",
                source,
            }
        })?;
    }
    // SAFETY: plain syscalls on integers; glibc applies setgid/setuid to every thread.
    unsafe {
        check("setgroups", libc::setgroups(0, std::ptr::null()))?;
        check("setgid", libc::setgid(gid))?;
        check("setuid", libc::setuid(uid))?;
    }
    // SAFETY: as above.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(PrivilegeError::Sys {
            call: "setuid (root could be regained)",
            source: std::io::Error::other("privileges not dropped"),
        });
    }
    Ok((uid, gid))
}

/// The header and data of the `capset` system call (`_LINUX_CAPABILITY_VERSION_3`: two
/// 32-bit words per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Gives up every capability (effective, permitted, inheritable, ambient) and sets
/// `no_new_privs`. Called once everything privileged is done: sockets bound, kernel programs
/// loaded and attached, maps opened.
///
/// # Errors
/// [`PrivilegeError::Sys`] naming the call that failed.
pub fn lock_down() -> Result<(), PrivilegeError> {
    // SAFETY: plain prctl calls with integer arguments.
    unsafe {
        check(
            "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ),
        )?;
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: `header` and `data` are valid for the kernel's reads (version 3: two data
    // words); capset only reads them.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    check("capset", if rc == 0 { 0 } else { -1 })?;
    // SAFETY: as above.
    unsafe {
        check(
            "prctl(PR_SET_NO_NEW_PRIVS)",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
        )?;
    }
    Ok(())
}

/// Whether this process will [`lock_down`] once started (set at the start of start-up).
static LOCK_DOWN_PLANNED: AtomicBool = AtomicBool::new(false);

/// Says whether the process will lock down as root (no `user:`): helper threads started
/// before that give up their own capabilities at once ([`lock_down_helper_thread`]).
/// Capabilities belong to threads, and a thread keeps those it was created with. With
/// `user:` they must not: glibc switches every thread's user, aborting the process if one
/// cannot (a thread without CAP_SETGID), and the switch clears all threads' capabilities.
pub fn plan_lock_down(planned: bool) {
    LOCK_DOWN_PLANNED.store(planned, Ordering::Relaxed);
}

/// Called first by a helper thread started before the lock-down (the access-log writer, the
/// steering counters): when the process will lock down, gives up this thread's capabilities
/// now (it needs none: it writes to descriptors opened before).
pub fn lock_down_helper_thread() {
    if LOCK_DOWN_PLANNED.load(Ordering::Relaxed) {
        if let Err(e) = lock_down() {
            tracing::warn!(error = %e, "a helper thread could not give up its capabilities");
        }
    }
}

/// The effective capabilities (the low 64 bits) of any of the process's threads: their
/// union, so a thread that kept one shows.
pub fn effective_capabilities() -> u64 {
    let capeff = |status: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let mut union = 0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            union |=
                capeff(&std::fs::read_to_string(task.path().join("status")).unwrap_or_default());
        }
    }
    union | capeff(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
}
