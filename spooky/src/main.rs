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
    /// read from its pinned BPF maps (needs root, like bpftool).
    Status {
        /// Where the maps are pinned (the config's `steering.pin_path`).
        #[arg(long, default_value = "/sys/fs/bpf/spooky")]
        pin_path: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration: prints a summary, or every problem with its field path.
    Check {
        #[arg(long, short, default_value = "config/config.yaml")]
        config: PathBuf,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => check(&config),
        Some(Command::Status { pin_path, json }) => status(&pin_path, json),
        Some(Command::Get {
            url,
            connect,
            insecure,
            ca,
            include,
        }) => match get(&url, connect, insecure, ca, include) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spooky get: {e:#}");
                ExitCode::from(1)
            }
        },
        None => run(&cli.run),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::from_path(path) {
        Ok(cfg) => {
            let backends: usize = cfg.upstreams.iter().map(|u| u.backends.len()).sum();
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

fn status(pin_path: &std::path::Path, json: bool) -> ExitCode {
    match spooky::ops::status::read(pin_path) {
        Ok(status) if json => match serde_json::to_string_pretty(&status) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("spooky status: {e}");
                ExitCode::from(1)
            }
        },
        Ok(status) => {
            print!("{}", spooky::ops::status::render(&status));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spooky status: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &RunArgs) -> ExitCode {
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
    let log_reloader = match spooky::ops::telemetry::init(&config.log.level, config.log.format) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spooky: {e}");
            return ExitCode::from(1);
        }
    };
    match serve(config, args, log_reloader) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("spooky: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn serve(
    config: Config,
    args: &RunArgs,
    log_reloader: spooky::ops::telemetry::LevelReloader,
) -> Result<()> {
    let opts = spooky::app::RunOptions {
        workers: args.workers,
        iface: args.iface.clone(),
        pin: !args.no_pin,
    };
    let running = spooky::app::start_from(config, &opts, Some(args.config.clone()))
        .context("cannot start")?;
    running.reloader().set_log_reloader(log_reloader);
    tracing::info!(listen = %running.local_addr, "spooky is serving HTTP/3");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
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
            }
        }
        anyhow::Ok(())
    })?;
    running.begin_shutdown();
    running.join()?;
    tracing::info!("stopped");
    Ok(())
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
