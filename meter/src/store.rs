//! The store interface: what ingest and the query API need from storage.
//!
//! Contract shared by every store (the conformance tests hold them to it):
//! - an event's identity is (namespace, source, id); the first stored copy wins and
//!   later copies are counted as deduplicated (the embedded store remembers identities
//!   forever; the contract for every store is "dropped within the dedup window");
//! - [`Store::submit`] resolves only once the events are durable;
//! - a meter synced after its events arrived counts them (backfill), exactly once;
//! - queries answer with the engine's semantics ([`crate::engine`]), exact at any
//!   precision of `from`/`to`.
use std::sync::Arc;

use tally_crds::{UsageEvent, Watermark};

use crate::Result;
use crate::completeness::Facts;
use crate::engine::CompiledMeter;
use crate::query::{QueryAnswer, QuerySpec};

/// A meter as a store knows it: the compiled definition and the store's id for its
/// rollup (a new id whenever the rollup definition changes).
#[derive(Clone, Debug)]
pub struct StoredMeter {
    /// The definition.
    pub meter: Arc<CompiledMeter>,
    /// The store's rollup id.
    pub rollup_id: i64,
}

/// Result of one durable ingest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Events stored for the first time.
    pub stored: usize,
    /// Events whose identity was already stored.
    pub deduplicated: usize,
}

/// An ingest in flight: resolves when the events are durable.
pub type Pending = futures_channel::oneshot::Receiver<Result<IngestOutcome>>;

/// A stored event with its per-meter validation errors.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredEvent {
    /// The event.
    pub event: UsageEvent,
    /// When it was stored (ms).
    pub ingested_ms: i64,
    /// `(meter slug, message)` for each meter the event did not count for.
    pub validation_errors: Vec<(String, String)>,
}

/// A Kafka message the sink could not store, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeadLetter {
    /// Kafka partition.
    pub kafka_partition: i32,
    /// Kafka offset.
    pub kafka_offset: i64,
    /// Namespace, when the envelope named a valid one ('' otherwise).
    pub namespace: String,
    /// What is wrong, naming the field.
    pub reason: String,
    /// The payload as received (lossy UTF-8).
    pub payload: String,
    /// When the sink dead-lettered it (Unix seconds).
    pub at: u32,
}

/// A customer-facing (portal) token as a store keeps it: what it grants and whether it
/// was invalidated. The signed token itself is never stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortalTokenRecord {
    /// The token's id (its `jti`).
    pub id: String,
    /// The namespace it reads.
    pub namespace: String,
    /// The one subject it reads.
    pub subject: String,
    /// The meters it may query; empty: every meter of the namespace.
    pub allowed_meter_slugs: Vec<String>,
    /// When it expires (ms).
    pub expires_ms: i64,
    /// When it was issued (ms).
    pub created_ms: i64,
    /// When it was invalidated (ms), if it was.
    pub invalidated_ms: Option<i64>,
}

/// Outcome of [`Store::sync_meters`].
#[derive(Clone, Debug)]
pub struct Synced {
    /// The meters, in the order given, with their rollup ids.
    pub meters: Vec<StoredMeter>,
    /// Rollups no meter uses any more; drop them with [`Store::drop_rollups`] once the
    /// new meters are published.
    pub stale: Vec<i64>,
}

/// Storage behind the API.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// `embedded` or `clickhouse`.
    fn kind(&self) -> &'static str;

    /// Queues events of one namespace (all or nothing). Fails fast with
    /// [`crate::Error::Overloaded`] when the queue is full.
    fn submit(&self, namespace: &str, events: Vec<UsageEvent>) -> Result<Pending>;

    /// Makes the store maintain exactly these meters, backfilling new or changed ones
    /// from raw events. Blocking.
    fn sync_meters(&self, meters: Vec<Arc<CompiledMeter>>) -> Result<Synced>;

    /// Drops rollups returned as stale by [`Store::sync_meters`]. Blocking.
    fn drop_rollups(&self, ids: Vec<i64>) -> Result<()>;

    /// Answers a query. Blocking.
    fn query(&self, meter: &StoredMeter, spec: &QuerySpec, max_rows: usize) -> Result<QueryAnswer>;

    /// Subjects with at least one counted event. Blocking.
    fn subjects(&self, meter: &StoredMeter) -> Result<Vec<String>>;

    /// The most recent events of a namespace, newest first. Blocking.
    fn recent_events(&self, namespace: &str, limit: usize) -> Result<Vec<StoredEvent>>;

    /// The most recent dead letters (of `namespace`, or all), newest first. Stores that validate synchronously
    /// (the embedded store rejects bad events in the request) have none. Blocking.
    fn dead_letters(&self, namespace: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let _ = (namespace, limit);
        Ok(Vec::new())
    }

    /// Records watermarks of one namespace's sources ([`crate::completeness`]),
    /// durably (through Kafka: on every partition, after the events sent before them).
    fn record_watermarks(&self, namespace: &str, marks: Vec<Watermark>) -> Result<Pending>;

    /// What the store holds for a completeness question: the namespace's watermarks,
    /// its gaps overlapping `[from, to)`, and the distinct sources of `event_type`'s
    /// events in the range. Blocking.
    fn completeness_facts(
        &self,
        namespace: &str,
        event_type: &str,
        from_ms: Option<i64>,
        to_ms: i64,
    ) -> Result<Facts>;

    /// Records an issued portal token (before the token is handed out). Blocking.
    fn save_portal_token(&self, token: &PortalTokenRecord) -> Result<()>;

    /// One portal token of a namespace by id, as every replica of the store sees it
    /// (invalidation included). Blocking.
    fn portal_token(&self, namespace: &str, id: &str) -> Result<Option<PortalTokenRecord>>;

    /// The portal tokens of a namespace, newest first. Blocking.
    fn portal_tokens(&self, namespace: &str, limit: usize) -> Result<Vec<PortalTokenRecord>>;

    /// Invalidates the namespace's portal token `id`, or every token of `subject`
    /// issued so far, at `at_ms`; returns how many were valid before (0 when neither is
    /// given). Blocking.
    fn invalidate_portal_tokens(
        &self,
        namespace: &str,
        id: Option<&str>,
        subject: Option<&str>,
        at_ms: i64,
    ) -> Result<usize>;
}
