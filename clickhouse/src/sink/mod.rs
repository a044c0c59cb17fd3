//! `tally-server sink`: loads envelopes from Kafka into ClickHouse, every event exactly
//! once.
//!
//! # One batch
//! Messages are collected up to `batch_rows` / `batch_bytes` / `batch_wait` (or, once
//! every partition is read to its end, as soon as the batch holds a quarter of
//! `batch_rows`: `EARLY_BATCH_PARTS`), then:
//! 1. **begin**: read ClickHouse's clock `S`, write a `begin` row per Kafka partition
//!    `(partition, first offset, last offset, S)` to `sink_log`. If asking the clock and
//!    writing the row took longer than `grace`, write a new `begin` with a fresh `S` (the
//!    cutover argument of [`crate::provision`] needs that bound).
//! 2. decode; undecodable or invalid messages become **dead letters** (never retried).
//! 3. **dedup** by (namespace, source, id): within the batch, against an in-memory set of
//!    recent identities (bounded by `dedup_memory_bytes`, oldest evicted first), and for
//!    identities not in memory, one lookup per batch in `event_ids` (ordered by the
//!    identity hash, so the lookup reads only matching granules) limited to the dedup
//!    window. Hash matches are confirmed on the full strings. On one server the look-up
//!    is made ahead, on the fetch thread, while the previous batch is written (below).
//!    `event_ids` is partitioned
//!    by month of insertion, and months wholly before the window are dropped (at start
//!    and hourly), so dedup storage is bounded. `sink_log` rows older than a week are
//!    deleted too, except each partition's latest batch.
//! 4. **fold**: for every meter that takes the batch (cutover `T <= S`: `meters.rs`),
//!    compute its rollup rows from the new rows in the sink, all meters in one pass
//!    over the batch ([`crate::fold`]) (before this release each meter was a view on
//!    `events_feed`, which the sink no longer feeds);
//! 5. three chains at once: the new rows into `events` (`inserted_at = S`), then the
//!    dead letters into `dead_letters` and the batch's **watermark** records into
//!    `watermarks` and `watermark_gaps` (after its events: a record vouches for the
//!    events before it on its partition); their identities into `event_ids`, each with
//!    its Kafka partition and offset; and, as soon as the fold (on threads of its own,
//!    beside the inserts) is done, the rollup rows;
//! 6. **done**: a `done` row per partition; then commit the offsets to Kafka (advisory).
//!
//! # Why every event counts exactly once
//! `events` never holds an identity twice: rows are inserted only after dedup, and dedup
//! sees every earlier batch because a batch begins only after the previous one is done.
//! A look-up made ahead (`fetch.rs`) cannot see the batches still being written when it
//! was sent; it counts the sink's finished batches first, and the sink's memory holds
//! the identities of every later batch (each tagged with its batch's number), so the
//! batch uses it only while memory has dropped none of those, and only if no
//! rebalance happened since its messages were read (a partition away meanwhile may
//! have been written by another sink). Otherwise the batch looks up again itself.
//! The rollups are a function of `events`: for a meter with cutover `T`, the backfill
//! rows (`origin = 1`) aggregate the rows with `inserted_at < T`, the sink's rows
//! (`origin = 0`) those with `inserted_at >= T`: a batch begun at `S` feeds exactly the
//! meters with `T <= S`, and the sink knows every such meter, because provisioning
//! makes a record visible on the writer before its `T` and the sink's list, read with
//! the writer's clock `R` first, serves only batches with `S <= R` (`meters.rs`). A
//! crash (or a failed insert — an insert ClickHouse did not acknowledge may still have
//! been applied, to some monthly parts and not others, to some rollups and not others)
//! can break that only for the batch whose `begin` has no `done`. Every crash point:
//! - before `begin` is written: nothing of the batch was applied; it is simply re-read.
//! - after `begin`, anywhere up to `done`: on restart (or on the next attempt) the
//!   partition's latest `sink_log` row is that `begin`, so its exact range is re-read
//!   from Kafka and **repaired**: rows of the range already in `events` are found by
//!   (partition, offset); the others go through dedup (treating the present ones as
//!   seen, and leaving out of the `event_ids` look-up the identities stored at the
//!   range's own positions: the failed attempt may have stored them without their
//!   events; an identity stored by an earlier batch has a position before the range),
//!   are inserted into `events` with the same `S` (split to find any row
//!   ClickHouse refuses, e.g. by a view you attached to `events`, which becomes a dead
//!   letter: `split.rs`, and its identity, if the failed attempt stored it, is
//!   deleted from `event_ids`); identities are (re-)inserted into
//!   `event_ids` (a repeated identity there is harmless); dead letters are replaced by
//!   key. Then, for every provisioned meter, the view rows of each (subject, minute)
//!   the range touches are deleted and re-derived from `events` by the meter's SQL
//!   ([`crate::rollup`], rows with `inserted_at >= T`), the same states the fold
//!   gives. A subject's events all live in one Kafka partition (the key is namespace/subject) and one partition has one sink at a time,
//!   so no other writer adds to those keys meanwhile. Repair is idempotent: a crash
//!   during it leaves the same `begin` and is repaired again.
//! - after `done`, before the Kafka commit: the messages are re-read and skipped, since
//!   their offsets are at or below the partition's last `done`.
//!
//! When a partition is assigned, the sink seeks to the offset after its last `done` (or
//! to the start of an open `begin`), whatever Kafka's committed offset says. Kafka is
//! read on a thread of its own while a batch is applied (`fetch.rs`), but a rebalance
//! completes only between two steps of the sink's thread: its callbacks wait for the
//! lock that thread holds while it routes, repairs or applies (`max.poll.interval.ms` is
//! 10 minutes and the sink exits after `max_retry` of failing to reach ClickHouse, well
//! before that), so a partition never has two sinks writing at once.
//!
//! # Failures
//! A failed step is classified by ClickHouse's error code (`retry.rs`): transient ones
//! (busy, read-only, out of memory, too many parts, network) are retried with backoff
//! for `max_retry`, then the process exits and its restart repairs the batch; a value
//! refused by ClickHouse splits the batch in its repair (`split.rs`); a wrong set-up (missing table or
//! database, bad credentials, no grant) stops the sink at once with the fix
//! ([`SinkError::Config`]).
//!
//! # On a replicated, sharded cluster
//! Each Kafka partition belongs to one shard ([`crate::cluster`]); a batch's messages of
//! each shard are applied as a batch of their own through that shard's writer replica,
//! so everything above holds shard by shard.
//!
//! # Files
//! `config.rs` settings, `stats.rs` counters, `batch.rs` decoding, `dedup.rs`,
//! `meters.rs` (which meters a batch feeds, and their rollup inserts),
//! `log.rs` the begin/done log, `repair.rs`, `split.rs`, `prune.rs`, `retry.rs`,
//! `error.rs`, `failpoint.rs`, `fetch.rs` (reading Kafka ahead), `group.rs`
//! (consumer-group membership); this file runs
//! the loop and applies batches.
//!
//! # Fail points
//! `TALLY_SINK_FAILPOINT=<name>` aborts the process at that point, after skipping
//! `TALLY_SINK_FAILPOINT_SKIP` hits (default 0): `after-begin`, `after-feed` (rollups
//! fed, events not inserted), `after-raw` (events inserted, no `done`), `after-ids`
//! (identities stored, events not: while it is set, a batch sends its events only after
//! its identities), `mid-split`
//! (a refused row found, the batch not yet stored), `mid-repair` (rows repaired,
//! rollups not yet re-derived). Tests crash the sink with them.
mod batch;
mod config;
mod dedup;
mod error;
mod failpoint;
mod fetch;
mod group;
mod log;
mod meters;
mod prune;
mod repair;
pub mod retry;
mod split;
mod stats;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use self::batch::{Msg, Prepared, dead_rows};
pub use self::config::SinkConfig;
use self::dedup::RecentIds;
pub use self::error::{SinkError, SinkResult};
use self::failpoint::{armed, failpoint};
use self::fetch::{Fetched, Fetcher, RebalanceLog};
use self::log::PartState;
pub use self::stats::SinkStats;
use crate::cluster::PartitionShards;
use crate::watermarks::{GapRow, WatermarkRow};
use crate::{Ch, DeadLetterRow, EventRow};
use tally_meter::{Error, Result};

struct Sink {
    cfg: SinkConfig,
    /// Where the batch being applied goes: the server, or on a cluster the writer
    /// replica of the shard in hand ([`Sink::on_shard`]).
    ch: Ch,
    /// The connection the sink was configured with (on a cluster: DDL, the shard map).
    control: Ch,
    /// On a cluster, each shard's writer replica ([`crate::cluster`]); empty on one server.
    shards: Vec<Ch>,
    shard_map: PartitionShards,
    consumer: Arc<BaseConsumer<RebalanceLog>>,
    /// Partitions assigned to this sink now (messages of others still in the fetch
    /// channel after a rebalance are dropped).
    owned: HashSet<i32>,
    rt: tokio::runtime::Runtime,
    recent: RecentIds,
    parts: HashMap<i32, PartState>,
    stats: Arc<SinkStats>,
    batch_seq: u64,
    stop: Arc<AtomicBool>,
    /// The meters each writer's batches feed ([`meters`]).
    meters: meters::Meters,
    /// Batches finished (all their inserts acknowledged), for look-ups made ahead.
    finished: Arc<AtomicU64>,
    /// Owned partitions read to their end, with no message of theirs since.
    caught_up: HashSet<i32>,
}

/// A batch goes before `batch_wait` when every partition is read to its end and it
/// holds at least this part of `batch_rows`: the tail of a burst is applied at once,
/// while a trickle still waits to make inserts of a fair size.
const EARLY_BATCH_PARTS: usize = 4;

/// Runs the sink until `stop` is set (then finishes the batch in hand), a transient
/// failure outlasts `max_retry`, or ClickHouse says the set-up is wrong. Blocking: run
/// it on its own thread.
pub fn run(cfg: SinkConfig, stats: Arc<SinkStats>, stop: Arc<AtomicBool>) -> SinkResult<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SinkError::Runtime)?;
    let ch = Ch::new(&cfg.clickhouse).map_err(|source| SinkError::Invalid {
        step: "configure the ClickHouse client".into(),
        source,
    })?;
    // ClickHouse may still be starting: not faster than once a second
    retrying(
        "create tally's tables",
        cfg.max_retry,
        Duration::from_secs(1),
        &stop,
        || rt.block_on(ch.ensure_schema()),
    )?;
    let consumer: BaseConsumer<RebalanceLog> = cfg
        .kafka
        .consumer_settings(&cfg.group)
        // tells the fetch thread when a partition is read to its end (an early batch)
        .set("enable.partition.eof", "true")
        // the end is known from a fetch that finds nothing new, which the broker holds
        // up to this long: so the early batch goes within 100 ms of the last message
        // (librdkafka's default is 500 ms), at the price of 10 empty fetches a second
        // while the topic is idle
        .set("fetch.wait.max.ms", "100")
        .create_with_context(RebalanceLog::default())
        .map_err(error::kafka("create the Kafka consumer"))?;
    let consumer = Arc::new(consumer);
    consumer
        .subscribe(&[&cfg.kafka.topic])
        .map_err(error::kafka("subscribe to the topic"))?;
    let version = rt.block_on(ch.server_version()).unwrap_or_default();
    let shards = match ch.cluster() {
        None => Vec::new(),
        Some(cluster) => {
            let writers = retrying(
                "read the cluster's shards",
                cfg.max_retry,
                Duration::from_secs(1),
                &stop,
                || rt.block_on(ch.writers()),
            )?;
            let urls: Vec<&str> = writers.iter().map(Ch::url).collect();
            tracing::info!(cluster, shards = writers.len(), writers = ?urls, "Writing each shard through its first replica");
            writers
        }
    };
    tracing::info!(brokers = %cfg.kafka.brokers, topic = %cfg.kafka.topic, group = %cfg.group, clickhouse = %ch.url(), clickhouse_version = %version, database = %ch.db(), cluster = ch.cluster().unwrap_or(""), "tally sink started");
    let mut sink = Sink {
        recent: RecentIds::new(cfg.dedup_memory_bytes),
        cfg,
        control: ch.clone(),
        ch,
        shards,
        shard_map: PartitionShards::default(),
        consumer,
        owned: HashSet::new(),
        rt,
        parts: HashMap::new(),
        stats,
        batch_seq: 0,
        stop: stop.clone(),
        meters: meters::Meters::default(),
        finished: Arc::new(AtomicU64::new(0)),
        caught_up: HashSet::new(),
    };
    sink.run(&stop)
}

/// Frees `value` on a thread of its own, off the batch's path: a batch's rows are some
/// half a million heap blocks (about 20 ms to free). Freed here if no thread starts.
fn drop_later<T: Send + 'static>(value: T) {
    let _ = std::thread::Builder::new()
        .name("tally-sink-free".into())
        .spawn(move || drop(value));
}

/// Runs `f` until it succeeds: transient failures are retried with backoff (at least
/// `floor` apart) for at most `max_retry`; a wrong set-up or a refused value stops at
/// once ([`retry`]), and so does `stop`.
fn retrying<T>(
    what: &str,
    max_retry: Duration,
    floor: Duration,
    stop: &AtomicBool,
    mut f: impl FnMut() -> Result<T>,
) -> SinkResult<T> {
    let start = Instant::now();
    let mut backoff = retry::Backoff::default();
    loop {
        let e = match f() {
            Ok(v) => return Ok(v),
            Err(e) => SinkError::unless_transient(what, e)?,
        };
        if stop.load(Ordering::SeqCst) {
            return Err(SinkError::Stopped {
                step: what.into(),
                source: e,
            });
        }
        if start.elapsed() >= max_retry {
            let secs = start.elapsed().as_secs();
            return Err(SinkError::GaveUp {
                step: what.into(),
                secs,
                source: e,
            });
        }
        let delay = backoff.delay().max(floor);
        tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Failed to {what}; retrying");
        std::thread::sleep(delay);
    }
}

impl Sink {
    fn run(&mut self, stop: &AtomicBool) -> SinkResult<()> {
        let mut batch: Vec<Msg> = Vec::new();
        let mut bytes = 0usize;
        let mut first_at = Instant::now();
        let mut group = group::GroupWatch::new();
        // at start, then hourly
        let mut last_prune = Instant::now() - Duration::from_secs(3600);
        // the next batch is read from Kafka while this one is applied (fetch.rs)
        // on one server its identities are looked up there too, ahead of the batch
        let look = match Ch::new(&self.cfg.clickhouse) {
            Ok(ch) if self.shards.is_empty() => Some(fetch::LookAhead {
                ch,
                finished: self.finished.clone(),
                window_secs: self.cfg.dedup_window.as_secs() as i64,
                stats: self.stats.clone(),
            }),
            _ => None,
        };
        let fetcher = Fetcher::spawn(self.consumer.clone(), self.cfg.batch_rows, look);
        let consumer = self.consumer.clone();
        loop {
            if let group::Membership::Rejoin(waited) =
                group.tick(&self.consumer, &self.cfg, &self.stats)
            {
                tracing::warn!(group = %self.cfg.group, secs = waited.as_secs(), "No partitions assigned; rejoining the consumer group");
                self.stats.rejoins.inc();
                self.consumer.unsubscribe();
                self.consumer
                    .subscribe(&[&self.cfg.kafka.topic])
                    .map_err(error::kafka("rejoin the consumer group"))?;
            }
            if stop.load(Ordering::SeqCst) {
                let _working = consumer.context().working();
                self.handle_rebalances(&mut batch);
                if !batch.is_empty() {
                    self.apply(std::mem::take(&mut batch))?;
                }
                return Ok(());
            }
            if last_prune.elapsed() >= Duration::from_secs(3600) {
                last_prune = Instant::now();
                for shard in 0..self.shards.len().max(1) {
                    self.on_shard(shard, |sink| {
                        if let Err(e) = sink.rt.block_on(sink.prune_identities()) {
                            tracing::warn!(error = %e, "Failed to drop expired dedup identities; retrying in an hour");
                        }
                        if let Err(e) = sink.rt.block_on(sink.prune_log()) {
                            tracing::warn!(error = %e, "Failed to prune the sink log; retrying in an hour");
                        }
                    });
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
            let fetched = match fetcher.rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(SinkError::Invalid {
                        step: "read from Kafka".into(),
                        source: Error::Unavailable("the fetch thread ended".into()),
                    });
                }
            };
            // no rebalance completes while this step works on partitions
            let _working = consumer.context().working();
            self.handle_rebalances(&mut batch);
            match fetched {
                Some(Fetched::Msg(msg)) if self.owned.contains(&msg.partition) => {
                    self.caught_up.remove(&msg.partition);
                    if self.stats.first_message_ms.load(Ordering::Relaxed) == 0 {
                        let now = chrono::Utc::now().timestamp_millis() as u64;
                        self.stats.first_message_ms.store(now, Ordering::Relaxed);
                    }
                    if let Some(msg) = self.route(msg)? {
                        if batch.is_empty() {
                            first_at = Instant::now();
                        }
                        bytes += msg.payload.len();
                        batch.push(msg);
                    }
                }
                Some(Fetched::CaughtUp(p)) if self.owned.contains(&p) => {
                    self.caught_up.insert(p);
                }
                // of a partition revoked meanwhile
                Some(Fetched::Msg(_) | Fetched::CaughtUp(_)) => {}
                Some(Fetched::Error(e)) => tracing::warn!(error = %e, "Kafka consumer error"),
                None => {}
            }
            let full = batch.len() >= self.cfg.batch_rows || bytes >= self.cfg.batch_bytes;
            // every partition read to its end: waiting out `batch_wait` brings nothing
            // more, so a batch of a fair size (an insert ClickHouse takes well) goes now
            // (the size first: it is checked on every message)
            let idle = batch.len() >= self.cfg.batch_rows.div_ceil(EARLY_BATCH_PARTS)
                && self.owned.iter().all(|p| self.caught_up.contains(p));
            if !batch.is_empty() && (full || idle || first_at.elapsed() >= self.cfg.batch_wait) {
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

    fn handle_rebalances(&mut self, batch: &mut Vec<Msg>) {
        for (assigned, parts) in self.consumer.context().take() {
            tracing::info!(assigned, ?parts, "Partitions rebalanced");
            // Either way, forget what we knew: state is re-read from ClickHouse when the
            // partition's next message arrives, and unapplied messages are re-read.
            for p in parts {
                self.parts.remove(&p);
                self.caught_up.remove(&p);
                batch.retain(|m| m.partition != p);
                if assigned {
                    self.owned.insert(p);
                } else {
                    self.owned.remove(&p);
                }
            }
        }
    }

    /// Decides what to do with a message: `Some` = add to the batch; `None` = skipped or
    /// taken by a repair.
    fn route(&mut self, msg: Msg) -> SinkResult<Option<Msg>> {
        let p = msg.partition;
        if !self.parts.contains_key(&p) {
            let state = self.with_retry("read the sink log", |s| {
                let shard = s.shard_of(p)?;
                s.on_shard(shard, |s| s.read_partition(p))
            })?;
            let target = state.open.map_or(state.next, |o| o.0);
            self.parts.insert(p, state);
            if msg.offset != target && target >= 0 {
                if let Some(st) = self.parts.get_mut(&p) {
                    st.await_offset = Some(target);
                }
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&self.cfg.kafka.topic, p, Offset::Offset(target))
                    .map_err(error::kafka("seek to the sink's progress"))?;
                tracing::info!(
                    partition = p,
                    from = msg.offset,
                    to = target,
                    "Seeking to the sink's progress"
                );
                self.consumer
                    .seek_partitions(tpl, Duration::from_secs(10))
                    .map_err(error::kafka("seek to the sink's progress"))?;
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
                    let shard = sink.shard_of(p)?;
                    sink.on_shard(shard, |sink| sink.repair(&msgs, s, batch, &ranges))
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

    /// The consumer's rebalances so far.
    fn rebalances(&self) -> u64 {
        self.consumer.context().count()
    }

    /// [`retrying`] with this sink's `max_retry` and stop flag.
    fn with_retry<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Sink) -> Result<T>,
    ) -> SinkResult<T> {
        let (max_retry, stop) = (self.cfg.max_retry, self.stop.clone());
        retrying(what, max_retry, Duration::ZERO, &stop, || f(self))
    }

    /// The shard partition `p`'s rows live on (0 on one server).
    fn shard_of(&mut self, p: i32) -> Result<usize> {
        if self.shards.is_empty() {
            return Ok(0);
        }
        let (n, topic) = (self.shards.len(), self.cfg.kafka.topic.clone());
        self.rt
            .block_on(self.shard_map.shard_of(&self.control, &topic, p, n))
    }

    /// Runs `f` with `self.ch` the writer of `shard` (on one server: the server).
    fn on_shard<T>(&mut self, shard: usize, f: impl FnOnce(&mut Sink) -> T) -> T {
        let Some(writer) = self.shards.get(shard).cloned() else {
            return f(self);
        };
        let previous = std::mem::replace(&mut self.ch, writer);
        let out = f(self);
        self.ch = previous;
        out
    }

    /// Applies one batch: on a cluster, its messages of each shard as a batch of their
    /// own on that shard; then commits the offsets to Kafka.
    fn apply(&mut self, msgs: Vec<Msg>) -> SinkResult<()> {
        let ranges = Self::ranges(&msgs);
        if self.shards.is_empty() {
            self.apply_on_shard(msgs)?;
        } else {
            // every partition of the batch was routed, so its shard is known: once per
            // partition, not per message
            let mut shard_of = HashMap::new();
            for &(p, _, _) in &ranges {
                let shard = self.with_retry("read the partition's shard", |s| s.shard_of(p))?;
                shard_of.insert(p, shard);
            }
            let mut by_shard: std::collections::BTreeMap<usize, Vec<Msg>> = Default::default();
            for m in msgs {
                by_shard.entry(shard_of[&m.partition]).or_default().push(m);
            }
            for (shard, msgs) in by_shard {
                self.on_shard(shard, |sink| sink.apply_on_shard(msgs))?;
            }
        }
        let mut tpl = TopicPartitionList::new();
        for &(p, _, end) in &ranges {
            tpl.add_partition_offset(&self.cfg.kafka.topic, p, Offset::Offset(end + 1))
                .map_err(error::kafka("commit offsets"))?;
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "Kafka offset commit failed (the sink log is authoritative)");
        }
        Ok(())
    }

    /// Applies one batch where `self.ch` points: begin, dedup, feed, insert, done.
    fn apply_on_shard(&mut self, msgs: Vec<Msg>) -> SinkResult<()> {
        let ranges = Self::ranges(&msgs);
        self.batch_seq += 1;
        let batch = (chrono::Utc::now().timestamp_micros() as u64) ^ self.batch_seq;
        let began = Instant::now();
        let s = self.with_retry("begin a batch", |sink| {
            loop {
                let asked = Instant::now();
                let s = sink.rt.block_on(sink.ch.now())?;
                sink.log(&ranges, batch, "begin", s)?;
                // `S` is ClickHouse's clock in whole seconds, read after `asked`, so when
                // the record was written the clock showed less than S + 1 s plus the time
                // since `asked` (the clocks run at the same rate): for a batch with
                // S < T, less than T + that time, which provisioning's wait until T +
                // grace covers (one query fewer than reading the clock again)
                let took = asked.elapsed();
                if took <= Duration::from_secs(sink.cfg.grace_secs.max(0) as u64) {
                    return Ok(s);
                }
                tracing::warn!(
                    secs = took.as_secs_f64(),
                    "Writing the batch's begin record was slow; beginning again"
                );
            }
        })?;
        failpoint("after-begin");
        let began = began.elapsed();
        let started = Instant::now();
        let first = self.write_batch(&msgs, s, batch, &ranges);
        tracing::debug!(
            messages = msgs.len(),
            ms = started.elapsed().as_millis() as u64,
            begin_ms = began.as_millis() as u64,
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
        drop_later(msgs);
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
        let prep = self.prepare(msgs, s, &HashSet::new(), &[])?;
        let prepared = t.elapsed();
        let (meters, tables) = self.rt.block_on(self.meters.of_batch(&self.ch, s))?;
        let (rows, ch) = (&prep.rows, &self.ch);
        // Three chains at once: the events, then the dead letters and the watermarks
        // (after the events they vouch for); the identities (a repair knows its own
        // batch's by their Kafka position); and the fold (on threads of its own), then
        // the rollups. A crash or failure anywhere leaves a state the repair mends: it
        // re-derives the rollups of every key the range touches.
        let written = std::thread::scope(|scope| {
            let (tx, rx) = futures_channel::oneshot::channel();
            let (meters, tables) = (&meters, &tables);
            scope.spawn(move || {
                let took = Instant::now();
                let folded = meters::fold_all(meters, tables, rows);
                let _ = tx.send((folded, took.elapsed()));
            });
            self.rt.block_on(async {
                let rollups = async {
                    let (folded, fold_took) = rx.await.map_err(|_| {
                        Error::Unavailable("folding the batch's rollups ended".into())
                    })?;
                    let fold = t.elapsed();
                    meters::insert_all(ch, &folded).await?;
                    failpoint("after-feed");
                    let rollup_rows = folded.iter().map(|f| f.rows).sum::<usize>();
                    Ok::<_, Error>((fold, fold_took, t.elapsed(), rollup_rows))
                };
                let events = async {
                    ch.insert::<EventRow>("events", rows).await?;
                    failpoint("after-raw");
                    let raw = t.elapsed();
                    ch.insert::<DeadLetterRow>("dead_letters", &dead_rows(&prep.dead))
                        .await?;
                    self.insert_marks(&prep).await?;
                    Ok::<_, Error>(raw)
                };
                let ids = async {
                    self.insert_ids(rows, s).await?;
                    // set, it holds the events back until here (below)
                    failpoint("after-ids");
                    Ok::<_, Error>(t.elapsed())
                };
                let ((fold, fold_took, fed, rollup_rows), raw, ids) = if armed("after-ids") {
                    // the state that fail point crashes in, made certain: identities
                    // stored, events not yet sent
                    let ids = ids.await?;
                    let (rollups, raw) = futures::try_join!(rollups, events)?;
                    (rollups, raw, ids)
                } else {
                    futures::try_join!(rollups, events, ids)?
                };
                tracing::debug!(meters = meters.len(), rollup_rows, ?prepared, ?fold_took, ?fold, ?fed, ?raw, ?ids, all = ?t.elapsed(), "Batch steps (since the batch began)");
                Ok::<_, Error>(())
            })
        });
        if written.is_err() {
            // a meter may have been dropped meanwhile: read them again
            self.meters.forget();
        }
        written?;
        let logged = Instant::now();
        self.log(ranges, batch, "done", s)?;
        let logged = logged.elapsed();
        self.finish(&prep, msgs.len(), s);
        tracing::debug!(?logged, finished = ?t.elapsed(), "Batch done");
        drop_later(prep);
        Ok(())
    }

    /// Stores the batch's watermark records, after its events: a watermark is true once
    /// the events before it on its partition are in `events`. Inserting them again (a
    /// repair) changes nothing, since the largest `until` counts.
    async fn insert_marks(&self, prep: &Prepared) -> Result<()> {
        if !prep.marks.is_empty() {
            self.ch
                .insert::<WatermarkRow>("watermarks", &prep.marks)
                .await?;
        }
        if !prep.gaps.is_empty() {
            self.ch
                .insert::<GapRow>("watermark_gaps", &prep.gaps)
                .await?;
        }
        Ok(())
    }

    /// Counts a stored batch, and remembers the identities it stored.
    fn finish(&mut self, prep: &Prepared, messages: usize, s: i64) {
        // after every insert of the batch: a look-up ahead that read this count saw them
        let batch = self.finished.load(Ordering::SeqCst) + 1;
        for &h in &prep.hashes {
            self.recent.insert(h, s, batch);
        }
        self.finished.store(batch, Ordering::SeqCst);
        self.stats.stored.inc_by(prep.rows.len() as u64);
        self.stats.duplicates.inc_by(prep.duplicates);
        self.stats.dead_letters.inc_by(prep.dead.len() as u64);
        self.stats.applied.inc_by(messages as u64);
    }
}
