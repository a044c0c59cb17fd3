//! `tally-server` wiring: arguments, the store, manifest loading and reload, the HTTP
//! server and graceful shutdown.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::api::{self, AppState, Limits};
use crate::catalog::{self, manifests};
use crate::metrics::{Metrics, ReloadLabels};
use std::sync::atomic::{AtomicBool, Ordering};

use tally_clickhouse::Ch;
use tally_clickhouse::sink::{SinkConfig, SinkStats};
use tally_clickhouse::store::ClickHouseStore;
use tally_embedded::{EmbeddedConfig, EmbeddedStore};
use tally_kafka::{KafkaConfig, Producer};
use tally_meter::engine::CompiledMeter;
use tally_meter::store::Store;

/// tally-server: ingest CloudEvents, meter them, answer usage queries.
///
/// Standalone (default): an embedded store in `--data`. Scale-out: `--kafka` and
/// `--clickhouse` (ingest goes to Kafka, queries read ClickHouse), plus `tally-server sink`
/// loading Kafka into ClickHouse.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// `sink`: run the Kafka → ClickHouse sink instead of the HTTP server.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Kafka (brokers, topic, security).
    #[command(flatten)]
    pub kafka: tally_kafka::KafkaArgs,
    /// How long ingest waits for Kafka to acknowledge before answering 503, in ms.
    #[arg(
        long,
        env = "TALLY_KAFKA_TIMEOUT_MS",
        default_value_t = 10_000,
        global = true
    )]
    pub kafka_timeout_ms: u64,
    /// ClickHouse (URL, database, credentials).
    #[command(flatten)]
    pub clickhouse: tally_clickhouse::args::ChArgs,
    /// Create the topic, schema and the rollups (with exact backfill) of the meters in
    /// `--manifests`, and drop rollups of removed meters. In a cluster the operator does this.
    #[arg(long, env = "TALLY_PROVISION")]
    pub provision: bool,
    /// The cutover of new rollups.
    #[command(flatten)]
    pub cutover: tally_clickhouse::args::CutoverArgs,
    /// Address to listen on.
    #[arg(long, env = "TALLY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Bearer tokens of the API (YAML: `tokens: [{name, token, namespaces: [...]}]`),
    /// re-read when a file changes; repeat it to merge files. Without one the API is
    /// open, which is allowed only on a loopback address (or with
    /// --allow-unauthenticated).
    #[arg(long, env = "TALLY_TOKENS_FILE", value_delimiter = ',')]
    pub tokens_file: Vec<PathBuf>,
    /// Keys of the customer-facing portal tokens (YAML: `keys: [{id, secret}]`; the
    /// first signs, every one verifies; secrets of at least 32 characters). Without it
    /// portal tokens are off (their routes answer 501).
    #[arg(long, env = "TALLY_PORTAL_KEYS_FILE")]
    pub portal_keys_file: Option<PathBuf>,
    /// Browser origins allowed to call the portal route (CORS), comma-separated, or `*`.
    #[arg(long, env = "TALLY_PORTAL_CORS_ORIGINS", value_delimiter = ',')]
    pub portal_cors_origins: Vec<String>,
    /// How often the UsageBudgets of `--manifests` are evaluated, in milliseconds
    /// (standalone server).
    #[arg(long, env = "TALLY_BUDGET_INTERVAL_MS", default_value_t = 2_000)]
    pub budget_interval_ms: u64,
    /// Where budgets' webhook Secrets are, as mounted Secrets would be:
    /// DIR/<namespace>/<secret name>/url and …/secret.
    #[arg(long, env = "TALLY_BUDGET_SECRETS_DIR")]
    pub budget_secrets_dir: Option<PathBuf>,
    /// Let budget webhooks go to any URL (default: https, or http to in-cluster
    /// Services only).
    #[arg(long, env = "TALLY_BUDGET_WEBHOOK_ANY_URL")]
    pub budget_webhook_any_url: bool,
    /// Tests only: the budgets' clock reads Unix milliseconds from this file.
    #[arg(long, env = "TALLY_BUDGET_CLOCK_FILE", hide = true)]
    pub budget_clock_file: Option<PathBuf>,
    /// Serve without tokens beyond loopback (something else must guard the port).
    #[arg(long, env = "TALLY_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// Folder of the embedded store.
    #[arg(long, env = "TALLY_DATA", default_value = "./data")]
    pub data: PathBuf,
    /// Folder of Meter manifests (YAML, as for `kubectl apply`), reloaded on change.
    #[arg(long, env = "TALLY_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Serve the Meters of the Kubernetes API that the operator made Ready (KUBECONFIG or
    /// in-cluster config) instead of `--manifests`. Needs `--clickhouse`.
    #[arg(long, env = "TALLY_KUBERNETES", conflicts_with = "manifests")]
    pub kubernetes: bool,
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
    #[arg(long, env = "TALLY_MAX_QUERY_ROWS", default_value_t = tally_meter::query::DEFAULT_MAX_ROWS)]
    pub max_query_rows: usize,
    /// SQLite durability: `normal` survives process crashes, `full` also power loss.
    #[arg(long, env = "TALLY_SQLITE_SYNC", default_value = "normal", value_parser = ["normal", "full"])]
    pub sqlite_sync: String,
}

/// Subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Load events from Kafka into ClickHouse, exactly once (needs --kafka and --clickhouse).
    Sink(SinkArgs),
}

/// `tally-server sink` settings.
#[derive(clap::Args, Debug, Clone)]
pub struct SinkArgs {
    /// Kafka consumer group.
    #[arg(long, env = "TALLY_SINK_GROUP", default_value = "tally-sink")]
    pub group: String,
    /// Insert a batch at this many messages.
    #[arg(long, env = "TALLY_SINK_BATCH_ROWS", default_value_t = 50_000)]
    pub batch_rows: usize,
    /// Insert a batch at this many payload bytes.
    #[arg(long, env = "TALLY_SINK_BATCH_BYTES", default_value_t = 32 << 20)]
    pub batch_bytes: usize,
    /// Insert a non-empty batch after this many milliseconds (sooner once every
    /// partition is read to its end and the batch holds a quarter of --batch-rows).
    #[arg(long, env = "TALLY_SINK_BATCH_MS", default_value_t = 1000)]
    pub batch_ms: u64,
    /// Deduplicate by (namespace, source, id) within this many days of ingestion.
    #[arg(long, env = "TALLY_DEDUP_WINDOW_DAYS", default_value_t = 32)]
    pub dedup_window_days: u64,
    /// Memory for recent identities, MiB; older ones are looked up in ClickHouse.
    #[arg(long, env = "TALLY_DEDUP_MEMORY_MIB", default_value_t = 64)]
    pub dedup_memory_mib: usize,
    /// Where the sink serves `/metrics` and `/healthz`.
    #[arg(
        long,
        env = "TALLY_SINK_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,
    /// Exit with an error after failing on one batch for this many seconds.
    #[arg(long, env = "TALLY_SINK_MAX_RETRY_SECS", default_value_t = 300)]
    pub max_retry_secs: u64,
}

impl Args {
    fn kafka_config(&self, brokers: &str) -> KafkaConfig {
        let mut k = self.kafka.config(brokers);
        k.message_timeout_ms = self.kafka_timeout_ms;
        k
    }
}

/// Runs the sink until SIGINT/SIGTERM.
async fn run_sink(args: &Args, sink: &SinkArgs) -> anyhow::Result<()> {
    let (Some(brokers), Some(url)) = (&args.kafka.brokers, &args.clickhouse.url) else {
        anyhow::bail!("tally-server sink needs --kafka BROKERS and --clickhouse URL");
    };
    let kafka = args.kafka_config(brokers);
    kafka
        .ensure_topic(args.kafka.topic_partitions, 1)
        .await
        .with_context(|| format!("failed to reach Kafka at {brokers}"))?;
    let mut cfg = SinkConfig::new(kafka, args.clickhouse.config(url));
    cfg.group = sink.group.clone();
    cfg.batch_rows = sink.batch_rows.max(1);
    cfg.batch_bytes = sink.batch_bytes.max(1);
    cfg.batch_wait = Duration::from_millis(sink.batch_ms.max(1));
    cfg.dedup_window = Duration::from_secs(sink.dedup_window_days * 86400);
    cfg.dedup_memory_bytes = sink.dedup_memory_mib << 20;
    cfg.grace_secs = args.cutover.grace_secs;
    cfg.max_retry = Duration::from_secs(sink.max_retry_secs);
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(SinkStats::default());
    let encode = {
        let stats = stats.clone();
        move || stats.encode()
    };
    tally_runtime::admin::serve("sink metrics", sink.metrics_listen, encode)
        .await
        .with_context(|| format!("failed to listen on {} for metrics", sink.metrics_listen))?;
    let worker = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("tally-sink".into())
            .spawn(move || tally_clickhouse::sink::run(cfg, stats, stop))?
    };
    let stopped = tokio::task::spawn_blocking(move || worker.join());
    tokio::pin!(stopped);
    tokio::select! {
        r = &mut stopped => return Ok(r?.map_err(|_| anyhow::anyhow!("the sink thread panicked"))??),
        () = tally_runtime::shutdown::signal() => {}
    }
    tracing::info!("Stopping the sink after the batch in hand");
    stop.store(true, Ordering::SeqCst);
    Ok(stopped
        .await?
        .map_err(|_| anyhow::anyhow!("the sink thread panicked"))??)
}

/// Creates tally's tables, retrying for up to a minute what ClickHouse says is
/// transient (a server still starting, a dropped connection, a cluster's DDL queue
/// catching up); a wrong set-up fails at once.
async fn ensure_schema(ch: &Ch) -> tally_meter::Result<()> {
    use tally_clickhouse::sink::retry;
    let (start, mut backoff) = (std::time::Instant::now(), retry::Backoff::default());
    loop {
        let Err(e) = ch.ensure_schema().await else {
            return Ok(());
        };
        let transient = retry::classify(&retry::chain(&e)) == retry::Class::Transient;
        if !transient || start.elapsed() > Duration::from_secs(60) {
            return Err(e);
        }
        let delay = backoff.delay();
        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Failed to create tally's tables; retrying");
        tokio::time::sleep(delay).await;
    }
}

/// Runs the server (or the sink) until SIGINT/SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Command::Sink(sink)) = &args.command {
        return run_sink(&args, sink).await;
    }
    // the embedded store also keeps the budgets' crossing records
    let mut ledger: Option<Arc<dyn tally_meter::budget::BudgetLedger>> = None;
    let store: Arc<dyn Store> = match &args.clickhouse.url {
        Some(url) => {
            let ch = Ch::new(&args.clickhouse.config(url))?;
            let producer = match &args.kafka.brokers {
                Some(brokers) => {
                    let kafka = args.kafka_config(brokers);
                    if args.provision {
                        kafka
                            .ensure_topic(args.kafka.topic_partitions, 1)
                            .await
                            .with_context(|| format!("failed to reach Kafka at {brokers}"))?;
                    }
                    Some(Arc::new(Producer::new(&kafka)?))
                }
                None => {
                    tracing::warn!("No --kafka: this server answers queries but cannot ingest");
                    None
                }
            };
            if args.provision {
                ensure_schema(&ch)
                    .await
                    .with_context(|| format!("failed to set up ClickHouse at {url}"))?;
            }
            Arc::new(ClickHouseStore::new(
                ch,
                producer,
                args.provision,
                args.cutover.config(),
            ))
        }
        None => {
            if args.kafka.brokers.is_some() {
                anyhow::bail!(
                    "--kafka needs --clickhouse URL (the sink loads Kafka into ClickHouse, where queries read)"
                );
            }
            let mut config = EmbeddedConfig::new(&args.data);
            config.queue_capacity = args.ingest_queue;
            config.sync_full = args.sqlite_sync == "full";
            let embedded = Arc::new(EmbeddedStore::open(config).with_context(|| {
                format!(
                    "failed to open the embedded store in {}",
                    args.data.display()
                )
            })?);
            ledger = Some(embedded.clone());
            embedded
        }
    };
    let limits = Limits {
        max_body_bytes: args.max_body_bytes,
        ingest_budget_bytes: args.ingest_budget_bytes,
        max_concurrent_queries: args.max_concurrent_queries,
        max_query_rows: args.max_query_rows,
    };
    let metrics = Arc::new(Metrics::default());
    let mut auth = authentication(&args, &metrics)?;
    if let Some(path) = &args.portal_keys_file {
        let keys = api::portal::PortalKeys::load(path).map_err(|e| anyhow::anyhow!(e))?;
        tracing::info!(file = %path.display(), ?keys, "Portal tokens on");
        auth = auth.with_portal(keys);
    }
    let mut state = AppState::new(store.clone(), limits, metrics.clone()).with_auth(auth);
    if !args.portal_cors_origins.is_empty() {
        let cors = api::portal::cors(&args.portal_cors_origins).map_err(|e| anyhow::anyhow!(e))?;
        state = state.with_portal_cors(cors);
    }
    if args.kubernetes {
        let Some(url) = &args.clickhouse.url else {
            anyhow::bail!(
                "--kubernetes needs --clickhouse URL (the operator provisions meters in ClickHouse)"
            );
        };
        let client = kube::Client::try_default()
            .await
            .context("failed to configure the Kubernetes client (KUBECONFIG or in-cluster)")?;
        let ch = Ch::new(&args.clickhouse.config(url))?;
        state = state.with_kube(client.clone());
        tokio::spawn(catalog::kubernetes::serve_meters(
            client,
            ch,
            store.clone(),
            state.clone(),
        ));
    } else if let Some(dir) = args.manifests.clone() {
        let (served, _) = reload(&dir, &store, &state, Vec::new()).await?;
        tracing::info!(dir = %dir.display(), meters = served.len(), "Loaded meter manifests");
        let budgets = crate::budgets::load(&dir);
        match &ledger {
            Some(ledger) => crate::budgets::spawn(
                state.clone(),
                store.clone(),
                ledger.clone(),
                crate::budgets::BudgetConfig {
                    dir: dir.clone(),
                    interval: Duration::from_millis(args.budget_interval_ms.max(50)),
                    secrets_dir: args.budget_secrets_dir.clone(),
                    any_url: args.budget_webhook_any_url,
                    clock_file: args.budget_clock_file.clone(),
                },
            ),
            None if !budgets.is_empty() => tracing::warn!(
                budgets = budgets.len(),
                "UsageBudgets in --manifests are evaluated only by the standalone server (embedded store) in this release; with --clickhouse they are not evaluated"
            ),
            None => {}
        }
        if !budgets.is_empty() {
            tracing::info!(budgets = budgets.len(), "Loaded UsageBudget manifests");
        }
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
    tracing::info!(data = %args.data.display(), store = store.kind(), "tally-server ready");
    tally_runtime::admin::announce("the API", listener.local_addr()?);
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(tally_runtime::shutdown::signal())
        .await?;
    tracing::info!("tally-server stopped");
    Ok(())
}

/// Loads the manifests, syncs the store (backfilling new meters), publishes the meters
/// and drops stale rollups. Returns the meters now served and how many manifests were
/// refused (those keep their previous definition, or are not served).
async fn reload(
    dir: &std::path::Path,
    store: &Arc<dyn Store>,
    state: &AppState,
    previous: Vec<Arc<CompiledMeter>>,
) -> anyhow::Result<(Vec<Arc<CompiledMeter>>, usize)> {
    let dir = dir.to_path_buf();
    let (meters, errors) =
        tokio::task::spawn_blocking(move || manifests::load(&dir, &previous)).await?;
    for e in &errors {
        tracing::warn!(problem = %e, "Invalid meter manifest skipped");
    }
    let (_, stale) = catalog::sync_and_publish(store, state, meters.clone()).await?;
    if !stale.is_empty() {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.drop_rollups(stale)).await??;
    }
    Ok((meters, errors.len()))
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
        // Files are written in steps (truncate, then write; an editor's save): reload
        // only once the folder stopped changing, or a half-written file would read as
        // a removed meter and its rewrite as a new one, slipping past the immutability
        // rules.
        tokio::time::sleep(every).await;
        if manifests::fingerprint(&dir) != now {
            continue;
        }
        last = now;
        let result = reload(&dir, &store, &state, served.clone()).await;
        let applied = matches!(result, Ok((_, 0)));
        state
            .metrics()
            .reloads
            .get_or_create(&ReloadLabels::new("meters", applied))
            .inc();
        match result {
            Ok((meters, refused)) => {
                tracing::info!(meters = meters.len(), refused, "Reloaded meter manifests");
                served = meters;
            }
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "Failed to reload meter manifests; the previous meters stay"
            ),
        }
    }
}

/// The API's authentication from `--tokens-file`; without one, only on loopback (or
/// when told `--allow-unauthenticated`), and the log says so.
fn authentication(args: &Args, metrics: &Metrics) -> anyhow::Result<api::auth::Auth> {
    use api::auth::Auth;
    let listen = args.listen;
    match args.tokens_file.as_slice() {
        [_, ..] => {
            let auth = Auth::from_files(
                args.tokens_file.clone(),
                Duration::from_secs(5),
                metrics.reloads.clone(),
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!(files = ?args.tokens_file, "API authentication: bearer tokens, each granted namespaces");
            Ok(auth)
        }
        [] if listen.ip().is_loopback() => {
            tracing::warn!(%listen, "No --tokens-file: the API accepts every request, which is allowed only because it listens on loopback");
            Ok(Auth::disabled())
        }
        [] if args.allow_unauthenticated => {
            tracing::warn!(%listen, "No --tokens-file and --allow-unauthenticated: the API accepts every request from anyone who reaches this address");
            Ok(Auth::disabled())
        }
        [] => anyhow::bail!(
            "tally-server would listen on {listen}, beyond loopback, without authentication: give --tokens-file FILE (tokens: [{{name, token, namespaces: [...]}}]), listen on 127.0.0.1, or pass --allow-unauthenticated when something else guards the port"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authentication_of(args: &Args) -> anyhow::Result<api::auth::Auth> {
        authentication(args, &Metrics::default())
    }

    fn args(list: &[&str]) -> Args {
        let mut all = vec!["tally-server"];
        all.extend_from_slice(list);
        Args::parse_from(all)
    }

    #[test]
    fn without_tokens_only_loopback_or_an_explicit_opt_out_is_served() {
        assert!(
            !authentication_of(&args(&["--listen", "127.0.0.1:8080"]))
                .unwrap()
                .enabled()
        );
        let e = authentication_of(&args(&["--listen", "0.0.0.0:8080"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--tokens-file") && e.contains("0.0.0.0:8080"),
            "{e}"
        );
        let opted_out = args(&["--listen", "0.0.0.0:8080", "--allow-unauthenticated"]);
        assert!(!authentication_of(&opted_out).unwrap().enabled());
    }

    #[tokio::test]
    async fn a_tokens_file_turns_authentication_on() {
        let dir = std::env::temp_dir().join(format!("tally-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens.yaml");
        std::fs::write(
            &file,
            "tokens: [{token: 0123456789abcdef, namespaces: [a]}]\n",
        )
        .unwrap();
        let a = args(&[
            "--listen",
            "0.0.0.0:8080",
            "--tokens-file",
            file.to_str().unwrap(),
        ]);
        assert!(authentication_of(&a).unwrap().enabled());
        std::fs::write(&file, "tokens: [{token: short, namespaces: [a]}]\n").unwrap();
        let e = authentication_of(&a).unwrap_err().to_string();
        assert!(e.contains("tokens[0].token"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
