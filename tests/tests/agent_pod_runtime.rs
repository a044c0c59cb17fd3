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

/// A pod of `subject` on `node` whose one container requests (and is limited to)
/// `requests`, in container state `state`.
fn device_pod(name: &str, node: &str, subject: &str, requests: Value, state: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "team-a", "annotations": {"tally.dev/subject": subject}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "trainer",
                 "resources": {"requests": requests.clone(), "limits": requests}}]},
        "status": {"phase": "Running", "qosClass": "BestEffort",
                   "containerStatuses": [{"name": "main", "image": "trainer", "imageID": "", "ready": false,
                                          "restartCount": 0, "state": state}]}
    })
}

/// One of the collectors crate's Node fixtures, shaped as GPU Feature Discovery (and
/// HAMi) label them.
fn node_fixture(name: &str) -> Value {
    let path = tally_tests::repo().join(format!("collectors/tests/fixtures/nodes/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Per-subject sums of `gpu_seconds` as the server answers them, unrounded.
async fn gpu_totals(http: &reqwest::Client, addr: &str) -> BTreeMap<String, f64> {
    let url =
        format!("http://{addr}/api/v1/namespaces/team-a/meters/gpu_seconds/query?groupBy=subject");
    let Ok(r) = http.get(url).send().await else {
        return BTreeMap::new();
    };
    let body: Value = r.json().await.unwrap_or_default();
    body["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            (
                row["groupBy"]["subject"]
                    .as_str()
                    .or(row["subject"].as_str())
                    .unwrap_or_default()
                    .to_string(),
                row["value"].as_f64().unwrap_or_default(),
            )
        })
        .collect()
}

/// Shared GPUs billed by their share, on the real apiserver: Nodes labelled as GFD
/// labels them (MIG mixed on an A100 and an A30, MIG single on an H100, time-slicing,
/// MPS, renamed shared replicas, HAMi, no labels, and a MIG product tally cannot
/// price) and DRA objects shaped as NVIDIA's DRA driver writes them (a ResourceSlice
/// with a whole GPU and MIG devices, claims allocated and reserved as the scheduler
/// does) are created and read back, one agent per node measures its pods, and each
/// subject's GPU-seconds equal the hand computation within 1e-9. Two subjects have
/// pods on the MIG node, the time-sliced node and the DRA node, where one claim is
/// shared by a pod of each. Short pods are never lost: one
/// lives 2 s and one is OOM-killed, and both are deleted with grace 0 right after the
/// final status is written, before the agent looks again.
#[tokio::test(flavor = "multi_thread")]
async fn shared_gpus_are_billed_by_their_share_on_every_sharing_mode() {
    let Some(cluster) = Cluster::connect("agent_pod_runtime (shared GPUs)").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut server = Standalone::with_meter(root, METER);
    let addr = server.addr.clone();
    let kube = cluster.client().await;
    cluster.namespaces(&kube, &["team-a"]).await;

    let fixtures = [
        "mig-mixed-a100",
        "mig-mixed-a30",
        "mig-single-h100",
        "time-slicing-t4",
        "mps-l4",
        "renamed-shared-a10g",
        "hami-a100",
        "no-gfd",
        "mig-unknown-product",
        "dra",
    ];
    let mut nodes = BTreeMap::new();
    let node_api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(kube.clone());
    for f in fixtures {
        let object = if f == "dra" {
            json!({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": "gpu-dra", "labels": {"kubernetes.io/hostname": "gpu-dra"}},
                   "status": {"capacity": {"cpu": "64", "memory": "512Gi", "pods": "110"}}})
        } else {
            node_fixture(f)
        };
        let node = Node::register_as(&kube, object.clone()).await;
        // Read back: the labels and annotations the agent will see are the fixture's.
        let back = node_api.get(&node.name).await.unwrap();
        let labels = serde_json::to_value(back.metadata.labels.unwrap_or_default()).unwrap();
        for (k, v) in object["metadata"]["labels"].as_object().unwrap() {
            assert_eq!(&labels[k], v, "{f}: label {k}");
        }
        if let Some(a) = object["metadata"]["annotations"].as_object() {
            let back = serde_json::to_value(back.metadata.annotations.unwrap_or_default()).unwrap();
            for (k, v) in a {
                assert_eq!(&back[k], v, "{f}: annotation {k}");
            }
        }
        nodes.insert(f, node);
    }
    let name_of = |f: &str| nodes[f].name.clone();
    let base = now().div_euclid(60) * 60 - 600;
    let ran = |start: i64, secs: i64| terminated(base + start, base + start + secs);
    // (pod, fixture, subject, requests, start, seconds, GPUs per second by the rule)
    let pods: Vec<(&str, &str, &str, Value, i64, i64, f64)> = vec![
        // two subjects on the MIG node and the time-sliced node
        (
            "acme-mig",
            "mig-mixed-a100",
            "acme",
            json!({"nvidia.com/mig-3g.20gb": "1"}),
            13,
            53,
            3.0 / 7.0 / 2.0,
        ),
        (
            "acme-ts",
            "time-slicing-t4",
            "acme",
            json!({"nvidia.com/gpu": "1"}),
            7,
            37,
            1.0 / 4.0,
        ),
        (
            "globex-mig",
            "mig-mixed-a100",
            "globex",
            json!({"nvidia.com/mig-1g.5gb": "2"}),
            22,
            41,
            2.0 / 7.0,
        ),
        (
            "globex-ts",
            "time-slicing-t4",
            "globex",
            json!({"nvidia.com/gpu": "3"}),
            31,
            29,
            3.0 / 4.0,
        ),
        // one subject per other mode
        (
            "a30",
            "mig-mixed-a30",
            "a30",
            json!({"nvidia.com/mig-1g.6gb": "3"}),
            5,
            43,
            3.0 / 4.0,
        ),
        (
            "h100",
            "mig-single-h100",
            "h100",
            json!({"nvidia.com/gpu": "2"}),
            9,
            59,
            2.0 / 7.0,
        ),
        (
            "mps",
            "mps-l4",
            "mps",
            json!({"nvidia.com/gpu": "2"}),
            3,
            47,
            2.0 / 3.0,
        ),
        (
            "shared",
            "renamed-shared-a10g",
            "shared",
            json!({"nvidia.com/gpu.shared": "2"}),
            11,
            39,
            2.0 / 5.0,
        ),
        (
            "hami",
            "hami-a100",
            "hami",
            json!({"nvidia.com/gpu": "1", "nvidia.com/gpucores": "35", "nvidia.com/gpumem": "8000"}),
            17,
            51,
            0.35,
        ),
        (
            "plain",
            "no-gfd",
            "plain",
            json!({"nvidia.com/gpu": "2", "amd.com/gpu": "1"}),
            19,
            33,
            2.0,
        ),
        (
            "unknown",
            "mig-unknown-product",
            "unknown",
            json!({"nvidia.com/mig-1g.24gb": "1"}),
            2,
            31,
            0.0,
        ),
    ];
    let mut expected: BTreeMap<String, f64> = BTreeMap::new();
    for (name, f, subject, requests, start, secs, share) in &pods {
        put_pod(
            &kube,
            device_pod(
                name,
                &name_of(f),
                subject,
                requests.clone(),
                ran(*start, *secs),
            ),
        )
        .await;
        *expected.entry(subject.to_string()).or_default() += share * *secs as f64;
    }
    // the AMD GPU of pod `plain` is its second kind: its own event, one whole device
    *expected.get_mut("plain").unwrap() += 33.0;

    // DRA: the driver's ResourceSlice, two claims, pods using them; then the claims'
    // allocation and reservation, as the scheduler writes them.
    let dra_fixture = |name: &str| -> Value {
        let path = tally_tests::repo().join(format!("collectors/tests/fixtures/dra/{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    };
    use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
    let slices: kube::Api<ResourceSlice> = kube::Api::all(kube.clone());
    let slice: ResourceSlice = serde_json::from_value(dra_fixture("resourceslice")).unwrap();
    let _ = slices
        .delete(slice.metadata.name.as_deref().unwrap(), &Default::default())
        .await;
    slices.create(&Default::default(), &slice).await.unwrap();
    let claims: kube::Api<ResourceClaim> = kube::Api::namespaced(kube.clone(), "team-a");
    let pods_api: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(kube.clone(), "team-a");
    // (pod, claim, subject, start, seconds)
    let dra_pods = [
        ("acme-dra", "shared-gpu", "acme", 100, 53),
        ("globex-dra", "shared-gpu", "globex", 120, 41),
        ("acme-dra-mig", "mig-3g", "acme", 4, 47),
    ];
    for (name, claim, subject, start, secs) in dra_pods {
        let mut p = device_pod(name, "gpu-dra", subject, json!({}), ran(start, secs));
        p["spec"]["resourceClaims"] = json!([{"name": "gpu", "resourceClaimName": claim}]);
        p["spec"]["containers"][0]["resources"] = json!({"claims": [{"name": "gpu"}]});
        put_pod(&kube, p).await;
    }
    for (file, claim) in [("claim-shared-gpu", "shared-gpu"), ("claim-mig", "mig-3g")] {
        let mut c = dra_fixture(file);
        let status = c.as_object_mut().unwrap().remove("status").unwrap();
        let object: ResourceClaim = serde_json::from_value(c).unwrap();
        let _ = claims.create(&Default::default(), &object).await;
        let mut reserved = Vec::new();
        for (name, _, _, _, _) in dra_pods.iter().filter(|p| p.1 == claim) {
            let uid = pods_api.get(name).await.unwrap().metadata.uid.unwrap();
            reserved.push(json!({"resource": "pods", "name": name, "uid": uid}));
        }
        let mut status = status;
        status["reservedFor"] = Value::from(reserved);
        claims
            .patch_status(
                claim,
                &Default::default(),
                &kube::api::Patch::Merge(json!({"status": status})),
            )
            .await
            .unwrap_or_else(|e| panic!("allocating claim {claim}: {e}"));
        let back = claims.get(claim).await.unwrap();
        assert!(
            back.status.and_then(|s| s.allocation).is_some(),
            "{claim} reads back allocated"
        );
    }
    // the shared whole GPU: 20 s alone + 33 s halved; 33 s halved + 8 s alone
    *expected.get_mut("acme").unwrap() += 20.0 + 33.0 / 2.0 + 47.0 * 3.0 / 7.0;
    *expected.get_mut("globex").unwrap() += 33.0 / 2.0 + 8.0;

    let mut agents = Vec::new();
    for f in fixtures {
        let dir = root.join(f);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("agent.yaml");
        let metrics = free_port();
        std::fs::write(
            &config,
            format!(
                "sink:\n  ingest: {{url: 'http://{addr}', batchEvents: 100}}\nspool: {{path: '{}'}}\nmetricsListen: '127.0.0.1:{metrics}'\ncollectors:\n- namespace: team-a\n  name: gpus\n  spec:\n    eventType: pod-runtime\n    podRuntime: {{windowSecs: 10, settleSecs: 2, cgroup: {{enabled: false}}}}\n",
                dir.join("spool").display(),
            ),
        )
        .unwrap();
        let name = name_of(f);
        let envs = [
            ("KUBECONFIG", cluster.kubeconfig.to_str().unwrap()),
            ("NODE_NAME", name.as_str()),
            ("RUST_LOG", "info"),
        ];
        let agent = Proc::start(
            bin("tally-agent"),
            &["--config", config.to_str().unwrap()],
            &envs,
            dir.join("agent.log"),
        );
        agents.push((f, agent, metrics));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Short pods, while the agents run: the final status a kubelet writes, then a
    // deletion with grace 0, faster than the agent's one look per second.
    let grace0 = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let t = now();
    let short = [
        (
            "short",
            "mig-mixed-a100",
            "globex",
            json!({"nvidia.com/mig-2g.10gb": "1"}),
            terminated(t - 3, t - 1),
            2,
            2.0 / 7.0,
        ),
        (
            "oom",
            "time-slicing-t4",
            "acme",
            json!({"nvidia.com/gpu": "1"}),
            json!({"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": rfc3339(t - 12), "finishedAt": rfc3339(t - 1)}}),
            11,
            1.0 / 4.0,
        ),
    ];
    for (name, f, subject, requests, state, secs, share) in short {
        let mut p = device_pod(name, &name_of(f), subject, requests, state);
        p["status"]["phase"] = json!("Failed");
        put_pod(&kube, p).await;
        pods_api.delete(name, &grace0).await.unwrap();
        *expected.get_mut(subject).unwrap() += share * secs as f64;
    }
    expected.remove("unknown");

    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let close = |got: &BTreeMap<String, f64>| {
        got.len() >= expected.len()
            && expected
                .iter()
                .all(|(s, v)| got.get(s).is_some_and(|g| (g - v).abs() < 1e-9))
    };
    let mut got = gpu_totals(&http, &addr).await;
    while !close(&got) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        got = gpu_totals(&http, &addr).await;
    }
    let logs: String = agents
        .iter()
        .map(|(f, a, _)| format!("--- {f}\n{}", a.log()))
        .collect();
    assert!(close(&got), "got {got:?}\nexpected {expected:?}\n{logs}");
    // The MIG device tally cannot price is reported, never billed as 0 or 1.
    assert!(
        got.get("unknown").is_none_or(|v| *v == 0.0),
        "an unknown share is not billed: {got:?}"
    );
    let unknown_metrics = agents
        .iter()
        .find(|(f, _, _)| *f == "mig-unknown-product")
        .map(|(_, _, port)| *port)
        .unwrap();
    let body = http
        .get(format!("http://127.0.0.1:{unknown_metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.lines()
            .any(|l| l.starts_with("tally_agent_gpu_share_unknown_total{") && !l.ends_with(" 0")),
        "{body}"
    );
    eprintln!("GPU-seconds per subject: {got:?}");
    for (_, mut a, _) in agents {
        assert!(a.terminate(), "graceful shutdown:\n{}", a.log());
    }
    server.kill9();
    for name in ["shared-gpu", "mig-3g"] {
        let _ = claims.delete(name, &Default::default()).await;
    }
    let _ = slices
        .delete(slice.metadata.name.as_deref().unwrap(), &Default::default())
        .await;
    for (_, node) in nodes {
        node.remove(&kube).await;
    }
}
