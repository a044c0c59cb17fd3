//! The scale-out path on real tansu and ClickHouse 18.16: ingest → Kafka → sink →
//! ClickHouse → query, with the sink and ClickHouse crashed on purpose. Every test uses
//! its own database and topic. Needs `make services` (skips with a reason otherwise;
//! fails under `CI`).
mod common;

use std::time::{Duration, Instant};

use common::services::{
    PrivateClickHouse, Services, SinkProcess, ch, services, unique, until_zero,
};
use common::{Server, client, get_json, post_events, repo};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
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
---
apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: users}
spec:
  eventType: llm
  aggregation: UNIQUE_COUNT
  valueProperty: $.user
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

/// One deterministic event: `i` decides subject, minute, model, tokens and user.
fn llm_event(i: u64) -> Value {
    let minute = i % 600;
    json!({"specversion": "1.0", "id": format!("ev-{i}"), "source": "load", "type": "llm",
           "subject": format!("customer-{}", i % 50),
           "time": format!("2024-06-01T{:02}:{:02}:{:02}.{:03}Z", minute / 60, minute % 60, i % 60, i % 1000),
           "data": {"tokens": (i % 97) + 1, "model": if i.is_multiple_of(3) { "small" } else { "large" }, "user": format!("u{}", i % 1234)}})
}

/// Posts events `range` to `server_url` in the background, `per` at a time with a
/// `pause_ms` pause after each batch; every batch must be accepted (204).
fn paced_sender(
    server_url: String,
    range: std::ops::Range<u64>,
    per: u64,
    pause_ms: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = client();
        for start in range.clone().step_by(per as usize) {
            let body = Value::Array(
                (start..(start + per).min(range.end))
                    .map(llm_event)
                    .collect(),
            );
            let res = c
                .post(format!("{server_url}/api/v1/events"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(res.status().as_u16(), 204);
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
    })
}

/// Hand-computed totals of events `0..n`: (SUM of tokens, COUNT, UNIQUE users).
fn totals(n: u64) -> (u64, u64, u64) {
    let sum = (0..n).map(|i| (i % 97) + 1).sum();
    (sum, n, n.min(1234))
}

/// `SELECT version()` of the ClickHouse at `url` (from a multi-threaded runtime).
fn server_version(url: &str) -> String {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(ch(url, "SELECT version()"))
    })
    .trim()
    .to_string()
}

/// The server's arguments for a stack on `topic` (4 partitions) and `database`; with
/// `provision`, it creates the tables and rollups with a 1 s cutover margin and grace.
fn server_args(
    svc: &Services,
    topic: &str,
    clickhouse: &str,
    database: &str,
    provision: bool,
) -> Vec<String> {
    let mut args = vec![
        "--kafka",
        &svc.kafka,
        "--topic",
        topic,
        "--topic-partitions",
        "4",
        "--clickhouse",
        clickhouse,
        "--clickhouse-database",
        database,
    ];
    if provision {
        args.extend([
            "--provision",
            "--cutover-margin-secs",
            "1",
            "--cutover-grace-secs",
            "1",
        ]);
    }
    args.into_iter().map(String::from).collect()
}

struct Stack {
    svc: Services,
    clickhouse: String,
    database: String,
    topic: String,
    server: Server,
    sink: SinkProcess,
}

impl Stack {
    /// Server (provisioning `meters`) and sink on a fresh database and topic.
    fn start(svc: Services, clickhouse: &str, meters: &str, sink_extra: &[&str]) -> Stack {
        Stack::start_on(svc, clickhouse, &unique("t"), meters, sink_extra)
    }

    /// [`Stack::start`] on `database` (which may exist already).
    fn start_on(
        svc: Services,
        clickhouse: &str,
        database: &str,
        meters: &str,
        sink_extra: &[&str],
    ) -> Stack {
        let database = database.to_string();
        let topic = unique("t");
        let args = server_args(&svc, &topic, clickhouse, &database, true);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        eprintln!(
            "scale-out stack on ClickHouse {} at {clickhouse}",
            server_version(clickhouse)
        );
        let server = Server::start(&[("meters.yaml", meters)], &args);
        let sink = SinkProcess::start(&svc.kafka, clickhouse, &database, &topic, sink_extra);
        Stack {
            clickhouse: clickhouse.to_string(),
            svc,
            database,
            topic,
            server,
            sink,
        }
    }

    /// [`Stack::start`] on the shared ClickHouse 26.9, where the scale-out tests run,
    /// or `None` (the test is skipped; under CI it fails).
    fn on_shared(test: &str, meters: &str, sink_extra: &[&str]) -> Option<Stack> {
        let svc = services(test)?;
        let url = svc.clickhouse26.clone();
        Some(Stack::start(svc, &url, meters, sink_extra))
    }

    /// Posts events `range` in requests of `per` events; a request that fails is sent
    /// again (at-least-once), as a client would.
    async fn send(&self, range: std::ops::Range<u64>, per: u64) {
        let c = client();
        let mut i = range.start;
        while i < range.end {
            let j = (i + per).min(range.end);
            let body = Value::Array((i..j).map(llm_event).collect());
            loop {
                let (status, problem) = post_events(&c, &self.server, &body).await;
                if status == 204 {
                    break;
                }
                assert_eq!(status, 503, "{problem}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            i = j;
        }
    }

    /// Messages in the topic (sum of high watermarks).
    fn produced(&self) -> i64 {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.svc.kafka)
            .set("group.id", "watermarks")
            .create()
            .unwrap();
        (0..4)
            .map(|p| {
                c.fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                    .unwrap()
                    .1
            })
            .sum()
    }

    /// Messages the sink has finished (sum over partitions of the last done offset + 1).
    async fn done(&self) -> i64 {
        let sql = format!(
            "SELECT sum(e + 1) FROM (SELECT kafka_partition, argMax(end_offset, tuple(start_offset, rank, logged_ms)) AS e, \
             argMax(phase, tuple(start_offset, rank, logged_ms)) AS p FROM {}.sink_log GROUP BY kafka_partition) WHERE p = 'done'",
            self.database
        );
        ch(&self.clickhouse, &sql).await.trim().parse().unwrap_or(0)
    }

    /// Waits until the sink has finished every message in the topic.
    async fn drained(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let produced = self.produced();
            if produced > 0 && self.done().await >= produced {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sink did not drain {produced} messages within {limit:?}; log:\n{}",
                tail(&self.sink.log_text())
            );
            assert!(
                !self.sink.exited(),
                "the sink exited:\n{}",
                tail(&self.sink.log_text())
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Restarts the sink with fail point `point` (after `skip` hits) and waits until it
    /// aborted there.
    async fn crash_at(&mut self, point: &str, skip: &str) {
        self.sink.restart_with(&[
            ("TALLY_SINK_FAILPOINT", point),
            ("TALLY_SINK_FAILPOINT_SKIP", skip),
        ]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.sink.exited() {
            assert!(
                Instant::now() < deadline,
                "fail point {point} was not hit:\n{}",
                tail(&self.sink.log_text())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            self.sink
                .log_text()
                .contains(&format!("failpoint {point} hit")),
            "the sink exited without hitting {point}:\n{}",
            tail(&self.sink.log_text())
        );
    }

    /// The whole-range total of a meter, via the query API.
    async fn total(&self, slug: &str) -> f64 {
        let (status, body) = get_json(
            &client(),
            &self.server.url(&format!(
                "/api/v1/meters/{slug}/query?from=2024-06-01T00:00:00Z&to=2024-06-02T00:00:00Z"
            )),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["value"].as_f64().unwrap())
            .sum()
    }

    async fn assert_totals(&self, n: u64) {
        let (sum, count, users) = totals(n);
        assert_eq!(self.total("tokens").await, sum as f64, "SUM of tokens");
        assert_eq!(self.total("calls").await, count as f64, "COUNT");
        assert_eq!(self.total("users").await, users as f64, "UNIQUE_COUNT");
        let stored = ch(
            &self.clickhouse,
            &format!("SELECT count() FROM {}.events", self.database),
        )
        .await;
        assert_eq!(stored.trim(), n.to_string(), "raw rows");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.sink.kill9();
        let (url, db) = (self.clickhouse.clone(), self.database.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(ch(&url, &format!("DROP DATABASE IF EXISTS {db}")))
        })
        .join();
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_dead_letters_and_kafka_outage() {
    let quickstart =
        std::fs::read_to_string(repo().join("examples/quickstart/meters.yaml")).unwrap();
    let Some(mut stack) = Stack::on_shared("scale-out round trip", &quickstart, &[]) else {
        return;
    };
    let (url, svc) = (stack.clickhouse.clone(), stack.svc.clone());
    let c = client();
    let events: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("examples/events.json")).unwrap(),
    )
    .unwrap();
    let (status, body) = post_events(&c, &stack.server, &events).await;
    assert_eq!(status, 204, "{body}");
    // a bad message in the same stream: written by a foreign producer, straight to Kafka
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &svc.kafka)
        .create()
        .unwrap();
    let bad_version =
        json!({"v": 9, "namespace": "default", "ingested_at": 0, "event": {}}).to_string();
    for payload in ["{not json", bad_version.as_str()] {
        producer
            .send(
                FutureRecord::to(&stack.topic)
                    .key("default/x")
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    stack.drained(Duration::from_secs(60)).await;
    let q = |path: &str| stack.server.url(path);
    let (_, tokens) = get_json(&c, &q("/api/v1/meters/llm_tokens/query?groupBy=model&from=2024-05-01T00:00:00Z&to=2024-05-02T00:00:00Z")).await;
    let by_model: Vec<(String, f64)> = tokens["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["groupBy"]["model"].as_str().unwrap().to_string(),
                r["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        by_model,
        vec![
            ("gpt-4o".to_string(), 6550.0),
            ("llama-3-70b".to_string(), 800.0)
        ],
        "{tokens}"
    );
    let (_, dead) = get_json(&c, &q("/api/v1/dead-letters?limit=10")).await;
    let reasons: Vec<&str> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 2, "{dead}");
    assert!(
        reasons.iter().any(|r| r.starts_with("payload is not JSON")),
        "{dead}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("v: envelope version 9")),
        "{dead}"
    );
    let metrics_url = stack.sink.metrics_url();
    let metrics = common::get_text(&c, &metrics_url).await;
    assert!(
        metrics.contains("tally_sink_dead_letters_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_sink_events_stored_total 8"),
        "{metrics}"
    );
    let (_, listed) = get_json(&c, &q("/api/v1/events?limit=100")).await;
    assert_eq!(
        listed.as_array().unwrap().len(),
        events.as_array().unwrap().len(),
        "valid events of the batch are stored"
    );

    // a second server on the same database, without provisioning, serves the provisioned
    // meters; with Kafka unreachable its ingest answers 503 with a problem, quickly
    let dead_kafka = format!("127.0.0.1:{}", common::free_port());
    let reader = Server::start(
        &[("meters.yaml", &quickstart)],
        &[
            "--kafka",
            &dead_kafka,
            "--kafka-timeout-ms",
            "1500",
            "--clickhouse",
            &url,
            "--clickhouse-database",
            &stack.database,
        ],
    );
    let (status, meters) = get_json(&c, &reader.url("/api/v1/meters")).await;
    assert_eq!(
        (status, meters.as_array().unwrap().len()),
        (200, 4),
        "{meters}"
    );
    let started = Instant::now();
    let (status, problem) = post_events(
        &c,
        &reader,
        &common::event(
            "x1",
            "api_request",
            "acme",
            "2024-05-01T00:00:00Z",
            json!({}),
        ),
    )
    .await;
    assert_eq!(status, 503, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains(&dead_kafka),
        "{problem}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ingest must not hang"
    );

    // dedup identities older than the window (32 days) are dropped by month, and sink
    // log rows older than a week except each partition's latest batch, at start
    ch(
        &url,
        &format!(
            "INSERT INTO {}.sink_log SELECT topic, kafka_partition, 1, 'done', 1, -2, -1, inserted_at, 1000 FROM {}.sink_log LIMIT 1",
            stack.database, stack.database
        ),
    )
    .await;
    let log_before = ch(
        &url,
        &format!("SELECT count() FROM {}.sink_log", stack.database),
    )
    .await;
    ch(
        &url,
        &format!(
            "INSERT INTO {}.event_ids (h, namespace, source, id, ingested) VALUES (1, 'default', 'old', 'x', '2020-01-05 00:00:00')",
            stack.database
        ),
    )
    .await;
    stack.sink.restart_with(&[]);
    until_zero(
        &url,
        "expired identities dropped",
        format!(
            "SELECT count() FROM {}.event_ids WHERE ingested < '2021-01-01 00:00:00'",
            stack.database
        ),
    )
    .await;
    until_zero(
        &url,
        "old sink log rows pruned",
        format!(
            "SELECT count() FROM {}.sink_log WHERE start_offset = -2",
            stack.database
        ),
    )
    .await;
    let log_after = ch(
        &url,
        &format!("SELECT count() FROM {}.sink_log", stack.database),
    )
    .await;
    // the restarted sink adds no batches (nothing new to read), so only the old row went
    assert_eq!(
        log_after.trim().parse::<u64>().unwrap() + 1,
        log_before.trim().parse::<u64>().unwrap(),
        "only the week-old row goes; recent rows and each partition's latest batch stay"
    );
    let recent = ch(
        &url,
        &format!("SELECT count() FROM {}.event_ids", stack.database),
    )
    .await;
    assert_eq!(
        recent.trim(),
        events.as_array().unwrap().len().to_string(),
        "identities inside the window stay"
    );
}

/// 200k sends (10% re-sends of earlier events) while the sink is aborted at every fail
/// point and SIGKILLed at a random moment: every meter total is exact.
#[tokio::test(flavor = "multi_thread")]
async fn sink_crashes_at_every_fail_point_lose_and_double_nothing() {
    let Some(mut stack) = Stack::on_shared("sink crash test", METERS, &["--batch-rows", "2000"])
    else {
        return;
    };
    // the backlog is sent first, so every fail point meets batches to crash in
    stack.sink.stop();
    const UNIQUE: u64 = 180_000;
    // unique events, then 20k re-sends of earlier ones (at-least-once clients)
    stack.send(0..UNIQUE, 2000).await;
    let c = client();
    for chunk in 0..10u64 {
        let body = Value::Array(
            (0..2000u64)
                .map(|k| llm_event((chunk * 7919 + k * 89) % UNIQUE))
                .collect(),
        );
        let (status, problem) = post_events(&c, &stack.server, &body).await;
        assert_eq!(status, 204, "{problem}");
    }
    for (point, skip) in [
        ("after-begin", "3"),
        ("after-raw", "2"),
        ("after-ids", "2"),
        ("after-feed", "2"),
        ("mid-repair", "0"),
    ] {
        stack.crash_at(point, skip).await;
    }
    // and one SIGKILL at a random moment
    stack.sink.restart_with(&[]);
    let ms = 300
        + (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 2000) as u64;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    stack.sink.restart_with(&[]);
    stack.drained(Duration::from_secs(300)).await;
    stack.assert_totals(UNIQUE).await;
}

/// The partitions a sink holds now, from its `/metrics`.
async fn partitions_held(sink: &mut SinkProcess) -> u64 {
    let metrics = common::get_text(&client(), &sink.metrics_url()).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tally_sink_partitions_assigned "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Two sinks share the partitions; the first (the group's leader) is SIGKILLed while
/// the second stays in the group: the second takes every partition over and the totals
/// are exact.
#[tokio::test(flavor = "multi_thread")]
async fn a_sink_takes_over_the_partitions_of_a_killed_one() {
    let Some(mut stack) = Stack::on_shared("sink takeover test", METERS, &["--batch-rows", "2000"])
    else {
        return;
    };
    let url = stack.clickhouse.clone();
    const N: u64 = 20_000;
    stack.send(0..N / 2, 2000).await;
    stack.drained(Duration::from_secs(60)).await;
    let mut second = SinkProcess::start(
        &stack.svc.kafka,
        &url,
        &stack.database,
        &stack.topic,
        &["--batch-rows", "2000"],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (a, b) = (
            partitions_held(&mut stack.sink).await,
            partitions_held(&mut second).await,
        );
        if a > 0 && b > 0 && a + b == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second sink got no share of the partitions within 60 s (first {a}, second {b}):\n{}",
            tail(&second.log_text())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stack.sink.kill9();
    stack.send(N / 2..N, 2000).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while partitions_held(&mut second).await < 4 {
        assert!(
            Instant::now() < deadline,
            "the surviving sink did not take the partitions over within 90 s:\n{}",
            tail(&second.log_text())
        );
        assert!(
            !second.exited(),
            "the second sink exited:\n{}",
            tail(&second.log_text())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // the survivor is the stack's sink from here on
    std::mem::swap(&mut stack.sink, &mut second);
    stack.drained(Duration::from_secs(120)).await;
    stack.assert_totals(N).await;
}

/// ClickHouse SIGKILLed and restarted while events stream in: exact totals afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn clickhouse_killed_mid_stream_loses_and_doubles_nothing() {
    let Some(svc) = services("ClickHouse crash test") else {
        return;
    };
    let mut private = PrivateClickHouse::start26();
    let url = private.url.clone();
    let mut stack = Stack::start(svc, &url, METERS, &["--batch-rows", "2000"]);
    const N: u64 = 40_000;
    stack.send(0..10_000, 500).await;
    // keep ingesting while ClickHouse is down: ingest only needs Kafka
    let sender = paced_sender(stack.server.url(""), 10_000..N, 500, 20);
    tokio::time::sleep(Duration::from_millis(700)).await;
    private.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    private.restart();
    sender.await.unwrap();
    stack.drained(Duration::from_secs(180)).await;
    stack.assert_totals(N).await;
    assert!(
        stack.sink.log_text().contains("retrying") || stack.sink.log_text().contains("Repairing"),
        "the sink should have seen ClickHouse go away:\n{}",
        tail(&stack.sink.log_text())
    );
}

/// A meter created after 100k events, while ingestion goes on: its total counts every
/// event exactly once, across the cutover.
#[tokio::test(flavor = "multi_thread")]
async fn a_meter_created_later_is_backfilled_exactly_while_ingestion_continues() {
    // the default batch size (50,000): dedup lookups of that size must work
    let Some(mut stack) = Stack::on_shared("backfill test", METERS, &[]) else {
        return;
    };
    let url = stack.clickhouse.clone();
    const BEFORE: u64 = 100_000;
    const N: u64 = 130_000;
    stack.send(0..BEFORE, 2000).await;
    stack.drained(Duration::from_secs(120)).await;
    let sender = paced_sender(stack.server.url(""), BEFORE..N, 250, 25);
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(stack.server.manifests.join("late.yaml"), LATE_METER).unwrap();
    // the server reloads, provisions the rollup (cutover ~1 s ahead) and backfills
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = get_json(&c, &stack.server.url("/api/v1/meters/tokens_late")).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the late meter was not served within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !sender.is_finished(),
        "ingestion should still be going on at the cutover"
    );
    sender.await.unwrap();
    stack.drained(Duration::from_secs(120)).await;
    let (sum, _, _) = totals(N);
    assert_eq!(
        stack.total("tokens_late").await,
        sum as f64,
        "late meter total"
    );
    assert_eq!(
        stack.total("tokens").await,
        sum as f64,
        "original meter total"
    );
    let origins = ch(
        &url,
        &format!(
            "SELECT origin, countMerge(cnt) FROM {db}.{t} GROUP BY origin ORDER BY origin FORMAT CSV",
            db = stack.database,
            t = ch(&url, &format!("SELECT rollup FROM {}.meters FINAL WHERE slug = 'tokens_late'", stack.database)).await.trim()
        ),
    )
    .await;
    let parts: Vec<u64> = origins
        .lines()
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        parts.len(),
        2,
        "both the view and the backfill contributed: {origins}"
    );
    assert_eq!(parts.iter().sum::<u64>(), N);

    // deleting the meter drops its views and rollups; raw events stay
    let rollup = ch(
        &url,
        &format!(
            "SELECT rollup FROM {}.meters FINAL WHERE slug = 'tokens_late'",
            stack.database
        ),
    )
    .await
    .trim()
    .to_string();
    std::fs::remove_file(stack.server.manifests.join("late.yaml")).unwrap();
    until_zero(
        &url,
        "rollup tables of the deleted meter dropped",
        format!(
            "SELECT count() FROM system.tables WHERE database = '{}' AND name LIKE '{rollup}%'",
            stack.database
        ),
    )
    .await;
    let (status, _) = get_json(&c, &stack.server.url("/api/v1/meters/tokens_late")).await;
    assert_eq!(status, 404);
    let stored = ch(
        &url,
        &format!("SELECT count() FROM {}.events", stack.database),
    )
    .await;
    assert_eq!(stored.trim(), N.to_string(), "raw events stay");
}

/// A value ClickHouse refuses (here a CHECK constraint on `events` that wants numeric
/// ids, as a customer's own rule might) makes those events dead letters; the sink
/// finds them by splitting the batch, is crashed while splitting, and every other event
/// counts exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn events_clickhouse_refuses_are_dead_lettered_and_the_rest_count_exactly_once() {
    let Some(mut stack) = Stack::on_shared("refused-value test", METERS, &["--batch-rows", "1000"])
    else {
        return;
    };
    let url = stack.clickhouse.clone();
    stack.sink.stop();
    let db = stack.database.clone();
    // numeric after "ev-", or ClickHouse refuses the insert (code 469, VIOLATED_CONSTRAINT)
    let constraint = ch(
        &url,
        &format!(
            "ALTER TABLE {db}.events ADD CONSTRAINT numeric_ids CHECK match(id, '^ev-[0-9]+$')"
        ),
    )
    .await;
    assert!(
        constraint.trim().is_empty(),
        "adding the constraint: {constraint}"
    );
    const GOOD: u64 = 3000;
    let poisoned: Vec<u64> = vec![17, 1500, 2999];
    let mut events: Vec<Value> = (0..GOOD).map(llm_event).collect();
    for (k, at) in poisoned.iter().enumerate() {
        let mut bad = llm_event(GOOD + k as u64);
        bad["id"] = json!(format!("ev-bad-{k}"));
        events.insert(*at as usize, bad);
    }
    let c = client();
    for chunk in events.chunks(500) {
        let (status, problem) = post_events(&c, &stack.server, &Value::Array(chunk.to_vec())).await;
        assert_eq!(status, 204, "{problem}");
    }
    // crash after the second refused row is isolated, then run to the end
    stack.crash_at("mid-split", "1").await;
    stack.sink.restart_with(&[]);
    stack.drained(Duration::from_secs(180)).await;
    stack.assert_totals(GOOD).await;
    let (status, dead) = get_json(&c, &stack.server.url("/api/v1/dead-letters?limit=10")).await;
    assert_eq!(status, 200, "{dead}");
    let mut refused: Vec<String> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["reason"].as_str().unwrap().to_string())
        .collect();
    refused.sort();
    assert_eq!(refused.len(), 3, "{dead:#}");
    for (k, reason) in refused.iter().enumerate() {
        assert!(
            reason.contains(&format!("default/load/ev-bad-{k}"))
                && reason.contains("VIOLATED_CONSTRAINT"),
            "{reason}"
        );
    }
    // the rule is lifted and the dead letters sent again, as an operator would: they
    // are no duplicates (the failed attempt stored their identities beside its events;
    // the repair deleted them), so now they count
    ch(
        &url,
        &format!("ALTER TABLE {db}.events DROP CONSTRAINT numeric_ids"),
    )
    .await;
    let again: Vec<Value> = poisoned
        .iter()
        .map(|at| events[*at as usize].clone())
        .collect();
    let (status, problem) = post_events(&c, &stack.server, &Value::Array(again)).await;
    assert_eq!(status, 204, "{problem}");
    stack.drained(Duration::from_secs(60)).await;
    stack.assert_totals(GOOD + poisoned.len() as u64).await;
}

/// A login ClickHouse refuses is a configuration error: the sink stops at once and
/// says which flag to fix, instead of retrying for --max-retry-secs (120 s here).
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_clickhouse_login_stops_the_sink_at_once_naming_the_flag() {
    let Some(svc) = services("sink configuration-error test") else {
        return;
    };
    // 18.16 answers UNKNOWN_USER, 26.9 AUTHENTICATION_FAILED: both name the flag
    for clickhouse in [&svc.clickhouse, &svc.clickhouse26] {
        let started = Instant::now();
        let mut sink = SinkProcess::start(
            &svc.kafka,
            clickhouse,
            &unique("t"),
            &unique("t"),
            &["--clickhouse-user", "nobody-tally-knows"],
        );
        while !sink.exited() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the sink is still retrying a refused login at {clickhouse} after 30 s:\n{}",
                tail(&sink.log_text())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = sink.log_text();
        assert!(
            (log.contains("UNKNOWN_USER") || log.contains("AUTHENTICATION_FAILED"))
                && log.contains("--clickhouse-user"),
            "{clickhouse}: {}",
            tail(&log)
        );
    }
}

/// A burst's tail is applied as soon as every partition is read to its end (not after
/// `--batch-ms`) when the batch holds a quarter of `--batch-rows`; a smaller batch
/// still waits out `--batch-ms`, so a trickle makes inserts of a fair size.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_goes_early_once_kafka_is_read_to_its_end_unless_it_is_small() {
    let extra = ["--batch-rows", "400", "--batch-ms", "120000"];
    let Some(mut stack) = Stack::on_shared("early batch test", METERS, &extra) else {
        return;
    };
    // 300 events (over a quarter of 400): all applied long before the 120 s wait
    let started = Instant::now();
    stack.send(0..300, 300).await;
    stack.drained(Duration::from_secs(60)).await;
    eprintln!(
        "300 events applied {:?} after they were sent",
        started.elapsed()
    );
    assert_eq!(stack.done().await, 300);
    // 20 more (under a quarter): they wait for --batch-ms
    stack.send(300..320, 20).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(stack.produced(), 320, "the 20 events are in Kafka");
    assert_eq!(
        stack.done().await,
        300,
        "a batch of 20 (under a quarter of --batch-rows) went before --batch-ms"
    );
}

/// `event_ids` as a release before its Kafka position columns made it, holding the
/// identities of the first events: this release adds the columns, and those events sent
/// again are still duplicates (found in the old rows, which read position -1).
#[tokio::test(flavor = "multi_thread")]
async fn identities_stored_before_the_position_columns_still_deduplicate() {
    let Some(svc) = services("event_ids upgrade test") else {
        return;
    };
    let url = svc.clickhouse26.clone();
    let database = unique("ids");
    const OLD: u64 = 700;
    const N: u64 = 3_000;
    for sql in [
        format!("CREATE DATABASE {database}"),
        // the previous release's DDL
        format!(
            "CREATE TABLE {database}.event_ids (h UInt64, namespace String, source String, \
             id String, ingested DateTime('UTC')) ENGINE = MergeTree \
             PARTITION BY toYYYYMM(ingested) ORDER BY h"
        ),
        // the identity hash is xxh3 of 'namespace NUL source NUL id' (dedup.rs)
        format!(
            "INSERT INTO {database}.event_ids SELECT xxh3(concat('default', '\\0', 'load', '\\0', \
             concat('ev-', toString(number)))), 'default', 'load', concat('ev-', toString(number)), \
             now() FROM numbers({OLD})"
        ),
    ] {
        ch(&url, &sql).await;
    }
    let mut stack = Stack::start_on(svc, &url, &database, METERS, &[]);
    stack.send(0..N, 500).await;
    stack.drained(Duration::from_secs(120)).await;
    let (sum, _, _) = totals(N);
    let (old_sum, _, _) = totals(OLD);
    assert_eq!(
        stack.total("tokens").await,
        (sum - old_sum) as f64,
        "the events whose identities the old rows hold are duplicates"
    );
    let stored = ch(&url, &format!("SELECT count() FROM {database}.events")).await;
    assert_eq!(stored.trim(), (N - OLD).to_string(), "raw rows");
    let positions = ch(
        &url,
        &format!(
            "SELECT countIf(kafka_partition = -1 AND kafka_offset = -1), countIf(kafka_offset >= 0) \
             FROM {database}.event_ids FORMAT CSV"
        ),
    )
    .await;
    assert_eq!(
        positions.trim(),
        format!("{OLD},{}", N - OLD),
        "old rows read position -1; new ones carry theirs"
    );
}

/// A database provisioned by a release before the fifteen-minute tier: the meter's
/// minute rollup and view (the SQL that release ran, which this one still generates),
/// and its record. This release's provisioning must take it over without counting the
/// events the old view already counted a second time.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_from_before_the_quarter_tier_upgrades_without_counting_twice() {
    use tally_clickhouse::provision::MeterRecord;
    use tally_clickhouse::rollup::{Grain, RollupSql};
    let Some(svc) = services("upgrade test") else {
        return;
    };
    let url = svc.clickhouse26.clone();
    let (database, topic) = (unique("u"), unique("u"));
    let old = tally_clickhouse::Ch::new(&tally_clickhouse::ChConfig {
        url: url.clone(),
        database: database.clone(),
        user: String::new(),
        password: String::new(),
        cluster: None,
        replica_urls: Vec::new(),
    })
    .unwrap();
    old.ensure_schema().await.unwrap();
    let mut meter: tally_crds::Meter = serde_yaml::from_str(LATE_METER).unwrap();
    meter.metadata.namespace = Some("default".into());
    let compiled = tally_meter::engine::CompiledMeter::compile(&meter).unwrap();
    let sql = RollupSql::new(&compiled);
    let t1 = old.now().await.unwrap();
    old.insert::<MeterRecord>(
        "meters",
        &[MeterRecord {
            rollup: sql.table.clone(),
            namespace: "default".into(),
            name: "tokens-late".into(),
            slug: "tokens_late".into(),
            definition: serde_json::to_string(&meter).unwrap(),
            cutover: t1 as u32,
            backfilled: 1,
            dropped: 0,
            version: 1,
        }],
    )
    .await
    .unwrap();
    old.exec("old rollup", &sql.create_table(&old, Grain::Minute))
        .await
        .unwrap();
    old.exec("old view", &sql.create_view(&old, t1, Grain::Minute))
        .await
        .unwrap();

    // the old release's server ingests (it only produced to Kafka); this release's
    // sink loads, feeding the minute rollup of the old record (no quarter table yet)
    let ingest_only = server_args(&svc, &topic, &url, &database, false);
    let ingest_only: Vec<&str> = ingest_only.iter().map(String::as_str).collect();
    let server = Server::start(&[("meters.yaml", LATE_METER)], &ingest_only);
    // the old server did not provision, so the sink creates the topic: with the 4
    // partitions `drained` counts
    let sink = SinkProcess::start(
        &svc.kafka,
        &url,
        &database,
        &topic,
        &["--topic-partitions", "4"],
    );
    let mut stack = Stack {
        svc: svc.clone(),
        clickhouse: url.clone(),
        database: database.clone(),
        topic: topic.clone(),
        server,
        sink,
    };
    const BEFORE: u64 = 4_000;
    const N: u64 = 6_000;
    stack.send(0..BEFORE, 500).await;
    stack.drained(Duration::from_secs(120)).await;
    let counted = ch(
        &url,
        &format!("SELECT sumMerge(sum) FROM {database}.{}", sql.table),
    )
    .await;
    assert_eq!(
        counted.trim(),
        totals(BEFORE).0.to_string(),
        "the minute rollup of the old record counted"
    );

    // upgrade: this release's server provisions the same meter
    let args = server_args(&svc, &topic, &url, &database, true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stack.server = Server::start(&[("meters.yaml", LATE_METER)], &args);
    stack.send(BEFORE..N, 500).await;
    stack.drained(Duration::from_secs(120)).await;
    let (want, got) = (totals(N).0 as f64, stack.total("tokens_late").await);
    let origins = ch(
        &url,
        &format!(
            "SELECT origin, sumMerge(sum) FROM {database}.{} GROUP BY origin ORDER BY origin",
            sql.table
        ),
    )
    .await;
    assert_eq!(
        got, want,
        "whole-day total after the upgrade (minute rollup by origin: {origins})"
    );
    // a range that is not whole quarters reads minute rows, quarter rows and raw edges
    let (from, to) = ("2024-06-01T00:07:30Z", "2024-06-01T09:52:10.500Z");
    let (from_ms, to_ms) = (450_000i64, (9 * 3600 + 52 * 60 + 10) * 1000 + 500);
    let want: u64 = (0..N)
        .filter(|i| {
            let minute = (i % 600) as i64;
            let ms = minute * 60_000 + (i % 60) as i64 * 1000 + (i % 1000) as i64;
            (from_ms..to_ms).contains(&ms)
        })
        .map(|i| (i % 97) + 1)
        .sum();
    let (status, body) = get_json(
        &client(),
        &stack.server.url(&format!(
            "/api/v1/meters/tokens_late/query?from={from}&to={to}"
        )),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got: f64 = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_f64().unwrap())
        .sum();
    assert_eq!(got, want as f64, "an unaligned range after the upgrade");
    assert!(
        ch(&url, &format!("EXISTS TABLE {database}.{}_q", sql.table))
            .await
            .trim()
            == "1",
        "the quarter tier was added"
    );
}
