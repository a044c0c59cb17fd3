//! `tally-agent --config FILE`: see the library docs.
use clap::Parser;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = tally_agent::Args::parse();
    // Two workers: the agent is mostly idle and must stay small.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(tally_agent::run(args))?;
    Ok(())
}
