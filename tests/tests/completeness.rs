//! Completeness you can query, on the cluster deployment (real control plane, tansu,
//! ClickHouse, `tally-operator`, `tally-server sink` and `tally-server --kubernetes`)
//! with two node agents shipping to Kafka:
//! - while node-1's agent is SIGSTOPped for 60 s, `GET .../completeness` names node-1
//!   and the interval it has not delivered, and a pod that starts, finishes and is
//!   deleted meanwhile is not lost: after SIGCONT the meter reports complete and every
//!   subject's total is exact;
//! - node-2's agent goes and its Node is deleted: its watermark ends with it (`ended`,
//!   not behind);
//! - events of a source that sends no watermarks make the answer `unknown`;
//! - the Collector's status (`kubectl get collectors`) shows the oldest watermark of
//!   the nodes that exist, and which node has it.
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use tally_crds::{Collector, Meter};
use tally_tests::kube::kubelet::Node;
use tally_tests::kube::{Cluster, put_pod};
use tally_tests::stack::{Pipeline, Stack};
use tally_tests::{
    KeptDir, Proc, bin, clickhouse, eventually, free_port, kafka, rfc3339, subject_totals,
    unix_now as now,
};

const NS: &str = "team-a";

fn pod(name: &str, node: &str, subject: &str, gpus: u32, state: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "annotations": {"tally.dev/subject": subject}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "trainer",
                 "resources": {"requests": {"nvidia.com/gpu": gpus.to_string()}, "limits": {"nvidia.com/gpu": gpus.to_string()}}}]},
        "status": {"phase": "Running", "qosClass": "BestEffort",
                   "containerStatuses": [{"name": "main", "image": "trainer", "imageID": "", "ready": true,
                                          "restartCount": 0, "state": state}]}
    })
}

fn running(start: i64) -> Value {
    json!({"running": {"startedAt": rfc3339(start)}})
}

fn finished(pod: &mut Value, start: i64, end: i64) {
    pod["status"]["phase"] = json!("Succeeded");
    pod["status"]["containerStatuses"][0]["state"] = json!({"terminated": {"exitCode": 0, "startedAt": rfc3339(start), "finishedAt": rfc3339(end)}});
}

fn signal(agent: &Proc, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &agent.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// The completeness answer for `[from, to)`.
async fn completeness(http: &reqwest::Client, server: &str, from: i64, to: i64) -> Option<Value> {
    let url = format!(
        "http://{server}/api/v1/namespaces/{NS}/meters/gpu_seconds/completeness?from={}&to={}",
        rfc3339(from),
        rfc3339(to)
    );
    let r = http.get(url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

fn source<'a>(answer: &'a Value, node: &str) -> Option<&'a Value> {
    answer["sources"]
        .as_array()?
        .iter()
        .find(|s| s["node"] == node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_is_named_with_its_interval_and_complete_once_it_resumes() {
    let test = "completeness";
    let (Some(brokers), Some(ch)) = (kafka(test), clickhouse(test)) else {
        return;
    };
    let dir = KeptDir(Some(tempfile::tempdir().unwrap()));
    eprintln!(
        "logs in {} (kept with TALLY_KEEP_LOGS=1)",
        dir.path().display()
    );
    let Some(cluster) = Cluster::connect(test).await else {
        return;
    };
    let kube = cluster.client().await;
    let http = reqwest::Client::new();
    let unique = format!("{}_{}", std::process::id(), now());
    let (db, topic) = (format!("tally_wm_{unique}"), format!("tally-wm-{unique}"));
    let crds: Api<CustomResourceDefinition> = Api::all(kube.clone());
    for crd in [tally_crds::meter_crd(), tally_crds::collector_crd()] {
        let _ = crds.create(&PostParams::default(), &crd).await;
    }
    cluster.namespaces(&kube, &[NS, "tally-system"]).await;
    let operator_kc = cluster.kubeconfig_as("tally-operator", dir.path());
    let stack = Stack::start(
        dir.path(),
        (&cluster.kubeconfig, &operator_kc),
        &Pipeline {
            brokers: &brokers,
            clickhouse: &ch,
            database: &db,
            topic: &topic,
        },
        1,
        &["--topic-partitions", "3", "--collector-status-secs", "2"],
    );
    let meters: Api<Meter> = Api::namespaced(kube.clone(), NS);
    let meter: Meter = serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
        "metadata": {"name": "gpu-seconds"},
        "spec": {"eventType": "pod-runtime", "aggregation": "SUM", "valueProperty": "$.gpu_seconds"}}))
    .unwrap();
    let _ = meters.delete("gpu-seconds", &DeleteParams::default()).await;
    meters.create(&PostParams::default(), &meter).await.unwrap();
    let server = stack.server.clone();
    eventually(
        Duration::from_secs(90),
        Duration::from_millis(300),
        "the meter served",
        async || {
            let url = format!("http://{server}/api/v1/namespaces/{NS}/meters/gpu_seconds");
            let r = http.get(url).send().await.ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;

    // The Collector the agents run, so `kubectl get collectors` shows its watermark
    // (the agents are started by the test, not from the operator's DaemonSet).
    let collectors: Api<Collector> = Api::namespaced(kube.clone(), NS);
    let collector: Collector = serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Collector",
        "metadata": {"name": "gpus"},
        "spec": {"eventType": "pod-runtime", "podRuntime": {"windowSecs": 10, "settleSecs": 2, "cgroup": {"enabled": false}}}}))
    .unwrap();
    let _ = collectors.delete("gpus", &DeleteParams::default()).await;
    collectors
        .create(&PostParams::default(), &collector)
        .await
        .unwrap();
    let watermark_of = async || -> Option<(i64, String)> {
        let status = collectors.get("gpus").await.ok()?.status?;
        Some((
            status.oldest_watermark?.timestamp(),
            status.oldest_watermark_source?,
        ))
    };

    let node1 = Node::register(&kube, "wm-node-1").await;
    let node2 = Node::register(&kube, "wm-node-2").await;
    let t0 = now();
    // node-1: a pod running from before the agents start; node-2: one that ran 47 s
    let mut p1 = pod("p1", "wm-node-1", "acme", 2, running(t0 - 31));
    put_pod(&kube, p1.clone()).await;
    let mut q1 = pod("q1", "wm-node-2", "globex", 1, running(t0 - 50));
    finished(&mut q1, t0 - 50, t0 - 3);
    put_pod(&kube, q1).await;

    let agent = |node: &str| {
        let config = dir.path().join(format!("{node}.yaml"));
        std::fs::write(
            &config,
            format!(
                "sink:\n  kafka: {{brokers: '{brokers}', topic: '{topic}', batchEvents: 100}}\nspool: {{path: '{}'}}\nmetricsListen: '127.0.0.1:{}'\ncollectors:\n- namespace: {NS}\n  name: gpus\n  spec:\n    eventType: pod-runtime\n    podRuntime: {{windowSecs: 10, settleSecs: 2, cgroup: {{enabled: false}}}}\n",
                dir.path().join(format!("spool-{node}")).display(),
                free_port()
            ),
        )
        .unwrap();
        Proc::start(
            bin("tally-agent"),
            &["--config", config.to_str().unwrap()],
            &[
                ("KUBECONFIG", cluster.kubeconfig.to_str().unwrap()),
                ("NODE_NAME", node),
                ("RUST_LOG", "info"),
            ],
            dir.path().join(format!("agent-{node}.log")),
        )
    };
    let mut a1 = agent("wm-node-1");
    let mut a2 = agent("wm-node-2");

    // Both deliver: complete up to a moment after they started.
    let t1 = now();
    let first = eventually(
        Duration::from_secs(90),
        Duration::from_millis(500),
        "complete up to the agents' start",
        async || {
            let c = completeness(&http, &server, t0 - 120, t1).await?;
            (c["status"] == "complete").then_some(c)
        },
    )
    .await;
    assert_eq!(first["sources"].as_array().unwrap().len(), 2, "{first:#}");

    // node-2 goes: its agent stops and the Node is deleted; its watermark ends.
    a2.kill9();
    node2.remove(&kube).await;

    // node-1's agent is stopped for 60 s; meanwhile p1 finishes and p2 lives 7 s and
    // is deleted.
    let stopped = now();
    signal(&a1, "-STOP");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let p1_end = now();
    finished(&mut p1, t0 - 31, p1_end);
    put_pod(&kube, p1).await;
    let p2_start = now();
    let mut p2 = pod("p2", "wm-node-1", "acme", 1, running(p2_start));
    put_pod(&kube, p2.clone()).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    finished(&mut p2, p2_start, p2_start + 7);
    put_pod(&kube, p2).await;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), NS);
    pods.delete("p2", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(35)).await;
    let asked = now();
    let behind = completeness(&http, &server, t0 - 120, asked)
        .await
        .expect("completeness answers while an agent is stopped");
    assert_eq!(behind["status"], "incomplete", "{behind:#}");
    let s1 = source(&behind, "wm-node-1").expect("node-1 is named");
    assert_eq!(s1["status"], "behind", "{behind:#}");
    assert_eq!(s1["collector"], "gpus");
    let missing = &s1["missing"][0];
    let ms = |v: &Value| tally_crds::event::parse_time_ms(v.as_str().unwrap()).unwrap();
    let from = ms(&missing["from"]) / 1000;
    assert!(
        from <= stopped && from >= t1 - 30,
        "the missing interval starts where node-1 stopped delivering: {missing}"
    );
    assert_eq!(ms(&missing["to"]), asked * 1000);
    assert!(
        missing["reason"].as_str().unwrap().contains("wm-node-1"),
        "{missing}"
    );
    // the same in a terminal
    let out = std::process::Command::new(bin("kubectl-tally"))
        .args(["completeness", "gpu_seconds", "-n", NS, "--server"])
        .arg(format!("http://{server}"))
        .args(["--from", &rfc3339(t0 - 120), "--to", &rfc3339(asked)])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.starts_with("INCOMPLETE\n"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("wm-node-1") && l.contains("behind")),
        "{table}"
    );
    let s2 = source(&behind, "wm-node-2").expect("node-2 is listed");
    assert_eq!(
        s2["status"], "ended",
        "a deleted node's watermark ends: {behind:#}"
    );
    tokio::time::sleep(Duration::from_secs((stopped + 60 - now()).max(0) as u64)).await;
    signal(&a1, "-CONT");
    let resumed = now();
    eprintln!(
        "t0 {t0} t1 {t1} stopped {stopped} p1_end {p1_end} p2_start {p2_start} resumed {resumed}"
    );

    // Complete again past the resume, and exact.
    let done = eventually(
        Duration::from_secs(90),
        Duration::from_millis(500),
        "complete after SIGCONT",
        async || {
            let c = completeness(&http, &server, t0 - 120, resumed).await?;
            (c["status"] == "complete").then_some(c)
        },
    )
    .await;
    assert_eq!(source(&done, "wm-node-1").unwrap()["status"], "complete");
    eventually(
        Duration::from_secs(20),
        Duration::from_millis(500),
        "the Collector's watermark past the resume",
        async || watermark_of().await.filter(|(t, _)| *t >= resumed),
    )
    .await;
    let expected = BTreeMap::from([
        ("acme".to_string(), ((p1_end - (t0 - 31)) * 2 + 7) as u64),
        ("globex".to_string(), 47u64),
    ]);
    let got = subject_totals(&http, &server, NS, "gpu_seconds").await;
    assert_eq!(got.as_ref(), Some(&expected), "agent log:\n{}", a1.log());

    // An application's own events of the meter's type: no watermark vouches for them.
    let ev = json!([{"specversion": "1.0", "id": "app-1", "source": "billing-app", "type": "pod-runtime",
        "subject": "initech", "time": rfc3339(resumed - 5), "data": {"gpu_seconds": 1}}]);
    let r = http
        .post(format!("http://{server}/api/v1/namespaces/{NS}/events"))
        .header("Content-Type", "application/cloudevents-batch+json")
        .json(&ev)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let unknown = eventually(
        Duration::from_secs(60),
        Duration::from_millis(500),
        "unknown with an unwatermarked source",
        async || {
            let c = completeness(&http, &server, t0 - 120, resumed).await?;
            (c["status"] == "unknown").then_some(c)
        },
    )
    .await;
    assert_eq!(
        unknown["unknown"][0]["source"], "billing-app",
        "{unknown:#}"
    );

    assert!(a1.terminate(), "graceful shutdown:\n{}", a1.log());
    node1.remove(&kube).await;
    drop(stack);
}
