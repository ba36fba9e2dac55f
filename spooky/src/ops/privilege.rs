//! Dropping root: after the sockets are bound and the kernel programs are loaded, attached and
//! pinned, Spooky can switch to an unprivileged user (`user:` in the configuration).
//!
//! What still works afterwards, and why: the UDP and admin sockets are already bound; BPF maps
//! are updated through file descriptors opened while privileged (Linux checks privileges when
//! maps and programs are created, not when an open map is read or written); the pin directory
//! is handed to the new user first so that a clean shutdown can still unpin. Configuration
//! reloads must be able to read the configuration, certificate and key files as that user.

use crate::config::User;
use std::path::Path;

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
        chown_tree(dir, uid, gid)?;
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

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    let chown = |p: &Path| -> Result<(), PrivilegeError> {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|source| PrivilegeError::Sys {
            call: "chown",
            source,
        })
    };
    chown(dir)?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            chown(&e.path())?;
        }
    }
    Ok(())
}
