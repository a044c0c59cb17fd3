//! The ClickHouse store: ingest goes to Kafka (the sink loads it), queries read
//! ClickHouse.
//!
//! A query `[from, to)` reads whole quarter hours from the meter's 15-minute rollup,
//! the remaining whole minutes from its minute rollup, and the sub-minute edges from
//! `events`, evaluated by the engine, so any precision is exact. Rollup
//! minutes are merged in ClickHouse into *buckets* that each lie inside one requested
//! window: the range is cut where the zone's UTC offset changes, and inside a piece of
//! constant offset a local hour or day is a fixed-size, fixed-phase bucket (months use
//! day buckets). The store-independent [`Combiner`] then places each bucket in its window,
//! so DST and odd offsets follow the same rules as the embedded store, and the answer
//! crosses the wire as a few rows per window instead of every minute.
use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use tally_crds::{Aggregation, UsageEvent, Watermark};
use tally_meter::completeness::Facts;
use tokio::runtime::Handle;

use super::provision::{self, CutoverConfig};
use super::rollup::{BucketRow, Grain, RollupSql};
use super::{Ch, DeadLetterRow, EventRow, kafka_error, lit};
use tally_kafka::Producer;
use tally_meter::budget::Crossing;
use tally_meter::engine::CompiledMeter;
use tally_meter::engine::state::{Latest, State};
use tally_meter::engine::window::WindowSize;
use tally_meter::query::{
    Combiner, QueryAnswer, QuerySpec, RollupRead, plan_rollup_reads, split_minutes,
};
use tally_meter::store::{
    DeadLetter, IngestOutcome, Pending, PortalTokenRecord, Store, StoredEvent, StoredMeter, Synced,
};
use tally_meter::{Error, Result};

/// Queries ClickHouse; ingests through Kafka.
#[derive(Debug)]
pub struct ClickHouseStore {
    ch: Ch,
    handle: Handle,
    producer: Option<Arc<Producer>>,
    provision: bool,
    cutover: CutoverConfig,
    meters: RwLock<Vec<Arc<CompiledMeter>>>,
}

impl ClickHouseStore {
    /// A store on `ch`. With `provision`, [`Store::sync_meters`] creates and backfills
    /// rollups; without, it serves the meters whose rollups are already provisioned
    /// and backfilled. Must be called inside a tokio runtime.
    pub fn new(
        ch: Ch,
        producer: Option<Arc<Producer>>,
        provision: bool,
        cutover: CutoverConfig,
    ) -> ClickHouseStore {
        ClickHouseStore {
            ch,
            handle: Handle::current(),
            producer,
            provision,
            cutover,
            meters: RwLock::new(Vec::new()),
        }
    }

    /// The connection.
    pub fn ch(&self) -> &Ch {
        &self.ch
    }

    fn run<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.handle.block_on(f)
    }
}

fn bucket_expr(size: Option<WindowSize>, from_s: i64, off: i64) -> String {
    let step = match size {
        None => return format!("toInt64({from_s})"),
        Some(WindowSize::Minute) => return "toInt64(toUInt32(minute))".into(),
        Some(WindowSize::Hour) => 3600,
        Some(WindowSize::Day) | Some(WindowSize::Month) => 86400,
    };
    // shifted by a whole number of steps so intDiv never sees a negative number
    let k = 1_000_000i64;
    format!(
        "(intDiv(toInt64(toUInt32(minute)) + ({off}) + {}, {step}) - {k}) * {step} - ({off})",
        k * step
    )
}

impl ClickHouseStore {
    async fn query_async(
        &self,
        sm: &StoredMeter,
        spec: &QuerySpec,
        max_rows: usize,
    ) -> Result<QueryAnswer> {
        let m = &*sm.meter;
        let ns_type = format!(
            "namespace = {} AND type = {}",
            lit(&m.namespace),
            lit(&m.spec.event_type)
        );
        let subjects = if spec.subjects.is_empty() {
            String::new()
        } else {
            format!(
                " AND subject IN ({})",
                spec.subjects
                    .iter()
                    .map(|s| lit(s))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let from_ms = match spec.from_ms {
            Some(f) => f,
            None => {
                let first: Vec<(u64, i64)> = self
                    .ch
                    .fetch(
                        "find the first event",
                        &format!(
                            "SELECT count(), min(time_ms) FROM {} WHERE {ns_type}",
                            self.ch.read("events")
                        ),
                    )
                    .await?;
                match first.first() {
                    Some((n, t)) if *n > 0 => *t,
                    _ => {
                        return Ok(QueryAnswer {
                            from_ms: None,
                            to_ms: spec.to_ms,
                            rows: Vec::new(),
                        });
                    }
                }
            }
        };
        let mut comb = Combiner::new(m, spec, from_ms, max_rows);
        if from_ms >= spec.to_ms {
            return Ok(QueryAnswer {
                from_ms: Some(from_ms),
                to_ms: spec.to_ms,
                rows: Vec::new(),
            });
        }
        let (head, minutes, tail) = split_minutes(from_ms, spec.to_ms);
        for (a, b) in [head, tail] {
            if a >= b {
                continue;
            }
            let rows: Vec<EventRow> = self
                .ch
                .fetch(
                    "read events at the edges of a query",
                    &format!(
                        "SELECT * FROM {} WHERE {ns_type}{subjects} \
                         AND time >= toDateTime({}) AND time <= toDateTime({}) AND time_ms >= {a} AND time_ms < {b}",
                        self.ch.read("events"),
                        a.div_euclid(1000).max(0),
                        b.div_euclid(1000).max(0)
                    ),
                )
                .await?;
            for r in rows {
                if let Ok(Some(c)) = m.evaluate(&r.to_event()) {
                    comb.add_event(
                        &c.subject,
                        &c.groups,
                        &c.input,
                        r.time_ms,
                        (r.ingested_ms, r.kafka_offset),
                        &r.id,
                    )?;
                }
            }
        }
        let (ma, mb) = (minutes.0 / 1000, minutes.1 / 1000);
        if ma < mb {
            let sql = RollupSql::new(m);
            let by_subject = spec.groups_by_subject();
            let mut wanted: Vec<usize> = spec
                .group_by
                .iter()
                .chain(spec.filter_group_by.keys())
                .filter_map(|g| m.group_index(g))
                .collect();
            wanted.sort_unstable();
            wanted.dedup();
            let groups = (0..m.group_count())
                .map(|i| {
                    if wanted.contains(&i) {
                        format!("g{i}")
                    } else {
                        "''".into()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ");
            let mask: u64 = wanted.iter().map(|i| 1u64 << i).sum();
            for RollupRead {
                quarter,
                from_s: a,
                to_s: b,
                offset_s: off,
            } in plan_rollup_reads(ma, mb, spec, true)
            {
                let grain = if quarter {
                    Grain::Quarter
                } else {
                    Grain::Minute
                };
                let q = format!(
                    "SELECT {} AS s_subject, [{groups}] AS s_groups, bitAnd(gnull, {mask}) AS s_gnull, {} AS s_bucket, {} \
                     FROM {} WHERE minute >= toDateTime({a}) AND minute < toDateTime({b}){subjects} \
                     GROUP BY s_subject, s_groups, s_gnull, s_bucket",
                    if by_subject { "subject" } else { "''" },
                    bucket_expr(spec.window_size, from_ms.div_euclid(1000), off),
                    sql.merge_columns(),
                    self.ch.read(&grain.table(&sql.table))
                );
                let rows: Vec<BucketRow> = self.ch.fetch("query a rollup", &q).await?;
                for r in rows {
                    let groups: Vec<Option<String>> = r
                        .groups
                        .iter()
                        .enumerate()
                        .map(|(i, g)| (r.gnull & (1 << i) == 0).then(|| g.clone()))
                        .collect();
                    let state = bucket_state(m.aggregation(), &r);
                    comb.add_state(&r.subject, &groups, r.bucket * 1000, &state)?;
                }
            }
        }
        Ok(QueryAnswer {
            from_ms: Some(from_ms),
            to_ms: spec.to_ms,
            rows: comb.finish(),
        })
    }
}

fn bucket_state(agg: Aggregation, r: &BucketRow) -> State {
    let mut s = State::new();
    s.count = r.cnt;
    s.sum = r.sum;
    if agg == Aggregation::Min {
        s.min = r.min;
    }
    if agg == Aggregation::Max {
        s.max = r.max;
    }
    if agg == Aggregation::Latest {
        s.latest = Some(Latest {
            time_ms: r.latest_time,
            seq: (r.latest_ingested, r.latest_offset),
            id: r.latest_id.clone(),
            value: r.latest_value,
        });
    }
    s.uniques = r.uniq.iter().cloned().collect::<HashSet<_>>();
    s
}

impl Store for ClickHouseStore {
    fn kind(&self) -> &'static str {
        "clickhouse"
    }

    fn submit(&self, namespace: &str, events: Vec<UsageEvent>) -> Result<Pending> {
        let ns = namespace.to_string();
        self.produce(events.len(), async move |producer| {
            producer
                .send(&ns, &events, chrono::Utc::now().timestamp_millis())
                .await
        })
    }

    fn sync_meters(&self, meters: Vec<Arc<CompiledMeter>>) -> Result<Synced> {
        let synced = self.run(async {
            if self.provision {
                let (meters, stale) = provision::provision(&self.ch, &meters, &self.cutover).await?;
                Ok(Synced { meters, stale })
            } else {
                let ready: HashSet<String> = provision::read_meters(&self.ch)
                    .await?
                    .into_iter()
                    .filter(|r| r.backfilled == 1)
                    .map(|r| r.rollup)
                    .collect();
                let mut served = Vec::new();
                for m in meters {
                    let sql = RollupSql::new(&m);
                    if ready.contains(&sql.table) {
                        served.push(StoredMeter {
                            rollup_id: super::rollup::rollup_id(&m),
                            meter: m,
                        });
                    } else {
                        tracing::warn!(meter = %m.slug, namespace = %m.namespace, "Meter is not provisioned in ClickHouse yet (run with --provision, or let the operator do it); not served");
                    }
                }
                Ok(Synced {
                    meters: served,
                    stale: Vec::new(),
                })
            }
        })?;
        *self.meters.write().unwrap_or_else(|e| e.into_inner()) =
            synced.meters.iter().map(|m| m.meter.clone()).collect();
        Ok(synced)
    }

    fn drop_rollups(&self, ids: Vec<i64>) -> Result<()> {
        if !self.provision {
            return Ok(());
        }
        self.run(provision::drop_rollups(&self.ch, &ids))
    }

    fn query(&self, meter: &StoredMeter, spec: &QuerySpec, max_rows: usize) -> Result<QueryAnswer> {
        self.run(self.query_async(meter, spec, max_rows))
    }

    fn subjects(&self, meter: &StoredMeter) -> Result<Vec<String>> {
        let sql = RollupSql::new(&meter.meter);
        self.run(self.ch.fetch(
            "list subjects",
            &format!(
                "SELECT DISTINCT subject FROM {} ORDER BY subject",
                self.ch.read(&sql.table)
            ),
        ))
    }

    fn recent_events(&self, namespace: &str, limit: usize) -> Result<Vec<StoredEvent>> {
        let rows: Vec<EventRow> = self.run(self.ch.fetch(
            "list events",
            &format!(
                "SELECT * FROM {} WHERE namespace = {} ORDER BY ingested_ms DESC, kafka_partition DESC, kafka_offset DESC LIMIT {limit}",
                self.ch.read("events"),
                lit(namespace)
            ),
        ))?;
        let meters = self
            .meters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(rows
            .into_iter()
            .map(|r| {
                let event = r.to_event();
                let validation_errors = meters
                    .iter()
                    .filter(|m| m.selects(namespace, &event.ty))
                    .filter_map(|m| m.evaluate(&event).err().map(|e| (m.slug.clone(), e)))
                    .collect();
                StoredEvent {
                    event,
                    ingested_ms: r.ingested_ms,
                    validation_errors,
                }
            })
            .collect())
    }

    fn dead_letters(&self, namespace: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let filter = namespace.map_or(String::new(), |ns| format!("WHERE namespace = {}", lit(ns)));
        let rows: Vec<DeadLetterRow> = self.run(self.ch.fetch(
            "list dead letters",
            &format!(
                "SELECT kafka_partition, kafka_offset, namespace, reason, payload, toUInt32(at) \
                 FROM {} FINAL {filter} ORDER BY at DESC, kafka_partition, kafka_offset DESC LIMIT {limit}",
                self.ch.read("dead_letters")
            ),
        ))?;
        Ok(rows.into_iter().map(DeadLetter::from).collect())
    }

    fn save_portal_token(&self, t: &PortalTokenRecord) -> Result<()> {
        let row = PortalTokenRow::from(t);
        self.run(self.ch.insert::<PortalTokenRow>("portal_tokens", &[row]))
    }

    fn portal_token(&self, namespace: &str, id: &str) -> Result<Option<PortalTokenRecord>> {
        let rows = self.portal_rows(
            &format!("namespace = {} AND id = {}", lit(namespace), lit(id)),
            1,
        )?;
        Ok(rows.into_iter().next())
    }

    fn portal_tokens(&self, namespace: &str, limit: usize) -> Result<Vec<PortalTokenRecord>> {
        self.portal_rows(&format!("namespace = {}", lit(namespace)), limit)
    }

    fn invalidate_portal_tokens(
        &self,
        namespace: &str,
        id: Option<&str>,
        subject: Option<&str>,
        at_ms: i64,
    ) -> Result<usize> {
        let mut cond = format!("namespace = {}", lit(namespace));
        match (id, subject) {
            (None, None) => return Ok(0),
            (Some(id), _) => cond.push_str(&format!(" AND id = {}", lit(id))),
            (None, Some(s)) => cond.push_str(&format!(" AND subject = {}", lit(s))),
        }
        if let (Some(_), Some(s)) = (id, subject) {
            cond.push_str(&format!(" AND subject = {}", lit(s)));
        }
        let valid: Vec<PortalTokenRecord> = self
            .portal_rows(&cond, usize::MAX)?
            .into_iter()
            .filter(|t| t.invalidated_ms.is_none())
            .collect();
        // a newer version of each row: invalidation is final, so version 2 wins
        let rows: Vec<PortalTokenRow> = valid
            .iter()
            .map(|t| PortalTokenRow {
                invalidated_ms: at_ms.max(1),
                version: 2,
                ..PortalTokenRow::from(t)
            })
            .collect();
        self.run(self.ch.insert::<PortalTokenRow>("portal_tokens", &rows))?;
        Ok(valid.len())
    }

    // Through Kafka, so each copy follows the events before it on its partition and
    // the sink stores it with them.
    fn record_watermarks(&self, namespace: &str, marks: Vec<Watermark>) -> Result<Pending> {
        let ns = namespace.to_string();
        self.produce(marks.len(), async move |producer| {
            producer.send_watermarks(&ns, &marks).await
        })
    }

    fn completeness_facts(
        &self,
        namespace: &str,
        event_type: &str,
        from_ms: Option<i64>,
        to_ms: i64,
    ) -> Result<Facts> {
        self.run(crate::watermarks::facts(
            &self.ch, namespace, event_type, from_ms, to_ms,
        ))
    }
}

impl ClickHouseStore {
    /// Runs `send` (`n` items) on the producer in the background; the answer resolves
    /// once Kafka acknowledged them.
    fn produce<F>(&self, n: usize, send: impl FnOnce(Arc<Producer>) -> F) -> Result<Pending>
    where
        F: std::future::Future<Output = tally_kafka::Result<()>> + Send + 'static,
    {
        let producer = self.producer.clone().ok_or_else(|| {
            Error::Unavailable(
                "this server has no --kafka brokers configured, so it cannot ingest".into(),
            )
        })?;
        let (tx, rx) = futures_channel::oneshot::channel();
        let sent = send(producer);
        self.handle.spawn(async move {
            let r = sent.await.map_err(kafka_error).map(|()| IngestOutcome {
                stored: n,
                deduplicated: 0,
            });
            let _ = tx.send(r);
        });
        Ok(rx)
    }

    /// Portal tokens matching `cond`, newest first. The table is replicated to every
    /// server of a cluster, so the local copy answers.
    fn portal_rows(&self, cond: &str, limit: usize) -> Result<Vec<PortalTokenRecord>> {
        let limit = if limit == usize::MAX {
            String::new()
        } else {
            format!(" LIMIT {limit}")
        };
        let rows: Vec<PortalTokenRow> = self.run(self.ch.fetch(
            "read portal tokens",
            &format!(
                "SELECT namespace, id, subject, meters, expires_ms, created_ms, invalidated_ms, version \
                 FROM {}.portal_tokens FINAL WHERE {cond} ORDER BY created_ms DESC, id{limit}",
                self.ch.db()
            ),
        ))?;
        Ok(rows.into_iter().map(PortalTokenRecord::from).collect())
    }
}

impl tally_meter::budget::BudgetLedger for ClickHouseStore {
    fn latest_crossings(
        &self,
        namespace: &str,
        budget: &str,
        period_start_ms: i64,
    ) -> Result<Vec<Crossing>> {
        self.crossing_rows(&format!(
            "namespace = {} AND budget = {} AND period_start_ms = {period_start_ms}",
            lit(namespace),
            lit(budget)
        ))
    }

    fn put_crossing(&self, c: &Crossing) -> Result<()> {
        // one evaluator writes (the Lease holder): the wall clock orders its versions
        let version = chrono::Utc::now().timestamp_micros().max(0) as u64;
        let row = CrossingRow {
            id: c.id.clone(),
            namespace: c.namespace.clone(),
            budget: c.budget.clone(),
            subject: c.subject.clone(),
            period_start_ms: c.period_start_ms,
            threshold: c.threshold.clone(),
            seq: c.seq,
            usage: c.usage,
            crossed_ms: c.crossed_ms,
            body: c.body.clone(),
            delivered_ms: c.delivered_ms.unwrap_or(0),
            attempts: c.attempts,
            failed: c.failed as u8,
            rearmed: c.rearmed as u8,
            version,
        };
        self.run(self.ch.insert::<CrossingRow>("budget_crossings", &[row]))
    }

    fn undelivered_crossings(&self) -> Result<Vec<Crossing>> {
        self.crossing_rows("delivered_ms = 0 AND failed = 0 AND body != ''")
    }
}

impl ClickHouseStore {
    fn crossing_rows(&self, cond: &str) -> Result<Vec<Crossing>> {
        let rows: Vec<CrossingRow> = self.run(self.ch.fetch(
            "read budget crossings",
            &format!(
                "SELECT id, namespace, budget, subject, period_start_ms, threshold, seq, usage, crossed_ms, body, \
                 delivered_ms, attempts, failed, rearmed, version FROM {}.budget_crossings FINAL \
                 WHERE {cond} ORDER BY crossed_ms, id",
                self.ch.db()
            ),
        ))?;
        Ok(rows
            .into_iter()
            .map(|r| Crossing {
                id: r.id,
                namespace: r.namespace,
                budget: r.budget,
                subject: r.subject,
                period_start_ms: r.period_start_ms,
                threshold: r.threshold,
                seq: r.seq,
                usage: r.usage,
                crossed_ms: r.crossed_ms,
                body: r.body,
                delivered_ms: (r.delivered_ms != 0).then_some(r.delivered_ms),
                attempts: r.attempts,
                failed: r.failed != 0,
                rearmed: r.rearmed != 0,
            })
            .collect())
    }
}

/// One row of `budget_crossings`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, clickhouse::Row)]
struct CrossingRow {
    id: String,
    namespace: String,
    budget: String,
    subject: String,
    period_start_ms: i64,
    threshold: String,
    seq: u32,
    usage: f64,
    crossed_ms: i64,
    body: String,
    delivered_ms: i64,
    attempts: u32,
    failed: u8,
    rearmed: u8,
    version: u64,
}

/// One row of `portal_tokens` (`invalidated_ms` 0: valid; `version` 1 as issued, 2
/// invalidated).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, clickhouse::Row)]
struct PortalTokenRow {
    namespace: String,
    id: String,
    subject: String,
    meters: Vec<String>,
    expires_ms: i64,
    created_ms: i64,
    invalidated_ms: i64,
    version: u64,
}

impl From<&PortalTokenRecord> for PortalTokenRow {
    fn from(t: &PortalTokenRecord) -> PortalTokenRow {
        PortalTokenRow {
            namespace: t.namespace.clone(),
            id: t.id.clone(),
            subject: t.subject.clone(),
            meters: t.allowed_meter_slugs.clone(),
            expires_ms: t.expires_ms,
            created_ms: t.created_ms,
            invalidated_ms: t.invalidated_ms.unwrap_or(0),
            version: if t.invalidated_ms.is_some() { 2 } else { 1 },
        }
    }
}

impl From<PortalTokenRow> for PortalTokenRecord {
    fn from(r: PortalTokenRow) -> PortalTokenRecord {
        PortalTokenRecord {
            id: r.id,
            namespace: r.namespace,
            subject: r.subject,
            allowed_meter_slugs: r.meters,
            expires_ms: r.expires_ms,
            created_ms: r.created_ms,
            invalidated_ms: (r.invalidated_ms != 0).then_some(r.invalidated_ms),
        }
    }
}
