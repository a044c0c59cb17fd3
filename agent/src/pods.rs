//! The node-local pod cache: a watch of the pods bound to this node (field selector
//! `spec.nodeName`), managedFields stripped, with delayed deletion so a pod that just
//! ended still resolves (e.g. a DCGM sample naming it) for [`KEEP_DELETED`].
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

/// How long a deleted pod stays resolvable.
pub const KEEP_DELETED: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
struct State {
    pods: HashMap<String, (Arc<Pod>, Option<Instant>)>,
    /// Uids seen since the current (re)list began.
    relisting: Option<Vec<String>>,
}

/// Pods on this node.
#[derive(Debug, Clone)]
pub struct PodCache {
    state: Arc<RwLock<State>>,
    synced: watch::Receiver<bool>,
}

impl PodCache {
    /// Starts watching the pods of `node`; the task runs until the runtime stops.
    pub fn start(client: Client, node: &str) -> PodCache {
        let api: Api<Pod> = Api::all(client);
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (tx, synced) = watch::channel(false);
        let cache = PodCache {
            state: Arc::default(),
            synced,
        };
        let state = cache.state.clone();
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
                    Err(e) => tracing::warn!(error = %e, "Pod watch failed; retrying"),
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
        };
        PodCache {
            state: Arc::new(RwLock::new(state)),
            synced,
        }
    }

    /// Waits until the first full listing arrived.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Whether the first full listing arrived.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
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
    s.pods
        .retain(|_, (_, gone)| gone.is_none_or(|t| now.duration_since(t) < KEEP_DELETED));
    match ev {
        Event::Init => {
            s.relisting = Some(Vec::new());
            false
        }
        Event::InitApply(p) | Event::Apply(p) => {
            let uid = p.uid().unwrap_or_default();
            if let Some(seen) = &mut s.relisting {
                seen.push(uid.clone());
            }
            s.pods.insert(uid, (Arc::new(p), None));
            false
        }
        Event::Delete(p) => {
            let uid = p.uid().unwrap_or_default();
            s.pods.insert(uid, (Arc::new(p), Some(now)));
            false
        }
        Event::InitDone => {
            let seen = s.relisting.take().unwrap_or_default();
            for (uid, (_, gone)) in s.pods.iter_mut() {
                if gone.is_none() && !seen.contains(uid) {
                    *gone = Some(now);
                }
            }
            true
        }
    }
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
            let (req, send) = handle.next_request().await.expect("a list request");
            let q = req.uri().query().unwrap_or_default().to_string();
            assert_eq!(req.uri().path(), "/api/v1/pods");
            assert!(q.contains("fieldSelector=spec.nodeName%3Dnode-1"), "{q}");
            assert!(!q.contains("watch=true"), "{q}");
            let list = serde_json::json!({
                "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "10"},
                "items": [pod("a", "uid-a"), pod("b", "uid-b")]
            });
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&list).unwrap(),
            )));
            let (req, send) = handle.next_request().await.expect("a watch request");
            let q = req.uri().query().unwrap_or_default().to_string();
            assert!(
                q.contains("watch=true") && q.contains("resourceVersion=10"),
                "{q}"
            );
            assert!(q.contains("fieldSelector=spec.nodeName%3Dnode-1"), "{q}");
            let mut lines = Vec::new();
            for (ty, obj) in [("ADDED", pod("c", "uid-c")), ("DELETED", pod("a", "uid-a"))] {
                lines.extend(
                    serde_json::to_vec(&serde_json::json!({"type": ty, "object": obj})).unwrap(),
                );
                lines.push(b'\n');
            }
            send.send_response(Response::new(Body::from(lines)));
            // Keep the mock alive: the watcher re-watches after the stream ends.
            let _next = handle.next_request().await;
            std::future::pending::<()>().await;
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
        let gone = cache
            .find("team-a", "a")
            .expect("a deleted pod stays resolvable for a while");
        assert_eq!(gone.uid().as_deref(), Some("uid-a"));
        assert!(cache.find("team-a", "zzz").is_none());
        api.abort();
    }
}
