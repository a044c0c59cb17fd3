//! A pod's effective requests and limits, computed the way the scheduler does, and
//! Kubernetes quantity parsing.
//!
//! Per resource: app containers and sidecars (init containers with
//! `restartPolicy: Always`) run together, so they add up; each ordinary init container
//! runs alone next to the sidecars declared before it. The pod needs the larger of the
//! two, plus the RuntimeClass `overhead`. Limits are combined the same way (a container
//! without a limit contributes nothing, as `kubectl describe` shows it).
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Effective pod requests and limits: resource name → amount (CPU in cores, memory in
/// bytes, devices as counts).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Resources {
    /// Requests.
    pub requests: BTreeMap<String, f64>,
    /// Limits.
    pub limits: BTreeMap<String, f64>,
}

/// Parses a Kubernetes quantity (`500m`, `1Gi`, `2`, `1.5`, `1e3`, `128974848`) into a
/// number. Written by hand: k8s-openapi keeps quantities as strings and no well-kept
/// crate parses them.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    // `1E` (exa) vs `1e3` (exponent): a trailing bare e/E is the exa suffix.
    let (number, suffix) = match number.strip_suffix(['e', 'E']) {
        Some(n) if suffix.is_empty() => (n, &number[n.len()..]),
        _ => (number, suffix),
    };
    let value: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    value.is_finite().then_some(value * factor)
}

fn amounts(map: Option<&BTreeMap<String, Quantity>>) -> BTreeMap<String, f64> {
    map.into_iter()
        .flatten()
        .filter_map(|(k, v)| parse_quantity(&v.0).map(|n| (k.clone(), n)))
        .collect()
}

fn add(into: &mut BTreeMap<String, f64>, from: &BTreeMap<String, f64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn max_into(into: &mut BTreeMap<String, f64>, from: &BTreeMap<String, f64>) {
    for (k, v) in from {
        let e = into.entry(k.clone()).or_default();
        *e = e.max(*v);
    }
}

fn effective_of(
    spec: &PodSpec,
    pick: impl Fn(&Container) -> BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    let mut sidecars = BTreeMap::new();
    let mut init_peak = BTreeMap::new();
    for c in spec.init_containers.iter().flatten() {
        let own = pick(c);
        if c.restart_policy.as_deref() == Some("Always") {
            add(&mut sidecars, &own);
        } else {
            let mut alone = sidecars.clone();
            add(&mut alone, &own);
            max_into(&mut init_peak, &alone);
        }
    }
    let mut total = sidecars;
    for c in &spec.containers {
        add(&mut total, &pick(c));
    }
    max_into(&mut total, &init_peak);
    add(&mut total, &amounts(spec.overhead.as_ref()));
    total
}

/// The pod's effective requests and limits.
pub fn effective(spec: &PodSpec) -> Resources {
    Resources {
        requests: effective_of(spec, |c| {
            amounts(c.resources.as_ref().and_then(|r| r.requests.as_ref()))
        }),
        limits: effective_of(spec, |c| {
            amounts(c.resources.as_ref().and_then(|r| r.limits.as_ref()))
        }),
    }
}
