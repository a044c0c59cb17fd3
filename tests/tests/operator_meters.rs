//! The Meter controller end to end: two `tally-operator` replicas (one leads), a
//! `tally-server --kubernetes` (ingest to Kafka, queries from ClickHouse, meters from the
//! API) and `tally-server sink`, against the real control plane (or `TALLY_KUBECONFIG`)
//! with real tansu and ClickHouse.
//!
//! One story, in order: events before the Meter exist → apply it → Ready, rollup in
//! ClickHouse, the old events counted exactly; an invalid Meter → `Ready=False` naming
//! the field; a changed `groupBy` → rebuilt while every query answer stays exact, the
//! leader SIGKILLed in the middle of it and the standby finishing it; the operator at
//! rest writes nothing; delete → views and rollups dropped, finalizer removed, raw
//! events kept.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tally_crds::Meter;
use tally_tests::kube::Cluster;
use tally_tests::stack::{Pipeline, Stack};
use tally_tests::{ch_query, clickhouse, eventually, group_totals, kafka};

fn event(id: &str, subject: &str, model: &str, region: &str, tokens: u64) -> serde_json::Value {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": "llm", "subject": subject,
           "time": "2026-01-01T00:00:00Z", "data": {"tokens": tokens, "model": model, "region": region}})
}

/// Events `range` (tokens `i + 1`, models and regions in turn, five subjects), adding
/// their tokens per model to `expected`.
fn usage(
    range: std::ops::Range<u64>,
    expected: &mut BTreeMap<String, u64>,
) -> Vec<serde_json::Value> {
    range
        .map(|i| {
            let (model, region) = (
                ["gpt", "claude"][(i % 2) as usize],
                ["eu", "us", "ap"][(i % 3) as usize],
            );
            *expected.entry(model.into()).or_default() += i + 1;
            event(
                &format!("e{i}"),
                &format!("s{}", i % 5),
                model,
                region,
                i + 1,
            )
        })
        .collect()
}

async fn ingest(http: &reqwest::Client, server: &str, events: &[serde_json::Value]) {
    let r = http
        .post(format!("http://{server}/api/v1/namespaces/acme/events"))
        .header("content-type", "application/cloudevents-batch+json")
        .json(events)
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "ingest: {} {}",
        r.status(),
        r.text().await.unwrap_or_default()
    );
}

async fn wait<T>(limit: Duration, what: &str, probe: impl AsyncFnMut() -> Option<T>) -> T {
    eventually(limit, Duration::from_millis(200), what, probe).await
}

fn ready(m: &Meter) -> Option<(String, String, String)> {
    let c = m
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn leader_of(http: &reqwest::Client, stack: &Stack) -> Option<usize> {
    for (i, (_, metrics)) in stack.operators.iter().enumerate() {
        if let Ok(r) = http.get(format!("http://{metrics}/metrics")).send().await
            && r.text()
                .await
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim() == "tally_operator_leader 1")
        {
            return Some(i);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_are_provisioned_backfilled_rebuilt_and_cleaned_up_by_the_operator() {
    let test = "operator_meters";
    let (Some(brokers), Some(ch)) = (kafka(test), clickhouse(test)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    eprintln!(
        "logs in {} (kept with TALLY_KEEP_LOGS=1)",
        dir.path().display()
    );
    let dir = tally_tests::KeptDir(Some(dir));
    let Some(cluster) = Cluster::connect(test).await else {
        return;
    };
    let client = cluster.client().await;
    let http = reqwest::Client::new();
    let unique = format!("{}_{}", std::process::id(), tally_tests::unix_now());
    let (db, topic) = (format!("tally_op_{unique}"), format!("tally-op-{unique}"));

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let _ = crds
        .create(&PostParams::default(), &tally_crds::meter_crd())
        .await;
    cluster.namespaces(&client, &["acme", "tally-system"]).await;
    let operator_kc = cluster.kubeconfig_as("tally-operator", dir.path());
    let mut stack = Stack::start(
        dir.path(),
        (&cluster.kubeconfig, &operator_kc),
        &Pipeline {
            brokers: &brokers,
            clickhouse: &ch,
            database: &db,
            topic: &topic,
        },
        2,
        &[
            "--topic-partitions",
            "2",
            "--rollup-drain-secs",
            "2",
            "--lease-secs",
            "4",
        ],
    );
    let leader = wait(Duration::from_secs(30), "a leader", async || {
        leader_of(&http, &stack).await
    })
    .await;

    // Events before the Meter exists.
    let mut expected_by_model: BTreeMap<String, u64> = BTreeMap::new();
    let early = usage(0..300, &mut expected_by_model);
    ingest(&http, &stack.server, &early).await;
    let count_sql = format!("SELECT count() FROM {db}.events");
    wait(
        Duration::from_secs(60),
        "the early events in ClickHouse",
        async || (ch_query(&http, &ch, &count_sql).await == "300").then_some(()),
    )
    .await;

    // Apply the Meter → Ready, rollup exists, the early events are counted exactly.
    let meters: Api<Meter> = Api::namespaced(client.clone(), "acme");
    let m: Meter = serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
        "metadata": {"name": "tokens"},
        "spec": {"eventType": "llm", "aggregation": "SUM", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}}})).unwrap();
    meters.create(&PostParams::default(), &m).await.unwrap();
    let mut seen: Vec<(String, Option<String>)> = Vec::new();
    let first = wait(
        Duration::from_secs(60),
        "the Meter to be Ready",
        async || {
            let m = meters.get("tokens").await.ok()?;
            let (status, reason, _) = ready(&m)?;
            let progress = m
                .status
                .as_ref()?
                .storage
                .as_ref()
                .and_then(|s| s.backfill.clone());
            if seen.last() != Some(&(reason.clone(), progress.clone())) {
                seen.push((reason, progress));
            }
            (status == "True").then_some(m)
        },
    )
    .await;
    let backfilling = seen
        .iter()
        .find(|(r, _)| r == "Backfilling")
        .unwrap_or_else(|| panic!("backfill progress was shown: {seen:?}"));
    assert!(
        backfilling
            .1
            .as_deref()
            .is_some_and(|p| p.contains("cutover")),
        "{seen:?}"
    );
    assert_eq!(
        seen.last().unwrap(),
        &("Provisioned".to_string(), Some("complete".to_string()))
    );
    // Events are published beside the status write and can land a moment after it
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "acme");
    let deadline = Instant::now() + Duration::from_secs(10);
    let reasons = loop {
        let reasons: Vec<String> = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("tokens"))
            .filter_map(|e| e.reason)
            .collect();
        let both = ["Backfilling", "Provisioned"]
            .iter()
            .all(|r| reasons.iter().any(|x| x == r));
        if both || Instant::now() >= deadline {
            break reasons;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        reasons.contains(&"Backfilling".to_string())
            && reasons.contains(&"Provisioned".to_string()),
        "Kubernetes Events: {reasons:?}"
    );
    let status = first.status.clone().unwrap();
    assert_eq!(status.observed_generation, first.metadata.generation);
    let storage = status.storage.clone().unwrap();
    let rollup = storage.rollup_table.clone().unwrap();
    assert!(
        storage.backfilled && storage.cutover.is_some(),
        "{storage:?}"
    );
    assert!(first.finalizers().iter().any(|f| f == "tally.dev/rollup"));
    assert_eq!(
        ch_query(&http, &ch, &format!("EXISTS TABLE {db}.{rollup}")).await,
        "1"
    );
    let got = wait(
        Duration::from_secs(30),
        "the query API to serve the meter",
        async || {
            group_totals(&http, &stack.server, ("acme", "tokens"), "model")
                .await
                .ok()
                .filter(|t| *t == expected_by_model)
        },
    )
    .await;
    assert_eq!(
        got, expected_by_model,
        "events ingested before the Meter existed are counted once"
    );

    // More events flow through the view.
    let late = usage(300..400, &mut expected_by_model);
    ingest(&http, &stack.server, &late).await;
    wait(
        Duration::from_secs(30),
        "the late events in the totals",
        async || {
            (group_totals(&http, &stack.server, ("acme", "tokens"), "model")
                .await
                .ok()?
                == expected_by_model)
                .then_some(())
        },
    )
    .await;

    // An invalid Meter (passes the schema, not the engine) → Ready=False naming the field.
    let bad: Meter = serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
        "metadata": {"name": "bad"}, "spec": {"eventType": "llm", "aggregation": "SUM", "valueProperty": "$.items[*].tokens"}})).unwrap();
    meters.create(&PostParams::default(), &bad).await.unwrap();
    let (_, reason, message) = wait(
        Duration::from_secs(30),
        "the invalid Meter's status",
        async || ready(&meters.get("bad").await.ok()?).filter(|r| r.0 == "False"),
    )
    .await;
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("spec.valueProperty"), "{message}");
    let r = http
        .get(format!(
            "http://{}/api/v1/namespaces/acme/meters/bad/query",
            stack.server
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "an invalid meter is not served");

    // Change groupBy → a new rollup is backfilled while every answer stays exact.
    let patch =
        Patch::Merge(json!({"spec": {"groupBy": {"model": "$.model", "region": "$.region"}}}));
    meters
        .patch("tokens", &PatchParams::default(), &patch)
        .await
        .unwrap();
    // The leader is SIGKILLed in the middle of the rebuild; the standby finishes it.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut answers = 0;
    let standby = 1 - leader;
    let mut killed_while_rebuilding = false;
    let new_rollup = loop {
        let t = group_totals(&http, &stack.server, ("acme", "tokens"), "model").await;
        assert_eq!(
            t.as_ref(),
            Ok(&expected_by_model),
            "answer {answers} during the rebuild"
        );
        answers += 1;
        let m = meters.get("tokens").await.unwrap();
        let s = m.status.clone().unwrap();
        let table = s
            .storage
            .as_ref()
            .and_then(|s| s.rollup_table.clone())
            .unwrap();
        if table != rollup && s.observed_generation == m.metadata.generation {
            break table;
        }
        let rebuilding = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == "Rebuilding");
        if rebuilding && !killed_while_rebuilding {
            stack.operators[leader].0.kill9();
            killed_while_rebuilding = true;
        }
        assert!(
            Instant::now() < deadline,
            "the rebuild did not finish: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(answers > 5, "the rebuild was observed ({answers} answers)");
    assert!(
        killed_while_rebuilding,
        "the leader was killed while Rebuilding"
    );
    assert_eq!(
        leader_of(&http, &stack).await,
        Some(standby),
        "the standby finished the rebuild"
    );
    let mut by_region: BTreeMap<String, u64> = BTreeMap::new();
    for e in early.iter().chain(&late) {
        *by_region
            .entry(e["data"]["region"].as_str().unwrap().into())
            .or_default() += e["data"]["tokens"].as_u64().unwrap();
    }
    let got = wait(
        Duration::from_secs(30),
        "the new groupBy to be served",
        async || {
            group_totals(&http, &stack.server, ("acme", "tokens"), "region")
                .await
                .ok()
                .filter(|t| *t == by_region)
        },
    )
    .await;
    assert_eq!(got, by_region);
    assert_eq!(
        group_totals(&http, &stack.server, ("acme", "tokens"), "model")
            .await
            .unwrap(),
        expected_by_model,
        "exact after the swap"
    );
    wait(
        Duration::from_secs(30),
        "the replaced rollup to be dropped after its drain",
        async || {
            (ch_query(&http, &ch, &format!("EXISTS TABLE {db}.{rollup}")).await == "0")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        ch_query(&http, &ch, &format!("EXISTS TABLE {db}.{new_rollup}")).await,
        "1"
    );

    // At rest: the operators write nothing but the Lease's renewals (the audit log says).
    if let Some(plane) = cluster.own_plane("operator_meters: writes at rest") {
        wait(
            Duration::from_secs(30),
            "the retiring rollup to leave the status",
            async || {
                let m = meters.get("tokens").await.ok()?;
                m.status?
                    .storage?
                    .retiring_rollup_table
                    .is_none()
                    .then_some(())
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mark = plane.audit_mark();
        tokio::time::sleep(Duration::from_secs(6)).await;
        let writes = plane.writes_since(mark, "tally-operator");
        assert!(writes.is_empty(), "writes at rest: {writes:?}");
    }

    // The standby, now leading, handles the delete.
    meters
        .delete("tokens", &DeleteParams::default())
        .await
        .unwrap();
    wait(
        Duration::from_secs(60),
        "the Meter to be gone",
        async || {
            matches!(meters.get("tokens").await, Err(kube::Error::Api(e)) if e.code == 404)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        ch_query(&http, &ch, &format!("EXISTS TABLE {db}.{new_rollup}")).await,
        "0",
        "rollup dropped"
    );
    let views = ch_query(
        &http,
        &ch,
        &format!(
            "SELECT count() FROM system.tables WHERE database = '{db}' AND name LIKE '%{}%'",
            new_rollup
        ),
    )
    .await;
    assert_eq!(views, "0", "views dropped too");
    assert_eq!(
        ch_query(&http, &ch, &count_sql).await,
        "400",
        "raw events stay"
    );
    let r = http
        .get(format!(
            "http://{}/api/v1/namespaces/acme/meters/tokens/query",
            stack.server
        ))
        .send()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = r.status();
    while status != 404 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = http
            .get(format!(
                "http://{}/api/v1/namespaces/acme/meters/tokens/query",
                stack.server
            ))
            .send()
            .await
            .unwrap()
            .status();
    }
    assert_eq!(status, 404, "a deleted meter is not served");
    let _ = ch_query(&http, &ch, &format!("DROP DATABASE IF EXISTS {db}")).await;
    let metrics = http
        .get(format!("http://{}/metrics", stack.operators[standby].1))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tally_operator_reconciles_total{controller=\"meter\"}"),
        "{metrics}"
    );
    let log = stack.operators[standby].0.log();
    assert!(
        stack.operators[standby].0.terminate(),
        "the leader stops on SIGTERM:\n{log}"
    );
}
