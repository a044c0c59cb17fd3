//! Repair of a batch that began but may not have finished (the argument is in the
//! module docs of [`super`]): rows of its range already in `events` are kept, the
//! others deduplicated and inserted with the batch's `S`, and every meter's view rows
//! of the (subject, minute) keys it touches re-derived from `events`.
use std::collections::HashSet;

use tally_meter::Result;
use tally_meter::store::DeadLetter;

use super::Sink;
use super::batch::{Msg, dead_rows};
use super::failpoint::failpoint;
use super::split;
use crate::provision::{delete_where, read_meters};
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
        let mut prep = self.prepare(msgs, s, &present)?;
        // Feed the rows not yet stored, finding any a view refuses (split.rs). Rows
        // fed by the failed attempt are fed again; the re-derivation below makes the
        // rollups exact either way.
        let (rt, ch) = (&self.rt, &self.ch);
        let isolated = split::isolate(std::mem::take(&mut prep.rows), |chunk| {
            rt.block_on(ch.insert::<EventRow>("events_feed", chunk))
        })?;
        prep.rows = isolated.inserted;
        let refused: Vec<EventRow> = isolated
            .refused
            .into_iter()
            .map(|(row, reason)| {
                prep.dead.push(refused_letter(&row, &reason, msgs));
                row
            })
            .collect();
        if !refused.is_empty() {
            tracing::warn!(
                refused = refused.len(),
                "ClickHouse refused events of a batch; they are dead letters, the rest is stored"
            );
        }
        self.rt.block_on(async {
            self.ch.insert::<EventRow>("events", &prep.rows).await?;
            let all: Vec<EventRow> = prep.rows.iter().chain(&prep.present).cloned().collect();
            self.insert_ids(&all, s).await?;
            self.ch
                .insert::<DeadLetterRow>("dead_letters", &dead_rows(&prep.dead))
                .await?;
            failpoint("mid-repair");
            // the refused rows' keys too: a view may have taken them before another
            // refused the insert
            let touched: Vec<EventRow> = all.into_iter().chain(refused).collect();
            self.rederive(&touched).await?;
            self.insert_marks(&prep).await
        })?;
        self.log(ranges, batch, "done", s)?;
        self.finish(&prep, msgs.len(), s);
        Ok(())
    }

    /// Deletes and re-derives, for every provisioned meter, the view rows of each
    /// (subject, minute range) that `rows` touch.
    pub(super) async fn rederive(&self, rows: &[EventRow]) -> Result<()> {
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
