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
use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tally_crds::collector::Scope;
use tally_crds::{Collector, CollectorStatus};

use crate::agents::{self, AgentSettings, CLUSTER_AGENT, NODE_AGENT};
use crate::meter::FIELD_MANAGER;
use crate::status::condition;

/// How often the loop runs without a change (reads only).
const RESYNC: Duration = Duration::from_secs(60);

/// Runs the render loop until dropped. `settings` is `None` when no sink is configured
/// (then Collectors say so and no agents are deployed).
pub async fn run(client: Client, settings: Option<AgentSettings>) {
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
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        while changed.try_recv().is_ok() {}
        let all: Vec<Collector> = reader
            .state()
            .iter()
            .filter_map(|g| g.0.as_ref().ok().cloned())
            .collect();
        let workloads = Workloads {
            node: ds_reader
                .get(&reflector::ObjectRef::new(NODE_AGENT).within(&ns))
                .map(|d| ds_counts(&d)),
            cluster: dep_reader
                .get(&reflector::ObjectRef::new(CLUSTER_AGENT).within(&ns))
                .map(|d| dep_counts(&d)),
        };
        if let Err(e) = render(&client, settings.as_ref(), &all, &mut applied).await {
            tracing::warn!(error = %e, "Failed to apply the agents' objects; retrying");
        }
        for c in &all {
            if let Err(e) = write_status(&client, c, settings.as_ref(), &workloads).await {
                tracing::warn!(collector = %format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()), error = %e, "Failed to write a Collector's status");
            }
        }
        let _ = tokio::time::timeout(RESYNC, changed.recv()).await;
    }
}

/// `(desired, ready)` agents per scope, from the workloads' status.
#[derive(Debug, Default)]
struct Workloads {
    node: Option<(i32, i32)>,
    cluster: Option<(i32, i32)>,
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

async fn render(
    client: &Client,
    settings: Option<&AgentSettings>,
    all: &[Collector],
    applied: &mut HashMap<String, u64>,
) -> kube::Result<()> {
    let Some(settings) = settings else {
        return Ok(());
    };
    let ns = settings.namespace.as_str();
    let mut any = false;
    for (scope, name) in [(Scope::Node, NODE_AGENT), (Scope::Cluster, CLUSTER_AGENT)] {
        let (config, _) = agents::agent_config(all, scope, settings);
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        if config.collectors.is_empty() {
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
                Scope::Cluster => {
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
            continue;
        }
        any = true;
        let (cm, hash) = agents::config_map(name, settings, &config);
        apply(&cms, &cm, applied).await?;
        match scope {
            Scope::Node => {
                let api = Api::<DaemonSet>::namespaced(client.clone(), ns);
                apply(&api, &agents::daemonset(settings, &hash), applied).await?
            }
            Scope::Cluster => {
                let api = Api::<Deployment>::namespaced(client.clone(), ns);
                apply(&api, &agents::deployment(settings, &hash), applied).await?
            }
        }
    }
    if any {
        let rbac = agents::rbac(settings);
        let sas = Api::namespaced(client.clone(), ns);
        for o in &rbac.service_accounts {
            apply(&sas, o, applied).await?;
        }
        let crs = Api::all(client.clone());
        for o in &rbac.cluster_roles {
            apply(&crs, o, applied).await?;
        }
        let crbs = Api::all(client.clone());
        for o in &rbac.cluster_role_bindings {
            apply(&crbs, o, applied).await?;
        }
        let roles = Api::namespaced(client.clone(), ns);
        for o in &rbac.roles {
            apply(&roles, o, applied).await?;
        }
        let rbs = Api::namespaced(client.clone(), ns);
        for o in &rbac.role_bindings {
            apply(&rbs, o, applied).await?;
        }
    }
    Ok(())
}

/// The status a Collector should have.
fn desired_status(
    c: &Collector,
    settings: Option<&AgentSettings>,
    workloads: &Workloads,
) -> CollectorStatus {
    let previous = c.status.clone().unwrap_or_default();
    let now = k8s_openapi::jiff::Timestamp::now();
    let generation = c.metadata.generation;
    let source = c.spec.source().ok();
    let (ready, reason, message, counts) = match (c.spec.validate(), source, settings) {
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
        (Ok(()), Some(src), Some(_)) => {
            let (scope, counts) = match src.scope() {
                Scope::Node => ("node agents (DaemonSet tally-agent)", workloads.node),
                Scope::Cluster => (
                    "the cluster agent (Deployment tally-cluster-agent)",
                    workloads.cluster,
                ),
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
                    format!("{ready} of {desired} {scope} are ready"),
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
        last_event_time: previous.last_event_time,
    }
}

async fn write_status(
    client: &Client,
    c: &Collector,
    settings: Option<&AgentSettings>,
    workloads: &Workloads,
) -> kube::Result<()> {
    if c.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let desired = desired_status(c, settings, workloads);
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
