//! The operator's `/metrics` (prometheus-client registry, prefix `tally_operator`):
//! reconciles, failures by static category, and reconcile duration, per controller.
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of per-controller series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// `meter`.
    pub controller: &'static str,
}

/// Labels of failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabel {
    /// `meter`.
    pub controller: &'static str,
    /// A static category ([`crate::Error::category`]).
    pub reason: &'static str,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Reconciles run.
    pub reconciles: Family<ControllerLabel, Counter>,
    /// Reconciles that failed, by category.
    pub failures: Family<FailureLabel, Counter>,
    /// Reconcile duration, seconds.
    pub duration: Family<ControllerLabel, Histogram>,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// UsageBudget thresholds crossed (recorded once each).
    pub budget_crossings: Counter,
    /// UsageBudget webhooks accepted (2xx).
    pub budget_webhooks_delivered: Counter,
    /// UsageBudget webhook attempts that failed (retried).
    pub budget_webhook_failures: Counter,
    /// UsageBudget webhooks given up.
    pub budget_webhooks_given_up: Counter,
    /// UsageBudgets exceeded at the last evaluation.
    pub budgets_exceeded: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0])
            }),
            leader: Gauge::default(),
            budget_crossings: Counter::default(),
            budget_webhooks_delivered: Counter::default(),
            budget_webhook_failures: Counter::default(),
            budget_webhooks_given_up: Counter::default(),
            budgets_exceeded: Gauge::default(),
            registry: Registry::default(),
        };
        let r = m.registry.sub_registry_with_prefix("tally_operator");
        r.register("reconciles", "Reconciles run", m.reconciles.clone());
        r.register(
            "reconcile_failures",
            "Reconciles that failed, by category",
            m.failures.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            m.duration.clone(),
        );
        r.register(
            "leader",
            "Whether this replica holds the leader Lease",
            m.leader.clone(),
        );
        for (name, help, c) in [
            (
                "budget_crossings",
                "UsageBudget thresholds crossed (each recorded once per budget, subject, period and threshold)",
                &m.budget_crossings,
            ),
            (
                "budget_webhooks_delivered",
                "UsageBudget webhooks accepted (2xx) by their receiver",
                &m.budget_webhooks_delivered,
            ),
            (
                "budget_webhook_failures",
                "UsageBudget webhook attempts that failed (retried with backoff)",
                &m.budget_webhook_failures,
            ),
            (
                "budget_webhooks_given_up",
                "UsageBudget webhooks given up after the last attempt",
                &m.budget_webhooks_given_up,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        r.register(
            "budgets_exceeded",
            "UsageBudgets at or over their limit at the last evaluation",
            m.budgets_exceeded.clone(),
        );
        m
    }
}

impl Metrics {
    /// Counts a reconcile of `controller`; the guard records its duration when dropped.
    pub fn reconcile(&self, controller: &'static str) -> Timer<'_> {
        self.reconciles
            .get_or_create(&ControllerLabel { controller })
            .inc();
        Timer {
            metrics: self,
            controller,
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn failure(&self, controller: &'static str, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabel { controller, reason })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Records a reconcile's duration when dropped.
#[derive(Debug)]
pub struct Timer<'a> {
    metrics: &'a Metrics,
    controller: &'static str,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&ControllerLabel {
                controller: self.controller,
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}
