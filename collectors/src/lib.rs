//! tally's usage sources. Each turns what it observes into CloudEvents of its
//! Collector's namespace, with deterministic ids, plus the checkpoint changes that
//! must become durable *together with* those events.
//!
//! The model (Vector's "acknowledge before you forget", made atomic): a source never
//! writes its own checkpoints. It returns an [`Output`] — events and checkpoint
//! updates — and the agent commits both in one transaction to its disk spool before it
//! asks the source for more. A crash therefore leaves either both (the events will be
//! shipped, the source resumes after them) or neither (the source redoes the work from
//! the old checkpoint, producing the same ids, which dedup absorbs). No transport
//! lives here; the agent owns delivery.
//!
//! Sources: [`pod_runtime`] (+ cgroup usage), [`prometheus`], [`http_api`],
//! [`logs`]. Shared pod helpers (selection, subject precedence) are in
//! [`pods`].
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use tally_crds::CollectorSpec;
use tally_crds::event::CloudEvent;

pub mod http_api;
pub mod logs;
pub mod pod_runtime;
pub mod pods;
pub mod prometheus;

/// What one step of a source produced: events, and checkpoint changes (key → new value,
/// `None` deletes) that take effect only when the events are durably spooled.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Output {
    /// Events, in the order they were produced.
    pub events: Vec<CloudEvent>,
    /// Checkpoint changes, keyed within the collector.
    pub checkpoints: BTreeMap<String, Option<String>>,
    /// How far the source is complete once these events are durable: see [`Mark`].
    pub watermark: Option<Mark>,
}

/// A source's completeness claim ([`tally_crds::watermark`]): every event with `time`
/// before `until_ms` it will ever produce is in this output or an earlier one, except
/// in the `gaps` it names.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Mark {
    /// Complete up to (Unix ms).
    pub until_ms: i64,
    /// Intervals the source could not observe (reported once).
    pub gaps: Vec<tally_crds::Gap>,
}

impl Output {
    /// Whether there is nothing to commit.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.checkpoints.is_empty() && self.watermark.is_none()
    }

    /// Appends another output (later checkpoint values win; the watermark is the later
    /// one's, gaps of both are kept).
    pub fn extend(&mut self, other: Output) {
        self.events.extend(other.events);
        self.checkpoints.extend(other.checkpoints);
        match (&mut self.watermark, other.watermark) {
            (Some(mine), Some(theirs)) => {
                mine.until_ms = mine.until_ms.max(theirs.until_ms);
                mine.gaps.extend(theirs.gaps);
            }
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
    }

    /// Adds gaps to the watermark (keeping its `until`, or 0 when there is none yet).
    pub fn add_gaps(&mut self, gaps: Vec<tally_crds::Gap>) {
        if !gaps.is_empty() {
            self.watermark
                .get_or_insert_with(Mark::default)
                .gaps
                .extend(gaps);
        }
    }
}

/// The identity every event of one Collector shares.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// The Collector's namespace (the tenant).
    pub namespace: String,
    /// The Collector's name.
    pub name: String,
    /// CloudEvent `source`: `tally/<namespace>/<name>`.
    pub source: String,
    /// CloudEvent `type`.
    pub event_type: String,
    /// Constant data entries.
    pub extra_data: BTreeMap<String, String>,
}

impl Origin {
    /// The origin of a Collector's events.
    pub fn new(namespace: &str, name: &str, spec: &CollectorSpec) -> Origin {
        Origin {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source: tally_crds::collector::event_source(namespace, name),
            event_type: spec.event_type.clone(),
            extra_data: spec.extra_data.clone(),
        }
    }

    /// Builds an event; `extra_data` fills keys `data` does not have.
    pub fn event(
        &self,
        id: String,
        subject: String,
        time_ms: i64,
        mut data: Map<String, Value>,
    ) -> CloudEvent {
        for (k, v) in &self.extra_data {
            data.entry(k.clone())
                .or_insert_with(|| Value::String(v.clone()));
        }
        CloudEvent {
            specversion: "1.0".into(),
            id,
            source: self.source.clone(),
            ty: self.event_type.clone(),
            subject,
            time: tally_crds::event::format_ms(time_ms),
            datacontenttype: Some("application/json".into()),
            dataschema: None,
            data: Some(Value::Object(data)),
            extensions: BTreeMap::new(),
        }
    }
}

/// A deterministic event id: 128-bit xxh3 of the parts (separated so `("ab","c")` and
/// `("a","bc")` differ), in hex. The same usage always gets the same id.
pub fn event_id(parts: &[&str]) -> String {
    let mut buf = Vec::new();
    for p in parts {
        buf.extend_from_slice(&(p.len() as u64).to_le_bytes());
        buf.extend_from_slice(p.as_bytes());
    }
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&buf))
}

/// Errors of the sources.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An HTTP request failed or answered with an error status.
    #[error("failed to fetch {url}: {message}")]
    Fetch {
        /// The URL, without query secrets (none are put there).
        url: String,
        /// What happened.
        message: String,
    },
    /// A response could not be understood.
    #[error("failed to parse the response of {url}: {message}")]
    Parse {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The configuration cannot be used (e.g. a regex or JSONPath that does not compile).
    #[error("{field}: {message}")]
    Config {
        /// The field, e.g. `spec.logs.parser.regex`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A header's secret could not be read.
    #[error("failed to read the value of header {header}: {message}")]
    Secret {
        /// The header name.
        header: String,
        /// What happened.
        message: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn config_error(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Config {
        field: field.into(),
        message: message.into(),
    }
}

/// Compiles a JSONPath that must select at most one node, naming the field on error.
pub(crate) fn compile_path(field: &str, path: &str) -> Result<serde_json_path::JsonPath> {
    serde_json_path::JsonPath::parse(path)
        .map_err(|e| config_error(field, format!("not a valid JSONPath ({e})")))
}

/// The one value a path selects in `value`, if any.
pub(crate) fn select_one<'a>(
    path: &serde_json_path::JsonPath,
    value: &'a Value,
) -> Option<&'a Value> {
    path.query(value).at_most_one().ok().flatten()
}

/// Reads an event time from a JSON value: RFC 3339 text or Unix seconds (number or
/// numeric text).
pub(crate) fn time_ms_of(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_f64().map(|s| (s * 1000.0).round() as i64),
        Value::String(s) => tally_crds::event::parse_time_ms(s)
            .ok()
            .or_else(|| s.parse::<f64>().ok().map(|s| (s * 1000.0).round() as i64)),
        _ => None,
    }
}

/// Test helper: the `source id` of each event must equal `pinned`. Ids and sources are
/// a stored contract: an upgrade that changed them would make dedup miss re-sent usage
/// and count it twice. A deliberate change needs a migration, not a new pin.
#[cfg(test)]
pub(crate) fn assert_pinned(collector: &str, events: &[tally_crds::CloudEvent], pinned: &[&str]) {
    let got: Vec<String> = events
        .iter()
        .map(|e| format!("{} {}", e.source, e.id))
        .collect();
    assert_eq!(
        got, pinned,
        "the {collector} collector's event ids or sources changed; upgrades would double count"
    );
}
