//! tally's HTTP edge and the `tally-server` binary.
//!
//! - [`api`]: the HTTP API (OpenMeter v1 compatible), one module per route group,
//!   problems, authentication.
//! - [`budgets`]: UsageBudgets of the manifests folder, evaluated by the standalone
//!   server.
//! - [`catalog`]: the meters served, from manifests in a folder (standalone, with
//!   reload rules) or from the cluster's Ready Meters (`--kubernetes`).
//! - [`metrics`]: the server's Prometheus metrics.
//! - [`server`]: `tally-server` wiring: the standalone server, the ClickHouse-backed
//!   server and the `sink` subcommand.
//!
//! Meter semantics live in `tally-meter`, the stores in `tally-embedded` and
//! `tally-clickhouse`, Kafka in `tally-kafka` (see `ARCHITECTURE.md`).
#![forbid(unsafe_code)]

pub mod api;
pub mod budgets;
pub mod catalog;
pub mod metrics;
pub mod server;
