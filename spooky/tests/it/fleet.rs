//! Fleet mode. QUIC-LB connection IDs: Spooky's codec against an independent one
//! (spooky/tests/peers/quic_lb.py, written from the draft on Python's `cryptography`), in
//! every mode and length. Then a fleet in network namespaces: a router with an ECMP route to
//! a VIP over hosts running Spooky with encrypted QUIC-LB connection IDs, and aioquic
//! clients that rebind (spooky/tests/peers/fleet_clients.py) and read the server id of every
//! connection ID they were given with that independent decoder.

use crate::support::*;
use spooky::quic::quic_lb::QuicLb;
use spooky_peers::demo::DemoOptions;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn quic_lb_ids_agree_with_an_independent_implementation() {
    require_python("cryptography", "cryptography");
    let mut py = Command::new("python3")
        .arg(peers_dir().join("quic_lb.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut input = py.stdin.take().unwrap();
    let mut output = BufReader::new(py.stdout.take().unwrap());
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut byte = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as u8
    };
    let mut checked = [0usize; 3];
    for sid_len in 1..=15usize {
        for nonce_len in 4..=(19 - sid_len) {
            for keyed in [false, true] {
                let key: Option<[u8; 16]> = keyed.then(|| std::array::from_fn(|_| byte()));
                let rotation = byte() % 7;
                let lb = QuicLb::new(rotation, sid_len, nonce_len, key, true).unwrap();
                let sid: Vec<u8> = (0..sid_len).map(|_| byte()).collect();
                let nonce: Vec<u8> = (0..nonce_len).map(|_| byte()).collect();
                let cid = lb.encode(&sid, &nonce, 0).unwrap();
                let q = serde_json::json!({
                    "rotation": rotation,
                    "sid": hex(&sid),
                    "nonce": hex(&nonce),
                    "key": key.map(|k| hex(&k)),
                    "cid": hex(&cid),
                });
                writeln!(input, "{q}").unwrap();
                let mut line = String::new();
                output.read_line(&mut line).unwrap();
                let a: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("python said {line:?}: {e}"));
                assert_eq!(a["cid"], hex(&cid), "python encodes as Spooky: {lb:?}");
                assert_eq!(a["sid"], hex(&sid), "python decodes Spooky's: {lb:?}");
                assert_eq!(a["nonce"], hex(&nonce), "{lb:?}");
                checked[lb.mode() as usize] += 1;
            }
        }
    }
    drop(input);
    assert!(py.wait().unwrap().success());
    // Plaintext, single pass, four passes: every one was exercised.
    assert!(checked.iter().all(|n| *n > 0), "{checked:?}");
}

/// Runs `ip args…`, failing the test with its output when it fails.
fn ip(args: &[&str]) {
    crate::netns::run("ip", args);
}

const VIP: &str = "10.199.0.1";
/// The fleet's QUIC-LB configuration (the load balancer in front would have the same):
/// codepoint 1, this key, 2-byte server ids, 16-byte connection IDs, so 11 nonce bytes
/// (generation and worker among them) and the four-pass Feistel mode; Spooky's two host
/// bytes follow.
const QUIC_LB_ROTATION: u8 = 1;
const QUIC_LB_KEY: &str = "8f95f09245765f80256934e50c66207f";
const QUIC_LB_NONCE_LEN: usize = 11;
const FLEET_PORT: u16 = 6080;
const QUIC_PORT: u16 = 4433;

/// A router namespace, a client namespace and four host namespaces (each with the VIP on
/// its loopback), deleted on drop.
struct Topology {
    router: String,
    client: String,
    hosts: Vec<String>,
}

impl Topology {
    fn new() -> Self {
        assert!(
            // SAFETY: geteuid has no preconditions.
            unsafe { libc::geteuid() } == 0,
            "the fleet test needs root (network namespaces)"
        );
        let tag = format!("{}", std::process::id() % 100_000);
        let t = Self {
            router: format!("flr{tag}"),
            client: format!("flc{tag}"),
            hosts: (1..=4).map(|i| format!("flh{i}{tag}")).collect(),
        };
        for ns in t.all() {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            sysctl(
                ns,
                &[
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            );
        }
        // The client's link to the router: 10.210.0.0/24.
        link(
            &t.client,
            &format!("flc{tag}"),
            "10.210.0.2/24",
            &t.router,
            &format!("flr0{tag}"),
            "10.210.0.1/24",
        );
        ip(&[
            "-n",
            &t.client,
            "route",
            "add",
            "default",
            "via",
            "10.210.0.1",
        ]);
        // Host i's link: 10.211.i.0/24; the VIP on its loopback; replies go back by the router.
        for (i, host) in t.hosts.iter().enumerate() {
            let n = i + 1;
            link(
                host,
                &format!("flh{n}{tag}e"),
                &format!("10.211.{n}.2/24"),
                &t.router,
                &format!("flr{n}{tag}"),
                &format!("10.211.{n}.1/24"),
            );
            ip(&["-n", host, "addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
            ip(&[
                "-n",
                host,
                "route",
                "add",
                "default",
                "via",
                &format!("10.211.{n}.1"),
            ]);
        }
        // The router hashes on the 5-tuple (L4), as an edge ECMP router does.
        sysctl(
            &t.router,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv4.fib_multipath_hash_policy=1",
            ],
        );
        t.route_vip(&[1, 2, 3]);
        t
    }

    fn all(&self) -> impl Iterator<Item = &String> {
        [&self.router, &self.client].into_iter().chain(&self.hosts)
    }

    /// The router's multipath route to the VIP, over hosts `members` (1-based).
    fn route_vip(&self, members: &[usize]) {
        let mut args = vec![
            "-n".to_owned(),
            self.router.clone(),
            "route".into(),
            "replace".into(),
            format!("{VIP}/32"),
        ];
        for m in members {
            args.extend(["nexthop".into(), "via".into(), format!("10.211.{m}.2")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ip(&args);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.all() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn sysctl(ns: &str, settings: &[&str]) {
    let mut args = vec!["netns", "exec", ns, "sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    crate::netns::run("ip", &args);
}

/// A veth pair between namespaces `a` and `b`, addressed and up.
fn link(a: &str, a_if: &str, a_addr: &str, b: &str, b_if: &str, b_addr: &str) {
    ip(&[
        "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b,
    ]);
    for (ns, iface, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ip(&["-n", ns, "addr", "add", addr, "dev", iface]);
        ip(&["-n", ns, "link", "set", iface, "up"]);
    }
}

/// Host `n`'s configuration: listening on the wildcard address (the VIP is on its
/// loopback), server id `n` in encrypted QUIC-LB connection IDs, the fleet's shared key file
/// and member table, and its own backend.
fn host_config(
    n: usize,
    keys: &std::path::Path,
    backend: std::net::SocketAddr,
) -> spooky::config::Config {
    let members: String = (1..=4)
        .map(|m| format!("    \"{m}\": 10.211.{m}.2\n"))
        .collect();
    let extra = format!(
        "quic:\n  server_id: {n}\n  key_file: {}\n  retry: off\n  connection_ids: {{format: quic-lb, config_rotation: {QUIC_LB_ROTATION}, key: \"{QUIC_LB_KEY}\"}}\nfleet:\n  listen: \"0.0.0.0:{FLEET_PORT}\"\n  members:\n{members}",
        keys.display()
    );
    let yaml = config_yaml(
        QUIC_PORT,
        &pool(
            "main",
            "/",
            None,
            "round-robin",
            &[(&format!("h{n}"), backend)],
            "",
        ),
        &extra,
    )
    .replace("address: 127.0.0.1\n  port", "address: 0.0.0.0\n  port");
    let mut config =
        spooky::config::parse(&yaml, &repo_root()).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    config.workers = Some(2);
    config
}

fn fleet_counter(
    p: &Proxy,
    f: impl Fn(&spooky::stats::WorkerStats) -> &std::sync::atomic::AtomicU64,
) -> u64 {
    p.stats_sum(|s| f(s).load(std::sync::atomic::Ordering::Relaxed))
}

/// Three hosts behind an ECMP router, 50 aioquic connections changing their source port
/// every second for 20 s; a fourth host joins the route after 6 s (the router rehashes),
/// host 2 is drained (`POST /drain`) and leaves it after 12 s: it keeps its connections,
/// reached only through forwarding. Every request must get its answer, from the backend of the host its
/// connection lives on.
#[test]
#[ignore = "needs root"]
fn fleet_behind_ecmp_loses_no_request_when_clients_rebind_and_the_route_changes() {
    require_python("aioquic", "aioquic");
    let topo = Topology::new();
    let dir = Scratch::new("fleet");
    let keys = dir.0.join("fleet-keys.yaml");
    // One after the other: the first creates the shared key file, the others read it.
    let hosts: Vec<(Backend, Proxy)> = topo
        .hosts
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let keys = keys.clone();
            crate::netns::in_netns(ns, move || {
                init_logging();
                let backend = backend_at(
                    "127.0.0.1:0".parse().unwrap(),
                    DemoOptions {
                        id: format!("h{}", i + 1),
                        goaway_every: None,
                    },
                );
                let proxy = proxy_from(host_config(i + 1, &keys, backend.addr));
                (backend, proxy)
            })
        })
        .collect();

    let clients = Command::new("ip")
        .args(["netns", "exec", &topo.client, "python3"])
        .arg(peers_dir().join("fleet_clients.py"))
        .args([
            "--host",
            VIP,
            "--port",
            &QUIC_PORT.to_string(),
            "--connections",
            "50",
            "--seconds",
            "20",
            "--quic-lb",
            &format!("{QUIC_LB_ROTATION}:{QUIC_LB_KEY}:2:{QUIC_LB_NONCE_LEN}"),
            "--ca",
        ])
        .arg(certs_dir().join("ca.crt"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    std::thread::sleep(std::time::Duration::from_secs(6));
    topo.route_vip(&[1, 2, 3, 4]);
    std::thread::sleep(std::time::Duration::from_secs(6));
    let before_drain = fleet_counter(&hosts[1].1, |s| &s.fleet_received);
    // Host 2 is drained (its admin API) and leaves the route.
    let admin = hosts[1].1.running.as_ref().unwrap().admin_addr.unwrap();
    let answer = crate::netns::in_netns(&topo.hosts[1], move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        s.write_all(b"POST /drain HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    topo.route_vip(&[1, 3, 4]);
    let out = clients.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fleet_clients.py said {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let counters: Vec<[u64; 4]> = hosts
        .iter()
        .map(|(_, p)| {
            [
                fleet_counter(p, |s| &s.fleet_forwarded),
                fleet_counter(p, |s| &s.fleet_received),
                fleet_counter(p, |s| &s.fleet_refused),
                fleet_counter(p, |s| &s.resets_sent),
            ]
        })
        .collect();
    eprintln!("fleet: {report}\nper host [forwarded, received, refused, resets]: {counters:?}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(out.status.success());
    // 50 connections, a request a second for 20 s.
    assert!(report["ok"].as_u64().unwrap() >= 50 * 19, "{report}");
    // Every connection ID a connection was given names its host to a QUIC-LB load balancer
    // (checked by the client's own decoder; a mismatch is a failure above).
    assert!(
        report["server_cids_checked"].as_u64().unwrap() >= 50 * 2,
        "{report}"
    );
    assert!(report["rebinds"].as_u64().unwrap() >= 50 * 18, "{report}");
    // Forwarding did the work: rebound packets crossed hosts, the new host forwarded what
    // it got of the others' connections, the drained host still got its packets.
    assert!(
        counters.iter().all(|c| c[0] > 0 || c[1] > 0),
        "{counters:?}"
    );
    assert!(counters[3][0] > 0, "host 4 forwarded nothing: {counters:?}");
    assert!(
        counters[1][1] > before_drain,
        "drained host 2 received nothing forwarded: {counters:?}"
    );
    assert!(counters.iter().all(|c| c[2] == 0), "{counters:?}");
    // Connections live on every host of the first three.
    let owners: std::collections::BTreeSet<String> = report["connections"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    assert!(owners.len() >= 3, "{owners:?}");

    // A session ticket from host 1 resumes on host 3, and its 0-RTT request is served there
    // (the key file shared by the fleet carries the ticket key).
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.client, "python3"])
        .arg(peers_dir().join("h3_client.py"))
        .args([
            "--host",
            "10.211.1.2",
            "--resume-host",
            "10.211.3.2",
            "--port",
            &QUIC_PORT.to_string(),
        ])
        .args([
            "--resume",
            "1",
            "--hold-handshake",
            "0.2",
            "--plan",
            r#"[[{"path": "/first"}], [{"path": "/again"}]]"#,
            "--ca",
        ])
        .arg(certs_dir().join("ca.crt"))
        .output()
        .expect("python3");
    let resumed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "h3_client.py said {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(resumed["error"], serde_json::Value::Null, "{resumed}");
    assert_eq!(
        resumed["responses"][0]["body"], "hello from h1: GET /first\n",
        "{resumed}"
    );
    let again = &resumed["resumptions"][0];
    assert_eq!(
        again["resumed"], true,
        "host 3 resumed host 1's session: {resumed}"
    );
    assert_eq!(
        again["early_data"], true,
        "and took its 0-RTT data: {resumed}"
    );
    assert_eq!(
        again["responses"][0]["body"], "hello from h3: GET /again\n",
        "{resumed}"
    );

    // A packet naming a server id no member has: dropped by whichever host gets it, never
    // answered (a Stateless Reset would end another host's connection).
    let quic = host_config(1, &keys, "127.0.0.1:1".parse().unwrap()).quic;
    let ids = spooky::quic::ids::IdFormat::new(&quic.connection_ids, quic.cid_len, 2, 0).unwrap();
    let dropped_before: u64 = hosts
        .iter()
        .map(|(_, p)| fleet_counter(p, |s| &s.other_server))
        .sum();
    let answers = crate::netns::in_netns(&topo.client, move || {
        let mut answers = 0;
        for k in 0..20u8 {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                .unwrap();
            let mut id = [0u8; 20];
            let fill = |b: &mut [u8]| b.fill(k);
            let n = ids.write(&[0, 9], k % 2, None, fill, &mut id);
            assert_eq!(ids.server_id_of(&id[..n]), Some(vec![0, 9]));
            let mut packet = vec![0x40 | (k & 0x3f)];
            packet.extend_from_slice(&id[..n]);
            packet.resize(100, 0xab);
            s.send_to(&packet, (VIP, QUIC_PORT)).unwrap();
            answers += usize::from(s.recv(&mut [0u8; 256]).is_ok());
        }
        answers
    });
    assert_eq!(
        answers, 0,
        "a host answered a packet of no member's connection"
    );
    wait_until(
        "the unknown server id's packets counted",
        std::time::Duration::from_secs(5),
        || {
            hosts
                .iter()
                .map(|(_, p)| fleet_counter(p, |s| &s.other_server))
                .sum::<u64>()
                >= dropped_before + 20
        },
    );
    drop(hosts);
}
