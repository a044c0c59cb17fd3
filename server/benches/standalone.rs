//! `make bench`: standalone (embedded store) throughput and query latency.
//!
//! Prints, from one run:
//! 1. the raw limit: a bare SQLite insert of the same event rows into the same `events`
//!    table (WAL, synchronous=NORMAL, one transaction per 100 rows, no rollups);
//! 2. store ingest: 100-event batches through `EmbeddedStore::submit` (validation done,
//!    dedup, one SUM meter with a group-by maintained), as a ratio to (1);
//! 3. HTTP ingest: 100-event JSON bodies POSTed to a running server on loopback by 8
//!    concurrent clients (client and server share the machine's cores), ratio to (1);
//!    then the same with bearer-token authentication on (1,000 tokens), ratio to both;
//! 4. query p50/p99 over 30 days of minute rollups × 1,000 subjects (2 events per
//!    subject-minute), (a) HOUR windows of one subject over 30 days, (b) DAY windows of
//!    all subjects grouped by subject. The minute rollup rows are generated with one SQL
//!    statement (what ingest would have written) to keep set-up time reasonable; the
//!    quarter-hour rows with another (what the writer's compaction would have written).
//!
//! Sizes: TALLY_BENCH_EVENTS (default 200000), TALLY_BENCH_SUBJECTS (1000),
//! TALLY_BENCH_DAYS (30).
mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{bodies, env, event_json, percentile, post_all_as, timed};
use tally_crds::{Meter, UsageEvent};
use tally_embedded::{EVENTS_SCHEMA_AND_INSERT, EmbeddedConfig, EmbeddedStore};
use tally_meter::engine::CompiledMeter;
use tally_meter::store::{Store, StoredMeter};
use tally_server::api::auth::{Auth, Tokens};
use tally_server::api::{self, AppState, Limits, parse_query};
use tally_server::catalog::Catalog;
use tally_server::metrics::Metrics;

const TOKENS_METER: &str = "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: tokens}\nspec: {eventType: llm_usage, aggregation: SUM, valueProperty: $.tokens, groupBy: {model: $.model}}\n";

/// A fresh embedded store maintaining the meter in `yaml` (blocking: a sync may
/// backfill). The folder lives as long as the returned guard.
fn store_with(yaml: &str) -> (tempfile::TempDir, Arc<EmbeddedStore>, StoredMeter) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir.path())).unwrap());
    let m: Meter = serde_yaml::from_str(yaml).unwrap();
    let synced = store
        .sync_meters(vec![Arc::new(CompiledMeter::compile(&m).unwrap())])
        .unwrap();
    (dir, store, synced.meters[0].clone())
}

fn bare_insert(events: &[UsageEvent]) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("bare.db")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    conn.pragma_update(None, "cache_size", -65_536).unwrap();
    conn.execute_batch(EVENTS_SCHEMA_AND_INSERT.0).unwrap();
    let start = Instant::now();
    for chunk in events.chunks(100) {
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut stmt = tx.prepare_cached(EVENTS_SCHEMA_AND_INSERT.1).unwrap();
            for e in chunk {
                let text = serde_json::to_string(&e.to_cloud_event()).unwrap();
                stmt.execute(rusqlite::params![
                    "default", e.source, e.id, e.ty, e.subject, e.time_ms, 0i64, text
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    events.len() as f64 / start.elapsed().as_secs_f64()
}

async fn store_ingest(events: &[UsageEvent]) -> f64 {
    let (_dir, store, _) = tokio::task::spawn_blocking(|| store_with(TOKENS_METER))
        .await
        .unwrap();
    let batches: Vec<Vec<UsageEvent>> = events.chunks(100).map(|c| c.to_vec()).collect();
    let start = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for b in batches {
        // keep 8 requests in flight, as 8 concurrent clients would
        if pending.len() == 8 {
            let p: tally_meter::store::Pending = pending.pop_front().unwrap();
            p.await.unwrap().unwrap();
        }
        pending.push_back(store.submit("default", b).unwrap());
    }
    for p in pending {
        p.await.unwrap().unwrap();
    }
    events.len() as f64 / start.elapsed().as_secs_f64()
}

/// The bearer token of the authenticated HTTP run (one of 1,000 tokens).
const TOKEN: &str = "bench-token-000999-abcdefghij";

async fn http_ingest(n: usize, authenticated: bool) -> f64 {
    let (_dir, store, meter) = tokio::task::spawn_blocking(|| store_with(TOKENS_METER))
        .await
        .unwrap();
    let store: Arc<dyn Store> = store;
    let mut state = AppState::new(store, Limits::default(), Arc::new(Metrics::default()));
    if authenticated {
        let file: String = (0..1000)
            .map(|i| format!("- {{token: bench-token-{i:06}-abcdefghij, namespaces: [default]}}\n"))
            .collect();
        let tokens = Tokens::parse(&format!("tokens:\n{file}")).unwrap();
        state = state.with_auth(Auth::fixed(tokens));
    }
    state.publish(Catalog::new(vec![meter]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, api::router(state)).await });
    let token = authenticated.then_some(TOKEN);
    let elapsed = post_all_as(
        format!("http://{addr}/api/v1/events"),
        bodies(n, 100),
        8,
        token,
    )
    .await;
    let rate = n as f64 / elapsed.as_secs_f64();
    server.abort();
    rate
}

fn query_bench(subjects: usize, days: usize) {
    let (dir, store, sm) = store_with(
        "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: gpu-seconds}\nspec: {eventType: gpu, aggregation: SUM, valueProperty: $.seconds}\n",
    );
    let minutes = days * 1440;
    let start_minute: i64 = 1_714_521_600 / 60; // 2024-05-01T00:00:00Z
    let conn = rusqlite::Connection::open(dir.path().join("tally.db")).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    conn.pragma_update(None, "cache_size", -262_144).unwrap();
    let t = Instant::now();
    conn.execute(
        "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i + 1 < ?1),
              m(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM m WHERE j + 1 < ?2)
         INSERT INTO rollup (meter, subject, minute, groups, cnt, sum, vmin, vmax)
         SELECT ?3, printf('customer-%04d', i), ?4 + j, '[]', 2, 2.0 * ((i + j) % 7), (i + j) % 7, (i + j) % 7 FROM s, m ORDER BY 2, 3",
        rusqlite::params![subjects as i64, minutes as i64, sm.rollup_id, start_minute],
    )
    .unwrap();
    println!(
        "generated {} rollup rows ({subjects} subjects x {days} days of minutes, 2 events each) in {:.1} s",
        subjects * minutes,
        t.elapsed().as_secs_f64()
    );
    // The quarter-hour tier, as the writer's compaction would have written it.
    let t = Instant::now();
    conn.execute(
        "INSERT INTO rollup_q (meter, minute, subject, groups, cnt, sum, vmin, vmax)
         SELECT meter, minute - minute % 15 AS q, subject, groups, SUM(cnt), SUM(sum), MIN(vmin), MAX(vmax)
         FROM rollup WHERE meter = ?1 GROUP BY q, subject, groups ORDER BY q, subject",
        [sm.rollup_id],
    )
    .unwrap();
    println!(
        "generated their quarter-hour rollup in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let to = chrono::DateTime::from_timestamp((start_minute + minutes as i64) * 60, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let cases = [
        (
            format!("(a) HOUR windows, one subject, {days} days"),
            format!(
                "from=2024-05-01T00:00:00Z&to={to}&windowSize=HOUR&subject=customer-{:04}",
                42 % subjects
            ),
            50,
        ),
        (
            format!("(b) DAY windows, all {subjects} subjects, groupBy=subject"),
            format!("from=2024-05-01T00:00:00Z&to={to}&windowSize=DAY&groupBy=subject"),
            5,
        ),
    ];
    for (name, query, iterations) in cases {
        let spec = parse_query(&sm, &query).unwrap();
        let (times, rows) = timed(iterations, || {
            store.query(&sm, &spec, 10_000_000).unwrap().rows.len()
        });
        println!(
            "query {name}: {rows} rows, p50 {:.1} ms, p99 {:.1} ms ({iterations} runs)",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3
        );
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would too — run either way.
    let n = env("TALLY_BENCH_EVENTS", 200_000) / 100 * 100;
    let events: Vec<UsageEvent> = (0..n)
        .map(|i| UsageEvent::from_json(&event_json(i), 0).unwrap())
        .collect();
    println!(
        "tally standalone benchmark ({n} events, batches of 100, {} cores)",
        std::thread::available_parallelism().map_or(1, |p| p.get())
    );
    let bare = bare_insert(&events);
    println!("raw limit: bare SQLite insert (events table only): {bare:>10.0} events/s");
    let store = store_ingest(&events).await;
    println!(
        "store ingest (dedup + 1 SUM meter rollup):       {store:>10.0} events/s = {:.2}x raw",
        store / bare
    );
    let http = http_ingest(n, false).await;
    println!(
        "HTTP ingest (8 clients on loopback, same host):  {http:>10.0} events/s = {:.2}x raw",
        http / bare
    );
    let authed = http_ingest(n, true).await;
    println!(
        "  the same with bearer tokens (1,000 tokens):   {authed:>10.0} events/s = {:.2}x raw, {:.2}x unauthenticated",
        authed / bare,
        authed / http
    );
    let (subjects, days) = (
        env("TALLY_BENCH_SUBJECTS", 1000),
        env("TALLY_BENCH_DAYS", 30),
    );
    tokio::task::spawn_blocking(move || query_bench(subjects, days))
        .await
        .unwrap();
}
