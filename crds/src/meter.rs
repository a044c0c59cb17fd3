//! The `Meter` custom resource: what to count and how.
//!
//! A Meter selects CloudEvents of one `type` in its own Kubernetes namespace, optionally
//! filters them, extracts a value and group-by values by singular JSONPath and
//! aggregates them per subject and time window. What the OpenAPI schema cannot express
//! is enforced with CEL rules so the API server rejects a bad Meter:
//! - `valueProperty` is forbidden for `COUNT` and required for every other aggregation;
//! - group-by names are identifiers and `subject` is reserved;
//! - a filter condition carries the number of values its operator takes;
//! - `slug`, `eventType`, `aggregation`, `valueProperty`, `filter` and `eventFrom` are
//!   immutable (changing them would silently change the meaning of past totals).
//!
//! Whether a JSONPath is *singular* and compiles is checked when a meter is loaded
//! (`tally_meter::engine`), since CEL cannot parse JSONPath.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// Longest slug a meter may have (it names tables and URLs).
pub const MAX_SLUG_LEN: usize = 64;

/// Spec of a Meter: which events count and how they are aggregated.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tally.dev",
    version = "v1alpha1",
    kind = "Meter",
    plural = "meters",
    namespaced,
    doc = "A Meter turns CloudEvents of one type in its namespace into usage numbers per subject and time window.",
    shortname = "mtr",
    status = "MeterStatus",
    printcolumn = r#"{"name":"Slug","type":"string","jsonPath":".status.slug","description":"Slug used in the query API"}"#,
    printcolumn = r#"{"name":"Event Type","type":"string","jsonPath":".spec.eventType"}"#,
    printcolumn = r#"{"name":"Aggregation","type":"string","jsonPath":".spec.aggregation"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason","description":"Why the meter is (not) ready"}"#,
    printcolumn = r#"{"name":"Backfill","type":"string","priority":1,"jsonPath":".status.storage.backfill"}"#,
    printcolumn = r#"{"name":"Rollup","type":"string","priority":1,"jsonPath":".status.storage.rollupTable"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(
    validation = Rule::new("self.aggregation == 'COUNT' ? !has(self.valueProperty) : has(self.valueProperty)").message("valueProperty is forbidden for COUNT and required for every other aggregation"),
    validation = Rule::new("has(self.slug) == has(oldSelf.slug) && (!has(self.slug) || self.slug == oldSelf.slug)").message("slug is immutable"),
    validation = Rule::new("self.eventType == oldSelf.eventType").message("eventType is immutable: create a new Meter instead"),
    validation = Rule::new("self.aggregation == oldSelf.aggregation").message("aggregation is immutable: create a new Meter instead"),
    validation = Rule::new("has(self.valueProperty) == has(oldSelf.valueProperty) && (!has(self.valueProperty) || self.valueProperty == oldSelf.valueProperty)").message("valueProperty is immutable: create a new Meter instead"),
    validation = Rule::new("has(self.filter) == has(oldSelf.filter) && (!has(self.filter) || self.filter == oldSelf.filter)").message("filter is immutable: create a new Meter instead"),
    validation = Rule::new("has(self.eventFrom) == has(oldSelf.eventFrom) && (!has(self.eventFrom) || self.eventFrom == oldSelf.eventFrom)").message("eventFrom is immutable: create a new Meter instead"),
)]
pub struct MeterSpec {
    /// Name of the meter in the query API (`/api/v1/meters/{slug}`). Defaults to
    /// `metadata.name` with `-` and `.` replaced by `_`. Lowercase letters and digits in
    /// `_`-separated words, at most 64 characters. Unique within the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        regex(pattern = r"^[a-z0-9]+(_[a-z0-9]+)*$")
    )]
    pub slug: Option<String>,

    /// Free text shown by the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// The CloudEvent `type` this meter counts; compared exactly.
    #[schemars(length(min = 1, max = 256))]
    pub event_type: String,

    /// How values are combined within a window.
    pub aggregation: Aggregation,

    /// Singular JSONPath into the event's `data` selecting the value to aggregate,
    /// e.g. `$.tokens` or `$.usage[0].input`. Forbidden for COUNT, required otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^\$"))]
    pub value_property: Option<String>,

    /// Dimensions to group by: name → singular JSONPath into `data`. Names are
    /// identifiers (`^[a-zA-Z_][a-zA-Z0-9_]*$`); `subject` is reserved (it is always
    /// available as a group-by in queries).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = Rule::new("self.all(k, k.matches('^[a-zA-Z_][a-zA-Z0-9_]*$') && k != 'subject')").message("groupBy names must match ^[a-zA-Z_][a-zA-Z0-9_]*$ and must not be 'subject'"))]
    #[x_kube(validation = Rule::new("self.all(k, self[k].startsWith('$'))").message("groupBy values are JSONPaths starting with '$'"))]
    pub group_by: BTreeMap<String, String>,

    /// Events whose `time` is earlier than this (RFC 3339) are ignored by this meter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_from: Option<DateTime<Utc>>,

    /// Conditions on the event's `data`, all of which must hold for an event to count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("maxItems" = 32))]
    pub filter: Vec<FilterCondition>,
}

/// The seven aggregations a meter can compute.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Aggregation {
    /// Sum of the values.
    Sum,
    /// Number of events (no value needed).
    Count,
    /// Arithmetic mean of the values.
    Avg,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Number of distinct values (exact).
    UniqueCount,
    /// Value of the event with the greatest time (ties: ingested last, then greater id).
    Latest,
}

impl Aggregation {
    /// The name used in manifests and the API (`SUM`, `UNIQUE_COUNT`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "SUM",
            Aggregation::Count => "COUNT",
            Aggregation::Avg => "AVG",
            Aggregation::Min => "MIN",
            Aggregation::Max => "MAX",
            Aggregation::UniqueCount => "UNIQUE_COUNT",
            Aggregation::Latest => "LATEST",
        }
    }

    /// Whether the aggregation reads `valueProperty`.
    pub fn needs_value(self) -> bool {
        self != Aggregation::Count
    }

    /// Whether the value must be numeric (everything but COUNT and UNIQUE_COUNT).
    pub fn is_numeric(self) -> bool {
        !matches!(self, Aggregation::Count | Aggregation::UniqueCount)
    }
}

/// One condition on the event's `data`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("self.operator == 'exists' ? (!has(self.values) || size(self.values) == 0) : (has(self.values) && (self.operator in ['in', 'notIn'] ? size(self.values) >= 1 : size(self.values) == 1))").message("exists takes no values, in and notIn take one or more, the other operators exactly one"))]
pub struct FilterCondition {
    /// Singular JSONPath into `data`, e.g. `$.status`.
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^\$"))]
    pub property: String,
    /// How the property is compared with `values`.
    pub operator: FilterOperator,
    /// Values to compare with, written as strings (`"200"`); numbers and booleans in a
    /// manifest are accepted and turned into their canonical string. `eq`/`ne`/`in`/
    /// `notIn` compare canonical strings; `gt`/`gte`/`lt`/`lte` compare numbers.
    #[serde(
        default,
        deserialize_with = "canonical_values",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(extend("maxItems" = 256))]
    #[schemars(inner(length(max = 1024)))]
    pub values: Vec<String>,
}

/// Filter operators.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FilterOperator {
    /// Canonical string equals the single value.
    Eq,
    /// Canonical string differs from the single value (a missing property differs).
    Ne,
    /// Canonical string is one of the values.
    In,
    /// Canonical string is none of the values (a missing property is none).
    NotIn,
    /// The property is present and not null.
    Exists,
    /// Number greater than the value.
    Gt,
    /// Number greater than or equal to the value.
    Gte,
    /// Number less than the value.
    Lt,
    /// Number less than or equal to the value.
    Lte,
}

/// Observed state of a Meter.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The slug the query API serves this meter under (defaulted from the name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slug: Option<String>,
    /// Standard conditions: `Ready` (serving queries), `Degraded` (with what to fix).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Where the meter's rollup lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<MeterStorage>,
}

/// Storage details of a meter's rollup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterStorage {
    /// `embedded` or `clickhouse`.
    pub store: String,
    /// Table holding the one-minute rollup the query API reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollup_table: Option<String>,
    /// Whether the backfill from raw events has completed for `rollupTable`.
    #[serde(default)]
    pub backfilled: bool,
    /// Events stored from this time on reach the rollup through its view; earlier ones
    /// were backfilled from the raw table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover: Option<DateTime<Utc>>,
    /// A rollup being built (a new meter, or a changed `groupBy`) and not yet served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_rollup_table: Option<String>,
    /// Progress of the backfill of the pending rollup, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<String>,
    /// The previously served rollup, kept until `retireAt` so queries already planned
    /// on it finish; then dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_rollup_table: Option<String>,
    /// When `retiringRollupTable` is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<DateTime<Utc>>,
}

impl Meter {
    /// The slug the API serves this meter under: `spec.slug`, or the name with `-` and
    /// `.` replaced by `_`.
    pub fn effective_slug(&self) -> String {
        match &self.spec.slug {
            Some(slug) => slug.clone(),
            None => default_slug(self.metadata.name.as_deref().unwrap_or_default()),
        }
    }

    /// The namespace whose events this meter counts (`default` when unset).
    pub fn effective_namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
}

/// The default slug for a meter name: `-` and `.` become `_`.
pub fn default_slug(name: &str) -> String {
    name.replace(['-', '.'], "_")
}

/// Whether `slug` is a valid slug (`^[a-z0-9]+(_[a-z0-9]+)*$`, at most 64 characters).
pub fn is_valid_slug(slug: &str) -> bool {
    !slug.is_empty()
        && slug.len() <= MAX_SLUG_LEN
        && slug.split('_').all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// Whether `name` is a valid group-by name (`^[a-zA-Z_][a-zA-Z0-9_]*$`, not `subject`).
pub fn is_valid_group_by_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name != "subject"
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The canonical string of a scalar JSON value: a string is itself, a number its
/// shortest decimal form (`1.0` → `1`), a boolean `true`/`false`. `None` for null,
/// objects and arrays (the caller decides whether that is an error).
pub fn canonical_string(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(canonical_number(n)),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// Shortest decimal form of a JSON number: integers print as integers, `1.0` as `1`,
/// other floats by Rust's shortest round-trip formatting (`1.5`, `0.1`, `1e300`).
pub fn canonical_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    canonical_f64(f)
}

/// Shortest decimal form of a finite f64 (`1.0` → `1`, `-0.0` → `0`).
pub fn canonical_f64(f: f64) -> String {
    if f == 0.0 {
        return "0".to_string();
    }
    if f.fract() == 0.0 && f.abs() < 1e15 {
        return format!("{}", f as i64);
    }
    format!("{f}")
}

fn canonical_values<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let raw = Vec::<serde_json::Value>::deserialize(d)?;
    raw.iter()
        .map(|v| {
            canonical_string(v).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "filter values must be strings, numbers or booleans, got {v}"
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_slug_replaces_dashes_and_dots() {
        assert_eq!(default_slug("llm-tokens.v2"), "llm_tokens_v2");
    }

    #[test]
    fn slug_pattern_matches_the_schema() {
        for ok in ["a", "api_requests", "x1_2", &"a".repeat(64)] {
            assert!(is_valid_slug(ok), "{ok}");
        }
        for bad in ["", "A", "a__b", "_a", "a_", "a-b", &"a".repeat(65)] {
            assert!(!is_valid_slug(bad), "{bad}");
        }
    }

    #[test]
    fn group_by_names_are_identifiers_and_subject_is_reserved() {
        assert!(is_valid_group_by_name("model"));
        assert!(is_valid_group_by_name("_x9"));
        assert!(!is_valid_group_by_name("subject"));
        assert!(!is_valid_group_by_name("9a"));
        assert!(!is_valid_group_by_name("a-b"));
        assert!(!is_valid_group_by_name(""));
    }

    #[test]
    fn canonical_strings_of_scalars() {
        use serde_json::json;
        assert_eq!(canonical_string(&json!("x")).as_deref(), Some("x"));
        assert_eq!(canonical_string(&json!(1)).as_deref(), Some("1"));
        assert_eq!(canonical_string(&json!(1.0)).as_deref(), Some("1"));
        assert_eq!(canonical_string(&json!(1.5)).as_deref(), Some("1.5"));
        assert_eq!(canonical_string(&json!(-0.0)).as_deref(), Some("0"));
        assert_eq!(canonical_string(&json!(0.1)).as_deref(), Some("0.1"));
        assert_eq!(canonical_string(&json!(true)).as_deref(), Some("true"));
        assert_eq!(canonical_string(&json!(null)), None);
        assert_eq!(canonical_string(&json!([1])), None);
    }

    #[test]
    fn filter_values_accept_numbers_in_manifests() {
        let c: FilterCondition =
            serde_yaml::from_str("property: $.status\noperator: in\nvalues: [200, \"201\", true]")
                .unwrap();
        assert_eq!(c.values, vec!["200", "201", "true"]);
    }
}
