//! `tally-operator`: see the library docs.
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_runtime::telemetry::init();
    tally_operator::run(tally_operator::Args::parse()).await
}
