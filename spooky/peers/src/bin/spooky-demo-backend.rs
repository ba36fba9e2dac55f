//! `spooky-demo-backend --listen 127.0.0.1:7001 --id demo-1`: the HTTP/2 (h2c) demo backend
//! that `cargo xtask quickstart` starts; see `spooky::demo` for its routes.

use clap::Parser;
use std::net::SocketAddr;

#[derive(Parser)]
#[command(about = "HTTP/2 cleartext demo backend for Spooky's quickstart and tests")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// Name returned in the `x-backend` header.
    #[arg(long, default_value = "demo")]
    id: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let opts = spooky_peers::demo::DemoOptions {
        id: args.id.clone(),
        goaway_every: None,
    };
    let server = spooky_peers::demo::spawn(args.listen, opts)?;
    eprintln!(
        "demo backend {} listening on {} (h2c)",
        args.id, server.addr
    );
    loop {
        std::thread::park();
    }
}
