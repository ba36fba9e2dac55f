//! Micro-benchmarks of the sans-IO cores on the request path: route lookup (10 and 1,000
//! routes, to show the cost does not grow with the table), a backend pick per load-balancing
//! strategy, HTTP/3 request validation + HTTP/2 conversion, and the connection-ID codec.
//! Run with `cargo bench -p spooky --bench cores`; docs/benchmarks.md quotes the numbers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use quiche::h3::Header;
use spooky::config::{ForwardedMode, HashKey, LoadBalancing, Route};
use spooky::http::bridge::{to_h2_request, validate_request, Hop};
use spooky::lb::{Balancer, Candidates};
use spooky::routing::RouteTable;
use spooky_common::CidLayout;
use std::hint::black_box;

/// `n` routes: a tenth any-host prefixes, the rest spread over exact hosts and wildcards.
fn routes(n: usize) -> Vec<Route> {
    (0..n)
        .map(|i| match i % 10 {
            0 => Route {
                host: None,
                path_prefix: format!("/svc{i}/"),
                rewrite_prefix: None,
            },
            1..=3 => Route {
                host: Some(format!("*.tenant{i}.example.com")),
                path_prefix: "/".into(),
                rewrite_prefix: None,
            },
            _ => Route {
                host: Some(format!("host{}.example.com", i / 2)),
                path_prefix: format!("/api/v{}", i % 7),
                rewrite_prefix: None,
            },
        })
        .collect()
}

fn route_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_lookup");
    for n in [10usize, 1000] {
        let list = routes(n);
        let pairs: Vec<(usize, &Route)> = list.iter().enumerate().collect();
        let table = RouteTable::new(&pairs).expect("routes");
        // One host of each tier that exists in both tables.
        let exact_host = "host2.example.com";
        let wildcard_host = "app.tenant1.example.com";
        g.bench_with_input(BenchmarkId::new("exact_host", n), &table, |b, t| {
            b.iter(|| t.lookup(black_box(Some(exact_host)), black_box("/api/v4/users/42")))
        });
        g.bench_with_input(BenchmarkId::new("wildcard_host", n), &table, |b, t| {
            b.iter(|| t.lookup(black_box(Some(wildcard_host)), black_box("/index.html")))
        });
        g.bench_with_input(BenchmarkId::new("any_host_prefix", n), &table, |b, t| {
            b.iter(|| {
                t.lookup(
                    black_box(Some("unknown.example.org")),
                    black_box("/svc0/x?y=1"),
                )
            })
        });
    }
    g.finish();
}

fn lb_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("lb_pick");
    let weights = [1u32, 2, 1, 3, 1, 1, 2, 1];
    let healthy = [true, true, false, true, true, true, true, true];
    let in_flight = [3u32, 1, 0, 7, 2, 2, 5, 0];
    let cands = Candidates {
        healthy: &healthy,
        in_flight: &in_flight,
    };
    let strategies = [
        ("random", LoadBalancing::Random),
        ("round_robin", LoadBalancing::RoundRobin),
        ("least_request", LoadBalancing::LeastRequest),
        (
            "consistent_hash",
            LoadBalancing::ConsistentHash {
                replicas: 160,
                key: HashKey::ClientIp,
            },
        ),
    ];
    for (name, lb) in strategies {
        let mut bal = Balancer::new(&lb, &weights, 7);
        let mut h = 0u64;
        g.bench_function(BenchmarkId::new(name, weights.len()), |b| {
            b.iter(|| {
                h = h.wrapping_add(0x9E37_79B9_7F4A_7C15);
                bal.pick(black_box(&cands), black_box(h))
            })
        });
    }
    g.finish();
}

fn header_conversion(c: &mut Criterion) {
    let list = vec![
        Header::new(b":method", b"GET"),
        Header::new(b":scheme", b"https"),
        Header::new(b":authority", b"www.example.com"),
        Header::new(b":path", b"/static/app.js?v=3"),
        Header::new(
            b"user-agent",
            b"Mozilla/5.0 (X11; Linux x86_64) Firefox/140.0",
        ),
        Header::new(b"accept", b"*/*"),
        Header::new(b"accept-encoding", b"gzip, deflate, br, zstd"),
        Header::new(b"accept-language", b"en-US,en;q=0.5"),
        Header::new(b"cookie", b"session=abc123; theme=dark"),
        Header::new(b"referer", b"https://www.example.com/"),
    ];
    let hop = Hop {
        client_ip: "192.0.2.7".parse().expect("ip"),
        mode: ForwardedMode::Append,
        via: Some("3"),
    };
    let mut g = c.benchmark_group("bridge");
    g.bench_function("validate_request", |b| {
        b.iter(|| validate_request(black_box(&list)).expect("valid"))
    });
    let head = validate_request(&list).expect("valid");
    g.bench_function("to_h2_request", |b| {
        b.iter(|| to_h2_request(black_box(&head), black_box(&hop)).expect("converts"))
    });
    g.bench_function("validate_and_convert", |b| {
        b.iter(|| {
            let head = validate_request(black_box(&list)).expect("valid");
            to_h2_request(&head, &hop).expect("converts")
        })
    });
    g.finish();
}

fn cid_codec(c: &mut Criterion) {
    let layout = CidLayout::new(16, 2, 0).expect("layout");
    let nonce = [0xA5u8; 16];
    let mut g = c.benchmark_group("cid");
    g.bench_function("encode", |b| {
        let mut out = [0u8; 20];
        b.iter(|| {
            layout.write(
                black_box(&[0x00, 0x01]),
                black_box(3),
                black_box(&nonce),
                &mut out,
            )
        })
    });
    let mut cid = [0u8; 16];
    layout.write(&[0x00, 0x01], 3, &nonce, &mut cid);
    g.bench_function("decode_worker", |b| {
        b.iter(|| layout.worker_of(black_box(&cid)))
    });
    g.bench_function("place", |b| {
        b.iter(|| {
            spooky_common::cid::place(&layout, black_box(&cid), false, 0, 0, |_| black_box(2))
        })
    });
    g.finish();
}

criterion_group!(benches, route_lookup, lb_pick, header_conversion, cid_codec);
criterion_main!(benches);
