//! UsageBudgets on the real standalone server, with a webhook receiver in this test:
//! each crossing is accepted (2xx) exactly once per (budget, subject, period,
//! threshold), every attempt carries the same `webhook-id` and a valid Standard Webhooks
//! signature (checked here with ring's HMAC, not tally's code), also when the receiver
//! fails twice first and when a fail point kills the evaluator between recording a
//! crossing and sending it; raising the limit re-arms; the month rolls over at a
//! test-set clock's midnight in Asia/Kolkata, and a late event still counts in the
//! period of its time; a DST day in America/New_York is 23 hours.
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use common::*;
use serde_json::{Value, json};

/// The signing key the test's Secret holds: `whsec_` + base64 of these bytes.
const KEY: &[u8] = b"budget-webhook-key-0123456789abc";

#[derive(Clone, Debug)]
struct Attempt {
    id: String,
    timestamp: String,
    signature_ok: bool,
    body: Value,
    accepted: bool,
}

#[derive(Clone, Default)]
struct Receiver {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    /// Refuse (503) the first this many attempts of each id.
    fail_first: usize,
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (id, timestamp) = (h("webhook-id"), h("webhook-timestamp"));
    let text = String::from_utf8_lossy(&body).to_string();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY);
    let tag = ring::hmac::sign(&key, format!("{id}.{timestamp}.{text}").as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    );
    let signature_ok = h("webhook-signature").split(' ').any(|s| s == expected);
    let mut all = r.attempts.lock().unwrap();
    let before = all.iter().filter(|a| a.id == id).count();
    let accepted = before >= r.fail_first;
    all.push(Attempt {
        id,
        timestamp,
        signature_ok,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        accepted,
    });
    if accepted {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn receiver(fail_first: usize) -> (Receiver, SocketAddr) {
    let r = Receiver {
        fail_first,
        ..Default::default()
    };
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (r, addr)
}

const METER: &str = "apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: tokens}
spec: {eventType: llm, aggregation: SUM, valueProperty: $.tokens}
---
apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: gpu-hours}
spec: {eventType: gpu, aggregation: SUM, valueProperty: $.hours}
";

fn monthly(limit: u32) -> String {
    format!(
        "apiVersion: tally.dev/v1alpha1
kind: UsageBudget
metadata: {{name: monthly}}
spec:
  meter: tokens
  perSubject: true
  period: {{calendar: MONTH, timeZone: Asia/Kolkata}}
  limit: {limit}
  thresholds: [{{percent: 80}}, {{percent: 100}}]
  webhook: {{secretRef: {{name: hooks}}}}
"
    )
}

const DAILY_NY: &str = "apiVersion: tally.dev/v1alpha1
kind: UsageBudget
metadata: {name: gpu-daily}
spec:
  meter: gpu-hours
  period: {calendar: DAY, timeZone: America/New_York}
  limit: 1000
  thresholds: [{percent: 50}]
  webhook: {secretRef: {name: hooks}}
";

fn secrets(dir: &Path, hook: SocketAddr) {
    let d = dir.join("default/hooks");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("url"), format!("http://{hook}/hook")).unwrap();
    std::fs::write(
        d.join("secret"),
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(KEY)
        ),
    )
    .unwrap();
}

fn set_clock(file: &Path, rfc3339: &str) {
    let ms = chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis();
    std::fs::write(file, ms.to_string()).unwrap();
}

async fn send(s: &Server, events: Vec<Value>) {
    let (status, body) = post_events(&client(), s, &Value::Array(events)).await;
    assert_eq!(status, 204, "{body}");
}

fn llm(id: &str, subject: &str, time: &str, tokens: f64) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "app", "type": "llm", "subject": subject, "time": time, "data": {"tokens": tokens}})
}

/// Waits until the receiver has accepted `n` deliveries (then 1.5 s more, so a repeat
/// would show); returns every attempt.
async fn accepted(r: &Receiver, n: usize, s: &Server) -> Vec<Attempt> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let got = r
            .attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.accepted)
            .count();
        if got >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "waited for {n} accepted webhooks, got {got}: {:#?}\nserver log:\n{}",
            r.attempts.lock().unwrap(),
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    r.attempts.lock().unwrap().clone()
}

/// Per (subject, threshold, period start): the accepted deliveries, and checks every
/// attempt of an id carried the same body and a valid signature.
fn deliveries(all: &[Attempt]) -> HashMap<(String, String, String), usize> {
    let mut bodies: HashMap<&str, &Value> = HashMap::new();
    let mut out = HashMap::new();
    for a in all {
        assert!(a.signature_ok, "a bad signature: {a:?}");
        assert!(a.timestamp.parse::<i64>().is_ok(), "{a:?}");
        let first = bodies.entry(&a.id).or_insert(&a.body);
        assert_eq!(
            *first, &a.body,
            "every attempt of {} sends the same body",
            a.id
        );
        if a.accepted {
            let d = &a.body["data"];
            let key = (
                d["subject"].as_str().unwrap_or("").to_string(),
                d["threshold"].as_str().unwrap().to_string(),
                d["period"]["start"].as_str().unwrap().to_string(),
            );
            *out.entry(key).or_insert(0) += 1;
        }
    }
    out
}

fn key(subject: &str, threshold: &str, start: &str) -> (String, String, String) {
    (subject.into(), threshold.into(), start.into())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_crossing_is_delivered_once_signed_through_failures_rearms_and_periods() {
    let (hooks, hook_addr) = receiver(2).await;
    let dir = tempfile::tempdir().unwrap();
    secrets(dir.path(), hook_addr);
    let clock = dir.path().join("clock");
    set_clock(&clock, "2026-12-15T00:00:00Z");
    let s = Server::start(
        &[
            ("meters.yaml", METER),
            ("budget.yaml", &monthly(1000)),
            ("daily.yaml", DAILY_NY),
        ],
        &[
            "--budget-interval-ms",
            "200",
            "--budget-secrets-dir",
            dir.path().to_str().unwrap(),
            "--budget-webhook-any-url",
            "--budget-clock-file",
            clock.to_str().unwrap(),
        ],
    );
    // acme crosses 80 % of December; globex stays under
    send(
        &s,
        vec![
            llm("a1", "acme", "2026-12-10T10:00:00Z", 850.0),
            llm("g1", "globex", "2026-12-10T10:00:00Z", 100.0),
        ],
    )
    .await;
    let dec = "2026-12-01T00:00:00+05:30";
    let all = accepted(&hooks, 1, &s).await;
    let got = deliveries(&all);
    assert_eq!(
        got,
        HashMap::from([(key("acme", "80%", dec), 1)]),
        "{all:#?}"
    );
    let first = all.iter().find(|a| a.accepted).unwrap();
    assert_eq!(
        all.iter().filter(|a| a.id == first.id).count(),
        3,
        "two refused attempts, then the accepted one, all with one id"
    );
    assert_eq!(first.body["data"]["usage"], 850.0);
    assert_eq!(
        first.body["data"]["period"]["end"],
        "2027-01-01T00:00:00+05:30"
    );

    // acme reaches 100 %: one more
    send(&s, vec![llm("a2", "acme", "2026-12-11T10:00:00Z", 200.0)]).await;
    let got = deliveries(&accepted(&hooks, 2, &s).await);
    assert_eq!(got[&key("acme", "100%", dec)], 1);
    assert_eq!(got.len(), 2);

    // the limit raised to 2000: 80 % (1600) is no longer crossed and re-arms; acme
    // reaching 1650 crosses it again, a new crossing with a new id
    std::fs::write(s.manifests.join("budget.yaml"), monthly(2000)).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    send(&s, vec![llm("a3", "acme", "2026-12-12T10:00:00Z", 600.0)]).await;
    let all = accepted(&hooks, 3, &s).await;
    assert_eq!(deliveries(&all)[&key("acme", "80%", dec)], 2, "{all:#?}");
    let ids: std::collections::HashSet<&str> = all
        .iter()
        .filter(|a| a.accepted)
        .map(|a| a.id.as_str())
        .collect();
    assert_eq!(ids.len(), 3, "three crossings, three ids");

    // midnight in Kolkata: an event a millisecond before counts in December, one after
    // in January, where every threshold is armed again
    set_clock(&clock, "2026-12-31T18:29:59Z");
    send(
        &s,
        vec![llm("g2", "globex", "2026-12-31T18:29:59.999Z", 1500.0)],
    )
    .await;
    let all = accepted(&hooks, 4, &s).await;
    assert_eq!(deliveries(&all)[&key("globex", "80%", dec)], 1);
    set_clock(&clock, "2026-12-31T18:30:00Z");
    send(
        &s,
        vec![llm("g3", "globex", "2026-12-31T18:30:00Z", 1700.0)],
    )
    .await;
    let all = accepted(&hooks, 5, &s).await;
    let got = deliveries(&all);
    let jan = "2027-01-01T00:00:00+05:30";
    assert_eq!(got[&key("globex", "80%", jan)], 1, "{all:#?}");
    assert_eq!(got.len(), 4, "{got:?}");
    let january = all
        .iter()
        .find(|a| a.accepted && a.body["data"]["period"]["start"] == jan)
        .unwrap();
    assert_eq!(
        january.body["data"]["usage"], 1700.0,
        "only January's event"
    );
    // a late December event, sent after midnight, still counts in December and crosses
    // its 100 % (re-armed when the limit was raised)
    send(&s, vec![llm("a4", "acme", "2026-12-31T17:30:00Z", 400.0)]).await;
    let all = accepted(&hooks, 6, &s).await;
    assert_eq!(deliveries(&all)[&key("acme", "100%", dec)], 2, "{all:#?}");

    // a DST day in New York: 8 March 2026 is 23 hours, from 05:00 to 04:00 UTC
    set_clock(&clock, "2026-03-08T12:00:00Z");
    let gpu = |id: &str, time: &str, hours: f64| json!({"specversion": "1.0", "id": id, "source": "k8s", "type": "gpu", "subject": "acme", "time": time, "data": {"hours": hours}});
    send(
        &s,
        vec![
            gpu("h1", "2026-03-08T04:59:59Z", 400.0),
            gpu("h2", "2026-03-08T05:00:00Z", 300.0),
            gpu("h3", "2026-03-09T03:59:59Z", 250.0),
            gpu("h4", "2026-03-09T04:00:00Z", 900.0),
        ],
    )
    .await;
    let all = accepted(&hooks, 7, &s).await;
    let ny = all
        .iter()
        .find(|a| a.accepted && a.body["data"]["budget"] == "gpu-daily")
        .unwrap();
    assert_eq!(
        ny.body["data"]["period"]["start"],
        "2026-03-08T00:00:00-05:00"
    );
    assert_eq!(
        ny.body["data"]["period"]["end"],
        "2026-03-09T00:00:00-04:00"
    );
    assert_eq!(
        ny.body["data"]["usage"], 550.0,
        "the day's events only: {ny:?}"
    );
    assert_eq!(
        deliveries(&all).len(),
        5,
        "five (subject, threshold, period) keys"
    );
    let metrics = get_text(&client(), &s.url("/metrics")).await;
    assert!(
        metrics.contains("tally_budget_webhooks_delivered_total 7"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_recording_and_sending_still_delivers_exactly_once() {
    let (hooks, hook_addr) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    secrets(dir.path(), hook_addr);
    let clock = dir.path().join("clock");
    set_clock(&clock, "2026-12-15T00:00:00Z");
    let mut s = Server::start_with_env(
        &[("meters.yaml", METER), ("budget.yaml", &monthly(1000))],
        &[
            "--budget-interval-ms",
            "200",
            "--budget-secrets-dir",
            dir.path().to_str().unwrap(),
            "--budget-webhook-any-url",
            "--budget-clock-file",
            clock.to_str().unwrap(),
        ],
        &[("TALLY_BUDGET_FAILPOINT", "after-record")],
    );
    send(&s, vec![llm("a1", "acme", "2026-12-10T10:00:00Z", 900.0)]).await;
    assert!(
        s.exited_within(Duration::from_secs(20)),
        "the fail point ends the server after recording the crossing:\n{}",
        s.log()
    );
    assert!(s.log().contains("fail point after-record"), "{}", s.log());
    assert!(
        hooks.attempts.lock().unwrap().is_empty(),
        "nothing was sent before the crash"
    );
    s.env.clear();
    s.respawn();
    let all = accepted(&hooks, 1, &s).await;
    assert_eq!(all.len(), 1, "one attempt, accepted: {all:#?}");
    assert_eq!(
        deliveries(&all),
        HashMap::from([(key("acme", "80%", "2026-12-01T00:00:00+05:30"), 1)])
    );
    // and after another restart nothing is sent again
    s.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hooks.attempts.lock().unwrap().len(), 1);
}

/// A rolling window: a threshold fires once per stretch above it, and re-arms when the
/// usage that crossed it has left the window.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_budget_fires_once_per_stretch_above_a_threshold() {
    let (hooks, hook_addr) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    secrets(dir.path(), hook_addr);
    let clock = dir.path().join("clock");
    set_clock(&clock, "2026-12-10T10:30:00Z");
    let rolling = "apiVersion: tally.dev/v1alpha1
kind: UsageBudget
metadata: {name: hourly}
spec:
  meter: tokens
  period: {rolling: 1h}
  limit: 100
  webhook: {secretRef: {name: hooks}}
";
    let s = Server::start(
        &[("meters.yaml", METER), ("budget.yaml", rolling)],
        &[
            "--budget-interval-ms",
            "200",
            "--budget-secrets-dir",
            dir.path().to_str().unwrap(),
            "--budget-webhook-any-url",
            "--budget-clock-file",
            clock.to_str().unwrap(),
        ],
    );
    send(&s, vec![llm("r1", "acme", "2026-12-10T10:00:00Z", 120.0)]).await;
    let all = accepted(&hooks, 1, &s).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0].body["data"]["period"]["rolling"], "1h");
    assert_eq!(
        all[0].body["data"]["period"]["start"],
        "2026-12-10T09:30:00Z"
    );
    // still above: nothing more, even with more usage
    send(&s, vec![llm("r2", "acme", "2026-12-10T10:10:00Z", 10.0)]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(hooks.attempts.lock().unwrap().len(), 1);
    // an hour later the window holds none of it: re-armed; crossing again fires again
    set_clock(&clock, "2026-12-10T11:30:00Z");
    tokio::time::sleep(Duration::from_secs(1)).await;
    send(&s, vec![llm("r3", "acme", "2026-12-10T11:20:00Z", 150.0)]).await;
    let all = accepted(&hooks, 2, &s).await;
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_ne!(all[0].id, all[1].id, "a new stretch, a new crossing");
    assert_eq!(all[1].body["data"]["usage"], 150.0);
}
