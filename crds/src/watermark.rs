//! Completeness watermarks: how far one collector on one node has delivered.
//!
//! A watermark `until` says: **every event with `time < until` this source will ever
//! produce has been sent before this record**. The agent sends it only after the
//! events spooled before it were acknowledged, and through Kafka it is written to
//! every partition of the topic, after those events, so once the sink has stored the
//! record on a partition, every earlier event of the source on that partition is
//! stored (a partition is applied in offset order). A source is therefore complete up
//! to the smallest `until` stored over all `partitions` partitions.
//!
//! A **gap** is an interval the source knows it could not observe (the agent was not
//! watching the node's pods between two processes, say), with the pods known to be
//! affected. A gap never closes by a later watermark: only a proof that nothing was
//! missed keeps a source from reporting one.
//!
//! On the wire (Kafka payload, same versioning as [`crate::Envelope`]):
//! `{"v":1,"namespace":…,"watermark":{…}}`; the ingest API takes the inner objects as
//! a JSON array at `POST /api/v1/namespaces/{ns}/watermarks`.
use serde::{Deserialize, Serialize};

use crate::envelope::{ENVELOPE_VERSION, is_namespace};
use crate::event::EventError;

/// How far one source (a Collector on a node) has delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// The Collector's name (its namespace is the record's).
    pub collector: String,
    /// The node the collector runs on; empty for cluster-scoped collectors.
    #[serde(default)]
    pub node: String,
    /// The CloudEvent `source` of the collector's events.
    pub source: String,
    /// The event types the collector produces.
    pub types: Vec<String>,
    /// Every event with `time` before this (Unix ms) has been sent.
    pub until: i64,
    /// Intervals the source could not observe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<Gap>,
    /// How many Kafka partitions this watermark was written to (each gets a copy); 0
    /// when it did not go through Kafka.
    #[serde(default)]
    pub partitions: i32,
}

/// An interval a source could not observe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// Start, Unix ms.
    pub from: i64,
    /// End, Unix ms (exclusive).
    pub to: i64,
    /// Why, in words a user can act on.
    pub reason: String,
    /// Pods known to be affected (`namespace/name`); others may be.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
}

/// Longest names and lists a watermark may carry (it is stored as is).
const MAX_TEXT: usize = 512;
const MAX_ITEMS: usize = 1000;

impl Watermark {
    /// Checks the fields; each error names its field.
    pub fn validate(&self) -> Result<(), Vec<EventError>> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: &str| {
            errors.push(EventError {
                field: field.to_string(),
                message: message.to_string(),
            })
        };
        if self.collector.is_empty() || self.collector.len() > MAX_TEXT {
            bad(
                "collector",
                "must be the Collector's name (1-512 characters)",
            );
        }
        if self.node.len() > MAX_TEXT {
            bad("node", "must be at most 512 characters");
        }
        if self.source.is_empty() || self.source.len() > MAX_TEXT {
            bad(
                "source",
                "must be the events' CloudEvent source (1-512 characters)",
            );
        }
        if self.types.is_empty() || self.types.len() > MAX_ITEMS {
            bad("types", "must list the event types the collector produces");
        }
        if self
            .types
            .iter()
            .any(|t| t.is_empty() || t.len() > MAX_TEXT)
        {
            bad("types", "every type must be 1-512 characters");
        }
        if self.until < 0 {
            bad("until", "must be Unix milliseconds (not negative)");
        }
        if self.partitions < 0 {
            bad("partitions", "must not be negative");
        }
        if self.gaps.len() > MAX_ITEMS {
            bad("gaps", "at most 1000 per record");
        }
        for (i, g) in self.gaps.iter().enumerate() {
            if g.from < 0 || g.to <= g.from {
                bad(
                    &format!("gaps[{i}]"),
                    "from and to must be Unix milliseconds with from < to",
                );
            }
            if g.reason.is_empty() || g.reason.len() > 4 * MAX_TEXT {
                bad(
                    &format!("gaps[{i}].reason"),
                    "must say why (1-2048 characters)",
                );
            }
            if g.pods.len() > MAX_ITEMS {
                bad(&format!("gaps[{i}].pods"), "at most 1000 pods");
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The Kafka payload of this watermark for `namespace`.
    pub fn to_payload(&self, namespace: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "v": ENVELOPE_VERSION,
            "namespace": namespace,
            "watermark": self,
        }))
        .expect("a watermark always serializes")
    }
}

/// A Kafka message of tally's topic: an event or a watermark.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// A usage event: namespace, event, `ingested_at`.
    Event(String, crate::UsageEvent, i64),
    /// A watermark of a namespace's source.
    Watermark(String, Watermark),
}

impl From<(String, crate::UsageEvent, i64)> for Message {
    fn from((ns, ev, at): (String, crate::UsageEvent, i64)) -> Message {
        Message::Event(ns, ev, at)
    }
}

impl Message {
    /// Decodes a payload; the error names the field. Payloads without a `watermark`
    /// are envelopes ([`crate::Envelope::decode`]).
    pub fn decode(bytes: &[u8]) -> Result<Message, String> {
        let raw: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("payload is not JSON: {e}"))?;
        let Some(mark) = raw.get("watermark") else {
            let (ns, ev, at) = crate::Envelope::decode(bytes)?;
            return Ok(Message::Event(ns, ev, at));
        };
        if raw.get("v").and_then(|v| v.as_u64()) != Some(u64::from(ENVELOPE_VERSION)) {
            return Err(format!(
                "v: envelope version {} is not supported (this build reads version {ENVELOPE_VERSION})",
                raw.get("v").map_or("missing".into(), |v| v.to_string())
            ));
        }
        let namespace = raw
            .get("namespace")
            .and_then(|n| n.as_str())
            .filter(|n| is_namespace(n))
            .ok_or("namespace: must be a Kubernetes namespace name (RFC 1123 label)")?;
        let mark: Watermark = serde_json::from_value(mark.clone())
            .map_err(|e| format!("watermark: not a watermark ({e})"))?;
        mark.validate().map_err(|errors| {
            errors
                .iter()
                .map(|e| format!("watermark.{}: {}", e.field, e.message))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        Ok(Message::Watermark(namespace.to_string(), mark))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark() -> Watermark {
        Watermark {
            collector: "pods".into(),
            node: "node-a".into(),
            source: "tally/team-a/pods".into(),
            types: vec!["pod-runtime".into()],
            until: 1_700_000_060_000,
            gaps: vec![Gap {
                from: 1_700_000_000_000,
                to: 1_700_000_030_000,
                reason: "agent restarted".into(),
                pods: vec!["team-a/web-1".into()],
            }],
            partitions: 3,
        }
    }

    #[test]
    fn a_watermark_round_trips_through_its_payload_and_events_still_decode() {
        let m = mark();
        assert_eq!(
            Message::decode(&m.to_payload("team-a")).unwrap(),
            Message::Watermark("team-a".into(), m)
        );
        let ev = serde_json::json!({"specversion":"1.0","id":"e1","source":"s","type":"t",
            "subject":"acme","time":"2024-01-01T00:00:00Z"});
        let ev = crate::UsageEvent::from_json(&ev, 0).unwrap();
        let env = crate::Envelope::new("team-a", &ev, 5);
        assert_eq!(
            Message::decode(&env.to_bytes()).unwrap(),
            Message::Event("team-a".into(), ev, 5)
        );
    }

    #[test]
    fn invalid_watermarks_are_refused_naming_the_field() {
        let mut m = mark();
        m.types.clear();
        m.gaps[0].to = m.gaps[0].from;
        let err = Message::decode(&m.to_payload("team-a")).unwrap_err();
        assert!(err.contains("watermark.types"), "{err}");
        assert!(err.contains("watermark.gaps[0]"), "{err}");
        let err = Message::decode(&mark().to_payload("Bad")).unwrap_err();
        assert!(err.starts_with("namespace"), "{err}");
        let err =
            Message::decode(br#"{"v":1,"namespace":"a","watermark":{"until":1}}"#).unwrap_err();
        assert!(err.starts_with("watermark: not a watermark"), "{err}");
    }
}
