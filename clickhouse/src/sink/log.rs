//! The begin/done log (`sink_log`): a `begin` row per Kafka partition before a batch
//! writes anything, a `done` row after, and what a partition's latest row says at
//! start (where to resume, and which range to repair).
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tally_meter::Result;

use super::Sink;
use super::batch::Msg;
use crate::lit;

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

/// What the sink knows about one partition.
#[derive(Debug)]
pub(super) struct PartState {
    /// First offset not yet applied.
    pub(super) next: i64,
    /// An open `begin` to repair: (start, end, S, batch).
    pub(super) open: Option<(i64, i64, i64, u64)>,
    /// Messages of the open range collected so far.
    pub(super) buffered: Vec<Msg>,
    /// After a seek: ignore messages until this offset arrives (fetched-ahead ones).
    pub(super) await_offset: Option<i64>,
}

impl Sink {
    pub(super) fn read_partition(&mut self, p: i32) -> Result<PartState> {
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

    pub(super) fn ranges(msgs: &[Msg]) -> Vec<(i32, i64, i64)> {
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

    pub(super) fn log(
        &mut self,
        ranges: &[(i32, i64, i64)],
        batch: u64,
        phase: &str,
        s: i64,
    ) -> Result<()> {
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
}
