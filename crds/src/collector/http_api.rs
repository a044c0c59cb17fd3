//! `httpApi`: usage polled from cloud and vendor HTTP APIs.
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{SpecError, spec_error};

/// Polls a usage API over closed time buckets. Each poll asks for the buckets that
/// closed since the last delivered one (`{start}`/`{end}` in the URL), follows cursor
/// pagination, and maps items to events with ids that are stable across polls, so an
/// overlapping poll deduplicates. A bucket still filling is never emitted: dedup would
/// freeze it at a partial value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpApiSource {
    /// A preset for a known API; it fills `url`, pagination and mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<HttpPreset>,

    /// URL with placeholders `{start}` and `{end}` (Unix seconds of the requested
    /// range) and `{start_rfc3339}`/`{end_rfc3339}`. With a preset: its base URL
    /// (default `https://api.openai.com` for `openai`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,

    /// Request headers. Secret values come from a Secret of the Collector's namespace
    /// (`valueFromSecret`, which the operator mounts into the agent, never copying it
    /// into the configuration); a hand-written agent configuration reads them from
    /// its environment or files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 16))]
    pub headers: Vec<HttpHeader>,

    /// Seconds between polls. Default 300.
    #[serde(default = "default_interval_secs")]
    #[schemars(range(min = 1, max = 86400))]
    pub interval_secs: u32,

    /// Bucket length in seconds: a range is requested only up to the last bucket
    /// boundary that lies `delaySecs` in the past. Default 60.
    #[serde(default = "default_bucket_secs")]
    #[schemars(range(min = 1, max = 86400))]
    pub bucket_secs: u32,

    /// How long after a bucket closes the API is trusted to report it completely.
    /// Default 120.
    #[serde(default = "default_delay_secs")]
    #[schemars(range(min = 0, max = 86400))]
    pub delay_secs: u32,

    /// Where to start when there is no checkpoint (a first start, or a new leader on
    /// another node): this many seconds before now. Overlap deduplicates. Default 3600.
    #[serde(default = "default_lookback_secs")]
    #[schemars(range(min = 0, max = 2678400))]
    pub lookback_secs: u32,

    /// Request timeout in milliseconds. Default 10000.
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 100, max = 120000))]
    pub timeout_ms: u32,

    /// How items map to events (generic API; not with a preset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<HttpMapping>,

    /// Options of the `openai` preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openai: Option<OpenAiOptions>,
}

/// Known usage APIs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum HttpPreset {
    /// OpenAI organization usage API, completions (`/v1/organization/usage/completions`),
    /// grouped by project, API key and model: one event per closed bucket and group with
    /// input, output and cached token counts.
    Openai,
}

/// One request header whose value is read by the agent at request time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHeader {
    /// Header name, e.g. `Authorization`.
    pub name: String,
    /// Text put before the secret value, e.g. `Bearer `.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Environment variable holding the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from_env: Option<String>,
    /// File holding the value (a mounted Secret key); trailing newlines are dropped.
    /// Only in a hand-written agent configuration: a Collector may not read the
    /// agent's files (use `valueFromSecret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from_file: Option<String>,
    /// A key of a Secret in the Collector's namespace. The operator mounts it into the
    /// agent and hands the agent the file's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from_secret: Option<SecretKeyRef>,
    /// A literal value, for what is not secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A key of a Secret in the Collector's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key in its `data`.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// How a generic API's items become events. Paths are JSONPath; `items` may select
/// many nodes, the others are evaluated on one item and must be singular.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMapping {
    /// Selects the items of a response page, e.g. `$.data[*]`.
    pub items: String,
    /// The item's stable id (the same usage must have the same id in every poll).
    pub id: String,
    /// The item's subject.
    pub subject: String,
    /// The item's time: RFC 3339 text or Unix seconds.
    pub time: String,
    /// The item's value, put into `data.value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// More `data` entries: key → JSONPath into the item.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
    /// JSONPath of the next page's cursor in a response; absent or null ends paging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// Query parameter that carries the cursor in the next request. Default `page`.
    #[serde(default = "default_cursor_param")]
    pub cursor_param: String,
}

/// Options of the `openai` preset.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenAiOptions {
    /// What the subject is: the project (default) or the API key.
    #[serde(default)]
    pub subject: OpenAiSubject,
}

/// Subject of OpenAI usage events.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OpenAiSubject {
    /// `project_id`
    #[default]
    Project,
    /// `api_key_id`
    ApiKey,
}

fn default_interval_secs() -> u32 {
    300
}

fn default_bucket_secs() -> u32 {
    60
}

fn default_delay_secs() -> u32 {
    120
}

fn default_lookback_secs() -> u32 {
    3600
}

fn default_timeout_ms() -> u32 {
    10_000
}

fn default_cursor_param() -> String {
    "page".into()
}

impl HttpApiSource {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        match (self.preset, &self.mapping) {
            (Some(_), Some(_)) => {
                return Err(spec_error(
                    "spec.httpApi.mapping",
                    "a preset defines the mapping; remove mapping or preset",
                ));
            }
            (None, None) => {
                return Err(spec_error(
                    "spec.httpApi",
                    "set a preset (openai) or a url and a mapping",
                ));
            }
            (None, Some(_)) if self.url.is_none() => {
                return Err(spec_error("spec.httpApi.url", "required without a preset"));
            }
            _ => {}
        }
        if self.preset == Some(HttpPreset::Openai) && ![60, 3600, 86400].contains(&self.bucket_secs)
        {
            return Err(spec_error(
                "spec.httpApi.bucketSecs",
                "the OpenAI usage API has 1m, 1h and 1d buckets: use 60, 3600 or 86400",
            ));
        }
        for (i, h) in self.headers.iter().enumerate() {
            let sources = [
                h.value_from_env.is_some(),
                h.value_from_file.is_some(),
                h.value_from_secret.is_some(),
                h.value.is_some(),
            ];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err(spec_error(
                    format!("spec.httpApi.headers[{i}]"),
                    "set exactly one of valueFromSecret, valueFromEnv, valueFromFile and value",
                ));
            }
        }
        Ok(())
    }
}
