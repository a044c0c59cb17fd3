//! The Collector controller: one render loop (a single writer) that turns all
//! Collectors into the agents' objects ([`crate::agents`]) and reports each
//! Collector's status.
//!
//! Why a loop and not a per-object controller: every Collector of a scope lands in one
//! shared ConfigMap and workload, so any change means re-rendering them all, and the
//! last Collector of a scope going away must remove that scope's objects (they live in
//! the operator's namespace, where an ownerReference to a Collector in another
//! namespace is not allowed).
//!
//! Writes: objects are server-side applied (field manager `tally-operator`) only when
//! their rendered content differs from what this leader applied last; statuses only
//! when they differ from the stored ones. At rest there are no writes.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolumeClaim, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tally_clickhouse::Ch;
use tally_crds::collector::Scope;
use tally_crds::{Collector, CollectorStatus};

use crate::agents::{self, AgentSettings, CLUSTER_AGENT, NODE_AGENT};
use crate::meter::{FIELD_MANAGER, backoff};
use crate::metrics::Metrics;
use crate::status::condition;

/// The controller label of this loop's metrics.
const CONTROLLER: &str = "collector";

/// How far back the newest event of a Collector is looked for.
const LAST_EVENT_DAYS: u32 = 35;

/// Runs the render loop until dropped. `settings` is `None` when no sink is configured
/// (then Collectors say so and no agents are deployed). Without a change the loop runs
/// every `every`: it re-reads referenced Secrets (so a rotated key reaches the agents)
/// and, from ClickHouse (`ch`), each Collector's newest event time. Each pass is counted
/// as a reconcile of controller `collector` in `metrics`; a failed pass is retried with
/// the Meter controller's backoff instead of after `every`.
pub async fn run(
    client: Client,
    settings: Option<AgentSettings>,
    ch: Option<Ch>,
    every: Duration,
    metrics: Arc<Metrics>,
) {
    let collectors: Api<DeserializeGuard<Collector>> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let (tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
    let tx2 = tx.clone();
    tokio::spawn(
        reflector::reflector(writer, watcher(collectors, watcher::Config::default()))
            .default_backoff()
            .for_each(move |_| {
                let _ = tx.try_send(());
                futures::future::ready(())
            }),
    );
    let ns = settings
        .as_ref()
        .map(|s| s.namespace.clone())
        .unwrap_or_default();
    let selector = watcher::Config::default().labels("app.kubernetes.io/managed-by=tally-operator");
    let (ds_reader, ds_writer) = reflector::store::<DaemonSet>();
    let (dep_reader, dep_writer) = reflector::store::<Deployment>();
    if settings.is_some() {
        for stream in [
            reflector::reflector(
                ds_writer,
                watcher(
                    Api::<DaemonSet>::namespaced(client.clone(), &ns),
                    selector.clone(),
                ),
            )
            .default_backoff()
            .map(|_| ())
            .boxed(),
            reflector::reflector(
                dep_writer,
                watcher(
                    Api::<Deployment>::namespaced(client.clone(), &ns),
                    selector.clone(),
                ),
            )
            .default_backoff()
            .map(|_| ())
            .boxed(),
        ] {
            let tx = tx2.clone();
            tokio::spawn(stream.for_each(move |()| {
                let _ = tx.try_send(());
                futures::future::ready(())
            }));
        }
    }
    if reader.wait_until_ready().await.is_err() {
        return;
    }
    let mut applied: HashMap<String, u64> = HashMap::new();
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        while changed.try_recv().is_ok() {}
        let timer = metrics.reconcile(CONTROLLER);
        let mut failed = false;
        let all: Vec<Collector> = reader
            .state()
            .iter()
            .filter_map(|g| g.0.as_ref().ok().cloned())
            .collect();
        let cluster = dep_reader
            .get(&reflector::ObjectRef::new(CLUSTER_AGENT).within(&ns))
            .map(|d| dep_counts(&d));
        let cluster_claim_pending = match cluster {
            Some((_, 0)) => claim_pending(&client, &ns).await,
            _ => false,
        };
        let workloads = Workloads {
            node: ds_reader
                .get(&reflector::ObjectRef::new(NODE_AGENT).within(&ns))
                .map(|d| ds_counts(&d)),
            cluster,
            cluster_claim_pending,
        };
        let secret_problems = match render(&client, settings.as_ref(), &all, &mut applied).await {
            Ok(p) => p,
            Err(e) => {
                metrics.failure(CONTROLLER, "apply");
                failed = true;
                tracing::warn!(error = %e, "Failed to apply the agents' objects; retrying");
                HashMap::new()
            }
        };
        let newest = match &ch {
            Some(ch) => newest_events(ch, &all).await,
            None => HashMap::new(),
        };
        let watermarks = match &ch {
            Some(ch) => oldest_watermarks(ch, &client, &all).await,
            None => HashMap::new(),
        };
        for c in &all {
            let key = key_of(c);
            let found = Found {
                secret_problem: secret_problems.get(&key).map(String::as_str),
                newest_event: newest.get(&key).copied(),
                oldest_watermark: watermarks.get(&key).cloned(),
            };
            if let Err(e) = write_status(&client, c, settings.as_ref(), &workloads, &found).await {
                metrics.failure(CONTROLLER, "apply_status");
                failed = true;
                tracing::warn!(collector = %key, error = %e, "Failed to write a Collector's status");
            }
        }
        drop(timer);
        failures = if failed { failures + 1 } else { 0 };
        let wait = if failed { backoff(failures) } else { every };
        let _ = tokio::time::timeout(wait, changed.recv()).await;
    }
}

/// Whether the cluster agent's spool claim exists and is still Pending (unbound: no
/// default StorageClass, or a class that cannot provision).
async fn claim_pending(client: &Client, ns: &str) -> bool {
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get_opt(agents::CLUSTER_AGENT_SPOOL)
        .await
        .ok()
        .flatten()
        .and_then(|c| c.status?.phase)
        .is_some_and(|phase| phase == "Pending")
}

fn key_of(c: &Collector) -> String {
    format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any())
}

/// The newest event time of each Collector (by `namespace/name`) whose events reached
/// ClickHouse in the last [`LAST_EVENT_DAYS`]; empty when ClickHouse cannot answer.
async fn newest_events(ch: &Ch, all: &[Collector]) -> HashMap<String, i64> {
    let pairs: Vec<(String, String)> = all
        .iter()
        .map(|c| {
            let ns = c.namespace().unwrap_or_default();
            let source = format!("tally/{ns}/{}", c.name_any());
            (ns, source)
        })
        .collect();
    match ch.newest_event_times(&pairs, LAST_EVENT_DAYS).await {
        Ok(rows) => rows
            .into_iter()
            .map(|((ns, source), t)| {
                let name = source.rsplit('/').next().unwrap_or_default().to_string();
                (format!("{ns}/{name}"), t)
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "No last event times this round");
            HashMap::new()
        }
    }
}

/// The oldest watermark of each Collector (by `namespace/name`) over the agents of
/// nodes that still exist (a deleted node's watermark ended with it), with the node
/// (`cluster` for the cluster agent); empty when ClickHouse cannot answer. Without
/// `list` on nodes every node's agent counts.
async fn oldest_watermarks(
    ch: &Ch,
    client: &Client,
    all: &[Collector],
) -> HashMap<String, (i64, String)> {
    let mut namespaces: Vec<String> = all
        .iter()
        .map(|c| c.namespace().unwrap_or_default())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    let marks = match tally_clickhouse::watermarks::partition_marks(ch, &namespaces).await {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "No watermarks this round");
            return HashMap::new();
        }
    };
    let nodes: Option<std::collections::HashSet<String>> = Api::<Node>::all(client.clone())
        .list_metadata(&Default::default())
        .await
        .inspect_err(
            |e| tracing::debug!(error = %e, "Cannot list nodes; every node's watermark counts"),
        )
        .ok()
        .map(|l| {
            l.items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect()
        });
    let mut by_ns: BTreeMap<String, Vec<tally_meter::completeness::PartitionMark>> =
        BTreeMap::new();
    for (ns, m) in marks {
        by_ns.entry(ns).or_default().push(m);
    }
    let mut oldest: HashMap<String, (i64, String)> = HashMap::new();
    for (ns, marks) in by_ns {
        for (collector, node, until) in tally_meter::completeness::source_watermarks(&marks) {
            let gone = !node.is_empty() && nodes.as_ref().is_some_and(|n| !n.contains(&node));
            let Some(until) = until.filter(|_| !gone) else {
                continue;
            };
            let place = if node.is_empty() {
                "cluster".to_string()
            } else {
                node
            };
            let e = oldest
                .entry(format!("{ns}/{collector}"))
                .or_insert((until, place.clone()));
            if until < e.0 {
                *e = (until, place);
            }
        }
    }
    oldest
}

/// What the loop learned about one Collector besides its spec.
#[derive(Debug, Default)]
struct Found<'a> {
    /// A Secret key it references that cannot be read.
    secret_problem: Option<&'a str>,
    /// Its newest event in ClickHouse (Unix seconds).
    newest_event: Option<i64>,
    /// Its agents' oldest watermark (Unix ms) and where.
    oldest_watermark: Option<(i64, String)>,
}

/// `(desired, ready)` agents per scope, from the workloads' status.
#[derive(Debug, Default)]
struct Workloads {
    node: Option<(i32, i32)>,
    cluster: Option<(i32, i32)>,
    /// The cluster agent's spool claim is not bound (read only while that agent is
    /// not ready).
    cluster_claim_pending: bool,
}

fn ds_counts(d: &DaemonSet) -> (i32, i32) {
    d.status
        .as_ref()
        .map_or((0, 0), |s| (s.desired_number_scheduled, s.number_ready))
}

fn dep_counts(d: &Deployment) -> (i32, i32) {
    // Only the leader runs the collectors: one agent is desired.
    let ready = d
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    (1, ready.min(1))
}

fn fingerprint<T: Serialize>(obj: &T) -> u64 {
    xxhash_rust::xxh3::xxh3_64(serde_json::to_string(obj).unwrap_or_default().as_bytes())
}

/// The key of an object in the record of what this leader applied.
fn applied_key<T: Resource<DynamicType = ()>>(ns: &str, name: &str) -> String {
    format!("{}/{ns}/{name}", T::kind(&()))
}

/// Applies `obj` unless this leader already applied the same content.
async fn apply<T>(api: &Api<T>, obj: &T, applied: &mut HashMap<String, u64>) -> kube::Result<()>
where
    T: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let key = applied_key::<T>(&obj.namespace().unwrap_or_default(), &obj.name_any());
    let print = fingerprint(obj);
    if applied.get(&key) == Some(&print) {
        return Ok(());
    }
    api.patch(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    applied.insert(key, print);
    Ok(())
}

/// Creates `obj` unless it exists, and never changes it afterwards: for objects whose
/// spec is immutable once bound, like a PersistentVolumeClaim (a changed size or class
/// would be refused on every round; resizing is the cluster admin's call).
async fn create_once<T>(
    api: &Api<T>,
    obj: &T,
    applied: &mut HashMap<String, u64>,
) -> kube::Result<()>
where
    T: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let key = applied_key::<T>(&obj.namespace().unwrap_or_default(), &obj.name_any());
    if applied.contains_key(&key) {
        return Ok(());
    }
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    applied.insert(key, 0);
    Ok(())
}

/// Deletes `name` (in `ns`) if it exists (a read first, so nothing is written at rest).
async fn remove<T>(
    api: &Api<T>,
    ns: &str,
    name: &str,
    applied: &mut HashMap<String, u64>,
) -> kube::Result<()>
where
    T: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    applied.remove(&applied_key::<T>(ns, name));
    if api.get_opt(name).await?.is_some() {
        api.delete(name, &DeleteParams::background()).await?;
        tracing::info!(kind = %T::kind(&()), name, "Deleted: no Collector of its scope is left");
    }
    Ok(())
}

/// Applies every scope's objects; returns the Secret problems per Collector.
async fn render(
    client: &Client,
    settings: Option<&AgentSettings>,
    all: &[Collector],
    applied: &mut HashMap<String, u64>,
) -> kube::Result<HashMap<String, String>> {
    let mut problems = HashMap::new();
    let Some(settings) = settings else {
        return Ok(problems);
    };
    let ns = settings.namespace.as_str();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    // Each scope rendered once: whether any has collectors decides the RBAC first.
    let scopes = [(Scope::Node, NODE_AGENT), (Scope::Cluster, CLUSTER_AGENT)]
        .map(|(scope, name)| (scope, name, agents::agent_config(all, scope, settings)));
    let any = scopes
        .iter()
        .any(|(_, _, r)| !r.config.collectors.is_empty());
    let rbac = agents::rbac(settings);
    if settings.manage_rbac && any {
        // The agents' identities first, so their pods can be created at once.
        apply_all(
            &Api::namespaced(client.clone(), ns),
            &rbac.service_accounts,
            applied,
        )
        .await?;
        apply_all(&Api::all(client.clone()), &rbac.cluster_roles, applied).await?;
        apply_all(
            &Api::all(client.clone()),
            &rbac.cluster_role_bindings,
            applied,
        )
        .await?;
        apply_all(&Api::namespaced(client.clone(), ns), &rbac.roles, applied).await?;
        apply_all(
            &Api::namespaced(client.clone(), ns),
            &rbac.role_bindings,
            applied,
        )
        .await?;
    }
    // With --no-agent-rbac (manage_rbac false) the chart installs and removes them.
    for (scope, name, rendered) in scopes {
        let secret = agents::secret_name(name);
        if rendered.config.collectors.is_empty() {
            match scope {
                Scope::Node => {
                    remove(
                        &Api::<DaemonSet>::namespaced(client.clone(), ns),
                        ns,
                        name,
                        applied,
                    )
                    .await?
                }
                // The spool claim stays: it may hold events not yet shipped (the
                // broker down when the last Collector went), which the next cluster
                // agent sends first, as a node agent does from its hostPath spool.
                Scope::Cluster => {
                    // Created again (if an admin deleted it) with the next agent.
                    applied.remove(&applied_key::<PersistentVolumeClaim>(
                        ns,
                        agents::CLUSTER_AGENT_SPOOL,
                    ));
                    remove(
                        &Api::<Deployment>::namespaced(client.clone(), ns),
                        ns,
                        name,
                        applied,
                    )
                    .await?
                }
            }
            remove(&cms, ns, name, applied).await?;
            remove(&secrets, ns, &secret, applied).await?;
            continue;
        }
        if rendered.secrets.is_empty() {
            remove(&secrets, ns, &secret, applied).await?;
        } else {
            let data = read_keys(client, &rendered.secrets, &mut problems).await;
            apply(&secrets, &agents::secret(name, settings, data), applied).await?;
        }
        let (cm, hash) = agents::config_map(name, settings, &rendered.config);
        apply(&cms, &cm, applied).await?;
        match scope {
            Scope::Node => {
                let api = Api::<DaemonSet>::namespaced(client.clone(), ns);
                apply(&api, &agents::daemonset(settings, &hash), applied).await?
            }
            Scope::Cluster => {
                let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns);
                create_once(&claims, &agents::spool_claim(settings), applied).await?;
                let api = Api::<Deployment>::namespaced(client.clone(), ns);
                apply(&api, &agents::deployment(settings, &hash), applied).await?
            }
        }
    }
    if settings.manage_rbac && !any {
        // No Collector is left: the agents' identities go too, after their workloads.
        remove_all(
            &Api::namespaced(client.clone(), ns),
            ns,
            &rbac.role_bindings,
            applied,
        )
        .await?;
        remove_all(
            &Api::namespaced(client.clone(), ns),
            ns,
            &rbac.roles,
            applied,
        )
        .await?;
        remove_all(
            &Api::all(client.clone()),
            "",
            &rbac.cluster_role_bindings,
            applied,
        )
        .await?;
        remove_all(&Api::all(client.clone()), "", &rbac.cluster_roles, applied).await?;
        remove_all(
            &Api::namespaced(client.clone(), ns),
            ns,
            &rbac.service_accounts,
            applied,
        )
        .await?;
    }
    Ok(problems)
}

async fn apply_all<T>(
    api: &Api<T>,
    objs: &[T],
    applied: &mut HashMap<String, u64>,
) -> kube::Result<()>
where
    T: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    for o in objs {
        apply(api, o, applied).await?;
    }
    Ok(())
}

async fn remove_all<T>(
    api: &Api<T>,
    ns: &str,
    objs: &[T],
    applied: &mut HashMap<String, u64>,
) -> kube::Result<()>
where
    T: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    for o in objs {
        remove(api, ns, &o.name_any(), applied).await?;
    }
    Ok(())
}

/// The values of the mounted keys (file → value). A key that cannot be read is left
/// out and reported for every Collector referencing it.
async fn read_keys(
    client: &Client,
    keys: &[agents::MountedKey],
    problems: &mut HashMap<String, String>,
) -> BTreeMap<String, ByteString> {
    let mut data = BTreeMap::new();
    for k in keys {
        let (ns, name, key) = (&k.namespace, &k.reference.name, &k.reference.key);
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        let problem = match api.get_opt(name).await {
            Ok(Some(s)) => match s.data.and_then(|mut d| d.remove(key)) {
                Some(v) => {
                    data.insert(k.file.clone(), v);
                    continue;
                }
                None => format!(
                    "Secret {ns}/{name} has no key {key:?}: add it (kubectl create secret generic {name} -n {ns} --from-literal={key}=…)"
                ),
            },
            Ok(None) => format!(
                "Secret {ns}/{name} does not exist: create it with key {key:?} (kubectl create secret generic {name} -n {ns} --from-literal={key}=…)"
            ),
            Err(e) => format!("cannot read Secret {ns}/{name}: {e}"),
        };
        problems.insert(k.collector.clone(), problem);
    }
    data
}

/// The status a Collector should have.
fn desired_status(
    c: &Collector,
    settings: Option<&AgentSettings>,
    workloads: &Workloads,
    found: &Found,
) -> CollectorStatus {
    let previous = c.status.clone().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now();
    let generation = c.metadata.generation;
    let source = c.spec.source().ok();
    let (ready, reason, message, counts) = match (agents::check(&c.spec), source, settings) {
        (Err(e), _, _) => (
            false,
            "InvalidSpec",
            format!("{e}; fix the Collector and apply it again"),
            None,
        ),
        (Ok(()), None, _) => (
            false,
            "InvalidSpec",
            "set exactly one source".to_string(),
            None,
        ),
        (Ok(()), Some(_), None) => (
            false,
            "NoSink",
            "the operator has no agent sink: start it with --agent-ingest-url or --kafka"
                .to_string(),
            None,
        ),
        (Ok(()), Some(_), Some(_)) if found.secret_problem.is_some() => (
            false,
            "SecretNotFound",
            found.secret_problem.unwrap_or_default().to_string(),
            None,
        ),
        (Ok(()), Some(src), Some(_)) => {
            let (scope, counts) = match src.scope() {
                Scope::Node => ("node agents (DaemonSet tally-agent)", workloads.node),
                Scope::Cluster => (
                    "the cluster agent (Deployment tally-cluster-agent)",
                    workloads.cluster,
                ),
            };
            let hint = if src.scope() == Scope::Cluster && workloads.cluster_claim_pending {
                format!(
                    "; its spool claim {} is Pending: give the cluster a default StorageClass or start the operator with --cluster-agent-storage-class (chart: operator.clusterAgentSpool.storageClass)",
                    agents::CLUSTER_AGENT_SPOOL
                )
            } else {
                String::new()
            };
            match counts {
                Some((desired, ready)) if desired > 0 && ready >= desired => (
                    true,
                    "AgentsReady",
                    format!("{ready} of {desired} {scope} run it"),
                    counts,
                ),
                Some((desired, ready)) => (
                    false,
                    "AgentsNotReady",
                    format!("{ready} of {desired} {scope} are ready{hint}"),
                    counts,
                ),
                None => (
                    false,
                    "AgentsNotReady",
                    format!("waiting for {scope} to exist"),
                    None,
                ),
            }
        }
    };
    CollectorStatus {
        observed_generation: generation,
        source: c.spec.source().ok().map(|s| s.name().to_string()),
        conditions: vec![condition(
            &previous.conditions,
            "Ready",
            ready,
            reason,
            &message,
            generation,
            now,
        )],
        desired_agents: counts.map(|(d, _)| d),
        ready_agents: counts.map(|(_, r)| r),
        last_event_time: found
            .newest_event
            .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
            .max(previous.last_event_time),
        oldest_watermark: found
            .oldest_watermark
            .as_ref()
            .and_then(|(t, _)| chrono::DateTime::from_timestamp_millis(*t)),
        oldest_watermark_source: found.oldest_watermark.as_ref().map(|(_, n)| n.clone()),
    }
}

async fn write_status(
    client: &Client,
    c: &Collector,
    settings: Option<&AgentSettings>,
    workloads: &Workloads,
    found: &Found<'_>,
) -> kube::Result<()> {
    if c.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let desired = desired_status(c, settings, workloads, found);
    if c.status.as_ref() == Some(&desired) {
        return Ok(());
    }
    let api: Api<Collector> = Api::namespaced(client.clone(), &c.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Collector", "status": desired});
    api.patch_status(
        &c.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
