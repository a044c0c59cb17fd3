//! Whether a meter's answer for a range is complete: the rule, as a pure function of
//! what the store holds about watermarks ([`Facts`]).
//!
//! A **source** is one Collector on one node. It feeds a meter when its watermark lists
//! the meter's event type. Its watermark is the smallest `until` stored over every
//! Kafka partition it was sent to: only then is each earlier event of it queryable.
//! For a range `[from, to)` a source is
//! - `complete` when its watermark is at or after `to` and no gap of it overlaps;
//! - `behind` when its watermark is before `to` (the interval it has not delivered is
//!   named), or when its watermark has not reached every partition yet;
//! - `gap` when an interval it could not observe overlaps the range (named with the
//!   pods known to be affected); a gap stays, whatever the watermark does later;
//! - `ended` when its node or its Collector no longer exists: nothing more is expected
//!   from it (its gaps are still reported).
//!
//! Events of the meter's type in the range from a CloudEvent `source` that sends no
//! watermarks make the answer `unknown` (if nothing is behind): tally cannot prove them
//! complete. So does a range no source reports on at all.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use tally_crds::Gap;
use tally_crds::event::format_ms;

/// One source's watermark on one Kafka partition, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct PartitionMark {
    /// The Collector (its name).
    pub collector: String,
    /// The node ('' for cluster-scoped collectors).
    pub node: String,
    /// The events' CloudEvent source.
    pub source: String,
    /// The event types it produces.
    pub types: Vec<String>,
    /// The Kafka partition (0 where there is none).
    pub partition: i32,
    /// The largest `until` stored on this partition (Unix ms).
    pub until: i64,
    /// How many partitions its records said they were sent to (0: no Kafka).
    pub partitions: i32,
}

/// A gap a source reported.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceGap {
    /// The Collector.
    pub collector: String,
    /// The node.
    pub node: String,
    /// The interval, reason and pods.
    pub gap: Gap,
}

/// What a store knows for one completeness question.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    /// Every stored partition watermark of the namespace.
    pub marks: Vec<PartitionMark>,
    /// Every stored gap of the namespace overlapping the range.
    pub gaps: Vec<SourceGap>,
    /// The distinct CloudEvent sources of the meter's events in the range.
    pub event_sources: Vec<String>,
}

/// The answer for a whole range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Every source is complete and every event in the range came from one.
    Complete,
    /// A source is behind or has a gap in the range.
    Incomplete,
    /// Nothing is behind, but events came from sources without watermarks (or no
    /// source reports on this meter).
    Unknown,
}

/// One source's standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SourceStatus {
    /// Delivered past the range, no gap.
    Complete,
    /// Has not delivered the whole range yet.
    Behind,
    /// Could not observe part of the range.
    Gap,
    /// Its node or Collector was deleted; nothing more is expected.
    Ended,
}

/// Part of the range a source has not accounted for.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Missing {
    /// Start (RFC 3339).
    pub from: String,
    /// End (RFC 3339, exclusive).
    pub to: String,
    /// Why.
    pub reason: String,
    /// Pods known to be affected (`namespace/name`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
}

/// One source in the answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SourceReport {
    /// The Collector.
    pub collector: String,
    /// The node (absent for cluster-scoped collectors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The events' CloudEvent source.
    pub source: String,
    /// Its standing for the range.
    pub status: SourceStatus,
    /// Complete up to (RFC 3339); absent until every partition has a watermark.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark: Option<String>,
    /// What it has not accounted for in the range.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<Missing>,
}

/// Events from a source that sends no watermarks.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnknownSource {
    /// The CloudEvent source.
    pub source: String,
    /// Why its completeness is unknown.
    pub reason: String,
}

/// Completeness of a meter over a range.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Completeness {
    /// The overall answer.
    pub status: Status,
    /// `status == complete`.
    pub complete: bool,
    /// Range start (RFC 3339; absent: from the first event).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Range end (RFC 3339, exclusive).
    pub to: String,
    /// Every source feeding the meter, behind ones first.
    pub sources: Vec<SourceReport>,
    /// Sources of events in the range that send no watermarks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<UnknownSource>,
}

/// Where a source stands: its watermark, `None` while some partition it was sent to
/// has no watermark of it yet.
fn watermark_of(marks: &[&PartitionMark]) -> Option<i64> {
    let expected = marks.iter().map(|m| m.partitions).max().unwrap_or(0).max(1);
    let mut by_partition: BTreeMap<i32, i64> = BTreeMap::new();
    for m in marks {
        let u = by_partition.entry(m.partition).or_insert(m.until);
        *u = (*u).max(m.until);
    }
    let reached = by_partition.keys().filter(|p| **p < expected).count();
    (reached as i32 >= expected).then(|| {
        by_partition
            .iter()
            .filter(|(p, _)| **p < expected)
            .map(|(_, u)| *u)
            .min()
            .unwrap_or(0)
    })
}

/// Every source (collector, node) among `marks` with its watermark (`None` while some
/// partition it was sent to has none of it yet).
pub fn source_watermarks(marks: &[PartitionMark]) -> Vec<(String, String, Option<i64>)> {
    by_source(marks.iter())
        .into_iter()
        .map(|((c, n), marks)| (c.to_string(), n.to_string(), watermark_of(&marks)))
        .collect()
}

/// `marks` by source: (collector, node).
fn by_source<'a>(
    marks: impl Iterator<Item = &'a PartitionMark>,
) -> BTreeMap<(&'a str, &'a str), Vec<&'a PartitionMark>> {
    let mut sources: BTreeMap<(&str, &str), Vec<&PartitionMark>> = BTreeMap::new();
    for m in marks {
        sources
            .entry((m.collector.as_str(), m.node.as_str()))
            .or_default()
            .push(m);
    }
    sources
}

/// What exists now, when known: a source whose node or Collector is gone has ended
/// (nothing more is expected from it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Existing {
    /// The cluster's nodes.
    pub nodes: Option<BTreeSet<String>>,
    /// The namespace's Collectors (names).
    pub collectors: Option<BTreeSet<String>>,
}

impl Existing {
    fn ended(&self, collector: &str, node: &str) -> bool {
        (!node.is_empty() && self.nodes.as_ref().is_some_and(|n| !n.contains(node)))
            || self
                .collectors
                .as_ref()
                .is_some_and(|c| !c.contains(collector))
    }
}

/// Assesses `[from, to)` of a meter over `event_type`, given what exists now.
pub fn assess(
    event_type: &str,
    from: Option<i64>,
    to: i64,
    facts: &Facts,
    existing: &Existing,
) -> Completeness {
    let sources = by_source(
        facts
            .marks
            .iter()
            .filter(|m| m.types.iter().any(|t| t == event_type)),
    );
    let start = from.unwrap_or(i64::MIN);
    let mut reports = Vec::new();
    for ((collector, node), marks) in &sources {
        let watermark = watermark_of(marks);
        let ended = existing.ended(collector, node);
        let mut missing = Vec::new();
        for g in facts
            .gaps
            .iter()
            .filter(|g| &g.collector == collector && &g.node == node)
            .filter(|g| g.gap.from < to && g.gap.to > start)
        {
            missing.push(Missing {
                from: format_ms(g.gap.from.max(start)),
                to: format_ms(g.gap.to.min(to)),
                reason: g.gap.reason.clone(),
                pods: g.gap.pods.clone(),
            });
        }
        let gap = !missing.is_empty();
        let behind = !ended && watermark.is_none_or(|w| w < to);
        if behind {
            let at = watermark.unwrap_or(i64::MIN).max(start);
            let place = if node.is_empty() {
                format!("collector {collector}")
            } else {
                format!("collector {collector} on node {node}")
            };
            let reason = match watermark {
                Some(w) => format!(
                    "{place} has delivered events only up to {}: it is behind, or down",
                    format_ms(w)
                ),
                None => {
                    format!("{place} has not yet delivered a watermark to every Kafka partition")
                }
            };
            missing.push(Missing {
                from: if at == i64::MIN {
                    from.map_or_else(|| "-".into(), format_ms)
                } else {
                    format_ms(at)
                },
                to: format_ms(to),
                reason,
                pods: Vec::new(),
            });
        }
        let status = if gap {
            SourceStatus::Gap
        } else if behind {
            SourceStatus::Behind
        } else if ended {
            SourceStatus::Ended
        } else {
            SourceStatus::Complete
        };
        reports.push(SourceReport {
            collector: collector.to_string(),
            node: (!node.is_empty()).then(|| node.to_string()),
            source: marks[0].source.clone(),
            status,
            watermark: watermark.map(format_ms),
            missing,
        });
    }
    // behind and gapped sources first, then by name
    reports.sort_by_key(|r| {
        (
            !matches!(r.status, SourceStatus::Behind | SourceStatus::Gap),
            r.collector.clone(),
            r.node.clone(),
        )
    });
    let marked: BTreeSet<&str> = sources
        .values()
        .flat_map(|m| m.iter().map(|m| m.source.as_str()))
        .collect();
    let unknown: Vec<UnknownSource> = facts
        .event_sources
        .iter()
        .filter(|s| !marked.contains(s.as_str()))
        .map(|s| UnknownSource {
            source: s.clone(),
            reason: "this source sends no watermarks, so its events in the range cannot be proven complete".into(),
        })
        .collect();
    let incomplete = reports
        .iter()
        .any(|r| matches!(r.status, SourceStatus::Behind | SourceStatus::Gap));
    let status = if incomplete {
        Status::Incomplete
    } else if !unknown.is_empty() || reports.is_empty() {
        Status::Unknown
    } else {
        Status::Complete
    };
    Completeness {
        status,
        complete: status == Status::Complete,
        from: from.map(format_ms),
        to: format_ms(to),
        sources: reports,
        unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(node: &str, partition: i32, until: i64) -> PartitionMark {
        PartitionMark {
            collector: "pods".into(),
            node: node.into(),
            source: "tally/a/pods".into(),
            types: vec!["pod-runtime".into()],
            partition,
            until,
            partitions: 2,
        }
    }

    const T: i64 = 1_700_000_000_000;

    #[test]
    fn a_source_is_complete_only_up_to_its_slowest_partition() {
        let facts = Facts {
            marks: vec![mark("n1", 0, T + 120_000), mark("n1", 1, T + 60_000)],
            ..Facts::default()
        };
        let c = assess(
            "pod-runtime",
            Some(T),
            T + 60_000,
            &facts,
            &Existing::default(),
        );
        assert_eq!(c.status, Status::Complete);
        let c = assess(
            "pod-runtime",
            Some(T),
            T + 90_000,
            &facts,
            &Existing::default(),
        );
        assert_eq!(c.status, Status::Incomplete);
        let s = &c.sources[0];
        assert_eq!(
            (s.status, s.node.as_deref()),
            (SourceStatus::Behind, Some("n1"))
        );
        assert_eq!(s.missing[0].from, format_ms(T + 60_000));
        assert_eq!(s.missing[0].to, format_ms(T + 90_000));
        assert!(s.missing[0].reason.contains("node n1"), "{:?}", s.missing);
        // another meter's type: no source, so unknown
        let c = assess("other", Some(T), T + 60_000, &facts, &Existing::default());
        assert_eq!((c.status, c.sources.len()), (Status::Unknown, 0));
    }

    #[test]
    fn a_partition_without_a_watermark_keeps_the_source_behind() {
        let facts = Facts {
            marks: vec![mark("n1", 0, T + 120_000)],
            ..Facts::default()
        };
        let c = assess(
            "pod-runtime",
            Some(T),
            T + 60_000,
            &facts,
            &Existing::default(),
        );
        assert_eq!(c.sources[0].status, SourceStatus::Behind);
        assert_eq!(c.sources[0].watermark, None);
    }

    #[test]
    fn gaps_stay_and_name_their_pods_and_deleted_nodes_end() {
        let gap = SourceGap {
            collector: "pods".into(),
            node: "n2".into(),
            gap: Gap {
                from: T + 10_000,
                to: T + 20_000,
                reason: "agent restarted".into(),
                pods: vec!["a/web".into()],
            },
        };
        let facts = Facts {
            marks: vec![
                mark("n1", 0, T + 600_000),
                mark("n1", 1, T + 600_000),
                mark("n2", 0, T + 600_000),
                mark("n2", 1, T + 600_000),
                mark("n3", 0, T + 30_000),
                mark("n3", 1, T + 30_000),
            ],
            gaps: vec![gap],
            event_sources: vec!["tally/a/pods".into(), "billing-app".into()],
        };
        let existing = Existing {
            nodes: Some(["n1".to_string(), "n2".to_string()].into()),
            collectors: Some(["pods".to_string()].into()),
        };
        let c = assess("pod-runtime", Some(T), T + 60_000, &facts, &existing);
        assert_eq!(c.status, Status::Incomplete);
        let by_node: BTreeMap<_, _> = c
            .sources
            .iter()
            .map(|s| (s.node.clone().unwrap(), s))
            .collect();
        assert_eq!(by_node["n1"].status, SourceStatus::Complete);
        assert_eq!(by_node["n2"].status, SourceStatus::Gap);
        assert_eq!(by_node["n2"].missing[0].pods, vec!["a/web".to_string()]);
        assert_eq!(by_node["n3"].status, SourceStatus::Ended);
        assert_eq!(c.unknown[0].source, "billing-app");
        // a range after the gap: nothing behind, but an unmarked source → unknown
        let c = assess(
            "pod-runtime",
            Some(T + 30_000),
            T + 60_000,
            &facts,
            &existing,
        );
        assert_eq!(c.status, Status::Unknown);
        // a deleted Collector's sources end too
        let gone = Existing {
            collectors: Some(BTreeSet::new()),
            ..existing
        };
        let c = assess("pod-runtime", Some(T + 30_000), T + 700_000, &facts, &gone);
        assert!(
            c.sources.iter().all(|s| s.status == SourceStatus::Ended),
            "{c:?}"
        );
    }
}
