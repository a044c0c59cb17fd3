//! The `Collector` custom resource: where usage comes from.
//!
//! A Collector has exactly one source block and a few common fields. The events it
//! produces belong to the Collector's own namespace (the tenant) and carry the stable
//! CloudEvent `source` `tally/<namespace>/<name>`, so an event's identity
//! (namespace, source, id) survives agent restarts and leader failover, and a re-sent
//! event deduplicates.
//!
//! The spec types are the contract twice over: the CRD schema is generated from them,
//! and the agent's configuration file ([`AgentConfig`]) is made of them. The
//! `tally-collectors` crate implements them.
//!
//! Sources and where they run:
//! - [`PodRuntimeSource`] (node): exact running time of pods per aligned window.
//! - [`LogsSource`] (node): usage parsed from container logs or plain files.
//! - [`PrometheusSource`]: node-scoped when it scrapes pods (each node agent scrapes the
//!   pods on its node), cluster-scoped when it scrapes only static URLs.
//! - [`HttpApiSource`] (cluster): cloud and vendor usage APIs, e.g. OpenAI.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::SpecError;

mod agent;
mod http_api;
mod logs;
mod pod_runtime;
mod prometheus;

pub use agent::{AgentConfig, CollectorConfig, Delivery, IngestSink, KafkaSink, SpoolConfig};
pub use http_api::{
    HttpApiSource, HttpHeader, HttpMapping, HttpPreset, OpenAiOptions, OpenAiSubject, SecretKeyRef,
};
pub use logs::{LogFormat, LogMapping, LogParser, LogParserKind, LogPods, LogsSource};
pub use pod_runtime::{CgroupOptions, PodRuntimeSource};
pub use prometheus::{MetricKind, MetricRule, PodTargets, PrometheusSource};

/// Spec of a Collector: one source of usage and how its events look.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tally.dev",
    version = "v1alpha1",
    kind = "Collector",
    plural = "collectors",
    namespaced,
    doc = "A Collector measures usage (pod runtime, Prometheus metrics, vendor APIs, logs) and sends it as CloudEvents of the Collector's namespace.",
    shortname = "col",
    status = "CollectorStatus",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".status.source","description":"Which source block is set"}"#,
    printcolumn = r#"{"name":"Event Type","type":"string","jsonPath":".spec.eventType"}"#,
    printcolumn = r#"{"name":"Ready Agents","type":"string","jsonPath":".status.readyAgents"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Last Event","type":"date","jsonPath":".status.lastEventTime"}"#,
    printcolumn = r#"{"name":"Complete Up To","type":"date","jsonPath":".status.oldestWatermark","description":"The oldest watermark of its agents: every event before it is queryable"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Oldest","type":"string","priority":1,"jsonPath":".status.oldestWatermarkSource","description":"The node whose agent has the oldest watermark"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("[has(self.podRuntime), has(self.prometheus), has(self.httpApi), has(self.logs)].filter(x, x).size() == 1").message("set exactly one source: podRuntime, prometheus, httpApi or logs"),
)]
pub struct CollectorSpec {
    /// The CloudEvent `type` of the events this collector produces; Meters select it.
    #[schemars(length(min = 1, max = 256))]
    pub event_type: String,

    /// Constant entries added to every event's `data` (a value the source produces
    /// under the same key wins).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub extra_data: BTreeMap<String, String>,

    /// Exact running time (and requests, limits and cgroup usage) of selected pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_runtime: Option<PodRuntimeSource>,

    /// Counters and gauges scraped from Prometheus endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSource>,

    /// Usage polled from a cloud or vendor HTTP API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_api: Option<HttpApiSource>,

    /// Usage parsed from container logs or log files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<LogsSource>,
}

/// Where a collector runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// On every node, in the agent DaemonSet: it measures what runs on that node.
    Node,
    /// Once per cluster, in the leader-elected cluster agent.
    Cluster,
}

/// The one source block of a spec, borrowed.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// `podRuntime`
    PodRuntime(&'a PodRuntimeSource),
    /// `prometheus`
    Prometheus(&'a PrometheusSource),
    /// `httpApi`
    HttpApi(&'a HttpApiSource),
    /// `logs`
    Logs(&'a LogsSource),
}

impl Source<'_> {
    /// The field name of the block (`podRuntime`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Source::PodRuntime(_) => "podRuntime",
            Source::Prometheus(_) => "prometheus",
            Source::HttpApi(_) => "httpApi",
            Source::Logs(_) => "logs",
        }
    }

    /// Where this source runs.
    pub fn scope(&self) -> Scope {
        match self {
            Source::PodRuntime(_) | Source::Logs(_) => Scope::Node,
            Source::Prometheus(p) if p.pods.is_some() => Scope::Node,
            Source::Prometheus(_) => Scope::Cluster,
            Source::HttpApi(_) => Scope::Cluster,
        }
    }
}

pub(crate) fn spec_error(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

impl CollectorSpec {
    /// The one source block, or an error when none or several are set.
    pub fn source(&self) -> Result<Source<'_>, SpecError> {
        let mut set = Vec::new();
        if let Some(s) = &self.pod_runtime {
            set.push(Source::PodRuntime(s));
        }
        if let Some(s) = &self.prometheus {
            set.push(Source::Prometheus(s));
        }
        if let Some(s) = &self.http_api {
            set.push(Source::HttpApi(s));
        }
        if let Some(s) = &self.logs {
            set.push(Source::Logs(s));
        }
        match set.as_slice() {
            [one] => Ok(*one),
            [] => Err(spec_error(
                "spec",
                "set exactly one source: podRuntime, prometheus, httpApi or logs",
            )),
            many => Err(spec_error(
                "spec",
                format!(
                    "set exactly one source, found {}",
                    many.iter()
                        .map(Source::name)
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            )),
        }
    }

    /// Checks what the schema cannot: exactly one source, and the source's own rules
    /// (regexes and JSONPaths compile elsewhere; here only structure).
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.event_type.is_empty() {
            return Err(spec_error("spec.eventType", "must not be empty"));
        }
        match self.source()? {
            Source::PodRuntime(s) => s.validate(),
            Source::Prometheus(s) => s.validate(),
            Source::HttpApi(s) => s.validate(),
            Source::Logs(s) => s.validate(),
        }
    }
}

/// The CloudEvent `source` of every event a collector produces: stable across agent
/// restarts and failover, so identity and dedup hold.
pub fn event_source(namespace: &str, name: &str) -> String {
    format!("tally/{namespace}/{name}")
}

/// Which pods a node-scoped source looks at.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSelector {
    /// Namespaces whose pods are selected. Empty means the Collector's own namespace;
    /// `*` means every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 64))]
    pub namespaces: Vec<String>,
    /// Label selector on the pods; absent selects every pod of those namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Observed state of a Collector.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CollectorStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Which source block is set (`podRuntime`, `prometheus`, `httpApi`, `logs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Standard conditions: `Ready` (agents running this collector), `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Agents that should run this collector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_agents: Option<i32>,
    /// Agents running this collector and ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_agents: Option<i32>,
    /// Time of the last event this collector produced, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time: Option<DateTime<Utc>>,
    /// How far every agent running it has delivered: the oldest watermark among the
    /// existing nodes (`GET .../meters/{slug}/completeness` says which interval a
    /// meter lacks). Absent until each agent has delivered one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_watermark: Option<DateTime<Utc>>,
    /// The node (or `cluster`) whose agent has that oldest watermark.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_watermark_source: Option<String>,
}

#[cfg(test)]
mod tests;
