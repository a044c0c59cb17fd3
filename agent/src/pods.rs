//! The node-local pod cache: a watch of the pods bound to this node (field selector
//! `spec.nodeName`), managedFields stripped, with delayed deletion so a pod that just
//! ended still resolves (e.g. a DCGM sample naming it) for [`KEEP_DELETED`] and its
//! last state is measured (a pod created, finished and deleted between two looks).
//!
//! It also reads this node's Node object (`get`, every [`NODE_EVERY`]), whose labels say
//! how its GPUs are shared. RBAC cannot narrow the DaemonSet's one identity to each
//! agent's own Node, so the agents may `get` every Node.
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use kube::api::ListParams;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tally_collectors::pod_runtime::dra::{self, ClaimDevices};
use tokio::sync::watch;

/// How long a deleted pod stays resolvable.
pub const KEEP_DELETED: Duration = Duration::from_secs(300);

/// How often the Node object is read again (GPU sharing labels change rarely: a MIG
/// or time-slicing reconfiguration drains the node first).
pub const NODE_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    pods: HashMap<String, (Arc<Pod>, Option<Instant>)>,
    /// Uids seen since the current (re)list began.
    relisting: Option<Vec<String>>,
    /// This node's Node object, once read.
    node: Option<Arc<Node>>,
    /// Whether reading the Node was tried at least once (read or failed).
    node_tried: bool,
    /// When the watch last failed (Unix ms) with nothing received since.
    broken_at: Option<i64>,
    /// Whether a first listing completed.
    listed: bool,
    /// When this process's first listing completed (Unix s).
    listed_at: Option<i64>,
    /// Intervals (Unix ms) in which the watch may have missed pods: from a failure to
    /// the re-listing that followed it (the API no longer had the changes in between).
    blind: Vec<(i64, i64)>,
}

/// Pods on this node.
#[derive(Clone)]
pub struct PodCache {
    state: Arc<RwLock<State>>,
    synced: watch::Receiver<bool>,
    /// The API client and node name (none for a fixed cache).
    api: Option<(Client, String)>,
}

impl std::fmt::Debug for PodCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodCache")
            .field("node", &self.api.as_ref().map(|(_, n)| n))
            .finish_non_exhaustive()
    }
}

impl PodCache {
    /// Starts watching the pods of `node`; the task runs until the runtime stops.
    pub fn start(client: Client, node: &str) -> PodCache {
        let nodes: Api<Node> = Api::all(client.clone());
        let api: Api<Pod> = Api::all(client.clone());
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (tx, synced) = watch::channel(false);
        let cache = PodCache {
            state: Arc::default(),
            synced,
            api: Some((client.clone(), node.to_string())),
        };
        let state = cache.state.clone();
        let node_state = cache.state.clone();
        let node_name = node.to_string();
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                let got = nodes.get(&node_name).await;
                let node = match got {
                    Ok(mut n) => {
                        n.managed_fields_mut().clear();
                        warned = false;
                        Some(Arc::new(n))
                    }
                    Err(e) => {
                        if !warned {
                            warned = true;
                            tracing::warn!(node = %node_name, error = %e, "Cannot read this node's Node object (the agent needs get on nodes): GPUs are counted as exclusive whole devices until it can");
                        }
                        None
                    }
                };
                {
                    let mut s = node_state.write().unwrap_or_else(|p| p.into_inner());
                    if node.is_some() {
                        s.node = node;
                    }
                    s.node_tried = true;
                }
                tokio::time::sleep(NODE_EVERY).await;
            }
        });
        let stream = watcher::watcher(api, config)
            .default_backoff()
            .modify(|p| p.managed_fields_mut().clear());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => {
                        let done = apply(&state, ev);
                        if done {
                            let _ = tx.send(true);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Pod watch failed; retrying");
                        let mut s = state.write().unwrap_or_else(|p| p.into_inner());
                        s.broken_at
                            .get_or_insert(chrono::Utc::now().timestamp_millis());
                    }
                }
            }
        });
        cache
    }

    /// A cache fed by hand (tests, and agents without pod-aware collectors).
    pub fn fixed(pods: Vec<Pod>) -> PodCache {
        let (_tx, synced) = watch::channel(true);
        let state = State {
            pods: pods
                .into_iter()
                .map(|p| (p.uid().unwrap_or_default(), (Arc::new(p), None)))
                .collect(),
            relisting: None,
            node: None,
            node_tried: true,
            ..State::default()
        };
        PodCache {
            state: Arc::new(RwLock::new(state)),
            synced,
            api: None,
        }
    }

    /// Waits until the first full listing arrived.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Whether the first full listing arrived and the Node was read (or failed to be).
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
            && self
                .state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .node_tried
    }

    /// The accelerators of each pod's DRA claims: every claim read by name, its
    /// devices looked up in this node's ResourceSlices (listed once, by
    /// `spec.nodeName`). `Err` says why not (yet): retried while the pod runs.
    pub async fn resolve_claims(
        &self,
        pods: &[Arc<Pod>],
    ) -> Vec<Result<Vec<ClaimDevices>, String>> {
        let Some((client, node)) = self.api.as_ref() else {
            return pods
                .iter()
                .map(|_| Err("no Kubernetes API to read claims from".to_string()))
                .collect();
        };
        let slices: Api<ResourceSlice> = Api::all(client.clone());
        let slices = match slices
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
        {
            Ok(l) => l.items,
            Err(e) => {
                let e = format!(
                    "listing this node's ResourceSlices (the agent needs list on resourceslices): {e}"
                );
                return pods.iter().map(|_| Err(e.clone())).collect();
            }
        };
        let mut out = Vec::new();
        for pod in pods {
            out.push(resolve_pod_claims(client, pod, &slices).await);
        }
        out
    }

    /// This node's Node object, once read.
    pub fn node(&self) -> Option<Arc<Node>> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.node.clone()
    }

    /// Since when (Unix s) this process has watched the pods: its first complete
    /// listing (`None` before it, and for a fixed cache).
    pub fn watching_since(&self) -> Option<i64> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.listed_at
    }

    /// Intervals (Unix ms) in which the pod watch may have missed pods, from the
    /// `seen`-th on (a caller keeps how many it has seen).
    pub fn blind(&self, seen: usize) -> Vec<(i64, i64)> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.blind.iter().skip(seen).copied().collect()
    }

    /// The pods that exist and those deleted within [`KEEP_DELETED`] (their last
    /// state), each with whether it was deleted.
    pub fn with_deleted(&self) -> Vec<(Arc<Pod>, bool)> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.pods
            .values()
            .map(|(p, gone)| (Arc::clone(p), gone.is_some()))
            .collect()
    }

    /// The pods that currently exist (shared, not copied).
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.pods
            .values()
            .filter(|(_, gone)| gone.is_none())
            .map(|(p, _)| Arc::clone(p))
            .collect()
    }

    /// A pod by namespace and name, including recently deleted ones.
    pub fn find(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        let s = self.state.read().unwrap_or_else(|p| p.into_inner());
        s.pods
            .values()
            .filter(|(p, _)| p.namespace().as_deref() == Some(namespace) && p.name_any() == name)
            .min_by_key(|(_, gone)| gone.is_some())
            .map(|(p, _)| p.clone())
    }
}

/// Applies a watch event; returns whether a listing just completed.
fn apply(state: &RwLock<State>, ev: Event<Pod>) -> bool {
    let mut s = state.write().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    let now_ms = chrono::Utc::now().timestamp_millis();
    s.pods
        .retain(|_, (_, gone)| gone.is_none_or(|t| now.duration_since(t) < KEEP_DELETED));
    match ev {
        Event::Init => {
            s.relisting = Some(Vec::new());
            false
        }
        Event::InitApply(p) | Event::Apply(p) => {
            if s.relisting.is_none() {
                s.broken_at = None;
            }
            let uid = p.uid().unwrap_or_default();
            if let Some(seen) = &mut s.relisting {
                seen.push(uid.clone());
            }
            s.pods.insert(uid, (Arc::new(p), None));
            false
        }
        Event::Delete(p) => {
            s.broken_at = None;
            let uid = p.uid().unwrap_or_default();
            s.pods.insert(uid, (Arc::new(p), Some(now)));
            false
        }
        Event::InitDone => {
            let seen = s.relisting.take().unwrap_or_default();
            // a re-listing after a failure: what happened in between is not known
            if s.listed {
                let from = s.broken_at.unwrap_or(now_ms);
                if from < now_ms {
                    s.blind.push((from, now_ms));
                }
            }
            s.listed = true;
            s.listed_at.get_or_insert(now_ms.div_euclid(1000));
            s.broken_at = None;
            for (uid, (_, gone)) in s.pods.iter_mut() {
                if gone.is_none() && !seen.contains(uid) {
                    *gone = Some(now);
                }
            }
            true
        }
    }
}

/// The accelerators of `pod`'s claims, from `slices`.
async fn resolve_pod_claims(
    client: &Client,
    pod: &Pod,
    slices: &[ResourceSlice],
) -> Result<Vec<ClaimDevices>, String> {
    let names = dra::claim_names(pod)?;
    let ns = pod.namespace().unwrap_or_default();
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
    let mut out = Vec::new();
    for name in names {
        let claim = claims.get(&name).await.map_err(|e| {
            format!(
                "reading ResourceClaim {ns}/{name} (the agent needs get on resourceclaims): {e}"
            )
        })?;
        out.push(dra::resolve(&claim, slices)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    fn pod(name: &str, uid: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "team-a", "uid": uid, "resourceVersion": "5",
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]}
        })
    }

    /// The exact requests of the pod watch: a list and then a watch, both restricted
    /// to this node by field selector; managedFields are stripped; a deleted pod stays
    /// resolvable.
    #[tokio::test]
    async fn the_pod_cache_lists_then_watches_only_this_node() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let api = tokio::spawn(async move {
            // The Node is read by name (get only) beside the pod list and watch, in
            // whichever order the tasks run.
            let mut pod_requests = 0;
            let mut node_gets = 0;
            while let Some((req, send)) = handle.next_request().await {
                let q = req.uri().query().unwrap_or_default().to_string();
                if req.uri().path() == "/api/v1/nodes/node-1" {
                    assert_eq!(req.method(), http::Method::GET);
                    node_gets += 1;
                    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": "node-1", "labels": {"nvidia.com/gpu.replicas": "4"}}});
                    send.send_response(Response::new(Body::from(
                        serde_json::to_vec(&node).unwrap(),
                    )));
                    continue;
                }
                assert_eq!(req.uri().path(), "/api/v1/pods", "only pods and this Node");
                assert!(q.contains("fieldSelector=spec.nodeName%3Dnode-1"), "{q}");
                pod_requests += 1;
                match pod_requests {
                    1 => {
                        assert!(!q.contains("watch=true"), "a list first: {q}");
                        let list = serde_json::json!({
                            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"},
                            "items": [pod("a", "uid-a"), pod("b", "uid-b")]
                        });
                        send.send_response(Response::new(Body::from(
                            serde_json::to_vec(&list).unwrap(),
                        )));
                    }
                    2 => {
                        assert!(
                            q.contains("watch=true") && q.contains("resourceVersion=10"),
                            "{q}"
                        );
                        let mut lines = Vec::new();
                        for (ty, obj) in
                            [("ADDED", pod("c", "uid-c")), ("DELETED", pod("a", "uid-a"))]
                        {
                            lines.extend(
                                serde_json::to_vec(&serde_json::json!({"type": ty, "object": obj}))
                                    .unwrap(),
                            );
                            lines.push(b'\n');
                        }
                        send.send_response(Response::new(Body::from(lines)));
                    }
                    // Keep the mock alive: the watcher re-watches after the stream ends.
                    _ => std::future::pending::<()>().await,
                }
                assert!(node_gets <= 1, "the Node is read every 30 s, not more");
            }
        });
        let cache = PodCache::start(client, "node-1");
        tokio::time::timeout(Duration::from_secs(5), cache.wait_synced())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut names: Vec<String> = cache.pods().iter().map(|p| p.name_any()).collect();
            names.sort();
            if names == ["b", "c"] {
                break;
            }
            assert!(Instant::now() < deadline, "pods: {names:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            cache.pods().iter().all(|p| p
                .metadata
                .managed_fields
                .as_ref()
                .is_none_or(Vec::is_empty))
        );
        while !cache.is_synced() {
            assert!(Instant::now() < deadline, "the Node was never tried");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let node = cache.node().expect("the Node was read");
        assert_eq!(
            node.metadata.labels.as_ref().unwrap()["nvidia.com/gpu.replicas"],
            "4"
        );
        assert!(
            cache
                .with_deleted()
                .iter()
                .any(|(p, deleted)| *deleted && p.name_any() == "a"),
            "a deleted pod's last state is kept for the collectors"
        );
        let gone = cache
            .find("team-a", "a")
            .expect("a deleted pod stays resolvable for a while");
        assert_eq!(gone.uid().as_deref(), Some("uid-a"));
        assert!(cache.find("team-a", "zzz").is_none());
        api.abort();
    }
}
