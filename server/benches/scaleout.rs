//! `make bench` (part 2): the scale-out path on the services of `make services`, each
//! number next to the raw limit measured in the same run.
//!
//! 1. Ingest: events/s from HTTP request to Kafka acknowledgement (16 clients on
//!    loopback, 500-event bodies) vs a raw rdkafka produce of the same envelopes with
//!    the **same** producer settings (`KafkaConfig::producer_settings`: idempotence,
//!    acks=all, lz4, linger, batch size).
//! 2. Sink: rows/s from Kafka to ClickHouse (dedup, raw insert, identities, the meters'
//!    rollup rows folded in the sink, progress log) with 0, 1, 10 and 100 meters vs a raw
//!    insert of the same rows into the raw table in batches of the same size, and vs
//!    ClickHouse's own ceiling for the same rollups: a bare client inserting the rows
//!    into `events` and into `events_feed` with every meter's view (the previous
//!    release's design).
//! 3. Query p50/p99 over 30 days x 1,000 subjects, 2 events per subject-minute, generated
//!    server-side with `INSERT ... SELECT ... FROM numbers(...)` and backfilled into the
//!    meter's rollup: (a) HOUR windows of one subject, (b) DAY windows of all subjects by
//!    subject; each vs one SQL query computing the same answer from the raw table.
//!
//! ClickHouse: TALLY_BENCH_CLICKHOUSE (default 26.9 on :8124; :8123 is 18.16).
//! Sizes: TALLY_BENCH_EVENTS (200000), TALLY_BENCH_SUBJECTS (1000), TALLY_BENCH_DAYS (30);
//! TALLY_BENCH_METERS (0,1,10,100) the meter counts of part 2; TALLY_BENCH_SKIP_QUERY=1
//! skips part 3 (about 5 minutes); RUST_LOG=tally_clickhouse::sink=debug logs the sink's
//! steps per batch.
mod common;

/// The allocator of the `tally-server` binary (src/main.rs), so the sink runs here as
/// it runs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{bodies, env, event_json, percentile, post_all, timed};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tally_clickhouse::provision::{self, CutoverConfig};
use tally_clickhouse::sink::{SinkConfig, SinkStats};
use tally_clickhouse::store::ClickHouseStore;
use tally_clickhouse::{Ch, ChConfig, EventRow};
use tally_crds::{Envelope, Meter, UsageEvent};
use tally_kafka::{KafkaConfig, Producer};
use tally_meter::engine::CompiledMeter;
use tally_meter::store::Store;
use tally_server::api::{self, AppState, Limits, parse_query};
use tally_server::catalog::Catalog;
use tally_server::metrics::Metrics;

/// CPU seconds used so far by the processes that share the machine's cores in this
/// benchmark: this one (the sink runs in it), the broker and ClickHouse (their PIDs
/// from the PID files of `make services`, in TALLY_BENCH_SERVICES, default
/// `.services` of the workspace). Printed per phase, so the end-to-end ratio can be
/// read against what the cores could give.
#[derive(Clone, Copy, Default)]
struct Cpu {
    bench: f64,
    broker: f64,
    clickhouse: f64,
    wall: Option<Instant>,
}

struct Procs {
    broker: Option<u32>,
    clickhouse: Option<u32>,
}

impl Procs {
    fn find(url: &str) -> Procs {
        let dir = std::env::var("TALLY_BENCH_SERVICES")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../.services").into());
        let pid = |name: &str| {
            std::fs::read_to_string(format!("{dir}/{name}.pid"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        };
        let ch = if url.contains(":8123") {
            "clickhouse"
        } else {
            "clickhouse26"
        };
        let procs = Procs {
            broker: pid("tansu"),
            clickhouse: pid(ch),
        };
        if procs.broker.is_none() || procs.clickhouse.is_none() {
            println!("(CPU of the broker or ClickHouse not measured: no PID file in {dir})");
        }
        procs
    }

    fn now(&self) -> Cpu {
        Cpu {
            bench: cpu_secs("self"),
            broker: self.broker.map_or(0.0, |p| cpu_secs(&p.to_string())),
            clickhouse: self.clickhouse.map_or(0.0, |p| cpu_secs(&p.to_string())),
            wall: Some(Instant::now()),
        }
    }
}

impl Cpu {
    /// "wall W s; CPU s: bench B, broker K, ClickHouse C (of 2W on 2 cores)".
    fn since(&self, start: &Cpu) -> String {
        let wall = match (self.wall, start.wall) {
            (Some(a), Some(b)) => (a - b).as_secs_f64(),
            _ => 0.0,
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        format!(
            "wall {wall:.1} s; CPU s: this process {:.1}, broker {:.1}, ClickHouse {:.1} (of {:.1} on {cores} cores)",
            self.bench - start.bench,
            self.broker - start.broker,
            self.clickhouse - start.clickhouse,
            wall * cores
        )
    }
}

/// User + system CPU seconds of process `pid` ("self" for this one), 0 if unreadable.
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // the fields after the command name (which may hold spaces) in parentheses:
    // state is field 3, utime 14, stime 15
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 if that fails).
fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|hz: &f64| *hz > 0.0)
            .unwrap_or(100.0)
    })
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    )
}

fn ch_config(url: &str, db: &str) -> ChConfig {
    ChConfig {
        url: url.into(),
        database: db.into(),
        user: String::new(),
        password: String::new(),
        cluster: None,
        replica_urls: Vec::new(),
    }
}

fn cutover() -> CutoverConfig {
    CutoverConfig {
        margin_secs: 1,
        grace_secs: 1,
        wait_timeout: Duration::from_secs(600),
    }
}

fn meter(i: usize) -> Arc<CompiledMeter> {
    // distinct meters over the same events: each filters on a different token threshold
    let yaml = format!(
        "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {{name: tokens-{i}}}\nspec: {{eventType: llm_usage, aggregation: SUM, valueProperty: $.tokens, groupBy: {{model: $.model}}, filter: [{{property: $.tokens, operator: gte, values: ['{i}']}}]}}\n"
    );
    let m: Meter = serde_yaml::from_str(&yaml).unwrap();
    Arc::new(CompiledMeter::compile(&m).unwrap())
}

async fn raw_produce(kafka: &KafkaConfig, envelopes: &[Envelope]) -> f64 {
    let producer: FutureProducer = kafka.producer_settings().create().unwrap();
    let start = Instant::now();
    let mut deliveries = Vec::with_capacity(envelopes.len());
    for e in envelopes {
        let (key, payload) = (e.key(), e.to_bytes());
        loop {
            match producer.send_result(FutureRecord::to(&kafka.topic).key(&key).payload(&payload)) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().unwrap();
    }
    envelopes.len() as f64 / start.elapsed().as_secs_f64()
}

async fn http_ingest(kafka: &KafkaConfig, ch: Ch, n: usize) -> f64 {
    let producer = Arc::new(Producer::new(kafka).unwrap());
    let store: Arc<dyn Store> =
        Arc::new(ClickHouseStore::new(ch, Some(producer), false, cutover()));
    let state = AppState::new(store, Limits::default(), Arc::new(Metrics::default()));
    state.publish(Catalog::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, api::router(state)).await });
    let elapsed = post_all(format!("http://{addr}/api/v1/events"), bodies(n, 500), 16).await;
    server.abort();
    n as f64 / elapsed.as_secs_f64()
}

/// Sink rows/s from `topic` (holding `n` messages) into a fresh database with `meters`:
/// end to end (from the first message), and counting only the time spent applying
/// batches (what the sink itself costs, without waiting for Kafka).
async fn sink_rate(
    kafka: &KafkaConfig,
    url: &str,
    meters: usize,
    n: u64,
    procs: &Procs,
) -> (f64, f64, String) {
    let db = unique(&format!("bench_sink{meters}"));
    let cfg = ch_config(url, &db);
    let ch = Ch::new(&cfg).unwrap();
    ch.ensure_schema().await.unwrap();
    let list: Vec<_> = (0..meters).map(meter).collect();
    provision::provision(&ch, &list, &cutover()).await.unwrap();
    let mut sink = SinkConfig::new(kafka.clone(), cfg);
    sink.group = db.clone();
    let (stop, stats) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(SinkStats::default()),
    );
    let mut cpu = None;
    let thread = {
        let (stop, stats) = (stop.clone(), stats.clone());
        std::thread::spawn(move || tally_clickhouse::sink::run(sink, stats, stop))
    };
    while stats.applied.get() < n {
        // CPU from about the first message, as the rate
        if cpu.is_none() && stats.first_message_ms.load(Ordering::SeqCst) > 0 {
            cpu = Some(procs.now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // from the first message, so joining the consumer group is not counted
    let first = stats.first_message_ms.load(Ordering::SeqCst) as i64;
    let elapsed = (chrono::Utc::now().timestamp_millis() - first).max(1) as f64 / 1e3;
    let used = procs.now().since(&cpu.unwrap_or_default());
    let rate = n as f64 / elapsed;
    let applying = n as f64 / (stats.apply_micros.get().max(1) as f64 / 1e6);
    stop.store(true, Ordering::SeqCst);
    thread.join().unwrap().unwrap();
    ch.exec("drop", &format!("DROP DATABASE {db}"))
        .await
        .unwrap();
    (rate, applying, used)
}

/// Raw consume: reads the `n` messages of `topic` with a fresh group (the sink's
/// consumer settings), from the first message to the last.
fn raw_consume(kafka: &KafkaConfig, n: usize, procs: &Procs) -> (f64, String) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = kafka
        .consumer_settings(&unique("bench_consume"))
        .create()
        .unwrap();
    c.subscribe(&[&kafka.topic]).unwrap();
    // CPU and wall time from the first message
    let (mut got, mut first) = (0, None);
    while got < n {
        if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(|| procs.now());
            got += 1;
        }
    }
    let (first, last) = (first.unwrap(), procs.now());
    let wall = last.wall.zip(first.wall).map(|(a, b)| a - b).unwrap();
    (n as f64 / wall.as_secs_f64(), last.since(&first))
}

/// A bare client inserting `rows` in 50k batches into each of `tables` in turn, in a
/// fresh database with `meters` provisioned: rows/s, and the CPU it took.
async fn bare_insert(
    url: &str,
    meters: usize,
    tables: &[&str],
    rows: &[EventRow],
    procs: &Procs,
) -> (f64, String) {
    let db = unique(&format!("bench_bare{meters}"));
    let ch = Ch::new(&ch_config(url, &db)).unwrap();
    ch.ensure_schema().await.unwrap();
    let list: Vec<_> = (0..meters).map(meter).collect();
    provision::provision(&ch, &list, &cutover()).await.unwrap();
    let (start, cpu) = (Instant::now(), procs.now());
    for chunk in rows.chunks(50_000) {
        for table in tables {
            ch.insert::<EventRow>(table, chunk).await.unwrap();
        }
    }
    let rate = rows.len() as f64 / start.elapsed().as_secs_f64();
    let used = procs.now().since(&cpu);
    ch.exec("drop", &format!("DROP DATABASE {db}"))
        .await
        .unwrap();
    (rate, used)
}

/// ClickHouse's own ceiling for the sink's work with `meters`: the same rows into
/// `events_feed` (through every meter's views) and into `events`.
async fn ceiling(url: &str, meters: usize, rows: &[EventRow], procs: &Procs) -> (f64, String) {
    bare_insert(url, meters, &["events_feed", "events"], rows, procs).await
}

async fn raw_insert(url: &str, rows: &[EventRow], procs: &Procs) -> (f64, String) {
    bare_insert(url, 0, &["events"], rows, procs).await
}

async fn query_bench(url: &str, subjects: usize, days: usize) {
    let db = unique("bench_query");
    let ch = Ch::new(&ch_config(url, &db)).unwrap();
    ch.ensure_schema().await.unwrap();
    let n = subjects * days * 1440 * 2;
    let start_s: i64 = 1_714_521_600; // 2024-05-01T00:00:00Z
    let t = Instant::now();
    ch.exec_aggregation(
        "generate events",
        &format!(
            "INSERT INTO {db}.events SELECT 'default', 'gpu', concat('customer-', toString(number % {subjects})) AS subject, \
             toDateTime({start_s} + intDiv(number, {s2}) * 60 + (intDiv(number, {subjects}) % 2) * 30) AS time, toInt64(toUInt32(time)) * 1000, \
             'bench', concat('g-', toString(number)), toInt64(toUInt32(time)) * 1000, now(), 0, toInt64(number), '', '', '{{}}', \
             concat('{{\"seconds\":', toString(number % 7), '}}'), ['$[\\'seconds\\']'], [2], [toString(number % 7)], [toFloat64(number % 7)], [1] \
             FROM numbers({n})",
            s2 = subjects * 2
        ),
    )
    .await
    .unwrap();
    println!(
        "generated {n} events ({subjects} subjects x {days} days, 2 per subject-minute) in ClickHouse in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let m: Meter = serde_yaml::from_str("apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: gpu-seconds}\nspec: {eventType: gpu, aggregation: SUM, valueProperty: $.seconds}\n").unwrap();
    let meter = Arc::new(CompiledMeter::compile(&m).unwrap());
    let t = Instant::now();
    let (stored, _) = provision::provision(&ch, &[meter], &cutover())
        .await
        .unwrap();
    println!(
        "backfilled the meter's minute rollup in {:.1} s (includes the ~2 s cutover wait)",
        t.elapsed().as_secs_f64()
    );
    let sm = stored[0].clone();
    let store = Arc::new(ClickHouseStore::new(ch.clone(), None, false, cutover()));
    let end_s = start_s + days as i64 * 86400;
    let to = chrono::DateTime::from_timestamp(end_s, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let subject = format!("customer-{}", 42 % subjects);
    let value = "data_nums[indexOf(data_paths, '$[\\'seconds\\']')]";
    let cases = [
        (
            format!("(a) HOUR windows, one subject, {days} days"),
            format!("from=2024-05-01T00:00:00Z&to={to}&windowSize=HOUR&subject={subject}"),
            format!(
                "SELECT toStartOfHour(time) AS w, sum({value}) FROM {db}.events WHERE namespace = 'default' AND type = 'gpu' AND subject = '{subject}' AND time >= toDateTime({start_s}) AND time < toDateTime({end_s}) GROUP BY w ORDER BY w"
            ),
            50,
        ),
        (
            format!("(b) DAY windows, all {subjects} subjects, groupBy=subject"),
            format!("from=2024-05-01T00:00:00Z&to={to}&windowSize=DAY&groupBy=subject"),
            format!(
                "SELECT subject, toStartOfDay(time) AS w, sum({value}) FROM {db}.events WHERE namespace = 'default' AND type = 'gpu' AND time >= toDateTime({start_s}) AND time < toDateTime({end_s}) GROUP BY subject, w ORDER BY w, subject"
            ),
            10,
        ),
    ];
    for (name, query, raw_sql, iterations) in cases {
        let spec = parse_query(&sm, &query).unwrap();
        let (store2, sm2) = (store.clone(), sm.clone());
        let (times, rows) = tokio::task::spawn_blocking(move || {
            timed(iterations, || {
                store2.query(&sm2, &spec, 10_000_000).unwrap().rows.len()
            })
        })
        .await
        .unwrap();
        let mut raw_times = Vec::new();
        let mut raw_rows = 0;
        for _ in 0..iterations.min(10) {
            let t = Instant::now();
            raw_rows = ch
                .client()
                .query(&raw_sql)
                .fetch_bytes("TabSeparated")
                .unwrap()
                .collect()
                .await
                .unwrap()
                .iter()
                .filter(|b| **b == b'\n')
                .count();
            raw_times.push(t.elapsed());
        }
        raw_times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "query {name}: rollup {rows} rows p50 {:.1} ms p99 {:.1} ms | raw SQL {raw_rows} rows p50 {:.1} ms p99 {:.1} ms | rollup {:.1}x faster (p50)",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(percentile(&raw_times, 0.5)),
            ms(percentile(&raw_times, 0.99)),
            percentile(&raw_times, 0.5).as_secs_f64() / percentile(&times, 0.5).as_secs_f64()
        );
    }
    ch.exec("drop", &format!("DROP DATABASE {db}"))
        .await
        .unwrap();
}

#[tokio::main]
async fn main() {
    let kafka_addr = std::env::var("TALLY_BENCH_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let url =
        std::env::var("TALLY_BENCH_CLICKHOUSE").unwrap_or_else(|_| "http://127.0.0.1:8124".into());
    // RUST_LOG=tally_clickhouse::sink=debug shows the sink's steps per batch
    if std::env::var_os("RUST_LOG").is_some() {
        tally_runtime::telemetry::init();
    }
    let n = env("TALLY_BENCH_EVENTS", 200_000) / 500 * 500;
    println!(
        "tally scale-out benchmark ({n} events; Kafka {kafka_addr}, ClickHouse {url}; {} cores)",
        std::thread::available_parallelism().map_or(1, |p| p.get())
    );
    let envelopes: Vec<Envelope> = (0..n)
        .map(|i| {
            Envelope::new(
                "default",
                &UsageEvent::from_json(&event_json(i), 0).unwrap(),
                0,
            )
        })
        .collect();
    let mut raw_kafka = KafkaConfig::new(&kafka_addr);
    raw_kafka.topic = unique("bench_raw");
    if let Err(e) = raw_kafka.ensure_topic(8, 1).await {
        eprintln!("the scale-out benchmark needs `make services` (Kafka at {kafka_addr}): {e}");
        std::process::exit(1);
    }
    let raw = raw_produce(&raw_kafka, &envelopes).await;
    println!("raw limit: rdkafka produce, same settings:        {raw:>10.0} events/s");
    let mut http_kafka = KafkaConfig::new(&kafka_addr);
    http_kafka.topic = unique("bench_http");
    http_kafka.ensure_topic(8, 1).await.unwrap();
    let ch = Ch::new(&ch_config(&url, "bench_ingest")).unwrap();
    let http = http_ingest(&http_kafka, ch, n).await;
    println!(
        "HTTP ingest to Kafka ack (16 clients):            {http:>10.0} events/s = {:.2}x raw produce",
        http / raw
    );

    let rows: Vec<EventRow> = envelopes
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (ns, ev, at) = Envelope::decode(&e.to_bytes()).unwrap();
            EventRow::new(&ns, &ev, at, 0, (i % 8) as i32, i as i64)
        })
        .collect();
    let procs = Arc::new(Procs::find(&url));
    let (consume, used) = {
        let (k, procs) = (raw_kafka.clone(), procs.clone());
        tokio::task::spawn_blocking(move || raw_consume(&k, n, &procs))
            .await
            .unwrap()
    };
    println!("raw limit: rdkafka consume (sink's settings):     {consume:>10.0} events/s ({used})");
    let (raw_ins, used) = raw_insert(&url, &rows, &procs).await;
    println!("raw limit: ClickHouse insert into events (50k):   {raw_ins:>10.0} rows/s ({used})");
    let counts: Vec<usize> = std::env::var("TALLY_BENCH_METERS")
        .unwrap_or_else(|_| "0,1,10,100".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    for meters in counts {
        // the raw-produce topic holds the n envelopes; each run reads it with its own group
        let (sink, applying, used) = sink_rate(&raw_kafka, &url, meters, n as u64, &procs).await;
        let (own, own_used) = ceiling(&url, meters, &rows, &procs).await;
        println!(
            "sink, {meters:>3} meters:                              {sink:>10.0} rows/s = {:.2}x raw insert, {:.2}x raw consume; applying alone {applying:.0} rows/s = {:.2}x raw insert, {:.2}x ClickHouse's ceiling with the same views ({own:.0} rows/s)",
            sink / raw_ins,
            sink / consume,
            applying / raw_ins,
            applying / own
        );
        println!("  sink, end to end: {used}");
        println!("  ceiling: {own_used}");
    }
    if std::env::var_os("TALLY_BENCH_SKIP_QUERY").is_some() {
        println!("query benchmark skipped (TALLY_BENCH_SKIP_QUERY)");
        return;
    }
    query_bench(
        &url,
        env("TALLY_BENCH_SUBJECTS", 1000),
        env("TALLY_BENCH_DAYS", 30),
    )
    .await;
}
