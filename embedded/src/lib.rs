//! The embedded store: SQLite (bundled, WAL) in one file under `--data`.
//!
//! # Model
//! - `events`: raw events, the source of truth, unique on (namespace, source, id);
//!   `seq` (the rowid) is the ingestion order LATEST breaks ties with.
//! - `rollup`: per meter rollup id, subject, UTC minute and group-by values, the
//!   mergeable state of every numeric aggregation; `rollup_uniq`: UNIQUE_COUNT's
//!   distinct values per minute.
//! - `rollup_q`: the same states per quarter hour (its `minute` is the quarter's
//!   first), so a query reads whole quarters from 15 times fewer rows (the plan is
//!   [`tally_meter::query::plan_rollup_reads`], shared with ClickHouse). Ingest writes only
//!   minutes and marks their quarters in `rollup_dirty`, in the same transaction; the
//!   writer recomputes ended dirty quarters from their minutes when idle, one per
//!   transaction (and one a second under load), and a query reads a dirty quarter's
//!   minutes instead. So a quarter row is used only when it equals the sum of its
//!   minutes, and ingest pays one small upsert per quarter a batch touches, not one
//!   per state.
//! - `meters` maps (namespace, slug, definition) to a rollup id: a changed definition
//!   gets a new id and a fresh backfill.
//! - `meter_errors`: per-meter validation errors by event.
//!
//! # Writes
//! One writer thread owns the write connection. Ingest requests queue on a bounded
//! channel (full → [`Error::Overloaded`], answered 503 by the API); the writer takes
//! every queued request up to a cap into **one transaction** (group commit) that inserts
//! the events, skips duplicates, evaluates every meter of each new event, upserts the
//! pre-aggregated minute states, and commits before any request is acknowledged. A
//! request is all-or-nothing: if the transaction fails, nothing of it is stored and
//! every request in it gets the error. Meter syncs run on the same thread, so a
//! backfill and live ingest never interleave: no gap, no double count.
//!
//! # Durability
//! WAL with `synchronous=NORMAL` (default): a committed transaction survives the
//! process being killed (`kill -9`), since the WAL write completes before commit
//! returns; it may be lost on power failure. `--sqlite-sync full` makes every commit
//! survive power loss at the cost of an fsync per commit.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_channel::oneshot;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tally_crds::{Aggregation, UsageEvent, Watermark};
use tally_meter::completeness::Facts;

use tally_meter::budget::Crossing;
use tally_meter::engine::CompiledMeter;
use tally_meter::engine::state::{Latest, State};
use tally_meter::query::{Combiner, QueryAnswer, QuerySpec, plan_rollup_reads, split_minutes};
use tally_meter::store::{
    IngestOutcome, Pending, PortalTokenRecord, Store, StoredEvent, StoredMeter, Synced,
};
use tally_meter::{Error, Result};

/// Settings of the embedded store.
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    /// Folder holding `tally.db`.
    pub dir: PathBuf,
    /// Ingest requests that may wait for the writer; beyond it, [`Error::Overloaded`].
    pub queue_capacity: usize,
    /// Most events one group commit takes.
    pub max_events_per_commit: usize,
    /// `synchronous=FULL` instead of `NORMAL`.
    pub sync_full: bool,
}

impl EmbeddedConfig {
    /// Defaults for a data folder.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        EmbeddedConfig {
            dir: dir.into(),
            queue_capacity: 256,
            max_events_per_commit: 20_000,
            sync_full: false,
        }
    }
}

enum Op {
    Ingest {
        namespace: String,
        events: Vec<UsageEvent>,
        reply: oneshot::Sender<Result<IngestOutcome>>,
    },
    Sync {
        meters: Vec<Arc<CompiledMeter>>,
        reply: oneshot::Sender<Result<Synced>>,
    },
    Drop {
        ids: Vec<i64>,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// The embedded SQLite store.
pub struct EmbeddedStore {
    ops: SyncSender<Op>,
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

mod watermarks;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    source TEXT NOT NULL,
    id TEXT NOT NULL,
    type TEXT NOT NULL,
    subject TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    ingested_ms INTEGER NOT NULL,
    event TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_identity ON events(namespace, source, id);
CREATE INDEX IF NOT EXISTS events_by_type_time ON events(namespace, type, time_ms);
CREATE TABLE IF NOT EXISTS meters (
    id INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    slug TEXT NOT NULL,
    definition TEXT NOT NULL,
    UNIQUE (namespace, slug, definition)
);
CREATE TABLE IF NOT EXISTS rollup (
    meter INTEGER NOT NULL,
    subject TEXT NOT NULL,
    minute INTEGER NOT NULL,
    groups TEXT NOT NULL,
    cnt INTEGER NOT NULL,
    sum REAL NOT NULL,
    vmin REAL,
    vmax REAL,
    latest_time INTEGER,
    latest_seq INTEGER,
    latest_value REAL,
    PRIMARY KEY (meter, subject, minute, groups)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollup_by_minute ON rollup(meter, minute);
CREATE TABLE IF NOT EXISTS rollup_dirty (
    meter INTEGER NOT NULL,
    minute INTEGER NOT NULL,
    PRIMARY KEY (meter, minute)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_uniq (
    meter INTEGER NOT NULL,
    subject TEXT NOT NULL,
    minute INTEGER NOT NULL,
    groups TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (meter, subject, minute, groups, value)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS portal_tokens (
    namespace TEXT NOT NULL,
    id TEXT NOT NULL,
    subject TEXT NOT NULL,
    meters TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    invalidated_ms INTEGER,
    PRIMARY KEY (namespace, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS portal_tokens_by_created ON portal_tokens(namespace, created_ms);
CREATE TABLE IF NOT EXISTS budget_crossings (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    budget TEXT NOT NULL,
    subject TEXT NOT NULL,
    period_start_ms INTEGER NOT NULL,
    threshold TEXT NOT NULL,
    seq INTEGER NOT NULL,
    usage REAL NOT NULL,
    crossed_ms INTEGER NOT NULL,
    body TEXT NOT NULL,
    delivered_ms INTEGER,
    attempts INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    rearmed INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS budget_crossings_by_period ON budget_crossings(namespace, budget, period_start_ms);
CREATE TABLE IF NOT EXISTS meter_errors (
    seq INTEGER NOT NULL,
    meter INTEGER NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (seq, meter)
) WITHOUT ROWID;
";

const INSERT_EVENT: &str =
    "INSERT INTO events (namespace, source, id, type, subject, time_ms, ingested_ms, event)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (namespace, source, id) DO NOTHING";

/// The quarter-hour tier: time-first, since quarters are written in time order by
/// compaction and read as time ranges of every subject; an index serves one subject.
const ROLLUP_Q: &str = "
CREATE TABLE IF NOT EXISTS rollup_q (
    meter INTEGER NOT NULL,
    minute INTEGER NOT NULL,
    subject TEXT NOT NULL,
    groups TEXT NOT NULL,
    cnt INTEGER NOT NULL,
    sum REAL NOT NULL,
    vmin REAL,
    vmax REAL,
    latest_time INTEGER,
    latest_seq INTEGER,
    latest_value REAL,
    PRIMARY KEY (meter, minute, subject, groups)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollup_q_by_subject ON rollup_q(meter, subject, minute);
";

/// Schema version (`PRAGMA user_version`): 2 has `rollup_q` and `rollup_dirty`;
/// [`migrate`] marks every quarter of an older database dirty.
const SCHEMA_VERSION: i64 = 2;

/// Quarters (their first minute) of a minute `m` in SQL.
const QUARTER_OF_MINUTE: &str = "minute - ((minute % 15) + 15) % 15";

/// The rollup's upsert (adds a state to a row).
const UPSERT_ROLLUP: &str = "INSERT INTO rollup (meter, subject, minute, groups, cnt, sum, vmin, vmax, latest_time, latest_seq, latest_value)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
     ON CONFLICT (meter, subject, minute, groups) DO UPDATE SET
       cnt = cnt + excluded.cnt,
       sum = sum + excluded.sum,
       vmin = min(vmin, excluded.vmin),
       vmax = max(vmax, excluded.vmax),
       latest_value = CASE WHEN excluded.latest_time IS NOT NULL AND (latest_time IS NULL OR (excluded.latest_time, excluded.latest_seq) > (latest_time, latest_seq)) THEN excluded.latest_value ELSE latest_value END,
       latest_seq = CASE WHEN excluded.latest_time IS NOT NULL AND (latest_time IS NULL OR (excluded.latest_time, excluded.latest_seq) > (latest_time, latest_seq)) THEN excluded.latest_seq ELSE latest_seq END,
       latest_time = CASE WHEN excluded.latest_time IS NOT NULL AND (latest_time IS NULL OR (excluded.latest_time, excluded.latest_seq) > (latest_time, latest_seq)) THEN excluded.latest_time ELSE latest_time END";

/// Brings an older database to [`SCHEMA_VERSION`] (the tables exist by now).
fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .step("read the schema version")?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction().step("begin a schema upgrade")?;
    tx.execute_batch(&format!(
        "DROP TABLE IF EXISTS rollup_q; {ROLLUP_Q} DELETE FROM rollup_dirty;
         INSERT INTO rollup_dirty (meter, minute) SELECT DISTINCT meter, {QUARTER_OF_MINUTE} FROM rollup;"
    ))
    .step("mark the quarter hours to compute")?;
    tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
        .step("set the schema version")?;
    tx.commit().step("commit a schema upgrade")?;
    if version > 0
        || conn
            .query_row("SELECT EXISTS (SELECT 1 FROM rollup)", [], |r| {
                r.get::<_, bool>(0)
            })
            .unwrap_or(false)
    {
        tracing::info!(
            from = version,
            to = SCHEMA_VERSION,
            "Upgraded the store's schema"
        );
    }
    Ok(())
}

/// The SQL schema of the `events` table and its insert, for the benchmark's bare-insert
/// baseline.
pub const EVENTS_SCHEMA_AND_INSERT: (&str, &str) = (SCHEMA, INSERT_EVENT);

impl EmbeddedStore {
    /// Opens (creating if needed) the store and starts its writer thread.
    pub fn open(config: EmbeddedConfig) -> Result<EmbeddedStore> {
        std::fs::create_dir_all(&config.dir).map_err(|source| Error::ReadFile {
            path: config.dir.display().to_string(),
            source,
        })?;
        let path = config.dir.join("tally.db");
        let mut conn = open_connection(&path, config.sync_full).step("open the database")?;
        conn.execute_batch(SCHEMA).step("create the schema")?;
        conn.execute_batch(ROLLUP_Q).step("create the schema")?;
        conn.execute_batch(watermarks::SCHEMA)
            .step("create the schema")?;
        migrate(&mut conn)?;
        let (ops, rx) = sync_channel(config.queue_capacity.max(1));
        let mut writer = Writer {
            conn,
            meters: HashMap::new(),
            max_events: config.max_events_per_commit.max(1),
            last_compaction: Instant::now(),
        };
        std::thread::Builder::new()
            .name("tally-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| Error::ReadFile {
                path: "writer thread".into(),
                source,
            })?;
        Ok(EmbeddedStore {
            ops,
            readers: Mutex::new(Vec::new()),
            path,
        })
    }

    /// Quarter hours whose rollup is still to be recomputed from their minutes (the
    /// writer does so when idle, once a quarter has ended).
    pub fn quarters_pending(&self) -> Result<u64> {
        self.with_reader(|conn| {
            conn.query_row("SELECT COUNT(*) FROM rollup_dirty", [], |r| {
                r.get::<_, i64>(0)
            })
            .step("count dirty quarter hours")
            .map(|n| n as u64)
        })
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.readers.lock().map_err(|_| Error::WriterGone)?.pop();
        let conn = match conn {
            Some(c) => c,
            None => open_connection(&self.path, false).step("open a read connection")?,
        };
        let out = f(&conn);
        let mut pool = self.readers.lock().map_err(|_| Error::WriterGone)?;
        if pool.len() < 8 {
            pool.push(conn);
        }
        out
    }

    fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.ops.send(make(tx)).map_err(|_| Error::WriterGone)?;
        futures_executor::block_on(rx).map_err(|_| Error::WriterGone)?
    }
}

fn open_connection(path: &Path, sync_full: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        if sync_full { "FULL" } else { "NORMAL" },
    )?;
    conn.pragma_update(None, "busy_timeout", 10_000)?;
    conn.pragma_update(None, "cache_size", -65_536)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn submit(&self, namespace: &str, events: Vec<UsageEvent>) -> Result<Pending> {
        let (reply, rx) = oneshot::channel();
        match self.ops.try_send(Op::Ingest {
            namespace: namespace.to_string(),
            events,
            reply,
        }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(Error::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(Error::WriterGone),
        }
    }

    fn sync_meters(&self, meters: Vec<Arc<CompiledMeter>>) -> Result<Synced> {
        self.call(|reply| Op::Sync { meters, reply })
    }

    fn drop_rollups(&self, ids: Vec<i64>) -> Result<()> {
        self.call(|reply| Op::Drop { ids, reply })
    }

    fn query(&self, sm: &StoredMeter, spec: &QuerySpec, max_rows: usize) -> Result<QueryAnswer> {
        let meter = &sm.meter;
        self.with_reader(|conn| {
            // one read transaction: rollup and raw edges from the same snapshot
            let tx = conn.unchecked_transaction().step("begin a read")?;
            let from = match spec.from_ms {
                Some(f) => f,
                None => match tx
                    .query_row(
                        "SELECT MIN(time_ms) FROM events WHERE namespace = ?1 AND type = ?2",
                        params![meter.namespace, meter.spec.event_type],
                        |r| r.get::<_, Option<i64>>(0),
                    )
                    .step("find the first event")?
                {
                    Some(first) => first.max(
                        meter
                            .spec
                            .event_from
                            .map_or(i64::MIN, |t| t.timestamp_millis()),
                    ),
                    None => {
                        return Ok(QueryAnswer {
                            from_ms: None,
                            to_ms: spec.to_ms,
                            rows: vec![],
                        });
                    }
                },
            };
            let mut comb = Combiner::new(meter, spec, from, max_rows);
            if from < spec.to_ms {
                let (head, minutes, tail) = split_minutes(from, spec.to_ms);
                for (a, b) in [head, tail] {
                    if a < b {
                        raw_range(&tx, meter, a, b, &mut comb)?;
                    }
                }
                if minutes.0 < minutes.1 {
                    rollup_range(
                        &tx,
                        sm,
                        spec,
                        minutes.0 / 60_000,
                        minutes.1 / 60_000,
                        &mut comb,
                    )?;
                }
            }
            Ok(QueryAnswer {
                from_ms: Some(from),
                to_ms: spec.to_ms,
                rows: comb.finish(),
            })
        })
    }

    fn subjects(&self, sm: &StoredMeter) -> Result<Vec<String>> {
        self.with_reader(|conn| {
            let table = if sm.meter.aggregation() == Aggregation::UniqueCount {
                "rollup_uniq"
            } else {
                "rollup"
            };
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT DISTINCT subject FROM {table} WHERE meter = ?1 ORDER BY subject"
                ))
                .step("list subjects")?;
            let rows = stmt
                .query_map([sm.rollup_id], |r| r.get(0))
                .step("list subjects")?;
            rows.collect::<rusqlite::Result<Vec<String>>>()
                .step("list subjects")
        })
    }

    fn recent_events(&self, namespace: &str, limit: usize) -> Result<Vec<StoredEvent>> {
        self.with_reader(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT seq, ingested_ms, event FROM events WHERE namespace = ?1 ORDER BY seq DESC LIMIT ?2")
                .step("list events")?;
            let mut errs = conn
                .prepare_cached("SELECT m.slug, e.message FROM meter_errors e JOIN meters m ON m.id = e.meter WHERE e.seq = ?1 ORDER BY m.slug")
                .step("list validation errors")?;
            let rows = stmt
                .query_map(params![namespace, limit as i64], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)))
                .step("list events")?
                .collect::<rusqlite::Result<Vec<_>>>()
                .step("list events")?;
            let mut out = Vec::with_capacity(rows.len());
            for (seq, ingested_ms, json) in rows {
                let Some(event) = decode_event(&json) else { continue };
                let validation_errors = errs
                    .query_map([seq], |r| Ok((r.get(0)?, r.get(1)?)))
                    .step("list validation errors")?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .step("list validation errors")?;
                out.push(StoredEvent { event, ingested_ms, validation_errors });
            }
            Ok(out)
        })
    }

    // Portal tokens are few and written rarely: a pooled connection writes them
    // (SQLite serializes it with the writer thread; `busy_timeout` waits).
    fn save_portal_token(&self, t: &PortalTokenRecord) -> Result<()> {
        let meters = serde_json::to_string(&t.allowed_meter_slugs).unwrap_or_default();
        self.with_reader(|conn| {
            conn.execute(
                "INSERT INTO portal_tokens (namespace, id, subject, meters, expires_ms, created_ms, invalidated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![t.namespace, t.id, t.subject, meters, t.expires_ms, t.created_ms, t.invalidated_ms],
            )
            .step("record a portal token")
            .map(drop)
        })
    }

    fn portal_token(&self, namespace: &str, id: &str) -> Result<Option<PortalTokenRecord>> {
        self.with_reader(|conn| {
            conn.query_row(
                &format!("{PORTAL_SELECT} WHERE namespace = ?1 AND id = ?2"),
                params![namespace, id],
                portal_record,
            )
            .optional()
            .step("read a portal token")
        })
    }

    fn portal_tokens(&self, namespace: &str, limit: usize) -> Result<Vec<PortalTokenRecord>> {
        self.with_reader(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "{PORTAL_SELECT} WHERE namespace = ?1 ORDER BY created_ms DESC, id LIMIT ?2"
                ))
                .step("list portal tokens")?;
            stmt.query_map(params![namespace, limit as i64], portal_record)
                .step("list portal tokens")?
                .collect::<rusqlite::Result<Vec<_>>>()
                .step("list portal tokens")
        })
    }

    fn invalidate_portal_tokens(
        &self,
        namespace: &str,
        id: Option<&str>,
        subject: Option<&str>,
        at_ms: i64,
    ) -> Result<usize> {
        if id.is_none() && subject.is_none() {
            return Ok(0);
        }
        self.with_reader(|conn| {
            conn.execute(
                "UPDATE portal_tokens SET invalidated_ms = ?4
                 WHERE namespace = ?1 AND invalidated_ms IS NULL
                   AND (?2 IS NULL OR id = ?2) AND (?3 IS NULL OR subject = ?3)",
                params![namespace, id, subject, at_ms],
            )
            .step("invalidate portal tokens")
        })
    }

    // Watermarks, like portal tokens, are small and rare: a pooled connection writes them.
    fn record_watermarks(&self, namespace: &str, marks: Vec<Watermark>) -> Result<Pending> {
        let (tx, rx) = oneshot::channel();
        let n = marks.len();
        let r = self
            .with_reader(|conn| watermarks::record(conn, namespace, &marks))
            .map(|()| IngestOutcome {
                stored: n,
                deduplicated: 0,
            });
        let _ = tx.send(r);
        Ok(rx)
    }

    fn completeness_facts(
        &self,
        namespace: &str,
        event_type: &str,
        from_ms: Option<i64>,
        to_ms: i64,
    ) -> Result<Facts> {
        self.with_reader(|conn| watermarks::facts(conn, namespace, event_type, from_ms, to_ms))
    }
}

impl tally_meter::budget::BudgetLedger for EmbeddedStore {
    fn latest_crossings(
        &self,
        namespace: &str,
        budget: &str,
        period_start_ms: i64,
    ) -> Result<Vec<Crossing>> {
        self.with_reader(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "{CROSSING_SELECT} WHERE namespace = ?1 AND budget = ?2 AND period_start_ms = ?3 ORDER BY subject, threshold, seq"
                ))
                .step("read budget crossings")?;
            stmt.query_map(params![namespace, budget, period_start_ms], crossing_row)
                .step("read budget crossings")?
                .collect::<rusqlite::Result<Vec<_>>>()
                .step("read budget crossings")
        })
    }

    fn put_crossing(&self, c: &Crossing) -> Result<()> {
        self.with_reader(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO budget_crossings (id, namespace, budget, subject, period_start_ms, threshold, seq, usage, crossed_ms, body, delivered_ms, attempts, failed, rearmed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                params![c.id, c.namespace, c.budget, c.subject, c.period_start_ms, c.threshold, c.seq, c.usage, c.crossed_ms, c.body, c.delivered_ms, c.attempts, c.failed, c.rearmed],
            )
            .step("record a budget crossing")
            .map(drop)
        })
    }

    fn undelivered_crossings(&self) -> Result<Vec<Crossing>> {
        self.with_reader(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "{CROSSING_SELECT} WHERE delivered_ms IS NULL AND failed = 0 AND body != '' ORDER BY crossed_ms, id"
                ))
                .step("read undelivered budget crossings")?;
            stmt.query_map([], crossing_row)
                .step("read undelivered budget crossings")?
                .collect::<rusqlite::Result<Vec<_>>>()
                .step("read undelivered budget crossings")
        })
    }
}

const CROSSING_SELECT: &str = "SELECT id, namespace, budget, subject, period_start_ms, threshold, seq, usage, crossed_ms, body, delivered_ms, attempts, failed, rearmed FROM budget_crossings";

fn crossing_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Crossing> {
    Ok(Crossing {
        id: r.get(0)?,
        namespace: r.get(1)?,
        budget: r.get(2)?,
        subject: r.get(3)?,
        period_start_ms: r.get(4)?,
        threshold: r.get(5)?,
        seq: r.get(6)?,
        usage: r.get(7)?,
        crossed_ms: r.get(8)?,
        body: r.get(9)?,
        delivered_ms: r.get(10)?,
        attempts: r.get(11)?,
        failed: r.get(12)?,
        rearmed: r.get(13)?,
    })
}

const PORTAL_SELECT: &str = "SELECT id, namespace, subject, meters, expires_ms, created_ms, invalidated_ms FROM portal_tokens";

fn portal_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<PortalTokenRecord> {
    let meters: String = r.get(3)?;
    Ok(PortalTokenRecord {
        id: r.get(0)?,
        namespace: r.get(1)?,
        subject: r.get(2)?,
        allowed_meter_slugs: serde_json::from_str(&meters).unwrap_or_default(),
        expires_ms: r.get(4)?,
        created_ms: r.get(5)?,
        invalidated_ms: r.get(6)?,
    })
}

fn error_chain(e: &Error) -> String {
    let mut out = e.to_string();
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        out.push_str(": ");
        out.push_str(&next.to_string());
        cur = next;
    }
    out
}

fn decode_event(json: &str) -> Option<UsageEvent> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    UsageEvent::from_json(&v, 0).ok()
}

fn raw_range(
    tx: &Transaction<'_>,
    meter: &CompiledMeter,
    from: i64,
    to: i64,
    comb: &mut Combiner<'_>,
) -> Result<()> {
    let mut stmt = tx
        .prepare_cached("SELECT seq, event FROM events WHERE namespace = ?1 AND type = ?2 AND time_ms >= ?3 AND time_ms < ?4")
        .step("read raw events")?;
    let mut rows = stmt
        .query(params![meter.namespace, meter.spec.event_type, from, to])
        .step("read raw events")?;
    while let Some(row) = rows.next().step("read raw events")? {
        let seq: i64 = row.get(0).step("read raw events")?;
        let json: String = row.get(1).step("read raw events")?;
        let Some(event) = decode_event(&json) else {
            continue;
        };
        if let Ok(Some(c)) = meter.evaluate(&event) {
            comb.add_event(
                &c.subject,
                &c.groups,
                &c.input,
                event.time_ms,
                (seq, 0),
                &event.id,
            )?;
        }
    }
    Ok(())
}

fn rollup_range(
    tx: &Transaction<'_>,
    sm: &StoredMeter,
    spec: &QuerySpec,
    from_min: i64,
    to_min: i64,
    comb: &mut Combiner<'_>,
) -> Result<()> {
    if sm.meter.aggregation() == Aggregation::UniqueCount {
        return read_tier(tx, sm, spec, "rollup_uniq", from_min, to_min, comb);
    }
    let mut dirty = tx
        .prepare_cached("SELECT minute FROM rollup_dirty WHERE meter = ?1 AND minute >= ?2 AND minute < ?3 ORDER BY minute")
        .step("list dirty quarter hours")?;
    for read in plan_rollup_reads(from_min * 60, to_min * 60, spec, true) {
        let (a, b) = (read.from_s / 60, read.to_s / 60);
        if !read.quarter {
            read_tier(tx, sm, spec, "rollup", a, b, comb)?;
            continue;
        }
        // Quarters not recomputed since their minutes changed are read as minutes.
        let stale: Vec<i64> = dirty
            .query_map(params![sm.rollup_id, a, b], |r| r.get(0))
            .step("list dirty quarter hours")?
            .collect::<rusqlite::Result<_>>()
            .step("list dirty quarter hours")?;
        let mut at = a;
        let mut i = 0;
        while i < stale.len() {
            let start = stale[i];
            let mut end = start + 15;
            while i + 1 < stale.len() && stale[i + 1] == end {
                i += 1;
                end += 15;
            }
            i += 1;
            if at < start {
                read_tier(tx, sm, spec, "rollup_q", at, start, comb)?;
            }
            read_tier(tx, sm, spec, "rollup", start, end, comb)?;
            at = end;
        }
        if at < b {
            read_tier(tx, sm, spec, "rollup_q", at, b, comb)?;
        }
    }
    Ok(())
}

/// Adds the rows of one rollup table (`rollup`, `rollup_q` or `rollup_uniq`) with
/// `minute` in `[from_min, to_min)` to `comb`.
fn read_tier(
    tx: &Transaction<'_>,
    sm: &StoredMeter,
    spec: &QuerySpec,
    table: &str,
    from_min: i64,
    to_min: i64,
    comb: &mut Combiner<'_>,
) -> Result<()> {
    let unique = table == "rollup_uniq";
    let has_groups = sm.meter.group_count() > 0;
    let cols = if unique {
        "subject, groups, minute, value"
    } else {
        "subject, groups, minute, cnt, sum, vmin, vmax, latest_time, latest_seq, latest_value"
    };
    let subjects: Vec<Option<&str>> = if spec.subjects.is_empty() {
        vec![None]
    } else {
        spec.subjects.iter().map(|s| Some(s.as_str())).collect()
    };
    let mut last_groups = (String::new(), Vec::new());
    for subject in subjects {
        // Without statistics SQLite would scan the quarters' time range of every
        // subject for one subject; its index reads only that subject's.
        let index = if table == "rollup_q" && subject.is_some() {
            " INDEXED BY rollup_q_by_subject"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {cols} FROM {table}{index} WHERE meter = ?1 AND minute >= ?2 AND minute < ?3 {}",
            if subject.is_some() {
                "AND subject = ?4"
            } else {
                "AND ?4 IS NULL"
            }
        );
        let mut stmt = tx.prepare_cached(&sql).step("read the rollup")?;
        let mut rows = stmt
            .query(params![sm.rollup_id, from_min, to_min, subject])
            .step("read the rollup")?;
        while let Some(row) = rows.next().step("read the rollup")? {
            let subject = row
                .get_ref(0)
                .step("read the rollup")?
                .as_str()
                .unwrap_or_default()
                .to_string();
            if has_groups {
                let text = row
                    .get_ref(1)
                    .step("read the rollup")?
                    .as_str()
                    .unwrap_or("[]");
                if text != last_groups.0 {
                    last_groups = (
                        text.to_string(),
                        serde_json::from_str(text).unwrap_or_default(),
                    );
                }
            }
            let minute_ms = row.get::<_, i64>(2).step("read the rollup")? * 60_000;
            if unique {
                let value = row
                    .get_ref(3)
                    .step("read the rollup")?
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                comb.add_unique(&subject, &last_groups.1, minute_ms, &value)?;
                continue;
            }
            let state = state_at(row, 3).step("read the rollup")?;
            comb.add_state(&subject, &last_groups.1, minute_ms, &state)?;
        }
    }
    Ok(())
}

type AccKey = (i64, String, i64, String);

/// Minute states of one transaction, pre-aggregated before they are upserted.
#[derive(Default)]
struct Accumulator {
    states: HashMap<AccKey, State>,
    errors: Vec<(i64, i64, String)>,
}

impl Accumulator {
    fn add(&mut self, rollup_id: i64, meter: &CompiledMeter, event: &UsageEvent, seq: i64) {
        match meter.evaluate(event) {
            Ok(None) => {}
            Err(message) => self.errors.push((seq, rollup_id, message)),
            Ok(Some(c)) => {
                let groups = if c.groups.is_empty() {
                    "[]".to_string()
                } else {
                    serde_json::to_string(&c.groups).unwrap_or_default()
                };
                let key = (
                    rollup_id,
                    c.subject,
                    event.time_ms.div_euclid(60_000),
                    groups,
                );
                self.states.entry(key).or_default().add(
                    &c.input,
                    event.time_ms,
                    (seq, 0),
                    &event.id,
                );
            }
        }
    }

    fn flush(&mut self, tx: &Transaction<'_>) -> Result<()> {
        let mut up = tx.prepare_cached(UPSERT_ROLLUP).step("update the rollup")?;
        let mut quarters = std::collections::BTreeSet::new();
        let mut uniq = tx
            .prepare_cached("INSERT INTO rollup_uniq (meter, subject, minute, groups, value) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING")
            .step("update the rollup")?;
        for ((meter, subject, minute, groups), s) in self.states.drain() {
            upsert_state(&mut up, meter, &subject, minute, &groups, &s)?;
            for v in &s.uniques {
                uniq.execute(params![meter, subject, minute, groups, v])
                    .step("update the rollup")?;
            }
            quarters.insert((meter, minute - minute.rem_euclid(15)));
        }
        let mut dirty = tx
            .prepare_cached(
                "INSERT INTO rollup_dirty (meter, minute) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            )
            .step("mark quarter hours")?;
        for (meter, quarter) in quarters {
            dirty
                .execute(params![meter, quarter])
                .step("mark quarter hours")?;
        }
        let mut err = tx
            .prepare_cached("INSERT INTO meter_errors (seq, meter, message) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING")
            .step("record validation errors")?;
        for (seq, meter, message) in self.errors.drain(..) {
            err.execute(params![seq, meter, message])
                .step("record validation errors")?;
        }
        Ok(())
    }
}

/// The state in columns `first..first + 7` of a rollup row: cnt, sum, vmin, vmax,
/// latest_time, latest_seq, latest_value.
fn state_at(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<State> {
    let latest = match row.get::<_, Option<i64>>(first + 4)? {
        Some(time_ms) => Some(Latest {
            time_ms,
            seq: (row.get(first + 5)?, 0),
            id: String::new(),
            value: row.get(first + 6)?,
        }),
        None => None,
    };
    Ok(State {
        count: row.get::<_, i64>(first)? as u64,
        sum: row.get(first + 1)?,
        min: row
            .get::<_, Option<f64>>(first + 2)?
            .unwrap_or(f64::INFINITY),
        max: row
            .get::<_, Option<f64>>(first + 3)?
            .unwrap_or(f64::NEG_INFINITY),
        latest,
        uniques: Default::default(),
    })
}

/// Recomputes up to `max` dirty quarter hours that ended by `now_min` from their
/// minutes, in one transaction; returns how many.
fn compact(conn: &mut Connection, max: usize, now_min: i64) -> Result<usize> {
    let tx = conn.transaction().step("begin a compaction")?;
    let quarters: Vec<(i64, i64)> = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT meter, minute FROM rollup_dirty WHERE minute + 15 <= ?1 LIMIT ?2",
            )
            .step("list dirty quarter hours")?;
        stmt.query_map(params![now_min, max as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .step("list dirty quarter hours")?
            .collect::<rusqlite::Result<_>>()
            .step("list dirty quarter hours")?
    };
    {
        let mut read = tx
            .prepare_cached("SELECT subject, groups, cnt, sum, vmin, vmax, latest_time, latest_seq, latest_value FROM rollup WHERE meter = ?1 AND minute >= ?2 AND minute < ?2 + 15")
            .step("compact a quarter hour")?;
        let mut clear = tx
            .prepare_cached("DELETE FROM rollup_q WHERE meter = ?1 AND minute = ?2")
            .step("compact a quarter hour")?;
        let mut up = tx
            .prepare_cached(&UPSERT_ROLLUP.replacen("INTO rollup ", "INTO rollup_q ", 1))
            .step("compact a quarter hour")?;
        let mut done = tx
            .prepare_cached("DELETE FROM rollup_dirty WHERE meter = ?1 AND minute = ?2")
            .step("compact a quarter hour")?;
        for &(meter, quarter) in &quarters {
            let mut states: HashMap<(String, String), State> = HashMap::new();
            let mut rows = read
                .query(params![meter, quarter])
                .step("compact a quarter hour")?;
            while let Some(row) = rows.next().step("compact a quarter hour")? {
                let key = (
                    row.get(0).step("compact a quarter hour")?,
                    row.get(1).step("compact a quarter hour")?,
                );
                let state = state_at(row, 2).step("compact a quarter hour")?;
                states.entry(key).or_default().merge(&state);
            }
            clear
                .execute(params![meter, quarter])
                .step("compact a quarter hour")?;
            for ((subject, groups), state) in &states {
                upsert_state(&mut up, meter, subject, quarter, groups, state)?;
            }
            done.execute(params![meter, quarter])
                .step("compact a quarter hour")?;
        }
    }
    tx.commit().step("commit a compaction")?;
    Ok(quarters.len())
}

/// Adds `s` to the row of (meter, subject, minute, groups) of a rollup tier.
fn upsert_state(
    stmt: &mut rusqlite::CachedStatement<'_>,
    meter: i64,
    subject: &str,
    minute: i64,
    groups: &str,
    s: &State,
) -> Result<()> {
    let finite = |f: f64| f.is_finite().then_some(f);
    stmt.execute(params![
        meter,
        subject,
        minute,
        groups,
        s.count as i64,
        s.sum,
        finite(s.min),
        finite(s.max),
        s.latest.as_ref().map(|l| l.time_ms),
        s.latest.as_ref().map(|l| l.seq.0),
        s.latest.as_ref().map(|l| l.value),
    ])
    .step("update the rollup")?;
    Ok(())
}

/// One queued ingest request.
type Job = (
    String,
    Vec<UsageEvent>,
    oneshot::Sender<Result<IngestOutcome>>,
);

/// Meters by namespace, then event type.
type MeterIndex = HashMap<String, HashMap<String, Vec<(i64, Arc<CompiledMeter>)>>>;

struct Writer {
    conn: Connection,
    meters: MeterIndex,
    max_events: usize,
    last_compaction: Instant,
}

/// How long the writer waits for work before compacting quarter hours.
const COMPACT_IDLE: Duration = Duration::from_millis(200);
/// Quarter hours one idle compaction transaction recomputes: one, so queued work waits
/// at most one quarter's recompute.
const COMPACT_CHUNK: usize = 1;

impl Writer {
    /// Recomputes up to `max` ended dirty quarter hours; a failure is logged (the
    /// quarters stay dirty and queries read their minutes).
    fn compact(&mut self, max: usize) -> usize {
        self.last_compaction = Instant::now();
        let now_min = Utc::now().timestamp().div_euclid(60);
        match compact(&mut self.conn, max, now_min) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "Failed to compact quarter hours; queries read their minutes");
                0
            }
        }
    }

    fn run(&mut self, rx: Receiver<Op>) {
        let mut next = None;
        // Idle: compact dirty quarter hours in chunks until none is left, then wait.
        let mut wait = COMPACT_IDLE;
        loop {
            let op = match next.take() {
                Some(op) => op,
                None => match rx.recv_timeout(wait) {
                    Ok(op) => op,
                    Err(RecvTimeoutError::Timeout) => {
                        wait = match self.compact(COMPACT_CHUNK) {
                            // (the current quarter hour ends within 15 minutes)
                            0 => Duration::from_secs(30),
                            _ => Duration::ZERO,
                        };
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                },
            };
            wait = COMPACT_IDLE;
            match op {
                Op::Ingest {
                    namespace,
                    events,
                    reply,
                } => {
                    let mut batch = vec![(namespace, events, reply)];
                    let mut n = batch[0].1.len();
                    while n < self.max_events {
                        match rx.try_recv() {
                            Ok(Op::Ingest {
                                namespace,
                                events,
                                reply,
                            }) => {
                                n += events.len();
                                batch.push((namespace, events, reply));
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.ingest(batch);
                    // Under steady load: one quarter hour a second.
                    if self.last_compaction.elapsed() >= Duration::from_secs(1) {
                        self.compact(1);
                    }
                }
                Op::Sync { meters, reply } => {
                    let _ = reply.send(self.sync(meters));
                }
                Op::Drop { ids, reply } => {
                    let _ = reply.send(self.drop_rollups(&ids));
                }
            }
        }
    }

    fn ingest(&mut self, batch: Vec<Job>) {
        let result = self.ingest_tx(&batch);
        if let Err(e) = &result {
            tracing::error!(error = %error_chain(e), requests = batch.len(), "Failed to store a batch; every request in it is answered with an error");
        }
        for (i, (_, _, reply)) in batch.into_iter().enumerate() {
            let _ = reply.send(match &result {
                Ok(outcomes) => Ok(outcomes[i]),
                Err(e) => Err(Error::WriteFailed(error_chain(e))),
            });
        }
    }

    fn ingest_tx(&mut self, batch: &[Job]) -> Result<Vec<IngestOutcome>> {
        let now = Utc::now().timestamp_millis();
        let tx = self.conn.transaction().step("begin a write")?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut acc = Accumulator::default();
        {
            let mut insert = tx.prepare_cached(INSERT_EVENT).step("insert events")?;
            let mut json = Vec::with_capacity(1024);
            for (namespace, events, _) in batch {
                let mut outcome = IngestOutcome::default();
                let by_type = self.meters.get(namespace);
                for ev in events {
                    json.clear();
                    serde_json::to_writer(&mut json, &ev.to_cloud_event()).unwrap_or_default();
                    let text = std::str::from_utf8(&json).unwrap_or_default();
                    let inserted = insert
                        .execute(params![
                            namespace, ev.source, ev.id, ev.ty, ev.subject, ev.time_ms, now, text
                        ])
                        .step("insert events")?;
                    if inserted == 0 {
                        outcome.deduplicated += 1;
                        continue;
                    }
                    outcome.stored += 1;
                    let seq = tx.last_insert_rowid();
                    if let Some(meters) = by_type.and_then(|t| t.get(&ev.ty)) {
                        for (id, meter) in meters {
                            acc.add(*id, meter, ev, seq);
                        }
                    }
                }
                outcomes.push(outcome);
            }
        }
        acc.flush(&tx)?;
        tx.commit().step("commit events")?;
        Ok(outcomes)
    }

    fn sync(&mut self, meters: Vec<Arc<CompiledMeter>>) -> Result<Synced> {
        let tx = self.conn.transaction().step("begin a meter sync")?;
        let mut stored = Vec::with_capacity(meters.len());
        for meter in &meters {
            let def = meter.rollup_definition();
            let existing: Option<i64> = tx
                .query_row(
                    "SELECT id FROM meters WHERE namespace = ?1 AND slug = ?2 AND definition = ?3",
                    params![meter.namespace, meter.slug, def],
                    |r| r.get(0),
                )
                .optional()
                .step("look up a meter")?;
            let id = match existing {
                Some(id) => id,
                None => {
                    tx.execute(
                        "INSERT INTO meters (namespace, slug, definition) VALUES (?1, ?2, ?3)",
                        params![meter.namespace, meter.slug, def],
                    )
                    .step("register a meter")?;
                    let id = tx.last_insert_rowid();
                    backfill(&tx, id, meter)?;
                    tracing::info!(namespace = %meter.namespace, slug = %meter.slug, rollup = id, "Backfilled meter from raw events");
                    id
                }
            };
            stored.push(StoredMeter {
                meter: meter.clone(),
                rollup_id: id,
            });
        }
        let keep: std::collections::HashSet<i64> = stored.iter().map(|m| m.rollup_id).collect();
        let mut all = tx.prepare("SELECT id FROM meters").step("list meters")?;
        let stale = all
            .query_map([], |r| r.get::<_, i64>(0))
            .step("list meters")?
            .collect::<rusqlite::Result<Vec<i64>>>()
            .step("list meters")?
            .into_iter()
            .filter(|id| !keep.contains(id))
            .collect();
        drop(all);
        tx.commit().step("commit a meter sync")?;
        let mut index: MeterIndex = HashMap::new();
        for m in &stored {
            index
                .entry(m.meter.namespace.clone())
                .or_default()
                .entry(m.meter.spec.event_type.clone())
                .or_default()
                .push((m.rollup_id, m.meter.clone()));
        }
        self.meters = index;
        Ok(Synced {
            meters: stored,
            stale,
        })
    }

    fn drop_rollups(&mut self, ids: &[i64]) -> Result<()> {
        let tx = self.conn.transaction().step("begin dropping rollups")?;
        for id in ids {
            for sql in [
                "DELETE FROM rollup WHERE meter = ?1",
                "DELETE FROM rollup_q WHERE meter = ?1",
                "DELETE FROM rollup_dirty WHERE meter = ?1",
                "DELETE FROM rollup_uniq WHERE meter = ?1",
                "DELETE FROM meter_errors WHERE meter = ?1",
                "DELETE FROM meters WHERE id = ?1",
            ] {
                tx.execute(sql, [id]).step("drop a rollup")?;
            }
        }
        tx.commit().step("commit dropping rollups")
    }
}

/// Aggregates every stored event of the meter's namespace and type into its rollup.
fn backfill(tx: &Transaction<'_>, id: i64, meter: &CompiledMeter) -> Result<()> {
    let mut stmt = tx
        .prepare("SELECT seq, event FROM events WHERE namespace = ?1 AND type = ?2 ORDER BY seq")
        .step("read events to backfill")?;
    let mut rows = stmt
        .query(params![meter.namespace, meter.spec.event_type])
        .step("read events to backfill")?;
    let mut acc = Accumulator::default();
    let mut n = 0usize;
    while let Some(row) = rows.next().step("read events to backfill")? {
        let seq: i64 = row.get(0).step("read events to backfill")?;
        let json: String = row.get(1).step("read events to backfill")?;
        if let Some(event) = decode_event(&json) {
            acc.add(id, meter, &event, seq);
        }
        n += 1;
        if n.is_multiple_of(100_000) {
            acc.flush(tx)?;
        }
    }
    acc.flush(tx)
}

/// Attaches the failed step to a rusqlite error.
trait SqliteStep<T> {
    fn step(self, step: &'static str) -> Result<T>;
}

impl<T> SqliteStep<T> for rusqlite::Result<T> {
    fn step(self, step: &'static str) -> Result<T> {
        self.map_err(|source| Error::Sqlite {
            step,
            source: Box::new(source),
        })
    }
}
