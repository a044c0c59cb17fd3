//! The Kafka message every producer of usage (the server's ingest API, the node agent)
//! writes, and the sink reads.
//!
//! - **Key**: `<namespace>/<subject>`, so one customer's events share a partition and a
//!   re-sent event (same namespace and subject) lands where its first copy did. Namespaces
//!   cannot contain `/`, so the key is unambiguous.
//! - **Payload**: JSON `{"v":1,"namespace":…,"ingested_at":…,"event":{CloudEvent}}` with
//!   the event's `time` at millisecond precision and `ingested_at` in Unix milliseconds
//!   (when the producer accepted the event). Readers reject versions they do not know
//!   (the sink dead-letters them) rather than guess.
use serde::{Deserialize, Serialize};

use crate::event::{CloudEvent, EventError, UsageEvent};

/// The envelope version this crate writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;

/// One usage event on its way through Kafka.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version ([`ENVELOPE_VERSION`]).
    pub v: u32,
    /// The Kubernetes namespace (tenant) the event belongs to.
    pub namespace: String,
    /// When the producer accepted the event, Unix milliseconds.
    pub ingested_at: i64,
    /// The event, as CloudEvents JSON with millisecond time.
    pub event: CloudEvent,
}

impl Envelope {
    /// Wraps a validated event.
    pub fn new(namespace: &str, event: &UsageEvent, ingested_ms: i64) -> Envelope {
        Envelope {
            v: ENVELOPE_VERSION,
            namespace: namespace.to_string(),
            ingested_at: ingested_ms,
            event: event.to_cloud_event(),
        }
    }

    /// The message key: `<namespace>/<subject>`.
    pub fn key(&self) -> String {
        message_key(&self.namespace, &self.event.subject)
    }

    /// The payload bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }

    /// Parses and validates a payload: the envelope's shape and version, the namespace,
    /// and the event exactly as the ingest API validates it. The error says what is
    /// wrong, naming the field.
    pub fn decode(bytes: &[u8]) -> Result<(String, UsageEvent, i64), String> {
        let raw: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("payload is not JSON: {e}"))?;
        let v = raw.get("v").and_then(|v| v.as_u64());
        if v != Some(u64::from(ENVELOPE_VERSION)) {
            return Err(format!(
                "v: envelope version {} is not supported (this build reads version {ENVELOPE_VERSION})",
                raw.get("v")
                    .map_or("missing".to_string(), |v| v.to_string())
            ));
        }
        let namespace = raw
            .get("namespace")
            .and_then(|n| n.as_str())
            .filter(|n| is_namespace(n))
            .ok_or("namespace: must be a Kubernetes namespace name (RFC 1123 label)")?;
        let ingested = raw
            .get("ingested_at")
            .and_then(|n| n.as_i64())
            .ok_or("ingested_at: must be Unix milliseconds (an integer)")?;
        let event = raw.get("event").ok_or("event: is required")?;
        let event = UsageEvent::from_json(event, ingested).map_err(|errors| {
            errors
                .iter()
                .map(|EventError { field, message }| format!("event.{field}: {message}"))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        Ok((namespace.to_string(), event, ingested))
    }
}

/// The Kafka message key of an event: `<namespace>/<subject>`.
pub fn message_key(namespace: &str, subject: &str) -> String {
    format!("{namespace}/{subject}")
}

/// Whether `s` is a valid Kubernetes namespace name (an RFC 1123 label).
pub fn is_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> UsageEvent {
        let v = serde_json::json!({"specversion":"1.0","id":"e1","source":"s","type":"t",
            "subject":"acme","time":"2024-01-01T00:00:00.123Z","data":{"n":1}});
        UsageEvent::from_json(&v, 0).unwrap()
    }

    #[test]
    fn round_trips_and_keys_by_namespace_and_subject() {
        let env = Envelope::new("team-a", &event(), 42);
        assert_eq!(env.key(), "team-a/acme");
        let (ns, ev, at) = Envelope::decode(&env.to_bytes()).unwrap();
        assert_eq!((ns.as_str(), at), ("team-a", 42));
        assert_eq!(ev, event());
    }

    #[test]
    fn rejects_unknown_versions_bad_namespaces_and_invalid_events() {
        let mut env = serde_json::to_value(Envelope::new("a", &event(), 1)).unwrap();
        env["v"] = 2.into();
        let err = Envelope::decode(env.to_string().as_bytes()).unwrap_err();
        assert!(err.starts_with("v: envelope version 2"), "{err}");
        env["v"] = 1.into();
        env["namespace"] = "Bad_NS".into();
        assert!(
            Envelope::decode(env.to_string().as_bytes())
                .unwrap_err()
                .starts_with("namespace")
        );
        env["namespace"] = "a".into();
        env["event"]["id"] = "".into();
        let err = Envelope::decode(env.to_string().as_bytes()).unwrap_err();
        assert!(err.starts_with("event.id"), "{err}");
        assert!(
            Envelope::decode(b"{")
                .unwrap_err()
                .starts_with("payload is not JSON")
        );
    }
}
