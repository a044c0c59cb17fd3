//! Store conformance: the cases of `tally_meter::conformance` (every aggregation,
//! window size and time zone, filters, group-by, subject and partial-minute edges,
//! against hand-computed answers), run on the embedded store and on ClickHouse fed
//! through Kafka by the sink (which needs `make services`).
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tally_clickhouse::provision::CutoverConfig;
use tally_clickhouse::sink::{SinkConfig, SinkStats};
use tally_clickhouse::store::ClickHouseStore;
use tally_clickhouse::{Ch, ChConfig};
use tally_crds::{Gap, UsageEvent, Watermark};
use tally_embedded::{EmbeddedConfig, EmbeddedStore};
use tally_kafka::{KafkaConfig, Producer};
use tally_meter::completeness::{SourceStatus, Status};
use tally_meter::conformance::{ALL, all_meters, compile, events, meter, parse, run_cases, show};
use tally_meter::engine::CompiledMeter;
use tally_meter::store::{Store, StoredMeter, Synced};

/// A store under test: the embedded store, or ClickHouse fed through Kafka by an
/// in-process sink.
struct Harness {
    store: Arc<dyn Store>,
    /// The same store when it is the embedded one.
    embedded: Option<Arc<EmbeddedStore>>,
    sink: Option<SinkHandle>,
    _dir: Option<tempfile::TempDir>,
}

struct SinkHandle {
    stop: Arc<AtomicBool>,
    stats: Arc<SinkStats>,
    thread: Option<std::thread::JoinHandle<tally_clickhouse::sink::SinkResult<()>>>,
    produced: u64,
    clickhouse: String,
    database: String,
}

impl Drop for SinkHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let (url, db) = (self.clickhouse.clone(), self.database.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(common::services::ch(
                    &url,
                    &format!("DROP DATABASE IF EXISTS {db}"),
                ))
        })
        .join();
    }
}

impl Harness {
    /// A fresh embedded store.
    fn embedded() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap());
        Harness {
            store: store.clone(),
            embedded: Some(store),
            sink: None,
            _dir: Some(dir),
        }
    }

    /// A fresh database on ClickHouse `major` (18 or 26) and a Kafka topic with a sink,
    /// or `None` (skipped).
    async fn clickhouse(test: &str, major: u32) -> Option<Harness> {
        let mut svc = common::services::services(test)?;
        if major == 26 {
            svc.clickhouse = svc.clickhouse26.clone();
        }
        let database = common::services::unique("conformance");
        let mut kafka = KafkaConfig::new(&svc.kafka);
        kafka.topic = common::services::unique("conformance");
        kafka.ensure_topic(2, 1).await.unwrap();
        let chcfg = ChConfig {
            url: svc.clickhouse.clone(),
            database: database.clone(),
            user: String::new(),
            password: String::new(),
            cluster: None,
            replica_urls: Vec::new(),
        };
        let ch = Ch::new(&chcfg).unwrap();
        let version = ch.server_version().await.unwrap();
        eprintln!("{test}: ClickHouse {version} at {}", svc.clickhouse);
        assert!(
            version.starts_with(&format!("{major}.")),
            "{test} wants ClickHouse {major}, {} is {version}",
            svc.clickhouse
        );
        ch.ensure_schema().await.unwrap();
        let producer = Arc::new(Producer::new(&kafka).unwrap());
        let cutover = CutoverConfig {
            margin_secs: 1,
            grace_secs: 1,
            wait_timeout: Duration::from_secs(60),
        };
        let store = Arc::new(ClickHouseStore::new(ch, Some(producer), true, cutover));
        let mut cfg = SinkConfig::new(kafka, chcfg);
        cfg.group = database.clone();
        cfg.batch_wait = Duration::from_millis(50);
        cfg.grace_secs = 1;
        let (stop, stats) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(SinkStats::default()),
        );
        let thread = {
            let (stop, stats) = (stop.clone(), stats.clone());
            std::thread::spawn(move || tally_clickhouse::sink::run(cfg, stats, stop))
        };
        Some(Harness {
            store,
            embedded: None,
            sink: Some(SinkHandle {
                stop,
                stats,
                thread: Some(thread),
                produced: 0,
                clickhouse: svc.clickhouse,
                database,
            }),
            _dir: None,
        })
    }

    /// Ingests into namespace `default` and waits until the events are queryable.
    async fn ingest(&mut self, events: Vec<UsageEvent>) {
        let n = events.len() as u64;
        self.store
            .submit("default", events)
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        if let Some(sink) = &mut self.sink {
            sink.produced += n;
            let (stats, produced) = (sink.stats.clone(), sink.produced);
            common::eventually_within(
                Duration::from_secs(60),
                "the sink to apply the events",
                async || stats.applied.get() >= produced,
            )
            .await;
        }
    }

    /// Records watermarks of namespace `default` and waits until they are stored (on
    /// ClickHouse: a copy per partition, applied by the sink).
    async fn record(&mut self, marks: Vec<Watermark>) {
        let n = marks.len() as u64;
        self.store
            .record_watermarks("default", marks)
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        if let Some(sink) = &mut self.sink {
            sink.produced += n * 2; // the topic has 2 partitions
            let (stats, produced) = (sink.stats.clone(), sink.produced);
            common::eventually_within(
                Duration::from_secs(60),
                "the sink to apply the watermarks",
                async || stats.applied.get() >= produced,
            )
            .await;
        }
    }

    /// Waits until the embedded store's writer has recomputed every quarter hour from
    /// its minutes.
    async fn compacted(&self) {
        let store = self.embedded.clone().expect("the embedded store");
        common::eventually_within(
            Duration::from_secs(30),
            "the quarter hours to be compacted",
            async || store.quarters_pending().unwrap() == 0,
        )
        .await;
    }

    /// Syncs meters on a blocking thread (a sync may backfill).
    async fn sync(&self, meters: Vec<Arc<CompiledMeter>>) -> Synced {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.sync_meters(meters).unwrap())
            .await
            .unwrap()
    }

    /// Runs `f` with the store on a blocking thread.
    async fn with<T: Send + 'static>(&self, f: impl FnOnce(&dyn Store) -> T + Send + 'static) -> T {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .unwrap()
    }
}

async fn every_case_when_meters_exist_before_events(mut h: Harness) {
    let synced = h.sync(all_meters()).await;
    // one event per request, so rollup rows are merged across batches too
    for e in events() {
        h.ingest(vec![e]).await;
    }
    h.with(move |s| run_cases(s, &synced.meters)).await;
}

async fn every_case_when_meters_are_backfilled(mut h: Harness) {
    h.ingest(events()).await;
    let synced = h.sync(all_meters()).await;
    h.with(move |s| run_cases(s, &synced.meters)).await;
}

async fn latest_ties_and_filters(mut h: Harness) {
    let filtered = compile(
        "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: big-b}\nspec:\n  eventType: usage\n  aggregation: SUM\n  valueProperty: $.v\n  filter: [{property: $.model, operator: eq, values: [b]}, {property: $.v, operator: gte, values: [5]}]\n",
    );
    let synced = h.sync(vec![meter("LATEST", ""), filtered]).await;
    h.ingest(events()).await;
    let tie = |id: &str, v: f64| {
        UsageEvent::from_json(&json!({"specversion": "1.0", "id": id, "source": "z", "type": "usage", "subject": "acme", "time": "2024-12-01T00:00:00Z", "data": {"v": v, "model": "b"}}), 0).unwrap()
    };
    h.ingest(vec![tie("t-b", 100.0)]).await; // same time as e7, ingested later
    tokio::time::sleep(Duration::from_millis(5)).await;
    h.ingest(vec![tie("t-a", 200.0)]).await; // and again: the later ingestion wins, not the greater id
    h.with(move |store| {
        let q = |m: &StoredMeter, query: &str| -> Value {
            let spec = parse(m, query);
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
    .await;
}

/// Watermarks, gaps and unwatermarked sources, as every store keeps them: the largest
/// `until` counts (a late, older record changes nothing), on ClickHouse only once it
/// reached every partition; a gap is returned where it overlaps the range; events of a
/// source without watermarks make the answer unknown.
async fn watermarks_and_gaps(mut h: Harness) {
    h.ingest(events()).await;
    let t = |s: &str| tally_crds::event::parse_time_ms(s).unwrap();
    let mark = Watermark {
        collector: "pods".into(),
        node: "n1".into(),
        source: "conformance".into(),
        types: vec!["usage".into()],
        until: t("2024-11-03T18:00:00Z"),
        gaps: vec![Gap {
            from: t("2024-11-03T05:00:00Z"),
            to: t("2024-11-03T05:10:00Z"),
            reason: "no agent watched".into(),
            pods: vec!["default/web-1".into()],
        }],
        partitions: 0,
    };
    let older = Watermark {
        until: t("2024-11-03T06:00:00Z"),
        gaps: Vec::new(),
        ..mark.clone()
    };
    h.record(vec![mark.clone()]).await;
    h.record(vec![older]).await;
    let other = Watermark {
        collector: "scrape".into(),
        node: String::new(),
        source: "tally/default/scrape".into(),
        types: vec!["other".into()],
        until: t("2024-11-01T00:00:00Z"),
        gaps: Vec::new(),
        partitions: 0,
    };
    h.record(vec![other]).await;
    let assess_range = |from: &str, to: &str| {
        let (from, to) = (t(from), t(to));
        move |s: &dyn Store| {
            let facts = s
                .completeness_facts("default", "usage", Some(from), to)
                .unwrap();
            tally_meter::completeness::assess("usage", Some(from), to, &facts, &Default::default())
        }
    };
    // after the gap, before the watermark: complete
    let c = h
        .with(assess_range("2024-11-03T06:00:00Z", "2024-11-03T18:00:00Z"))
        .await;
    assert_eq!(c.status, Status::Complete, "{c:?}");
    assert_eq!(c.sources.len(), 1, "only the meter's type: {c:?}");
    assert_eq!(
        c.sources[0].watermark.as_deref(),
        Some("2024-11-03T18:00:00.000Z")
    );
    // over the gap: named with its pod
    let c = h
        .with(assess_range("2024-11-03T00:00:00Z", "2024-11-03T12:00:00Z"))
        .await;
    assert_eq!(c.status, Status::Incomplete, "{c:?}");
    assert_eq!(c.sources[0].status, SourceStatus::Gap);
    assert_eq!(
        c.sources[0].missing[0].pods,
        vec!["default/web-1".to_string()]
    );
    // past the watermark: behind from there
    let c = h
        .with(assess_range("2024-11-03T06:00:00Z", "2024-12-02T00:00:00Z"))
        .await;
    assert_eq!(c.sources[0].status, SourceStatus::Behind, "{c:?}");
    assert_eq!(c.sources[0].missing[0].from, "2024-11-03T18:00:00.000Z");
    // another source's events in the range: unknown once nothing is behind
    h.ingest(vec![
        UsageEvent::from_json(
            &json!({"specversion": "1.0", "id": "app-1", "source": "billing-app",
            "type": "usage", "subject": "acme", "time": "2024-11-03T07:00:00Z"}),
            0,
        )
        .unwrap(),
    ])
    .await;
    let c = h
        .with(assess_range("2024-11-03T06:00:00Z", "2024-11-03T18:00:00Z"))
        .await;
    assert_eq!(c.status, Status::Unknown, "{c:?}");
    assert_eq!(c.unknown[0].source, "billing-app");
}

async fn row_limit_refuses(mut h: Harness) {
    h.ingest(events()).await;
    let synced = h.sync(vec![meter("COUNT", "")]).await;
    h.with(move |store| {
        let m = &synced.meters[0];
        let spec = parse(m, &format!("{ALL}&windowSize=MINUTE"));
        assert_eq!(store.query(m, &spec, 7).unwrap().rows.len(), 7);
        let err = store.query(m, &spec, 6).unwrap_err();
        assert!(err.to_string().contains("more than 6 rows"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_answers_every_case_when_meters_exist_before_events() {
    every_case_when_meters_exist_before_events(Harness::embedded()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_answers_every_case_when_meters_are_backfilled() {
    every_case_when_meters_are_backfilled(Harness::embedded()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_latest_ties_go_to_the_event_ingested_last_and_filters_apply() {
    latest_ties_and_filters(Harness::embedded()).await;
}

/// A database written before the quarter-hour tier (schema version 0: minute rollups
/// only) is upgraded on open: the quarters are filled from the minutes, LATEST
/// included, and every case answers as before.
#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_upgraded_from_minute_rollups_answers_every_case() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap());
    let store = open();
    let mut h = Harness {
        store: store.clone(),
        embedded: Some(store),
        sink: None,
        _dir: None,
    };
    h.sync(all_meters()).await;
    for e in events() {
        h.ingest(vec![e]).await;
    }
    drop(h);
    let db = rusqlite::Connection::open(dir.path().join("tally.db")).unwrap();
    db.execute_batch("DROP TABLE rollup_q; DROP TABLE rollup_dirty; PRAGMA user_version = 0;")
        .unwrap();
    let store = open();
    let h = Harness {
        store: store.clone(),
        embedded: Some(store),
        sink: None,
        _dir: None,
    };
    let synced = h.sync(all_meters()).await;
    // Right at once (dirty quarters are read as minutes) and once recomputed.
    let meters = synced.meters.clone();
    h.with(move |s| run_cases(s, &meters)).await;
    h.compacted().await;
    let quarters: i64 = db
        .query_row("SELECT COUNT(*) FROM rollup_q", [], |r| r.get(0))
        .unwrap();
    assert!(quarters > 0, "the quarter-hour rollup is filled");
    h.with(move |s| run_cases(s, &synced.meters)).await;
}

/// Every case from recomputed quarter hours, then with late events making some dirty
/// again: quarters and minutes never count an event twice or miss one.
#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_answers_every_case_from_compacted_and_dirty_quarters() {
    let mut h = Harness::embedded();
    let synced = h.sync(all_meters()).await;
    let all = events();
    let (first, late) = all.split_at(all.len() / 2);
    h.ingest(first.to_vec()).await;
    h.compacted().await;
    h.ingest(late.to_vec()).await;
    let meters = synced.meters.clone();
    h.with(move |s| run_cases(s, &meters)).await;
    h.compacted().await;
    h.with(move |s| run_cases(s, &synced.meters)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_store_keeps_watermarks_and_gaps() {
    watermarks_and_gaps(Harness::embedded()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn embedded_query_over_the_row_limit_is_refused_not_truncated() {
    row_limit_refuses(Harness::embedded()).await;
}

/// The sink's own fold ([`tally_clickhouse::fold`]) gives the states of the meter's SQL,
/// which backfill and repair use: both over the same rows, into the same rollups (the
/// fold as `origin = 0`, the SQL as `origin = 1`), for every aggregation and the shapes
/// a path can take (missing, null, object, numeric string, negative index).
async fn fold_and_sql_agree(h: Harness) {
    use tally_clickhouse::EventRow;
    use tally_clickhouse::fold::MeterFold;
    use tally_clickhouse::rollup::{Derivation, Grain, RollupSql};
    let sink = h.sink.as_ref().unwrap();
    let (url, db) = (sink.clickhouse.clone(), sink.database.clone());
    let ch = Ch::new(&ChConfig {
        url: url.clone(),
        database: db.clone(),
        user: String::new(),
        password: String::new(),
        cluster: None,
        replica_urls: Vec::new(),
    })
    .unwrap();
    let spec = |name: &str, body: &str| {
        compile(&format!(
            "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {{name: {name}}}\nspec: {{eventType: usage, {body}}}\n"
        ))
    };
    let mut meters = all_meters();
    meters.extend([
        spec(
            "last-item",
            "aggregation: SUM, valueProperty: '$.items[-1].n', groupBy: {region: $.region}, filter: [{property: $.tag, operator: ne, values: [x]}]",
        ),
        spec(
            "flagged",
            "aggregation: COUNT, groupBy: {a: $.a, b: $.b}, filter: [{property: $.flag, operator: exists}]",
        ),
        spec(
            "small",
            "aggregation: MAX, valueProperty: $.v, filter: [{property: $.v, operator: lt, values: ['50']}]",
        ),
        spec(
            "users-by-obj",
            "aggregation: UNIQUE_COUNT, valueProperty: $.user, groupBy: {obj: $.obj}",
        ),
        spec(
            "latest-since",
            "aggregation: LATEST, valueProperty: $.v, eventFrom: '2024-12-01T00:00:00Z'",
        ),
        spec(
            "min-in",
            "aggregation: MIN, valueProperty: $.v, groupBy: {model: $.model}, filter: [{property: $.model, operator: in, values: [a, b]}]",
        ),
    ]);
    let shapes = [
        json!({"v": 3, "items": [{"n": 1}, {"n": 2.5}], "region": "eu", "tag": "y", "flag": true, "a": "1", "obj": "o1", "user": "u1"}),
        json!({"v": "7.5", "items": [{"n": 4}], "region": null, "flag": null, "a": null, "b": "z", "obj": {"k": 1}, "user": "u2", "model": "a"}),
        json!({"v": "not a number", "items": [], "tag": "x", "a": {"o": 1}, "obj": "o1", "user": 5, "model": "b"}),
        json!({"v": 64, "items": [{"n": 8}, {"n": 16}, {"n": 32}], "region": "us", "flag": 0, "b": [1], "user": "u1", "model": "c"}),
        json!({"items": {"n": 1}, "region": 12, "flag": "", "obj": null, "user": null}),
    ];
    let mut events = events();
    for (i, data) in shapes.iter().cycle().take(40).enumerate() {
        let time = format!("2024-12-01T00:{:02}:{:02}Z", (i * 7) % 60, (i * 13) % 60);
        let subject = ["acme", "globex", "initech"][i % 3];
        events.push(
            UsageEvent::from_json(
                &json!({"specversion": "1.0", "id": format!("f{i}"), "source": "fold", "type": "usage", "subject": subject, "time": time, "data": data}),
                0,
            )
            .unwrap(),
        );
    }
    let rows: Vec<EventRow> = events
        .iter()
        .enumerate()
        .map(|(i, e)| EventRow::new("default", e, 1_000 + i as i64 % 5, 100, 0, i as i64))
        .collect();
    ch.insert::<EventRow>("events", &rows).await.unwrap();
    for m in &meters {
        let sql = RollupSql::new(m);
        for grain in Grain::ALL {
            ch.exec("create", &sql.create_table(&ch, grain))
                .await
                .unwrap();
            let select = sql.select(&format!("{db}.events"), Derivation::Backfill, "", grain);
            ch.exec_aggregation(
                "derive",
                &format!("INSERT INTO {db}.{} {select}", grain.table(&sql.table)),
            )
            .await
            .unwrap();
        }
        for f in MeterFold::new(m).fold(&rows) {
            ch.insert_row_binary(&f.table, &f.columns, &f.body)
                .await
                .unwrap();
        }
        let keys: Vec<String> = std::iter::once("subject".to_string())
            .chain((0..m.group_count()).map(|i| format!("g{i}")))
            .chain(["gnull", "minute"].map(String::from))
            .collect();
        let keys = keys.join(", ");
        let merged = sql.merge_columns().replace(
            "groupUniqArrayMerge(uniq)",
            "arraySort(groupUniqArrayMerge(uniq))",
        );
        for grain in Grain::ALL {
            let table = grain.table(&sql.table);
            let read = |origin: u8| {
                let q = format!(
                    "SELECT {keys}, {merged} FROM {db}.{table} WHERE origin = {origin} GROUP BY {keys} ORDER BY {keys} FORMAT TSV"
                );
                let url = url.clone();
                async move { common::services::ch(&url, &q).await }
            };
            let (folded, derived) = (read(0).await, read(1).await);
            assert!(!derived.is_empty(), "{}: no rows derived", m.slug);
            assert_eq!(
                folded, derived,
                "meter {} ({:?}): the fold's states differ from the SQL's",
                m.slug, grain
            );
        }
    }
}

/// One test per ClickHouse version for each case: `$v18` on 18.16, `$v26` on 26.9.
macro_rules! on_both_clickhouses {
    ($($label:literal => $case:ident: $v18:ident, $v26:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread")]
        async fn $v18() {
            if let Some(h) = Harness::clickhouse(concat!("clickhouse 18 conformance (", $label, ")"), 18).await {
                $case(h).await;
            }
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn $v26() {
            if let Some(h) = Harness::clickhouse(concat!("clickhouse 26 conformance (", $label, ")"), 26).await {
                $case(h).await;
            }
        }
    )*};
}

on_both_clickhouses! {
    "meters first" => every_case_when_meters_exist_before_events:
        clickhouse_store_answers_every_case_when_meters_exist_before_events,
        clickhouse26_store_answers_every_case_when_meters_exist_before_events;
    "backfill" => every_case_when_meters_are_backfilled:
        clickhouse_store_answers_every_case_when_meters_are_backfilled,
        clickhouse26_store_answers_every_case_when_meters_are_backfilled;
    "latest, filters" => latest_ties_and_filters:
        clickhouse_latest_ties_go_to_the_event_ingested_last_and_filters_apply,
        clickhouse26_latest_ties_go_to_the_event_ingested_last_and_filters_apply;
    "watermarks" => watermarks_and_gaps:
        clickhouse_store_keeps_watermarks_and_gaps,
        clickhouse26_store_keeps_watermarks_and_gaps;
    "fold" => fold_and_sql_agree:
        clickhouse_fold_gives_the_states_of_the_sql,
        clickhouse26_fold_gives_the_states_of_the_sql;
    "row limit" => row_limit_refuses:
        clickhouse_query_over_the_row_limit_is_refused_not_truncated,
        clickhouse26_query_over_the_row_limit_is_refused_not_truncated;
}
