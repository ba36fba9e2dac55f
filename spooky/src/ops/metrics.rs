//! The Prometheus text exposition (format 0.0.4) of everything Spooky counts: request series
//! (`stats::Metrics`), worker counters (`stats::WorkerStats`), backend health (the slots of the
//! snapshot in force), reloads, the access log, and the XDP program's per-CPU counters.
//! Counting itself lives in `stats`; this module only reads and formats, at scrape time.

use super::Ops;
use crate::stats::{HistogramTotals, Protocol, Refusal, WorkerStats, BUCKETS_S};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &HistogramTotals) {
    let mut cumulative = 0;
    for (i, bound) in BUCKETS_S.iter().enumerate() {
        cumulative += h.buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    cumulative += h.buckets.get(BUCKETS_S.len()).copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
}

/// A per-worker metric: name, type, help, how to read it.
type WorkerMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&WorkerStats) -> u64,
);

/// Renders every metric in the Prometheus text format (version 0.0.4).
pub fn render(ops: &Ops) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let snapshot = ops.reloader.current();
    let all = ops.metrics.all();
    let series: Vec<_> = all
        .iter()
        .map(|s| {
            let labels = format!("pool=\"{}\",backend=\"{}\"", esc(&s.pool), esc(&s.backend));
            (labels, !s.backend.is_empty(), s.totals())
        })
        .collect();

    head(
        &mut out,
        "spooky_requests_total",
        "counter",
        "Requests answered, by pool, backend (empty: answered by Spooky), client protocol \
         (h3, h2, http/1.1) and status class.",
    );
    for (labels, _, t) in &series {
        for (protocol, counts) in Protocol::ALL.iter().zip(t.requests) {
            let protocol = protocol.label();
            for (class, n) in CLASSES.iter().zip(counts) {
                let _ = writeln!(
                    out,
                    "spooky_requests_total{{{labels},protocol=\"{protocol}\",class=\"{class}\"}} {n}"
                );
            }
        }
    }
    head(
        &mut out,
        "spooky_responses_total",
        "counter",
        "Responses by pool, backend (empty: answered by Spooky) and status code (499: the \
         client went away first).",
    );
    for (labels, _, t) in &series {
        for (code, n) in &t.codes {
            let _ = writeln!(
                out,
                "spooky_responses_total{{{labels},code=\"{code}\"}} {n}"
            );
        }
    }
    head(
        &mut out,
        "spooky_route_refusals_total",
        "counter",
        "Requests refused by a route's own policy, by pool and reason: access (403), rate_limit \
         (429), max_request_headers (431), max_request_body (413), max_requests_per_backend \
         (503), request_timeout (504).",
    );
    let mut pools: Vec<(&str, [u64; 6])> = Vec::new();
    for ((_, _, t), s) in series.iter().zip(&all) {
        if s.pool.is_empty() {
            continue;
        }
        let i = match pools.iter().position(|(p, _)| *p == s.pool) {
            Some(i) => i,
            None => {
                pools.push((&s.pool, [0; 6]));
                pools.len() - 1
            }
        };
        if let Some((_, sums)) = pools.get_mut(i) {
            for (sum, n) in sums.iter_mut().zip(t.refusals) {
                *sum += n;
            }
        }
    }
    for (pool, sums) in &pools {
        for (reason, n) in Refusal::ALL.iter().zip(sums) {
            let _ = writeln!(
                out,
                "spooky_route_refusals_total{{pool=\"{}\",reason=\"{}\"}} {n}",
                esc(pool),
                reason.label()
            );
        }
    }
    head(
        &mut out,
        "spooky_request_duration_seconds",
        "histogram",
        "From request head received to response handed to QUIC.",
    );
    for (labels, _, t) in &series {
        histogram(
            &mut out,
            "spooky_request_duration_seconds",
            labels,
            &t.duration,
        );
    }
    head(
        &mut out,
        "spooky_upstream_response_seconds",
        "histogram",
        "From request sent to the backend to its response head.",
    );
    for (labels, _, t) in series.iter().filter(|s| s.1) {
        histogram(
            &mut out,
            "spooky_upstream_response_seconds",
            labels,
            &t.upstream,
        );
    }
    head(
        &mut out,
        "spooky_request_body_bytes_total",
        "counter",
        "Request body bytes received from clients.",
    );
    for (labels, _, t) in &series {
        let _ = writeln!(
            out,
            "spooky_request_body_bytes_total{{{labels}}} {}",
            t.bytes_in
        );
    }
    head(
        &mut out,
        "spooky_response_body_bytes_total",
        "counter",
        "Response body bytes received from backends for clients.",
    );
    for (labels, _, t) in &series {
        let _ = writeln!(
            out,
            "spooky_response_body_bytes_total{{{labels}}} {}",
            t.bytes_out
        );
    }

    let worker_metrics: &[WorkerMetric] = &[
        ("spooky_quic_connections_active", "gauge", "Open QUIC connections.", |w| w.connections_active.load(Ordering::Relaxed)),
        ("spooky_http3_streams_active", "gauge", "Open HTTP/3 request streams.", |w| w.streams_active.load(Ordering::Relaxed)),
        ("spooky_quic_connections_accepted_total", "counter", "QUIC connections accepted (handshakes started).", |w| w.connections_accepted.load(Ordering::Relaxed)),
        ("spooky_quic_connections_refused_total", "counter", "New connections refused by quic.max_connections or quic.max_connections_per_ip.", |w| w.refused.load(Ordering::Relaxed)),
        ("spooky_quic_retry_sent_total", "counter", "Retry packets sent (address validation).", |w| w.retry_sent.load(Ordering::Relaxed)),
        ("spooky_quic_invalid_tokens_total", "counter", "Initials dropped because their token is not a valid Retry token of ours for their DCID (forged, expired, minted for another address, or sent to another connection ID than the Retry chose).", |w| w.invalid_tokens.load(Ordering::Relaxed)),
        ("spooky_misrouted_packets_total", "counter", "Packets that reached a worker other than their connection's owner (0 when kernel steering works).", |w| w.misrouted.load(Ordering::Relaxed)),
        ("spooky_udp_datagrams_received_total", "counter", "UDP datagrams received.", |w| w.packets_in.load(Ordering::Relaxed)),
        ("spooky_udp_datagrams_sent_total", "counter", "UDP datagrams sent.", |w| w.packets_out.load(Ordering::Relaxed)),
        ("spooky_packets_dropped_total", "counter", "Datagrams dropped in user space (unparseable, unknown connection, short Initial, bad token).", |w| w.dropped.load(Ordering::Relaxed)),
        ("spooky_http3_requests_total", "counter", "HTTP/3 request heads received.", |w| w.requests.load(Ordering::Relaxed)),
        ("spooky_quic_lookalike_initials_total", "counter", "Client Initials without a token, for no connection here, whose DCID looks like one of ours: a later Initial of a connection nobody has (its process restarted), or a DCID chosen to look like ours (placed by hash all the same: an Initial's worker byte is never trusted).", |w| w.lookalike_initials.load(Ordering::Relaxed)),
        ("spooky_http3_send_timeouts_total", "counter", "Response streams reset (with their backend streams) because the client took no byte for quic.send_timeout.", |w| w.send_timeouts.load(Ordering::Relaxed)),
        ("spooky_quic_version_negotiations_sent_total", "counter", "Version Negotiation packets sent (only for datagrams of at least 1200 bytes, at most 1000 per second per worker).", |w| w.negotiations_sent.load(Ordering::Relaxed)),
        ("spooky_quic_stateless_resets_sent_total", "counter", "Stateless Resets sent for packets of connections this process does not have (a crashed or replaced predecessor's).", |w| w.resets_sent.load(Ordering::Relaxed)),
        ("spooky_quic_foreign_packets_total", "counter", "Packets of another live Spooky generation that reached this process during a takeover (dropped unanswered; 0 while steering works).", |w| w.foreign.load(Ordering::Relaxed)),
        ("spooky_http3_stalled_streams_shed_total", "counter", "Stalled response streams reset with H3_EXCESSIVE_LOAD (with their backend streams) because their connection or client address held quic.max_stalled_streams(_per_ip) already.", |w| w.stalled_shed.load(Ordering::Relaxed)),
        ("spooky_http3_streams_refused_per_ip_total", "counter", "HTTP/3 requests answered 429 because their client address (IPv6: its /64) had quic.max_streams_per_ip request streams open already.", |w| w.streams_refused_per_ip.load(Ordering::Relaxed)),
        ("spooky_memory_shed_total", "counter", "Above proxy.memory_limit: requests answered 503 and stalled response streams reset.", |w| w.memory_shed.load(Ordering::Relaxed)),
        ("spooky_quic_other_server_packets_total", "counter", "Packets whose DCID has our layout and another server id that no fleet member has: dropped, never answered with a Stateless Reset.", |w| w.other_server.load(Ordering::Relaxed)),
        ("spooky_drain_refused_connections_total", "counter", "New connections (QUIC Initials, TCP accepts) refused while the host is drained (POST /drain).", |w| w.drain_refused.load(Ordering::Relaxed)),
        ("spooky_fleet_forwarded_packets_total", "counter", "Packets of another fleet member's connections (their DCID names its server id) sent on to it, GUE-encapsulated.", |w| w.fleet_forwarded.load(Ordering::Relaxed)),
        ("spooky_fleet_forward_failures_total", "counter", "Packets for a fleet member that could not be sent on (send error, too large to encapsulate).", |w| w.fleet_send_failures.load(Ordering::Relaxed)),
        ("spooky_fleet_received_packets_total", "counter", "Packets fleet members forwarded here, taken apart and fed to our connections.", |w| w.fleet_received.load(Ordering::Relaxed)),
        ("spooky_fleet_refused_packets_total", "counter", "Packets on the fleet forwarding port refused: not from a member's address, or malformed.", |w| w.fleet_refused.load(Ordering::Relaxed)),
        ("spooky_http3_request_head_timeouts_total", "counter", "Request streams reset because their head did not arrive within quic.request_header_timeout.", |w| w.request_head_timeouts.load(Ordering::Relaxed)),
        ("spooky_quic_resumed_handshakes_total", "counter", "Handshakes completed by resuming a TLS session (a session ticket), with or without 0-RTT.", |w| w.resumed.load(Ordering::Relaxed)),
        ("spooky_http3_early_data_forwarded_total", "counter", "Requests received in 0-RTT and forwarded at once with early-data: 1 (safe methods).", |w| w.early_forwarded.load(Ordering::Relaxed)),
        ("spooky_http3_early_data_deferred_total", "counter", "Requests received in 0-RTT held until the handshake completed (other methods, quic.early_data: defer).", |w| w.early_deferred.load(Ordering::Relaxed)),
        ("spooky_http3_early_data_rejected_total", "counter", "Requests received in 0-RTT answered 425 Too Early (other methods, quic.early_data: reject).", |w| w.early_rejected.load(Ordering::Relaxed)),
        ("spooky_tcp_connections_accepted_total", "counter", "TLS-over-TCP connections accepted (listen.tcp).", |w| w.tcp_accepted.load(Ordering::Relaxed)),
        ("spooky_tcp_connections_active", "gauge", "Open TLS-over-TCP connections.", |w| w.tcp_active.load(Ordering::Relaxed)),
        ("spooky_tcp_connections_refused_total", "counter", "TCP connections closed at once because listen.tcp.max_connections were open.", |w| w.tcp_refused.load(Ordering::Relaxed)),
        ("spooky_tcp_connections_refused_per_ip_total", "counter", "TCP connections closed at once because their client address (IPv6: its /64) had listen.tcp.max_connections_per_ip open.", |w| w.tcp_refused_per_ip.load(Ordering::Relaxed)),
        ("spooky_tcp_connections_rate_limited_total", "counter", "TCP connections closed at once because their client address (IPv6: its /64) went over listen.tcp.connection_rate_per_ip.", |w| w.tcp_rate_limited.load(Ordering::Relaxed)),
        ("spooky_tcp_tls_handshake_failures_total", "counter", "TLS handshakes over TCP that failed or did not finish within listen.tcp.header_timeout.", |w| w.tcp_handshake_failures.load(Ordering::Relaxed)),
        ("spooky_websockets_opened_total", "counter", "WebSocket tunnels opened to backends (over HTTP/3, HTTP/2 and HTTP/1.1).", |w| w.websockets_opened.load(Ordering::Relaxed)),
        ("spooky_tcp_proxy_protocol_refused_total", "counter", "TCP connections refused over the PROXY protocol: a header from an untrusted source, or none or a bad one from a trusted source.", |w| w.tcp_proxy_refused.load(Ordering::Relaxed)),
        ("spooky_request_tasks_unfinished_total", "counter", "Request tasks that ended without finishing their response (a panic, logged): the client's stream was reset with H3_INTERNAL_ERROR (HTTP/2: RST_STREAM) instead of left hanging.", |w| w.tasks_unfinished.load(Ordering::Relaxed)),
        ("spooky_upstream_overflow_total", "counter", "Requests answered 503 at once because upstream.NAME.max_pending_requests already waited for their backend (a connection being made, or a stream slot).", |w| w.upstream_overflow.load(Ordering::Relaxed)),
        ("spooky_upstream_pending_timeouts_total", "counter", "Requests answered 503 after waiting the pool's connect timeout for a connection or a stream slot of their backend.", |w| w.upstream_pending_timeouts.load(Ordering::Relaxed)),
        ("spooky_upstream_backoff_refusals_total", "counter", "Requests failed at once (502/504, with the connect's error) during the back-off after a failed connect to their backend.", |w| w.upstream_backoff_refusals.load(Ordering::Relaxed)),
        ("spooky_udp_gso_enabled", "gauge", "1 while UDP GSO (segmentation offload) is used on the worker's socket; 0 once the device refused it (EIO, EOPNOTSUPP).", |w| w.gso_enabled.load(Ordering::Relaxed)),
        ("spooky_udp_gso_fallbacks_total", "counter", "GSO batches the kernel refused (EMSGSIZE, EINVAL) that went out one datagram per call instead; GSO stays on.", |w| w.gso_fallbacks.load(Ordering::Relaxed)),
        ("spooky_quic_client_addresses", "gauge", "Client addresses (IPv4, or IPv6 /64) with a QUIC connection open, the keys of the per-address connection limit.", |w| w.client_addresses.load(Ordering::Relaxed)),
        ("spooky_http1_smuggling_refused_total", "counter", "HTTP/1.1 requests answered 400 as request smuggling (bare LF, content-length with transfer-encoding, two content-lengths); they never reach a backend.", |w| w.http1_smuggling_refused.load(Ordering::Relaxed)),
    ];
    for &(name, kind, help, get) in worker_metrics {
        head(&mut out, name, kind, help);
        for (i, w) in ops.stats.iter().enumerate() {
            let _ = writeln!(out, "{name}{{worker=\"{i}\"}} {}", get(w));
        }
    }
    head(
        &mut out,
        "spooky_process_resident_memory_bytes",
        "gauge",
        "Resident memory of the process (what proxy.memory_limit is compared with).",
    );
    let _ = writeln!(
        out,
        "spooky_process_resident_memory_bytes {}",
        crate::telemetry::memory::resident()
    );

    head(
        &mut out,
        "spooky_backend_health_state",
        "gauge",
        "0 healthy, 1 unhealthy, 2 ejected, 3 recovering.",
    );
    let backend_rows: Vec<_> = snapshot
        .backends
        .iter()
        .flatten()
        .map(|plan| {
            let key = &plan.slot.key;
            let labels = format!("pool=\"{}\",backend=\"{}\"", esc(&key.pool), esc(&key.id));
            (labels, &plan.slot)
        })
        .collect();
    for (l, slot) in &backend_rows {
        let _ = writeln!(
            out,
            "spooky_backend_health_state{{{l}}} {}",
            slot.state.load(Ordering::Relaxed)
        );
    }
    head(
        &mut out,
        "spooky_backend_up",
        "gauge",
        "1 when the backend takes new requests.",
    );
    for (l, slot) in &backend_rows {
        let _ = writeln!(
            out,
            "spooky_backend_up{{{l}}} {}",
            u8::from(slot.is_available())
        );
    }
    head(
        &mut out,
        "spooky_backend_drained",
        "gauge",
        "1 when an operator drained the backend (admin API): no new requests.",
    );
    for (l, slot) in &backend_rows {
        let _ = writeln!(
            out,
            "spooky_backend_drained{{{l}}} {}",
            u8::from(slot.is_drained())
        );
    }
    head(
        &mut out,
        "spooky_backend_in_flight",
        "gauge",
        "Requests in flight to the backend, all workers.",
    );
    for (labels, _, t) in series.iter().filter(|s| s.1) {
        let _ = writeln!(out, "spooky_backend_in_flight{{{labels}}} {}", t.in_flight);
    }
    head(
        &mut out,
        "spooky_backend_latency_ewma_seconds",
        "gauge",
        "Exponentially weighted moving average of response-head latency.",
    );
    for (l, slot) in &backend_rows {
        let _ = writeln!(
            out,
            "spooky_backend_latency_ewma_seconds{{{l}}} {}",
            slot.ewma_latency_us.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
    head(
        &mut out,
        "spooky_health_checks_total",
        "counter",
        "Active health probes by result.",
    );
    for (l, slot) in &backend_rows {
        let _ = writeln!(
            out,
            "spooky_health_checks_total{{{l},result=\"success\"}} {}",
            slot.probes_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "spooky_health_checks_total{{{l},result=\"failure\"}} {}",
            slot.probes_failed.load(Ordering::Relaxed)
        );
    }

    let (reloads_ok, reloads_failed) = ops.reloader.counts();
    head(
        &mut out,
        "spooky_config_reloads_total",
        "counter",
        "Configuration reloads by result.",
    );
    let _ = writeln!(
        out,
        "spooky_config_reloads_total{{result=\"success\"}} {reloads_ok}"
    );
    let _ = writeln!(
        out,
        "spooky_config_reloads_total{{result=\"failure\"}} {reloads_failed}"
    );
    head(
        &mut out,
        "spooky_config_generation",
        "gauge",
        "Configuration generation in force (1 at start, +1 per successful reload).",
    );
    let _ = writeln!(out, "spooky_config_generation {}", snapshot.generation);
    let process_counters: &[(&str, &str, u64)] = &[
        (
            "spooky_access_log_dropped_total",
            "Access-log lines dropped because the writer fell behind (its queue holds at most 8 MiB).",
            ops.access_log.dropped(),
        ),
        (
            "spooky_access_log_reopens_total",
            "Access-log files reopened on SIGUSR1 (after logrotate moved them).",
            ops.access_log.reopens().0,
        ),
        (
            "spooky_access_log_reopen_failures_total",
            "Access-log reopens on SIGUSR1 that failed (the old file is written on; logged).",
            ops.access_log.reopens().1,
        ),
        (
            "spooky_log_lines_dropped_total",
            "Log lines dropped because stderr did not take them fast enough (the writer thread's queue holds at most 1 MiB; no worker ever waits on stderr).",
            crate::telemetry::logging::dropped(),
        ),
        (
            "spooky_log_lines_suppressed_total",
            "Log lines a client could cause (refused, failed or aborted requests, smuggling attempts) left out by the per-worker rate limit of 20 a second per kind; the next line written says how many.",
            crate::telemetry::logging::suppressed(),
        ),
        (
            "spooky_health_reports_dropped_total",
            "Passive-health reports from workers dropped because the health checker's queue was full.",
            crate::health::checker::REPORTS_DROPPED.load(Ordering::Relaxed),
        ),
        (
            "spooky_health_ejections_withheld_total",
            "Passive ejections not made because the pool had as many backends ejected as upstream.NAME.passive_health.max_ejection_percent allows.",
            crate::health::checker::EJECTIONS_WITHHELD.load(Ordering::Relaxed),
        ),
        (
            "spooky_admin_connections_refused_total",
            "Admin connections closed at once because the admin listener had its maximum open.",
            super::admin::CONNECTIONS_REFUSED.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, value) in process_counters {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }

    certificates(&mut out, &snapshot.certs);

    let extra = ops.ebpf.as_ref().map(|f| f()).unwrap_or_default();
    if !extra.is_empty() {
        head(
            &mut out,
            "spooky_ebpf_packets_total",
            "counter",
            "Per-CPU counters of the XDP program, summed (see docs/ebpf.md).",
        );
        // Summed over the CPUs, one line per counter (`spooky status` shows them per CPU).
        let mut sums: Vec<(&str, u64)> = Vec::new();
        for (counter, _cpu, v) in &extra {
            match sums.iter_mut().find(|(c, _)| c == counter) {
                Some((_, sum)) => *sum += v,
                None => sums.push((counter, *v)),
            }
        }
        for (counter, v) in sums {
            let _ = writeln!(
                out,
                "spooky_ebpf_packets_total{{counter=\"{}\"}} {v}",
                esc(counter)
            );
        }
    }
    out
}

/// The listener's certificates: expiry and handshakes per certificate, unknown SNI.
fn certificates(out: &mut String, certs: &crate::certs::Certificates) {
    head(
        out,
        "spooky_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        "When each certificate of listen.tls expires (notAfter, Unix time), by its first DNS name.",
    );
    let sites = certs.all();
    for site in &sites {
        let _ = writeln!(
            out,
            "spooky_tls_certificate_expiry_timestamp_seconds{{name=\"{}\"}} {}",
            esc(&site.name),
            site.not_after
        );
    }
    head(
        out,
        "spooky_tls_handshakes_total",
        "counter",
        "ClientHellos (QUIC and TCP) answered with each certificate.",
    );
    for site in &sites {
        let _ = writeln!(
            out,
            "spooky_tls_handshakes_total{{name=\"{}\"}} {}",
            esc(&site.name),
            site.handshakes()
        );
    }
    head(
        out,
        "spooky_tls_unknown_sni_total",
        "counter",
        "ClientHellos whose SNI named no certificate, or that sent none (given the default, or \
         refused with listen.tls.unknown_sni: refuse).",
    );
    let unknown = certs.shared().unknown_sni.load(Ordering::Relaxed);
    let _ = writeln!(out, "spooky_tls_unknown_sni_total {unknown}");
    let acme = &certs.shared().acme;
    for (name, help, v) in [
        (
            "spooky_acme_orders_total",
            "ACME orders placed (new certificates and renewals).",
            &acme.orders,
        ),
        (
            "spooky_acme_certificates_issued_total",
            "Certificates obtained by ACME and put in force.",
            &acme.issued,
        ),
        (
            "spooky_acme_failures_total",
            "ACME orders that failed; the certificate in force stays.",
            &acme.failures,
        ),
        (
            "spooky_acme_stored_certificates_reused_total",
            "Stored ACME certificates served at start instead of ordering.",
            &acme.reused,
        ),
        (
            "spooky_dns_lookups_total",
            "DNS lookups of backend names.",
            &crate::dns::LOOKUPS,
        ),
        (
            "spooky_dns_lookup_failures_total",
            "DNS lookups of backend names that failed; the last good addresses stay.",
            &crate::dns::FAILURES,
        ),
        (
            "spooky_dns_changes_total",
            "Backend address sets changed by DNS and put in force.",
            &crate::dns::CHANGES,
        ),
    ] {
        head(out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
    }
}
