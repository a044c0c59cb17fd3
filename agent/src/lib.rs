//! `tally-agent`: runs collectors, keeps what they produce in a bounded disk spool,
//! and ships it to Kafka or the ingest API.
//!
//! Data flow and the exactly-once argument:
//! 1. A collector step produces an [`Output`](tally_collectors::Output): events with
//!    deterministic ids plus checkpoint changes.
//! 2. [`spool::Spool::commit`] stores both in one SQLite transaction. Only then does
//!    the collector take its next step. A crash before the commit loses nothing (the
//!    collector redoes the step from its old checkpoint, with the same ids).
//! 3. The shipper ([`ship`]) sends spooled events and deletes them after the sink
//!    acknowledged them. A crash in between re-sends them; the pipeline deduplicates
//!    by (namespace, source, id).
//!
//! Configuration: `--config FILE` ([`AgentConfig`], the form the operator renders),
//! re-read when its content changes (checked every 2 s; a ConfigMap update swaps a
//! symlink, which a content check sees). An invalid new configuration is logged and
//! the running one kept. `--scope node|cluster` runs only node- or cluster-scoped
//! collectors (the DaemonSet and the cluster agent); by default all run.
//!
//! With `--lease-name`, cluster-scoped collectors run only while this replica holds
//! the Lease (leader election by `kube-lease-manager`); node-scoped ones always run.
//! A graceful stop releases the Lease, so a standby takes over at once.
//!
//! Shutdown (SIGTERM/SIGINT): collectors stop, then the shipper delivers what is
//! spooled for up to 10 s; the rest stays in the spool for the next start.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tally_crds::collector::{AgentConfig, Scope};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

pub mod error;
pub mod metrics;
pub mod pods;
pub mod run;
pub mod ship;
pub mod spool;

pub use error::{Error, Result};

/// How long the shipper keeps delivering after a stop signal.
const DRAIN: Duration = Duration::from_secs(10);

/// Command-line arguments.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "tally-agent",
    version,
    about = "Runs tally collectors and ships their usage events"
)]
pub struct Args {
    /// The configuration file (YAML).
    #[arg(long, env = "TALLY_AGENT_CONFIG")]
    pub config: PathBuf,
    /// This node's name (from the downward API in a DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Run only node-scoped or only cluster-scoped collectors.
    #[arg(long, value_parser = ["node", "cluster"])]
    pub scope: Option<String>,
    /// Run cluster-scoped collectors only while holding this Lease (for a cluster
    /// agent with more than one replica).
    #[arg(long, env = "TALLY_AGENT_LEASE")]
    pub lease_name: Option<String>,
    /// Namespace of the Lease (the agent's own, from the downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long the Lease holds without renewal (seconds): a crashed leader's
    /// successor starts within about this long.
    #[arg(long, env = "TALLY_AGENT_LEASE_SECS", default_value_t = 15)]
    pub lease_secs: u64,
    /// Overrides the configuration's `spool.path`: runs a configuration rendered for a
    /// pod (where the spool is a mounted volume) somewhere else, e.g. on a host.
    #[arg(long, env = "TALLY_AGENT_SPOOL")]
    pub spool: Option<PathBuf>,
    /// Overrides the configuration's `metricsListen` (host:port).
    #[arg(long, env = "TALLY_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

impl Args {
    /// Reads the configuration file and applies this command line's overrides.
    fn config(&self) -> Result<(AgentConfig, String)> {
        let (mut cfg, text) = load_config(&self.config)?;
        if let Some(spool) = &self.spool {
            cfg.spool.path = spool.display().to_string();
        }
        if let Some(listen) = &self.metrics_listen {
            cfg.metrics_listen = listen.clone();
        }
        Ok((cfg, text))
    }
}

/// Reads and validates a configuration file; errors name the file and the field.
pub fn load_config(path: &Path) -> Result<(AgentConfig, String)> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
        path: path.display().to_string(),
        source,
    })?;
    let bad = |message: String| Error::Config {
        path: path.display().to_string(),
        message,
    };
    let cfg: AgentConfig = serde_yaml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok((cfg, text))
}

/// Runs the agent until a stop signal.
pub async fn run(args: Args) -> Result<()> {
    let (mut cfg, mut text) = args.config()?;
    let scope = match args.scope.as_deref() {
        Some("node") => Some(Scope::Node),
        Some("cluster") => Some(Scope::Cluster),
        _ => None,
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let listen = cfg.metrics_listen.clone();
    serve_metrics(&listen, registry).await?;
    let spool = Arc::new(spool::Spool::open(
        Path::new(&cfg.spool.path),
        cfg.spool.max_bytes,
    )?);
    tracing::info!(spool = %cfg.spool.path, undelivered = spool.len(), "Spool open");
    let wake = Arc::new(Notify::new());
    let mut pod_cache: Option<pods::PodCache> = None;
    let mut terminate = std::pin::pin!(tally_runtime::shutdown::signal());
    // Without a Lease this replica always leads; with one, kube-lease-manager's task
    // reports leadership and releases the Lease when the receiver is dropped.
    let (_always, mut leader) = watch::channel(args.lease_name.is_none());
    let mut lease_task = None;
    if let Some(name) = &args.lease_name {
        let (rx, task) = campaign(&args, name).await?;
        leader = rx;
        lease_task = Some(task);
    }
    loop {
        let leading = *leader.borrow_and_update();
        let collectors: Vec<_> = run::selected(&cfg.collectors, scope)
            .into_iter()
            .filter(|c| leading || c.spec.source().is_ok_and(|s| s.scope() == Scope::Node))
            .collect();
        if pod_cache.is_none()
            && let Some(c) = collectors.iter().find(|c| run::needs_pods(c))
        {
            let needed_by = format!("{}/{}", c.namespace, c.name);
            let node = args.node_name.clone().ok_or_else(|| Error::NodeName {
                needed_by: needed_by.clone(),
            })?;
            let client = kube::Client::try_default()
                .await
                .map_err(|source| Error::Kube { needed_by, source })?;
            pod_cache = Some(pods::PodCache::start(client, &node));
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let ctx = run::Shared {
            spool: spool.clone(),
            metrics: metrics.clone(),
            wake: wake.clone(),
            stop: stop_rx.clone(),
            pods: pod_cache
                .clone()
                .unwrap_or_else(|| pods::PodCache::fixed(Vec::new())),
            node: args.node_name.clone(),
            http: reqwest::Client::new(),
        };
        let mut tasks = JoinSet::new();
        run::start(&collectors, &ctx, &mut tasks)?;
        let sink = ship::Sink::new(&cfg.sink)?;
        tasks.spawn(ship::run(
            spool.clone(),
            sink,
            ship::Sink::batch_events(&cfg.sink),
            metrics.clone(),
            wake.clone(),
            stop_rx,
            DRAIN,
        ));
        tracing::info!(
            collectors = collectors.len(),
            leading = leading,
            "Agent running"
        );
        let reload = loop {
            tokio::select! {
                _ = &mut terminate => break None,
                Ok(()) = leader.changed() => {
                    if *leader.borrow() {
                        tracing::info!(lease = ?args.lease_name, "Leading: starting the cluster-scoped collectors");
                    } else {
                        tracing::warn!(lease = ?args.lease_name, "Lost the Lease: stopping the cluster-scoped collectors");
                    }
                    break Some((cfg.clone(), text.clone()));
                }
                Some(res) = tasks.join_next() => {
                    if let Ok(Err(e)) = res {
                        tracing::error!(error = %e, "A collector or the shipper stopped; stopping the agent");
                        let _ = stop_tx.send(true);
                        while tasks.join_next().await.is_some() {}
                        return Err(e);
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(2)) => {
                    match changed_config(&args, &text) {
                        Some(Ok(new)) => break Some(new),
                        Some(Err(e)) => tracing::error!(error = %e, "New configuration is invalid; keeping the running one"),
                        None => {}
                    }
                }
            }
        };
        // Collectors stop at once; the shipper delivers what it can for DRAIN.
        let _ = stop_tx.send(true);
        while let Some(res) = tasks.join_next().await {
            match res {
                Ok(r) => r?,
                Err(e) => tracing::error!(error = %e, "An agent task panicked"),
            }
        }
        match reload {
            None => {
                // Dropping the receiver releases the Lease, so a standby takes over at once.
                drop(leader);
                if let Some(task) = lease_task {
                    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
                }
                tracing::info!(undelivered = spool.len(), "Agent stopped");
                return Ok(());
            }
            Some((new, new_text)) => {
                if new.metrics_listen != listen || new.spool != cfg.spool {
                    tracing::warn!(
                        "metricsListen and spool changes take effect at the next restart"
                    );
                }
                tracing::info!("Configuration changed; collectors restarted");
                cfg = new;
                text = new_text;
            }
        }
    }
}

/// Joins the election for Lease `name` in `--lease-namespace` ([`tally_runtime::lease`]).
async fn campaign(
    args: &Args,
    name: &str,
) -> Result<(
    watch::Receiver<bool>,
    tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
)> {
    let kube_err = |source| Error::Kube {
        needed_by: format!("leader election (Lease {name})"),
        source,
    };
    let client = kube::Client::try_default().await.map_err(kube_err)?;
    let lease = tally_runtime::lease::Lease {
        namespace: args.lease_namespace.clone(),
        name: name.to_string(),
        identity: tally_runtime::lease::identity(args.identity.clone()),
        secs: args.lease_secs,
        field_manager: "tally-agent-lease".into(),
    };
    tally_runtime::lease::campaign(client, &lease)
        .await
        .map_err(|e| Error::Lease {
            lease: format!("{}/{name}", args.lease_namespace),
            message: e.to_string(),
        })
}

fn changed_config(args: &Args, current: &str) -> Option<Result<(AgentConfig, String)>> {
    let text = std::fs::read_to_string(&args.config).ok()?;
    (text != current).then(|| args.config())
}

async fn serve_metrics(listen: &str, registry: Registry) -> Result<()> {
    let addr: SocketAddr = listen.parse().map_err(|e| Error::Config {
        path: "metricsListen".into(),
        message: format!("{listen:?} is not a host:port address: {e}"),
    })?;
    let encode = move || {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    };
    tally_runtime::admin::serve("agent metrics", addr, encode)
        .await
        .map_err(|source| Error::Listen {
            addr: listen.to_string(),
            source,
        })?;
    Ok(())
}
