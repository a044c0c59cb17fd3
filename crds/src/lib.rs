//! tally's contract: every type a user writes in YAML or sends over the wire.
//!
//! - [`Meter`] (`meters.tally.dev/v1alpha1`): what to count and how. Its schema, with
//!   CEL rules for what OpenAPI alone cannot say, is generated from these types by the
//!   `crdgen` binary (`make generate`) and committed as `crds/*.yaml`.
//! - [`Collector`] (`collectors.tally.dev/v1alpha1`): where usage comes from; its
//!   source types are also the agent's configuration file ([`collector::AgentConfig`]).
//! - [`UsageBudget`] (`usagebudgets.tally.dev/v1alpha1`): a limit on a meter's usage
//!   per period, with thresholds that act.
//! - [`event`]: the usage event, CloudEvents 1.0 in JSON, with validation that reports
//!   every problem by field name.
//! - [`envelope`]: the Kafka message (key and versioned payload) producers write and the
//!   sink reads; [`watermark`]: the completeness record that travels the same way.
//!
//! This crate does no I/O and depends on no other tally crate.
#![forbid(unsafe_code)]

pub mod budget;
pub mod collector;
pub mod envelope;
pub mod event;
pub mod meter;
pub mod watermark;

pub use budget::{UsageBudget, UsageBudgetSpec, UsageBudgetStatus};
pub use collector::{Collector, CollectorSpec, CollectorStatus};
pub use envelope::Envelope;
pub use event::{CloudEvent, EventError, UsageEvent};
pub use meter::{
    Aggregation, FilterCondition, FilterOperator, Meter, MeterSpec, MeterStatus, MeterStorage,
    canonical_f64, canonical_number, canonical_string,
};
pub use watermark::{Gap, Message, Watermark};

/// A spec (Meter, Collector, agent configuration) that breaks a rule the schema
/// cannot express, naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// Path of the offending field, e.g. `spec.valueProperty` or
    /// `spec.prometheus.metrics[0]`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for SpecError {}

/// The API group of every tally custom resource.
pub const GROUP: &str = "tally.dev";

/// Every CRD this crate defines, as `kubectl apply` should get it: [`kube::CustomResourceExt::crd`]
/// with the integer formats schemars writes for Rust's sized integers (`uint16`,
/// `uint32`, …) replaced by the bounds they mean. Kubernetes knows only `int32` and
/// `int64` and answers every other format with `Warning: unrecognized format` on apply;
/// it never enforced them, so the bounds are what validates.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    [Meter::crd(), Collector::crd(), UsageBudget::crd()]
        .into_iter()
        .map(|crd| {
            let mut v = serde_json::to_value(&crd).expect("a CRD serializes");
            integer_formats_to_bounds(&mut v);
            serde_json::from_value(v).expect("a CRD deserializes")
        })
        .collect()
}

/// The Meter CRD as [`crds`] renders it.
pub fn meter_crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    crds().swap_remove(0)
}

/// The Collector CRD as [`crds`] renders it.
pub fn collector_crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    crds().swap_remove(1)
}

/// The UsageBudget CRD as [`crds`] renders it.
pub fn budget_crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    crds().swap_remove(2)
}

/// Replaces the sized-integer formats Kubernetes does not know by the bounds they
/// stand for (kept when the schema already narrows them).
fn integer_formats_to_bounds(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let bounds = match map.get("format").and_then(|f| f.as_str()) {
                Some("uint8") => Some((0.0, Some(u8::MAX as f64))),
                Some("uint16") => Some((0.0, Some(u16::MAX as f64))),
                Some("uint32") => Some((0.0, Some(u32::MAX as f64))),
                Some("uint64" | "uint") => Some((0.0, None)),
                Some("int8") => Some((i8::MIN as f64, Some(i8::MAX as f64))),
                Some("int16") => Some((i16::MIN as f64, Some(i16::MAX as f64))),
                _ => None,
            };
            // `number` needs no format, and apply warns about `double`
            if matches!(
                map.get("format").and_then(|f| f.as_str()),
                Some("double" | "float")
            ) {
                map.remove("format");
            }
            if let Some((min, max)) = bounds {
                map.remove("format");
                map.entry("minimum").or_insert(serde_json::json!(min));
                if let Some(max) = max {
                    map.entry("maximum").or_insert(serde_json::json!(max));
                }
            }
            map.values_mut().for_each(integer_formats_to_bounds);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integer_formats_to_bounds),
        _ => {}
    }
}

/// Renders every CRD this crate defines ([`crds`]), in the order `make generate` writes
/// them, as `(file name, YAML)`.
pub fn render_crds() -> Vec<(String, String)> {
    crds()
        .into_iter()
        .zip([
            "crds/src/meter.rs",
            "crds/src/collector/",
            "crds/src/budget.rs",
        ])
        .map(|(crd, from)| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_yaml::to_string(&crd).expect("a CRD always serializes to YAML");
            (
                format!("{name}.yaml"),
                format!("# Generated by `make generate` from {from}; do not edit.\n{yaml}"),
            )
        })
        .collect()
}

#[cfg(test)]
mod crd_tests {
    #[test]
    fn no_crd_carries_a_format_kubernetes_does_not_know() {
        fn formats(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::String(f)) = m.get("format") {
                        out.push(f.clone());
                    }
                    m.values().for_each(|v| formats(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| formats(v, out)),
                _ => {}
            }
        }
        for crd in super::crds() {
            let mut found = Vec::new();
            formats(&serde_json::to_value(&crd).unwrap(), &mut found);
            for f in found {
                assert!(
                    ["int32", "int64", "date-time"].contains(&f.as_str()),
                    "{:?}: format {f}",
                    crd.metadata.name
                );
            }
        }
    }

    #[test]
    fn sized_integer_formats_become_bounds() {
        let mut v = serde_json::json!({"properties": {
            "a": {"type": "integer", "format": "uint32", "minimum": 1.0},
            "b": {"type": "integer", "format": "uint16"},
            "c": {"type": "integer", "format": "int64"}}});
        super::integer_formats_to_bounds(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"properties": {
                "a": {"type": "integer", "minimum": 1.0, "maximum": 4294967295.0},
                "b": {"type": "integer", "minimum": 0.0, "maximum": 65535.0},
                "c": {"type": "integer", "format": "int64"}}})
        );
    }
}
