//! `tally-server`: the standalone server (embedded store).
use clap::Parser;

/// mimalloc: the sink allocates and frees about ten blocks per event, many freed on
/// another thread than the one that made them, where it spends far less than the
/// system allocator (measured by `make bench`, scale-out part).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally_runtime::telemetry::init();
    tally_server::server::run(tally_server::server::Args::parse()).await
}
