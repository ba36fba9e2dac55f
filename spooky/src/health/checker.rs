//! Where backend health lives at run time. The [`HealthBoard`] is read by every worker on the
//! request path (one relaxed atomic load per backend, never a lock) and written only by the
//! control thread ([`Control`]), which runs the [`crate::health`] state machines: one active
//! prober per backend for the whole process (HTTP/2 GET to `health_check.path`), plus the
//! passive reports workers send from real traffic. Every transition is logged at info.

use crate::config::Config;
use crate::health::{BackendHealth, LatencyStats, TrafficOutcome, Transition};
use crate::server::Shared;
use crate::upstream::{BackendPool, Connector};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A passive-health report from a worker.
pub struct Report {
    pub upstream: usize,
    pub backend: usize,
    pub outcome: TrafficOutcome,
    pub latency: Option<Duration>,
}

/// Published health of one backend.
#[derive(Default, Debug)]
pub struct BackendSlot {
    pub available: AtomicBool,
    pub state: AtomicU32,
    pub consecutive_failures: AtomicU32,
    pub ewma_latency_us: AtomicU64,
    pub last_latency_us: AtomicU64,
    pub probes_ok: AtomicU64,
    pub probes_failed: AtomicU64,
}

/// The published health of every backend, `[upstream][backend]` flattened.
pub struct HealthBoard {
    offsets: Vec<usize>,
    slots: Vec<BackendSlot>,
    reports: mpsc::UnboundedSender<Report>,
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Report>>>,
    /// The `backends` BPF map, when eBPF steering runs: [`publish`] mirrors into it.
    bpf: OnceLock<Arc<Mutex<crate::steering::ebpf::BackendsMap>>>,
}

impl HealthBoard {
    /// Every backend starts available (optimistic start, as the state machine does).
    pub fn new(config: &Config) -> Self {
        let mut offsets = Vec::with_capacity(config.upstreams.len());
        let mut n = 0;
        for up in &config.upstreams {
            offsets.push(n);
            n += up.backends.len();
        }
        let slots = (0..n)
            .map(|_| BackendSlot {
                available: AtomicBool::new(true),
                ..Default::default()
            })
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            offsets,
            slots,
            reports: tx,
            inbox: Mutex::new(Some(rx)),
            bpf: OnceLock::new(),
        }
    }

    /// From now on, [`publish`] also writes each backend's health into `map` (the pinned
    /// `backends` BPF map). Only the first call takes effect.
    pub fn mirror_to_bpf(&self, map: crate::steering::ebpf::BackendsMap) {
        let _ = self.bpf.set(Arc::new(Mutex::new(map)));
    }

    /// After a reload: keep mirroring into the BPF map the previous board wrote to.
    pub fn inherit_bpf(&self, previous: &HealthBoard) {
        if let Some(map) = previous.bpf.get() {
            // Backends past the new count were removed: clear their entries.
            if let Ok(mut m) = map.lock() {
                if let Err(e) = m.clear_from(self.slots.len()) {
                    tracing::debug!(error = %e, "cannot clear removed backends from the BPF map");
                }
            }
            let _ = self.bpf.set(map.clone());
        }
    }

    /// The flattened index of a backend (its `backends` map key).
    fn index(&self, upstream: usize, backend: usize) -> Option<usize> {
        Some(self.offsets.get(upstream)? + backend)
    }

    /// The published slot of a backend.
    pub fn slot(&self, upstream: usize, backend: usize) -> Option<&BackendSlot> {
        self.slots.get(self.offsets.get(upstream)? + backend)
    }

    /// Whether a backend may receive new requests.
    pub fn is_available(&self, upstream: usize, backend: usize) -> bool {
        self.slot(upstream, backend)
            .is_some_and(|s| s.available.load(Ordering::Relaxed))
    }

    /// Sends a passive-health observation to the control thread (never blocks).
    pub fn report(
        &self,
        upstream: usize,
        backend: usize,
        outcome: TrafficOutcome,
        latency: Option<Duration>,
    ) {
        let _ = self.reports.send(Report {
            upstream,
            backend,
            outcome,
            latency,
        });
    }
}

/// The control thread: health state machines and probers.
pub struct Control {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Vec<Carry>>>,
}

/// Health state handed from one configuration's control thread to the next, for backends
/// that keep their pool, id, address and health settings.
pub struct Carry {
    upstream: String,
    id: String,
    address: std::net::SocketAddr,
    check: crate::config::HealthCheck,
    passive: crate::config::PassiveHealth,
    machine: BackendHealth,
    latency: LatencyStats,
}

impl Control {
    /// Starts the control thread for `shared`.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start(shared: Arc<Shared>) -> std::io::Result<Self> {
        Self::start_with(shared, Vec::new())
    }

    /// Starts the control thread for `shared`, continuing the health state in `carry`.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start_with(shared: Arc<Shared>, carry: Vec<Carry>) -> std::io::Result<Self> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new().name("spooky-control".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "control thread: no runtime; health checks are off");
                    return Vec::new();
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, control_main(shared, carry, rx))
        })?;
        Ok(Self {
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stops the control thread, waits for it, and returns its health state.
    pub fn stop(mut self) -> Vec<Carry> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

struct Tracked {
    upstream: usize,
    backend: usize,
    machine: BackendHealth,
    latency: LatencyStats,
}

type Machines = Rc<RefCell<Vec<Vec<Tracked>>>>;

async fn control_main(
    shared: Arc<Shared>,
    mut carry: Vec<Carry>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<Carry> {
    let cfg = &shared.config;
    let mut carried = 0;
    let machines: Machines = Rc::new(RefCell::new(
        cfg.upstreams
            .iter()
            .enumerate()
            .map(|(u, up)| {
                up.backends
                    .iter()
                    .enumerate()
                    .map(|(b, be)| {
                        let kept = carry.iter().position(|c| {
                            c.upstream == up.name
                                && c.id == be.id
                                && c.address == be.address
                                && c.check == be.health_check
                                && c.passive == up.passive_health
                        });
                        let (machine, latency) = match kept {
                            Some(i) => {
                                carried += 1;
                                let c = carry.swap_remove(i);
                                (c.machine, c.latency)
                            }
                            None => (
                                BackendHealth::new(&be.health_check, &up.passive_health),
                                LatencyStats::new(),
                            ),
                        };
                        Tracked {
                            upstream: u,
                            backend: b,
                            machine,
                            latency,
                        }
                    })
                    .collect()
            })
            .collect(),
    ));
    if carried > 0 {
        tracing::debug!(
            carried,
            "health state carried over from the previous configuration"
        );
    }
    for t in machines.borrow().iter().flatten() {
        publish(&shared, t, None, "start");
    }
    for (u, up) in cfg.upstreams.iter().enumerate() {
        for (b, be) in up.backends.iter().enumerate() {
            if !be.health_check.enabled {
                continue;
            }
            let tls = shared
                .backend_tls
                .get(u)
                .and_then(|r| r.get(b))
                .cloned()
                .flatten();
            match Connector::new(be, tls, up.timeouts.connect) {
                Ok(c) => {
                    tokio::task::spawn_local(prober(
                        shared.clone(),
                        machines.clone(),
                        u,
                        b,
                        BackendPool::new(c),
                    ));
                }
                Err(e) => tracing::error!(backend = %be.id, error = %e, "cannot probe backend"),
            }
        }
    }
    let Some(mut inbox) = shared.health.inbox.lock().ok().and_then(|mut g| g.take()) else {
        tracing::error!("health inbox already taken");
        return Vec::new();
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = &mut stop => return into_carry(&shared, &machines),
            Some(r) = inbox.recv() => {
                let mut m = machines.borrow_mut();
                if let Some(t) = m.get_mut(r.upstream).and_then(|row| row.get_mut(r.backend)) {
                    if let Some(lat) = r.latency {
                        t.latency.record(lat);
                    }
                    let tr = t.machine.on_traffic(r.outcome, Instant::now());
                    publish(&shared, t, tr, "passive");
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                for t in machines.borrow_mut().iter_mut().flatten() {
                    let tr = t.machine.poll(now);
                    publish(&shared, t, tr, "cooldown");
                }
            }
        }
    }
}

fn into_carry(shared: &Shared, machines: &Machines) -> Vec<Carry> {
    let taken = std::mem::take(&mut *machines.borrow_mut());
    taken
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let up = shared.config.upstreams.get(t.upstream)?;
            let be = up.backends.get(t.backend)?;
            Some(Carry {
                upstream: up.name.clone(),
                id: be.id.clone(),
                address: be.address,
                check: be.health_check.clone(),
                passive: up.passive_health.clone(),
                machine: t.machine,
                latency: t.latency,
            })
        })
        .collect()
}

fn publish(shared: &Shared, t: &Tracked, tr: Option<Transition>, source: &str) {
    let Some(slot) = shared.health.slot(t.upstream, t.backend) else {
        return;
    };
    slot.available
        .store(t.machine.is_available(), Ordering::Relaxed);
    slot.state
        .store(t.machine.state().as_u32(), Ordering::Relaxed);
    slot.consecutive_failures
        .store(t.machine.consecutive_failures(), Ordering::Relaxed);
    slot.ewma_latency_us
        .store(t.latency.ewma_us(), Ordering::Relaxed);
    slot.last_latency_us
        .store(t.latency.last_us(), Ordering::Relaxed);
    let up = shared.config.upstreams.get(t.upstream);
    let backend = up.and_then(|up| up.backends.get(t.backend));
    if let (Some(map), Some(index), Some(up), Some(backend)) = (
        shared.health.bpf.get(),
        shared.health.index(t.upstream, t.backend),
        up,
        backend,
    ) {
        let mut entry = spooky_common::maps::BackendEntry::named(
            t.upstream as u32,
            t.backend as u32,
            up.name.as_bytes(),
            backend.id.as_bytes(),
        );
        entry.state = t.machine.state().as_u32();
        entry.consecutive_failures = t.machine.consecutive_failures();
        entry.last_latency_us = t.latency.last_us();
        entry.ewma_latency_us = t.latency.ewma_us();
        // Refreshed every 100 ms by the control loop's tick (workers count in-flight requests
        // in their own metric shards).
        let in_flight = shared
            .metrics
            .route(&up.name, &backend.id)
            .in_flight_total();
        entry.in_flight = u32::try_from(in_flight.max(0)).unwrap_or(u32::MAX);
        if let Ok(mut map) = map.lock() {
            if let Err(e) = map.publish(index, &entry) {
                tracing::debug!(error = %e, "cannot mirror backend health into the BPF map");
            }
        }
    }
    if let Some(tr) = tr {
        let up = &shared.config.upstreams[t.upstream];
        tracing::info!(
            backend = %up.backends[t.backend].id,
            upstream = %up.name,
            from = %tr.from,
            to = %tr.to,
            cause = %tr.cause,
            source,
            "backend health changed"
        );
    }
}

/// Probes one backend forever: GET `health_check.path` every `interval`, `timeout` each.
async fn prober(shared: Arc<Shared>, machines: Machines, u: usize, b: usize, pool: BackendPool) {
    let up = &shared.config.upstreams[u];
    let backend = &up.backends[b];
    let check = &backend.health_check;
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let authority = backend
        .tls
        .as_ref()
        .map_or(backend.address_text.clone(), |t| t.server_name.clone());
    let scheme = if backend.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = format!("{scheme}://{authority}{}", check.path);
    loop {
        tick.tick().await;
        let started = Instant::now();
        let result = tokio::time::timeout(check.timeout, probe_once(&pool, &uri)).await;
        let (ok, detail) = match result {
            Err(_) => (false, format!("timed out after {:?}", check.timeout)),
            Ok(Err(e)) => (false, e),
            Ok(Ok(status)) => {
                let ok = check
                    .expected_status
                    .iter()
                    .any(|(lo, hi)| (*lo..=*hi).contains(&status));
                (ok, format!("status {status}"))
            }
        };
        let mut m = machines.borrow_mut();
        if let Some(t) = m.get_mut(u).and_then(|row| row.get_mut(b)) {
            if ok {
                t.latency.record(started.elapsed());
            } else {
                tracing::debug!(backend = %backend.id, upstream = %up.name, %detail, "health probe failed");
            }
            if let Some(slot) = shared.health.slot(u, b) {
                let counter = if ok {
                    &slot.probes_ok
                } else {
                    &slot.probes_failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            let tr = t.machine.on_probe(ok, Instant::now());
            publish(&shared, t, tr, "probe");
        }
    }
}

async fn probe_once(pool: &BackendPool, uri: &str) -> Result<u16, String> {
    let lease = pool.checkout(false).await.map_err(|e| e.to_string())?;
    let req = http::Request::get(uri)
        .body(())
        .map_err(|e| e.to_string())?;
    let mut send = lease.send.clone();
    let (resp, _) = send.send_request(req, true).map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    // Drain the body so the stream closes cleanly.
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        match chunk {
            Ok(c) => {
                let _ = body.flow_control().release_capacity(c.len());
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(status)
}
