//! The parts of a cluster that run no code here, played by a test through the API as
//! the real components would write: a node's kubelet (registers its Node, keeps the
//! `Ready` condition's heartbeat fresh, writes pod status through `/status`), the node
//! lifecycle controller (removes the `not-ready` taint once the node is Ready) and the
//! scheduler (binds pods through `pods/{name}/binding`).
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node as NodeObject, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// How often the kubelet refreshes its Node's `Ready` condition.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The taint a new node carries until the node lifecycle controller sees it Ready.
const NOT_READY: &str = "node.kubernetes.io/not-ready";

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

fn ready_status(ready: bool, since: &str) -> Value {
    let (status, reason, message) = if ready {
        ("True", "KubeletReady", "kubelet is posting ready status")
    } else {
        ("False", "KubeletNotReady", "container runtime is starting")
    };
    json!({"status": {"conditions": [{"type": "Ready", "status": status, "reason": reason,
        "message": message, "lastHeartbeatTime": now(), "lastTransitionTime": since}],
        "capacity": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "8", "pods": "110"},
        "allocatable": {"cpu": "8", "memory": "62Gi", "nvidia.com/gpu": "8", "pods": "110"}}})
}

impl Node {
    /// Registers node `name` as a kubelet does (not ready, tainted), reports it Ready,
    /// lifts the taint as the node lifecycle controller would, and keeps the heartbeat
    /// fresh until dropped.
    pub async fn register(client: &kube::Client, name: &str) -> Node {
        let nodes: Api<NodeObject> = Api::all(client.clone());
        let node: NodeObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                         "nvidia.com/gpu.present": "true"}},
            "spec": {"taints": [{"key": NOT_READY, "effect": "NoSchedule"}]},
        }))
        .expect("a valid Node");
        nodes
            .create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("registering node {name}: {e}"));
        let since = now();
        let status = |ready| Patch::Merge(ready_status(ready, &since));
        nodes
            .patch_status(name, &PatchParams::default(), &status(false))
            .await
            .expect("the kubelet's first node status");
        nodes
            .patch_status(name, &PatchParams::default(), &status(true))
            .await
            .expect("the node reported Ready");
        nodes
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": null}})),
            )
            .await
            .expect("the not-ready taint lifted");
        let (nodes2, name2) = (nodes.clone(), name.to_string());
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let _ = nodes2
                    .patch_status(
                        &name2,
                        &PatchParams::default(),
                        &Patch::Merge(ready_status(true, &since)),
                    )
                    .await;
            }
        });
        Node {
            name: name.to_string(),
            heartbeat,
        }
    }

    /// Binds pod `ns/pod` to this node, as the scheduler does.
    pub async fn bind(&self, client: &kube::Client, ns: &str, pod: &str) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let binding = json!({"apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": pod, "namespace": ns},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.name}});
        let body = serde_json::to_vec(&binding).expect("a binding serializes");
        let req = http::Request::post(format!("/api/v1/namespaces/{ns}/pods/{pod}/binding"))
            .header("content-type", "application/json")
            .body(body)
            .expect("a binding request");
        client
            .request_text(req)
            .await
            .unwrap_or_else(|e| panic!("binding pod {ns}/{pod} to {}: {e}", self.name));
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
