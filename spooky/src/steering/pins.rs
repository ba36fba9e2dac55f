//! The pins of the eBPF tiers: every map of `PINNED_MAPS` under `steering.pin_path` while
//! Spooky runs (so `bpftool` and `spooky status` can read them), the BPF filesystem mounted
//! when the path is below `/sys/fs/bpf` and nothing is, and only our own pins removed at exit.

use super::ebpf::{self, EbpfPrograms};
use super::SteeringError;
use spooky_common::maps::PINNED_MAPS;
use std::path::{Path, PathBuf};

/// `statfs` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the BPF filesystem is mounted when a pin path below it has none.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// The pins this process made: `(path, map id)`.
pub(super) struct Pins {
    pub(super) dir: PathBuf,
    pinned: Vec<(PathBuf, u32)>,
}

impl Pins {
    /// Pins every map of [`PINNED_MAPS`] under `dir`, mounting the BPF filesystem at
    /// `/sys/fs/bpf` when `dir` is below it and nothing is mounted there, and replacing pins
    /// a crashed process left behind.
    pub(super) fn create(programs: &EbpfPrograms, dir: &Path) -> Result<Self, SteeringError> {
        ensure_bpffs(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| SteeringError::PinPath {
            path: dir.to_path_buf(),
            reason: format!("cannot create the directory: {e}"),
        })?;
        let mut pins = Self {
            dir: dir.to_path_buf(),
            pinned: Vec::new(),
        };
        for name in PINNED_MAPS {
            if let Err(e) = pins.pin(programs, name) {
                pins.remove();
                return Err(e);
            }
        }
        Ok(pins)
    }

    fn pin(&mut self, programs: &EbpfPrograms, name: &'static str) -> Result<(), SteeringError> {
        let path = self.dir.join(name);
        if path.exists() {
            tracing::warn!(path = %path.display(), "replacing a stale pin (left by a process that did not shut down cleanly, or another Spooky using the same pin path)");
            std::fs::remove_file(&path).map_err(|e| SteeringError::PinPath {
                path: path.clone(),
                reason: format!("cannot remove the stale pin: {e}"),
            })?;
        }
        let id = programs.pin_map(name, &self.dir)?;
        self.pinned.push((path, id));
        Ok(())
    }

    /// Removes the pins that are still ours (a newer process may have replaced them).
    pub(super) fn remove(&mut self) {
        for (path, id) in self.pinned.drain(..) {
            match ebpf::pinned_map_id(&path) {
                Ok(current) if current == id => {
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "cannot unpin");
                    }
                }
                _ => {
                    tracing::debug!(path = %path.display(), "pin replaced by another process; left alone")
                }
            }
        }
        // Only succeeds when empty: another process's pins keep the directory.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The filesystem type of `path`.
fn fs_type(path: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: `statfs` is plain data; `c` is a valid path for the duration of the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

/// Makes sure `dir` (existing or to be created) is on a BPF filesystem.
fn ensure_bpffs(dir: &Path) -> Result<(), SteeringError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_type(existing) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let root = Path::new(BPF_FS_ROOT);
    if !dir.starts_with(root) || !(existing == root || root.starts_with(existing)) {
        return Err(SteeringError::PinPath {
            path: dir.to_path_buf(),
            reason: format!(
                "not on a BPF filesystem (mount one: `mount -t bpf bpf {}`)",
                existing.display()
            ),
        });
    }
    std::fs::create_dir_all(root).map_err(|e| SteeringError::PinPath {
        path: dir.to_path_buf(),
        reason: format!("cannot create {BPF_FS_ROOT}: {e}"),
    })?;
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let (source, target, fstype) = (c("bpf"), c(BPF_FS_ROOT), c("bpf"));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call;
    // no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Another thread or process may have mounted it meanwhile.
        if fs_type(root) != Some(BPF_FS_MAGIC) {
            return Err(SteeringError::PinPath {
                path: dir.to_path_buf(),
                reason: format!("no BPF filesystem at {BPF_FS_ROOT} and mounting one failed: {e}"),
            });
        }
    }
    tracing::info!(
        path = BPF_FS_ROOT,
        "no BPF filesystem was mounted: mounted bpffs at {BPF_FS_ROOT}"
    );
    Ok(())
}
