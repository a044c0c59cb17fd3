//! ClickHouse (18.16 subset): the raw event table, the flattened `data` columns every
//! meter's view reads, per-meter minute rollups, provisioning with exact backfill, and
//! the store the query API uses.
//!
//! # Tables (one database per installation; tests use one per test)
//! - `events`: every stored event once (the sink deduplicates before inserting).
//!   MergeTree partitioned by month of event time, ordered by (namespace, type, subject,
//!   time) so queries and edge reads are range scans. `time` is a DateTime and `time_ms`
//!   keeps the milliseconds. `inserted_at` is ClickHouse's own clock (`now()`) read when
//!   the sink began the batch, the one clock that decides a meter's backfill cutover (see
//!   [`provision`]). `kafka_partition`/`kafka_offset` say where the row came from. `data`
//!   is kept verbatim and also **flattened** ([`Flat`]) into parallel arrays keyed by
//!   canonical singular paths, so a view can evaluate any meter's value, group-bys and
//!   filters exactly, also for meters created after the events.
//! - `events_feed`: a `Null` table with the same columns, which each meter's
//!   materialized view reads. A sink of the previous release inserted every batch into
//!   it; this one computes the meters' rollup rows itself ([`fold`], one pass over the
//!   batch for all meters) and leaves it alone, so the views matter only while such a
//!   sink still runs during an upgrade ([`provision`]).
//! - `event_ids`: (hash, namespace, source, id) of every stored event, ordered by hash and
//!   partitioned by month of insertion: the sink's dedup lookup beyond its memory budget.
//! - `dead_letters`: messages that cannot be stored, with the reason (ReplacingMergeTree
//!   on partition/offset, so a re-processed batch does not list them twice).
//! - `sink_log`: the sink's begin/done record per Kafka partition and batch.
//! - `meters`: the provisioned rollups (definition, cutover, backfill state).
//! - `rollup_<hash>`: per meter definition, an AggregatingMergeTree of one-minute windows
//!   keyed by (subject, group-by values, minute, origin) with the states the meter's
//!   aggregation needs ([`rollup`]); and `rollup_<hash>_q`, the same at fifteen minutes
//!   (every modern zone offset is a multiple of 15 minutes, so whole quarters of any
//!   window come from it), both fed by the sink ([`fold`]).
pub mod args;
pub mod cluster;
pub mod fold;
pub mod provision;
pub mod rollup;
pub mod sink;
pub mod store;
pub mod watermarks;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use tally_meter::store::DeadLetter;
use tally_meter::{Error, Result};

/// Where ClickHouse is.
#[derive(Clone, Debug)]
pub struct ChConfig {
    /// HTTP URL, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    /// Database of this installation.
    pub database: String,
    /// User (empty = `default`).
    pub user: String,
    /// Password.
    pub password: String,
    /// The cluster (`remote_servers` name) tally's tables are spread over, replicated
    /// and sharded; `None`: one server.
    pub cluster: Option<String>,
    /// On a cluster: every replica's HTTP URL, shard by shard in `system.clusters`
    /// order (empty: derived from it, see [`cluster::Topology::discover`]).
    pub replica_urls: Vec<String>,
}

/// A ClickHouse connection bound to tally's database.
#[derive(Clone)]
pub struct Ch {
    client: clickhouse::Client,
    database: String,
    url: String,
    cluster: Option<String>,
    replica_urls: Vec<String>,
}

impl std::fmt::Debug for Ch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ch")
            .field("url", &self.url)
            .field("database", &self.database)
            .finish()
    }
}

/// A ClickHouse string literal.
pub fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Whether `s` is a safe unquoted database name.
pub fn is_database_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

impl Ch {
    /// A client for `config` (no request is made).
    pub fn new(config: &ChConfig) -> Result<Ch> {
        if !is_database_name(&config.database) {
            return Err(Error::Unavailable(format!(
                "ClickHouse database {:?} must be letters, digits and '_' (not starting with a digit)",
                config.database
            )));
        }
        let mut client = clickhouse::Client::default()
            .with_url(&config.url)
            .with_validation(false)
            .with_setting("max_query_size", "67108864");
        if !config.user.is_empty() {
            client = client.with_user(&config.user);
        }
        if !config.password.is_empty() {
            client = client.with_password(&config.password);
        }
        if let Some(c) = &config.cluster
            && !is_database_name(c)
        {
            return Err(Error::Unavailable(format!(
                "ClickHouse cluster {c:?} must be letters, digits and '_' (a <remote_servers> name)"
            )));
        }
        if config.cluster.is_some() {
            client = cluster::replicated_settings(client);
        }
        Ok(Ch {
            client,
            database: config.database.clone(),
            url: config.url.clone(),
            cluster: config.cluster.clone(),
            replica_urls: config.replica_urls.clone(),
        })
    }

    /// The database name.
    pub fn db(&self) -> &str {
        &self.database
    }

    /// The URL (for messages).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying client.
    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Wraps a client error with what was being done.
    pub fn err(&self, step: impl Into<String>) -> impl FnOnce(clickhouse::error::Error) -> Error {
        let step = format!("{} (ClickHouse at {})", step.into(), self.url);
        move |source| Error::ClickHouse {
            step,
            source: Box::new(source),
        }
    }

    /// Runs a statement.
    pub async fn exec(&self, step: &str, sql: &str) -> Result<()> {
        self.client
            .query(sql)
            .execute()
            .await
            .map_err(self.err(step))
    }

    /// Runs an aggregation over many rows (backfill, repair): GROUP BY state that
    /// outgrows 1 GiB spills to disk instead of failing the query.
    pub async fn exec_aggregation(&self, step: &str, sql: &str) -> Result<()> {
        self.client
            .query(sql)
            .with_setting("max_bytes_before_external_group_by", "1000000000")
            .with_setting("max_execution_time", "0")
            .execute()
            .await
            .map_err(self.err(step))
    }

    /// Fetches rows.
    pub async fn fetch<T>(&self, step: &str, sql: &str) -> Result<Vec<T>>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.client
            .query(sql)
            .fetch_all::<T>()
            .await
            .map_err(self.err(step))
    }

    /// The newest event time (Unix seconds) of each `(namespace, source)` among the
    /// events of the last `days` days; pairs without events there are absent. The
    /// time bound keeps the read to the newest partitions.
    pub async fn newest_event_times(
        &self,
        pairs: &[(String, String)],
        days: u32,
    ) -> Result<Vec<((String, String), i64)>> {
        #[derive(Deserialize, clickhouse::Row)]
        struct Newest {
            namespace: String,
            source: String,
            t: u32,
        }
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let list = |f: fn(&(String, String)) -> &String| {
            let mut v: Vec<String> = pairs.iter().map(|p| lit(f(p))).collect();
            v.sort();
            v.dedup();
            v.join(", ")
        };
        let sql = format!(
            "SELECT namespace, source, toUInt32(max(time)) AS t FROM {} \
             WHERE time >= now() - INTERVAL {days} DAY AND namespace IN ({}) AND source IN ({}) \
             GROUP BY namespace, source",
            self.read("events"),
            list(|p| &p.0),
            list(|p| &p.1)
        );
        let rows: Vec<Newest> = self.fetch("read the newest event times", &sql).await?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.namespace, r.source), r.t as i64))
            .filter(|(k, _)| pairs.contains(k))
            .collect())
    }

    /// ClickHouse's clock, in seconds.
    pub async fn now(&self) -> Result<i64> {
        let v: Vec<u32> = self
            .fetch("read the clock", "SELECT toUInt32(now())")
            .await?;
        Ok(v.first().copied().unwrap_or_default() as i64)
    }

    /// The server's version, as `SELECT version()` answers (e.g. `26.9.2.1`).
    pub async fn server_version(&self) -> Result<String> {
        let v: Vec<String> = self
            .fetch("read the server version", "SELECT version()")
            .await?;
        Ok(v.into_iter().next().unwrap_or_default())
    }

    /// Inserts rows into `table` of tally's database.
    pub async fn insert<T>(&self, table: &str, rows: &[T::Value<'_>]) -> Result<()>
    where
        T: clickhouse::Row + clickhouse::RowWrite,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let step = format!("insert into {}.{table}", self.database);
        let name = format!("{}.{table}", self.database);
        let mut ins = self
            .client
            .insert_unescaped::<T>(&name)
            .await
            .map_err(self.err(&step))?;
        for r in rows {
            ins.write(r).await.map_err(self.err(&step))?;
        }
        ins.end().await.map_err(self.err(&step))
    }

    /// Inserts ready `RowBinary` rows of `columns` into `table` of tally's database (the
    /// rollup states of [`fold`], which the `clickhouse` crate cannot encode).
    pub async fn insert_row_binary(&self, table: &str, columns: &str, body: &[u8]) -> Result<()> {
        if body.is_empty() {
            return Ok(());
        }
        let step = format!("insert into {}.{table}", self.database);
        let mut ins = self
            .client
            .insert_formatted_with(format!(
                "INSERT INTO {}.{table} ({columns}) FORMAT RowBinary",
                self.database
            ))
            .buffered_with_capacity(body.len().min(1 << 20));
        ins.write_buffered(body);
        ins.end().await.map_err(self.err(&step))
    }

    /// Creates the database and the shared tables if missing. Idempotent. On a cluster
    /// the DDL runs `ON CLUSTER` (it waits for every server), so it is skipped when
    /// everything exists already.
    pub async fn ensure_schema(&self) -> Result<()> {
        let db = &self.database;
        let on = self.on_cluster();
        let mut tables = vec![
            "events",
            "events_feed",
            "event_ids",
            "dead_letters",
            "sink_log",
            "meters",
            "portal_tokens",
            "budget_crossings",
            "watermarks",
            "watermark_gaps",
        ];
        if self.cluster.is_some() {
            tables.extend([
                "partition_shards",
                "events_all",
                "dead_letters_all",
                "sink_log_all",
                "watermarks_all",
                "watermark_gaps_all",
            ]);
            if self.all_exist(&tables).await? && self.id_positions_exist().await? {
                return Ok(());
            }
        }
        self.exec(
            "create the database",
            &format!("CREATE DATABASE IF NOT EXISTS {db}{on}"),
        )
        .await?;
        let events = format!(
            "({EVENT_COLUMNS}) ENGINE = {} PARTITION BY toYYYYMM(time) ORDER BY (namespace, type, subject, time)",
            self.engine("events", "MergeTree", "")
        );
        let feed = format!("({EVENT_COLUMNS}) ENGINE = Null");
        let event_ids = format!(
            "(h UInt64, namespace String, source String, id String, ingested DateTime('UTC'), \
             {ID_POSITION_COLUMNS}) \
             ENGINE = {} PARTITION BY toYYYYMM(ingested) ORDER BY h",
            self.engine("event_ids", "MergeTree", "")
        );
        let dead_letters = format!(
            "(kafka_partition Int32, kafka_offset Int64, namespace String, reason String, \
             payload String, at DateTime('UTC')) \
             ENGINE = {} ORDER BY (kafka_partition, kafka_offset)",
            self.engine("dead_letters", "ReplacingMergeTree", "")
        );
        let sink_log = format!(
            "(topic String, kafka_partition Int32, batch UInt64, phase String, rank UInt8, \
             start_offset Int64, end_offset Int64, inserted_at DateTime('UTC'), logged_ms Int64) \
             ENGINE = {} ORDER BY (topic, kafka_partition, start_offset, rank)",
            self.engine("sink_log", "MergeTree", "")
        );
        let meters = format!(
            "(rollup String, namespace String, name String, slug String, definition String, \
             cutover DateTime('UTC'), backfilled UInt8, dropped UInt8, version UInt64) \
             ENGINE = {} ORDER BY rollup",
            self.shared_engine("meters", "ReplacingMergeTree", "version")
        );
        // one copy on every server, like `meters`: a token invalidated through any
        // server is refused by all of them
        let portal_tokens = format!(
            "(namespace String, id String, subject String, meters Array(String), \
             expires_ms Int64, created_ms Int64, invalidated_ms Int64, version UInt64) \
             ENGINE = {} ORDER BY (namespace, id)",
            self.shared_engine("portal_tokens", "ReplacingMergeTree", "version")
        );
        // the budget evaluator's records (one evaluator: the operator's leader)
        let budget_crossings = format!(
            "(id String, namespace String, budget String, subject String, period_start_ms Int64, \
             threshold String, seq UInt32, usage Float64, crossed_ms Int64, body String, \
             delivered_ms Int64, attempts UInt32, failed UInt8, rearmed UInt8, version UInt64) \
             ENGINE = {} ORDER BY (namespace, budget, period_start_ms, id)",
            self.shared_engine("budget_crossings", "ReplacingMergeTree", "version")
        );
        // completeness: per shard, like the events they vouch for
        let watermarks = format!(
            "{} ENGINE = {} ORDER BY (namespace, collector, node, kafka_partition)",
            watermarks::WATERMARKS,
            self.engine("watermarks", "ReplacingMergeTree", "until_ms")
        );
        let watermark_gaps = format!(
            "{} ENGINE = {} ORDER BY (namespace, collector, node, from_ms, to_ms)",
            watermarks::GAPS,
            self.engine("watermark_gaps", "ReplacingMergeTree", "")
        );
        let mut ddl = vec![
            ("events", events),
            ("events_feed", feed),
            ("event_ids", event_ids),
            ("dead_letters", dead_letters),
            ("sink_log", sink_log),
            ("meters", meters),
            ("portal_tokens", portal_tokens),
            ("budget_crossings", budget_crossings),
            ("watermarks", watermarks),
            ("watermark_gaps", watermark_gaps),
        ];
        if self.cluster.is_some() {
            ddl.push((
                "partition_shards",
                format!(
                    "(topic String, kafka_partition Int32, shard UInt32, version UInt64) \
                     ENGINE = {} ORDER BY (topic, kafka_partition)",
                    self.shared_engine("partition_shards", "ReplacingMergeTree", "version")
                ),
            ));
        }
        for (name, ddl) in ddl {
            self.exec(
                &format!("create table {name}"),
                &format!("CREATE TABLE IF NOT EXISTS {db}.{name}{on} {ddl}"),
            )
            .await?;
        }
        self.add_id_positions().await?;
        for name in [
            "events",
            "dead_letters",
            "sink_log",
            "watermarks",
            "watermark_gaps",
        ] {
            self.create_distributed(name).await?;
        }
        Ok(())
    }
}

/// Where each identity of `event_ids` was read from Kafka, so a repair tells the
/// identities its own batch stored (inserted beside the batch's events, not after them)
/// from earlier ones. Rows of a release before these columns read -1: never a batch's.
const ID_POSITION_COLUMNS: &str = "kafka_partition Int32 DEFAULT -1, kafka_offset Int64 DEFAULT -1";

impl Ch {
    /// Whether `event_ids` has the position columns ([`ID_POSITION_COLUMNS`]).
    async fn id_positions_exist(&self) -> Result<bool> {
        let n: Vec<u64> = self
            .fetch(
                "read event_ids' columns",
                &format!(
                    "SELECT count() FROM system.columns WHERE database = {} AND table = 'event_ids' \
                     AND name IN ('kafka_partition', 'kafka_offset')",
                    lit(&self.database)
                ),
            )
            .await?;
        Ok(n.first().copied().unwrap_or_default() == 2)
    }

    /// Upgrades an `event_ids` made by a release before the position columns: adds them
    /// (a change of metadata only; the existing rows read the default).
    async fn add_id_positions(&self) -> Result<()> {
        if self.id_positions_exist().await? {
            return Ok(());
        }
        tracing::info!(database = %self.database, "Adding the Kafka position columns to event_ids");
        let add = ID_POSITION_COLUMNS
            .split(", ")
            .map(|c| format!("ADD COLUMN {c}"))
            .collect::<Vec<_>>()
            .join(", ");
        self.exec(
            "add the position columns to event_ids",
            &format!(
                "ALTER TABLE {}.event_ids{} {add}",
                self.database,
                self.on_cluster()
            ),
        )
        .await
    }
}

/// A Kafka failure as the store reports it (a full producer queue is the store's
/// overload: the API answers 503 with Retry-After either way).
pub fn kafka_error(e: tally_kafka::Error) -> Error {
    match e {
        tally_kafka::Error::Overloaded => Error::Overloaded,
        tally_kafka::Error::Unavailable(why) => Error::Unavailable(why),
    }
}

/// One row of `dead_letters`: a [`DeadLetter`] as ClickHouse stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct DeadLetterRow {
    /// Kafka partition.
    pub kafka_partition: i32,
    /// Kafka offset.
    pub kafka_offset: i64,
    /// Namespace ('' when the envelope named no valid one).
    pub namespace: String,
    /// What is wrong.
    pub reason: String,
    /// The payload as received.
    pub payload: String,
    /// When it was dead-lettered (Unix seconds).
    pub at: u32,
}

impl From<&DeadLetter> for DeadLetterRow {
    fn from(d: &DeadLetter) -> DeadLetterRow {
        DeadLetterRow {
            kafka_partition: d.kafka_partition,
            kafka_offset: d.kafka_offset,
            namespace: d.namespace.clone(),
            reason: d.reason.clone(),
            payload: d.payload.clone(),
            at: d.at,
        }
    }
}

impl From<DeadLetterRow> for DeadLetter {
    fn from(r: DeadLetterRow) -> DeadLetter {
        DeadLetter {
            kafka_partition: r.kafka_partition,
            kafka_offset: r.kafka_offset,
            namespace: r.namespace,
            reason: r.reason,
            payload: r.payload,
            at: r.at,
        }
    }
}

/// Columns of `events` and `events_feed`, in [`EventRow`] order.
pub const EVENT_COLUMNS: &str = "namespace String, type String, subject String, \
    time DateTime('UTC'), time_ms Int64, source String, id String, ingested_ms Int64, \
    inserted_at DateTime('UTC'), kafka_partition Int32, kafka_offset Int64, \
    datacontenttype String, dataschema String, extensions String, data String, \
    data_paths Array(String), data_kinds Array(UInt8), data_strs Array(String), \
    data_nums Array(Float64), data_num_ok Array(UInt8)";

/// One row of `events` / `events_feed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct EventRow {
    /// Tenant.
    pub namespace: String,
    /// CloudEvent `type`.
    #[serde(rename = "type")]
    pub ty: String,
    /// Subject.
    pub subject: String,
    /// Event time, seconds.
    pub time: u32,
    /// Event time, ms.
    pub time_ms: i64,
    /// CloudEvent `source`.
    pub source: String,
    /// CloudEvent `id`.
    pub id: String,
    /// When the producer accepted it (ms).
    pub ingested_ms: i64,
    /// ClickHouse clock at the start of the sink's batch (s).
    pub inserted_at: u32,
    /// Kafka partition.
    pub kafka_partition: i32,
    /// Kafka offset.
    pub kafka_offset: i64,
    /// CloudEvent `datacontenttype` ('' when absent).
    pub datacontenttype: String,
    /// CloudEvent `dataschema` ('' when absent).
    pub dataschema: String,
    /// Extension attributes as a JSON object.
    pub extensions: String,
    /// `data` as compact JSON ('' when absent).
    pub data: String,
    /// Flattened `data`: canonical path keys.
    pub data_paths: Vec<String>,
    /// Flattened `data`: [`Kind`] per path.
    pub data_kinds: Vec<u8>,
    /// Flattened `data`: canonical string of scalars ('' otherwise).
    pub data_strs: Vec<String>,
    /// Flattened `data`: the number (numbers and numeric strings), array length for arrays.
    pub data_nums: Vec<f64>,
    /// Flattened `data`: 1 when `data_nums` holds a finite number the engine accepts.
    pub data_num_ok: Vec<u8>,
}

impl EventRow {
    /// The row of a validated event.
    pub fn new(
        namespace: &str,
        e: &tally_crds::UsageEvent,
        ingested_ms: i64,
        inserted_at: i64,
        partition: i32,
        offset: i64,
    ) -> EventRow {
        let flat = e.data.as_ref().map(Flat::of).unwrap_or_default();
        EventRow {
            namespace: namespace.to_string(),
            ty: e.ty.clone(),
            subject: e.subject.clone(),
            time: e.time_ms.div_euclid(1000).clamp(0, u32::MAX as i64) as u32,
            time_ms: e.time_ms,
            source: e.source.clone(),
            id: e.id.clone(),
            ingested_ms,
            inserted_at: inserted_at.clamp(0, u32::MAX as i64) as u32,
            kafka_partition: partition,
            kafka_offset: offset,
            datacontenttype: e.datacontenttype.clone().unwrap_or_default(),
            dataschema: e.dataschema.clone().unwrap_or_default(),
            extensions: serde_json::to_string(&e.extensions).unwrap_or_default(),
            data: e
                .data
                .as_ref()
                .map(|d| serde_json::to_string(d).unwrap_or_default())
                .unwrap_or_default(),
            data_paths: flat.paths,
            data_kinds: flat.kinds,
            data_strs: flat.strs,
            data_nums: flat.nums,
            data_num_ok: flat.num_ok,
        }
    }

    /// The event back (for edge reads and the events API).
    pub fn to_event(&self) -> tally_crds::UsageEvent {
        let none_if_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        tally_crds::UsageEvent {
            id: self.id.clone(),
            source: self.source.clone(),
            ty: self.ty.clone(),
            subject: self.subject.clone(),
            time_ms: self.time_ms,
            datacontenttype: none_if_empty(&self.datacontenttype),
            dataschema: none_if_empty(&self.dataschema),
            data: serde_json::from_str(&self.data).ok(),
            extensions: serde_json::from_str(&self.extensions).unwrap_or_default(),
        }
    }
}

/// What a flattened node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// JSON null (a missing path has no entry; SQL treats both as kind 0).
    Null = 0,
    /// A string.
    String = 1,
    /// A number.
    Number = 2,
    /// A boolean.
    Bool = 3,
    /// An object.
    Object = 4,
    /// An array.
    Array = 5,
}

/// `data` flattened: one entry per node (objects and arrays too, so a meter can tell an
/// object from a missing value), keyed by the canonical path key of
/// [`tally_meter::engine::path::Segment::key`] (`$['usage']['input']`, `$['items'][0]`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flat {
    /// Path keys.
    pub paths: Vec<String>,
    /// [`Kind`] per path.
    pub kinds: Vec<u8>,
    /// Canonical string of a scalar, '' otherwise.
    pub strs: Vec<String>,
    /// Number value (or array length), 0 otherwise.
    pub nums: Vec<f64>,
    /// 1 when the node is a number the engine accepts (finite JSON number or numeric string).
    pub num_ok: Vec<u8>,
}

impl Flat {
    /// Flattens an event's `data`.
    pub fn of(data: &serde_json::Map<String, Value>) -> Flat {
        let mut flat = Flat::default();
        let mut key = String::from("$");
        for (k, v) in data {
            flat.walk(
                &mut key,
                &tally_meter::engine::path::Segment::Name(k.clone()),
                v,
            );
        }
        flat
    }

    fn walk(&mut self, key: &mut String, seg: &tally_meter::engine::path::Segment, v: &Value) {
        use tally_meter::engine::path::Segment;
        let len = key.len();
        key.push_str(&seg.key());
        let (kind, s, n, ok) = match v {
            Value::Null => (Kind::Null, String::new(), 0.0, false),
            Value::Bool(b) => (Kind::Bool, b.to_string(), 0.0, false),
            Value::Number(num) => {
                let f = num.as_f64().filter(|f| f.is_finite());
                (
                    Kind::Number,
                    tally_crds::canonical_number(num),
                    f.unwrap_or(0.0),
                    f.is_some(),
                )
            }
            Value::String(text) => {
                let f = text.trim().parse::<f64>().ok().filter(|f| f.is_finite());
                (Kind::String, text.clone(), f.unwrap_or(0.0), f.is_some())
            }
            Value::Object(_) => (Kind::Object, String::new(), 0.0, false),
            Value::Array(a) => (Kind::Array, String::new(), a.len() as f64, false),
        };
        self.paths.push(key.clone());
        self.kinds.push(kind as u8);
        self.strs.push(s);
        self.nums.push(n);
        self.num_ok.push(u8::from(ok));
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    self.walk(key, &Segment::Name(k.clone()), child);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    self.walk(key, &Segment::Index(i as i64), child);
                }
            }
            _ => {}
        }
        key.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flattening_keys_every_node_by_canonical_path() {
        let data = serde_json::json!({"a": {"b": [1.0, "2.5", true]}, "it's": null, "n": "x"});
        let flat = Flat::of(data.as_object().unwrap());
        let at = |k: &str| flat.paths.iter().position(|p| p == k).unwrap();
        let i = at("$['a']['b'][0]");
        assert_eq!(
            (
                flat.kinds[i],
                flat.strs[i].as_str(),
                flat.nums[i],
                flat.num_ok[i]
            ),
            (Kind::Number as u8, "1", 1.0, 1)
        );
        let i = at("$['a']['b'][1]");
        assert_eq!((flat.kinds[i], flat.num_ok[i], flat.nums[i]), (1, 1, 2.5));
        let i = at("$['a']['b'][2]");
        assert_eq!((flat.strs[i].as_str(), flat.num_ok[i]), ("true", 0));
        let i = at("$['a']['b']");
        assert_eq!((flat.kinds[i], flat.nums[i]), (Kind::Array as u8, 3.0));
        assert_eq!(flat.kinds[at("$['a']")], Kind::Object as u8);
        assert_eq!(flat.kinds[at("$['it\\'s']")], Kind::Null as u8);
        // the engine's path keys agree with the flattening
        let p = tally_meter::engine::path::SingularPath::parse("$[\"a\"].b[1]").unwrap();
        let key: String = std::iter::once("$".to_string())
            .chain(p.segments().iter().map(|s| s.key()))
            .collect();
        assert_eq!(key, "$['a']['b'][1]");
    }

    #[test]
    fn literals_escape_quotes_and_backslashes() {
        assert_eq!(lit(r"a'b\c"), r"'a\'b\\c'");
        assert!(
            is_database_name("tally_t1") && !is_database_name("1x") && !is_database_name("a;b")
        );
    }
}
