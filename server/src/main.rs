//! `tally-server`: the standalone server (embedded store).
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_runtime::telemetry::init();
    tally_server::server::run(tally_server::server::Args::parse()).await
}
