//! The agent binary measuring pod runtime from the (stand-in) Kubernetes API, shipping
//! to the standalone server: GPU-seconds per subject are exact to the second, across a
//! SIGKILL of the agent, with restarts, a pod finishing mid-run, and pods that must be
//! ignored (other node, other namespace).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tally_tests::pods_api::PodsApi;
use tally_tests::{Proc, bin, free_port, rfc3339, unix_now as now, wait_for};

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

async fn totals(client: &reqwest::Client, addr: &str) -> Option<BTreeMap<String, i64>> {
    let url =
        format!("http://{addr}/api/v1/namespaces/team-a/meters/gpu_seconds/query?groupBy=subject");
    let body: Value = client.get(url).send().await.ok()?.json().await.ok()?;
    Some(
        body["data"]
            .as_array()?
            .iter()
            .map(|r| {
                (
                    r["subject"].as_str().unwrap_or_default().to_string(),
                    r["value"].as_f64().unwrap_or(0.0) as i64,
                )
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn gpu_seconds_per_subject_are_exact_across_an_agent_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("meter.yaml"), METER).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let data = root.join("data");
    let mut server = Proc::start(
        bin("tally-server"),
        &[
            "--listen",
            &addr,
            "--data",
            data.to_str().unwrap(),
            "--manifests",
            manifests.to_str().unwrap(),
        ],
        &[("RUST_LOG", "warn")],
        root.join("server.log"),
    );
    wait_for(Duration::from_secs(30), "tally-server", || {
        std::net::TcpStream::connect(&addr).is_ok()
    });

    let api = PodsApi::start().await;
    let base = now().div_euclid(60) * 60 - 900;
    let none = json!({});
    let t = ("tally.dev/subject", "customer-a");
    // 120 s × 2 GPUs, long finished.
    api.put(pod(
        "a",
        "team-a",
        "node-1",
        t,
        2,
        terminated(base + 10, base + 130),
        none.clone(),
    ));
    // Restarted once: 50 s + 145 s, × 1 GPU; subject from OpenMeter's annotation.
    api.put(pod(
        "b",
        "team-a",
        "node-1",
        ("openmeter.io/subject", "customer-b"),
        1,
        terminated(base + 55, base + 200),
        terminated(base, base + 50),
    ));
    // Running now; finishes during the test.
    let c_start = now() - 20;
    api.put(pod(
        "c",
        "team-a",
        "node-1",
        t,
        4,
        json!({"running": {"startedAt": rfc3339(c_start)}}),
        none.clone(),
    ));
    // Not ours: another node, another namespace.
    api.put(pod(
        "d",
        "team-a",
        "node-2",
        ("tally.dev/subject", "customer-x"),
        8,
        terminated(base, base + 300),
        none.clone(),
    ));
    api.put(pod(
        "e",
        "other",
        "node-1",
        ("tally.dev/subject", "customer-x"),
        8,
        terminated(base, base + 300),
        none.clone(),
    ));

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
    let kubeconfig = api.kubeconfig(root);
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
    api.put(c);

    let expected = BTreeMap::from([
        ("customer-a".to_string(), 120 * 2 + (c_end - c_start) * 4),
        ("customer-b".to_string(), 50 + 145),
    ]);
    let client = reqwest::Client::new();
    let waited = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = None;
    while Instant::now() < deadline {
        got = totals(&client, &addr).await;
        if got.as_ref() == Some(&expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(got.as_ref(), Some(&expected), "agent log:\n{}", agent.log());
    eprintln!("totals exact {:?} after pod c finished", waited.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        totals(&client, &addr).await.as_ref(),
        Some(&expected),
        "nothing arrives twice"
    );
    assert!(agent.terminate(), "graceful shutdown:\n{}", agent.log());
    server.kill9();
}
