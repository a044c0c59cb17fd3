//! The Collector controller against the real control plane (or `TALLY_KUBECONFIG`),
//! the test playing scheduler and kubelets of two Nodes: Collectors →
//! one ConfigMap + DaemonSet for node-scoped ones, one ConfigMap + Deployment for
//! cluster-scoped ones, RBAC; the config hash in the pod template follows every change;
//! statuses follow the workloads as the real DaemonSet controller reports them; an
//! unbound spool claim is named with its fix; a referenced Secret key is mounted (copied only into
//! the scope's Secret, never into the ConfigMap) and a missing one is reported; a
//! Collector reading the agent's files is refused; deleting the last Collector of a
//! scope removes its objects, and the last of all the agents' RBAC; at rest nothing is
//! written.
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tally_crds::Collector;
use tally_tests::kube::Cluster;
use tally_tests::kube::kubelet::{Node, PodRunner};
use tally_tests::{KeptDir, bin, eventually, free_port, start_operator};

async fn soon<T>(what: &str, probe: impl AsyncFnMut() -> Option<T>) -> T {
    eventually(
        Duration::from_secs(30),
        Duration::from_millis(100),
        what,
        probe,
    )
    .await
}

fn b64(s: &str) -> String {
    serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec()))
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

fn hash_of(cm: &ConfigMap) -> String {
    cm.metadata.annotations.as_ref().unwrap()["tally.dev/config-hash"].clone()
}

fn template_hash(ds: &serde_json::Value) -> String {
    ds["spec"]["template"]["metadata"]["annotations"]["tally.dev/config-hash"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectors_become_agent_workloads_that_follow_every_change() {
    let dir = KeptDir(Some(tempfile::tempdir().unwrap()));
    let Some(cluster) = Cluster::connect("operator_collectors").await else {
        return;
    };
    let client = cluster.client().await;
    cluster
        .namespaces(&client, &["tally-system", "team-a", "billing"])
        .await;
    let nodes = [
        Node::register(&client, "collectors-node-1").await,
        Node::register(&client, "collectors-node-2").await,
    ];
    let _pods = PodRunner::start(&client, "tally-system", &[&nodes[0], &nodes[1]]);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let _ = crds
        .create(&PostParams::default(), &tally_crds::collector_crd())
        .await;
    let dead_ch = format!("http://127.0.0.1:{}", free_port());
    // Its own identity, so the audit log tells its writes from the test's.
    let operator_kc = cluster.kubeconfig_as("tally-operator", dir.path());
    let (op, _metrics) = start_operator(
        bin("tally-operator"),
        &operator_kc,
        "tally-system",
        &[
            "--clickhouse",
            &dead_ch,
            "--agent-ingest-url",
            "http://tally-server.tally-system:8080",
            "--agent-image",
            "tally:test",
            "--collector-status-secs",
            "2",
        ],
        dir.path().join("operator.log"),
    );

    let collectors_a: Api<Collector> = Api::namespaced(client.clone(), "team-a");
    let gpus: Collector = serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Collector",
        "metadata": {"name": "gpus"}, "spec": {"eventType": "pod-runtime", "podRuntime": {"windowSecs": 60}}}))
    .unwrap();
    collectors_a
        .create(&PostParams::default(), &gpus)
        .await
        .unwrap();

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "tally-system");
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), "tally-system");
    let deps: Api<Deployment> = Api::namespaced(client.clone(), "tally-system");
    let cm = soon("the node agents' ConfigMap", async || {
        cms.get_opt("tally-agent").await.unwrap()
    })
    .await;
    let yaml = &cm.data.as_ref().unwrap()["agent.yaml"];
    assert!(
        yaml.contains("namespace: team-a") && yaml.contains("name: gpus"),
        "{yaml}"
    );
    let first_hash = hash_of(&cm);
    let ds = soon("the DaemonSet", async || {
        dss.get_opt("tally-agent").await.unwrap()
    })
    .await;
    let ds_json = serde_json::to_value(&ds).unwrap();
    assert_eq!(template_hash(&ds_json), first_hash);
    assert_eq!(
        ds_json["spec"]["template"]["spec"]["containers"][0]["image"],
        "tally:test"
    );
    // The agents' identity is applied before their workloads: once the DaemonSet
    // exists, its ServiceAccount and ClusterRole already do (no pod is refused for a
    // missing ServiceAccount).
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), "tally-system")
        .get_opt("tally-agent")
        .await
        .unwrap();
    let role = Api::<ClusterRole>::all(client.clone())
        .get_opt("tally-agent")
        .await
        .unwrap();
    assert!(
        sa.is_some() && role.is_some(),
        "the DaemonSet exists before the agents' ServiceAccount and ClusterRole"
    );
    assert!(
        deps.get_opt("tally-cluster-agent").await.unwrap().is_none(),
        "no cluster-scoped Collector, no cluster agent"
    );

    // Ready once the DaemonSet controller counts its pods (one per Node, run by the
    // test's kubelets) ready, with the counts.
    let status = soon("the Collector to be Ready", async || {
        collectors_a
            .get("gpus")
            .await
            .unwrap()
            .status
            .filter(|s| s.conditions[0].status == "True")
    })
    .await;
    assert_eq!(
        (status.desired_agents, status.ready_agents),
        (Some(2), Some(2))
    );
    assert_eq!(status.conditions[0].reason, "AgentsReady");
    assert_eq!(status.source.as_deref(), Some("podRuntime"));

    // A change of the Collector changes the hash, and so the pod template: agents roll.
    let patch = Patch::Merge(json!({"spec": {"podRuntime": {"windowSecs": 120}}}));
    collectors_a
        .patch("gpus", &PatchParams::default(), &patch)
        .await
        .unwrap();
    let second_hash = soon("a new config hash", async || {
        let cm = cms.get("tally-agent").await.unwrap();
        (hash_of(&cm) != first_hash).then(|| hash_of(&cm))
    })
    .await;
    soon("the DaemonSet to carry it", async || {
        let ds = serde_json::to_value(dss.get("tally-agent").await.unwrap()).unwrap();
        (template_hash(&ds) == second_hash).then_some(())
    })
    .await;

    // A cluster-scoped Collector brings the leader-elected cluster agent.
    let collectors_b: Api<Collector> = Api::namespaced(client.clone(), "billing");
    let openai: Collector = serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Collector",
        "metadata": {"name": "openai"}, "spec": {"eventType": "llm", "httpApi": {"preset": "openai",
        "headers": [{"name": "Authorization", "prefix": "Bearer ", "valueFromSecret": {"name": "openai-admin", "key": "admin-key"}}]}}}))
    .unwrap();
    collectors_b
        .create(&PostParams::default(), &openai)
        .await
        .unwrap();
    let dep = soon("the cluster agent", async || {
        deps.get_opt("tally-cluster-agent").await.unwrap()
    })
    .await;
    // The referenced Secret does not exist yet: the status says which and how to fix it.
    let waiting = soon("SecretNotFound", async || {
        let s = collectors_b.get("openai").await.unwrap().status?;
        (s.conditions[0].reason == "SecretNotFound").then_some(s)
    })
    .await;
    assert!(
        waiting.conditions[0]
            .message
            .contains("billing/openai-admin"),
        "{:?}",
        waiting.conditions[0]
    );
    let secret_value = "sk-admin-e2e-0123456789";
    let source: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "openai-admin", "namespace": "billing"},
        "data": {"admin-key": b64(secret_value), "unrelated": b64("not for the agent")}}))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), "billing")
        .create(&PostParams::default(), &source)
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "tally-system");
    let data = soon("the key mounted for the cluster agent", async || {
        let s = secrets
            .get_opt("tally-cluster-agent-secrets")
            .await
            .unwrap();
        s?.data.filter(|d| !d.is_empty())
    })
    .await;
    assert_eq!(data.len(), 1, "only the referenced key: {:?}", data.keys());
    let (file, value) = data.iter().next().unwrap();
    assert_eq!(value.0, secret_value.as_bytes());
    let cluster_yaml =
        cms.get("tally-cluster-agent").await.unwrap().data.unwrap()["agent.yaml"].clone();
    assert!(
        !cluster_yaml.contains(secret_value),
        "never in the ConfigMap"
    );
    assert!(
        cluster_yaml.contains(&format!("valueFromFile: /var/run/secrets/tally/{file}")),
        "{cluster_yaml}"
    );
    let volumes =
        serde_json::to_value(&dep).unwrap()["spec"]["template"]["spec"]["volumes"].clone();
    assert!(
        volumes.to_string().contains("tally-cluster-agent-secrets"),
        "{volumes}"
    );
    soon("the Secret problem to clear", async || {
        let s = collectors_b.get("openai").await.unwrap().status?;
        (s.conditions[0].reason != "SecretNotFound").then_some(())
    })
    .await;
    // A Collector may not read the agent's own files.
    let steal: Collector = serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Collector",
        "metadata": {"name": "steal"}, "spec": {"eventType": "llm", "httpApi": {"preset": "openai",
        "headers": [{"name": "Authorization", "valueFromFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}]}}}))
    .unwrap();
    collectors_b
        .create(&PostParams::default(), &steal)
        .await
        .unwrap();
    let refused = soon("the file-reading Collector refused", async || {
        collectors_b.get("steal").await.unwrap().status
    })
    .await;
    assert_eq!(refused.conditions[0].reason, "InvalidSpec");
    assert!(
        refused.conditions[0].message.contains("valueFromFile"),
        "{:?}",
        refused.conditions[0]
    );
    collectors_b
        .delete("steal", &DeleteParams::default())
        .await
        .unwrap();
    let args =
        serde_json::to_value(&dep).unwrap()["spec"]["template"]["spec"]["containers"][0]["args"]
            .clone();
    assert!(args.to_string().contains("--lease-name"), "{args}");
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "tally-system");
    let claim = claims.get("tally-cluster-agent-spool").await.unwrap();
    assert_eq!(
        serde_json::to_value(&claim).unwrap()["spec"]["accessModes"],
        json!(["ReadWriteOnce"]),
        "the cluster agent's spool outlives its pod"
    );
    // The claim stays Pending (no StorageClass, no volume: the real PV controller
    // binds nothing), which the not-ready message names, with the fix.
    let s = soon("the Pending claim in the Collector's status", async || {
        let s = collectors_b.get("openai").await.unwrap().status?;
        s.conditions[0]
            .message
            .contains("tally-cluster-agent-spool is Pending")
            .then_some(s)
    })
    .await;
    assert_eq!(s.conditions[0].reason, "AgentsNotReady");
    assert!(
        s.conditions[0]
            .message
            .contains("--cluster-agent-storage-class"),
        "{:?}",
        s.conditions[0]
    );
    let node_yaml = cms.get("tally-agent").await.unwrap().data.unwrap()["agent.yaml"].clone();
    assert!(
        !node_yaml.contains("openai"),
        "the node agents do not run cluster-scoped collectors"
    );

    // At rest: the operator writes nothing but its Lease renewals (the audit log says).
    if let Some(plane) = cluster.own_plane("operator_collectors: writes at rest") {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mark = plane.audit_mark();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let writes = plane.writes_since(mark, "tally-operator");
        assert!(writes.is_empty(), "writes at rest: {writes:?}");
    }

    // Deleting the last Collector of a scope removes that scope's objects.
    collectors_a
        .delete("gpus", &DeleteParams::default())
        .await
        .unwrap();
    soon("the DaemonSet and its ConfigMap to go", async || {
        (dss.get_opt("tally-agent").await.unwrap().is_none()
            && cms.get_opt("tally-agent").await.unwrap().is_none())
        .then_some(())
    })
    .await;
    assert!(
        deps.get_opt("tally-cluster-agent").await.unwrap().is_some(),
        "the other scope stays"
    );
    collectors_b
        .delete("openai", &DeleteParams::default())
        .await
        .unwrap();
    soon(
        "the cluster agent, its Secret and the agents' RBAC to go",
        async || {
            (deps.get_opt("tally-cluster-agent").await.unwrap().is_none()
                && secrets
                    .get_opt("tally-cluster-agent-secrets")
                    .await
                    .unwrap()
                    .is_none()
                && Api::<ClusterRole>::all(client.clone())
                    .get_opt("tally-agent")
                    .await
                    .unwrap()
                    .is_none()
                && Api::<ServiceAccount>::namespaced(client.clone(), "tally-system")
                    .get_opt("tally-cluster-agent")
                    .await
                    .unwrap()
                    .is_none())
            .then_some(())
        },
    )
    .await;
    assert!(
        claims
            .get_opt("tally-cluster-agent-spool")
            .await
            .unwrap()
            .is_some(),
        "the spool claim stays: it may hold events not yet shipped"
    );
    drop(op);
    for node in nodes {
        node.remove(&client).await;
    }
}
