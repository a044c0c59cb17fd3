//! `tally-server` wiring: arguments, the store, manifest loading and reload, the HTTP
//! server and graceful shutdown.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::api::{self, AppState, Catalog, Limits};
use crate::engine::CompiledMeter;
use crate::manifests;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::embedded::{EmbeddedConfig, EmbeddedStore};

/// tally-server: ingest CloudEvents, meter them, answer usage queries.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Folder of the embedded store.
    #[arg(long, env = "TALLY_DATA", default_value = "./data")]
    pub data: PathBuf,
    /// Folder of Meter manifests (YAML, as for `kubectl apply`), reloaded on change.
    #[arg(long, env = "TALLY_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// How often the manifests folder is checked for changes, in milliseconds.
    #[arg(long, env = "TALLY_RELOAD_INTERVAL_MS", default_value_t = 1000)]
    pub reload_interval_ms: u64,
    /// Largest request body in bytes.
    #[arg(long, env = "TALLY_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Bytes of ingest request bodies in flight at once; beyond it requests get 503.
    #[arg(long, env = "TALLY_INGEST_BUDGET_BYTES", default_value_t = 64 << 20)]
    pub ingest_budget_bytes: usize,
    /// Ingest requests that may wait for the store writer; beyond it requests get 503.
    #[arg(long, env = "TALLY_INGEST_QUEUE", default_value_t = 256)]
    pub ingest_queue: usize,
    /// Queries that may run at once; beyond it requests get 503.
    #[arg(long, env = "TALLY_MAX_CONCURRENT_QUERIES", default_value_t = 16)]
    pub max_concurrent_queries: usize,
    /// Most rows one query may return; larger answers are refused with 400.
    #[arg(long, env = "TALLY_MAX_QUERY_ROWS", default_value_t = crate::query::DEFAULT_MAX_ROWS)]
    pub max_query_rows: usize,
    /// SQLite durability: `normal` survives process crashes, `full` also power loss.
    #[arg(long, env = "TALLY_SQLITE_SYNC", default_value = "normal", value_parser = ["normal", "full"])]
    pub sqlite_sync: String,
}

/// Runs the standalone server until SIGINT/SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = EmbeddedConfig::new(&args.data);
    config.queue_capacity = args.ingest_queue;
    config.sync_full = args.sqlite_sync == "full";
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(config).with_context(|| {
        format!(
            "failed to open the embedded store in {}",
            args.data.display()
        )
    })?);
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        ingest_budget_bytes: args.ingest_budget_bytes,
        max_concurrent_queries: args.max_concurrent_queries,
        max_query_rows: args.max_query_rows,
    };
    let state = AppState::new(store.clone(), limits, Arc::new(Metrics::default()));
    if let Some(dir) = args.manifests.clone() {
        let served = reload(&dir, &store, &state, Vec::new()).await?;
        tracing::info!(dir = %dir.display(), meters = served.len(), "Loaded meter manifests");
        tokio::spawn(watch(
            dir,
            store.clone(),
            state.clone(),
            served,
            Duration::from_millis(args.reload_interval_ms.max(50)),
        ));
    } else {
        tracing::warn!("No --manifests folder: no meters are served (events are still stored)");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    if !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "Listening beyond loopback without authentication");
    }
    tracing::info!(listen = %listener.local_addr()?, data = %args.data.display(), store = store.kind(), "tally-server ready");
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown())
        .await?;
    tracing::info!("tally-server stopped");
    Ok(())
}

/// Loads the manifests, syncs the store (backfilling new meters), publishes the meters
/// and drops stale rollups. Returns the meters now served.
async fn reload(
    dir: &std::path::Path,
    store: &Arc<dyn Store>,
    state: &AppState,
    previous: Vec<Arc<CompiledMeter>>,
) -> anyhow::Result<Vec<Arc<CompiledMeter>>> {
    let (dir, store2) = (dir.to_path_buf(), store.clone());
    let (synced, meters) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let (meters, errors) = manifests::load(&dir, &previous);
        for e in &errors {
            tracing::warn!(problem = %e, "Invalid meter manifest skipped");
        }
        let synced = store2.sync_meters(meters.clone())?;
        Ok((synced, meters))
    })
    .await??;
    let stale = synced.stale.clone();
    state.publish(Catalog::new(synced.meters));
    if !stale.is_empty() {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.drop_rollups(stale)).await??;
    }
    Ok(meters)
}

async fn watch(
    dir: PathBuf,
    store: Arc<dyn Store>,
    state: AppState,
    mut served: Vec<Arc<CompiledMeter>>,
    every: Duration,
) {
    let mut last = manifests::fingerprint(&dir);
    loop {
        tokio::time::sleep(every).await;
        let now = manifests::fingerprint(&dir);
        if now == last {
            continue;
        }
        last = now;
        match reload(&dir, &store, &state, served.clone()).await {
            Ok(meters) => {
                tracing::info!(meters = meters.len(), "Reloaded meter manifests");
                served = meters;
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "Failed to reload meter manifests; the previous meters stay"
            ),
        }
    }
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
