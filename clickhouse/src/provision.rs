//! Provisioning a meter on ClickHouse: its rollup, its view, and an exact backfill of the
//! events stored before it existed — while ingestion goes on.
//!
//! # The cutover argument
//! Every row of `events` carries `inserted_at`, ClickHouse's clock read by the sink when
//! it began the row's batch. The sink folds a batch begun at `S` into the rollup of
//! every meter whose record says `T <= S` ([`crate::sink`]). For a new meter:
//! 1. Create the rollup tables, pick `T` = ClickHouse `now()` + margin, record it in
//!    `meters`, and wait until every writer (each shard's first replica; on one server
//!    the server) shows the record. If the clock has reached `T` by then (slow DDL or
//!    replication, e.g. `ON CLUSTER`), clear (below) and start again with a later `T`
//!    and twice the margin. So the record is on the writer before `T`, and the sink,
//!    which reads its meters there with the writer's clock first and uses that list
//!    only for batches begun no later than that clock, feeds the rollup every batch
//!    with `inserted_at >= T` and no other.
//! 2. Wait until ClickHouse's clock passes `T + grace`, then until no Kafka partition's
//!    latest `sink_log` record is a `begin` with `inserted_at < T`. The sink abandons a
//!    `begin` it could not write within `grace` of reading the clock, so after `T + grace`
//!    every batch with `inserted_at < T` is visible in `sink_log`; once each is `done`,
//!    all rows with `inserted_at < T` are in `events` and no more will come.
//! 3. Backfill: delete the rollup's backfill rows (a retry after a crash), then insert
//!    the states of every `events` row with `inserted_at < T`, tagged `origin = 1`, and
//!    mark the meter backfilled. Queries serve the meter only after that.
//!
//! So each stored event is counted once: by the sink (`>= T`) or by the backfill
//! (`< T`), never both and never neither.
//!
//! **Clearing** a record of an older cutover (a meter found with some but not all of
//! its tables or views, e.g. a database from before the fifteen-minute tier; a `T`
//! passed during step 1): write it with a cutover no batch reaches (`u32::MAX`) and wait
//! until every writer shows that, wait as in step 2 for every batch begun before then
//! (those may have used the old `T`), then drop the meter's views and delete its rows
//! with `origin = 0`. Then step 1 runs with a new `T`.
//!
//! Each meter also keeps a materialized view on `events_feed` with the same `T`. This
//! release's sink never writes `events_feed`; the views are for a sink of the previous
//! release still running during an upgrade, which feeds them instead of folding, so
//! both count every batch once. Deleting a meter marks its record dropped, then drops
//! its views and rollups; raw events stay.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Ch;
use super::lit;
use super::rollup::{Derivation, Grain, RollupSql, rollup_id, view_name};
use tally_meter::engine::CompiledMeter;
use tally_meter::store::StoredMeter;
use tally_meter::{Error, Result};

/// Timing of the cutover.
#[derive(Clone, Debug)]
pub struct CutoverConfig {
    /// How far in the future `T` is set, seconds.
    pub margin_secs: i64,
    /// The sink's bound between reading the clock and its `begin` record, seconds.
    pub grace_secs: i64,
    /// How long a backfill waits for the sink to finish older batches.
    pub wait_timeout: Duration,
}

impl Default for CutoverConfig {
    fn default() -> Self {
        CutoverConfig {
            margin_secs: 5,
            grace_secs: 5,
            wait_timeout: Duration::from_secs(600),
        }
    }
}

/// A row of `meters`.
#[derive(Clone, Debug, Serialize, Deserialize, clickhouse::Row)]
pub struct MeterRecord {
    /// Rollup table.
    pub rollup: String,
    /// Namespace.
    pub namespace: String,
    /// Meter name.
    pub name: String,
    /// Slug.
    pub slug: String,
    /// The Meter resource as JSON (name, namespace, spec).
    pub definition: String,
    /// Cutover `T`, seconds.
    pub cutover: u32,
    /// 1 once backfilled.
    pub backfilled: u8,
    /// 1 once dropped.
    pub dropped: u8,
    /// ReplacingMergeTree version.
    pub version: u64,
}

impl MeterRecord {
    /// The compiled meter this record describes.
    pub fn compile(&self) -> Option<CompiledMeter> {
        let meter: tally_crds::Meter = serde_json::from_str(&self.definition).ok()?;
        CompiledMeter::compile(&meter).ok()
    }
}

fn version() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// The live (not dropped) rollups.
pub async fn read_meters(ch: &Ch) -> Result<Vec<MeterRecord>> {
    live_records(ch, "read provisioned meters", "").await
}

/// The live records, narrowed by `and` (an SQL condition starting with `AND`, or empty).
async fn live_records(ch: &Ch, step: &str, and: &str) -> Result<Vec<MeterRecord>> {
    ch.fetch(
        step,
        &format!(
            "SELECT rollup, namespace, name, slug, definition, toUInt32(cutover), backfilled, dropped, version \
             FROM {}.meters FINAL WHERE dropped = 0 {and}",
            ch.db()
        ),
    )
    .await
}

async fn write_record(ch: &Ch, rec: &MeterRecord) -> Result<MeterRecord> {
    let mut rec = rec.clone();
    rec.version = version();
    ch.insert::<MeterRecord>("meters", std::slice::from_ref(&rec))
        .await?;
    Ok(rec)
}

fn definition(m: &CompiledMeter) -> String {
    let mut meter = tally_crds::Meter::new(&m.name, m.spec.clone());
    meter.metadata.namespace = Some(m.namespace.clone());
    serde_json::to_string(&meter).unwrap_or_default()
}

/// Makes sure `m`'s rollup tables, views and `meters` record exist, creating them with a
/// new cutover when any is missing (step 1 of the module docs). Read-only when all
/// exist. Returns the record (its `backfilled` says whether steps 2–3 remain).
pub async fn prepare(ch: &Ch, m: &CompiledMeter, cfg: &CutoverConfig) -> Result<MeterRecord> {
    let sql = RollupSql::new(m);
    let rec = record(ch, &sql.table).await?;
    if let Some(rec) = &rec {
        let mut needed = Vec::new();
        for grain in Grain::ALL {
            let table = grain.table(&sql.table);
            needed.push(view_name(&table));
            if ch.cluster().is_some() {
                needed.push(format!("{table}_all"));
            }
        }
        let needed: Vec<&str> = needed.iter().map(String::as_str).collect();
        // a void record (u32::MAX) is a clearing that did not finish
        if rec.cutover != u32::MAX && ch.all_exist(&needed).await? {
            return Ok(rec.clone());
        }
    }
    // A record of an older cutover may be feeding the rollup (the sink applies it to
    // every batch begun at or after it): void it and let those batches end, then drop
    // its views and rows, so the backfill (< T) and the new T count each event once.
    if let Some(old) = rec {
        clear(ch, &sql, old, cfg).await?;
    }
    let mut margin = cfg.margin_secs.max(1);
    loop {
        // the tables first: a sink that sees the record must find them
        for grain in Grain::ALL {
            let table = grain.table(&sql.table);
            ch.exec("create a rollup", &sql.create_table(ch, grain))
                .await?;
            ch.create_distributed(&table).await?;
        }
        let cutover = ch.now().await? + margin;
        let r = MeterRecord {
            rollup: sql.table.clone(),
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            slug: m.slug.clone(),
            definition: definition(m),
            cutover: cutover as u32,
            backfilled: 0,
            dropped: 0,
            version: 0,
        };
        let r = write_visible(ch, r, cfg).await?;
        // the views feed only a sink of the previous release (this one feeds the rollups
        // itself and leaves `events_feed` alone); they take rows from the same T
        for grain in Grain::ALL {
            ch.exec("create a rollup view", &sql.create_view(ch, cutover, grain))
                .await?;
        }
        let now = ch.now().await?;
        if now < cutover {
            tracing::info!(meter = %m.slug, namespace = %m.namespace, rollup = %sql.table, cutover, "Created rollup and view");
            return Ok(r);
        }
        if margin >= 600 {
            return Err(Error::Unavailable(format!(
                "provisioning meter {} took longer than {margin} s, past its cutover; is a ClickHouse server of the cluster down?",
                m.slug
            )));
        }
        // T passed before every writer had the record: a sink may have missed it for a
        // batch begun after T, or applied it; start over from a clean rollup
        tracing::warn!(meter = %m.slug, margin, late_secs = now - cutover, "Provisioning took longer than the cutover margin; choosing a later cutover");
        clear(ch, &sql, r, cfg).await?;
        margin *= 2;
    }
}

/// Voids `old` (a cutover no batch reaches), waits until every batch that may have
/// applied it is done, then drops the meter's views and deletes its view rows
/// (`origin = 0`).
async fn clear(
    ch: &Ch,
    sql: &RollupSql<'_>,
    mut old: MeterRecord,
    cfg: &CutoverConfig,
) -> Result<()> {
    old.cutover = u32::MAX;
    old.backfilled = 0;
    write_visible(ch, old, cfg).await?;
    let voided = ch.now().await?;
    wait_for_cutover(ch, voided, cfg).await?;
    let present = rollup_tables(ch).await?;
    for grain in Grain::ALL {
        let table = grain.table(&sql.table);
        ch.exec(
            "drop a rollup view of an older cutover",
            &format!(
                "DROP TABLE IF EXISTS {}.{}{}",
                ch.db(),
                view_name(&table),
                ch.on_cluster()
            ),
        )
        .await?;
        if present.contains(&table) {
            delete_where(ch, &table, "origin = 0").await?;
        }
    }
    tracing::info!(rollup = %sql.table, "Cleared the rows of an older cutover");
    Ok(())
}

/// The rollup tables (minute and quarter) that exist in tally's database on `ch`.
pub async fn rollup_tables(ch: &Ch) -> Result<std::collections::HashSet<String>> {
    let names: Vec<String> = ch
        .fetch(
            "list the rollup tables",
            &format!(
                "SELECT name FROM system.tables WHERE database = {} AND startsWith(name, 'rollup_')",
                lit(ch.db())
            ),
        )
        .await?;
    Ok(names.into_iter().collect())
}

/// Writes `rec` and waits until every writer the sink reads (each shard's first
/// replica; on one server, the server) has it: the sink's meter list relies on that
/// ([`crate::sink`]). Returns the record as written.
async fn write_visible(ch: &Ch, rec: MeterRecord, cfg: &CutoverConfig) -> Result<MeterRecord> {
    let rec = write_record(ch, &rec).await?;
    let start = Instant::now();
    for w in ch.writers().await? {
        loop {
            let seen: Vec<u64> = w
                .fetch(
                    "read a meter's record",
                    &format!(
                        "SELECT max(version) FROM {}.meters WHERE rollup = {}",
                        w.db(),
                        lit(&rec.rollup)
                    ),
                )
                .await?;
            if seen.first().copied().unwrap_or_default() >= rec.version {
                break;
            }
            if start.elapsed() > cfg.wait_timeout {
                return Err(Error::Unavailable(format!(
                    "the record of meter {} has not reached ClickHouse at {} after {} s; is its ZooKeeper reachable?",
                    rec.slug,
                    w.url(),
                    start.elapsed().as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(rec)
}

/// The live record of the rollup `table`, if any.
pub async fn record(ch: &Ch, table: &str) -> Result<Option<MeterRecord>> {
    let and = format!("AND rollup = {}", lit(table));
    let rows = live_records(ch, "read a provisioned meter", &and).await?;
    Ok(rows.into_iter().next())
}

/// Makes ClickHouse maintain exactly a rollup for each of `meters` (creating and
/// backfilling missing ones). Returns them with their rollup ids, in order, and the
/// rollups no meter uses any more (drop them with [`drop_rollups`] once the new set is
/// served).
pub async fn provision(
    ch: &Ch,
    meters: &[Arc<CompiledMeter>],
    cfg: &CutoverConfig,
) -> Result<(Vec<StoredMeter>, Vec<i64>)> {
    ch.ensure_schema().await?;
    let existing: HashMap<String, MeterRecord> = read_meters(ch)
        .await?
        .into_iter()
        .map(|r| (r.rollup.clone(), r))
        .collect();
    let mut pending = Vec::new();
    for m in meters {
        let rec = prepare(ch, m, cfg).await?;
        if rec.backfilled == 0 {
            pending.push((m.clone(), rec));
        }
    }
    if let Some(latest) = pending.iter().map(|(_, r)| r.cutover as i64).max() {
        wait_for_cutover(ch, latest, cfg).await?;
        for (m, rec) in pending {
            backfill(ch, &m, rec).await?;
        }
    }
    let live: std::collections::HashSet<String> =
        meters.iter().map(|m| RollupSql::new(m).table).collect();
    let stale = existing
        .keys()
        .filter(|t| !live.contains(*t))
        .filter_map(|t| super::rollup::id_of_table(t))
        .collect();
    let stored = meters
        .iter()
        .map(|m| StoredMeter {
            meter: m.clone(),
            rollup_id: rollup_id(m),
        })
        .collect();
    Ok((stored, stale))
}

/// Whether a backfill at `cutover` may run now (steps 2 of the module docs, without
/// waiting): `Ok(None)` when it may, else what it waits for.
pub async fn cutover_passed(ch: &Ch, cutover: i64, cfg: &CutoverConfig) -> Result<Option<String>> {
    let now = ch.now().await?;
    if now < cutover + cfg.grace_secs {
        return Ok(Some(format!(
            "waiting until the cutover at {} plus {} s of grace has passed",
            tally_crds::event::format_ms(cutover * 1000),
            cfg.grace_secs
        )));
    }
    let open = open_batches(ch, cutover).await?;
    Ok(open.first().map(waiting_for))
}

/// What a backfill waits for: the sink's open batch `(partition, began at)`.
fn waiting_for((partition, began): &(i32, u32)) -> String {
    format!(
        "waiting for the sink to finish the batch it began at {} on Kafka partition {partition}",
        tally_crds::event::format_ms(*began as i64 * 1000)
    )
}

/// The partitions whose latest `sink_log` row is a `begin` from before `cutover`: on a
/// cluster, read on each shard's writer ([`crate::cluster`]).
async fn open_batches(ch: &Ch, cutover: i64) -> Result<Vec<(i32, u32)>> {
    let mut open = Vec::new();
    for w in ch.writers().await? {
        let rows: Vec<(i32, u32)> = w
            .fetch(
                "read the sink log",
                &format!(
                    "SELECT kafka_partition, toUInt32(s) FROM (SELECT kafka_partition, \
                     argMax(phase, tuple(start_offset, rank, logged_ms)) AS p, \
                     argMax(inserted_at, tuple(start_offset, rank, logged_ms)) AS s \
                     FROM {}.sink_log GROUP BY topic, kafka_partition) WHERE p = 'begin' AND s < toDateTime({cutover})",
                    w.db()
                ),
            )
            .await?;
        open.extend(rows);
    }
    Ok(open)
}

/// Waits until every row with `inserted_at < cutover` is in `events` (see the module
/// docs, step 2).
async fn wait_for_cutover(ch: &Ch, cutover: i64, cfg: &CutoverConfig) -> Result<()> {
    let start = Instant::now();
    let ready_at = cutover + cfg.grace_secs;
    loop {
        let now = ch.now().await?;
        if now >= ready_at {
            break;
        }
        tokio::time::sleep(Duration::from_millis(
            ((ready_at - now) * 1000).clamp(50, 1000) as u64,
        ))
        .await;
    }
    loop {
        let open = open_batches(ch, cutover).await?;
        if open.is_empty() {
            return Ok(());
        }
        if start.elapsed() > cfg.wait_timeout {
            return Err(Error::Unavailable(format!(
                "backfill is {}; is `tally-server sink` running?",
                waiting_for(&open[0])
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for every mutation of `table` to finish.
pub async fn wait_mutations(ch: &Ch, table: &str) -> Result<()> {
    loop {
        let open: Vec<u64> = ch
            .fetch(
                "wait for a mutation",
                &format!(
                    "SELECT count() FROM system.mutations WHERE database = {} AND table = {} AND is_done = 0",
                    lit(ch.db()),
                    lit(table)
                ),
            )
            .await?;
        if open.first().copied().unwrap_or_default() == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deletes the rows of `table` matching `cond` and waits until they are gone: on a
/// cluster, on each shard's writer (the deletion replicates to the other replicas,
/// and applies only to parts numbered before it: [`crate::cluster`]).
pub async fn delete_where(ch: &Ch, table: &str, cond: &str) -> Result<()> {
    for w in ch.writers().await? {
        delete_local(&w, table, cond).await?;
    }
    Ok(())
}

/// [`delete_where`] on the server `ch` talks to.
pub(crate) async fn delete_local(ch: &Ch, table: &str, cond: &str) -> Result<()> {
    let n: Vec<u64> = ch
        .fetch(
            "count rows to delete",
            &format!("SELECT count() FROM {}.{table} WHERE {cond}", ch.db()),
        )
        .await?;
    if n.first().copied().unwrap_or_default() > 0 {
        ch.exec(
            "delete rollup rows",
            &format!("ALTER TABLE {}.{table} DELETE WHERE {cond}", ch.db()),
        )
        .await?;
    }
    wait_mutations(ch, table).await
}

/// Step 3: fills the rollup with the events stored before the cutover and marks the
/// record backfilled. Call only once [`cutover_passed`] says so.
pub async fn backfill(ch: &Ch, m: &CompiledMeter, mut rec: MeterRecord) -> Result<()> {
    let sql = RollupSql::new(m);
    let started = Instant::now();
    // on a cluster, shard by shard on its writer: it holds every row the sink finished
    for w in ch.writers().await? {
        for grain in Grain::ALL {
            let table = grain.table(&sql.table);
            delete_local(&w, &table, "origin = 1").await?;
            let select = sql.select(
                &format!("{}.events", w.db()),
                Derivation::Backfill,
                &format!("inserted_at < toDateTime({})", rec.cutover),
                grain,
            );
            w.exec_aggregation(
                "backfill a rollup",
                &format!("INSERT INTO {}.{table} {select}", w.db()),
            )
            .await?;
        }
    }
    rec.backfilled = 1;
    write_record(ch, &rec).await?;
    tracing::info!(meter = %m.slug, namespace = %m.namespace, rollup = %sql.table, ms = started.elapsed().as_millis() as u64, "Backfilled rollup");
    Ok(())
}

/// Drops the views and rollups of `ids`; raw events stay.
pub async fn drop_rollups(ch: &Ch, ids: &[i64]) -> Result<()> {
    let existing: HashMap<String, MeterRecord> = read_meters(ch)
        .await?
        .into_iter()
        .map(|r| (r.rollup.clone(), r))
        .collect();
    for id in ids {
        let table = super::rollup::table_name(*id);
        let db = ch.db();
        let on = ch.on_cluster();
        // the record first: a sink that still inserts into the tables once they are
        // gone fails that batch, repairs it, and finds the meter dropped
        if let Some(mut rec) = existing.get(&table).cloned() {
            rec.dropped = 1;
            write_record(ch, &rec).await?;
        }
        for grain in Grain::ALL {
            let t = grain.table(&table);
            ch.exec(
                "drop a rollup view",
                &format!("DROP TABLE IF EXISTS {db}.{}{on}", view_name(&t)),
            )
            .await?;
            if ch.cluster().is_some() {
                ch.exec(
                    "drop a Distributed rollup",
                    &format!("DROP TABLE IF EXISTS {db}.{t}_all{on}"),
                )
                .await?;
            }
            ch.exec(
                "drop a rollup",
                &format!("DROP TABLE IF EXISTS {db}.{t}{on}"),
            )
            .await?;
        }
        tracing::info!(rollup = %table, "Dropped rollup and view");
    }
    Ok(())
}
