//! Runs the configured collectors: one task each, committing every output to the spool
//! before taking the next step (so checkpoints advance only with their events).
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tally_collectors::http_api::HttpPoller;
use tally_collectors::logs::LogTailer;
use tally_collectors::pod_runtime::PodRuntime;
use tally_collectors::pod_runtime::accelerators::NodeInfo;
use tally_collectors::pods::subject_of;
use tally_collectors::prometheus::PrometheusScrape;
use tally_collectors::{Origin, Output};
use tally_crds::Watermark;
use tally_crds::collector::{CollectorConfig, Scope, Source};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::metrics::Metrics;
use crate::pods::PodCache;
use crate::spool::{Full, Spool};
use crate::{Error, Result};

/// What every collector task shares.
#[derive(Clone, Debug)]
pub struct Shared {
    /// The spool.
    pub spool: Arc<Spool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Wakes the shipper.
    pub wake: Arc<Notify>,
    /// Turns true when collectors must stop.
    pub stop: watch::Receiver<bool>,
    /// Pods on this node (empty outside Kubernetes).
    pub pods: PodCache,
    /// This node's name.
    pub node: Option<String>,
    /// HTTP client for scrapes and polls.
    pub http: reqwest::Client,
}

impl Shared {
    /// Commits an output, waiting while the spool is full. Returns false when asked to
    /// stop first (the output is dropped uncommitted: its checkpoint did not advance,
    /// so it is re-derived after the restart).
    async fn commit(
        &self,
        key: &str,
        namespace: &str,
        out: &Output,
        mark: Option<&Watermark>,
    ) -> Result<bool> {
        let mut stop = self.stop.clone();
        loop {
            match self.spool.commit_marked(key, namespace, out, mark)? {
                Ok(()) => {
                    if !out.events.is_empty() {
                        self.metrics
                            .events_spooled
                            .get_or_create(&Metrics::label(key))
                            .inc_by(out.events.len() as u64);
                        self.wake.notify_one();
                    }
                    return Ok(true);
                }
                Err(Full) => {
                    self.metrics.spool_full.inc();
                    self.wake.notify_one();
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.wait_for(|s| *s) => return Ok(false),
                    }
                }
            }
        }
    }

    /// Sleeps for `d`; false when asked to stop meanwhile.
    async fn pause(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        let slept = tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stop.wait_for(|s| *s) => false,
        };
        slept && !*self.stop.borrow()
    }

    fn error(&self, key: &str, what: &str, e: &dyn std::fmt::Display) {
        self.metrics
            .collector_errors
            .get_or_create(&Metrics::label(key))
            .inc();
        tracing::warn!(collector = key, error = %e, "{what} failed; retrying at the next interval");
    }
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Whether a collector needs this node's pods.
pub fn needs_pods(c: &CollectorConfig) -> bool {
    match c.spec.source() {
        Ok(Source::PodRuntime(_)) => true,
        Ok(Source::Logs(l)) => l.pods.is_some(),
        Ok(Source::Prometheus(p)) => p.pods.is_some(),
        _ => false,
    }
}

/// The collectors of `scope` (all when `None`).
pub fn selected(collectors: &[CollectorConfig], scope: Option<Scope>) -> Vec<CollectorConfig> {
    collectors
        .iter()
        .filter(|c| scope.is_none_or(|s| c.spec.source().is_ok_and(|src| src.scope() == s)))
        .cloned()
        .collect()
}

/// Starts one task per collector.
pub fn start(
    collectors: &[CollectorConfig],
    ctx: &Shared,
    tasks: &mut JoinSet<Result<()>>,
) -> Result<()> {
    for c in collectors {
        let key = format!("{}/{}", c.namespace, c.name);
        let origin = Origin::new(&c.namespace, &c.name, &c.spec);
        let checkpoints = ctx.spool.checkpoints(&key)?;
        let started = |source| Error::Collector {
            collector: key.clone(),
            source,
        };
        let ctx = ctx.clone();
        match c.spec.source().map_err(|e| Error::Config {
            path: key.clone(),
            message: e.to_string(),
        })? {
            Source::PodRuntime(cfg) => {
                let node = ctx.node.clone().ok_or_else(|| Error::NodeName {
                    needed_by: key.clone(),
                })?;
                let mark = watermark_of(c, &origin, Some(&node));
                let collector = PodRuntime::new(origin, cfg.clone(), &node, &checkpoints);
                tasks.spawn(pod_runtime(key, c.namespace.clone(), collector, mark, ctx));
            }
            Source::Prometheus(cfg) => {
                let node = cfg.pods.is_some().then_some(()).and(ctx.node.as_deref());
                let mark = watermark_of(c, &origin, node);
                let collector =
                    PrometheusScrape::new(origin, cfg.clone(), &checkpoints, now_secs())
                        .map_err(started)?;
                tasks.spawn(prometheus(key, c.namespace.clone(), collector, mark, ctx));
            }
            Source::HttpApi(cfg) => {
                let mark = watermark_of(c, &origin, None);
                let collector =
                    HttpPoller::new(origin, cfg.clone(), &checkpoints).map_err(started)?;
                tasks.spawn(http_api(key, c.namespace.clone(), collector, mark, ctx));
            }
            Source::Logs(cfg) => {
                let collector =
                    LogTailer::new(origin, cfg.clone(), &checkpoints).map_err(started)?;
                tasks.spawn(logs(key, c.namespace.clone(), collector, ctx));
            }
        }
    }
    Ok(())
}

/// The identity of a collector's watermarks (`until` and `gaps` come with each output).
fn watermark_of(c: &CollectorConfig, origin: &Origin, node: Option<&str>) -> Watermark {
    Watermark {
        collector: c.name.clone(),
        node: node.unwrap_or_default().to_string(),
        source: origin.source.clone(),
        types: vec![origin.event_type.clone()],
        until: 0,
        gaps: Vec::new(),
        partitions: 0,
    }
}

async fn pod_runtime(
    key: String,
    ns: String,
    mut c: PodRuntime,
    mark: Watermark,
    ctx: Shared,
) -> Result<()> {
    let mut synced = false;
    let mut unknown = 0;
    // blind intervals of the pod watch already reported
    let mut blind = ctx.pods.blind(0).len();
    // A loop normally takes about a second. One much longer means this process did
    // not run (stopped, starved): the pod updates of that time are still on their way
    // into the cache, so no window closes until they had the settle time to arrive.
    let settle = Duration::from_secs(u64::from(c.settle_secs()).max(2));
    let mut last_loop = std::time::Instant::now();
    let mut hold_until: Option<std::time::Instant> = None;
    loop {
        let gap = last_loop.elapsed();
        last_loop = std::time::Instant::now();
        if gap > settle + Duration::from_secs(4) {
            tracing::warn!(
                collector = key,
                secs = gap.as_secs(),
                "The agent did not run for a while; waiting for the pod updates of that time before closing windows"
            );
            hold_until = Some(last_loop + settle);
        }
        let now = now_secs();
        // Deleted pods too: a pod created, finished and deleted since the last look
        // is measured from its last state.
        let pods = ctx.pods.with_deleted();
        let present: HashSet<String> = pods
            .iter()
            .filter(|(_, deleted)| !deleted)
            .filter_map(|(p, _)| p.metadata.uid.clone())
            .collect();
        for (p, _) in &pods {
            c.observe(p);
        }
        if let Some(node) = ctx.pods.node() {
            c.set_node(NodeInfo::of(&node));
        }
        let unresolved = c.unresolved_claims();
        if !unresolved.is_empty() {
            let pods: Vec<_> = unresolved.iter().map(|(_, p)| Arc::clone(p)).collect();
            let resolved = ctx.pods.resolve_claims(&pods).await;
            for ((uid, _), r) in unresolved.iter().zip(resolved) {
                if let Err(e) = &r {
                    tracing::debug!(collector = key, pod = %uid, error = %e, "DRA claims not resolved yet");
                }
                c.claims_resolved(uid, r);
            }
        }
        let mut out = Output::default();
        // Windows close only once the Node was read (or could not be), so the
        // accelerators' sharing is known before any is emitted.
        let held = hold_until.is_some_and(|h| std::time::Instant::now() < h);
        if ctx.pods.is_synced() && !held {
            c.retain_present(&present, now);
            if !synced {
                synced = true;
                out.extend(c.synced(now, ctx.pods.watching_since()));
            }
            let new_blind = ctx.pods.blind(blind);
            blind += new_blind.len();
            out.extend(c.blind(&new_blind));
            out.extend(c.tick(now));
        }
        if c.unknown_shares() > unknown {
            ctx.metrics
                .gpu_share_unknown
                .get_or_create(&Metrics::label(&key))
                .inc_by(c.unknown_shares() - unknown);
            unknown = c.unknown_shares();
        }
        if !ctx.commit(&key, &ns, &out, Some(&mark)).await?
            || !ctx.pause(Duration::from_secs(1)).await
        {
            return Ok(());
        }
    }
}

async fn prometheus(
    key: String,
    ns: String,
    mut c: PrometheusScrape,
    mark: Watermark,
    ctx: Shared,
) -> Result<()> {
    let interval = Duration::from_secs(u64::from(c.config().interval_secs));
    loop {
        let targets = c.targets(&ctx.pods.pods());
        let bodies =
            futures::future::join_all(targets.iter().map(|t| c.fetch(&ctx.http, &t.url))).await;
        let now = now_ms();
        let lookup = |namespace: &str, pod: &str| {
            ctx.pods.find(namespace, pod).map(|p| subject_of(&p, None))
        };
        let mut out = c.forget_targets_except(&targets);
        for (t, body) in targets.iter().zip(bodies) {
            match body.and_then(|b| c.process(t, &b, now, &lookup)) {
                Ok(o) => out.extend(o),
                Err(e) => ctx.error(&key, "scrape", &e),
            }
        }
        out.extend(c.mark(now));
        if !ctx.commit(&key, &ns, &out, Some(&mark)).await? || !ctx.pause(interval).await {
            return Ok(());
        }
    }
}

async fn http_api(
    key: String,
    ns: String,
    mut c: HttpPoller,
    mark: Watermark,
    ctx: Shared,
) -> Result<()> {
    let interval = Duration::from_secs(u64::from(c.interval_secs()));
    loop {
        let wait = match c.poll(&ctx.http, now_secs()).await {
            Ok(poll) => {
                if !ctx.commit(&key, &ns, &poll.output, Some(&mark)).await? {
                    return Ok(());
                }
                if poll.caught_up {
                    interval
                } else {
                    Duration::ZERO
                }
            }
            Err(e) => {
                ctx.error(&key, "poll", &e);
                interval.min(Duration::from_secs(30))
            }
        };
        if !ctx.pause(wait).await {
            return Ok(());
        }
    }
}

async fn logs(key: String, ns: String, c: LogTailer, ctx: Shared) -> Result<()> {
    let interval = Duration::from_secs(u64::from(c.poll_secs()));
    let mut slot = Some(c);
    loop {
        let pods = ctx.pods.pods();
        let mut tailer = slot.take().expect("the tailer is put back after each poll");
        // File reading blocks: do it off the async workers.
        let (tailer, out) = tokio::task::spawn_blocking(move || {
            let files = tailer.files(&pods);
            let out = tailer.poll(&files, now_ms());
            (tailer, out)
        })
        .await
        .expect("the log poll does not panic");
        slot = Some(tailer);
        if !ctx.commit(&key, &ns, &out, None).await? || !ctx.pause(interval).await {
            return Ok(());
        }
    }
}
