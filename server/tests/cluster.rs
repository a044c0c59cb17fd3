//! tally on a replicated, sharded ClickHouse: 2 shards × 2 replicas of Debian's
//! clickhouse-server 18.16 with ZooKeeper 3.8, all on loopback, tansu for Kafka. Events
//! stream in while each shard's writer replica, the sink and ZooKeeper are killed and
//! restarted; queries keep answering while a replica is down, and afterwards every
//! answer equals the hand-computed one, on every replica.
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::services::{
    ClickHouseCluster, SinkProcess, ZooKeeper, ch, cluster_available, services, unique,
};
use common::{Server, client};
use serde_json::{Value, json};

const METERS: &str = r#"
apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: tokens}
spec:
  eventType: llm
  aggregation: SUM
  valueProperty: $.tokens
  groupBy: {model: $.model}
---
apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: calls}
spec:
  eventType: llm
  aggregation: COUNT
"#;

const LATE_METER: &str = r#"
apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: tokens-late}
spec:
  eventType: llm
  aggregation: SUM
  valueProperty: $.tokens
"#;

const SUBJECTS: u64 = 20;

/// Event `i`: subject, second of the day and tokens all follow from `i`.
fn event(i: u64) -> Value {
    let second = (i * 7) % 86_400;
    json!({"specversion": "1.0", "id": format!("ev-{i}"), "source": "load", "type": "llm",
           "subject": format!("customer-{}", i % SUBJECTS),
           "time": format!("2024-06-01T{:02}:{:02}:{:02}Z", second / 3600, second / 60 % 60, second % 60),
           "data": {"tokens": (i % 97) + 1, "model": if i.is_multiple_of(3) { "small" } else { "large" }}})
}

/// One of the "twin" events: all alike but for their id, so the rollup rows of the
/// batches that carry them are byte-identical.
fn twin(k: u64) -> Value {
    json!({"specversion": "1.0", "id": format!("twin-{k}"), "source": "load", "type": "llm",
           "subject": "twin", "time": "2024-06-01T10:00:05Z",
           "data": {"tokens": 7, "model": "small"}})
}

/// Hand-computed per-subject (tokens, calls) of events `0..n` and `twins` twins.
fn expected(n: u64, twins: u64) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let (mut tokens, mut calls) = (BTreeMap::new(), BTreeMap::new());
    for i in 0..n {
        let s = format!("customer-{}", i % SUBJECTS);
        *tokens.entry(s.clone()).or_default() += (i % 97) + 1;
        *calls.entry(s).or_default() += 1;
    }
    if twins > 0 {
        tokens.insert("twin".into(), 7 * twins);
        calls.insert("twin".into(), twins);
    }
    (tokens, calls)
}

/// Posts `body` to the ingest URL until it is accepted (204); 503 is retried, as a
/// client would, anything else fails the test.
async fn post(url: &str, body: &Value) {
    let c = client();
    loop {
        let res = c
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        match res.status().as_u16() {
            204 => return,
            503 => tokio::time::sleep(Duration::from_millis(200)).await,
            s => panic!(
                "ingest answered {s}: {}",
                res.text().await.unwrap_or_default()
            ),
        }
    }
}

/// Per-subject totals of `slug`; panics on any error answer (queries must keep
/// answering while a replica is down).
async fn totals(server: &Server, slug: &str) -> BTreeMap<String, u64> {
    tally_tests::group_totals(&client(), &server.addr, ("default", slug), "subject")
        .await
        .unwrap_or_else(|e| panic!("query of {slug} failed: {e}"))
}

/// What each replica holds (for a failure message): rows and distinct ids per Kafka
/// partition, and the tokens rollup by origin.
async fn replica_report(urls: &[String], db: &str) -> String {
    let mut out = String::new();
    for url in urls {
        let rollup = ch(
            url,
            &format!("SELECT rollup FROM {db}.meters FINAL WHERE slug = 'tokens'"),
        )
        .await;
        let parts = ch(url, &format!("SELECT kafka_partition, count(), uniqExact(id) FROM {db}.events GROUP BY kafka_partition ORDER BY kafka_partition")).await;
        let sums = ch(
            url,
            &format!(
                "SELECT origin, sumMerge(sum) FROM {db}.{} GROUP BY origin",
                rollup.trim()
            ),
        )
        .await;
        out.push_str(&format!("{url}:\n{parts}rollup {sums}"));
    }
    out
}

async fn until_totals(
    (server, sink): (&Server, &SinkProcess),
    (urls, db): (&[String], &str),
    (n, twins): (u64, u64),
    limit: Duration,
) {
    let (tokens, calls) = expected(n, twins);
    let deadline = Instant::now() + limit;
    loop {
        let (t, c) = (
            totals(server, "tokens").await,
            totals(server, "calls").await,
        );
        if t == tokens && c == calls {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "after {limit:?} the answers differ from the hand computation:\n tokens {t:?}\n want   {tokens:?}\n calls  {c:?}\n want   {calls:?}\nreplicas:\n{}\nsink log:\n{}",
                replica_report(urls, db).await,
                sink.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Runs `count` queries 250 ms apart while a replica is down; each must answer.
async fn queries_while_down(server: &Server, count: usize) {
    for _ in 0..count {
        totals(server, "tokens").await;
        totals(server, "calls").await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sharded_replicated_cluster_counts_exactly_once_through_replica_sink_and_zookeeper_crashes()
 {
    let test = "cluster test";
    let Some(svc) = services(test) else { return };
    if !cluster_available(test) {
        return;
    }
    let started = Instant::now();
    let mut zk = ZooKeeper::start();
    let mut cluster = ClickHouseCluster::start(2, 2, zk.port);
    let (db, topic) = (unique("c"), unique("c"));
    // The server talks to shard 1's second replica: the sink writes through each
    // shard's first, the replicas killed below.
    let query_url = cluster.servers[0][1].url.clone();
    eprintln!(
        "cluster of {} servers up in {:?}; ClickHouse {}",
        cluster.urls().len(),
        started.elapsed(),
        ch(&query_url, "SELECT version()").await.trim()
    );
    let urls = cluster.urls().join(",");
    let common = [
        "--clickhouse-cluster",
        "c1",
        "--clickhouse-replica-urls",
        &urls,
        "--cutover-margin-secs",
        "1",
        "--cutover-grace-secs",
        "1",
    ];
    let mut server_args = vec![
        "--kafka",
        &svc.kafka,
        "--topic",
        &topic,
        "--topic-partitions",
        "4",
        "--clickhouse",
        &query_url,
        "--clickhouse-database",
        &db,
        "--provision",
    ];
    server_args.extend(common);
    let server = Server::start(&[("meters.yaml", METERS)], &server_args);
    eprintln!(
        "schema and meters provisioned ON CLUSTER by {:?}",
        started.elapsed()
    );
    let sink_args = [
        "--clickhouse-cluster",
        "c1",
        "--clickhouse-replica-urls",
        &urls,
        "--batch-rows",
        "300",
    ];
    let mut sink = SinkProcess::start(&svc.kafka, &query_url, &db, &topic, &sink_args);

    // a first stream, then three batches whose rollup rows are byte-identical
    const N: u64 = 6_000;
    for start in (0..1_500).step_by(250) {
        post(
            &server.url("/api/v1/events"),
            &Value::Array((start..start + 250).map(event).collect()),
        )
        .await;
    }
    let all = cluster.urls();
    until_totals(
        (&server, &sink),
        (&all, &db),
        (1_500, 0),
        Duration::from_secs(60),
    )
    .await;
    for k in 1..=3 {
        post(&server.url("/api/v1/events"), &Value::Array(vec![twin(k)])).await;
        until_totals(
            (&server, &sink),
            (&all, &db),
            (1_500, k),
            Duration::from_secs(30),
        )
        .await;
    }

    // the rest streams in while things crash
    let sender = {
        let url = server.url("/api/v1/events");
        tokio::spawn(async move {
            // about 30 s: the late meter's ON CLUSTER DDL and every crash below happen
            // while events stream
            for start in (1_500..N).step_by(60) {
                let body = Value::Array((start..(start + 60).min(N)).map(event).collect());
                post(&url, &body).await;
                tokio::time::sleep(Duration::from_millis(350)).await;
            }
        })
    };
    // a meter created while events stream: backfilled through the Distributed tables
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(server.manifests.join("late.yaml"), LATE_METER).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client()
        .get(server.url("/api/v1/meters/tokens_late"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "the late meter was not served within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !sender.is_finished(),
        "events should still stream at the cutover"
    );
    for shard in 0..2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprintln!("SIGKILL shard {}'s writer replica", shard + 1);
        cluster.servers[shard][0].kill9();
        queries_while_down(&server, 10).await;
        cluster.servers[shard][0].restart();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("SIGKILL the sink; it restarts and aborts with views fed, events not stored");
    sink.restart_with(&[
        ("TALLY_SINK_FAILPOINT", "after-feed"),
        ("TALLY_SINK_FAILPOINT_SKIP", "2"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sink.exited() {
        assert!(
            Instant::now() < deadline,
            "fail point not hit:\n{}",
            tail(&sink.log_text())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sink.restart_with(&[]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("SIGKILL ZooKeeper, then start it again");
    zk.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    queries_while_down(&server, 2).await;
    zk.restart();
    sender.await.unwrap();
    until_totals(
        (&server, &sink),
        (&all, &db),
        (N, 3),
        Duration::from_secs(150),
    )
    .await;
    assert!(
        !sink.exited(),
        "the sink exited:\n{}",
        tail(&sink.log_text())
    );
    // the late meter: exact too (read through Distributed tables, whose replicas may
    // still be fetching the newest parts for a moment)
    let (tokens, _) = expected(N, 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut late = totals(&server, "tokens_late").await;
    while late != tokens && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        late = totals(&server, "tokens_late").await;
    }
    assert_eq!(late, tokens, "the late meter");
    let rollup = ch(
        &query_url,
        &format!("SELECT rollup FROM {db}.meters FINAL WHERE slug = 'tokens_late'"),
    )
    .await
    .trim()
    .to_string();
    let origins = ch(
        &query_url,
        &format!(
            "SELECT origin, countMerge(cnt) FROM {db}.{rollup}_all GROUP BY origin ORDER BY origin"
        ),
    )
    .await;
    assert_eq!(
        origins.lines().count(),
        2,
        "the backfill and the view both counted: {origins}"
    );

    // every replica holds its shard's rows exactly once, and the shards hold them all
    let mut per_shard = Vec::new();
    for shard in &cluster.servers {
        let mut counts = Vec::new();
        for replica in shard {
            ch(&replica.url, &format!("SYSTEM SYNC REPLICA {db}.events")).await;
            let n = ch(
                &replica.url,
                &format!("SELECT count(), uniqExact(id) FROM {db}.events"),
            )
            .await;
            counts.push(n.trim().to_string());
        }
        assert!(
            counts.windows(2).all(|w| w[0] == w[1]),
            "the replicas of a shard differ: {counts:?}"
        );
        per_shard.push(counts[0].clone());
    }
    let total: u64 = per_shard
        .iter()
        .map(|c| c.split('\t').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, N + 3, "rows over the shards: {per_shard:?}");
    assert!(
        per_shard.iter().all(|c| !c.starts_with("0\t")),
        "both shards hold rows: {per_shard:?}"
    );
    let log = sink.log_text();
    let seen = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    eprintln!(
        "sink: {} retried steps, {} repairs after a failed step, {} repairs at start",
        seen("retrying"),
        seen("repairing it"),
        seen("Repairing a batch that began")
    );
    assert!(
        seen("failpoint after-feed hit") == 1 && seen("Repairing a batch that began") >= 1,
        "the sink should have repaired the batch it aborted:\n{}",
        tail(&log)
    );
    assert!(
        seen("retrying") > 0,
        "the sink should have seen its writer go away:\n{}",
        tail(&log)
    );

    // completeness on the cluster: a watermark is produced to every partition, stored
    // by the sink on each partition's shard and read back over the Distributed tables
    let mark = json!([{"collector": "load", "source": "load", "types": ["llm"],
        "until": 1_717_286_400_000i64, // 2024-06-02
        "gaps": [{"from": 1_717_200_000_000i64, "to": 1_717_200_060_000i64, "reason": "a test gap"}]}]);
    let r = client()
        .post(server.url("/api/v1/watermarks"))
        .json(&mark)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap_or_default());
    let url = server.url(
        "/api/v1/meters/tokens/completeness?from=2024-06-01T01:00:00Z&to=2024-06-02T00:00:00Z",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body: Value = client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["status"] == "complete" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "completeness on the cluster: {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let gapped: Value = client()
        .get(server.url(
            "/api/v1/meters/tokens/completeness?from=2024-06-01T00:00:00Z&to=2024-06-02T00:00:00Z",
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(gapped["sources"][0]["status"], "gap", "{gapped}");

    // deleting the meter drops its view, rollup and Distributed table on every server
    std::fs::remove_file(server.manifests.join("late.yaml")).unwrap();
    for url in cluster.urls() {
        let sql = format!(
            "SELECT count() FROM system.tables WHERE database = '{db}' AND name LIKE '{rollup}%'"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while ch(&url, &sql).await.trim() != "0" {
            assert!(
                Instant::now() < deadline,
                "the late meter's tables stay on {url}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!("cluster test done in {:?}", started.elapsed());
}
