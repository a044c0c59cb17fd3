//! `tally-server sink`: loads envelopes from Kafka into ClickHouse, every event exactly
//! once.
//!
//! # One batch
//! Messages are collected up to `batch_rows` / `batch_bytes` / `batch_wait`, then:
//! 1. **begin**: read ClickHouse's clock `S`, write a `begin` row per Kafka partition
//!    `(partition, first offset, last offset, S)` to `sink_log`. If writing it took longer
//!    than `grace` after reading the clock, write a new `begin` with a fresh `S` (the
//!    cutover argument of [`crate::provision`] needs that bound).
//! 2. decode; undecodable or invalid messages become **dead letters** (never retried).
//! 3. **dedup** by (namespace, source, id): within the batch, against an in-memory set of
//!    recent identities (bounded by `dedup_memory_bytes`, oldest evicted first), and for
//!    identities not in memory, one lookup per batch in `event_ids` (ordered by the
//!    identity hash, so the lookup reads only matching granules) limited to the dedup
//!    window. Hash matches are confirmed on the full strings. `event_ids` is partitioned
//!    by month of insertion, and months wholly before the window are dropped (at start
//!    and hourly), so dedup storage is bounded. `sink_log` rows older than a week are
//!    deleted too, except each partition's latest batch.
//! 4. insert the new rows into `events` (`inserted_at = S`), then their identities into
//!    `event_ids`, the dead letters into `dead_letters`;
//! 5. insert the same rows into `events_feed`, which the meters' views read;
//! 6. **done**: a `done` row per partition; then commit the offsets to Kafka (advisory).
//!
//! # Why every event counts exactly once
//! `events` never holds an identity twice: rows are inserted only after dedup, and dedup
//! sees every earlier batch because a batch begins only after the previous one is done.
//! The rollups are a function of `events`: for a meter with cutover `T`, the backfill
//! rows (`origin = 1`) aggregate the rows with `inserted_at < T`, the view rows
//! (`origin = 0`) those with `inserted_at >= T`. A crash (or a failed insert — an insert
//! ClickHouse did not acknowledge may still have been applied, to some monthly parts
//! and not others, to some views and not others) can break that only for the batch
//! whose `begin` has no `done`. Every crash point:
//! - before `begin` is written: nothing of the batch was applied; it is simply re-read.
//! - after `begin`, anywhere up to `done`: on restart (or on the next attempt) the
//!   partition's latest `sink_log` row is that `begin`, so its exact range is re-read
//!   from Kafka and **repaired**: rows of the range already in `events` are found by
//!   (partition, offset); the others go through dedup (treating the present ones as
//!   seen) and are inserted with the same `S`; identities are (re-)inserted into
//!   `event_ids` (a repeated identity there is harmless); dead letters are replaced by
//!   key. Then, for every provisioned meter, the view rows of each (subject, minute)
//!   the range touches are deleted and re-derived from `events` by the view's own
//!   SELECT (rows with `inserted_at >= T`). A subject's events all live in one Kafka
//!   partition (the key is namespace/subject) and one partition has one sink at a time,
//!   so no other writer adds to those keys meanwhile. Repair is idempotent: a crash
//!   during it leaves the same `begin` and is repaired again.
//! - after `done`, before the Kafka commit: the messages are re-read and skipped, since
//!   their offsets are at or below the partition's last `done`.
//!
//! When a partition is assigned, the sink seeks to the offset after its last `done` (or
//! to the start of an open `begin`), whatever Kafka's committed offset says. Rebalances
//! happen only inside `poll`, between batches (`max.poll.interval.ms` is 10 minutes and
//! the sink exits after `max_retry` of failing to reach ClickHouse, well before that), so
//! a partition never has two sinks writing at once.
//!
//! # Fail points
//! `TALLY_SINK_FAILPOINT=<name>` aborts the process at that point, after skipping
//! `TALLY_SINK_FAILPOINT_SKIP` hits (default 0): `after-begin`, `after-raw` (events
//! inserted, views not fed), `after-feed` (views fed, no `done`), `mid-repair`
//! (rows repaired, rollups not yet re-derived). Tests crash the sink with them.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tally_crds::Envelope;

use crate::provision::{delete_where, read_meters};
use crate::rollup::{Grain, Origin, RollupSql};
use crate::{Ch, ChConfig, DeadLetterRow, EventRow, lit};
use tally_kafka::KafkaConfig;
use tally_meter::store::DeadLetter;
use tally_meter::{Error, Result};

/// Sink settings.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Kafka and the topic.
    pub kafka: KafkaConfig,
    /// Consumer group.
    pub group: String,
    /// ClickHouse.
    pub clickhouse: ChConfig,
    /// Flush a batch at this many messages.
    pub batch_rows: usize,
    /// Flush a batch at this many payload bytes.
    pub batch_bytes: usize,
    /// Flush a non-empty batch after this long.
    pub batch_wait: Duration,
    /// How long an identity is remembered for dedup (by ingestion time).
    pub dedup_window: Duration,
    /// Memory for recent identities; beyond it, ClickHouse is asked.
    pub dedup_memory_bytes: usize,
    /// Bound between reading ClickHouse's clock and writing `begin`, seconds.
    pub grace_secs: i64,
    /// Give up (exit with an error) after failing this long on one batch.
    pub max_retry: Duration,
}

impl SinkConfig {
    /// Defaults around `kafka` and `clickhouse`.
    pub fn new(kafka: KafkaConfig, clickhouse: ChConfig) -> SinkConfig {
        SinkConfig {
            kafka,
            group: "tally-sink".into(),
            clickhouse,
            batch_rows: 50_000,
            batch_bytes: 32 << 20,
            batch_wait: Duration::from_secs(1),
            dedup_window: Duration::from_secs(32 * 86400),
            dedup_memory_bytes: 64 << 20,
            grace_secs: 5,
            max_retry: Duration::from_secs(300),
        }
    }
}

/// Counters of a running sink (exported by `tally-server sink` on `/metrics`).
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Messages whose batch is done (stored, duplicate or dead-lettered).
    pub applied: Counter,
    /// Events stored.
    pub stored: Counter,
    /// Duplicates dropped.
    pub duplicates: Counter,
    /// Dead letters.
    pub dead_letters: Counter,
    /// Batches repaired after a crash or failed attempt.
    pub repairs: Counter,
    /// Dedup lookups that went to ClickHouse.
    pub lookups: Counter,
    /// Microseconds spent applying batches (begin to done), excluding waiting for Kafka.
    pub apply_micros: Counter,
    /// Unix ms when the first message arrived (0 = none yet).
    pub first_message_ms: AtomicU64,
}

impl SinkStats {
    /// The counters in the Prometheus text format (prefix `tally_sink_`).
    pub fn encode(&self) -> String {
        let mut r = Registry::with_prefix("tally_sink");
        for (name, help, c) in [
            (
                "messages_applied",
                "Kafka messages whose batch is done",
                &self.applied,
            ),
            ("events_stored", "Events stored in ClickHouse", &self.stored),
            (
                "events_deduplicated",
                "Events dropped as duplicates of a stored (namespace, source, id)",
                &self.duplicates,
            ),
            (
                "dead_letters",
                "Messages that could not be stored",
                &self.dead_letters,
            ),
            (
                "repairs",
                "Batches repaired after a crash or a failed attempt",
                &self.repairs,
            ),
            (
                "dedup_lookups",
                "Dedup lookups that went to ClickHouse",
                &self.lookups,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

fn dead_rows(dead: &[DeadLetter]) -> Vec<DeadLetterRow> {
    dead.iter().map(DeadLetterRow::from).collect()
}

fn failpoint(name: &str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    if std::env::var("TALLY_SINK_FAILPOINT").as_deref() == Ok(name) {
        let skip: u64 = std::env::var("TALLY_SINK_FAILPOINT_SKIP")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if HITS.fetch_add(1, Ordering::SeqCst) >= skip {
            eprintln!("tally-sink: failpoint {name} hit, aborting");
            std::process::abort();
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, clickhouse::Row)]
struct LogRow {
    topic: String,
    kafka_partition: i32,
    batch: u64,
    phase: String,
    rank: u8,
    start_offset: i64,
    end_offset: i64,
    inserted_at: u32,
    logged_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, clickhouse::Row)]
struct IdRow {
    h: u64,
    namespace: String,
    source: String,
    id: String,
    ingested: u32,
}

#[derive(Clone, Debug)]
struct Msg {
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
}

/// The identity key of an event: namespace, source and id, NUL-separated. Hash hits
/// from ClickHouse are confirmed on the full strings; the in-memory set relies on the
/// 128-bit hash (a collision among 10^12 identities has a probability near 10^-15).
fn identity_key(ns: &str, source: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + source.len() + id.len() + 2);
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn hash64(ns: &str, source: &str, id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&identity_key(ns, source, id))
}

fn hash128(ns: &str, source: &str, id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(&identity_key(ns, source, id))
}

/// A decoded message: its row and identity hashes.
struct Decoded {
    row: EventRow,
    h64: u64,
    h128: u128,
}

/// Decodes one message into its row, or a dead letter saying why it cannot be stored.
fn decode(m: &Msg, s: i64, now: i64) -> std::result::Result<Decoded, DeadLetter> {
    match Envelope::decode(&m.payload) {
        Ok((ns, ev, ingested)) => {
            let key = identity_key(&ns, &ev.source, &ev.id);
            Ok(Decoded {
                h64: xxhash_rust::xxh3::xxh3_64(&key),
                h128: xxhash_rust::xxh3::xxh3_128(&key),
                row: EventRow::new(&ns, &ev, ingested, s, m.partition, m.offset),
            })
        }
        Err(reason) => Err(DeadLetter {
            kafka_partition: m.partition,
            kafka_offset: m.offset,
            namespace: serde_json::from_slice::<serde_json::Value>(&m.payload)
                .ok()
                .and_then(|v| v.get("namespace")?.as_str().map(String::from))
                .filter(|n| tally_crds::envelope::is_namespace(n))
                .unwrap_or_default(),
            reason,
            payload: String::from_utf8_lossy(&m.payload).into_owned(),
            at: now as u32,
        }),
    }
}

/// Recent identities, bounded; oldest forgotten first.
#[derive(Debug)]
struct RecentIds {
    set: HashSet<u128>,
    order: VecDeque<(u128, i64)>,
    capacity: usize,
}

impl RecentIds {
    fn new(bytes: usize) -> RecentIds {
        // a set entry (16 B + hash table overhead) plus a queue entry (24 B): ~64 B
        RecentIds {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: (bytes / 64).max(1),
        }
    }

    fn insert(&mut self, h: u128, at: i64) {
        if self.set.insert(h) {
            self.order.push_back((h, at));
            while self.order.len() > self.capacity {
                if let Some((old, _)) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn expire(&mut self, before: i64) {
        while self.order.front().is_some_and(|(_, at)| *at < before) {
            if let Some((old, _)) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// What the sink knows about one partition.
#[derive(Debug)]
struct PartState {
    /// First offset not yet applied.
    next: i64,
    /// An open `begin` to repair: (start, end, S, batch).
    open: Option<(i64, i64, i64, u64)>,
    /// Messages of the open range collected so far.
    buffered: Vec<Msg>,
    /// After a seek: ignore messages until this offset arrives (fetched-ahead ones).
    await_offset: Option<i64>,
}

struct Ctx {
    rebalanced: Mutex<Vec<(bool, Vec<i32>)>>,
}

impl ClientContext for Ctx {}

impl Ctx {
    fn record(&self, assigned: bool, tpl: &TopicPartitionList) {
        let parts = tpl.elements().iter().map(|e| e.partition()).collect();
        self.rebalanced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((assigned, parts));
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.record(false, tpl);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.record(true, tpl);
        }
    }
}

/// A decoded batch, ready to write.
struct Prepared {
    /// Rows to insert into `events`.
    rows: Vec<EventRow>,
    /// Rows of the range already in `events` (repair only).
    present: Vec<EventRow>,
    dead: Vec<DeadLetter>,
    duplicates: u64,
}

struct Sink {
    cfg: SinkConfig,
    ch: Ch,
    consumer: BaseConsumer<Ctx>,
    rt: tokio::runtime::Runtime,
    recent: RecentIds,
    parts: HashMap<i32, PartState>,
    stats: Arc<SinkStats>,
    batch_seq: u64,
    stop: Arc<AtomicBool>,
}

/// Runs the sink until `stop` is set (then finishes the batch in hand) or it fails for
/// longer than `max_retry`. Blocking: run it on its own thread.
pub fn run(cfg: SinkConfig, stats: Arc<SinkStats>, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ch = Ch::new(&cfg.clickhouse)?;
    let started = Instant::now();
    loop {
        match rt.block_on(ch.ensure_schema()) {
            Ok(()) => break,
            Err(e) if started.elapsed() < cfg.max_retry && !stop.load(Ordering::SeqCst) => {
                tracing::warn!(error = %e, "ClickHouse not ready; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let consumer: BaseConsumer<Ctx> = cfg
        .kafka
        .consumer_settings(&cfg.group)
        .create_with_context(Ctx {
            rebalanced: Mutex::new(Vec::new()),
        })?;
    consumer.subscribe(&[&cfg.kafka.topic])?;
    tracing::info!(brokers = %cfg.kafka.brokers, topic = %cfg.kafka.topic, group = %cfg.group, clickhouse = %ch.url(), database = %ch.db(), "tally sink started");
    let mut sink = Sink {
        recent: RecentIds::new(cfg.dedup_memory_bytes),
        cfg,
        ch,
        consumer,
        rt,
        parts: HashMap::new(),
        stats,
        batch_seq: 0,
        stop: stop.clone(),
    };
    sink.run(&stop)
}

impl Sink {
    fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut batch: Vec<Msg> = Vec::new();
        let mut bytes = 0usize;
        let mut first_at = Instant::now();
        let mut idle_since = Instant::now();
        let mut rejoin_after = Duration::from_secs(12);
        let mut last_check = Instant::now();
        let mut assigned = 0;
        // at start, then hourly
        let mut last_prune = Instant::now() - Duration::from_secs(3600);
        loop {
            // Some brokers (tansu 0.6) leave a crashed member's partitions with it after
            // its session expired. A member with nothing assigned for twice the session
            // timeout rejoins, which makes the group rebalance; the wait doubles each time
            // (up to 5 min), so members idle by design (more sinks than partitions) do
            // not keep the group rebalancing.
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                assigned = self.consumer.assignment().map(|a| a.count()).unwrap_or(0);
            }
            if assigned > 0 {
                idle_since = Instant::now();
                rejoin_after = Duration::from_secs(12);
            } else if idle_since.elapsed() > rejoin_after {
                tracing::warn!(group = %self.cfg.group, secs = rejoin_after.as_secs(), "No partitions assigned; rejoining the consumer group");
                self.consumer.unsubscribe();
                self.consumer.subscribe(&[&self.cfg.kafka.topic])?;
                idle_since = Instant::now();
                rejoin_after = (rejoin_after * 2).min(Duration::from_secs(300));
            }
            if stop.load(Ordering::SeqCst) {
                if !batch.is_empty() {
                    self.apply(std::mem::take(&mut batch))?;
                }
                return Ok(());
            }
            self.handle_rebalances(&mut batch);
            if last_prune.elapsed() >= Duration::from_secs(3600) {
                last_prune = Instant::now();
                if let Err(e) = self.rt.block_on(self.prune_identities()) {
                    tracing::warn!(error = %e, "Failed to drop expired dedup identities; retrying in an hour");
                }
                if let Err(e) = self.rt.block_on(self.prune_log()) {
                    tracing::warn!(error = %e, "Failed to prune the sink log; retrying in an hour");
                }
            }
            let wait = if batch.is_empty() {
                Duration::from_millis(100)
            } else {
                self.cfg
                    .batch_wait
                    .saturating_sub(first_at.elapsed())
                    .max(Duration::from_millis(1))
            };
            if let Some(res) = self.consumer.poll(wait) {
                match res {
                    Ok(m) => {
                        if self.stats.first_message_ms.load(Ordering::Relaxed) == 0 {
                            let now = chrono::Utc::now().timestamp_millis() as u64;
                            self.stats.first_message_ms.store(now, Ordering::Relaxed);
                        }
                        let msg = Msg {
                            partition: m.partition(),
                            offset: m.offset(),
                            payload: m.payload().unwrap_or_default().to_vec(),
                        };
                        if let Some(msg) = self.route(msg)? {
                            if batch.is_empty() {
                                first_at = Instant::now();
                            }
                            bytes += msg.payload.len();
                            batch.push(msg);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Kafka consumer error"),
                }
            }
            let full = batch.len() >= self.cfg.batch_rows || bytes >= self.cfg.batch_bytes;
            if !batch.is_empty() && (full || first_at.elapsed() >= self.cfg.batch_wait) {
                tracing::debug!(
                    messages = batch.len(),
                    collect_ms = first_at.elapsed().as_millis() as u64,
                    "Collected a batch"
                );
                let applying = Instant::now();
                self.apply(std::mem::take(&mut batch))?;
                self.stats
                    .apply_micros
                    .inc_by(applying.elapsed().as_micros() as u64);
                bytes = 0;
            }
        }
    }

    /// Drops the monthly `event_ids` partitions that lie wholly before the dedup window,
    /// so dedup storage stays bounded (18.16 has no TTL).
    async fn prune_identities(&self) -> Result<()> {
        let now = self.ch.now().await?;
        let window_start = now - self.cfg.dedup_window.as_secs() as i64;
        let parts: Vec<String> = self
            .ch
            .fetch(
                "list dedup partitions",
                &format!(
                    "SELECT DISTINCT partition FROM system.parts WHERE database = {} AND table = 'event_ids' AND active",
                    lit(self.ch.db())
                ),
            )
            .await?;
        for p in parts {
            let Ok(yyyymm) = p.trim_matches('\'').parse::<i32>() else {
                continue;
            };
            let (y, m) = (yyyymm / 100, (yyyymm % 100) as u32);
            let next = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let Some(month_end) = chrono::NaiveDate::from_ymd_opt(next.0, next.1, 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|d| d.and_utc().timestamp())
            else {
                continue;
            };
            if month_end <= window_start {
                self.ch
                    .exec(
                        "drop expired dedup identities",
                        &format!(
                            "ALTER TABLE {}.event_ids DROP PARTITION {yyyymm}",
                            self.ch.db()
                        ),
                    )
                    .await?;
                tracing::info!(
                    partition = yyyymm,
                    "Dropped dedup identities older than the dedup window"
                );
            }
        }
        Ok(())
    }

    /// Deletes `sink_log` rows older than a week, except each partition's latest batch
    /// (its `begin` and `done`), which is all that restarts and backfills read.
    async fn prune_log(&self) -> Result<()> {
        let week_ago = chrono::Utc::now().timestamp_millis() - 7 * 86_400_000;
        let latest: Vec<(i32, i64)> = self
            .ch
            .fetch(
                "read the sink log",
                &format!(
                    "SELECT kafka_partition, max(start_offset) FROM {}.sink_log WHERE topic = {} GROUP BY kafka_partition",
                    self.ch.db(),
                    lit(&self.cfg.kafka.topic)
                ),
            )
            .await?;
        if latest.is_empty() {
            return Ok(());
        }
        let older = latest
            .iter()
            .map(|(p, start)| format!("(kafka_partition = {p} AND start_offset < {start})"))
            .collect::<Vec<_>>()
            .join(" OR ");
        delete_where(
            &self.ch,
            "sink_log",
            &format!(
                "topic = {} AND logged_ms < {week_ago} AND ({older})",
                lit(&self.cfg.kafka.topic)
            ),
        )
        .await
    }

    fn handle_rebalances(&mut self, batch: &mut Vec<Msg>) {
        let events = std::mem::take(
            &mut *self
                .consumer
                .context()
                .rebalanced
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for (assigned, parts) in events {
            tracing::info!(assigned, ?parts, "Partitions rebalanced");
            // Either way, forget what we knew: state is re-read from ClickHouse when the
            // partition's next message arrives, and unapplied messages are re-read.
            for p in parts {
                self.parts.remove(&p);
                batch.retain(|m| m.partition != p);
            }
        }
    }

    /// Decides what to do with a message: `Some` = add to the batch; `None` = skipped or
    /// taken by a repair.
    fn route(&mut self, msg: Msg) -> anyhow::Result<Option<Msg>> {
        let p = msg.partition;
        if !self.parts.contains_key(&p) {
            let state = self.with_retry("read the sink log", |s| s.read_partition(p))?;
            let target = state.open.map_or(state.next, |o| o.0);
            self.parts.insert(p, state);
            if msg.offset != target && target >= 0 {
                if let Some(st) = self.parts.get_mut(&p) {
                    st.await_offset = Some(target);
                }
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&self.cfg.kafka.topic, p, Offset::Offset(target))?;
                tracing::info!(
                    partition = p,
                    from = msg.offset,
                    to = target,
                    "Seeking to the sink's progress"
                );
                self.consumer
                    .seek_partitions(tpl, Duration::from_secs(10))?;
                return Ok(None);
            }
        }
        let state = self.parts.get_mut(&p).expect("inserted above");
        match state.await_offset {
            Some(o) if msg.offset != o => return Ok(None),
            Some(_) => state.await_offset = None,
            None => {}
        }
        if msg.offset < state.next {
            return Ok(None);
        }
        if let Some((start, end, s, batch)) = state.open {
            if msg.offset < start {
                return Ok(None);
            }
            let last = msg.offset >= end;
            if msg.offset <= end {
                state.buffered.push(msg.clone());
            }
            if last {
                let msgs = std::mem::take(&mut state.buffered);
                state.open = None;
                let ranges = vec![(p, start, end)];
                tracing::warn!(
                    partition = p,
                    start,
                    end,
                    "Repairing a batch that began but did not finish"
                );
                self.with_retry("repair a batch", |sink| {
                    sink.repair(&msgs, s, batch, &ranges)
                })?;
                let state = self.parts.get_mut(&p).expect("present");
                state.next = end + 1;
                if msg.offset > end {
                    return Ok(Some(msg));
                }
            }
            return Ok(None);
        }
        state.next = msg.offset + 1;
        Ok(Some(msg))
    }

    fn read_partition(&mut self, p: i32) -> Result<PartState> {
        #[derive(Deserialize, clickhouse::Row)]
        struct Last {
            phase: String,
            start: i64,
            end: i64,
            s: u32,
            batch: u64,
        }
        let rows: Vec<Last> = self.rt.block_on(self.ch.fetch(
            "read the sink log",
            &format!(
                "SELECT argMax(phase, k), argMax(start_offset, k), argMax(end_offset, k), argMax(toUInt32(inserted_at), k), argMax(batch, k) \
                 FROM (SELECT *, tuple(start_offset, rank, logged_ms) AS k FROM {}.sink_log WHERE topic = {} AND kafka_partition = {p}) \
                 GROUP BY kafka_partition",
                self.ch.db(),
                lit(&self.cfg.kafka.topic)
            ),
        ))?;
        Ok(match rows.first() {
            None => PartState {
                next: -1,
                open: None,
                buffered: Vec::new(),
                await_offset: None,
            },
            Some(l) if l.phase == "done" => PartState {
                next: l.end + 1,
                open: None,
                buffered: Vec::new(),
                await_offset: None,
            },
            Some(l) => PartState {
                next: l.start,
                open: Some((l.start, l.end, l.s as i64, l.batch)),
                buffered: Vec::new(),
                await_offset: None,
            },
        })
    }

    /// Runs `f` until it succeeds, with exponential backoff, for at most `max_retry`.
    fn with_retry<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Sink) -> Result<T>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match f(self) {
                Ok(v) => return Ok(v),
                Err(e) if self.stop.load(Ordering::SeqCst) => {
                    return Err(anyhow::anyhow!(
                        "stopped while failing to {what} ({e}); the batch is repaired at the next start"
                    ));
                }
                Err(e) if start.elapsed() < self.cfg.max_retry => {
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Failed to {what}; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "gave up after {}s: failed to {what}: {e}",
                        start.elapsed().as_secs()
                    ));
                }
            }
        }
    }

    fn ranges(msgs: &[Msg]) -> Vec<(i32, i64, i64)> {
        let mut by: HashMap<i32, (i64, i64)> = HashMap::new();
        for m in msgs {
            let e = by.entry(m.partition).or_insert((m.offset, m.offset));
            e.0 = e.0.min(m.offset);
            e.1 = e.1.max(m.offset);
        }
        let mut v: Vec<_> = by.into_iter().map(|(p, (a, b))| (p, a, b)).collect();
        v.sort_unstable();
        v
    }

    fn log(&mut self, ranges: &[(i32, i64, i64)], batch: u64, phase: &str, s: i64) -> Result<()> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let rows: Vec<LogRow> = ranges
            .iter()
            .map(|&(p, a, b)| LogRow {
                topic: self.cfg.kafka.topic.clone(),
                kafka_partition: p,
                batch,
                phase: phase.into(),
                rank: u8::from(phase == "done"),
                start_offset: a,
                end_offset: b,
                inserted_at: s as u32,
                logged_ms: now_ms,
            })
            .collect();
        self.rt
            .block_on(self.ch.insert::<LogRow>("sink_log", &rows))
    }

    /// Applies one batch: begin, dedup, insert, feed, done.
    fn apply(&mut self, msgs: Vec<Msg>) -> anyhow::Result<()> {
        let ranges = Self::ranges(&msgs);
        self.batch_seq += 1;
        let batch = (chrono::Utc::now().timestamp_micros() as u64) ^ self.batch_seq;
        let s = self.with_retry("begin a batch", |sink| {
            loop {
                let s = sink.rt.block_on(sink.ch.now())?;
                sink.log(&ranges, batch, "begin", s)?;
                let now = sink.rt.block_on(sink.ch.now())?;
                if now - s <= sink.cfg.grace_secs {
                    return Ok(s);
                }
                tracing::warn!(
                    secs = now - s,
                    "Writing the batch's begin record was slow; beginning again"
                );
            }
        })?;
        failpoint("after-begin");
        let started = Instant::now();
        let first = self.write_batch(&msgs, s, batch, &ranges);
        tracing::debug!(
            messages = msgs.len(),
            ms = started.elapsed().as_millis() as u64,
            ok = first.is_ok(),
            "Applied a batch"
        );
        if let Err(e) = first {
            tracing::warn!(error = %e, "Batch failed part-way; repairing it");
            self.with_retry("repair a batch", |sink| {
                sink.repair(&msgs, s, batch, &ranges)
            })?;
        }
        for &(p, _, end) in &ranges {
            if let Some(st) = self.parts.get_mut(&p) {
                st.next = end + 1;
            }
        }
        let mut tpl = TopicPartitionList::new();
        for &(p, _, end) in &ranges {
            tpl.add_partition_offset(&self.cfg.kafka.topic, p, Offset::Offset(end + 1))?;
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "Kafka offset commit failed (the sink log is authoritative)");
        }
        Ok(())
    }

    fn write_batch(
        &mut self,
        msgs: &[Msg],
        s: i64,
        batch: u64,
        ranges: &[(i32, i64, i64)],
    ) -> Result<()> {
        let t = Instant::now();
        let prep = self.prepare(msgs, s, &HashSet::new())?;
        let prepared = t.elapsed();
        self.rt.block_on(async {
            self.ch.insert::<EventRow>("events", &prep.rows).await?;
            failpoint("after-raw");
            let raw = t.elapsed();
            self.insert_ids(&prep.rows, s).await?;
            self.ch
                .insert::<DeadLetterRow>("dead_letters", &dead_rows(&prep.dead))
                .await?;
            let ids = t.elapsed();
            self.ch
                .insert::<EventRow>("events_feed", &prep.rows)
                .await?;
            failpoint("after-feed");
            tracing::debug!(?prepared, ?raw, ?ids, fed = ?t.elapsed(), "Batch steps (cumulative)");
            Ok::<_, Error>(())
        })?;
        self.log(ranges, batch, "done", s)?;
        self.finish(&prep, msgs.len(), s);
        Ok(())
    }

    fn finish(&mut self, prep: &Prepared, messages: usize, s: i64) {
        for r in prep.rows.iter().chain(&prep.present) {
            self.recent
                .insert(hash128(&r.namespace, &r.source, &r.id), s);
        }
        self.stats.stored.inc_by(prep.rows.len() as u64);
        self.stats.duplicates.inc_by(prep.duplicates);
        self.stats.dead_letters.inc_by(prep.dead.len() as u64);
        self.stats.applied.inc_by(messages as u64);
    }

    async fn insert_ids(&self, rows: &[EventRow], s: i64) -> Result<()> {
        let ids: Vec<IdRow> = rows
            .iter()
            .map(|r| IdRow {
                h: hash64(&r.namespace, &r.source, &r.id),
                namespace: r.namespace.clone(),
                source: r.source.clone(),
                id: r.id.clone(),
                ingested: s as u32,
            })
            .collect();
        self.ch.insert::<IdRow>("event_ids", &ids).await
    }

    /// Decodes and deduplicates `msgs` (in offset order). Messages at `present`
    /// (partition, offset) are already in `events`: they count as seen and are returned
    /// in `present`, not in `rows`.
    fn prepare(&mut self, msgs: &[Msg], s: i64, present: &HashSet<(i32, i64)>) -> Result<Prepared> {
        let now = chrono::Utc::now().timestamp();
        let window_start = s - self.cfg.dedup_window.as_secs() as i64;
        self.recent.expire(window_start);
        let t0 = Instant::now();
        // decoding, validation and flattening are pure: spread them over the cores
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = msgs.len().div_ceil(threads).max(1);
        let decoded: Vec<std::result::Result<Decoded, DeadLetter>> = std::thread::scope(|scope| {
            let parts: Vec<_> = msgs
                .chunks(per)
                .map(|chunk| {
                    scope.spawn(move || chunk.iter().map(|m| decode(m, s, now)).collect::<Vec<_>>())
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|p| p.join().expect("decoding does not panic"))
                .collect()
        });
        // identities that need a ClickHouse lookup: not present, not in memory
        let mut ask: HashSet<u64> = HashSet::new();
        for d in decoded.iter().flatten() {
            if !present.contains(&(d.row.kafka_partition, d.row.kafka_offset))
                && !self.recent.set.contains(&d.h128)
            {
                ask.insert(d.h64);
            }
        }
        let decoded_in = t0.elapsed();
        let mut stored_before: HashSet<(String, String, String)> = HashSet::new();
        if !ask.is_empty() {
            let hashes: Vec<u64> = ask.into_iter().collect();
            // one array literal parses ~6x faster than an IN list of the same numbers and
            // is one syntax-tree node (ClickHouse caps a query at 50,000)
            for chunk in hashes.chunks(100_000) {
                self.stats.lookups.inc();
                let list = chunk
                    .iter()
                    .map(|h| h.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                let found: Vec<(String, String, String)> = self.rt.block_on(self.ch.fetch(
                    "look up stored identities",
                    &format!(
                        "SELECT namespace, source, id FROM {}.event_ids WHERE h IN (SELECT arrayJoin([{list}])) AND ingested >= toDateTime({})",
                        self.ch.db(),
                        window_start.max(0)
                    ),
                ))?;
                stored_before.extend(found);
            }
        }
        tracing::debug!(?decoded_in, looked_up = ?t0.elapsed(), "Decoded and looked up");
        let mut seen: HashSet<u128> = HashSet::new();
        let (mut rows, mut kept_present, mut dead, mut duplicates) =
            (Vec::new(), Vec::new(), Vec::new(), 0u64);
        for d in decoded {
            let d = match d {
                Ok(d) => d,
                Err(letter) => {
                    dead.push(letter);
                    continue;
                }
            };
            if present.contains(&(d.row.kafka_partition, d.row.kafka_offset)) {
                seen.insert(d.h128);
                kept_present.push(d.row);
                continue;
            }
            let id = (
                d.row.namespace.clone(),
                d.row.source.clone(),
                d.row.id.clone(),
            );
            if seen.contains(&d.h128)
                || self.recent.set.contains(&d.h128)
                || stored_before.contains(&id)
            {
                duplicates += 1;
                continue;
            }
            seen.insert(d.h128);
            rows.push(d.row);
        }
        Ok(Prepared {
            rows,
            present: kept_present,
            dead,
            duplicates,
        })
    }

    /// Repairs a batch that began (at `s`) but may not have finished: see the module docs.
    fn repair(
        &mut self,
        msgs: &[Msg],
        s: i64,
        batch: u64,
        ranges: &[(i32, i64, i64)],
    ) -> Result<()> {
        self.stats.repairs.inc();
        let db = self.ch.db().to_string();
        let cond = ranges
            .iter()
            .map(|(p, a, b)| {
                format!("(kafka_partition = {p} AND kafka_offset >= {a} AND kafka_offset <= {b})")
            })
            .collect::<Vec<_>>()
            .join(" OR ");
        let present: Vec<(i32, i64)> = self.rt.block_on(self.ch.fetch(
            "find the rows a batch already stored",
            &format!("SELECT kafka_partition, kafka_offset FROM {db}.events WHERE {cond}"),
        ))?;
        let present: HashSet<(i32, i64)> = present.into_iter().collect();
        let prep = self.prepare(msgs, s, &present)?;
        self.rt.block_on(async {
            self.ch.insert::<EventRow>("events", &prep.rows).await?;
            let all: Vec<EventRow> = prep.rows.iter().chain(&prep.present).cloned().collect();
            self.insert_ids(&all, s).await?;
            self.ch
                .insert::<DeadLetterRow>("dead_letters", &dead_rows(&prep.dead))
                .await?;
            failpoint("mid-repair");
            self.rederive(&all).await
        })?;
        self.log(ranges, batch, "done", s)?;
        self.finish(&prep, msgs.len(), s);
        Ok(())
    }

    /// Deletes and re-derives, for every provisioned meter, the view rows of each
    /// (subject, minute range) that `rows` touch.
    async fn rederive(&self, rows: &[EventRow]) -> Result<()> {
        for rec in read_meters(&self.ch).await? {
            let Some(meter) = rec.compile() else {
                tracing::error!(rollup = %rec.rollup, "A provisioned meter no longer compiles; its rollup is not repaired");
                continue;
            };
            let mine: Vec<&EventRow> = rows
                .iter()
                .filter(|r| meter.selects(&r.namespace, &r.ty))
                .collect();
            let (Some(lo), Some(hi)) = (
                mine.iter().map(|r| r.time / 60 * 60).min(),
                mine.iter().map(|r| r.time / 60 * 60).max(),
            ) else {
                continue;
            };
            let mut subjects: Vec<&str> = mine.iter().map(|r| r.subject.as_str()).collect();
            subjects.sort_unstable();
            subjects.dedup();
            let sql = RollupSql::new(&meter);
            // in chunks: ClickHouse caps a query's syntax tree at 50,000 elements
            for chunk in subjects.chunks(5_000) {
                let list = chunk.iter().map(|s| lit(s)).collect::<Vec<_>>().join(", ");
                for grain in Grain::ALL {
                    let step = grain.seconds() as u32;
                    let (lo, hi) = (lo / step * step, hi / step * step);
                    let table = grain.table(&sql.table);
                    delete_where(
                        &self.ch,
                        &table,
                        &format!(
                            "origin = 0 AND subject IN ({list}) AND minute >= toDateTime({lo}) AND minute <= toDateTime({hi})"
                        ),
                    )
                    .await?;
                    let select = sql.select(
                        &format!("{}.events", self.ch.db()),
                        Origin::View,
                        &format!(
                            "inserted_at >= toDateTime({}) AND subject IN ({list}) AND time >= toDateTime({lo}) AND time < toDateTime({})",
                            rec.cutover,
                            hi + step
                        ),
                        grain,
                    );
                    self.ch
                        .exec_aggregation(
                            "re-derive rollup rows",
                            &format!("INSERT INTO {}.{table} {select}", self.ch.db()),
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }
}
