//! tally's meter semantics, with no I/O: what a meter counts and how, and what every
//! store must answer.
//!
//! - [`engine`]: compiled meters, JSONPath values and group-by, partial states, windows.
//! - [`query`]: query parameters, their parsing, and the store-independent re-windowing.
//! - [`store`]: the `Store` contract that ingest and the query API rely on.
//! - [`conformance`]: the cases every store is held to (each store's tests run them).
//!
//! This crate links no async runtime, database or Kafka client (a test in `tests/`
//! checks it), so the operator, the stores and the API share one definition of a meter.
#![forbid(unsafe_code)]

pub mod budget;
pub mod completeness;
pub mod conformance;
pub mod engine;
pub mod error;
pub mod query;
pub mod store;

pub use error::{BoxError, Error, Result};
