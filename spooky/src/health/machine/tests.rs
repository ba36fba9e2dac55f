use super::*;
use HealthState::{Ejected, Healthy, Recovering, Unhealthy};

fn check(enabled: bool) -> config::HealthCheck {
    config::HealthCheck {
        enabled,
        path: "/healthz".into(),
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(1),
        healthy_threshold: 2,
        unhealthy_threshold: 3,
        expected_status: vec![(200, 399)],
    }
}

fn passive(consecutive_failures: u32) -> config::PassiveHealth {
    config::PassiveHealth {
        consecutive_failures,
        cooldown: Duration::from_secs(30),
        server_errors: true,
        max_ejection_percent: 100,
    }
}

fn at(t0: Instant, secs: u64) -> Instant {
    t0 + Duration::from_secs(secs)
}

fn tr(from: HealthState, to: HealthState, cause: Cause) -> Option<Transition> {
    Some(Transition { from, to, cause })
}

#[test]
fn starts_healthy() {
    let h = BackendHealth::new(&check(true), &passive(5));
    assert_eq!(h.state(), Healthy);
    assert!(h.is_available());
    assert_eq!(h.consecutive_failures(), 0);
    assert_eq!(h.next_deadline(), None);
}

#[test]
fn probes_take_a_backend_down_and_up() {
    let t0 = Instant::now();
    let mut h = BackendHealth::new(&check(true), &passive(5));
    assert_eq!(h.on_probe(false, at(t0, 0)), None);
    assert_eq!(h.on_probe(false, at(t0, 5)), None);
    assert_eq!(h.consecutive_failures(), 2);
    // A success in between restarts the count.
    assert_eq!(h.on_probe(true, at(t0, 10)), None);
    assert_eq!(h.consecutive_failures(), 0);
    assert_eq!(h.on_probe(false, at(t0, 15)), None);
    assert_eq!(h.on_probe(false, at(t0, 20)), None);
    assert_eq!(
        h.on_probe(false, at(t0, 25)),
        tr(Healthy, Unhealthy, Cause::ProbeFailures { count: 3 })
    );
    assert!(!h.is_available());
    assert_eq!(h.on_probe(false, at(t0, 30)), None);
    assert_eq!(h.consecutive_failures(), 4);
    assert_eq!(h.on_probe(true, at(t0, 35)), None);
    assert_eq!(h.on_probe(false, at(t0, 40)), None);
    assert_eq!(h.on_probe(true, at(t0, 45)), None);
    assert_eq!(
        h.on_probe(true, at(t0, 50)),
        tr(Unhealthy, Healthy, Cause::ProbeSuccesses { count: 2 })
    );
    assert!(h.is_available());
    assert_eq!(h.on_probe(true, at(t0, 55)), None);
}

#[test]
fn passive_ejection_then_recovery_by_probes() {
    let t0 = Instant::now();
    let mut h = BackendHealth::new(&check(true), &passive(3));
    assert_eq!(h.on_traffic(TrafficOutcome::ServerError, at(t0, 0)), None);
    assert_eq!(h.on_traffic(TrafficOutcome::Timeout, at(t0, 0)), None);
    assert_eq!(h.on_traffic(TrafficOutcome::Success, at(t0, 1)), None);
    assert_eq!(h.consecutive_failures(), 0);
    assert_eq!(h.on_traffic(TrafficOutcome::ServerError, at(t0, 2)), None);
    assert_eq!(h.on_traffic(TrafficOutcome::Timeout, at(t0, 2)), None);
    let ejected = h.on_traffic(TrafficOutcome::ConnectFailure, at(t0, 3));
    assert_eq!(
        ejected,
        tr(
            Healthy,
            Ejected,
            Cause::PassiveEjection {
                count: 3,
                last: TrafficOutcome::ConnectFailure,
                cooldown: Duration::from_secs(30),
            }
        )
    );
    assert_eq!(h.consecutive_failures(), 3);
    assert!(!h.is_available());
    assert_eq!(h.next_deadline(), Some(at(t0, 33)));
    // Probes and traffic during the ejection change nothing.
    assert_eq!(h.on_probe(true, at(t0, 10)), None);
    assert_eq!(h.on_probe(true, at(t0, 15)), None);
    assert_eq!(h.on_traffic(TrafficOutcome::Success, at(t0, 16)), None);
    assert_eq!(h.poll(at(t0, 32)), None);
    assert_eq!(h.state(), Ejected);
    // Cooldown over: recovering, still unavailable.
    assert_eq!(
        h.poll(at(t0, 33)),
        tr(Ejected, Recovering, Cause::CooldownExpired)
    );
    assert_eq!(h.poll(at(t0, 34)), None);
    assert_eq!(h.next_deadline(), None);
    assert_eq!(h.consecutive_failures(), 0);
    assert!(!h.is_available());
    assert_eq!(h.on_probe(true, at(t0, 35)), None);
    assert_eq!(
        h.on_probe(true, at(t0, 40)),
        tr(Recovering, Healthy, Cause::ProbeSuccesses { count: 2 })
    );
    assert!(h.is_available());
}

#[test]
fn recovering_backend_that_keeps_failing_probes_becomes_unhealthy() {
    let t0 = Instant::now();
    let mut h = BackendHealth::new(&check(true), &passive(1));
    assert!(h.on_traffic(TrafficOutcome::Timeout, at(t0, 0)).is_some());
    assert!(h.poll(at(t0, 30)).is_some());
    assert_eq!(h.on_probe(true, at(t0, 31)), None);
    assert_eq!(h.on_probe(false, at(t0, 32)), None);
    assert_eq!(h.on_probe(true, at(t0, 33)), None); // streak restarted by the failure
    assert_eq!(h.on_probe(false, at(t0, 34)), None);
    assert_eq!(h.on_probe(false, at(t0, 35)), None);
    assert_eq!(
        h.on_probe(false, at(t0, 36)),
        tr(Recovering, Unhealthy, Cause::ProbeFailures { count: 3 })
    );
    assert_eq!(h.on_probe(true, at(t0, 37)), None);
    assert_eq!(
        h.on_probe(true, at(t0, 38)),
        tr(Unhealthy, Healthy, Cause::ProbeSuccesses { count: 2 })
    );
}

#[test]
fn without_active_checks_cooldown_returns_to_healthy() {
    let t0 = Instant::now();
    let mut h = BackendHealth::new(&check(false), &passive(2));
    assert_eq!(h.on_traffic(TrafficOutcome::ServerError, at(t0, 0)), None);
    assert_eq!(
        h.on_traffic(TrafficOutcome::ServerError, at(t0, 1)),
        tr(
            Healthy,
            Ejected,
            Cause::PassiveEjection {
                count: 2,
                last: TrafficOutcome::ServerError,
                cooldown: Duration::from_secs(30),
            }
        )
    );
    assert_eq!(h.poll(at(t0, 30)), None);
    assert_eq!(
        h.poll(at(t0, 31)),
        tr(Ejected, Healthy, Cause::CooldownExpired)
    );
    assert!(h.is_available());
    // The failure count starts over after the cooldown.
    assert_eq!(h.on_traffic(TrafficOutcome::ServerError, at(t0, 32)), None);
}

#[test]
fn events_after_an_unpolled_cooldown_expire_it_first() {
    let t0 = Instant::now();
    // Active on, healthy_threshold 1: the first probe after expiry heals.
    let mut c = check(true);
    c.healthy_threshold = 1;
    let mut h = BackendHealth::new(&c, &passive(1));
    assert!(h.on_traffic(TrafficOutcome::Timeout, at(t0, 0)).is_some());
    assert_eq!(
        h.on_probe(true, at(t0, 40)),
        tr(Ejected, Healthy, Cause::ProbeSuccesses { count: 1 })
    );
    // A probe that does not heal still reports the expiry.
    let mut h = BackendHealth::new(&check(true), &passive(1));
    assert!(h.on_traffic(TrafficOutcome::Timeout, at(t0, 0)).is_some());
    assert_eq!(
        h.on_probe(true, at(t0, 40)),
        tr(Ejected, Recovering, Cause::CooldownExpired)
    );
    // Active off, threshold 1: a failure right after expiry is a renewed ejection.
    let mut h = BackendHealth::new(&check(false), &passive(1));
    assert!(h.on_traffic(TrafficOutcome::Timeout, at(t0, 0)).is_some());
    let renewed = h
        .on_traffic(TrafficOutcome::ServerError, at(t0, 30))
        .unwrap();
    assert_eq!((renewed.from, renewed.to), (Ejected, Ejected));
    assert_eq!(h.next_deadline(), Some(at(t0, 60)));
    // A success right after expiry reports just the expiry.
    assert_eq!(
        h.on_traffic(TrafficOutcome::Success, at(t0, 60)),
        tr(Ejected, Healthy, Cause::CooldownExpired)
    );
}

#[test]
fn traffic_outside_healthy_and_disabled_passive_do_nothing() {
    let t0 = Instant::now();
    let mut h = BackendHealth::new(&check(true), &passive(0));
    for s in 0..100 {
        assert_eq!(
            h.on_traffic(TrafficOutcome::ConnectFailure, at(t0, s)),
            None
        );
    }
    assert_eq!(h.state(), Healthy);
    let mut h = BackendHealth::new(&check(true), &passive(1));
    for s in 0..3 {
        h.on_probe(false, at(t0, s));
    }
    assert_eq!(h.state(), Unhealthy);
    // fail_open traffic to an unhealthy backend neither ejects nor heals it.
    assert_eq!(h.on_traffic(TrafficOutcome::Timeout, at(t0, 4)), None);
    assert_eq!(h.on_traffic(TrafficOutcome::Success, at(t0, 5)), None);
    assert_eq!(h.state(), Unhealthy);
}

#[test]
fn zero_thresholds_count_as_one() {
    let t0 = Instant::now();
    let mut c = check(true);
    c.healthy_threshold = 0;
    c.unhealthy_threshold = 0;
    let mut h = BackendHealth::new(&c, &passive(5));
    assert_eq!(
        h.on_probe(false, t0),
        tr(Healthy, Unhealthy, Cause::ProbeFailures { count: 1 })
    );
    assert_eq!(
        h.on_probe(true, t0),
        tr(Unhealthy, Healthy, Cause::ProbeSuccesses { count: 1 })
    );
}

#[test]
fn display_and_map_values() {
    let t = Transition {
        from: Healthy,
        to: Ejected,
        cause: Cause::PassiveEjection {
            count: 5,
            last: TrafficOutcome::ConnectFailure,
            cooldown: Duration::from_secs(30),
        },
    };
    assert_eq!(
            t.to_string(),
            "healthy -> ejected (5 consecutive failed requests (last: connect failure), ejected for 30s)"
        );
    let t = Transition {
        from: Unhealthy,
        to: Healthy,
        cause: Cause::ProbeSuccesses { count: 2 },
    };
    assert_eq!(
        t.to_string(),
        "unhealthy -> healthy (2 consecutive successful probes)"
    );
    let t = Transition {
        from: Healthy,
        to: Unhealthy,
        cause: Cause::ProbeFailures { count: 3 },
    };
    assert_eq!(
        t.to_string(),
        "healthy -> unhealthy (3 consecutive failed probes)"
    );
    let t = Transition {
        from: Ejected,
        to: Recovering,
        cause: Cause::CooldownExpired,
    };
    assert_eq!(
        t.to_string(),
        "ejected -> recovering (ejection cooldown expired)"
    );
    for s in [Healthy, Unhealthy, Ejected, Recovering] {
        assert_eq!(HealthState::from_u32(s.as_u32()), Some(s));
    }
    assert_eq!(Healthy.as_u32(), 0);
    assert_eq!(HealthState::from_u32(4), None);
}

#[test]
fn latency_ewma() {
    let mut l = LatencyStats::new();
    assert_eq!((l.ewma_us(), l.last_us()), (0, 0));
    l.record(Duration::from_micros(1_000));
    assert_eq!(l.ewma_us(), 1_000);
    l.record(Duration::from_micros(2_000)); // 1000 + 0.2 × 1000
    assert_eq!(l.ewma_us(), 1_200);
    l.record(Duration::from_micros(200)); // 1200 − 0.2 × 1000
    assert_eq!(l.ewma_us(), 1_000);
    assert_eq!(l.last_us(), 200);
    l.record(Duration::MAX); // saturates
    assert_eq!(l.last_us(), u64::MAX);
}

/// Property: over random event sequences the invariants hold.
#[test]
fn random_event_sequences_keep_invariants() {
    let mut seed = 99u64;
    let mut next = move || {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let t0 = Instant::now();
    for active in [true, false] {
        let mut h = BackendHealth::new(&check(active), &passive(3));
        let mut now = t0;
        for _ in 0..20_000 {
            now += Duration::from_millis(next() % 4_000);
            let before = h.state();
            let t = match next() % 3 {
                0 if active => h.on_probe(next() % 2 == 0, now),
                0 | 1 => h.on_traffic(
                    [
                        TrafficOutcome::Success,
                        TrafficOutcome::ConnectFailure,
                        TrafficOutcome::ServerError,
                        TrafficOutcome::Timeout,
                    ][(next() % 4) as usize],
                    now,
                ),
                _ => h.poll(now),
            };
            match t {
                Some(t) => {
                    assert_eq!(t.from, before);
                    assert_eq!(t.to, h.state());
                    assert!(t.from != t.to || t.to == Ejected, "{t}");
                }
                None => assert_eq!(h.state(), before),
            }
            assert_eq!(h.is_available(), h.state() == Healthy);
            assert_eq!(h.next_deadline().is_some(), h.state() == Ejected);
            if !active {
                assert!(matches!(h.state(), Healthy | Ejected));
            }
        }
    }
}

#[test]
fn an_ejection_the_pool_cannot_afford_is_withheld_once_per_streak_and_made_when_it_can() {
    let t0 = Instant::now();
    let mut h = BackendHealth::new(&check(false), &passive(2));
    h.allow_ejection(false);
    assert_eq!(h.on_traffic(TrafficOutcome::Timeout, at(t0, 0)), None);
    assert_eq!(h.on_traffic(TrafficOutcome::Timeout, at(t0, 0)), None);
    assert!(h.take_withheld(), "the due ejection was withheld");
    assert_eq!(h.on_traffic(TrafficOutcome::Timeout, at(t0, 1)), None);
    assert!(!h.take_withheld(), "said once per streak");
    assert!(h.is_available());
    // Room again: the streak goes on and the next failure ejects.
    h.allow_ejection(true);
    let ejected = h.on_traffic(TrafficOutcome::Timeout, at(t0, 2)).unwrap();
    assert_eq!(ejected.to, HealthState::Ejected);
}
