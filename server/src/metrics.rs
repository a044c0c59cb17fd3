//! Prometheus metrics of `tally-server` (prefix `tally_`).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the request histogram: the route template (bounded), method and status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Route template, e.g. `/api/v1/meters/{slug}/query`.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// Status code.
    pub status: u16,
}

/// Labels of the reload counter: what was re-read (`meters` or `tokens`) and whether
/// all of it took effect (`applied`) or some was refused and the previous version
/// stays (`rejected`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `meters` (the manifests folder) or `tokens` (the tokens files).
    pub what: String,
    /// `applied` or `rejected`.
    pub outcome: String,
}

impl ReloadLabels {
    /// Labels for one reload.
    pub fn new(what: &str, applied: bool) -> ReloadLabels {
        ReloadLabels {
            what: what.into(),
            outcome: if applied { "applied" } else { "rejected" }.into(),
        }
    }
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Events stored for the first time.
    pub events_accepted: Counter,
    /// Events rejected by validation.
    pub events_rejected: Counter,
    /// Events dropped as duplicates of a stored identity.
    pub events_deduplicated: Counter,
    /// Requests refused because the server was at capacity.
    pub requests_overloaded: Counter,
    /// Request latency.
    pub http_request_duration: Family<HttpLabels, Histogram>,
    /// Re-reads of changed manifests or tokens files, by outcome.
    pub reloads: Family<ReloadLabels, Counter>,
    /// Budget thresholds crossed (recorded once each).
    pub budget_crossings: Counter,
    /// Budget webhooks accepted (2xx) by their receiver.
    pub budget_webhooks_delivered: Counter,
    /// Budget webhook attempts that failed (each is retried).
    pub budget_webhook_failures: Counter,
    /// Budget webhooks given up after the last attempt.
    pub budget_webhooks_given_up: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tally");
        let events_accepted = Counter::default();
        let events_rejected = Counter::default();
        let events_deduplicated = Counter::default();
        let requests_overloaded = Counter::default();
        let http_request_duration = Family::<HttpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "events_accepted",
            "Events stored for the first time",
            events_accepted.clone(),
        );
        registry.register(
            "events_rejected",
            "Events rejected by validation",
            events_rejected.clone(),
        );
        registry.register(
            "events_deduplicated",
            "Events dropped as duplicates of a stored (namespace, source, id)",
            events_deduplicated.clone(),
        );
        registry.register(
            "requests_overloaded",
            "Requests answered 503 because the server was at capacity",
            requests_overloaded.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "reloads",
            "Re-reads of changed meter manifests or tokens files, by what and outcome",
            reloads.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency",
            http_request_duration.clone(),
        );
        let budget_crossings = Counter::default();
        let budget_webhooks_delivered = Counter::default();
        let budget_webhook_failures = Counter::default();
        let budget_webhooks_given_up = Counter::default();
        for (name, help, c) in [
            (
                "budget_crossings",
                "UsageBudget thresholds crossed (each recorded once per budget, subject, period and threshold)",
                &budget_crossings,
            ),
            (
                "budget_webhooks_delivered",
                "UsageBudget webhooks accepted (2xx) by their receiver",
                &budget_webhooks_delivered,
            ),
            (
                "budget_webhook_failures",
                "UsageBudget webhook attempts that failed (retried with backoff)",
                &budget_webhook_failures,
            ),
            (
                "budget_webhooks_given_up",
                "UsageBudget webhooks given up after the last attempt",
                &budget_webhooks_given_up,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        Metrics {
            registry,
            budget_crossings,
            budget_webhooks_delivered,
            budget_webhook_failures,
            budget_webhooks_given_up,
            events_accepted,
            events_rejected,
            events_deduplicated,
            requests_overloaded,
            http_request_duration,
            reloads,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
