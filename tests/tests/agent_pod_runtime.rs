//! The agent binary measuring pod runtime from the Kubernetes API (the real control
//! plane, or `TALLY_KUBECONFIG`), the test acting as the nodes' kubelets, shipping
//! to the standalone server: GPU-seconds per subject are exact to the second, across a
//! SIGKILL of the agent, with restarts, a pod finishing mid-run, and pods that must be
//! ignored (other node, other namespace).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_tests::kube::kubelet::Node;
use tally_tests::kube::{Cluster, put_pod};
use tally_tests::{
    Proc, Standalone, await_subject_totals, bin, free_port, rfc3339, subject_totals,
    unix_now as now,
};

const METER: &str = "apiVersion: tally.dev/v1alpha1
kind: Meter
metadata:
  name: gpu-seconds
  namespace: team-a
spec:
  eventType: pod-runtime
  aggregation: SUM
  valueProperty: $.gpu_seconds
";

fn terminated(start: i64, end: i64) -> Value {
    json!({"terminated": {"exitCode": 0, "startedAt": rfc3339(start), "finishedAt": rfc3339(end)}})
}

fn pod(
    name: &str,
    ns: &str,
    node: &str,
    subject: (&str, &str),
    gpus: u32,
    state: Value,
    last: Value,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                     "annotations": {subject.0: subject.1}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "trainer",
                 "resources": {"requests": {"nvidia.com/gpu": gpus.to_string()}, "limits": {"nvidia.com/gpu": gpus.to_string()}}}]},
        "status": {"phase": "Running", "qosClass": "BestEffort",
                   "containerStatuses": [{"name": "main", "image": "trainer", "imageID": "", "ready": true,
                                          "restartCount": 1, "state": state, "lastState": last}]}
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn gpu_seconds_per_subject_are_exact_across_an_agent_sigkill() {
    let Some(cluster) = Cluster::connect("agent_pod_runtime").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Standalone::with_meter(root, METER);
    let addr = server.addr.clone();

    let kube = cluster.client().await;
    cluster.namespaces(&kube, &["team-a", "other"]).await;
    // Pods on a Node that does not exist are removed by the pod garbage collector.
    let nodes = [
        Node::register(&kube, "node-1").await,
        Node::register(&kube, "node-2").await,
    ];
    let base = now().div_euclid(60) * 60 - 900;
    let none = json!({});
    let t = ("tally.dev/subject", "customer-a");
    // 120 s × 2 GPUs, long finished.
    put_pod(
        &kube,
        pod(
            "a",
            "team-a",
            "node-1",
            t,
            2,
            terminated(base + 10, base + 130),
            none.clone(),
        ),
    )
    .await;
    // Restarted once: 50 s + 145 s, × 1 GPU; subject from OpenMeter's annotation.
    put_pod(
        &kube,
        pod(
            "b",
            "team-a",
            "node-1",
            ("openmeter.io/subject", "customer-b"),
            1,
            terminated(base + 55, base + 200),
            terminated(base, base + 50),
        ),
    )
    .await;
    // Running now; finishes during the test.
    let c_start = now() - 20;
    put_pod(
        &kube,
        pod(
            "c",
            "team-a",
            "node-1",
            t,
            4,
            json!({"running": {"startedAt": rfc3339(c_start)}}),
            none.clone(),
        ),
    )
    .await;
    // Not ours: another node, another namespace.
    put_pod(
        &kube,
        pod(
            "d",
            "team-a",
            "node-2",
            ("tally.dev/subject", "customer-x"),
            8,
            terminated(base, base + 300),
            none.clone(),
        ),
    )
    .await;
    put_pod(
        &kube,
        pod(
            "e",
            "other",
            "node-1",
            ("tally.dev/subject", "customer-x"),
            8,
            terminated(base, base + 300),
            none.clone(),
        ),
    )
    .await;

    let config = root.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "sink:\n  ingest: {{url: 'http://{addr}', batchEvents: 100}}\nspool: {{path: '{}'}}\nmetricsListen: '127.0.0.1:{}'\ncollectors:\n- namespace: team-a\n  name: gpus\n  spec:\n    eventType: pod-runtime\n    podRuntime: {{windowSecs: 10, settleSecs: 3, cgroup: {{enabled: false}}}}\n",
            root.join("spool").display(),
            free_port()
        ),
    )
    .unwrap();
    let kubeconfig = cluster.kubeconfig.clone();
    let envs = [
        ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ("NODE_NAME", "node-1"),
        ("RUST_LOG", "info"),
    ];
    let mut agent = Proc::start(
        bin("tally-agent"),
        &["--config", config.to_str().unwrap()],
        &envs,
        root.join("agent.log"),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    agent.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.spawn();
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The kubelet reports pod c finished.
    let c_end = now();
    let mut c = pod(
        "c",
        "team-a",
        "node-1",
        t,
        4,
        terminated(c_start, c_end),
        none.clone(),
    );
    c["status"]["phase"] = json!("Succeeded");
    put_pod(&kube, c).await;

    let expected = BTreeMap::from([
        (
            "customer-a".to_string(),
            120 * 2 + (c_end - c_start) as u64 * 4,
        ),
        ("customer-b".to_string(), 50 + 145),
    ]);
    let client = reqwest::Client::new();
    let waited = Instant::now();
    let query = ("team-a", "gpu_seconds");
    let got = await_subject_totals(&client, &addr, query, &expected, Duration::from_secs(60)).await;
    assert_eq!(got.as_ref(), Some(&expected), "agent log:\n{}", agent.log());
    eprintln!("totals exact {:?} after pod c finished", waited.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        subject_totals(&client, &addr, query.0, query.1)
            .await
            .as_ref(),
        Some(&expected),
        "nothing arrives twice"
    );
    assert!(agent.terminate(), "graceful shutdown:\n{}", agent.log());
    server.kill9();
    for node in nodes {
        node.remove(&kube).await;
    }
}
