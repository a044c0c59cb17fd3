//! A stand-in for the Kubernetes API that serves only what the node agent's pod cache
//! uses: `GET /api/v1/pods` (list, with a `spec.nodeName=` field selector) and its
//! watch (chunked JSON events), over plain HTTP on 127.0.0.1, plus a kubeconfig
//! pointing at it. Tests play kubelet by writing pods with [`PodsApi::put`].
//!
//! It is deliberately small: the operator issue brings the full in-memory API server
//! (CRDs, all verbs, 410 Gone, selectors, SSA); the agent tests move onto it then.
//! Not implemented: pagination (`limit`/`continue` are ignored), bookmarks, 410 Gone,
//! label selectors, authentication.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::broadcast;

#[derive(Debug)]
struct Inner {
    pods: BTreeMap<String, Value>,
    version: u64,
    events: broadcast::Sender<(u64, String, Value)>,
}

/// The stand-in API server.
#[derive(Debug, Clone)]
pub struct PodsApi {
    inner: Arc<Mutex<Inner>>,
    /// `http://127.0.0.1:port`.
    pub url: String,
}

fn node_of(pod: &Value) -> &str {
    pod["spec"]["nodeName"].as_str().unwrap_or_default()
}

fn wanted_node(q: &BTreeMap<String, String>) -> Option<String> {
    q.get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .map(str::to_string)
}

async fn pods(State(api): State<PodsApi>, Query(q): Query<BTreeMap<String, String>>) -> Response {
    let node = wanted_node(&q);
    let keep = move |p: &Value| node.as_deref().is_none_or(|n| node_of(p) == n);
    if q.get("watch").map(String::as_str) == Some("true") {
        let since: u64 = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let rx = api.inner.lock().unwrap().events.subscribe();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => return Some((ev, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .filter(move |(v, _, p)| std::future::ready(*v > since && keep(p)))
        .map(|(_, ty, p)| {
            let mut line = serde_json::to_vec(&json!({"type": ty, "object": p})).unwrap();
            line.push(b'\n');
            Ok::<_, std::convert::Infallible>(line)
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let inner = api.inner.lock().unwrap();
    let items: Vec<&Value> = inner.pods.values().filter(|p| keep(p)).collect();
    let list = json!({
        "apiVersion": "v1", "kind": "PodList",
        "metadata": {"resourceVersion": inner.version.to_string()},
        "items": items,
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&list).unwrap()))
        .unwrap()
}

impl PodsApi {
    /// Starts serving on a free port of 127.0.0.1 (on the current tokio runtime).
    pub async fn start() -> PodsApi {
        let (events, _) = broadcast::channel(4096);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = PodsApi {
            inner: Arc::new(Mutex::new(Inner {
                pods: BTreeMap::new(),
                version: 1,
                events,
            })),
            url: format!("http://{}", listener.local_addr().unwrap()),
        };
        let app = Router::new()
            .route("/api/v1/pods", get(pods))
            .with_state(api.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        api
    }

    /// Creates or replaces a pod (keyed by namespace/name), as the API server and a
    /// kubelet would; watchers see ADDED or MODIFIED.
    pub fn put(&self, mut pod: Value) {
        let mut inner = self.inner.lock().unwrap();
        inner.version += 1;
        let v = inner.version;
        pod["metadata"]["resourceVersion"] = json!(v.to_string());
        let key = format!(
            "{}/{}",
            pod["metadata"]["namespace"].as_str().unwrap_or("default"),
            pod["metadata"]["name"].as_str().unwrap_or_default()
        );
        let ty = if inner.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        inner.pods.insert(key, pod.clone());
        let _ = inner.events.send((v, ty.into(), pod));
    }

    /// Deletes a pod; watchers see DELETED.
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.version += 1;
        let v = inner.version;
        if let Some(mut pod) = inner.pods.remove(&format!("{namespace}/{name}")) {
            pod["metadata"]["resourceVersion"] = json!(v.to_string());
            let _ = inner.events.send((v, "DELETED".into(), pod));
        }
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stub\n  cluster: {{server: '{}'}}\nusers:\n- name: stub\n  user: {{}}\ncontexts:\n- name: stub\n  context: {{cluster: stub, user: stub, namespace: default}}\ncurrent-context: stub\n",
                self.url
            ),
        )
        .unwrap();
        path
    }
}
