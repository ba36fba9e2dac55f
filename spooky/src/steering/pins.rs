//! The pins of the eBPF tiers: every map of `PINNED_MAPS` lives at `steering.pin_path/NAME`
//! while Spooky runs, so `bpftool` and `spooky status` can read them and a process taking
//! over loads its programs onto the same maps (and adopts the XDP link its predecessor pinned
//! at [`XDP_LINK_PIN`]). The BPF filesystem is mounted when the path is below `/sys/fs/bpf`
//! and nothing is. The last process out removes the pins; one that handed over leaves them.

use super::ebpf::PinnedMaps;
use super::SteeringError;
use spooky_common::maps::{MAPS_ABI, PINNED_MAPS};
use std::path::{Path, PathBuf};

/// `statfs` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the BPF filesystem is mounted when a pin path below it has none.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";
/// Where a process handing over pins its XDP link for its successor.
pub(super) const XDP_LINK_PIN: &str = "xdp_link";

/// The pin directory of this process's maps.
pub(super) struct Pins {
    pub(super) dir: PathBuf,
    /// The pins our maps had when loaded: `(path, inode)`. Only those are removed at the
    /// end, never a newer process's. (Inodes, not map ids: after dropping privileges the
    /// process may not open the root-owned pins any more, but it can still look at them.)
    ours: Vec<(PathBuf, u64)>,
}

impl Pins {
    /// Makes `dir` ready for the maps. A fresh start refuses when a live Spooky's maps are
    /// pinned there, and removes pins a crashed one left; a takeover needs its predecessor's
    /// pins, with this build's map layouts.
    pub(super) fn prepare(dir: &Path, takeover: bool) -> Result<Self, SteeringError> {
        ensure_bpffs(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| SteeringError::PinPath {
            path: dir.to_path_buf(),
            reason: format!("cannot create the directory: {e}"),
        })?;
        let pins = Self {
            dir: dir.to_path_buf(),
            ours: Vec::new(),
        };
        let pinned = PinnedMaps::open(dir).and_then(|m| m.config());
        if takeover {
            let config = pinned.map_err(|e| {
                SteeringError::Takeover(format!(
                    "no steering maps of the running Spooky at {}: {e}",
                    dir.display()
                ))
            })?;
            if config.abi != MAPS_ABI {
                return Err(SteeringError::Takeover(format!(
                    "the running Spooky's kernel maps at {} have layout {}, this build's {MAPS_ABI}: \
                     a takeover cannot keep its connections; stop it and start this one",
                    dir.display(),
                    config.abi
                )));
            }
            return Ok(pins);
        }
        if let Ok(config) = &pinned {
            if config.pid != std::process::id() && process_alive(config.pid) {
                return Err(SteeringError::Busy {
                    pid: config.pid,
                    path: dir.to_path_buf(),
                });
            }
        }
        let stale: Vec<PathBuf> = PINNED_MAPS
            .iter()
            .chain([XDP_LINK_PIN].iter())
            .map(|n| dir.join(n))
            .filter(|p| p.exists())
            .collect();
        if !stale.is_empty() {
            tracing::warn!(path = %dir.display(), pins = stale.len(), "removing pins a Spooky that did not shut down cleanly left");
        }
        for path in stale {
            std::fs::remove_file(&path).map_err(|e| SteeringError::PinPath {
                path: path.clone(),
                reason: format!("cannot remove the stale pin: {e}"),
            })?;
        }
        Ok(pins)
    }

    /// Notes which maps are pinned now (ours, once loaded onto the pins).
    pub(super) fn record(&mut self) {
        self.ours = PINNED_MAPS
            .iter()
            .map(|n| self.dir.join(n))
            .filter_map(|path| inode(&path).map(|ino| (path, ino)))
            .collect();
    }

    /// Removes every pin of `dir` (a fresh start that failed: they are all its own).
    pub(super) fn remove_all(dir: &Path) {
        for name in PINNED_MAPS.iter().chain([XDP_LINK_PIN].iter()) {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_dir(dir);
    }

    /// Where this process pins its XDP link for a successor.
    pub(super) fn xdp_link(&self) -> PathBuf {
        self.dir.join(XDP_LINK_PIN)
    }

    /// Removes our pins (the last process out); pins another process replaced them with
    /// stay.
    pub(super) fn remove(&self) {
        let link = self.dir.join(XDP_LINK_PIN);
        let ours = self
            .ours
            .iter()
            .filter(|(path, ino)| inode(path) == Some(*ino))
            .map(|(path, _)| path)
            .chain(std::iter::once(&link));
        for path in ours {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot unpin"),
            }
        }
        // Only succeeds when empty.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The inode of `path`, when it exists.
fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Whether a Spooky with process id `pid` runs: the process exists, is not a zombie (killed,
/// not yet reaped), and is a `spooky` (a dead Spooky's pid may have been reused).
fn process_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) state …`: comm may hold spaces and parentheses, so split at the last `)`.
    let Some((head, tail)) = stat.rsplit_once(')') else {
        return false;
    };
    let comm = head.split_once('(').map_or("", |(_, c)| c);
    let state = tail.trim_start().chars().next();
    comm.starts_with("spooky") && !matches!(state, Some('Z' | 'X'))
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
