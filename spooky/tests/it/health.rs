//! Routing, load balancing and health checking end to end: real HTTP/2 backends that are
//! killed and restarted under load, pools routed by host and path, consistent hashing across
//! connections and workers.

use crate::support::*;
use spooky_peers::client::Request;
use spooky_peers::demo::DemoOptions;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const CHECK: &str = "health_check:\n  path: /health\n  interval: 200ms\n  timeout: 150ms\n  healthy_threshold: 2\n  unhealthy_threshold: 2";

/// A pool whose backends all have the fast health check above.
fn checked_pool(
    name: &str,
    lb: &str,
    backends: &[(&str, std::net::SocketAddr)],
    extra: &str,
) -> String {
    let mut s = pool(name, "/", None, lb, backends, extra);
    let indented: String = CHECK.lines().map(|l| format!("        {l}\n")).collect();
    for (id, addr) in backends {
        let line = format!("      - id: {id}\n        address: \"{addr}\"\n");
        s = s.replace(&line, &format!("{line}{indented}"));
    }
    s
}

fn backend_of(c: &mut spooky_peers::client::Client, path: &str, authority: &str) -> (u16, String) {
    let r = c.request(&Request::get(authority, path), T).unwrap();
    (r.status, r.header("x-backend").unwrap_or("").to_string())
}

#[test]
fn a_killed_backend_is_taken_out_and_comes_back_after_restart() {
    let b1 = backend("b1");
    let b2 = backend("b2");
    let b3 = backend("b3");
    let addrs = [("b1", b1.addr), ("b2", b2.addr), ("b3", b3.addr)];
    // Passive ejection (5 refused connects) usually beats the prober; its cooldown is short
    // here so that recovery is decided by the prober's healthy threshold within the test.
    let extra = "passive_health:\n  consecutive_failures: 5\n  cooldown: 1s";
    let p = proxy(
        &checked_pool("main", "round-robin", &addrs, extra),
        "quic:\n  retry: off\n",
        2,
    );
    let mut c = client(p.addr);
    // All three serve.
    let mut seen = HashMap::new();
    for _ in 0..30 {
        let (status, b) = backend_of(&mut c, "/x", "localhost");
        assert_eq!(status, 200);
        *seen.entry(b).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // Kill b2 mid-load: keep requests going while the checker notices.
    let (id, addr) = b2.kill();
    let deadline = Instant::now() + T;
    while backend_state(&p, "b2") == Some(0) {
        assert!(Instant::now() < deadline, "b2's death was never noticed");
        let _ = backend_of(&mut c, "/x", "localhost");
    }
    // Detected: the next 500 requests all succeed and none goes to b2.
    for i in 0..500 {
        let (status, b) = backend_of(&mut c, "/x", "localhost");
        assert_eq!(status, 200, "request {i} after the kill failed");
        assert_ne!(b, "b2");
    }

    // Restarted on the same address: back in rotation after the healthy threshold.
    let b2 = backend_at(
        addr,
        DemoOptions {
            id,
            goaway_every: None,
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, b) = backend_of(&mut c, "/x", "localhost");
        assert_eq!(status, 200);
        if b == "b2" {
            break;
        }
        assert!(Instant::now() < deadline, "b2 never came back");
    }
    assert!(b2.served() > 0);
    assert!(b1.served() > 0 && b3.served() > 0);
}

#[test]
fn no_healthy_backend_is_503_with_retry_after_and_fail_open_tries_anyway() {
    let dead = dead_tcp_addr();
    let upstreams = checked_pool("closed", "round-robin", &[("gone", dead)], "")
        .replace("path_prefix: \"/\"", "path_prefix: \"/closed\"")
        + &checked_pool(
            "open",
            "round-robin",
            &[("gone-too", dead_tcp_addr())],
            "fail_open: true",
        )
        .replace("path_prefix: \"/\"", "path_prefix: \"/open\"");
    let p = proxy(&upstreams, "", 1);
    let mut c = client(p.addr);
    // Wait for the checker to mark both unhealthy.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.request(&Request::get("localhost", "/closed"), T).unwrap();
        if r.status == 503 {
            assert_eq!(r.header("retry-after"), Some("1"));
            break;
        }
        assert_eq!(
            r.status, 502,
            "before detection the refused connect is a 502"
        );
        assert!(Instant::now() < deadline, "never became 503");
        std::thread::sleep(Duration::from_millis(50));
    }
    // fail_open: the unhealthy backend is tried anyway, so the answer is the connect error
    // (a 502 means something only once the backend is known to be down).
    wait_until("gone-too marked down", T, || {
        backend_state(&p, "gone-too").is_some_and(|s| s != 0)
    });
    let r = c.request(&Request::get("localhost", "/open"), T).unwrap();
    assert_eq!(r.status, 502);
}

#[test]
fn host_and_path_routing_across_pools() {
    let api = backend("api");
    let wild = backend("wild");
    let stat = backend("static");
    let dflt = backend("default");
    let upstreams = pool(
        "api",
        "/api",
        Some("api.example.com"),
        "round-robin",
        &[("api", api.addr)],
        "",
    ) + &pool(
        "wild",
        "/",
        Some("*.example.com"),
        "round-robin",
        &[("wild", wild.addr)],
        "",
    ) + &pool(
        "static",
        "/static",
        None,
        "round-robin",
        &[("static", stat.addr)],
        "",
    ) + &pool(
        "default",
        "/",
        None,
        "round-robin",
        &[("default", dflt.addr)],
        "",
    );
    let p = proxy(&upstreams, "", 2);
    let mut c = client(p.addr);
    let cases = [
        ("api.example.com", "/api/users", "api"),
        ("API.Example.com:9889", "/api", "api"),
        ("api.example.com", "/apix", "wild"),
        ("api.example.com", "/other", "wild"),
        ("a.b.example.com", "/api/x", "wild"),
        ("example.com", "/static/app.js", "static"),
        ("example.com", "/staticfoo", "default"),
        ("elsewhere.org", "/", "default"),
        ("elsewhere.org", "/static?x=1", "static"),
    ];
    for (authority, path, want) in cases {
        let (status, got) = backend_of(&mut c, path, authority);
        assert_eq!(status, 200, "{authority}{path}");
        assert_eq!(got, want, "{authority}{path}");
    }
}

#[test]
fn consistent_hash_keeps_a_key_on_one_backend_across_connections_and_workers() {
    let b: Vec<_> = (0..4).map(|i| backend(&format!("h{i}"))).collect();
    let addrs: Vec<(&str, std::net::SocketAddr)> =
        b.iter().map(|x| (x.id.as_str(), x.addr)).collect();
    let upstreams = pool("main", "/", None, "consistent-hash", &addrs, "").replace(
        "      type: consistent-hash\n",
        "      type: consistent-hash\n      key: \"header:x-user\"\n",
    );
    let p = proxy(&upstreams, "quic:\n  retry: off\n", 2);
    let mut owner: HashMap<String, String> = HashMap::new();
    // 16 connections (their Initial DCIDs spread them over both workers), 8 users each.
    for _ in 0..16 {
        let mut c = client(p.addr);
        for u in 0..8 {
            let user = format!("user-{u}");
            let r = c
                .request(&Request::get("localhost", "/").header("x-user", &user), T)
                .unwrap();
            assert_eq!(r.status, 200);
            let got = r.header("x-backend").unwrap().to_string();
            let first = owner.entry(user.clone()).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "{user} moved");
        }
        c.close();
    }
    let spread: std::collections::HashSet<_> = owner.values().collect();
    assert!(spread.len() >= 2, "8 users all on one backend: {owner:?}");
    let workers_used = p
        .running
        .as_ref()
        .unwrap()
        .worker_stats()
        .iter()
        .filter(|s| {
            s.connections_accepted
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        })
        .count();
    assert_eq!(workers_used, 2, "all connections landed on one worker");
}
