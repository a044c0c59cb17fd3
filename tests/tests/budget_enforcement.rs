//! UsageBudgets in a cluster, on the real control plane with real tansu and
//! ClickHouse: the operator's leader evaluates a namespace's GPU-hours budget; while it
//! is exceeded a ResourceQuota owned by the budget makes the apiserver refuse a new GPU
//! pod; raising the limit removes the quota and the pod is admitted. The status shows
//! usage / limit, the crossing is a Kubernetes Event, and its webhook reaches a receiver
//! in this test once, signed.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use k8s_openapi::api::core::v1::{Pod, ResourceQuota, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tally_crds::{Meter, UsageBudget};
use tally_tests::kube::Cluster;
use tally_tests::stack::{Pipeline, Stack};
use tally_tests::{clickhouse, eventually, kafka};

async fn wait<T>(limit: Duration, what: &str, probe: impl AsyncFnMut() -> Option<T>) -> T {
    eventually(limit, Duration::from_millis(300), what, probe).await
}

fn gpu_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"containers": [{"name": "train", "image": "trainer",
                 "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exceeded_budget_refuses_gpu_pods_until_its_limit_is_raised() {
    let test = "budget_enforcement";
    let (Some(brokers), Some(ch)) = (kafka(test), clickhouse(test)) else {
        return;
    };
    let Some(cluster) = Cluster::connect(test).await else {
        return;
    };
    let dir = tally_tests::KeptDir(Some(tempfile::tempdir().unwrap()));
    let client = cluster.client().await;
    let http = reqwest::Client::new();
    let unique = format!("{}_{}", std::process::id(), tally_tests::unix_now());
    let (db, topic) = (
        format!("tally_budget_{unique}"),
        format!("tally-budget-{unique}"),
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [tally_crds::meter_crd(), tally_crds::budget_crd()] {
        let _ = crds.create(&PostParams::default(), &crd).await;
    }
    cluster.namespaces(&client, &["ml", "tally-system"]).await;
    // this namespace's webhooks may go to the test's loopback receiver
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            "ml",
            &PatchParams::apply("test"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml", "labels": {"tally.dev/webhook-any-url": "true"}}})),
        )
        .await
        .unwrap();

    // the webhook receiver
    let got: Arc<Mutex<Vec<(HeaderMap, String)>>> = Arc::default();
    let app = {
        let got = got.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let got = got.clone();
                async move {
                    got.lock().unwrap().push((headers, body));
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let key = b"cluster-budget-key-0123456789abc";
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "hooks", "namespace": "ml"},
        "stringData": {"url": format!("http://{hook}/hook"), "secret": format!("whsec_{}", b64.encode(key))}
    }))
    .unwrap();
    let _ = Api::<Secret>::namespaced(client.clone(), "ml")
        .create(&PostParams::default(), &secret)
        .await;

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
        &["--topic-partitions", "1", "--budget-interval-secs", "1"],
    );
    let meters: Api<Meter> = Api::namespaced(client.clone(), "ml");
    let meter: Meter = serde_json::from_value(json!({
        "apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
        "metadata": {"name": "gpu-hours", "namespace": "ml"},
        "spec": {"eventType": "gpu", "aggregation": "SUM", "valueProperty": "$.hours"}
    }))
    .unwrap();
    meters.create(&PostParams::default(), &meter).await.unwrap();
    wait(
        Duration::from_secs(90),
        "the Meter to be Ready",
        async || {
            let m = meters.get("gpu-hours").await.ok()?;
            m.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    let budgets: Api<UsageBudget> = Api::namespaced(client.clone(), "ml");
    let budget = |limit: u32| {
        json!({
            "apiVersion": "tally.dev/v1alpha1", "kind": "UsageBudget",
            "metadata": {"name": "gpu-month", "namespace": "ml"},
            "spec": {"meter": "gpu-hours", "period": {"calendar": "MONTH"}, "limit": limit,
                     "thresholds": [{"percent": 100}],
                     "webhook": {"secretRef": {"name": "hooks"}},
                     "enforce": {"resourceQuota": {"hard": {"requests.nvidia.com/gpu": "0"}}}}
        })
    };
    budgets
        .patch(
            "gpu-month",
            &PatchParams::apply("test"),
            &Patch::Apply(budget(100)),
        )
        .await
        .unwrap();
    // a per-subject budget with enforce is refused by the CRD's rule
    let mut per_subject = budget(100);
    per_subject["metadata"]["name"] = json!("bad");
    per_subject["spec"]["perSubject"] = json!(true);
    let refused = budgets
        .patch(
            "bad",
            &PatchParams::apply("test"),
            &Patch::Apply(per_subject),
        )
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("cannot be per subject"),
        "{refused}"
    );

    // 150 GPU-hours this month: over the limit of 100
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let events: Vec<Value> = (0..3)
        .map(|i| json!({"specversion": "1.0", "id": format!("h{i}"), "source": "k8s", "type": "gpu", "subject": "research", "time": now, "data": {"hours": 50}}))
        .collect();
    let r = http
        .post(format!(
            "http://{}/api/v1/namespaces/ml/events",
            stack.server
        ))
        .json(&events)
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "{}",
        r.text().await.unwrap_or_default()
    );

    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), "ml");
    wait(
        Duration::from_secs(90),
        "the quota, computed by the quota controller",
        async || {
            let q = quotas.get_opt("tally-budget-gpu-month").await.ok()??;
            q.status?
                .hard?
                .contains_key("requests.nvidia.com/gpu")
                .then_some(())
        },
    )
    .await;
    let b = budgets.get("gpu-month").await.unwrap();
    let status = b.status.clone().unwrap();
    assert_eq!(status.display.as_deref(), Some("150 / 100"), "{status:?}");
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Exceeded" && c.status == "True"),
        "{status:?}"
    );
    // kubectl tally budgets reads the same from the cluster
    let out = std::process::Command::new(tally_tests::bin("kubectl-tally"))
        .args(["budgets", "-n", "ml"])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = table
        .lines()
        .find(|l| l.contains("gpu-month"))
        .unwrap_or_default();
    assert!(
        line.contains("150 / 100") && line.contains("150.0%") && line.contains("MONTH UTC"),
        "{table}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ml");
    let refusal = wait(
        Duration::from_secs(30),
        "the GPU pod to be refused by the quota",
        async || {
            match pods
                .create(&PostParams::default(), &gpu_pod("refused"))
                .await
            {
                Err(kube::Error::Api(e)) if e.message.contains("exceeded quota") => Some(e.message),
                Ok(_) => panic!("a GPU pod was admitted while the budget is exceeded"),
                Err(_) => None, // e.g. the namespace's default ServiceAccount not made yet
            }
        },
    )
    .await;
    assert!(refusal.contains("tally-budget-gpu-month"), "{refusal}");

    // the crossing: one Event, one signed webhook
    let events_api: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "ml");
    wait(
        Duration::from_secs(30),
        "the ThresholdCrossed Event",
        async || {
            let list = events_api.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("ThresholdCrossed"))
                .then_some(())
        },
    )
    .await;
    let delivered = wait(Duration::from_secs(30), "the webhook", async || {
        got.lock().unwrap().first().cloned()
    })
    .await;
    let h = |k: &str| delivered.0.get(k).unwrap().to_str().unwrap().to_string();
    let signed = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
        format!(
            "{}.{}.{}",
            h("webhook-id"),
            h("webhook-timestamp"),
            delivered.1
        )
        .as_bytes(),
    );
    assert_eq!(
        h("webhook-signature"),
        format!("v1,{}", b64.encode(signed.as_ref()))
    );
    let body: Value = serde_json::from_str(&delivered.1).unwrap();
    assert_eq!(body["data"]["usage"], 150.0, "{body}");

    // the limit raised: the quota goes, the pod is admitted
    budgets
        .patch(
            "gpu-month",
            &PatchParams::apply("test"),
            &Patch::Apply(budget(1000)),
        )
        .await
        .unwrap();
    wait(
        Duration::from_secs(60),
        "the quota to be removed",
        async || {
            quotas
                .get_opt("tally-budget-gpu-month")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
    wait(
        Duration::from_secs(30),
        "the GPU pod to be admitted",
        async || {
            pods.create(&PostParams::default(), &gpu_pod("admitted"))
                .await
                .ok()
                .map(drop)
        },
    )
    .await;
    let b = budgets.get("gpu-month").await.unwrap();
    assert_eq!(b.status.unwrap().display.as_deref(), Some("150 / 1,000"));
    assert_eq!(got.lock().unwrap().len(), 1, "one crossing, one delivery");
    let metrics = http
        .get(format!("http://{}/metrics", stack.operators[0].1))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tally_operator_budget_crossings_total 1")
            && metrics.contains("tally_operator_budget_webhooks_delivered_total 1"),
        "{metrics}"
    );
    drop(stack);
}
