//! The `spooky` command line: run the proxy, check a configuration, or fetch a URL over
//! HTTP/3. All the work is in the library; this file parses arguments and maps outcomes to
//! exit codes (0 ok, 1 invalid configuration or runtime failure, 2 cannot read the file).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use spooky::client::{Client, ClientOptions, Request};
use spooky::config::Config;
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
    /// Worker threads (default: the config's `workers`, else one per online CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Do not pin worker k to CPU k.
    #[arg(long)]
    no_pin: bool,
}

#[derive(Subcommand)]
enum Command {
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

fn run(args: &RunArgs) -> ExitCode {
    let config = match Config::from_path(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", args.config.display());
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    if let Err(e) = spooky::telemetry::init(&config.log.level, config.log.format) {
        eprintln!("spooky: {e}");
        return ExitCode::from(1);
    }
    match serve(config, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("spooky: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn serve(config: Config, args: &RunArgs) -> Result<()> {
    let opts = spooky::server::RunOptions {
        workers: args.workers,
        iface: args.iface.clone(),
        pin: !args.no_pin,
    };
    let running = spooky::server::start(config, &opts).context("cannot start")?;
    tracing::info!(listen = %running.local_addr, "spooky is serving HTTP/3");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: graceful shutdown"),
            _ = int.recv() => tracing::info!("SIGINT: graceful shutdown"),
        }
        anyhow::Ok(())
    })?;
    running.begin_shutdown();
    running.join().map_err(|e| anyhow::anyhow!(e))?;
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
