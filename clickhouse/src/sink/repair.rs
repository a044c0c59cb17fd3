//! Repair of a batch that began but may not have finished (the argument is in the
//! module docs of [`super`]): rows of its range already in `events` are kept, the
//! others deduplicated and inserted with the batch's `S`, and every meter's view rows
//! of the (subject, minute) keys it touches re-derived from `events`.
use std::collections::HashSet;

use rdkafka::consumer::Consumer;
use tally_meter::Result;
use tally_meter::store::DeadLetter;

use super::Sink;
use super::batch::{Msg, dead_rows};
use super::dedup::{hash64, hash128};
use super::failpoint::failpoint;
use super::split;
use crate::provision::{delete_local, delete_where, read_meters, rollup_tables};
use crate::rollup::{Derivation, Grain, RollupSql};
use crate::{DeadLetterRow, EventRow, lit};

impl Sink {
    /// Repairs a batch that began (at `s`) but may not have finished: see the module docs.
    pub(super) fn repair(
        &mut self,
        msgs: &[Msg],
        s: i64,
        batch: u64,
        ranges: &[(i32, i64, i64)],
    ) -> Result<()> {
        self.stats.repairs.inc();
        let db = self.ch.db().to_string();
        let cond = in_ranges(ranges);
        let present: Vec<(i32, i64)> = self.rt.block_on(self.ch.fetch(
            "find the rows a batch already stored",
            &format!("SELECT kafka_partition, kafka_offset FROM {db}.events WHERE {cond}"),
        ))?;
        let present: HashSet<(i32, i64)> = present.into_iter().collect();
        let mut prep = self.prepare(msgs, s, &present, ranges)?;
        // Store the rows not yet stored, finding any ClickHouse refuses (split.rs; e.g.
        // a CHECK constraint you added to `events`). A failing view on `events` fails
        // the insert after the table took the block, so once one insert failed, each
        // later one first leaves out the rows it finds stored.
        let (rt, ch) = (&self.rt, &self.ch);
        let mut failed_once = false;
        let isolated = split::isolate(std::mem::take(&mut prep.rows), |chunk| {
            let stored = if failed_once {
                stored_of(rt, ch, chunk)?
            } else {
                HashSet::new()
            };
            let rest: Vec<EventRow> = chunk
                .iter()
                .filter(|r| !stored.contains(&(r.kafka_partition, r.kafka_offset)))
                .cloned()
                .collect();
            let out = rt.block_on(ch.insert::<EventRow>("events", &rest));
            failed_once |= out.is_err();
            out
        })?;
        prep.rows = isolated.inserted;
        // a row refused by a view on `events` is stored all the same (ClickHouse writes
        // the table before it pushes to its views): it counts, and is no dead letter
        let candidates: Vec<EventRow> = isolated.refused.iter().map(|(r, _)| r.clone()).collect();
        let stored = if candidates.is_empty() {
            HashSet::new()
        } else {
            stored_of(rt, ch, &candidates)?
        };
        let mut refused = Vec::new();
        for (row, reason) in isolated.refused {
            if stored.contains(&(row.kafka_partition, row.kafka_offset)) {
                tracing::warn!(id = %row.id, error = %reason, "A view on events refused an event ClickHouse stored; it counts");
                prep.rows.push(row);
            } else {
                prep.dead.push(refused_letter(&row, &reason, msgs));
                refused.push(row);
            }
        }
        if !refused.is_empty() {
            self.forget_ids(&refused, s)?;
            tracing::warn!(
                refused = refused.len(),
                "ClickHouse refused events of a batch; they are dead letters, the rest is stored"
            );
        }
        self.rt.block_on(async {
            let all: Vec<EventRow> = prep.rows.iter().chain(&prep.present).cloned().collect();
            self.insert_ids(&all, s).await?;
            self.ch
                .insert::<DeadLetterRow>("dead_letters", &dead_rows(&prep.dead))
                .await?;
            failpoint("mid-repair");
            // the refused rows' keys too: the failed attempt may have fed their
            // rollups before the insert into `events` was refused
            let touched: Vec<EventRow> = all.into_iter().chain(refused).collect();
            self.rederive(&touched).await?;
            self.insert_marks(&prep).await
        })?;
        self.log(ranges, batch, "done", s)?;
        // the rows stored, not what was prepared: refused rows are left out
        prep.hashes = prep
            .rows
            .iter()
            .chain(&prep.present)
            .map(|r| hash128(&r.namespace, &r.source, &r.id))
            .collect();
        self.finish(&prep, msgs.len(), s);
        Ok(())
    }

    /// Deletes and re-derives, for every provisioned meter, the view rows of each
    /// (subject, minute range) that `rows` touch.
    pub(super) async fn rederive(&self, rows: &[EventRow]) -> Result<()> {
        let tables = rollup_tables(&self.ch).await?;
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
                    // a meter being dropped (its record goes first, then its tables)
                    // or provisioned again (its new cutover clears these rows anyway)
                    if !tables.contains(&table) {
                        continue;
                    }
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
                        Derivation::View,
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

impl Sink {
    /// Deletes from `event_ids` the identities of `refused` (rows of the batch begun at
    /// `s` that are no events), which the batch's failed attempt may have stored beside
    /// its events: a later copy of such an event (a dead letter sent again once fixed)
    /// must not count as a duplicate.
    fn forget_ids(&self, refused: &[EventRow], s: i64) -> Result<()> {
        // ClickHouse caps a query's syntax tree at 50,000 elements
        for chunk in refused.chunks(1_000) {
            let hashes = chunk
                .iter()
                .map(|r| hash64(&r.namespace, &r.source, &r.id).to_string())
                .collect::<Vec<_>>()
                .join(", ");
            let at = chunk
                .iter()
                .map(|r| format!("({}, {})", r.kafka_partition, r.kafka_offset))
                .collect::<Vec<_>>()
                .join(", ");
            let cond = format!(
                "ingested = toDateTime({s}) AND h IN ({hashes}) AND (kafka_partition, kafka_offset) IN ({at})"
            );
            self.rt
                .block_on(delete_local(&self.ch, "event_ids", &cond))?;
        }
        // a look-up made ahead (fetch.rs) may have found them before they went
        self.consumer.context().void_look_aheads();
        Ok(())
    }
}

/// SQL that is true for the rows read from one of `ranges` (partition, first offset,
/// last offset), by their `kafka_partition` and `kafka_offset` columns.
pub(super) fn in_ranges(ranges: &[(i32, i64, i64)]) -> String {
    ranges
        .iter()
        .map(|(p, a, b)| {
            format!("(kafka_partition = {p} AND kafka_offset >= {a} AND kafka_offset <= {b})")
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// The (partition, offset) of the rows of `chunk` already in `events`.
fn stored_of(
    rt: &tokio::runtime::Runtime,
    ch: &crate::Ch,
    chunk: &[EventRow],
) -> Result<HashSet<(i32, i64)>> {
    // by each partition's offset range: a list of every key could outgrow the
    // query's syntax-tree limit
    let mut ranges: std::collections::BTreeMap<i32, (i64, i64)> = Default::default();
    for r in chunk {
        let e = ranges
            .entry(r.kafka_partition)
            .or_insert((r.kafka_offset, r.kafka_offset));
        e.0 = e.0.min(r.kafka_offset);
        e.1 = e.1.max(r.kafka_offset);
    }
    let ranges: Vec<(i32, i64, i64)> = ranges.into_iter().map(|(p, (a, b))| (p, a, b)).collect();
    let cond = in_ranges(&ranges);
    let found: Vec<(i32, i64)> = rt.block_on(ch.fetch(
        "find the refused rows already stored",
        &format!(
            "SELECT kafka_partition, kafka_offset FROM {}.events WHERE {cond}",
            ch.db()
        ),
    ))?;
    Ok(found.into_iter().collect())
}

/// The dead letter of an event ClickHouse refused, with its message as received.
fn refused_letter(row: &EventRow, reason: &str, msgs: &[Msg]) -> DeadLetter {
    let payload = msgs
        .iter()
        .find(|m| m.partition == row.kafka_partition && m.offset == row.kafka_offset)
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .unwrap_or_default();
    DeadLetter {
        kafka_partition: row.kafka_partition,
        kafka_offset: row.kafka_offset,
        namespace: row.namespace.clone(),
        reason: format!(
            "ClickHouse refused event {}/{}/{}: {reason}",
            row.namespace, row.source, row.id
        ),
        payload,
        at: chrono::Utc::now().timestamp() as u32,
    }
}
