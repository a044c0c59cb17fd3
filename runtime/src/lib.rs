//! What every tally binary (`tally-server`, `tally-server sink`, `tally-operator`,
//! `tally-agent`) runs the same way, so they behave alike for whoever operates them:
//! - [`telemetry::init`]: logs to stdout, filtered by `RUST_LOG` (default `info`);
//! - [`admin::serve`]: `/healthz` and `/metrics` (OpenMetrics text) on an address,
//!   port 0 allowed, the bound address logged as `<what> listening on addr=HOST:PORT`;
//! - [`shutdown::signal`]: resolves on SIGINT or SIGTERM;
//! - [`lease::campaign`]: joins a leader election on a `coordination.k8s.io` Lease.
#![forbid(unsafe_code)]

pub mod admin;
pub mod lease;
pub mod shutdown;
pub mod telemetry;
