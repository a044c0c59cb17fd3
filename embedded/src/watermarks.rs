//! Completeness watermarks in the embedded store ([`tally_meter::completeness`]).
//!
//! The ingest API records a source's watermark only after the agent's earlier events
//! were acknowledged, and the store acknowledges events once committed, so a stored
//! watermark never runs ahead of the events before it. One row per (namespace,
//! collector, node) keeps the largest `until`; gaps are kept by their interval.
use rusqlite::{Connection, params};
use tally_crds::{Gap, Watermark};
use tally_meter::Result;
use tally_meter::completeness::{Facts, PartitionMark, SourceGap};

use crate::SqliteStep;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS watermarks (
    namespace TEXT NOT NULL,
    collector TEXT NOT NULL,
    node TEXT NOT NULL,
    source TEXT NOT NULL,
    types TEXT NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (namespace, collector, node)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermark_gaps (
    namespace TEXT NOT NULL,
    collector TEXT NOT NULL,
    node TEXT NOT NULL,
    from_ms INTEGER NOT NULL,
    to_ms INTEGER NOT NULL,
    reason TEXT NOT NULL,
    pods TEXT NOT NULL,
    PRIMARY KEY (namespace, collector, node, from_ms, to_ms)
) WITHOUT ROWID;
";

/// Stores `marks` in one transaction (a watermark only ever moves forward).
pub(crate) fn record(conn: &Connection, namespace: &str, marks: &[Watermark]) -> Result<()> {
    let tx = conn
        .unchecked_transaction()
        .step("begin recording watermarks")?;
    for m in marks {
        let types = serde_json::to_string(&m.types).unwrap_or_default();
        tx.execute(
            "INSERT INTO watermarks (namespace, collector, node, source, types, until_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (namespace, collector, node) DO UPDATE SET
               source = excluded.source, types = excluded.types,
               until_ms = max(until_ms, excluded.until_ms)",
            params![namespace, m.collector, m.node, m.source, types, m.until],
        )
        .step("record a watermark")?;
        for g in &m.gaps {
            let pods = serde_json::to_string(&g.pods).unwrap_or_default();
            tx.execute(
                "INSERT OR IGNORE INTO watermark_gaps (namespace, collector, node, from_ms, to_ms, reason, pods)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![namespace, m.collector, m.node, g.from, g.to, g.reason, pods],
            )
            .step("record a gap")?;
        }
    }
    tx.commit().step("commit watermarks")
}

/// The facts for one completeness question.
pub(crate) fn facts(
    conn: &Connection,
    namespace: &str,
    event_type: &str,
    from: Option<i64>,
    to: i64,
) -> Result<Facts> {
    let from = from.unwrap_or(i64::MIN);
    let mut stmt = conn
        .prepare_cached(
            "SELECT collector, node, source, types, until_ms FROM watermarks WHERE namespace = ?1",
        )
        .step("read watermarks")?;
    let marks = stmt
        .query_map([namespace], |r| {
            Ok(PartitionMark {
                collector: r.get(0)?,
                node: r.get(1)?,
                source: r.get(2)?,
                types: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
                partition: 0,
                until: r.get(4)?,
                partitions: 0,
            })
        })
        .step("read watermarks")?
        .collect::<rusqlite::Result<Vec<_>>>()
        .step("read watermarks")?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT collector, node, from_ms, to_ms, reason, pods FROM watermark_gaps
             WHERE namespace = ?1 AND from_ms < ?3 AND to_ms > ?2 ORDER BY from_ms",
        )
        .step("read gaps")?;
    let gaps = stmt
        .query_map(params![namespace, from, to], |r| {
            Ok(SourceGap {
                collector: r.get(0)?,
                node: r.get(1)?,
                gap: Gap {
                    from: r.get(2)?,
                    to: r.get(3)?,
                    reason: r.get(4)?,
                    pods: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
                },
            })
        })
        .step("read gaps")?
        .collect::<rusqlite::Result<Vec<_>>>()
        .step("read gaps")?;
    let mut stmt = conn
        .prepare_cached(
            "SELECT DISTINCT source FROM events
             WHERE namespace = ?1 AND type = ?2 AND time_ms >= ?3 AND time_ms < ?4",
        )
        .step("list event sources")?;
    let event_sources = stmt
        .query_map(params![namespace, event_type, from, to], |r| r.get(0))
        .step("list event sources")?
        .collect::<rusqlite::Result<Vec<String>>>()
        .step("list event sources")?;
    Ok(Facts {
        marks,
        gaps,
        event_sources,
    })
}
