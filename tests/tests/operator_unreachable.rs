//! An unreachable ClickHouse shows on every Meter as `Ready=False`,
//! `StorageUnavailable`, with a message naming the endpoint, and in the operator's log;
//! when ClickHouse is back the same Meter becomes Ready without anyone touching it.
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use serde_json::json;
use tally_crds::Meter;
use tally_tests::kube::Cluster;
use tally_tests::{KeptDir, bin, free_port, start_operator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_clickhouse_is_a_condition_naming_the_endpoint() {
    let dir = KeptDir(Some(tempfile::tempdir().unwrap()));
    let Some(cluster) = Cluster::connect("operator_unreachable").await else {
        return;
    };
    let client = cluster.client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let _ = crds
        .create(&PostParams::default(), &tally_crds::meter_crd())
        .await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (op, _metrics) = start_operator(
        bin("tally-operator"),
        &cluster.kubeconfig,
        "default",
        &["--clickhouse", &dead, "--lease-secs", "4"],
        dir.path().join("operator.log"),
    );
    let meters: Api<Meter> = Api::namespaced(client.clone(), "default");
    let m: Meter =
        serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
        "metadata": {"name": "calls"}, "spec": {"eventType": "api", "aggregation": "COUNT"}}))
        .unwrap();
    meters.create(&PostParams::default(), &m).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        let got = meters.get("calls").await.unwrap();
        let ready = got
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready").cloned());
        if let Some(c) = ready.filter(|c| c.reason == "StorageUnavailable") {
            assert_eq!(c.status, "False");
            break c.message;
        }
        assert!(
            Instant::now() < deadline,
            "no StorageUnavailable condition; log:\n{}",
            op.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        message.contains(&dead),
        "the message names the endpoint: {message}"
    );
    let log = op.log();
    assert!(
        log.contains("ClickHouse unavailable") && log.contains(&dead),
        "the log names the endpoint:\n{log}"
    );
}
