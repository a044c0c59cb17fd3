//! `make bench`: how long a UsageBudget takes to act. From the moment the event that
//! crosses a threshold is durable (the store's submit resolved) to the moment its
//! signed webhook reaches a receiver on loopback, for TALLY_BENCH_CROSSINGS (30)
//! crossings one after the other (each a new subject of a per-subject budget), with
//! the standalone server's evaluator at its default interval (`--budget-interval-ms`,
//! 2 s; the goal is p99 ≤ 5 s), each submitted at a different phase of that interval.
//! Measured, never asserted.
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{env, percentile};
use tally_crds::UsageEvent;
use tally_embedded::{EmbeddedConfig, EmbeddedStore};
use tally_meter::engine::CompiledMeter;
use tally_meter::store::Store;
use tally_server::api::{AppState, Limits};
use tally_server::budgets::{BudgetConfig, spawn};
use tally_server::catalog::Catalog;
use tally_server::metrics::Metrics;

const METER: &str = "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: tokens}\nspec: {eventType: llm, aggregation: SUM, valueProperty: $.tokens}\n";
const BUDGET: &str = "apiVersion: tally.dev/v1alpha1\nkind: UsageBudget\nmetadata: {name: per-customer}\nspec: {meter: tokens, perSubject: true, period: {calendar: MONTH}, limit: 100, webhook: {secretRef: {name: hooks}}}\n";

#[tokio::main]
async fn main() {
    let n: usize = env("TALLY_BENCH_CROSSINGS", 30);
    let interval_ms = env("TALLY_BENCH_BUDGET_INTERVAL_MS", 2000) as u64;
    let dir = tempfile::tempdir().unwrap();
    let store =
        Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.path().join("data"))).unwrap());
    let meter: tally_crds::Meter = serde_yaml::from_str(METER).unwrap();
    let compiled = Arc::new(CompiledMeter::compile(&meter).unwrap());
    let synced = store.sync_meters(vec![compiled]).unwrap();
    let state = AppState::new(
        store.clone(),
        Limits::default(),
        Arc::new(Metrics::default()),
    );
    state.publish(Catalog::new(synced.meters));

    // the receiver: arrival time per subject
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let app = {
        let arrived = arrived.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: String| {
                let arrived = arrived.clone();
                async move {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    if let Some(s) = v["data"]["subject"].as_str() {
                        arrived
                            .lock()
                            .unwrap()
                            .entry(s.to_string())
                            .or_insert_with(Instant::now);
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("budget.yaml"), BUDGET).unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(secrets.join("default/hooks")).unwrap();
    std::fs::write(
        secrets.join("default/hooks/url"),
        format!("http://{hook}/hook"),
    )
    .unwrap();
    std::fs::write(
        secrets.join("default/hooks/secret"),
        "whsec_YmVuY2gtYnVkZ2V0LWtleS0wMTIzNDU2Nzg5YWJj",
    )
    .unwrap();
    spawn(
        state,
        store.clone(),
        store.clone(),
        BudgetConfig {
            dir: manifests,
            interval: Duration::from_millis(interval_ms),
            secrets_dir: Some(secrets),
            any_url: true,
            clock_file: None,
        },
    );
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        // submit at a spread of phases of the evaluator's interval (sequential crossings
        // would otherwise each land just after an evaluation)
        let phase = (i as u64 * 7919) % interval_ms.max(1);
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let subject = format!("customer-{i}");
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let json = serde_json::json!({"specversion": "1.0", "id": format!("b{i}"), "source": "bench", "type": "llm", "subject": subject, "time": now, "data": {"tokens": 150}});
        let event = UsageEvent::from_json(&json, chrono::Utc::now().timestamp_millis()).unwrap();
        store
            .submit("default", vec![event])
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        let stored = Instant::now();
        let got = loop {
            if let Some(t) = arrived.lock().unwrap().get(&subject) {
                break *t;
            }
            assert!(
                stored.elapsed() < Duration::from_secs(120),
                "no webhook for {subject}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        latencies.push(got.saturating_duration_since(stored));
    }
    latencies.sort();
    let mean = latencies.iter().map(Duration::as_secs_f64).sum::<f64>() / n as f64;
    println!(
        "budget webhook latency (event stored -> webhook received), {n} crossings, evaluator every {interval_ms} ms: p50 {:.0} ms, p99 {:.0} ms, mean {:.0} ms, max {:.0} ms (goal p99 <= 5000 ms)",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        mean * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );
}
