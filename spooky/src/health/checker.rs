//! The health checker: one control thread for the whole life of the process. It runs the
//! state machine ([`super::BackendHealth`]) of every backend of the configuration in force and
//! publishes each backend's state on the health board (`board`), and into the `backends` BPF
//! map when eBPF steering runs. Its inputs: one active prober per backend (HTTP/2 GET to
//! `health_check.path` every `interval`), the passive reports workers send from real traffic
//! ([`Reporter`]), a 100 ms tick (ejection cooldowns, in-flight counts), and new snapshots
//! after a reload ([`Checker::follow`]).
//!
//! A reload restarts nothing: a backend that keeps its identity (pool, id, address) and its
//! health settings keeps its machine, its latency statistics and its prober; new backends get
//! a prober, removed ones lose theirs. Every transition is logged at info.

use super::{BackendHealth, LatencyStats, TrafficOutcome, Transition};
use crate::board::{BackendKey, BackendSlot};
use crate::config::{Backend, Upstream};
use crate::snapshot::{Follower, Snapshot};
use crate::stats::Metrics;
use crate::steering::ebpf::BackendsMap;
use crate::upstream::{h1, BackendPool, Connector, PoolLimits, Sender};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// A passive-health observation from a worker.
struct Report {
    slot: Arc<BackendSlot>,
    outcome: TrafficOutcome,
    latency: Option<Duration>,
}

/// Reports the checker holds at most before workers' reports are dropped (and counted in
/// [`REPORTS_DROPPED`]): a flood of failures cannot grow the queue without bound.
pub const REPORT_QUEUE: usize = 4096;
/// Reports the checker takes in one go; a backend they touch is published once for all.
const REPORT_BATCH: usize = 256;

/// Passive ejections not made because the pool had as many backends ejected as its
/// `max_ejection_percent` allows.
pub static EJECTIONS_WITHHELD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Passive-health reports dropped because the checker's queue was full.
pub static REPORTS_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where workers send what real traffic says about a backend (never blocks).
#[derive(Clone)]
pub struct Reporter(mpsc::Sender<Report>);

impl Reporter {
    /// One observation about the backend whose slot is `slot`.
    pub fn report(
        &self,
        slot: &Arc<BackendSlot>,
        outcome: TrafficOutcome,
        latency: Option<Duration>,
    ) {
        let sent = self.0.try_send(Report {
            slot: slot.clone(),
            outcome,
            latency,
        });
        if let Err(mpsc::error::TrySendError::Full(_)) = sent {
            REPORTS_DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The running checker.
pub struct Checker {
    stop: Option<oneshot::Sender<()>>,
    snapshots: Arc<watch::Sender<Arc<Snapshot>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checker {
    /// Starts the checker thread on `snapshot`. `bpf`: the `backends` map to mirror into.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start(
        snapshot: Arc<Snapshot>,
        metrics: Arc<Metrics>,
        bpf: Option<BackendsMap>,
    ) -> std::io::Result<(Self, Reporter)> {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (snap_tx, snap_rx) = watch::channel(snapshot);
        let (report_tx, report_rx) = mpsc::channel(REPORT_QUEUE);
        let thread = std::thread::Builder::new()
            .name("spooky-health".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "health checker: no runtime; health checks are off");
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                let state = Rc::new(RefCell::new(State {
                    tracked: HashMap::new(),
                    metrics,
                    bpf,
                    published: 0,
                }));
                local.block_on(&rt, run(state, snap_rx, report_rx, stop_rx));
            })?;
        Ok((
            Self {
                stop: Some(stop_tx),
                snapshots: Arc::new(snap_tx),
                thread: Some(thread),
            },
            Reporter(report_tx),
        ))
    }

    /// What makes the checker follow a new snapshot (after a reload); it may outlive the
    /// checker (then it does nothing).
    pub fn follower(&self) -> Follower {
        let snapshots = self.snapshots.clone();
        Box::new(move |next| {
            let _ = snapshots.send(next.clone());
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What decides whether a backend keeps its machine and prober across a reload.
#[derive(Clone, PartialEq)]
struct Settings {
    check: crate::config::HealthCheck,
    passive: crate::config::PassiveHealth,
    tls: Option<crate::config::BackendTls>,
    protocol: crate::config::BackendProtocol,
    send_proxy: bool,
    address_text: String,
    connect_timeout: Duration,
}

impl Settings {
    fn of(up: &Upstream, b: &Backend) -> Self {
        Self {
            check: b.health_check.clone(),
            passive: up.passive_health.clone(),
            tls: b.tls.clone(),
            protocol: b.protocol,
            send_proxy: up.send_proxy_protocol,
            address_text: b.address_text.clone(),
            connect_timeout: up.timeouts.connect,
        }
    }
}

/// One backend the checker follows.
struct Tracked {
    slot: Arc<BackendSlot>,
    settings: Settings,
    machine: BackendHealth,
    latency: LatencyStats,
    prober: Option<tokio::task::JoinHandle<()>>,
    /// Its index in the `backends` BPF map (position in the configuration).
    index: usize,
    upstream: usize,
    backend: usize,
}

struct State {
    tracked: HashMap<BackendKey, Tracked>,
    metrics: Arc<Metrics>,
    bpf: Option<BackendsMap>,
    /// Entries written to the BPF map by the last reconcile.
    published: usize,
}

type Shared = Rc<RefCell<State>>;

async fn run(
    state: Shared,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut reports: mpsc::Receiver<Report>,
    mut stop: oneshot::Receiver<()>,
) {
    let first = snapshots.borrow_and_update().clone();
    reconcile(&state, &first);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let next = snapshots.borrow_and_update().clone();
                reconcile(&state, &next);
            }
            Some(first) = reports.recv() => {
                // What is queued, at once: a backend is published once for the batch, unless
                // its state changes (each transition is published and logged).
                let mut batch = vec![first];
                while batch.len() < REPORT_BATCH {
                    match reports.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                let mut st = state.borrow_mut();
                let State { tracked, metrics, bpf, .. } = &mut *st;
                let mut touched: Vec<BackendKey> = Vec::new();
                let now = Instant::now();
                for r in batch {
                    let room = ejection_room(tracked, &r.slot.key);
                    let Some(t) = tracked.get_mut(&r.slot.key) else {
                        continue;
                    };
                    if let Some(lat) = r.latency {
                        t.latency.record(lat);
                    }
                    t.machine.allow_ejection(room);
                    let tr = t.machine.on_traffic(r.outcome, now);
                    if t.machine.take_withheld() {
                        EJECTIONS_WITHHELD.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            upstream = %t.slot.key.pool,
                            backend = %t.slot.key.id,
                            max_ejection_percent = t.settings.passive.max_ejection_percent,
                            "ejection withheld: the pool has as many backends ejected as allowed"
                        );
                    }
                    match tr {
                        Some(tr) => publish(t, metrics, bpf.as_mut(), Some(tr), "passive"),
                        None if !touched.contains(&r.slot.key) => touched.push(r.slot.key.clone()),
                        None => {}
                    }
                }
                for key in touched {
                    if let Some(t) = tracked.get(&key) {
                        publish(t, metrics, bpf.as_mut(), None, "passive");
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let mut st = state.borrow_mut();
                let State { tracked, metrics, bpf, .. } = &mut *st;
                for t in tracked.values_mut() {
                    let tr = t.machine.poll(now);
                    publish(t, metrics, bpf.as_mut(), tr, "cooldown");
                }
            }
        }
    }
    for t in state.borrow_mut().tracked.values_mut() {
        if let Some(p) = t.prober.take() {
            p.abort();
        }
    }
}

/// Whether the pool of backend `key` may have one more backend ejected: fewer are ejected
/// than its `max_ejection_percent` allows (at least one may always be).
fn ejection_room(tracked: &HashMap<BackendKey, Tracked>, key: &BackendKey) -> bool {
    let Some(me) = tracked.get(key) else {
        return false;
    };
    let (mut pool, mut ejected) = (0usize, 0usize);
    for t in tracked.values().filter(|t| t.upstream == me.upstream) {
        pool += 1;
        ejected += usize::from(t.machine.state() == super::HealthState::Ejected);
    }
    let allowed = (pool * me.settings.passive.max_ejection_percent as usize / 100).max(1);
    ejected < allowed
}

/// Makes the tracked set match `snapshot`: keeps what is unchanged, starts what is new,
/// stops what is gone, and republishes everything.
fn reconcile(state: &Shared, snapshot: &Arc<Snapshot>) {
    let mut old = std::mem::take(&mut state.borrow_mut().tracked);
    let mut next = HashMap::new();
    let (mut kept, mut index) = (0usize, 0usize);
    for (u, up) in snapshot.config.upstreams.iter().enumerate() {
        for (b, backend) in up.backends.iter().enumerate() {
            let Some(plan) = snapshot.backend(u, b) else {
                continue;
            };
            let key = plan.slot.key.clone();
            let settings = Settings::of(up, backend);
            let tracked = match old.remove(&key) {
                Some(mut t) if t.settings == settings => {
                    kept += 1;
                    t.slot = plan.slot.clone();
                    t
                }
                previous => {
                    if let Some(p) = previous.and_then(|mut t| t.prober.take()) {
                        p.abort();
                    }
                    let prober = backend.health_check.enabled.then(|| {
                        let connector = Connector::new(
                            backend,
                            plan.tls.clone(),
                            up.timeouts.connect,
                            up.send_proxy_protocol,
                        );
                        tokio::task::spawn_local(prober(
                            state.clone(),
                            key.clone(),
                            ProbeTarget::of(backend),
                            // One probe at a time: it never waits behind another.
                            Rc::new(BackendPool::new(
                                connector,
                                PoolLimits { max_pending: 1 },
                                None,
                            )),
                        ))
                    });
                    Tracked {
                        slot: plan.slot.clone(),
                        machine: BackendHealth::new(&backend.health_check, &up.passive_health),
                        latency: LatencyStats::new(),
                        settings,
                        prober,
                        index: 0,
                        upstream: 0,
                        backend: 0,
                    }
                }
            };
            next.insert(
                key,
                Tracked {
                    index,
                    upstream: u,
                    backend: b,
                    ..tracked
                },
            );
            index += 1;
        }
    }
    for t in old.values_mut() {
        if let Some(p) = t.prober.take() {
            p.abort();
        }
    }
    if kept > 0 {
        tracing::debug!(
            kept,
            "health state carried over from the previous configuration"
        );
    }
    let mut st = state.borrow_mut();
    st.tracked = next;
    let State {
        tracked,
        metrics,
        bpf,
        published,
    } = &mut *st;
    for t in tracked.values_mut() {
        publish(t, metrics, bpf.as_mut(), None, "start");
    }
    if let Some(map) = bpf.as_mut() {
        // Backends past the new count were removed: clear their entries.
        if index < *published {
            if let Err(e) = map.clear_from(index) {
                tracing::debug!(error = %e, "cannot clear removed backends from the BPF map");
            }
        }
    }
    *published = index;
}

/// Writes `t`'s state on the board (and into the BPF map), and logs a transition.
fn publish(
    t: &Tracked,
    metrics: &Metrics,
    bpf: Option<&mut BackendsMap>,
    tr: Option<Transition>,
    source: &str,
) {
    let slot = &t.slot;
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
    if let Some(map) = bpf {
        let key = &slot.key;
        let mut entry = spooky_common::maps::BackendEntry::named(
            t.upstream as u32,
            t.backend as u32,
            key.pool.as_bytes(),
            key.id.as_bytes(),
        );
        entry.state = t.machine.state().as_u32();
        entry.consecutive_failures = t.machine.consecutive_failures();
        entry.last_latency_us = t.latency.last_us();
        entry.ewma_latency_us = t.latency.ewma_us();
        // Refreshed every 100 ms by the tick (workers count in-flight requests in their own
        // metric shards).
        let in_flight = metrics.route(&key.pool, &key.id).in_flight_total();
        entry.in_flight = u32::try_from(in_flight.max(0)).unwrap_or(u32::MAX);
        if let Err(e) = map.publish(t.index, &entry) {
            tracing::debug!(error = %e, "cannot mirror backend health into the BPF map");
        }
    }
    if let Some(tr) = tr {
        tracing::info!(
            backend = %slot.key.id,
            upstream = %slot.key.pool,
            from = %tr.from,
            to = %tr.to,
            cause = %tr.cause,
            source,
            "backend health changed"
        );
    }
}

/// What a prober asks, and of whom.
struct ProbeTarget {
    uri: String,
    interval: Duration,
    timeout: Duration,
    expected: Vec<(u16, u16)>,
}

impl ProbeTarget {
    fn of(backend: &Backend) -> Self {
        let check = &backend.health_check;
        let authority = backend
            .tls
            .as_ref()
            .map_or(backend.address_text.clone(), |t| t.server_name.clone());
        let scheme = if backend.tls.is_some() {
            "https"
        } else {
            "http"
        };
        Self {
            uri: format!("{scheme}://{authority}{}", check.path),
            interval: check.interval,
            timeout: check.timeout,
            expected: check.expected_status.clone(),
        }
    }
}

/// Probes one backend until aborted: GET the health path every `interval`, `timeout` each.
async fn prober(state: Shared, key: BackendKey, target: ProbeTarget, pool: Rc<BackendPool>) {
    let mut tick = tokio::time::interval(target.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = Instant::now();
        let result = tokio::time::timeout(target.timeout, probe_once(&pool, &target.uri)).await;
        let (ok, detail) = match result {
            Err(_) => (false, format!("timed out after {:?}", target.timeout)),
            Ok(Err(e)) => (false, e),
            Ok(Ok(status)) => {
                let ok = target
                    .expected
                    .iter()
                    .any(|(lo, hi)| (*lo..=*hi).contains(&status));
                (ok, format!("status {status}"))
            }
        };
        let mut st = state.borrow_mut();
        let State {
            tracked,
            metrics,
            bpf,
            ..
        } = &mut *st;
        let Some(t) = tracked.get_mut(&key) else {
            return;
        };
        if ok {
            t.latency.record(started.elapsed());
            t.slot.probes_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::debug!(backend = %key.id, upstream = %key.pool, %detail, "health probe failed");
            t.slot.probes_failed.fetch_add(1, Ordering::Relaxed);
        }
        let tr = t.machine.on_probe(ok, Instant::now());
        publish(t, metrics, bpf.as_mut(), tr, "probe");
    }
}

async fn probe_once(pool: &Rc<BackendPool>, uri: &str) -> Result<u16, String> {
    let lease = pool
        .checkout(false, None)
        .await
        .map_err(|e| e.to_string())?;
    let req = http::Request::get(uri)
        .body(())
        .map_err(|e| e.to_string())?;
    match &lease.send {
        Sender::H2(send) => {
            let mut send = send.clone();
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
        Sender::H1(conn) => {
            let req = h1::to_http1(req, h1::RequestBody::empty())?;
            let (_, resp) = conn.send(req);
            let resp = resp.await.map_err(|e| e.error.to_string())?;
            let status = resp.status().as_u16();
            // Read the body to its end so the connection is kept for the next probe.
            let mut body = resp.into_body();
            while let Some(frame) = std::future::poll_fn(|cx| {
                http_body::Body::poll_frame(std::pin::Pin::new(&mut body), cx)
            })
            .await
            {
                frame.map_err(|e| e.to_string())?;
            }
            Ok(status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_report_queue_drops_and_counts_instead_of_growing() {
        let (tx, mut rx) = mpsc::channel(REPORT_QUEUE);
        let reporter = Reporter(tx);
        let slot = crate::board::HealthBoard::default().slot(BackendKey {
            pool: "p".into(),
            id: "b".into(),
            address: ([127, 0, 0, 1], 1).into(),
        });
        let before = REPORTS_DROPPED.load(Ordering::Relaxed);
        for _ in 0..REPORT_QUEUE + 10 {
            reporter.report(&slot, TrafficOutcome::ServerError, None);
        }
        assert!(REPORTS_DROPPED.load(Ordering::Relaxed) - before >= 10);
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, REPORT_QUEUE);
    }
}
