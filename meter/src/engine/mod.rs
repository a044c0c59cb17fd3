//! The meter engine: which events a meter counts, what value and group each one
//! contributes, and how contributions aggregate. Every store uses this module, so the
//! embedded store and ClickHouse share one semantics.
//!
//! # Semantics
//! - **Selection**: an event counts for a meter when it is in the meter's namespace,
//!   its `type` equals `eventType`, its `time` is not before `eventFrom`, and every
//!   filter condition holds.
//! - **Paths**: `valueProperty`, `groupBy` and filter properties are singular JSONPaths
//!   into `data` (see [`path`]), checked when a meter is loaded.
//! - **Canonical strings** (group-by values, UNIQUE_COUNT values, `eq`/`ne`/`in`/`notIn`):
//!   a string is itself; a number its shortest decimal form (`1.0` → `1`); a boolean
//!   `true`/`false`; missing or null is null (group-by value null; UNIQUE_COUNT skips
//!   the event with an error). An object or array is a per-meter validation error.
//! - **Numbers** (SUM, AVG, MIN, MAX, LATEST): a JSON number or a string that parses as
//!   a finite f64. Missing, null, non-numeric, NaN or ±Inf make the event not count *for
//!   that meter only*; the reason is recorded as a per-meter validation error that the
//!   events API lists. COUNT reads no value.
//! - **Filters**: conditions are ANDed. `eq`/`ne`/`in`/`notIn` compare canonical strings
//!   (a missing property equals nothing, so `ne`/`notIn` hold for it); `exists` holds
//!   when the property is present and not null; `gt`/`gte`/`lt`/`lte` compare numbers
//!   and never hold for a non-number. A filter never produces a validation error.
//! - **LATEST** is the value of the event with the greatest time; ties go to the event
//!   ingested last, then to the greater id.
//! - **States** ([`state::State`]) are mergeable: minute rollups re-window exactly to
//!   hours, days and months ([`window`]).
pub mod path;
pub mod state;
pub mod window;

use std::collections::BTreeMap;

use serde_json::Value;
use tally_crds::{Aggregation, FilterOperator, Meter, MeterSpec, UsageEvent, canonical_string};

use self::path::SingularPath;
use self::state::Input;

/// A meter ready to evaluate events: its paths compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledMeter {
    /// Kubernetes namespace whose events the meter counts.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The slug the API serves it under.
    pub slug: String,
    /// The spec as written.
    pub spec: MeterSpec,
    value: Option<SingularPath>,
    group_by: Vec<(String, SingularPath)>,
    filter: Vec<Filter>,
    event_from_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq)]
struct Filter {
    path: SingularPath,
    op: FilterOperator,
    values: Vec<String>,
    number: Option<f64>,
}

/// A problem with a meter definition, naming the field (shared with the Collector
/// checks in `tally-crds`).
pub use tally_crds::SpecError;

/// What one event contributes to one meter.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution {
    /// The event's subject.
    pub subject: String,
    /// Group-by values in the order of [`CompiledMeter::group_names`].
    pub groups: Vec<Option<String>>,
    /// The value.
    pub input: Input,
}

impl CompiledMeter {
    /// Compiles a Meter resource, checking everything the CRD schema and CEL rules check
    /// (the standalone server has no API server to do it) plus JSONPath syntax and
    /// singularity. Returns every problem.
    pub fn compile(meter: &Meter) -> Result<CompiledMeter, Vec<SpecError>> {
        let spec = &meter.spec;
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: String| {
            errors.push(SpecError {
                field: field.to_string(),
                message,
            })
        };
        let name = meter.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            bad("metadata.name", "is required".into());
        }
        let slug = meter.effective_slug();
        if !tally_crds::meter::is_valid_slug(&slug) {
            let field = if spec.slug.is_some() {
                "spec.slug"
            } else {
                "metadata.name"
            };
            bad(
                field,
                format!(
                    "slug {slug:?} must match ^[a-z0-9]+(_[a-z0-9]+)*$ and be at most 64 characters (set spec.slug to choose one)"
                ),
            );
        }
        if spec.event_type.is_empty() {
            bad("spec.eventType", "must not be empty".into());
        }
        let value = match (&spec.value_property, spec.aggregation) {
            (Some(_), Aggregation::Count) => {
                bad(
                    "spec.valueProperty",
                    "is forbidden for COUNT (COUNT counts events; remove valueProperty or use SUM)"
                        .into(),
                );
                None
            }
            (None, agg) if agg.needs_value() => {
                bad(
                    "spec.valueProperty",
                    format!("is required for {}", agg.as_str()),
                );
                None
            }
            (Some(p), _) => SingularPath::parse(p)
                .map_err(|e| bad("spec.valueProperty", e))
                .ok(),
            (None, _) => None,
        };
        let mut group_by = Vec::new();
        for (k, p) in &spec.group_by {
            if !tally_crds::meter::is_valid_group_by_name(k) {
                bad(
                    &format!("spec.groupBy.{k}"),
                    "names must match ^[a-zA-Z_][a-zA-Z0-9_]*$ and must not be 'subject'".into(),
                );
            }
            match SingularPath::parse(p) {
                Ok(path) => group_by.push((k.clone(), path)),
                Err(e) => bad(&format!("spec.groupBy.{k}"), e),
            }
        }
        let mut filter = Vec::new();
        for (i, c) in spec.filter.iter().enumerate() {
            let field = format!("spec.filter[{i}]");
            let n = c.values.len();
            let arity_ok = match c.operator {
                FilterOperator::Exists => n == 0,
                FilterOperator::In | FilterOperator::NotIn => n >= 1,
                _ => n == 1,
            };
            if !arity_ok {
                bad(
                    &format!("{field}.values"),
                    format!(
                        "{:?} takes {}, got {n}",
                        c.operator,
                        match c.operator {
                            FilterOperator::Exists => "no values",
                            FilterOperator::In | FilterOperator::NotIn => "one or more values",
                            _ => "exactly one value",
                        }
                    ),
                );
            }
            let number = match c.operator {
                FilterOperator::Gt
                | FilterOperator::Gte
                | FilterOperator::Lt
                | FilterOperator::Lte => {
                    let parsed = c
                        .values
                        .first()
                        .and_then(|v| v.parse::<f64>().ok())
                        .filter(|f| f.is_finite());
                    if parsed.is_none() && arity_ok {
                        bad(
                            &format!("{field}.values"),
                            format!(
                                "{:?} compares numbers; {:?} is not a number",
                                c.operator, c.values[0]
                            ),
                        );
                    }
                    parsed
                }
                _ => None,
            };
            match SingularPath::parse(&c.property) {
                Ok(path) => filter.push(Filter {
                    path,
                    op: c.operator,
                    values: c.values.clone(),
                    number,
                }),
                Err(e) => bad(&format!("{field}.property"), e),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CompiledMeter {
            namespace: meter.effective_namespace().to_string(),
            name,
            slug,
            spec: spec.clone(),
            value,
            group_by,
            filter,
            event_from_ms: spec.event_from.map(|t| t.timestamp_millis()),
        })
    }

    /// The compiled `valueProperty`.
    pub fn value_path(&self) -> Option<&SingularPath> {
        self.value.as_ref()
    }

    /// The compiled group-bys, sorted by name.
    pub fn group_paths(&self) -> impl Iterator<Item = (&str, &SingularPath)> {
        self.group_by.iter().map(|(k, p)| (k.as_str(), p))
    }

    /// The compiled filter: `(path, operator, values, number for gt/gte/lt/lte)`.
    pub fn filters(
        &self,
    ) -> impl Iterator<Item = (&SingularPath, FilterOperator, &[String], Option<f64>)> {
        self.filter
            .iter()
            .map(|f| (&f.path, f.op, f.values.as_slice(), f.number))
    }

    /// `spec.eventFrom` in ms.
    pub fn event_from_ms(&self) -> Option<i64> {
        self.event_from_ms
    }

    /// The aggregation.
    pub fn aggregation(&self) -> Aggregation {
        self.spec.aggregation
    }

    /// Group-by names, sorted.
    pub fn group_names(&self) -> impl Iterator<Item = &str> {
        self.group_by.iter().map(|(k, _)| k.as_str())
    }

    /// Number of group-by dimensions.
    pub fn group_count(&self) -> usize {
        self.group_by.len()
    }

    /// Position of a group-by name.
    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.group_by.iter().position(|(k, _)| k == name)
    }

    /// The fields whose change alters stored rollups (everything but `description`);
    /// stores compare it to decide whether a rollup must be rebuilt.
    pub fn rollup_definition(&self) -> String {
        let mut spec = self.spec.clone();
        spec.description = None;
        spec.slug = Some(self.slug.clone());
        serde_json::to_string(&spec).unwrap_or_default()
    }

    /// The fields the CRD declares immutable, for reload checks.
    pub fn immutable_fields(&self) -> BTreeMap<&'static str, String> {
        let s = &self.spec;
        BTreeMap::from([
            ("slug", self.slug.clone()),
            ("eventType", s.event_type.clone()),
            ("aggregation", s.aggregation.as_str().to_string()),
            (
                "valueProperty",
                s.value_property.clone().unwrap_or_default(),
            ),
            (
                "filter",
                serde_json::to_string(&s.filter).unwrap_or_default(),
            ),
            (
                "eventFrom",
                s.event_from.map(|t| t.to_rfc3339()).unwrap_or_default(),
            ),
        ])
    }

    /// Whether the meter looks at events of this namespace and type at all.
    pub fn selects(&self, namespace: &str, ty: &str) -> bool {
        self.namespace == namespace && self.spec.event_type == ty
    }

    /// Evaluates one event (already known to be of this meter's namespace and type).
    /// `Ok(None)`: the event does not count (before `eventFrom`, or filtered out).
    /// `Err`: a per-meter validation error; the event does not count for this meter.
    pub fn evaluate(&self, event: &UsageEvent) -> Result<Option<Contribution>, String> {
        if self.event_from_ms.is_some_and(|from| event.time_ms < from) {
            return Ok(None);
        }
        let empty = serde_json::Map::new();
        let data = event.data.as_ref().unwrap_or(&empty);
        for f in &self.filter {
            if !f.holds(f.path.get_in(data)) {
                return Ok(None);
            }
        }
        let mut groups = Vec::with_capacity(self.group_by.len());
        for (name, path) in &self.group_by {
            match path.get_in(data) {
                None | Some(Value::Null) => groups.push(None),
                Some(v) => match canonical_string(v) {
                    Some(s) => groups.push(Some(s)),
                    None => {
                        return Err(format!(
                            "groupBy {name} ({path}) is {}, expected a string, number or boolean",
                            tally_crds::event::kind(v)
                        ));
                    }
                },
            }
        }
        let input = match (self.spec.aggregation, &self.value) {
            (Aggregation::Count, _) | (_, None) => Input::None,
            (Aggregation::UniqueCount, Some(path)) => match path.get_in(data) {
                None | Some(Value::Null) => {
                    return Err(format!("valueProperty {path} is missing or null"));
                }
                Some(v) => match canonical_string(v) {
                    Some(s) => Input::Text(s),
                    None => {
                        return Err(format!(
                            "valueProperty {path} is {}, expected a string, number or boolean",
                            tally_crds::event::kind(v)
                        ));
                    }
                },
            },
            (_, Some(path)) => Input::Number(number_at(path, data)?),
        };
        Ok(Some(Contribution {
            subject: event.subject.clone(),
            groups,
            input,
        }))
    }
}

fn number_at(path: &SingularPath, data: &serde_json::Map<String, Value>) -> Result<f64, String> {
    let v = match path.get_in(data) {
        None | Some(Value::Null) => return Err(format!("valueProperty {path} is missing or null")),
        Some(v) => v,
    };
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(f) if f.is_finite() => Ok(f),
        _ => Err(format!(
            "valueProperty {path} is {v}, expected a finite number or numeric string"
        )),
    }
}

impl Filter {
    fn holds(&self, v: Option<&Value>) -> bool {
        let v = v.filter(|v| !v.is_null());
        let text = || v.and_then(canonical_string);
        let num = || {
            v.and_then(|v| match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            })
            .filter(|f| f.is_finite())
        };
        let cmp = |f: fn(f64, f64) -> bool| match (num(), self.number) {
            (Some(a), Some(b)) => f(a, b),
            _ => false,
        };
        match self.op {
            FilterOperator::Exists => v.is_some(),
            FilterOperator::Eq => text().is_some_and(|t| t == self.values[0]),
            FilterOperator::Ne => text().is_none_or(|t| t != self.values[0]),
            FilterOperator::In => text().is_some_and(|t| self.values.contains(&t)),
            FilterOperator::NotIn => text().is_none_or(|t| !self.values.contains(&t)),
            FilterOperator::Gt => cmp(|a, b| a > b),
            FilterOperator::Gte => cmp(|a, b| a >= b),
            FilterOperator::Lt => cmp(|a, b| a < b),
            FilterOperator::Lte => cmp(|a, b| a <= b),
        }
    }
}

#[cfg(test)]
mod tests;
