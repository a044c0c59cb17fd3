//! tally's data plane: the meter engine, ingest, stores and the query API.
//!
//! - [`engine`]: what a meter counts and how (the shared semantics of every store).
//! - [`store`]: the store interface and the embedded SQLite store.
//! - [`clickhouse`]: the ClickHouse schema, per-meter rollups, provisioning with exact
//!   backfill, and the ClickHouse store.
//! - [`kafka`]: the one producer of usage envelopes, topic set-up, consumer settings.
//! - [`sink`]: Kafka → ClickHouse, exactly once.
//! - [`query`]: query parameters and the store-independent re-windowing.
//! - [`manifests`]: Meter YAML loaded from a folder (standalone), with reload rules.
//! - [`api`]: the HTTP API (OpenMeter v1 compatible), problems, metrics.
//! - [`server`]: `tally-server` wiring.
#![forbid(unsafe_code)]

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod clickhouse;
#[cfg(feature = "server")]
pub mod engine;
pub mod error;
#[cfg(feature = "producer")]
pub mod kafka;
#[cfg(feature = "server")]
pub mod kubernetes;
#[cfg(feature = "server")]
pub mod manifests;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod query;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod sink;
#[cfg(feature = "server")]
pub mod store;

pub use error::{Error, Result};
