//! The conformance cases every store is held to: every aggregation, window size and
//! time zone, filters, group-by, subject and partial-minute edges, against
//! hand-computed answers. They are data, so each store's tests run the same table
//! (`server/tests/conformance.rs` runs them on the embedded store and on ClickHouse fed
//! through Kafka by the sink).
use std::sync::Arc;

use serde_json::json;
use tally_crds::{Meter, UsageEvent};

use crate::engine::CompiledMeter;
use crate::engine::window::render;
use crate::query::{QueryAnswer, QuerySpec};
use crate::store::{Store, StoredMeter};

/// (id, subject, time, v, model, user). Hand-checked facts used below:
/// New York falls back on 2024-11-03 at 06:00Z (01:00 EDT → 01:00 EST);
/// Kolkata is +05:30, so its 2024-11-04 starts at 2024-11-03T18:30Z.
pub const EVENTS: &[(&str, &str, &str, f64, &str, &str)] = &[
    ("e1", "acme", "2024-11-03T04:30:00Z", 1.0, "a", "u1"),
    ("e2", "acme", "2024-11-03T05:30:00Z", 2.0, "a", "u2"),
    ("e3", "acme", "2024-11-03T06:30:00Z", 4.0, "b", "u1"),
    ("e4", "globex", "2024-11-03T06:45:30.500Z", 8.0, "a", "u3"),
    ("e5", "acme", "2024-11-03T18:29:00Z", 16.0, "b", "u2"),
    ("e6", "acme", "2024-11-03T18:31:00Z", 32.0, "a", "u1"),
    ("e7", "globex", "2024-12-01T00:00:00Z", 64.0, "b", "u3"),
];

/// A range holding every event of [`EVENTS`].
pub const ALL: &str = "from=2024-11-01T00:00:00Z&to=2025-01-01T00:00:00Z";

/// (aggregation, query, expected rows "start end subject groupBy value").
pub fn cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
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

/// A meter of `aggregation` over the cases' events, `extra` appended to its spec.
pub fn meter(aggregation: &str, extra: &str) -> Arc<CompiledMeter> {
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

/// Compiles a Meter manifest.
pub fn compile(yaml: &str) -> Arc<CompiledMeter> {
    let m: Meter = serde_yaml::from_str(yaml).unwrap();
    Arc::new(CompiledMeter::compile(&m).unwrap())
}

/// The cases' events ([`EVENTS`]).
pub fn events() -> Vec<UsageEvent> {
    EVENTS
        .iter()
        .map(|(id, subject, time, v, model, user)| {
            let e = json!({"specversion": "1.0", "id": id, "source": "conformance", "type": "usage", "subject": subject, "time": time,
                           "data": {"v": v, "model": model, "user": user}});
            UsageEvent::from_json(&e, 0).unwrap()
        })
        .collect()
}

/// Renders an answer's rows as `start end subject groupBy value`.
pub fn show(answer: &QueryAnswer, tz: chrono_tz::Tz) -> Vec<String> {
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

/// Runs every case of [`cases`] against `store`, which holds [`events`] and
/// [`all_meters`]; panics listing every failed case.
pub fn run_cases(store: &dyn Store, meters: &[StoredMeter]) {
    let mut failures = Vec::new();
    for (agg, query, expected) in cases() {
        let m = meters
            .iter()
            .find(|m| m.meter.aggregation().as_str() == agg)
            .unwrap();
        let spec = parse(m, &query);
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

/// One meter per aggregation, in the order of [`cases`]' names.
pub fn all_meters() -> Vec<Arc<CompiledMeter>> {
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

/// Parses a case's query against a meter (`to` defaults to now); panics on a bad case.
pub fn parse(m: &StoredMeter, query: &str) -> QuerySpec {
    let now = chrono::Utc::now().timestamp_millis();
    QuerySpec::parse(&m.meter, query, now).unwrap_or_else(|e| panic!("{query}: {e}"))
}
