//! `tally-agent --config FILE`: see the library docs.
use clap::Parser;

fn main() -> anyhow::Result<()> {
    tally_runtime::telemetry::init();
    let args = tally_agent::Args::parse();
    // One worker: the agent is mostly idle and must stay small (file reading runs on
    // the blocking pool, librdkafka on its own threads).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(tally_agent::run(args))?;
    Ok(())
}
