//! The parts of a cluster that run no code here, played by a test through the API as
//! the real components write: a node's kubelet (registers its Node, keeps the `Ready`
//! condition's heartbeat fresh, writes pod status through `/status`, completes the
//! deletion of its pods) and the scheduler (binds pods through `pods/{name}/binding`).
//! Taints are left to the real node lifecycle controller, and every workload's status
//! to its real controller: a test never writes them.
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node as NodeObject, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

/// How often the kubelet refreshes its Node's `Ready` condition (the node lifecycle
/// controller marks a node NotReady after 50 s without one).
const HEARTBEAT: Duration = Duration::from_secs(10);

/// How often [`PodRunner`] looks at its namespace's pods.
const RUNNER_EVERY: Duration = Duration::from_millis(300);

/// A registered Node whose kubelet is alive: its heartbeat stops when this is dropped.
#[derive(Debug)]
pub struct Node {
    /// The node's name.
    pub name: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

fn now() -> String {
    crate::rfc3339(crate::unix_now())
}

fn ready_status(since: &str, capacity: &Value) -> Value {
    json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "kubelet is posting ready status", "lastHeartbeatTime": now(), "lastTransitionTime": since}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "capacity": capacity, "allocatable": capacity}})
}

impl Node {
    /// Registers node `name` as a kubelet does, reports it Ready and keeps the
    /// heartbeat fresh until dropped. A Node left from an earlier run is taken over.
    pub async fn register(client: &kube::Client, name: &str) -> Node {
        Node::register_as(
            client,
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                             "kubernetes.io/os": "linux", "nvidia.com/gpu.present": "true"}},
                "status": {"capacity": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "8", "pods": "110"}},
            }),
        )
        .await
    }

    /// Registers the Node `object` (metadata as its labellers write it, e.g. GPU
    /// Feature Discovery; `status.capacity` as its kubelet and device plugins report)
    /// and keeps it Ready until dropped.
    pub async fn register_as(client: &kube::Client, object: Value) -> Node {
        let nodes: Api<NodeObject> = Api::all(client.clone());
        let name = object["metadata"]["name"]
            .as_str()
            .expect("the Node's name")
            .to_string();
        let capacity = object["status"]["capacity"].clone();
        let mut spec = object.clone();
        if let Some(o) = spec.as_object_mut() {
            o.remove("status");
        }
        let node: NodeObject = serde_json::from_value(spec).expect("a valid Node");
        super::create_or_keep(&nodes, &node, &format!("node {name}")).await;
        let since = now();
        nodes
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(ready_status(&since, &capacity)),
            )
            .await
            .expect("the node reported Ready");
        let (nodes2, name2) = (nodes.clone(), name.clone());
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let _ = nodes2
                    .patch_status(
                        &name2,
                        &PatchParams::default(),
                        &Patch::Merge(ready_status(&since, &capacity)),
                    )
                    .await;
            }
        });
        Node { name, heartbeat }
    }

    /// Stops the heartbeat and deletes the Node (so a later test on the same control
    /// plane does not get DaemonSet pods for it).
    pub async fn remove(self, client: &kube::Client) {
        self.heartbeat.abort();
        let nodes: Api<NodeObject> = Api::all(client.clone());
        let _ = nodes.delete(&self.name, &DeleteParams::default()).await;
    }

    /// Binds pod `ns/pod` to this node, as the scheduler does.
    pub async fn bind(&self, client: &kube::Client, ns: &str, pod: &str) {
        bind(client, ns, pod, &self.name)
            .await
            .unwrap_or_else(|e| panic!("binding pod {ns}/{pod} to {}: {e}", self.name));
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let bound = pods.get(pod).await.expect("the bound pod");
        assert_eq!(
            bound.spec.and_then(|s| s.node_name).as_deref(),
            Some(self.name.as_str()),
            "pod {ns}/{pod} is bound"
        );
    }

    /// Writes the status of pod `ns/pod` (which must be on this node) as its kubelet.
    pub async fn pod_status(&self, client: &kube::Client, ns: &str, pod: &str, status: Value) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.patch_status(
            pod,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .unwrap_or_else(|e| panic!("writing the status of pod {ns}/{pod}: {e}"));
    }
}

async fn bind(client: &kube::Client, ns: &str, pod: &str, node: &str) -> kube::Result<()> {
    let binding = json!({"apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod, "namespace": ns},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
    let body = serde_json::to_vec(&binding).expect("a binding serializes");
    let req = http::Request::post(format!("/api/v1/namespaces/{ns}/pods/{pod}/binding"))
        .header("content-type", "application/json")
        .body(body)
        .expect("a binding request");
    client.request_text(req).await.map(drop)
}

/// The node a DaemonSet pod is pinned to (its required node affinity on
/// `metadata.name`, as the DaemonSet controller writes it).
fn pinned_node(pod: &Pod) -> Option<String> {
    let v = serde_json::to_value(pod).ok()?;
    let terms = v["spec"]["affinity"]["nodeAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        .as_array()?
        .clone();
    terms.iter().find_map(|t| {
        t["matchFields"].as_array()?.iter().find_map(|f| {
            (f["key"] == "metadata.name" && f["operator"] == "In")
                .then(|| f["values"][0].as_str().map(str::to_string))?
        })
    })
}

/// Whether every PersistentVolumeClaim the pod mounts is Bound.
async fn claims_bound(client: &kube::Client, ns: &str, pod: &Pod) -> bool {
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), ns);
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for claim in volumes
        .iter()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
    {
        let phase = claims
            .get_opt(&claim.claim_name)
            .await
            .ok()
            .flatten()
            .and_then(|c| c.status)
            .and_then(|s| s.phase);
        if phase.as_deref() != Some("Bound") {
            return false;
        }
    }
    true
}

/// A running pod's status as a kubelet reports it: every container running and ready.
fn running_status(pod: &Pod) -> Value {
    let started = now();
    let containers: Vec<Value> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            json!({"name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                   "ready": true, "started": true, "restartCount": 0,
                   "state": {"running": {"startedAt": started}}})
        })
        .collect();
    let condition = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": started});
    json!({"status": {"phase": "Running", "hostIP": "127.0.0.1", "startTime": started,
        "conditions": [condition("PodScheduled"), condition("Initialized"),
                       condition("ContainersReady"), condition("Ready")],
        "containerStatuses": containers}})
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Plays the scheduler and the kubelets of some nodes for the pods that controllers
/// (DaemonSet, ReplicaSet) make in one namespace: binds each pending one whose claims
/// are bound (a DaemonSet pod to the node it is pinned to, any other to the first
/// node), reports each bound
/// one Running and Ready, and completes the deletion of those being deleted, as a
/// kubelet does once their containers stopped. Pods without an owner (a user's) are
/// left to the test. Stops when dropped.
#[derive(Debug)]
pub struct PodRunner {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodRunner {
    /// Starts running the controllers' pods of `namespace` on `nodes`.
    pub fn start(client: &kube::Client, namespace: &str, nodes: &[&Node]) -> PodRunner {
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let client = client.clone();
        let ns = namespace.to_string();
        let nodes: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(pods) = api.list(&ListParams::default()).await {
                    for pod in pods {
                        run_one(&client, &api, &ns, &nodes, &pod).await;
                    }
                }
                tokio::time::sleep(RUNNER_EVERY).await;
            }
        });
        PodRunner { task }
    }
}

async fn run_one(client: &kube::Client, api: &Api<Pod>, ns: &str, nodes: &[String], pod: &Pod) {
    if pod.owner_references().is_empty() {
        return;
    }
    let name = pod.name_any();
    let on = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    if pod.metadata.deletion_timestamp.is_some() {
        if on.as_ref().is_none_or(|n| nodes.contains(n)) {
            let now = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            let _ = api.delete(&name, &now).await;
        }
        return;
    }
    match on {
        // As the scheduler: a pod whose claim is not bound waits ("unbound immediate
        // PersistentVolumeClaims").
        None if !claims_bound(client, ns, pod).await => {}
        None => {
            let target = pinned_node(pod).or_else(|| nodes.first().cloned());
            if let Some(node) = target.filter(|n| nodes.contains(n)) {
                // A lost race (already bound) is seen on the next look.
                let _ = bind(client, ns, &name, &node).await;
            }
        }
        Some(node) if nodes.contains(&node) && !is_ready(pod) => {
            let _ = api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(running_status(pod)),
                )
                .await;
        }
        Some(_) => {}
    }
}

/// A container's status as the kubelet writes it.
pub fn container(name: &str, restarts: u32, state: Value, last: Value) -> Value {
    json!({"name": name, "image": "trainer", "imageID": "", "ready": state.get("running").is_some(),
           "restartCount": restarts, "state": state, "lastState": last})
}

/// A pod whose one container `name` runs since Unix second `since`.
pub fn running(name: &str, since: i64) -> Value {
    json!({"phase": "Running", "containerStatuses": [
        container(name, 0, json!({"running": {"startedAt": crate::rfc3339(since)}}), json!({}))]})
}

/// A container state: terminated with `code` after running from `start` to `end`.
pub fn terminated(start: i64, end: i64, code: i32) -> Value {
    json!({"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                          "startedAt": crate::rfc3339(start), "finishedAt": crate::rfc3339(end)}})
}

/// A pod whose one container `name` finished, after `restarts` restarts (`last` being
/// the state before).
pub fn finished(name: &str, restarts: u32, start: i64, end: i64, last: Value) -> Value {
    json!({"phase": "Succeeded", "containerStatuses": [
        container(name, restarts, terminated(start, end, 0), last)]})
}

impl Node {
    /// Binds `ns/name` to this node and runs its one container `c` for `secs` from
    /// now, as the scheduler and the kubelet would.
    pub async fn run_pod(
        &self,
        client: &kube::Client,
        (ns, name): (&str, &str),
        c: &str,
        secs: i64,
    ) {
        self.bind(client, ns, name).await;
        let start = crate::unix_now();
        self.pod_status(client, ns, name, running(c, start)).await;
        let wait = start + secs - crate::unix_now();
        if wait > 0 {
            tokio::time::sleep(Duration::from_secs(wait as u64)).await;
        }
        let done = finished(c, 0, start, start + secs, json!({}));
        self.pod_status(client, ns, name, done).await;
    }
}
