//! Backend health: the per-backend state machine and latency statistics.
//!
//! [`BackendHealth`] is driven by events with the time passed in: active probe results
//! ([`BackendHealth::on_probe`]), outcomes of real traffic ([`BackendHealth::on_traffic`],
//! passive health) and timer polls ([`BackendHealth::poll`], which the checker runs every
//! 100 ms). Every call that changes the state returns a
//! [`Transition`] to log and to mirror into the `backends` BPF map.
//!
//! ```text
//!            unhealthy_threshold failed probes
//!   Healthy ─────────────────────────────────────► Unhealthy
//!     ▲  │ ◄──────────── healthy_threshold ok probes ─┘  ▲
//!     │  │ consecutive_failures failed requests           │ unhealthy_threshold failed probes
//!     │  ▼                                                │
//!     │ Ejected ──cooldown over──► Recovering ────────────┘
//!     │    │ (active checks on)         │ healthy_threshold ok probes
//!     └────┴────────────────────────────┘
//!   (cooldown over, active checks off)
//! ```
//!
//! Only `Healthy` backends are available. Traffic outcomes count only while `Healthy` (traffic
//! reaching other states is `fail_open` traffic and does not move the machine); probes are
//! ignored while `Ejected`. A threshold of 0 counts as 1; `consecutive_failures: 0` disables
//! passive ejection.
//!
//! [`LatencyStats`] keeps the EWMA and a fixed-bucket histogram of request latency.
//!
//! What does not live here: sending probes, timers, the BPF map writes and `fail_open` (the
//! caller's), and which backends a request may use ([`crate::lb`]).

use std::fmt;
use std::time::{Duration, Instant};

use crate::config;

/// Health state of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Takes traffic.
    Healthy,
    /// Failed `unhealthy_threshold` probes in a row; needs `healthy_threshold` good probes.
    Unhealthy,
    /// Removed by passive health until its cooldown ends.
    Ejected,
    /// Cooldown over; needs `healthy_threshold` good probes before taking traffic again.
    Recovering,
}

impl HealthState {
    /// The value stored in the `backends` BPF map.
    pub const fn as_u32(self) -> u32 {
        match self {
            HealthState::Healthy => 0,
            HealthState::Unhealthy => 1,
            HealthState::Ejected => 2,
            HealthState::Recovering => 3,
        }
    }

    /// The state stored as `value` in the `backends` BPF map.
    pub const fn from_u32(value: u32) -> Option<HealthState> {
        match value {
            0 => Some(HealthState::Healthy),
            1 => Some(HealthState::Unhealthy),
            2 => Some(HealthState::Ejected),
            3 => Some(HealthState::Recovering),
            _ => None,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
            HealthState::Ejected => "ejected",
            HealthState::Recovering => "recovering",
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How one proxied request to a backend ended, as passive health sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrafficOutcome {
    Success,
    /// TCP/TLS/HTTP/2 connection could not be established.
    ConnectFailure,
    /// The backend answered 5xx (or reset the stream).
    ServerError,
    /// Connect, response-head or idle timeout.
    Timeout,
}

impl fmt::Display for TrafficOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrafficOutcome::Success => "success",
            TrafficOutcome::ConnectFailure => "connect failure",
            TrafficOutcome::ServerError => "server error",
            TrafficOutcome::Timeout => "timeout",
        })
    }
}

/// Why a [`Transition`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// `count` active probes failed in a row.
    ProbeFailures { count: u32 },
    /// `count` active probes succeeded in a row.
    ProbeSuccesses { count: u32 },
    /// `count` requests failed in a row, the last one with `last`; ejected for `cooldown`.
    PassiveEjection {
        count: u32,
        last: TrafficOutcome,
        cooldown: Duration,
    },
    /// The ejection's cooldown ended.
    CooldownExpired,
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::ProbeFailures { count } => write!(f, "{count} consecutive failed probes"),
            Cause::ProbeSuccesses { count } => {
                write!(f, "{count} consecutive successful probes")
            }
            Cause::PassiveEjection {
                count,
                last,
                cooldown,
            } => write!(
                f,
                "{count} consecutive failed requests (last: {last}), ejected for {cooldown:?}"
            ),
            Cause::CooldownExpired => f.write_str("ejection cooldown expired"),
        }
    }
}

/// A change of [`HealthState`]: `from` is the state before the call, `to` after it.
///
/// `from == to` only when an expired ejection is renewed by the same call (`Ejected` →
/// `Ejected`: a new ejection with a new deadline).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: HealthState,
    pub to: HealthState,
    pub cause: Cause,
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} ({})", self.from, self.to, self.cause)
    }
}

/// The health state machine of one backend. See the module documentation.
#[derive(Clone, Debug)]
pub struct BackendHealth {
    state: HealthState,
    active: bool,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    eject_after: u32,
    cooldown: Duration,
    probe_successes: u32,
    probe_failures: u32,
    traffic_failures: u32,
    ejected_until: Option<Instant>,
    /// A failure streak may eject (the pool's `max_ejection_percent` allows it).
    may_eject: bool,
    /// An ejection was due but not allowed.
    withheld: bool,
}

impl BackendHealth {
    /// A backend in the `Healthy` state (optimistic start: traffic flows before the first
    /// probe returns).
    pub fn new(check: &config::HealthCheck, passive: &config::PassiveHealth) -> Self {
        BackendHealth {
            state: HealthState::Healthy,
            active: check.enabled,
            healthy_threshold: check.healthy_threshold.max(1),
            unhealthy_threshold: check.unhealthy_threshold.max(1),
            eject_after: passive.consecutive_failures,
            cooldown: passive.cooldown,
            probe_successes: 0,
            probe_failures: 0,
            traffic_failures: 0,
            ejected_until: None,
            may_eject: true,
            withheld: false,
        }
    }

    /// Whether a failure streak may eject this backend now (the checker says no when the
    /// pool has as many backends ejected as `max_ejection_percent` allows).
    pub fn allow_ejection(&mut self, may: bool) {
        self.may_eject = may;
    }

    /// Whether an ejection was due but withheld since the last call.
    pub fn take_withheld(&mut self) -> bool {
        std::mem::take(&mut self.withheld)
    }

    /// Current state.
    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Whether the backend may take traffic (it is `Healthy`).
    pub fn is_available(&self) -> bool {
        self.state == HealthState::Healthy
    }

    /// The longer of the current failed-probe and failed-request streaks (what the `backends`
    /// map shows).
    pub fn consecutive_failures(&self) -> u32 {
        self.probe_failures.max(self.traffic_failures)
    }

    /// When [`BackendHealth::poll`] has something to do: the end of the current ejection
    /// (the checker polls every 100 ms instead; tests use it to check the ejection's end).
    #[cfg(test)]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// Feeds one active probe result at `now`.
    pub fn on_probe(&mut self, ok: bool, now: Instant) -> Option<Transition> {
        let expired = self.poll(now);
        let changed = self.probe(ok);
        merge(expired, changed)
    }

    /// Feeds the outcome of one proxied request at `now` (passive health).
    pub fn on_traffic(&mut self, outcome: TrafficOutcome, now: Instant) -> Option<Transition> {
        let expired = self.poll(now);
        let changed = self.traffic(outcome, now);
        merge(expired, changed)
    }

    /// Ends an ejection whose cooldown is over at `now`: to `Recovering` when active checks
    /// are enabled, else straight to `Healthy`.
    pub fn poll(&mut self, now: Instant) -> Option<Transition> {
        let until = self.ejected_until?;
        if now < until {
            return None;
        }
        self.ejected_until = None;
        self.traffic_failures = 0;
        self.probe_successes = 0;
        self.probe_failures = 0;
        let to = if self.active {
            HealthState::Recovering
        } else {
            HealthState::Healthy
        };
        Some(self.enter(to, Cause::CooldownExpired))
    }

    fn probe(&mut self, ok: bool) -> Option<Transition> {
        if self.state == HealthState::Ejected {
            return None;
        }
        if ok {
            self.probe_failures = 0;
            self.probe_successes = self.probe_successes.saturating_add(1);
            let count = self.probe_successes;
            if self.state != HealthState::Healthy && count >= self.healthy_threshold {
                self.traffic_failures = 0;
                return Some(self.enter(HealthState::Healthy, Cause::ProbeSuccesses { count }));
            }
        } else {
            self.probe_successes = 0;
            self.probe_failures = self.probe_failures.saturating_add(1);
            let count = self.probe_failures;
            if self.state != HealthState::Unhealthy && count >= self.unhealthy_threshold {
                return Some(self.enter(HealthState::Unhealthy, Cause::ProbeFailures { count }));
            }
        }
        None
    }

    fn traffic(&mut self, outcome: TrafficOutcome, now: Instant) -> Option<Transition> {
        if self.state != HealthState::Healthy {
            return None;
        }
        if outcome == TrafficOutcome::Success {
            self.traffic_failures = 0;
            return None;
        }
        self.traffic_failures = self.traffic_failures.saturating_add(1);
        let count = self.traffic_failures;
        if self.eject_after == 0 || count < self.eject_after {
            return None;
        }
        if !self.may_eject {
            // Said once per streak; a later failure ejects once there is room.
            self.withheld = count == self.eject_after;
            return None;
        }
        // A cooldown too long for `Instant` (not a real configuration) ends at the next poll.
        self.ejected_until = Some(now.checked_add(self.cooldown).unwrap_or(now));
        Some(self.enter(
            HealthState::Ejected,
            Cause::PassiveEjection {
                count,
                last: outcome,
                cooldown: self.cooldown,
            },
        ))
    }

    fn enter(&mut self, to: HealthState, cause: Cause) -> Transition {
        let from = self.state;
        self.state = to;
        if to != HealthState::Healthy {
            // A streak of good probes only counts from the new state on.
            self.probe_successes = 0;
        }
        if to == HealthState::Healthy || to == HealthState::Recovering {
            self.probe_failures = 0;
        }
        Transition { from, to, cause }
    }
}

/// One transition for a call that may have expired an ejection and then changed state again.
fn merge(first: Option<Transition>, second: Option<Transition>) -> Option<Transition> {
    match (first, second) {
        (Some(a), Some(b)) => Some(Transition {
            from: a.from,
            to: b.to,
            cause: b.cause,
        }),
        (a, b) => b.or(a),
    }
}

/// Weight of the newest sample in the EWMA.
pub const EWMA_ALPHA: f64 = 0.2;

/// Request latency of one backend: last sample and EWMA (α = [`EWMA_ALPHA`]; the first
/// sample seeds it).
#[derive(Clone, Debug, Default)]
pub struct LatencyStats {
    last_us: u64,
    ewma_us: f64,
    count: u64,
}

impl LatencyStats {
    /// Empty statistics.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample.
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.last_us = us;
        self.ewma_us = if self.count == 0 {
            us as f64
        } else {
            self.ewma_us + EWMA_ALPHA * (us as f64 - self.ewma_us)
        };
        self.count = self.count.saturating_add(1);
    }

    /// The exponentially weighted moving average in µs (0 before the first sample).
    pub fn ewma_us(&self) -> u64 {
        self.ewma_us.round() as u64
    }

    /// The latest sample in µs (0 before the first sample).
    pub fn last_us(&self) -> u64 {
        self.last_us
    }
}

#[cfg(test)]
mod tests;
