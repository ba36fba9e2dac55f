//! The I/O that validating a configuration needs — read a file it names, resolve a backend's
//! host name, look up the `user` — behind one small trait, so that validation itself stays
//! sans-IO: the proxy passes [`System`], tests and the fuzzer pass an [`Env`] of their own that
//! touches nothing outside the process.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// What configuration validation may ask of the outside world.
pub trait Env {
    /// The bytes of the file at `path`.
    ///
    /// # Errors
    /// Why it cannot be read.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;

    /// The uid and gid of the user called `name`, `None` when there is none.
    fn user(&self, name: &str) -> Option<(u32, u32)>;
}

/// The real machine: the filesystem, the system resolver, the user database.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl Env for System {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn user(&self, name: &str) -> Option<(u32, u32)> {
        let name = CString::new(name).ok()?;
        // SAFETY: passwd is a plain C struct of integers and pointers; all-zero (null
        // pointers) is a valid value that getpwnam_r overwrites.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to live, correctly sized storage owned by this frame;
        // getpwnam_r writes only within `pwd` and `buf`.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_knows_root_and_not_a_made_up_user() {
        assert_eq!(System.user("root"), Some((0, 0)));
        assert_eq!(System.user("no-such-user-spooky"), None);
        assert_eq!(System.user("nul\0inside"), None);
        assert!(System.read(Path::new("/nonexistent/spooky")).is_err());
    }
}
