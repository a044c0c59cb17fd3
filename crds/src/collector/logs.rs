//! `logs`: usage parsed from container logs or plain log files.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{PodSelector, SpecError, spec_error};

/// Tails container logs of selected pods on this node
/// (`/var/log/pods/<namespace>_<pod>_<uid>/<container>/*.log`, CRI format, partial
/// lines merged) or, outside Kubernetes, plain files by glob. Each line is parsed as
/// JSON or by a regex with named groups and mapped to an event whose id is derived from
/// the file's fingerprint and the line's offset, so a re-read deduplicates. Offsets are
/// checkpointed together with the events they produced; rotation and truncation are
/// followed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogsSource {
    /// Pods whose container logs are read (on this node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<LogPods>,

    /// Plain files by glob (outside Kubernetes), e.g. `/var/log/app/*.log`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 16))]
    pub paths: Vec<String>,

    /// Line format: `cri` (the kubelet's `time stream P|F message`) or `plain`.
    /// Default: `cri` for pods, `plain` for paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormat>,

    /// How a message is parsed; lines that do not parse are skipped and counted.
    pub parser: LogParser,

    /// How a parsed line becomes an event.
    pub mapping: LogMapping,

    /// Where the kubelet writes pod logs, as the agent sees it. Default `/var/log/pods`.
    #[serde(default = "default_pod_log_root")]
    pub pod_log_root: String,

    /// Seconds between looks for new data, files and rotations. Default 1.
    #[serde(default = "default_poll_secs")]
    #[schemars(range(min = 1, max = 60))]
    pub poll_secs: u32,
}

/// Pods whose logs are read.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogPods {
    /// Namespaces whose pods are read. Empty means the Collector's own namespace; `*`
    /// means every namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Label selector on the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Containers whose logs are read; empty reads all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    /// Pod label whose value is the subject when the mapping names none and the pod has
    /// no subject annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_label: Option<String>,
}

impl LogPods {
    /// The pods selected.
    pub fn pod_selector(&self) -> PodSelector {
        PodSelector {
            namespaces: self.namespaces.clone(),
            selector: self.selector.clone(),
        }
    }
}

/// Line framing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LogFormat {
    /// `2024-05-01T10:00:00.123456789Z stdout F message`; `P` pieces are merged.
    Cri,
    /// The whole line is the message.
    Plain,
}

/// How a message is parsed into an object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogParser {
    /// `json`: the message is a JSON object. `regex`: named groups become string fields.
    pub kind: LogParserKind,
    /// The regular expression (for `regex`), e.g.
    /// `^tokens=(?P<tokens>\d+) user=(?P<user>\S+)$`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// Parser kinds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LogParserKind {
    /// JSON object per line.
    Json,
    /// Regex with named groups.
    Regex,
}

/// Mapping from a parsed line (JSON object, or the regex's named groups as strings) to
/// an event; JSONPaths must be singular.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogMapping {
    /// Only lines where this path exists become events (e.g. `$.usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Subject. Default: the pod's subject (annotation, `subjectLabel`, namespace), or
    /// the Collector's namespace for plain files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Event time (RFC 3339 or Unix seconds). Default: the CRI timestamp, or the time
    /// the line was read for plain files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// `data` entries: key → JSONPath. Empty copies the whole parsed object.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub data: BTreeMap<String, String>,
}

fn default_pod_log_root() -> String {
    "/var/log/pods".into()
}

fn default_poll_secs() -> u32 {
    1
}

impl LogsSource {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if self.pods.is_some() != self.paths.is_empty() {
            return Err(spec_error(
                "spec.logs",
                "set exactly one of pods (container logs) and paths (plain files)",
            ));
        }
        match (self.parser.kind, &self.parser.regex) {
            (LogParserKind::Regex, None) => Err(spec_error(
                "spec.logs.parser.regex",
                "required when kind is regex",
            )),
            (LogParserKind::Json, Some(_)) => Err(spec_error(
                "spec.logs.parser.regex",
                "only used when kind is regex",
            )),
            _ => Ok(()),
        }
    }

    /// The line format in effect.
    pub fn effective_format(&self) -> LogFormat {
        self.format.unwrap_or(if self.pods.is_some() {
            LogFormat::Cri
        } else {
            LogFormat::Plain
        })
    }
}
