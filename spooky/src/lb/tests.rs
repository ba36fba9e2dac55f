use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const WEIGHTS: [u32; 4] = [1, 2, 3, 4];
const ALL: [bool; 4] = [true; 4];
const IDLE: [u32; 4] = [0; 4];

fn ch(replicas: u32) -> config::LoadBalancing {
    config::LoadBalancing::ConsistentHash {
        replicas,
        key: config::HashKey::ClientIp,
    }
}

fn all_strategies() -> Vec<(&'static str, config::LoadBalancing)> {
    vec![
        ("random", config::LoadBalancing::Random),
        ("round_robin", config::LoadBalancing::RoundRobin),
        ("consistent_hash", ch(100)),
        ("least_request", config::LoadBalancing::LeastRequest),
    ]
}

fn counts(b: &mut Balancer, c: &Candidates<'_>, picks: u64) -> Vec<u64> {
    let mut keys = SplitMix64(0xfeed);
    let mut out = vec![0u64; b.len()];
    for _ in 0..picks {
        out[b.pick(c, keys.next_u64()).unwrap()] += 1;
    }
    out
}

/// Largest |observed share − expected share| / expected share, over backends.
fn max_rel_dev(counts: &[u64], weights: &[u32]) -> f64 {
    let total: u64 = counts.iter().sum();
    let wsum: u32 = weights.iter().sum();
    counts
        .iter()
        .zip(weights)
        .map(|(&c, &w)| {
            let expected = f64::from(w) / f64::from(wsum);
            ((c as f64 / total as f64) - expected).abs() / expected
        })
        .fold(0.0, f64::max)
}

#[test]
fn distribution_follows_weights() {
    let c = Candidates {
        healthy: &ALL,
        in_flight: &IDLE,
    };
    for (name, lb) in all_strategies() {
        let mut b = Balancer::new(&lb, &WEIGHTS, 42);
        let got = counts(&mut b, &c, 10_000);
        let dev = max_rel_dev(&got, &WEIGHTS);
        println!(
            "{name}: {got:?}, max relative deviation {:.2} %",
            dev * 100.0
        );
        // Consistent hash: the ring is fixed by the ids; the keys are random.
        assert!(dev <= 0.05, "{name}: {got:?}");
    }
}

#[test]
fn random_distribution_holds_across_seeds() {
    let c = Candidates {
        healthy: &ALL,
        in_flight: &IDLE,
    };
    for lb in [
        config::LoadBalancing::Random,
        config::LoadBalancing::LeastRequest,
    ] {
        let mut worst: f64 = 0.0;
        for seed in 0..20 {
            let mut b = Balancer::new(&lb, &WEIGHTS, seed);
            worst = worst.max(max_rel_dev(&counts(&mut b, &c, 10_000), &WEIGHTS));
        }
        println!(
            "{lb:?}: worst relative deviation over 20 seeds {:.2} %",
            worst * 100.0
        );
        // 10 % ≈ 3.3σ of a binomial share of 0.1 over 10,000 draws.
        assert!(worst <= 0.10, "{lb:?}");
    }
}

#[test]
fn round_robin_is_smooth_and_exact() {
    let c = Candidates {
        healthy: &[true; 3],
        in_flight: &[0; 3],
    };
    let mut b = Balancer::new(&config::LoadBalancing::RoundRobin, &[5, 1, 1], 0);
    let seq: Vec<usize> = (0..7).map(|_| b.pick(&c, 0).unwrap()).collect();
    // nginx's example sequence for weights {5, 1, 1}: a a b a c a a.
    assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    let mut b = Balancer::new(&config::LoadBalancing::RoundRobin, &WEIGHTS, 0);
    let c = Candidates {
        healthy: &ALL,
        in_flight: &IDLE,
    };
    assert_eq!(counts(&mut b, &c, 10_000), [1000, 2000, 3000, 4000]);
}

#[test]
fn unhealthy_and_zero_weight_backends_are_never_picked() {
    for (name, lb) in all_strategies() {
        for mask in 0u32..16 {
            let healthy: Vec<bool> = (0..4).map(|i| mask & (1 << i) != 0).collect();
            let c = Candidates {
                healthy: &healthy,
                in_flight: &[3, 0, 7, 1],
            };
            let mut b = Balancer::new(&lb, &[1, 0, 3, 4], mask.into());
            let mut keys = SplitMix64(u64::from(mask));
            for _ in 0..500 {
                match b.pick(&c, keys.next_u64()) {
                    Some(i) => assert!(healthy[i] && i != 1, "{name} {mask:04b} -> {i}"),
                    None => assert!(
                        !healthy[0] && !healthy[2] && !healthy[3],
                        "{name} {mask:04b}: None with a healthy backend"
                    ),
                }
            }
        }
    }
}

#[test]
fn short_candidate_slices_and_empty_pools() {
    for (_, lb) in all_strategies() {
        let mut b = Balancer::new(&lb, &[1, 1, 1], 1);
        let c = Candidates {
            healthy: &[false, true],
            in_flight: &[],
        };
        for k in 0..100 {
            assert_eq!(b.pick(&c, k * 0x0123_4567_89ab_cdef), Some(1));
        }
        let mut empty = Balancer::new(&lb, &[], 1);
        assert!(empty.is_empty());
        assert_eq!(
            empty.pick(
                &Candidates {
                    healthy: &[],
                    in_flight: &[]
                },
                7
            ),
            None
        );
    }
}

#[test]
fn least_request_prefers_less_loaded_per_weight() {
    let c = Candidates {
        healthy: &ALL,
        in_flight: &[0, 0, 0, 100],
    };
    let mut b = Balancer::new(&config::LoadBalancing::LeastRequest, &WEIGHTS, 9);
    let got = counts(&mut b, &c, 10_000);
    // The most loaded backend loses every pairwise comparison.
    assert_eq!(got[3], 0, "{got:?}");
    // Per weight, 4 in flight on weight 4 equals 1 on weight 1: neither is preferred, but
    // 2 in flight on weight 1 is worse than 4 on weight 4.
    let c = Candidates {
        healthy: &[true, false, false, true],
        in_flight: &[2, 0, 0, 4],
    };
    let got = counts(&mut b, &c, 1_000);
    assert_eq!(got, [0, 0, 0, 1_000]);
    // Closed loop: each pick adds load, the heaviest backend finishes a request per step.
    let mut in_flight = [0u32; 4];
    let mut picked = [0u32; 4];
    for step in 0..4_000u32 {
        let c = Candidates {
            healthy: &ALL,
            in_flight: &in_flight,
        };
        let i = b.pick(&c, 0).unwrap();
        in_flight[i] += 1;
        picked[i] += 1;
        if step % 2 == 1 {
            let j = (0..4)
                .max_by_key(|&j| in_flight[j] * 12 / WEIGHTS[j])
                .unwrap();
            in_flight[j] = in_flight[j].saturating_sub(1);
        }
    }
    println!("least_request closed loop in flight {in_flight:?}, picked {picked:?}");
    let per_weight: Vec<u32> = (0..4).map(|j| in_flight[j] / WEIGHTS[j]).collect();
    let spread = per_weight.iter().max().unwrap() - per_weight.iter().min().unwrap();
    assert!(spread <= 3, "{in_flight:?}");
}

fn ring_owner(b: &mut Balancer, healthy: &[bool], key: u64) -> usize {
    let in_flight = vec![0; healthy.len()];
    b.pick(
        &Candidates {
            healthy,
            in_flight: &in_flight,
        },
        key,
    )
    .unwrap()
}

#[test]
fn consistent_hash_is_the_same_on_every_worker() {
    let ids = ["a", "b", "c", "d"];
    let mut w1 = Balancer::with_ids(&ch(50), &WEIGHTS, &ids, 1);
    let mut w2 = Balancer::with_ids(&ch(50), &WEIGHTS, &ids, 0xdead_beef);
    let mut keys = SplitMix64(3);
    for _ in 0..10_000 {
        let k = keys.next_u64();
        assert_eq!(ring_owner(&mut w1, &ALL, k), ring_owner(&mut w2, &ALL, k));
    }
}

#[test]
fn consistent_hash_removal_moves_only_the_removed_backends_keys() {
    let ids = ["alpha", "beta", "gamma", "delta", "epsilon"];
    let weights = [1, 1, 2, 1, 1];
    let mut full = Balancer::with_ids(&ch(100), &weights, &ids, 0);
    let keys: Vec<u64> = {
        let mut g = SplitMix64(11);
        (0..10_000).map(|_| g.next_u64()).collect()
    };
    let before: Vec<&str> = keys
        .iter()
        .map(|&k| ids[ring_owner(&mut full, &[true; 5], k)])
        .collect();
    for gone in 0..ids.len() {
        // Marked unhealthy: walk-on.
        let mut healthy = [true; 5];
        healthy[gone] = false;
        // Removed from the configuration: a new ring without it.
        let rest_ids: Vec<&str> = ids
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != gone)
            .map(|(_, id)| *id)
            .collect();
        let rest_w: Vec<u32> = weights
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != gone)
            .map(|(_, w)| *w)
            .collect();
        let mut rest = Balancer::with_ids(&ch(100), &rest_w, &rest_ids, 7);
        let mut moved = 0;
        for (k, &owner) in keys.iter().zip(&before) {
            let walked = ids[ring_owner(&mut full, &healthy, *k)];
            let rebuilt = rest_ids[ring_owner(&mut rest, &[true; 4], *k)];
            assert_eq!(walked, rebuilt, "unhealthy walk-on and removal agree");
            if rebuilt != owner {
                assert_eq!(owner, ids[gone], "a key not on the removed backend moved");
                moved += 1;
            }
        }
        let on_gone = before.iter().filter(|&&o| o == ids[gone]).count();
        assert_eq!(moved, on_gone);
        println!(
            "removed {}: moved {moved} of 10000 keys (all of its own)",
            ids[gone]
        );
    }
}

#[test]
fn consistent_hash_addition_moves_about_one_over_n_plus_one() {
    let mut ids = vec!["n0", "n1", "n2", "n3", "n4"];
    let mut keys = SplitMix64(5);
    let keys: Vec<u64> = (0..10_000).map(|_| keys.next_u64()).collect();
    for added in ["n5", "n6", "n7"] {
        let n = ids.len();
        let mut old = Balancer::with_ids(&ch(100), &vec![1; n], &ids, 0);
        let before: Vec<&str> = keys
            .iter()
            .map(|&k| ids[ring_owner(&mut old, &vec![true; n], k)])
            .collect();
        ids.push(added);
        let mut new = Balancer::with_ids(&ch(100), &vec![1; n + 1], &ids, 0);
        let mut moved = 0usize;
        for (&k, &owner) in keys.iter().zip(&before) {
            let now = ids[ring_owner(&mut new, &vec![true; n + 1], k)];
            if now != owner {
                assert_eq!(now, added, "keys only move to the new backend");
                moved += 1;
            }
        }
        let fraction = moved as f64 / keys.len() as f64;
        let ideal = 1.0 / (n + 1) as f64;
        println!(
            "added {added} to {n}: moved {:.2} % (ideal {:.2} %)",
            fraction * 100.0,
            ideal * 100.0
        );
        assert!(fraction <= ideal + 0.03, "moved {fraction}");
    }
}

#[test]
fn ring_points_scale_with_weight_and_are_capped() {
    let owners = |b: &Balancer| match &b.strategy {
        Strategy::ConsistentHash { points, owners } => {
            assert!(points.windows(2).all(|w| w[0] <= w[1]));
            owners.clone()
        }
        _ => unreachable!(),
    };
    let per = |o: &[u32], i: u32| o.iter().filter(|&&b| b == i).count();
    let o = owners(&Balancer::new(&ch(10), &[1, 3, 0], 0));
    assert_eq!((o.len(), per(&o, 0), per(&o, 1)), (40, 10, 30));
    // Over the cap: scaled in proportion, never below one point.
    let o = owners(&Balancer::new(&ch(10_000), &[10_000, 5_000, 1], 0));
    println!("capped ring: {} {} {}", per(&o, 0), per(&o, 1), per(&o, 2));
    assert!(o.len() as u64 <= MAX_RING_POINTS);
    assert_eq!(per(&o, 0), 43_687);
    assert_eq!(per(&o, 1), 21_843);
    assert_eq!(per(&o, 2), 4);
    let o = owners(&Balancer::new(
        &ch(1),
        &[10_000, 10_000, 10_000, 10_000, 10_000, 10_000, 10_000, 1],
        0,
    ));
    assert_eq!((per(&o, 0), per(&o, 7)), (9_362, 1));
    let o = owners(&Balancer::new(&ch(u32::MAX), &[u32::MAX], 0));
    assert_eq!(o.len() as u64, MAX_RING_POINTS);
}

#[test]
fn request_hash_keys() {
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    let other_ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8));
    let none = |_: &str| None::<&[u8]>;
    let by_ip = request_hash(&config::HashKey::ClientIp, ip, "/", none);
    assert_eq!(
        by_ip,
        request_hash(&config::HashKey::ClientIp, ip, "/other", none)
    );
    assert_ne!(
        by_ip,
        request_hash(&config::HashKey::ClientIp, other_ip, "/", none)
    );
    // IPv4-mapped IPv6 is the same client.
    let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
    assert_eq!(
        by_ip,
        request_hash(&config::HashKey::ClientIp, mapped, "/", none)
    );
    assert_ne!(
        by_ip,
        request_hash(
            &config::HashKey::ClientIp,
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            "/",
            none
        )
    );

    // Path: query included; the client does not matter.
    let path = config::HashKey::Path;
    assert_eq!(
        request_hash(&path, ip, "/a?x", none),
        request_hash(&path, other_ip, "/a?x", none)
    );
    assert_ne!(
        request_hash(&path, ip, "/a?x", none),
        request_hash(&path, ip, "/a?y", none)
    );

    // Header: present → its value; repeated → as if joined; missing → client IP.
    let user = config::HashKey::Header("x-user".into());
    let h = |v: &'static [u8]| move |n: &str| (n == "x-user").then_some(v);
    assert_eq!(
        request_hash(&user, ip, "/", h(b"42")),
        request_hash(&user, other_ip, "/", h(b"42"))
    );
    assert_ne!(
        request_hash(&user, ip, "/", h(b"42")),
        request_hash(&user, ip, "/", h(b"43"))
    );
    assert_eq!(request_hash(&user, ip, "/", none), by_ip);
    let split = |n: &str| {
        if n == "x-user" {
            vec![&b"a"[..], b"b"]
        } else {
            vec![]
        }
    };
    assert_eq!(
        request_hash(&user, ip, "/", split),
        request_hash(&user, other_ip, "/", h(b"a, b"))
    );

    // Cookie: parsed from (possibly several) cookie fields; missing → client IP.
    let sess = config::HashKey::Cookie("session".into());
    let jar = |v: &'static [u8]| move |n: &str| (n == "cookie").then_some(v);
    let s1 = request_hash(&sess, ip, "/", jar(b"theme=dark; session=abc; x=1"));
    assert_eq!(s1, request_hash(&sess, other_ip, "/", jar(b"session=abc")));
    assert_eq!(
        s1,
        request_hash(&sess, other_ip, "/", jar(b" session = abc ;"))
    );
    assert_ne!(s1, request_hash(&sess, ip, "/", jar(b"session=abd")));
    let fields = |n: &str| {
        if n == "cookie" {
            vec![&b"a=1"[..], b"session=abc"]
        } else {
            vec![]
        }
    };
    assert_eq!(s1, request_hash(&sess, other_ip, "/", fields));
    assert_eq!(
        request_hash(&sess, ip, "/", jar(b"mysession=abc; sessionx=1")),
        by_ip
    );
    assert_eq!(request_hash(&sess, ip, "/", jar(b"session")), by_ip);
    assert_eq!(request_hash(&sess, ip, "/", none), by_ip);
}

#[test]
fn request_hash_accepts_lazy_iterators_borrowing_the_name() {
    // How a worker passes its header list: filtered by the requested name, lazily, in a
    // closure written at the call (so `name` gets the key's lifetime).
    let fields: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"cookie".to_vec(), b"a=1".to_vec()),
        (b"x-user".to_vec(), b"7".to_vec()),
        (b"cookie".to_vec(), b"session=abc".to_vec()),
    ];
    let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    let single = |v: &'static [u8], field: &'static str| move |n: &str| (n == field).then_some(v);
    let sess = config::HashKey::Cookie("session".into());
    let lazy = request_hash(&sess, ip, "/", |name| {
        fields
            .iter()
            .filter(move |(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    });
    assert_eq!(
        lazy,
        request_hash(&sess, ip, "/", single(b"session=abc", "cookie"))
    );
    let user = config::HashKey::Header("x-user".into());
    let lazy = request_hash(&user, ip, "/", |name| {
        fields
            .iter()
            .filter(move |(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    });
    assert_eq!(lazy, request_hash(&user, ip, "/", single(b"7", "x-user")));
}

#[test]
fn stable_hash_is_stable() {
    // Fixed values: a change here re-maps every consistent-hash key in production.
    assert_eq!(StableHasher::new().0, FNV_OFFSET);
    let mut h = StableHasher::new();
    h.write(b"a");
    assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c); // FNV-1a 64 of "a"
    assert_eq!(stable_hash(b"a"), mix64(0xaf63_dc4c_8601_ec8c));
    assert_eq!(mix64(0), 0);
}
