//! `make bench`: how long the operator (release build) takes to bring
//! `TALLY_BENCH_METERS` (default 200) Meters to `Ready=True` — ClickHouse rollups, views
//! and backfills included — and its peak RSS while doing it and at rest afterwards.
//!
//! The raw limit measured in the same run: the same rollup DDL and backfills issued
//! straight to ClickHouse by the pipeline library's batch `provision()` (one cutover wait
//! for all), with no Kubernetes in between. The operator runs against the real control
//! plane (`KUBEBUILDER_ASSETS`, or `TALLY_KUBECONFIG`); its cutover margin and grace are the defaults (5 s + 5 s), which bound
//! any single meter's time to Ready from below.
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tally_crds::Meter;
use tally_tests::kube::Cluster;
use tally_tests::{ch_query, clickhouse, release_bin, rss_of, start_operator};

fn meter(i: usize) -> Meter {
    serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
        "metadata": {"name": format!("m{i}")},
        "spec": {"eventType": format!("type{i}"), "aggregation": "SUM", "valueProperty": "$.v", "groupBy": {"model": "$.model"}}}))
    .unwrap()
}

fn is_ready(m: &Meter) -> bool {
    m.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

#[tokio::main]
async fn main() {
    let Some(ch) = clickhouse("operator bench") else {
        return;
    };
    let n: usize = std::env::var("TALLY_BENCH_METERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let http = reqwest::Client::new();
    let unique = format!("{}_{}", std::process::id(), tally_tests::unix_now());
    let bin = release_bin("tally-operator");

    // Raw limit: the library provisions the same meters in one batch.
    let raw_db = format!("tally_bench_raw_{unique}");
    let chc = tally_clickhouse::Ch::new(&tally_clickhouse::ChConfig {
        url: ch.clone(),
        database: raw_db.clone(),
        user: String::new(),
        password: String::new(),
        cluster: None,
        replica_urls: Vec::new(),
    })
    .unwrap();
    let compiled: Vec<_> = (0..n)
        .map(|i| {
            let mut m = meter(i);
            m.metadata.namespace = Some("bench".into());
            std::sync::Arc::new(tally_meter::engine::CompiledMeter::compile(&m).unwrap())
        })
        .collect();
    let cutover = tally_clickhouse::provision::CutoverConfig::default();
    let t = Instant::now();
    tally_clickhouse::provision::provision(&chc, &compiled, &cutover)
        .await
        .unwrap();
    let raw = t.elapsed();
    let _ = ch_query(&http, &ch, &format!("DROP DATABASE IF EXISTS {raw_db}")).await;

    // The operator.
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = Cluster::connect("operator bench").await else {
        return;
    };
    let client = cluster.client().await;
    cluster
        .namespaces(&client, &["tally-system", "bench"])
        .await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let _ = crds
        .create(&PostParams::default(), &tally_crds::meter_crd())
        .await;
    let db = format!("tally_bench_op_{unique}");
    let (op, metrics) = start_operator(
        bin,
        &cluster.kubeconfig,
        "tally-system",
        &["--clickhouse", &ch, "--clickhouse-database", &db],
        dir.path().join("operator.log"),
    );
    let meters: Api<Meter> = Api::namespaced(client.clone(), "bench");
    // Wait until the operator leads and has provisioned the schema (its own start-up).
    let started = Instant::now();
    while !http
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .ok()
        .map(|r| r.status().is_success())
        .unwrap_or(false)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "operator did not start:\n{}",
            op.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    for i in 0..n {
        meters
            .create(&PostParams::default(), &meter(i))
            .await
            .unwrap();
    }
    let created = t.elapsed();
    let mut peak = 0u64;
    let mut first_ready = None;
    loop {
        peak = peak.max(rss_of(op.pid()));
        let list = meters.list(&ListParams::default()).await.unwrap();
        let ready = list.items.iter().filter(|m| is_ready(m)).count();
        if ready > 0 && first_ready.is_none() {
            first_ready = Some(t.elapsed());
        }
        if ready == n {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "only {ready}/{n} ready after 10 min:\n{}",
            op.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = t.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rest = rss_of(op.pid());
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "operator bench: {n} Meters (SUM, one groupBy), ClickHouse rollups + views + backfill, default cutover 5 s + 5 s grace"
    );
    println!(
        "  created in the API in            {:>8.2} s",
        created.as_secs_f64()
    );
    println!(
        "  first Ready after                {:>8.2} s",
        first_ready.unwrap_or_default().as_secs_f64()
    );
    println!(
        "  all {n} Ready after               {:>8.2} s",
        all.as_secs_f64()
    );
    println!(
        "  raw limit (library batch provision of the same {n}, no Kubernetes): {:.2} s",
        raw.as_secs_f64()
    );
    println!(
        "  ratio raw / operator             {:>8.2}",
        raw.as_secs_f64() / all.as_secs_f64()
    );
    println!(
        "  operator peak RSS while provisioning {:.1} MiB, at rest {:.1} MiB",
        mib(peak),
        mib(rest)
    );
    let _ = ch_query(&http, &ch, &format!("DROP DATABASE IF EXISTS {db}")).await;
    drop(op);
}
