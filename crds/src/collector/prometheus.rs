//! `prometheus`: counters and gauges scraped from Prometheus text endpoints.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{PodSelector, SpecError, spec_error};

impl PodTargets {
    /// The pods these targets select.
    pub fn pod_selector(&self) -> PodSelector {
        PodSelector {
            namespaces: self.namespaces.clone(),
            selector: self.selector.clone(),
        }
    }
}

/// Scrapes Prometheus endpoints. Counters become reset-aware deltas (the first sample
/// after start is a baseline unless a checkpoint exists); gauges become samples. Last
/// values are checkpointed with the events they produced, so a restart neither loses
/// nor double counts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusSource {
    /// Static URLs to scrape (e.g. `http://dcgm-exporter.gpu:9400/metrics`). Static-only
    /// collectors run in the cluster agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 64))]
    pub targets: Vec<String>,

    /// Pods to scrape; each node agent scrapes the selected pods on its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodTargets>,

    /// Seconds between scrapes. Default 15.
    #[serde(default = "default_interval_secs")]
    #[schemars(range(min = 1, max = 3600))]
    pub interval_secs: u32,

    /// Scrape timeout in milliseconds. Default 5000.
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 100, max = 60000))]
    pub timeout_ms: u32,

    /// Which series become events, and how.
    #[schemars(length(min = 1, max = 64))]
    pub metrics: Vec<MetricRule>,

    /// Metric label whose value is the subject. When a series lacks it but carries
    /// `pod` and `namespace` labels of a known pod (as DCGM's do), the pod's subject is
    /// used; otherwise `defaultSubject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_label: Option<String>,

    /// Subject when nothing else names one. Default: the Collector's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_subject: Option<String>,
}

/// Pods scraped by a node agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodTargets {
    /// Namespaces whose pods are scraped. Empty means the Collector's own namespace;
    /// `*` means every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 64))]
    pub namespaces: Vec<String>,
    /// Label selector on the pods; absent selects every pod of those namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Container port serving metrics.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// HTTP path. Default `/metrics`.
    #[serde(default = "default_path")]
    pub path: String,
}

/// A selection of series and what they mean.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricRule {
    /// Exact metric name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Regular expression the whole metric name must match (instead of `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_regex: Option<String>,
    /// Labels that must have exactly these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    /// `counter` (events carry the increase since the last scrape), `gauge` (events
    /// carry the sample) or `gaugeIntegral` (events carry value × seconds per window).
    pub kind: MetricKind,

    /// `gaugeIntegral` only: window length in seconds, aligned to the Unix epoch; one
    /// event per series and window. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub window_secs: Option<u32>,
}

/// How a series is turned into events.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MetricKind {
    /// Monotonic counter: the increase since the last scrape; a value below the last one
    /// is a reset and counts from zero.
    Counter,
    /// The sampled value.
    Gauge,
    /// The gauge integrated over time, per window: each sample's value holds until the
    /// next sample of the series (value × seconds between them, split at window
    /// edges); two samples further apart than 1.5 × `intervalSecs` + `timeoutMs` are a
    /// gap (a missed scrape), which counts nothing and is never interpolated. A sample
    /// timestamp in the exposition is its time; otherwise the scrape's.
    GaugeIntegral,
}

fn default_interval_secs() -> u32 {
    15
}

fn default_timeout_ms() -> u32 {
    5000
}

fn default_path() -> String {
    "/metrics".into()
}

impl PrometheusSource {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if self.targets.is_empty() && self.pods.is_none() {
            return Err(spec_error(
                "spec.prometheus",
                "set targets (static URLs) or pods (selector and port), or both",
            ));
        }
        if self.metrics.is_empty() {
            return Err(spec_error(
                "spec.prometheus.metrics",
                "list at least one metric rule",
            ));
        }
        for (i, m) in self.metrics.iter().enumerate() {
            if m.name.is_some() == m.name_regex.is_some() {
                return Err(spec_error(
                    format!("spec.prometheus.metrics[{i}]"),
                    "set exactly one of name and nameRegex",
                ));
            }
            if m.window_secs.is_some() && m.kind != MetricKind::GaugeIntegral {
                return Err(spec_error(
                    format!("spec.prometheus.metrics[{i}].windowSecs"),
                    "applies to kind gaugeIntegral only",
                ));
            }
            if m.window_secs.is_some_and(|w| w == 0 || 86400 % w != 0) {
                return Err(spec_error(
                    format!("spec.prometheus.metrics[{i}].windowSecs"),
                    "must divide a day evenly (e.g. 60, 300, 3600) so windows align across days",
                ));
            }
        }
        Ok(())
    }
}
