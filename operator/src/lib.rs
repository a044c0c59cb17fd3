//! tally-operator: the control plane of tally in a cluster.
//!
//! - Leader election over a Lease (`kube-lease-manager`): any number of replicas run;
//!   only the holder reconciles, a replica that loses the Lease stops its controllers
//!   before another can act, so two replicas are safe.
//! - Pipeline provisioning ([`pipeline`]): the Kafka topic and ClickHouse's tables,
//!   idempotent, retried with backoff; problems show on every Meter's conditions.
//! - The Meter controller ([`meter`]): rollups with exact backfill, status, finalizer.
//! - UsageBudgets ([`budget`]): evaluated by the leader, statuses, Events, the
//!   ResourceQuota of `enforce`, webhooks.
//! - The Collector controller ([`collector`]): the agents' ConfigMaps, DaemonSet,
//!   Deployment and RBAC ([`agents`]), and each Collector's status.
//! - `/metrics` and `/healthz` on `--metrics-listen`; SIGTERM/SIGINT stop it, releasing
//!   the Lease so a standby takes over at once.
#![forbid(unsafe_code)]
pub mod agents;
pub mod budget;
pub mod collector;
pub mod error;
pub mod meter;
pub mod metrics;
pub mod pipeline;
pub mod status;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use tally_clickhouse::Ch;
use tally_clickhouse::args::{ChArgs, CutoverArgs};
use tally_crds::Meter;

pub use error::{Error, Result};

/// The ClickHouse the operator uses without `--clickhouse`.
pub const LOCAL_CLICKHOUSE: &str = "http://127.0.0.1:8123";

/// tally-operator: reconciles Meters into ClickHouse rollups and provisions the pipeline.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// ClickHouse (URL, default http://127.0.0.1:8123; database; credentials).
    #[command(flatten)]
    pub clickhouse: ChArgs,
    /// Kafka (brokers: when set, the events topic is provisioned; topic; security).
    #[command(flatten)]
    pub kafka: tally_kafka::KafkaArgs,
    /// Replication factor of the events topic when created.
    #[arg(long, env = "TALLY_TOPIC_REPLICATION", default_value_t = 1)]
    pub topic_replication: i32,
    /// Retention of the events topic when created, hours (0: the broker's default).
    #[arg(long, env = "TALLY_TOPIC_RETENTION_HOURS", default_value_t = 168)]
    pub topic_retention_hours: i64,
    /// The cutover of new rollups.
    #[command(flatten)]
    pub cutover: CutoverArgs,
    /// How long a replaced rollup keeps existing after the swap, seconds.
    #[arg(long, env = "TALLY_ROLLUP_DRAIN_SECS", default_value_t = 60)]
    pub rollup_drain_secs: u64,
    /// How often a ready meter is re-checked (reads only), seconds.
    #[arg(long, env = "TALLY_RESYNC_SECS", default_value_t = 300)]
    pub resync_secs: u64,
    /// How often Collector statuses are refreshed without a change (the newest event
    /// time from ClickHouse, referenced Secrets re-read), seconds.
    #[arg(long, env = "TALLY_COLLECTOR_STATUS_SECS", default_value_t = 30)]
    pub collector_status_secs: u64,
    /// How often UsageBudgets are evaluated, seconds.
    #[arg(long, env = "TALLY_BUDGET_INTERVAL_SECS", default_value_t = 3)]
    pub budget_interval_secs: u64,
    /// Meters reconciled at once.
    #[arg(long, env = "TALLY_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "tally-system")]
    pub namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "TALLY_LEASE_NAME", default_value = "tally-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: pod name or host name + pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Lease duration, seconds: how long a crashed leader blocks a standby.
    #[arg(long, env = "TALLY_LEASE_SECS", default_value_t = 15)]
    pub lease_secs: u64,
    /// The image the agents run (it holds every tally binary).
    #[arg(long, env = "TALLY_AGENT_IMAGE", default_value = "tally:latest")]
    pub agent_image: String,
    /// Where agents send events: the server's ingest URL. Without it, agents produce to
    /// `--kafka`; with neither, no agents are deployed.
    #[arg(long, env = "TALLY_AGENT_INGEST_URL")]
    pub agent_ingest_url: Option<String>,
    /// Secret in --namespace whose key `token` the agents send to the ingest API (mounted,
    /// never copied into the configuration). Needed when the server requires tokens.
    #[arg(long, env = "TALLY_AGENT_INGEST_TOKEN_SECRET")]
    pub agent_ingest_token_secret: Option<String>,
    /// Do not create or delete the agents' ServiceAccounts and RBAC (the Helm chart
    /// installs them, so the operator needs no permission to write RBAC).
    #[arg(long, env = "TALLY_NO_AGENT_RBAC")]
    pub no_agent_rbac: bool,
    /// Size of the cluster agent's spool PersistentVolumeClaim (set when the claim is
    /// created; an existing claim is never changed).
    #[arg(long, env = "TALLY_CLUSTER_AGENT_SPOOL_SIZE", default_value = "2Gi")]
    pub cluster_agent_spool_size: String,
    /// StorageClass of that claim (default: the cluster's default StorageClass).
    #[arg(long, env = "TALLY_CLUSTER_AGENT_STORAGE_CLASS")]
    pub cluster_agent_storage_class: Option<String>,
    /// Host folder of the node agent's spool.
    #[arg(
        long,
        env = "TALLY_AGENT_SPOOL_HOST_PATH",
        default_value = "/var/lib/tally-agent"
    )]
    pub agent_spool_host_path: String,
    /// Where `/metrics` and `/healthz` are served.
    #[arg(long, env = "TALLY_METRICS_LISTEN", default_value = "127.0.0.1:9466")]
    pub metrics_listen: SocketAddr,
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("failed to configure the Kubernetes client (KUBECONFIG or in-cluster)")?;
    let metrics = Arc::new(metrics::Metrics::default());
    let served = metrics.clone();
    tally_runtime::admin::serve("operator metrics", args.metrics_listen, move || {
        served.encode()
    })
    .await
    .with_context(|| format!("failed to listen on {} for metrics", args.metrics_listen))?;

    let me = tally_runtime::lease::identity(args.identity.clone());
    let lease = tally_runtime::lease::Lease {
        namespace: args.namespace.clone(),
        name: args.lease_name.clone(),
        identity: me.clone(),
        secs: args.lease_secs,
        field_manager: format!("{}-lease", meter::FIELD_MANAGER),
    };
    let (mut leading, lease_task) = tally_runtime::lease::campaign(client.clone(), &lease)
        .await
        .with_context(|| {
            format!(
                "failed to set up the leader Lease {}/{}",
                args.namespace, args.lease_name
            )
        })?;
    tracing::info!(identity = %me, lease = %format!("{}/{}", args.namespace, args.lease_name), "tally-operator started; waiting for leadership");
    let stop = tally_runtime::shutdown::signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            r = leading.wait_for(|l| *l) => { r.context("the Lease task stopped")?; }
        }
        tracing::info!(identity = %me, "Leading: starting the controllers");
        metrics.leader.set(1);
        let work = lead(client.clone(), args.clone(), metrics.clone(), me.clone());
        tokio::pin!(work);
        let mut finished = false;
        tokio::select! {
            () = &mut stop => finished = true,
            r = leading.wait_for(|l| !*l) => {
                r.context("the Lease task stopped")?;
                tracing::warn!(identity = %me, "Lost the Lease: stopping the controllers");
            }
            r = &mut work => { r?; }
        }
        metrics.leader.set(0);
        if finished {
            break;
        }
    }
    tracing::info!("Stopping: releasing the Lease");
    drop(leading);
    let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
    Ok(())
}

/// What the leader runs: provisioning and the controllers (until dropped).
async fn lead(
    client: kube::Client,
    args: Args,
    metrics: Arc<metrics::Metrics>,
    me: String,
) -> anyhow::Result<()> {
    let url = args.clickhouse.url.as_deref().unwrap_or(LOCAL_CLICKHOUSE);
    let ch = Ch::new(&args.clickhouse.config(url))?;
    let kafka = args.kafka.brokers.as_ref().map(|brokers| {
        let mut k = args.kafka.config(brokers);
        k.retention_ms =
            (args.topic_retention_hours > 0).then(|| args.topic_retention_hours * 3_600_000);
        (k, args.kafka.topic_partitions, args.topic_replication)
    });
    let (health, changed) = pipeline::Health::new();
    let health = Arc::new(health);
    let provisioning = {
        let (ch, health) = (ch.clone(), health.clone());
        async move { pipeline::keep_provisioned(ch, kafka, &health).await }
    };
    let client_for_agents = client.clone();
    let ch_for_collectors = ch.clone();
    let budgets = budget::run(
        client.clone(),
        ch.clone(),
        args.cutover.config(),
        Recorder::new(
            client.clone(),
            Reporter {
                controller: "tally-operator".into(),
                instance: Some(format!("{me}-budgets")),
            },
        ),
        Duration::from_secs(args.budget_interval_secs.max(1)),
        metrics.clone(),
    );
    let meters: Api<DeserializeGuard<Meter>> = Api::all(client.clone());
    let controller = Controller::new(meters, watcher::Config::default().any_semantic())
        .with_config(controller::Config::default().concurrency(args.concurrency));
    let ctx = Arc::new(meter::Context {
        client: client.clone(),
        ch,
        cutover: args.cutover.config(),
        health,
        metrics: metrics.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "tally-operator".into(),
                instance: Some(me),
            },
        ),
        store: controller.store(),
        drain: Duration::from_secs(args.rollup_drain_secs),
        resync: Duration::from_secs(args.resync_secs.max(1)),
        failures: Mutex::new(Default::default()),
    });
    // Re-reconcile every meter when the pipeline's health changes.
    let health_changes = tokio_stream_of(changed);
    let controllers = controller
        .reconcile_all_on(health_changes)
        .run(meter::reconcile, meter::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "Controller event");
            }
        });
    let collectors = collector::run(
        client_for_agents,
        agent_settings(&args),
        Some(ch_for_collectors),
        Duration::from_secs(args.collector_status_secs.max(1)),
        metrics.clone(),
    );
    tokio::select! {
        () = provisioning => {}
        () = controllers => {}
        () = collectors => {}
        () = budgets => {}
    }
    Ok(())
}

/// How agents are deployed, or `None` without a sink.
fn agent_settings(args: &Args) -> Option<agents::AgentSettings> {
    use tally_crds::collector::{Delivery, IngestSink, KafkaSink};
    let sink = match (&args.agent_ingest_url, &args.kafka.brokers) {
        (Some(url), _) => Delivery {
            ingest: Some(IngestSink {
                url: url.clone(),
                token_file: None,
                batch_events: 500,
                timeout_ms: 10_000,
            }),
            kafka: None,
        },
        (None, Some(brokers)) => Delivery {
            ingest: None,
            kafka: Some(KafkaSink {
                brokers: brokers.clone(),
                topic: args.kafka.topic.clone(),
                timeout_ms: 10_000,
                batch_events: 5000,
            }),
        },
        (None, None) => return None,
    };
    Some(agents::AgentSettings {
        namespace: args.namespace.clone(),
        image: args.agent_image.clone(),
        sink,
        spool_host_path: args.agent_spool_host_path.clone(),
        ingest_token_secret: args.agent_ingest_token_secret.clone(),
        manage_rbac: !args.no_agent_rbac,
        cluster_spool_size: args.cluster_agent_spool_size.clone(),
        cluster_spool_class: args.cluster_agent_storage_class.clone(),
    })
}

fn tokio_stream_of(
    rx: tokio::sync::watch::Receiver<u64>,
) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}
