//! The `UsageBudget` custom resource: a limit on a meter's usage per period, with
//! thresholds that act (a signed webhook, a Kubernetes Event, a metric) when crossed.
//!
//! A budget reads one SUM or COUNT meter of its own namespace (other aggregations are
//! refused with the reason: their value can fall, so "crossed" would not be final),
//! optionally one subject and a groupBy filter, over a calendar period (`DAY`, `WEEK`
//! from Monday, `MONTH`, in an IANA zone) or a rolling window (`rolling: 24h`). Each threshold fires once per (budget,
//! subject, period, threshold). What CEL checks here: thresholds name a percent or a
//! value, not both; at most 16 thresholds; `limit` is positive; `perSubject` and
//! `enforce` do not meet (a ResourceQuota is namespace-wide).
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec of a UsageBudget.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tally.dev",
    version = "v1alpha1",
    kind = "UsageBudget",
    plural = "usagebudgets",
    namespaced,
    doc = "A UsageBudget limits a meter's usage per period and acts when thresholds are crossed.",
    shortname = "budget",
    status = "UsageBudgetStatus",
    printcolumn = r#"{"name":"Meter","type":"string","jsonPath":".spec.meter"}"#,
    printcolumn = r#"{"name":"Usage","type":"string","jsonPath":".status.display","description":"usage / limit this period (the largest subject's, per subject)"}"#,
    printcolumn = r#"{"name":"Percent","type":"string","jsonPath":".status.percent"}"#,
    printcolumn = r#"{"name":"Period","type":"string","priority":1,"jsonPath":".status.periodStart"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("!(has(self.perSubject) && self.perSubject && has(self.enforce))").message("enforce applies a namespace-wide ResourceQuota, so it cannot be per subject: drop perSubject or enforce"),
    validation = Rule::new("self.limit > 0.0").message("limit must be positive"),
)]
pub struct UsageBudgetSpec {
    /// The meter (its slug or its Meter name) in this namespace; SUM or COUNT.
    #[schemars(length(min = 1, max = 253))]
    pub meter: String,

    /// Only this subject's usage counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub subject: Option<String>,

    /// Only usage whose groupBy values are among these (as the query API's
    /// `filterGroupBy`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filter_group_by: BTreeMap<String, Vec<String>>,

    /// The period usage is counted over.
    pub period: BudgetPeriod,

    /// The usage the thresholds are percentages of.
    pub limit: f64,

    /// When to act; default: at 100 %.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 16))]
    pub thresholds: Vec<Threshold>,

    /// Evaluate each subject on its own (thresholds fire per subject); else the
    /// namespace's (or `subject`'s) total.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_subject: bool,

    /// A signed webhook called once per crossing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<BudgetWebhook>,

    /// Enforce the budget with Kubernetes' own primitive while it is exceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforce: Option<BudgetEnforce>,
}

/// A calendar period, or a rolling window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.calendar) != has(self.rolling)").message("give period.calendar (DAY, WEEK, MONTH) or period.rolling (e.g. 24h), not both"))]
pub struct BudgetPeriod {
    /// `DAY`, `WEEK` (from Monday 00:00) or `MONTH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calendar: Option<Calendar>,
    /// A rolling window up to now: minutes, hours or days (`90m`, `24h`, `7d`). A
    /// threshold fires when usage over the window crosses it, and re-arms once usage
    /// has fallen back below it (as old usage leaves the window): "once per period" is
    /// once per stretch above the threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[1-9][0-9]{0,4}(m|h|d)$"))]
    pub rolling: Option<String>,
    /// The IANA zone the period starts in (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
}

/// Calendar periods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Calendar {
    /// From local midnight to the next.
    Day,
    /// From Monday 00:00 local to the next Monday.
    Week,
    /// From the first of the month 00:00 local to the next first.
    Month,
}

/// One threshold: a percent of the limit, or a value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.percent) != has(self.value)").message("a threshold gives either percent or value"))]
pub struct Threshold {
    /// Percent of `limit` (e.g. 80, 100, 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub percent: Option<f64>,
    /// A usage value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
}

impl BudgetPeriod {
    /// The rolling window's length in ms (`None` for a calendar period or a malformed
    /// value).
    pub fn rolling_ms(&self) -> Option<i64> {
        let r = self.rolling.as_deref()?;
        let (n, unit) = r.split_at(r.len().checked_sub(1)?);
        let n: i64 = n.parse().ok().filter(|n| *n > 0)?;
        let unit_ms = match unit {
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        Some(n * unit_ms)
    }
}

impl Threshold {
    /// The usage at which it is crossed.
    pub fn at(&self, limit: f64) -> f64 {
        match (self.percent, self.value) {
            (Some(p), _) => limit * p / 100.0,
            (None, Some(v)) => v,
            (None, None) => limit,
        }
    }

    /// How it reads: `80%` or `5000`.
    pub fn label(&self) -> String {
        match (self.percent, self.value) {
            (Some(p), _) => format!("{}%", crate::canonical_f64(p)),
            (None, Some(v)) => crate::canonical_f64(v),
            (None, None) => "100%".into(),
        }
    }
}

/// Where the webhook goes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetWebhook {
    /// A Secret of this namespace with keys `url` and `secret` (the Standard Webhooks
    /// signing secret, `whsec_<base64>`).
    pub secret_ref: SecretName,
}

/// A Secret by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretName {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Enforcement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetEnforce {
    /// A ResourceQuota owned by the budget, present while the budget is exceeded.
    pub resource_quota: QuotaEnforcement,
}

/// The ResourceQuota applied while exceeded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QuotaEnforcement {
    /// The quota's `hard` (e.g. `requests.nvidia.com/gpu: "0"`); name every resource the
    /// meter bills (MIG profiles, `<class>.deviceclass.resource.k8s.io/devices`).
    pub hard: BTreeMap<String, String>,
}

/// What the evaluator last saw.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageBudgetStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The current period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<DateTime<Utc>>,
    /// Its end (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_end: Option<DateTime<Utc>>,
    /// Usage this period (per subject: the largest subject's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<f64>,
    /// Usage in percent of the limit, e.g. `82.5%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<String>,
    /// `usage / limit`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// Per subject: the subjects with the most usage (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_subjects: Vec<SubjectUsage>,
    /// Per subject: how many subjects are at or over the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects_over_limit: Option<u64>,
    /// `Ready` (evaluated; `MeterNotFound`, `MeterNotSummable`), `Exceeded`,
    /// `Failed` (a webhook given up).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One subject's usage.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubjectUsage {
    /// The subject.
    pub subject: String,
    /// Its usage this period.
    pub usage: f64,
}
