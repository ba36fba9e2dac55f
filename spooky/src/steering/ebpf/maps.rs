//! Map handles user space keeps while Spooky runs — written by one thread ([`BackendsMap`],
//! [`WorkerCountersMap`], [`FleetMaps`] on reloads) or read from another ([`StatsReader`], behind `/metrics`) — and the
//! pinned maps opened again by `spooky status` and operators' tools ([`PinnedMaps`]).

use super::*;

/// The kernel's id of the map pinned at `path`.
///
/// # Errors
/// [`EbpfError::OpenPinned`] when there is no map pinned there.
pub fn pinned_map_id(path: &Path) -> Result<u32, EbpfError> {
    MapInfo::from_pin(path)
        .map(|info| info.id())
        .map_err(|source| EbpfError::OpenPinned {
            path: path.to_path_buf(),
            source,
        })
}

/// The fleet member table as XDP reads it: `fleet_members` (server id → address to forward
/// to) and `fleet_sources` (addresses GUE packets are taken from), kept equal to the
/// configuration's `fleet.members` at start and after every reload.
pub struct FleetMaps {
    pub(super) members: HashMap<MapData, ServerIdKey, FleetMember>,
    pub(super) sources: HashMap<MapData, MemberAddr, u8>,
}

impl std::fmt::Debug for FleetMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetMaps").finish_non_exhaustive()
    }
}

impl FleetMaps {
    /// Makes the maps hold exactly `members` (other members by server id) and `sources`:
    /// entries not wanted are removed, the others written.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when a write fails (a full map).
    pub fn sync(
        &mut self,
        members: &[(ServerIdKey, FleetMember)],
        sources: &[MemberAddr],
    ) -> Result<(), EbpfError> {
        let stale: Vec<ServerIdKey> = self
            .members
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !members.iter().any(|(id, _)| id == k))
            .collect();
        for k in stale {
            let _ = self.members.remove(&k);
        }
        for (id, member) in members {
            self.members
                .insert(id, member, 0)
                .map_err(|source| map_error(FLEET_MEMBERS_MAP, source))?;
        }
        let stale: Vec<MemberAddr> = self
            .sources
            .keys()
            .filter_map(Result::ok)
            .filter(|a| !sources.contains(a))
            .collect();
        for a in stale {
            let _ = self.sources.remove(&a);
        }
        for a in sources {
            self.sources
                .insert(a, 1, 0)
                .map_err(|source| map_error(FLEET_SOURCES_MAP, source))?;
        }
        Ok(())
    }

    /// What the maps hold: other members by server id, and sources.
    pub fn read(&self) -> (Vec<(ServerIdKey, FleetMember)>, Vec<MemberAddr>) {
        (
            self.members.iter().filter_map(Result::ok).collect(),
            self.sources.keys().filter_map(Result::ok).collect(),
        )
    }
}

/// The `backends` map, owned by the health checker while Spooky runs. Remembers what it
/// wrote last so that unchanged entries cost no system call.
pub struct BackendsMap {
    pub(super) map: Array<MapData, BackendEntry>,
    pub(super) last: Vec<Option<BackendEntry>>,
}

impl std::fmt::Debug for BackendsMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendsMap").finish_non_exhaustive()
    }
}

impl BackendsMap {
    /// Writes `backends[index]` unless it already holds `entry`.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `index` is out of range or the write fails.
    pub fn publish(&mut self, index: usize, entry: &BackendEntry) -> Result<(), EbpfError> {
        if self.last.get(index).copied().flatten().as_ref() == Some(entry) {
            return Ok(());
        }
        let key = u32::try_from(index).unwrap_or(u32::MAX);
        self.map
            .set(key, entry, 0)
            .map_err(|source| map_error(BACKENDS_MAP, source))?;
        if self.last.len() <= index {
            self.last.resize(index + 1, None);
        }
        if let Some(slot) = self.last.get_mut(index) {
            *slot = Some(*entry);
        }
        Ok(())
    }
}

impl BackendsMap {
    /// Clears (`present = 0`) every entry from `index` on that was written before.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when a write fails.
    pub fn clear_from(&mut self, index: usize) -> Result<(), EbpfError> {
        let written = self.last.len();
        for i in index..written {
            self.publish(i, &BackendEntry::default())?;
        }
        Ok(())
    }
}

/// A read-only handle on the per-CPU `stats` map (its own file descriptor): `Send + Sync`,
/// for the admin thread's `/metrics` scrapes.
pub struct StatsReader {
    pub(super) map: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for StatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsReader").finish_non_exhaustive()
    }
}

impl StatsReader {
    /// The counters now.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when the map cannot be read.
    pub fn read(&self) -> Result<Stats, EbpfError> {
        Stats::read(&self.map)
    }
}

/// The `worker_counters` map, owned by the steering thread while Spooky runs.
pub struct WorkerCountersMap {
    pub(super) map: Array<MapData, WorkerCounters>,
}

impl std::fmt::Debug for WorkerCountersMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerCountersMap").finish_non_exhaustive()
    }
}

impl WorkerCountersMap {
    /// Writes worker `index`'s counters.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `index` is out of range or the write fails.
    pub fn set(&mut self, index: u32, counters: &WorkerCounters) -> Result<(), EbpfError> {
        self.map
            .set(index, counters, 0)
            .map_err(|source| map_error(WORKER_COUNTERS_MAP, source))
    }
}

/// The maps a running Spooky pinned under its pin path, opened again (by `spooky status`,
/// tests, or any process with CAP_BPF): no API of the running process is involved.
pub struct PinnedMaps {
    dir: PathBuf,
    config: Array<MapData, SteeringConfig>,
    generations: Array<MapData, GenerationEntry>,
    workers: Array<MapData, WorkerEntry>,
    backends: Array<MapData, BackendEntry>,
    stats: PerCpuArray<MapData, u64>,
    worker_stats: PerCpuArray<MapData, u64>,
    worker_counters: Array<MapData, WorkerCounters>,
    initial_limits: HashMap<MapData, SourcePrefix, InitialBucket>,
}

impl std::fmt::Debug for PinnedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedMaps")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn open_pinned<T>(dir: &Path, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = dir.join(name);
    let opened = MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .and_then(T::try_from);
    opened.map_err(|source| EbpfError::OpenPinned { path, source })
}

impl PinnedMaps {
    /// Opens every map of `spooky_common::maps::PINNED_MAPS` under `dir`.
    ///
    /// # Errors
    /// [`EbpfError::OpenPinned`] naming the first pin that is missing or unreadable.
    pub fn open(dir: &Path) -> Result<Self, EbpfError> {
        Ok(Self {
            dir: dir.to_path_buf(),
            config: open_pinned(dir, CONFIG_MAP)?,
            generations: open_pinned(dir, GENERATIONS_MAP)?,
            workers: open_pinned(dir, WORKERS_MAP)?,
            backends: open_pinned(dir, BACKENDS_MAP)?,
            stats: open_pinned(dir, STATS_MAP)?,
            worker_stats: open_pinned(dir, WORKER_STATS_MAP)?,
            worker_counters: open_pinned(dir, WORKER_COUNTERS_MAP)?,
            initial_limits: open_pinned(dir, INITIAL_LIMITS_MAP)?,
        })
    }

    /// The source prefixes the Initial rate limit tracks now, with their state (at most
    /// `spooky_common::maps::MAX_INITIAL_PREFIXES`; entries that fail to read are skipped,
    /// as the XDP program may evict them meanwhile).
    pub fn initial_limits(&self) -> Vec<(SourcePrefix, InitialBucket)> {
        self.initial_limits.iter().filter_map(Result::ok).collect()
    }

    /// The directory the maps are pinned in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The steering configuration (`config[0]`).
    ///
    /// # Errors
    /// [`EbpfError::Map`] when the read fails.
    pub fn config(&self) -> Result<SteeringConfig, EbpfError> {
        self.config
            .get(&0, 0)
            .map_err(|source| map_error(CONFIG_MAP, source))
    }

    /// The entry of `generation`.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when the read fails.
    pub fn generation(&self, generation: u8) -> Result<GenerationEntry, EbpfError> {
        self.generations
            .get(&u32::from(generation), 0)
            .map_err(|source| map_error(GENERATIONS_MAP, source))
    }

    /// Worker `index`'s entry (`index`: `spooky_common::maps::slot`).
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `index` is out of range or the read fails.
    pub fn worker(&self, index: u32) -> Result<WorkerEntry, EbpfError> {
        self.workers
            .get(&index, 0)
            .map_err(|source| map_error(WORKERS_MAP, source))
    }

    /// Writes worker `index`'s entry (e.g. `alive = 0` to stop new connections to it).
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `index` is out of range or the write fails.
    pub fn set_worker(&mut self, index: u32, entry: &WorkerEntry) -> Result<(), EbpfError> {
        self.workers
            .set(index, entry, 0)
            .map_err(|source| map_error(WORKERS_MAP, source))
    }

    /// Backend `index`'s entry (`present == 0` past the last backend).
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `index` is out of range or the read fails.
    pub fn backend(&self, index: u32) -> Result<BackendEntry, EbpfError> {
        self.backends
            .get(&index, 0)
            .map_err(|source| map_error(BACKENDS_MAP, source))
    }

    /// Every present backend entry, in index order.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when a read fails.
    pub fn backends(&self) -> Result<Vec<BackendEntry>, EbpfError> {
        let mut out = Vec::new();
        for index in 0..self.backends.len() {
            let entry = self.backend(index)?;
            if entry.present == 0 {
                break;
            }
            out.push(entry);
        }
        Ok(out)
    }

    /// The per-CPU `stats` counters.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when the map cannot be read.
    pub fn stats(&self) -> Result<Stats, EbpfError> {
        Stats::read(&self.stats)
    }

    /// QUIC packets XDP placed on `worker`, per CPU.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `worker` is out of range or the read fails.
    pub fn worker_packets(&self, worker: u32) -> Result<Vec<u64>, EbpfError> {
        if worker >= SLOTS {
            return Ok(Vec::new());
        }
        let values = self
            .worker_stats
            .get(&worker, 0)
            .map_err(|source| map_error(WORKER_STATS_MAP, source))?;
        Ok(values.iter().copied().collect())
    }

    /// Worker `index`'s user-space counters.
    ///
    /// # Errors
    /// [`EbpfError::Map`] when `index` is out of range or the read fails.
    pub fn worker_counters(&self, index: u32) -> Result<WorkerCounters, EbpfError> {
        self.worker_counters
            .get(&index, 0)
            .map_err(|source| map_error(WORKER_COUNTERS_MAP, source))
    }
}
