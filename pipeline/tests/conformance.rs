//! Store conformance: every aggregation, window size and time zone, filters, group-by,
//! subject and partial-minute edges, against hand-computed answers. The cases are
//! data so every store runs the same table (the embedded store here; ClickHouse joins
//! when it lands).
use std::sync::Arc;

use serde_json::{Value, json};
use tally_crds::{Meter, UsageEvent};
use tally_pipeline::api::parse_query;
use tally_pipeline::engine::CompiledMeter;
use tally_pipeline::engine::window::render;
use tally_pipeline::store::embedded::{EmbeddedConfig, EmbeddedStore};
use tally_pipeline::store::{Store, StoredMeter, Synced};

/// (id, subject, time, v, model, user). Hand-checked facts used below:
/// New York falls back on 2024-11-03 at 06:00Z (01:00 EDT → 01:00 EST);
/// Kolkata is +05:30, so its 2024-11-04 starts at 2024-11-03T18:30Z.
const EVENTS: &[(&str, &str, &str, f64, &str, &str)] = &[
    ("e1", "acme", "2024-11-03T04:30:00Z", 1.0, "a", "u1"),
    ("e2", "acme", "2024-11-03T05:30:00Z", 2.0, "a", "u2"),
    ("e3", "acme", "2024-11-03T06:30:00Z", 4.0, "b", "u1"),
    ("e4", "globex", "2024-11-03T06:45:30.500Z", 8.0, "a", "u3"),
    ("e5", "acme", "2024-11-03T18:29:00Z", 16.0, "b", "u2"),
    ("e6", "acme", "2024-11-03T18:31:00Z", 32.0, "a", "u1"),
    ("e7", "globex", "2024-12-01T00:00:00Z", 64.0, "b", "u3"),
];

const ALL: &str = "from=2024-11-01T00:00:00Z&to=2025-01-01T00:00:00Z";

/// (aggregation, query, expected rows "start end subject groupBy value").
fn cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    vec![
        // every aggregation over the whole range
        ("SUM", ALL.into(), vec!["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {} 127"]),
        ("COUNT", ALL.into(), vec!["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {} 7"]),
        ("AVG", ALL.into(), vec!["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {} 18.142857142857142"]),
        ("MIN", ALL.into(), vec!["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {} 1"]),
        ("MAX", ALL.into(), vec!["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {} 64"]),
        ("UNIQUE_COUNT", ALL.into(), vec!["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {} 3"]),
        ("LATEST", ALL.into(), vec!["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {} 64"]),
        // MINUTE, UTC, with a sub-millisecond-wide range hitting e4 exactly
        ("COUNT", "from=2024-11-03T06:45:30.500Z&to=2024-11-03T06:45:30.501Z&windowSize=MINUTE".into(), vec!["2024-11-03T06:45:00Z 2024-11-03T06:46:00Z - {} 1"]),
        ("COUNT", "from=2024-11-03T06:45:30.501Z&to=2024-11-03T06:46:00Z&windowSize=MINUTE".into(), vec![]),
        // HOUR in New York across the fall-back: the repeated 01:00 hour is two windows
        ("SUM", "from=2024-11-03T04:00:00Z&to=2024-11-03T08:00:00Z&windowSize=HOUR&windowTimeZone=America/New_York&groupBy=subject".into(), vec![
            "2024-11-03T00:00:00-04:00 2024-11-03T01:00:00-04:00 acme {} 1",
            "2024-11-03T01:00:00-04:00 2024-11-03T01:00:00-05:00 acme {} 2",
            "2024-11-03T01:00:00-05:00 2024-11-03T02:00:00-05:00 acme {} 4",
            "2024-11-03T01:00:00-05:00 2024-11-03T02:00:00-05:00 globex {} 8",
        ]),
        // DAY in New York: the 25-hour day
        ("COUNT", "from=2024-11-03T04:00:00Z&to=2024-11-04T05:00:00Z&windowSize=DAY&windowTimeZone=America/New_York".into(), vec![
            "2024-11-03T00:00:00-04:00 2024-11-04T00:00:00-05:00 - {} 6",
        ]),
        // DAY in Kolkata: e6 (18:31Z) is already the next local day
        ("SUM", "from=2024-11-03T00:00:00Z&to=2024-11-04T00:00:00Z&windowSize=DAY&windowTimeZone=Asia/Kolkata".into(), vec![
            "2024-11-03T00:00:00+05:30 2024-11-04T00:00:00+05:30 - {} 31",
            "2024-11-04T00:00:00+05:30 2024-11-05T00:00:00+05:30 - {} 32",
        ]),
        // HOUR in Kolkata aligns to :30 UTC
        ("SUM", "from=2024-11-03T18:00:00Z&to=2024-11-03T19:00:00Z&windowSize=HOUR&windowTimeZone=Asia/Kolkata".into(), vec![
            "2024-11-03T23:00:00+05:30 2024-11-04T00:00:00+05:30 - {} 16",
            "2024-11-04T00:00:00+05:30 2024-11-04T01:00:00+05:30 - {} 32",
        ]),
        // MONTH, UTC and New York (November in New York starts at 04:00Z)
        ("MAX", format!("{ALL}&windowSize=MONTH"), vec![
            "2024-11-01T00:00:00Z 2024-12-01T00:00:00Z - {} 32",
            "2024-12-01T00:00:00Z 2025-01-01T00:00:00Z - {} 64",
        ]),
        ("SUM", format!("{ALL}&windowSize=MONTH&windowTimeZone=America/New_York"), vec![
            "2024-10-01T00:00:00-04:00 2024-11-01T00:00:00-04:00 - {} 0",
            "2024-11-01T00:00:00-04:00 2024-12-01T00:00:00-05:00 - {} 127",
        ]),
        // partial-minute edges: e1 (04:30:00.000) excluded by from, e6 (18:31:00) by to
        ("SUM", "from=2024-11-03T04:30:00.001Z&to=2024-11-03T18:31:00Z".into(), vec!["2024-11-03T04:30:00.001Z 2024-11-03T18:31:00Z - {} 30"]),
        ("AVG", "from=2024-11-03T18:00:00Z&to=2024-11-03T19:00:00Z&windowSize=HOUR".into(), vec!["2024-11-03T18:00:00Z 2024-11-03T19:00:00Z - {} 24"]),
        // group-by, filterGroupBy, subject
        ("MIN", format!("{ALL}&groupBy=model"), vec![
            "2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {\"model\":\"a\"} 1",
            "2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {\"model\":\"b\"} 4",
        ]),
        ("SUM", format!("{ALL}&filterGroupBy[model]=a"), vec!["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {} 43"]),
        ("SUM", format!("{ALL}&subject=globex"), vec!["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z globex {} 72"]),
        ("UNIQUE_COUNT", format!("{ALL}&windowSize=DAY&groupBy=subject"), vec![
            "2024-11-03T00:00:00Z 2024-11-04T00:00:00Z acme {} 2",
            "2024-11-03T00:00:00Z 2024-11-04T00:00:00Z globex {} 1",
            "2024-12-01T00:00:00Z 2024-12-02T00:00:00Z globex {} 1",
        ]),
        ("LATEST", format!("{ALL}&windowSize=DAY&groupBy=subject&groupBy=model"), vec![
            "2024-11-03T00:00:00Z 2024-11-04T00:00:00Z acme {\"model\":\"a\"} 32",
            "2024-11-03T00:00:00Z 2024-11-04T00:00:00Z acme {\"model\":\"b\"} 16",
            "2024-11-03T00:00:00Z 2024-11-04T00:00:00Z globex {\"model\":\"a\"} 8",
            "2024-12-01T00:00:00Z 2024-12-02T00:00:00Z globex {\"model\":\"b\"} 64",
        ]),
    ]
}

fn meter(aggregation: &str, extra: &str) -> Arc<CompiledMeter> {
    let value = match aggregation {
        "COUNT" => "",
        "UNIQUE_COUNT" => ", valueProperty: $.user",
        _ => ", valueProperty: $.v",
    };
    let yaml = format!(
        "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {{name: m-{}}}\nspec: {{eventType: usage, aggregation: {aggregation}{value}, groupBy: {{model: $.model}}{extra}}}\n",
        aggregation.to_lowercase().replace('_', "-")
    );
    compile(&yaml)
}

fn compile(yaml: &str) -> Arc<CompiledMeter> {
    let m: Meter = serde_yaml::from_str(yaml).unwrap();
    Arc::new(CompiledMeter::compile(&m).unwrap())
}

fn events() -> Vec<UsageEvent> {
    EVENTS
        .iter()
        .map(|(id, subject, time, v, model, user)| {
            let e = json!({"specversion": "1.0", "id": id, "source": "conformance", "type": "usage", "subject": subject, "time": time,
                           "data": {"v": v, "model": model, "user": user}});
            UsageEvent::from_json(&e, 0).unwrap()
        })
        .collect()
}

fn show(answer: &tally_pipeline::query::QueryAnswer, tz: chrono_tz::Tz) -> Vec<String> {
    answer
        .rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} {}",
                render(r.window_start_ms, tz),
                render(r.window_end_ms, tz),
                r.subject.as_deref().unwrap_or("-"),
                serde_json::to_string(&r.group_by).unwrap(),
                tally_crds::canonical_f64(r.value)
            )
        })
        .collect()
}

fn run_cases(store: &dyn Store, meters: &[StoredMeter]) {
    let mut failures = Vec::new();
    for (agg, query, expected) in cases() {
        let m = meters
            .iter()
            .find(|m| m.meter.aggregation().as_str() == agg)
            .unwrap();
        let spec = parse_query(m, &query).unwrap_or_else(|p| panic!("{query}: {p:?}"));
        let answer = store.query(m, &spec, 1000).unwrap();
        let got = show(&answer, spec.tz);
        // a "0" row stands for "no row" in the expectations (windows without events are omitted)
        let want: Vec<String> = expected
            .iter()
            .filter(|e| !e.ends_with(" 0"))
            .map(|s| s.to_string())
            .collect();
        if got != want {
            failures.push(format!("{agg} {query}\n  want {want:#?}\n  got  {got:#?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn all_meters() -> Vec<Arc<CompiledMeter>> {
    [
        "SUM",
        "COUNT",
        "AVG",
        "MIN",
        "MAX",
        "UNIQUE_COUNT",
        "LATEST",
    ]
    .iter()
    .map(|a| meter(a, ""))
    .collect()
}

async fn ingest(store: &EmbeddedStore, events: Vec<UsageEvent>) {
    store
        .submit("default", events)
        .unwrap()
        .await
        .unwrap()
        .unwrap();
}

/// A fresh embedded store (the folder lives as long as the returned guard).
fn open_store() -> (tempfile::TempDir, Arc<EmbeddedStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap());
    (dir, store)
}

/// Syncs meters on a blocking thread (a sync may backfill).
async fn sync(store: &Arc<EmbeddedStore>, meters: Vec<Arc<CompiledMeter>>) -> Synced {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.sync_meters(meters).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_answers_every_case_when_meters_exist_before_events() {
    let (_dir, store) = open_store();
    let synced = sync(&store, all_meters()).await;
    // one event per request, so rollup rows are merged across transactions too
    for e in events() {
        ingest(&store, vec![e]).await;
    }
    tokio::task::spawn_blocking(move || run_cases(store.as_ref(), &synced.meters))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_answers_every_case_when_meters_are_backfilled() {
    let (_dir, store) = open_store();
    ingest(&store, events()).await;
    let synced = sync(&store, all_meters()).await;
    tokio::task::spawn_blocking(move || run_cases(store.as_ref(), &synced.meters))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn latest_ties_go_to_the_event_ingested_last_and_filters_apply() {
    let (_dir, store) = open_store();
    let filtered = compile(
        "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: big-b}\nspec:\n  eventType: usage\n  aggregation: SUM\n  valueProperty: $.v\n  filter: [{property: $.model, operator: eq, values: [b]}, {property: $.v, operator: gte, values: [5]}]\n",
    );
    let synced = sync(&store, vec![meter("LATEST", ""), filtered]).await;
    ingest(&store, events()).await;
    let tie = |id: &str, v: f64| {
        UsageEvent::from_json(&json!({"specversion": "1.0", "id": id, "source": "z", "type": "usage", "subject": "acme", "time": "2024-12-01T00:00:00Z", "data": {"v": v, "model": "b"}}), 0).unwrap()
    };
    ingest(&store, vec![tie("t-b", 100.0)]).await; // same time as e7, ingested later
    ingest(&store, vec![tie("t-a", 200.0)]).await; // and again: the later ingestion wins, not the greater id
    tokio::task::spawn_blocking(move || {
        let q = |m: &StoredMeter, query: &str| -> Value {
            let spec = parse_query(m, query).unwrap();
            json!(show(&store.query(m, &spec, 1000).unwrap(), spec.tz))
        };
        assert_eq!(
            q(&synced.meters[0], ALL),
            json!(["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {} 200"])
        );
        // e3 (4) fails gte 5; e5 16 + e7 64 + t-b 100 + t-a 200
        assert_eq!(
            q(&synced.meters[1], ALL),
            json!(["2024-11-01T00:00:00Z 2025-01-01T00:00:00Z - {} 380"])
        );
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_over_the_row_limit_is_refused_not_truncated() {
    let (_dir, store) = open_store();
    ingest(&store, events()).await;
    let synced = sync(&store, vec![meter("COUNT", "")]).await;
    tokio::task::spawn_blocking(move || {
        let m = &synced.meters[0];
        let spec = parse_query(m, &format!("{ALL}&windowSize=MINUTE")).unwrap();
        assert_eq!(store.query(m, &spec, 7).unwrap().rows.len(), 7);
        let err = store.query(m, &spec, 6).unwrap_err();
        assert!(err.to_string().contains("more than 6 rows"), "{err}");
    })
    .await
    .unwrap();
}
