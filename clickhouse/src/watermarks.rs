//! Completeness watermarks in ClickHouse ([`tally_meter::completeness`]).
//!
//! The sink stores a watermark record with the batch its Kafka message is in, after
//! the batch's events (`sink/mod.rs`), on the shard of its partition; a copy goes to
//! every partition, so the smallest `until` over a source's partitions is how far its
//! events are queryable. Rows are idempotent facts (the largest `until` per partition
//! counts; a gap is its interval), so a repaired batch may insert them again.
use serde::{Deserialize, Serialize};
use tally_crds::{Gap, Watermark};
use tally_meter::Result;
use tally_meter::completeness::{Facts, PartitionMark, SourceGap};

use crate::{Ch, lit};

/// Columns of `watermarks` (one row per record and partition; ReplacingMergeTree by
/// `until_ms`, so merges keep the latest per partition).
pub(crate) const WATERMARKS: &str = "(namespace String, collector String, node String, \
     kafka_partition Int32, source String, types Array(String), until_ms Int64, partitions Int32)";

/// Columns of `watermark_gaps`.
pub(crate) const GAPS: &str = "(namespace String, collector String, node String, \
     from_ms Int64, to_ms Int64, reason String, pods Array(String))";

/// One row of `watermarks`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct WatermarkRow {
    /// Tenant.
    pub namespace: String,
    /// Collector name.
    pub collector: String,
    /// Node ('' for cluster-scoped).
    pub node: String,
    /// The Kafka partition the record came through.
    pub kafka_partition: i32,
    /// The events' source.
    pub source: String,
    /// The event types.
    pub types: Vec<String>,
    /// Complete up to (ms).
    pub until_ms: i64,
    /// Partitions the record was sent to.
    pub partitions: i32,
}

/// One row of `watermark_gaps`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clickhouse::Row)]
pub struct GapRow {
    /// Tenant.
    pub namespace: String,
    /// Collector name.
    pub collector: String,
    /// Node.
    pub node: String,
    /// Start (ms).
    pub from_ms: i64,
    /// End (ms).
    pub to_ms: i64,
    /// Why.
    pub reason: String,
    /// Pods known to be affected.
    pub pods: Vec<String>,
}

/// The rows of one watermark record read from `partition`.
pub(crate) fn rows(namespace: &str, m: &Watermark, partition: i32) -> (WatermarkRow, Vec<GapRow>) {
    let mark = WatermarkRow {
        namespace: namespace.to_string(),
        collector: m.collector.clone(),
        node: m.node.clone(),
        kafka_partition: partition,
        source: m.source.clone(),
        types: m.types.clone(),
        until_ms: m.until,
        partitions: m.partitions,
    };
    let gaps = m
        .gaps
        .iter()
        .map(|g| GapRow {
            namespace: namespace.to_string(),
            collector: m.collector.clone(),
            node: m.node.clone(),
            from_ms: g.from,
            to_ms: g.to,
            reason: g.reason.clone(),
            pods: g.pods.clone(),
        })
        .collect();
    (mark, gaps)
}

/// Every source's partition watermarks of `namespaces`, by namespace.
pub async fn partition_marks(
    ch: &Ch,
    namespaces: &[String],
) -> Result<Vec<(String, PartitionMark)>> {
    if namespaces.is_empty() {
        return Ok(Vec::new());
    }
    let list = namespaces
        .iter()
        .map(|n| lit(n))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = marks(ch, &format!("namespace IN ({list})")).await?;
    Ok(rows
        .into_iter()
        .map(|m| (m.namespace.clone(), mark_of(m)))
        .collect())
}

async fn marks(ch: &Ch, cond: &str) -> Result<Vec<WatermarkRow>> {
    ch.fetch(
        "read watermarks",
        &format!(
            "SELECT namespace, collector, node, kafka_partition, s AS source, t AS types, \
             u AS until_ms, p AS partitions FROM (SELECT namespace, collector, node, kafka_partition, \
             argMax(source, until_ms) AS s, argMax(types, until_ms) AS t, max(until_ms) AS u, \
             max(partitions) AS p FROM {} WHERE {cond} \
             GROUP BY namespace, collector, node, kafka_partition)",
            ch.read("watermarks")
        ),
    )
    .await
}

fn mark_of(m: WatermarkRow) -> PartitionMark {
    PartitionMark {
        collector: m.collector,
        node: m.node,
        source: m.source,
        types: m.types,
        partition: m.kafka_partition,
        until: m.until_ms,
        partitions: m.partitions,
    }
}

/// The facts for one completeness question, read from every shard.
pub(crate) async fn facts(
    ch: &Ch,
    namespace: &str,
    event_type: &str,
    from: Option<i64>,
    to: i64,
) -> Result<Facts> {
    let ns = lit(namespace);
    let marks = marks(ch, &format!("namespace = {ns}")).await?;
    let from_ms = from.unwrap_or(i64::MIN);
    let gaps: Vec<GapRow> = ch
        .fetch(
            "read gaps",
            &format!(
                "SELECT DISTINCT namespace, collector, node, from_ms, to_ms, reason, pods FROM {} \
                 WHERE namespace = {ns} AND from_ms < {to} AND to_ms > {from_ms} ORDER BY from_ms",
                ch.read("watermark_gaps")
            ),
        )
        .await?;
    // `events` is ordered by (namespace, type, subject, time): the range is a scan of
    // the meter's type
    let lo = from.map_or(String::new(), |f| {
        format!(" AND time >= toDateTime({})", f.div_euclid(1000).max(0))
    });
    let sources: Vec<String> = ch
        .fetch(
            "list event sources",
            &format!(
                "SELECT DISTINCT source FROM {} WHERE namespace = {ns} AND type = {}{lo} \
                 AND time < toDateTime({}) AND time_ms < {to}{}",
                ch.read("events"),
                lit(event_type),
                (to.div_euclid(1000) + 1).max(0),
                from.map_or(String::new(), |f| format!(" AND time_ms >= {f}")),
            ),
        )
        .await?;
    Ok(Facts {
        marks: marks.into_iter().map(mark_of).collect(),
        gaps: gaps
            .into_iter()
            .map(|g| SourceGap {
                collector: g.collector,
                node: g.node,
                gap: Gap {
                    from: g.from_ms,
                    to: g.to_ms,
                    reason: g.reason,
                    pods: g.pods,
                },
            })
            .collect(),
        event_sources: sources,
    })
}
