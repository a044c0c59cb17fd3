//! One logging set-up for every binary.
use tracing_subscriber::EnvFilter;

/// Logs to stdout, filtered by `RUST_LOG` (default `info`), without module targets;
/// colours only on a terminal (a pod's log or a file gets plain text).
pub fn init() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}
