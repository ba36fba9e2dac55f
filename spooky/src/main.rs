//! The `spooky` command line: run the proxy, check a configuration, or fetch a URL over
//! HTTP/3. All the work is in the library; this file parses arguments and maps outcomes to
//! exit codes (0 ok, 1 invalid configuration or runtime failure, 2 cannot read the file).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use spooky::config::Config;
use spooky_peers::client::{Client, ClientOptions, Request};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "spooky",
    version,
    about = "HTTP/3 edge proxy: QUIC in, HTTP/2 to backend pools, eBPF steering",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Configuration file (YAML).
    #[arg(long, short, default_value = "config/config.yaml")]
    config: PathBuf,
    /// Attach the XDP steering program to this interface (needs root).
    #[arg(long)]
    iface: Option<String>,
    /// How XDP attaches with --iface: native (driver), generic (SKB), or auto (native, else
    /// generic). Overrides the config's `steering.xdp_mode`.
    #[arg(long, value_enum, requires = "iface")]
    xdp_mode: Option<XdpModeArg>,
    /// Worker threads (default: the config's `workers`, else one per online CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Do not pin worker k to CPU k.
    #[arg(long)]
    no_pin: bool,
    /// Take over from the Spooky running on this configuration's control socket: this
    /// process serves new connections, the running one drains and exits (zero-downtime
    /// upgrades and restarts; see docs/upgrades.md).
    #[arg(long)]
    takeover: bool,
    /// Go to the background once serving (for `ExecReload=` of a systemd unit: the command
    /// returns when the new process serves, with its status).
    #[arg(long)]
    detach: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum XdpModeArg {
    Native,
    Generic,
    Auto,
}

#[derive(Subcommand)]
enum Command {
    /// Show a running Spooky's steering mode, workers, backend health and per-CPU counters,
    /// read from its pinned BPF maps (needs root, like bpftool); when they cannot be read,
    /// from its admin listener (`GET /status`). The first line says which.
    Status {
        /// The running Spooky's configuration: where its maps are pinned
        /// (`steering.pin_path`) and its admin listener (`admin`). Default:
        /// config/config.yaml when it exists, else the defaults (/sys/fs/bpf/spooky,
        /// 127.0.0.1:9900).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Read the maps pinned here, and nothing else (no admin listener).
        #[arg(long)]
        pin_path: Option<PathBuf>,
        /// Print JSON instead of tables (from the admin listener: its `GET /status`, with
        /// `source`).
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration: prints a summary, or every problem with its field path.
    Check {
        #[arg(long, short, default_value = "config/config.yaml")]
        config: PathBuf,
    },
    /// Manage the key file (`quic.key_file`).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Send one HTTP/3 request and print the response (a small curl for HTTP/3).
    Get {
        /// https://HOST[:PORT]/PATH
        url: String,
        /// Connect to this address instead of resolving the URL's host.
        #[arg(long)]
        connect: Option<String>,
        /// Skip certificate verification.
        #[arg(long, short = 'k')]
        insecure: bool,
        /// Trust this CA file (PEM).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Print response headers too.
        #[arg(long, short = 'i')]
        include: bool,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// A new token key; the current one stays valid for tokens until the next rotation.
    /// Creates the file when it does not exist. Reload (SIGHUP) every Spooky that reads it.
    Rotate {
        /// The key file.
        #[arg(long)]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => check(&config),
        Some(Command::Keys {
            action: KeysAction::Rotate { file },
        }) => rotate_keys(&file),
        Some(Command::Status {
            config,
            pin_path,
            json,
        }) => status(config.as_deref(), pin_path.as_deref(), json),
        Some(Command::Get {
            url,
            connect,
            insecure,
            ca,
            include,
        }) => match get(&url, connect, insecure, ca, include) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spooky get: {}", explain(&e));
                ExitCode::from(1)
            }
        },
        None => run(&cli.run),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::from_path(path) {
        Ok(cfg) => {
            let backends: usize = cfg
                .upstreams
                .iter()
                .map(|u| u.backends.len() + u.named.len())
                .sum();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            match spooky::certs::report(&cfg.listen.tls, now) {
                Ok((lines, _warned)) => {
                    for line in lines {
                        println!("{line}");
                    }
                }
                Err(e) => {
                    eprintln!("{}: listen.tls: {e}", path.display());
                    return ExitCode::from(1);
                }
            }
            // Not looked up here: a file is valid whatever DNS answers today.
            for name in cfg.dns_names() {
                println!("backend host {name}: resolved when Spooky runs (not checked)");
            }
            println!(
                "{}: ok (listen {}, {} upstreams, {} backends)",
                path.display(),
                cfg.listen.addr,
                cfg.upstreams.len(),
                backends
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn status(
    config: Option<&std::path::Path>,
    pin_path: Option<&std::path::Path>,
    json: bool,
) -> ExitCode {
    use spooky::ops::status::{self, Source, Target};
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("spooky status: {e}");
        ExitCode::from(1)
    };
    let default_config = std::path::Path::new("config/config.yaml");
    let target = match config {
        Some(path) => Target::from_config(path),
        None if default_config.is_file() => Target::from_config(default_config),
        None => Ok(Target::default()),
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let pins = pin_path.map_or(target.pin_path.clone(), std::path::Path::to_path_buf);
    let error = match status::read(&pins) {
        Ok(found) if json => {
            return match serde_json::to_string_pretty(&found) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Ok(found) => {
            println!("source: {}", Source::Pins(pins));
            print!("{}", status::render(&found));
            return ExitCode::SUCCESS;
        }
        // The maps were asked for by name: they are the answer.
        Err(e) if pin_path.is_some() => return fail(&e),
        Err(e) => e,
    };
    // Not the maps: the admin listener.
    let Some(addr) = target.admin else {
        return fail(&format!(
            "{error}; and the admin listener is off (admin.enabled: false)"
        ));
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let source = Source::Admin {
        addr,
        why: status::why_not_pins(&error, root),
    };
    match status::read_admin(addr, target.token.as_deref(), Duration::from_secs(5)) {
        Ok((mut value, _)) if json => {
            if let Some(object) = value.as_object_mut() {
                object.insert("source".into(), source.to_string().into());
            }
            match serde_json::to_string_pretty(&value) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Ok((_, found)) => {
            print!("{}", status::render_admin(&found, &source));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("{error}; admin listener http://{addr}: {e}")),
    }
}

fn run(args: &RunArgs) -> ExitCode {
    // Before any thread exists: fork, and let the parent report the child's start.
    let started = if args.detach {
        match detach() {
            Ok(Detached::Parent(code)) => return code,
            Ok(Detached::Child(pipe)) => Some(pipe),
            Err(e) => {
                eprintln!("spooky: cannot go to the background: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    let mut config = match Config::from_path(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", args.config.display());
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    if let Some(mode) = args.xdp_mode {
        config.steering.xdp_mode = match mode {
            XdpModeArg::Native => spooky::config::XdpMode::Native,
            XdpModeArg::Generic => spooky::config::XdpMode::Generic,
            XdpModeArg::Auto => spooky::config::XdpMode::Auto,
        };
    }
    let log_reloader = match spooky::telemetry::logging::init(&config.log.level, config.log.format)
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spooky: {e}");
            return ExitCode::from(1);
        }
    };
    let served = serve(config, args, log_reloader, started);
    // The last lines (the drain's, "stopped") are written before the process ends.
    spooky::telemetry::logging::flush(Duration::from_secs(2));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let why = explain(&e);
            tracing::error!("{why}");
            spooky::telemetry::logging::flush(Duration::from_secs(2));
            eprintln!("spooky: {why}");
            ExitCode::from(1)
        }
    }
}

fn serve(
    config: Config,
    args: &RunArgs,
    log_reloader: spooky::telemetry::logging::LevelReloader,
    started: Option<std::fs::File>,
) -> Result<()> {
    let opts = spooky::app::RunOptions {
        workers: args.workers,
        iface: args.iface.clone(),
        pin: !args.no_pin,
        takeover: args.takeover,
        lock_down: true,
    };
    // The signal handlers exist before anything can tell systemd (or a supervisor) that we
    // serve: a SIGTERM that follows READY=1 at once is a graceful shutdown, never a kill by
    // the default action. One that comes during start-up waits until start-up is done.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int, mut hup, mut usr1) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _entered = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
            signal(SignalKind::user_defined1())?,
        )
    };
    let running = spooky::app::start_from(config, &opts, Some(args.config.clone()))
        .context("cannot start")?;
    running.reloader().set_log_reloader(log_reloader);
    tracing::info!(listen = %running.local_addr, generation = running.generation, "spooky is serving HTTP/3");
    notify_systemd();
    if let Some(mut pipe) = started {
        use std::io::Write;
        let _ = pipe.write_all(&[1]);
    }
    let mut handed_over = running.handed_over();
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: graceful shutdown");
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: graceful shutdown");
                    break;
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    // The outcome is logged by the reload itself.
                    let _ = running.reloader().reload();
                }
                _ = usr1.recv() => {
                    tracing::info!("SIGUSR1: reopening the access log");
                    running.reopen_access_log();
                }
                r = handed_over.changed() => {
                    if r.is_err() || *handed_over.borrow() {
                        tracing::info!("a successor serves: draining, then exiting");
                        break;
                    }
                }
            }
        }
        anyhow::Ok(())
    })?;
    running.begin_shutdown();
    running.join()?;
    tracing::info!("stopped");
    Ok(())
}

/// The error and its causes, each said once (our errors' messages already name their cause).
fn explain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) that this process serves and is the
/// service's main process now (after a takeover, the successor is).
fn notify_systemd() {
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("READY=1\nMAINPID={}\n", std::process::id());
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
        }
        None => socket.send_to(message.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

enum Detached {
    /// The parent: exit with the child's start status.
    Parent(ExitCode),
    /// The child: write one byte `1` here once serving.
    Child(std::fs::File),
}

/// Forks: the parent waits until the child serves (exit 0) or fails (exit 1); the child
/// leaves the parent's session.
fn detach() -> std::io::Result<Detached> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptors are fresh and owned by nobody else.
    let (mut read, write) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: no other thread exists yet (this runs first in main), so the child is a
    // complete copy of this single thread.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read);
            // SAFETY: plain syscall; the child leaves the parent's session and terminal.
            unsafe { libc::setsid() };
            Ok(Detached::Child(write))
        }
        _ => {
            drop(write);
            let mut byte = [0u8; 1];
            let served = matches!(read.read(&mut byte), Ok(1)) && byte[0] == 1;
            Ok(Detached::Parent(if served {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }))
        }
    }
}

fn rotate_keys(file: &std::path::Path) -> ExitCode {
    let rng = ring::rand::SystemRandom::new();
    let result = if file.exists() {
        spooky::keys::Keys::rotate_file(file, &rng).map(|_| "rotated the token key")
    } else {
        spooky::keys::Keys::load_or_create(file, &rng).map(|_| "created")
    };
    match result {
        Ok(what) => {
            println!(
                "{}: {what}; reload every Spooky that reads it (SIGHUP)",
                file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spooky keys: {e}");
            ExitCode::from(1)
        }
    }
}

fn get(
    url: &str,
    connect: Option<String>,
    insecure: bool,
    ca: Option<PathBuf>,
    include: bool,
) -> Result<()> {
    let rest = url.strip_prefix("https://").context("only https:// URLs")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_matches(['[', ']']);
    let target = match connect {
        Some(c) => c,
        None if authority.contains(':') => authority.to_string(),
        None => format!("{authority}:443"),
    };
    let Some(addr) = target.to_socket_addrs()?.next() else {
        bail!("cannot resolve {target}")
    };
    let opts = ClientOptions {
        verify: !insecure,
        ca,
        server_name: host.to_string(),
        ..Default::default()
    };
    let mut client = Client::connect(addr, &opts, Duration::from_secs(5))?;
    let resp = client.request(&Request::get(authority, path), Duration::from_secs(30))?;
    client.close();
    if include {
        println!("HTTP/3 {}", resp.status);
        for (k, v) in &resp.headers {
            println!("{k}: {v}");
        }
        println!();
    }
    use std::io::Write;
    std::io::stdout().write_all(&resp.body)?;
    if let Some(code) = resp.reset {
        bail!("stream reset by server (code {code:#x})");
    }
    if resp.status >= 400 {
        bail!("HTTP status {}", resp.status);
    }
    Ok(())
}
