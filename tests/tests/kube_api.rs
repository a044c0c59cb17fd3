//! What tally assumes of the real Kubernetes API, checked against the real
//! kube-apiserver (or `TALLY_KUBECONFIG`): the generated CRDs install and are served;
//! each invalid Meter and Collector is refused at `kubectl apply` time with the message
//! the CRD promises (OpenAPI schema and CEL, including the immutability rules that
//! need `oldSelf`); `kubectl get meters` and `kubectl get collectors` print the
//! printer columns; every example manifest is accepted.
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tally_crds::{Collector, Meter};
use tally_tests::eventually;
use tally_tests::kube::Cluster;

/// The cluster with both CRDs installed (server-side apply, so every test of this
/// binary may ask) and served.
async fn cluster_with_crds(test: &str) -> Option<(Cluster, Client)> {
    let cluster = Cluster::connect(test).await?;
    let client = cluster.client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let apply = PatchParams::apply("tally-tests").force();
    for crd in tally_crds::crds() {
        let name = crd.name_any();
        crds.patch(&name, &apply, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("installing CRD {name}: {e}"));
        eventually(
            Duration::from_secs(30),
            Duration::from_millis(100),
            &format!("CRD {name} to be Established"),
            async || {
                let c = crds.get(&name).await.ok()?;
                c.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            },
        )
        .await;
    }
    Some((cluster, client))
}

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn object(kind: &str, name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": kind,
        "metadata": {"name": name}, "spec": spec}))
    .expect("a valid object")
}

fn dynamic<K: kube::Resource<DynamicType = ()>>(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<K>(&()))
}

/// Creating `spec` is refused as invalid (422) with a message containing `message`.
async fn refused(api: &Api<DynamicObject>, kind: &str, spec: Value, message: &str) {
    let e = api
        .create(
            &PostParams::default(),
            &object(kind, "invalid", spec.clone()),
        )
        .await
        .map(|_| ())
        .expect_err(&format!("{kind} {spec} is refused"));
    let e = api_error(e);
    assert_eq!(
        (e.code, e.reason.as_str()),
        (422, "Invalid"),
        "{spec}: {}",
        e.message
    );
    assert!(
        e.message.contains(message),
        "{spec}: the message names it: {}",
        e.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_meter_is_refused_with_the_message_the_crd_promises() {
    let Some((cluster, client)) = cluster_with_crds("invalid_meters").await else {
        return;
    };
    let ns = "meter-validation";
    cluster.namespaces(&client, &[ns]).await;
    let meters = dynamic::<Meter>(&client, ns);
    let cases = [
        (
            json!({"eventType": "llm", "aggregation": "COUNT", "valueProperty": "$.x"}),
            "valueProperty is forbidden for COUNT and required for every other aggregation",
        ),
        (
            json!({"eventType": "llm", "aggregation": "SUM"}),
            "valueProperty is forbidden for COUNT and required for every other aggregation",
        ),
        (
            json!({"eventType": "llm", "aggregation": "TOTAL", "valueProperty": "$.v"}),
            "spec.aggregation: Unsupported value: \"TOTAL\"",
        ),
        (
            json!({"eventType": "llm", "aggregation": "COUNT", "slug": "Not A Slug"}),
            "spec.slug",
        ),
        (
            json!({"aggregation": "COUNT"}),
            "spec.eventType: Required value",
        ),
        (
            json!({"eventType": "llm", "aggregation": "SUM", "valueProperty": "tokens"}),
            "spec.valueProperty",
        ),
        (
            json!({"eventType": "llm", "aggregation": "COUNT", "groupBy": {"subject": "$.s"}}),
            "groupBy names must match ^[a-zA-Z_][a-zA-Z0-9_]*$ and must not be 'subject'",
        ),
        (
            json!({"eventType": "llm", "aggregation": "COUNT", "groupBy": {"model": "model"}}),
            "groupBy values are JSONPaths starting with '$'",
        ),
        (
            json!({"eventType": "llm", "aggregation": "COUNT",
                   "filter": [{"property": "$.d", "operator": "exists", "values": ["x"]}]}),
            "exists takes no values, in and notIn take one or more, the other operators exactly one",
        ),
        (
            json!({"eventType": "llm", "aggregation": "COUNT",
                   "filter": [{"property": "$.d", "operator": "eq"}]}),
            "exists takes no values, in and notIn take one or more, the other operators exactly one",
        ),
    ];
    for (spec, message) in cases {
        refused(&meters, "Meter", spec, message).await;
    }

    // Immutable fields (CEL with oldSelf), each refused on change; groupBy may change
    // and bumps the generation (what the operator rebuilds on).
    let spec = json!({"eventType": "llm", "aggregation": "SUM", "valueProperty": "$.tokens",
        "slug": "tokens", "groupBy": {"model": "$.model"},
        "filter": [{"property": "$.d", "operator": "in", "values": ["input"]}],
        "eventFrom": "2026-01-01T00:00:00Z"});
    let created = meters
        .create(&PostParams::default(), &object("Meter", "tokens", spec))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let changes = [
        (json!({"slug": "other"}), "slug is immutable"),
        (json!({"eventType": "other"}), "eventType is immutable"),
        (json!({"aggregation": "MAX"}), "aggregation is immutable"),
        (
            json!({"valueProperty": "$.other"}),
            "valueProperty is immutable",
        ),
        (
            json!({"filter": [{"property": "$.d", "operator": "in", "values": ["output"]}]}),
            "filter is immutable",
        ),
        (
            json!({"eventFrom": "2026-02-01T00:00:00Z"}),
            "eventFrom is immutable",
        ),
    ];
    for (change, message) in changes {
        let e = meters
            .patch(
                "tokens",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": change})),
            )
            .await
            .expect_err(&format!("{change} is refused"));
        let e = api_error(e);
        assert!(e.message.contains(message), "{change}: {}", e.message);
    }
    let regrouped = meters
        .patch(
            "tokens",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"groupBy": {"model": "$.model", "region": "$.region"}}})),
        )
        .await
        .unwrap();
    assert_eq!(regrouped.metadata.generation, Some(2));
    cluster.remove_namespaces(&client, &[ns]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_collector_is_refused_with_the_message_the_crd_promises() {
    let Some((cluster, client)) = cluster_with_crds("invalid_collectors").await else {
        return;
    };
    let ns = "collector-validation";
    cluster.namespaces(&client, &[ns]).await;
    let collectors = dynamic::<Collector>(&client, ns);
    refused(
        &collectors,
        "Collector",
        json!({"eventType": "x", "podRuntime": {}, "prometheus": {"targets": ["http://127.0.0.1:9400/metrics"], "metrics": [{"name": "up", "kind": "gauge"}]}}),
        "set exactly one source: podRuntime, prometheus, httpApi or logs",
    )
    .await;
    refused(
        &collectors,
        "Collector",
        json!({"eventType": "x"}),
        "set exactly one source",
    )
    .await;
    refused(
        &collectors,
        "Collector",
        json!({"eventType": "x", "podRuntime": {"windowSecs": "often"}}),
        "spec.podRuntime.windowSecs",
    )
    .await;
    cluster.remove_namespaces(&client, &[ns]).await;
}

/// Runs `kubectl get KIND -n NS [-o wide]` against the cluster; `None` (after saying
/// why) when kubectl is not installed.
async fn kubectl_get(cluster: &Cluster, kind: &str, ns: &str, wide: bool) -> Option<String> {
    let kc = cluster.kubeconfig.clone();
    let (kind, ns) = (kind.to_string(), ns.to_string());
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&kc)
            .args(["get", &kind, "-n", &ns]);
        if wide {
            cmd.args(["-o", "wide"]);
        }
        cmd.output()
    })
    .await
    .unwrap();
    let Ok(out) = out else {
        tally_tests::skip("kubectl_get: kubectl is not installed");
        return None;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_prints_the_printer_columns() {
    let Some((cluster, client)) = cluster_with_crds("kubectl_get").await else {
        return;
    };
    let ns = "printer-columns";
    cluster.namespaces(&client, &[ns]).await;
    let meters: Api<Meter> = Api::namespaced(client.clone(), ns);
    let m: Meter =
        serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
        "metadata": {"name": "llm-tokens"},
        "spec": {"eventType": "llm", "aggregation": "SUM", "valueProperty": "$.tokens"}}))
        .unwrap();
    meters.create(&PostParams::default(), &m).await.unwrap();
    // The status as the operator writes it (through the status subresource).
    let status = json!({"status": {"slug": "llm_tokens", "conditions": [
        {"type": "Ready", "status": "True", "reason": "Provisioned", "message": "queries read rollup r1", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "storage": {"store": "clickhouse", "rollupTable": "rollup_1", "backfilled": true, "backfill": "complete"}}});
    meters
        .patch_status("llm-tokens", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
    let Some(plain) = kubectl_get(&cluster, "meters", ns, false).await else {
        return;
    };
    let wide = kubectl_get(&cluster, "meters", ns, true).await.unwrap();
    let lines: Vec<&str> = plain.lines().collect();
    assert_eq!(
        words(lines[0]),
        [
            "NAME",
            "SLUG",
            "EVENT",
            "TYPE",
            "AGGREGATION",
            "READY",
            "STATUS",
            "AGE"
        ],
        "{plain}"
    );
    assert_eq!(
        words(lines[1])[..6],
        [
            "llm-tokens",
            "llm_tokens",
            "llm",
            "SUM",
            "True",
            "Provisioned"
        ],
        "{plain}"
    );
    assert!(
        wide.contains("BACKFILL") && wide.contains("complete") && wide.contains("rollup_1"),
        "{wide}"
    );

    let collectors: Api<Collector> = Api::namespaced(client.clone(), ns);
    let c: Collector = serde_json::from_value(
        json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Collector",
        "metadata": {"name": "gpu-pods"}, "spec": {"eventType": "pod-runtime", "podRuntime": {}}}),
    )
    .unwrap();
    collectors.create(&PostParams::default(), &c).await.unwrap();
    let status = json!({"status": {"source": "podRuntime", "readyAgents": 3, "desiredAgents": 3,
        "conditions": [{"type": "Ready", "status": "True", "reason": "AgentsReady", "message": "3 of 3 agents ready", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "oldestWatermark": "2026-01-01T00:00:00Z", "oldestWatermarkSource": "gpu-node-7"}});
    collectors
        .patch_status("gpu-pods", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
    let plain = kubectl_get(&cluster, "collectors", ns, false)
        .await
        .unwrap();
    let lines: Vec<&str> = plain.lines().collect();
    assert_eq!(
        words(lines[0]),
        [
            "NAME", "SOURCE", "EVENT", "TYPE", "READY", "AGENTS", "READY", "LAST", "EVENT",
            "COMPLETE", "UP", "TO", "AGE"
        ],
        "{plain}"
    );
    assert_eq!(
        words(lines[1])[..5],
        ["gpu-pods", "podRuntime", "pod-runtime", "3", "True"],
        "{plain}"
    );
    // the node with the oldest watermark, in the wide view
    let wide = kubectl_get(&cluster, "collectors", ns, true).await.unwrap();
    let lines: Vec<&str> = wide.lines().collect();
    assert_eq!(
        words(lines[0]).last().map(String::as_str),
        Some("OLDEST"),
        "{wide}"
    );
    assert_eq!(
        words(lines[1]).last().map(String::as_str),
        Some("gpu-node-7"),
        "{wide}"
    );
    cluster.remove_namespaces(&client, &[ns]).await;
}

/// Every example manifest is accepted as `kubectl apply` would be (schema + CEL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_manifests_pass_the_crds_schema_and_cel_rules() {
    let Some((cluster, client)) = cluster_with_crds("example_manifests").await else {
        return;
    };
    let repo = tally_tests::repo();
    let mut applied = Vec::new();
    for dir in [
        "examples/quickstart",
        "examples/collectors",
        "examples/cluster",
    ] {
        for entry in std::fs::read_dir(repo.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v: Value = serde::Deserialize::deserialize(doc).unwrap();
                if v.is_null()
                    || !["Meter", "Collector"].contains(&v["kind"].as_str().unwrap_or_default())
                {
                    continue;
                }
                let mut obj: DynamicObject = serde_json::from_value(v.clone()).unwrap();
                let ns = obj
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                cluster.namespaces(&client, &[&ns]).await;
                obj.metadata.namespace = Some(ns.clone());
                let api = if v["kind"] == "Meter" {
                    dynamic::<Meter>(&client, &ns)
                } else {
                    dynamic::<Collector>(&client, &ns)
                };
                let apply = PatchParams::apply("tally-tests").force();
                api.patch(&obj.name_any(), &apply, &Patch::Apply(&obj))
                    .await
                    .unwrap_or_else(|e| {
                        panic!("{}: {} refused: {e}", path.display(), obj.name_any())
                    });
                applied.push((api, obj.name_any()));
            }
        }
    }
    assert!(applied.len() >= 8, "{} manifests applied", applied.len());
    // Other tests use these namespaces: only the objects go.
    for (api, name) in applied {
        api.delete(&name, &Default::default()).await.unwrap();
    }
}
