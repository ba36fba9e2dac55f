//! `proxy.memory_limit: auto`: three quarters of the memory this process may use — the
//! smaller of the machine's memory (`MemTotal`) and its cgroup's limit (cgroup v2
//! `memory.max`, or v1 `memory.limit_in_bytes`, of its own cgroup and every ancestor) — so
//! that shedding starts before the kernel's OOM killer would. Read through [`Env`], so it is
//! sans-IO like the rest of validation.

use super::Env;
use std::path::{Path, PathBuf};

/// The share of the memory available that `auto` allows, as numerator / denominator.
const SHARE: (u64, u64) = (3, 4);
/// Limits at or above this are "no limit" (cgroup v1 writes `PAGE_COUNTER_MAX` pages).
const UNLIMITED: u64 = 1 << 62;

/// The `auto` memory limit, or `None` when the machine's memory cannot be read.
pub fn auto_limit(env: &dyn Env) -> Option<u64> {
    let total = mem_total(env);
    let cgroup = cgroup_limit(env);
    let available = match (total, cgroup) {
        (Some(t), Some(c)) => t.min(c),
        (t, c) => t.or(c)?,
    };
    Some(available / SHARE.1 * SHARE.0)
}

/// `MemTotal` from `/proc/meminfo`, bytes.
fn mem_total(env: &dyn Env) -> Option<u64> {
    let text = env.read(Path::new("/proc/meminfo")).ok()?;
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The smallest memory limit of this process's cgroups (and their ancestors), bytes.
fn cgroup_limit(env: &dyn Env) -> Option<u64> {
    let text = env.read(Path::new("/proc/self/cgroup")).ok()?;
    let text = String::from_utf8_lossy(&text);
    let mut files: Vec<PathBuf> = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            // cgroup v2 (the unified hierarchy, at the root or beside v1 ones).
            for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                files.extend(ancestors(root, path, "memory.max"));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            files.extend(ancestors(
                "/sys/fs/cgroup/memory",
                path,
                "memory.limit_in_bytes",
            ));
        }
    }
    files
        .iter()
        .filter_map(|f| env.read(f).ok())
        .filter_map(|bytes| String::from_utf8_lossy(&bytes).trim().parse::<u64>().ok())
        .filter(|limit| *limit < UNLIMITED)
        .min()
}

/// `root/path/file` and the same file in every ancestor of `path` up to `root`.
fn ancestors(root: &str, path: &str, file: &str) -> Vec<PathBuf> {
    let mut dir = PathBuf::from(root).join(path);
    let mut out = Vec::new();
    loop {
        out.push(dir.join(file));
        if dir == Path::new(root) || !dir.pop() {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Files(HashMap<PathBuf, String>);

    impl Env for Files {
        fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
            self.0
                .get(path)
                .map(|t| t.as_bytes().to_vec())
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
        fn user(&self, _: &str) -> Option<(u32, u32)> {
            None
        }
    }

    fn files(list: &[(&str, &str)]) -> Files {
        Files(
            list.iter()
                .map(|(p, t)| (PathBuf::from(p), t.to_string()))
                .collect(),
        )
    }

    const MEMINFO: (&str, &str) = (
        "/proc/meminfo",
        "MemTotal:       8000000 kB\nMemFree: 1 kB\n",
    );

    #[test]
    fn three_quarters_of_the_machine_without_a_cgroup_limit() {
        let env = files(&[MEMINFO, ("/proc/self/cgroup", "0::/\n")]);
        assert_eq!(auto_limit(&env), Some(8_000_000 * 1024 / 4 * 3));
        assert_eq!(auto_limit(&files(&[])), None, "nothing to read: no limit");
    }

    #[test]
    fn the_smallest_limit_of_the_cgroup_and_its_ancestors_wins() {
        let v2 = files(&[
            MEMINFO,
            ("/proc/self/cgroup", "0::/system.slice/spooky.service\n"),
            (
                "/sys/fs/cgroup/system.slice/spooky.service/memory.max",
                "max\n",
            ),
            ("/sys/fs/cgroup/system.slice/memory.max", "1073741824\n"),
        ]);
        assert_eq!(auto_limit(&v2), Some(1 << 30 >> 2).map(|q| q * 3));
        let v1 = files(&[
            MEMINFO,
            ("/proc/self/cgroup", "9:pids:/\n4:memory:/a/b\n0::/\n"),
            (
                "/sys/fs/cgroup/memory/a/b/memory.limit_in_bytes",
                "536870912\n",
            ),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
        ]);
        assert_eq!(auto_limit(&v1), Some(536_870_912 / 4 * 3));
    }
}
