//! Logging setup: `tracing` with the level from the config, `RUST_LOG` overriding it, and
//! text or JSON output on stderr. The level can be changed later (configuration reload).

use crate::config::LogFormat;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Changes the log filter of a running process.
pub type LevelReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `level` (and over later
/// reloads). Returns the function that changes the level.
///
/// # Errors
/// A message when the filter does not parse or a subscriber is already installed.
pub fn init(level: &str, format: LogFormat) -> Result<LevelReloader, String> {
    let from_env = std::env::var("RUST_LOG").ok().filter(|e| !e.is_empty());
    let filter = EnvFilter::try_new(from_env.as_deref().unwrap_or(level))
        .map_err(|e| format!("log filter: {e}"))?;
    let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
    // Colour only for a terminal: a file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json())
            .try_init(),
    };
    result.map_err(|e| e.to_string())?;
    Ok(Box::new(move |level: &str| {
        if from_env.is_some() {
            tracing::info!("RUST_LOG is set: the configured log level is not applied");
            return Ok(());
        }
        let filter = EnvFilter::try_new(level).map_err(|e| format!("log filter: {e}"))?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}
