//! The agent's configuration file: what the operator renders into a ConfigMap, and
//! what a person writes by hand to run `tally-agent` outside Kubernetes.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{CollectorSpec, SpecError, spec_error};

/// Configuration of one `tally-agent`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Where events are delivered.
    pub sink: Delivery,
    /// The disk spool that holds events until the sink has them.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Address of `/metrics` and `/healthz`. Default `127.0.0.1:9465`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
    /// The collectors this agent runs (each with the namespace and name of its
    /// Collector object, which fix its events' namespace and `source`).
    #[serde(default)]
    pub collectors: Vec<CollectorConfig>,
}

/// One collector in the agent's configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CollectorConfig {
    /// Namespace of the Collector: the tenant its events belong to.
    pub namespace: String,
    /// Name of the Collector.
    pub name: String,
    /// The Collector's spec.
    pub spec: CollectorSpec,
}

/// Where events go: exactly one of `ingest` and `kafka`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delivery {
    /// The HTTP ingest API of `tally-server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingest: Option<IngestSink>,
    /// Kafka, through the same producer `tally-server` uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSink>,
}

/// Delivery to the ingest API.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngestSink {
    /// Base URL of the server, e.g. `http://tally-server:8080`.
    pub url: String,
    /// File holding a bearer token (a mounted Secret key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// Most events per request. Default 500.
    #[serde(default = "default_batch_events")]
    pub batch_events: u32,
    /// Request timeout in milliseconds. Default 10000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
}

/// Delivery to Kafka.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSink {
    /// Bootstrap brokers, comma separated.
    pub brokers: String,
    /// Topic. Default `tally-events`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// How long a message may wait for delivery before the batch is retried, in
    /// milliseconds. Default 10000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// Most events per batch. Default 5000.
    #[serde(default = "default_kafka_batch_events")]
    pub batch_events: u32,
}

/// The disk spool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the spool (a hostPath or volume, so it survives restarts).
    #[serde(default = "default_spool_path")]
    pub path: String,
    /// Most bytes of undelivered events; when full, collectors wait (their checkpoints
    /// do not advance, so nothing is lost). Default 1 GiB.
    #[serde(default = "default_spool_bytes")]
    pub max_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: default_spool_path(),
            max_bytes: default_spool_bytes(),
        }
    }
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9465".into()
}

fn default_batch_events() -> u32 {
    500
}

fn default_kafka_batch_events() -> u32 {
    5000
}

fn default_timeout_ms() -> u32 {
    10_000
}

fn default_topic() -> String {
    "tally-events".into()
}

fn default_spool_path() -> String {
    "/var/lib/tally-agent/spool".into()
}

fn default_spool_bytes() -> u64 {
    1 << 30
}

impl AgentConfig {
    /// Checks the sink and every collector, naming the offending field.
    pub fn validate(&self) -> Result<(), SpecError> {
        match (&self.sink.ingest, &self.sink.kafka) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(spec_error("sink", "set exactly one of ingest and kafka"));
            }
            (Some(i), None) if i.batch_events == 0 => {
                return Err(spec_error("sink.ingest.batchEvents", "must be at least 1"));
            }
            (None, Some(k)) if k.batch_events == 0 => {
                return Err(spec_error("sink.kafka.batchEvents", "must be at least 1"));
            }
            _ => {}
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in self.collectors.iter().enumerate() {
            if !seen.insert((&c.namespace, &c.name)) {
                return Err(spec_error(
                    format!("collectors[{i}]"),
                    format!("{}/{} is listed twice", c.namespace, c.name),
                ));
            }
            c.spec.validate().map_err(|e| SpecError {
                field: format!("collectors[{i}].{}", e.field),
                message: e.message,
            })?;
        }
        Ok(())
    }
}
