//! What every pod-aware source shares: which pods a Collector selects, and who a pod's
//! usage belongs to.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::{Map, Value};
use tally_crds::collector::PodSelector;

/// Annotation naming a pod's subject (first choice).
pub const SUBJECT_ANNOTATION: &str = "tally.dev/subject";
/// OpenMeter's subject annotation (second choice, so OpenMeter users keep theirs).
pub const OPENMETER_SUBJECT_ANNOTATION: &str = "openmeter.io/subject";
/// Prefix of annotations whose values are copied into event data.
pub const DATA_ANNOTATION_PREFIX: &str = "data.tally.dev/";

/// Whether `selector` (of a Collector in `own_namespace`) selects `pod`.
pub fn selects(selector: &PodSelector, own_namespace: &str, pod: &Pod) -> bool {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let ns_ok = if selector.namespaces.is_empty() {
        ns == own_namespace
    } else {
        selector.namespaces.iter().any(|n| n == "*" || n == ns)
    };
    ns_ok
        && selector
            .selector
            .as_ref()
            .is_none_or(|s| label_selector_matches(s, pod.metadata.labels.as_ref()))
}

/// Kubernetes label-selector semantics: every `matchLabels` pair and every
/// `matchExpressions` requirement (`In`, `NotIn`, `Exists`, `DoesNotExist`) holds.
/// An unknown operator matches nothing (the API server rejects those anyway).
pub fn label_selector_matches(
    selector: &LabelSelector,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    let pairs_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    pairs_ok && exprs_ok
}

/// The subject of a pod's usage: annotation `tally.dev/subject`, else
/// `openmeter.io/subject`, else the value of `label` when given and present, else the
/// pod's namespace.
pub fn subject_of(pod: &Pod, label: Option<&str>) -> String {
    let annotations = pod.metadata.annotations.as_ref();
    let annotation = |k: &str| {
        annotations
            .and_then(|a| a.get(k))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    annotation(SUBJECT_ANNOTATION)
        .or_else(|| annotation(OPENMETER_SUBJECT_ANNOTATION))
        .or_else(|| {
            label.and_then(|l| {
                pod.metadata
                    .labels
                    .as_ref()
                    .and_then(|ls| ls.get(l))
                    .filter(|v| !v.is_empty())
                    .cloned()
            })
        })
        .unwrap_or_else(|| {
            pod.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into())
        })
}

/// `data.tally.dev/<key>` annotations as data entries.
pub fn annotation_data(pod: &Pod, data: &mut Map<String, Value>) {
    for (k, v) in pod.metadata.annotations.iter().flatten() {
        if let Some(key) = k.strip_prefix(DATA_ANNOTATION_PREFIX)
            && !key.is_empty()
        {
            data.insert(key.to_string(), Value::String(v.clone()));
        }
    }
}

/// A data key for a label or resource name: non-alphanumerics become `_`, so Meters
/// can use it in a simple JSONPath (`app.kubernetes.io/name` → `app_kubernetes_io_name`).
pub fn data_key(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// `(namespace, name, uid)` of a pod.
pub fn pod_key(pod: &Pod) -> (String, String, String) {
    (
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod.metadata.name.clone().unwrap_or_default(),
        pod.metadata.uid.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn subject_precedence_is_annotation_then_openmeter_then_label_then_namespace() {
        let both = pod(
            "metadata: {namespace: ns, labels: {team: t}, annotations: {tally.dev/subject: a, openmeter.io/subject: b}}",
        );
        assert_eq!(subject_of(&both, Some("team")), "a");
        let om = pod(
            "metadata: {namespace: ns, labels: {team: t}, annotations: {openmeter.io/subject: b}}",
        );
        assert_eq!(subject_of(&om, Some("team")), "b");
        let label = pod("metadata: {namespace: ns, labels: {team: t}}");
        assert_eq!(subject_of(&label, Some("team")), "t");
        assert_eq!(subject_of(&label, None), "ns");
        assert_eq!(subject_of(&label, Some("other")), "ns");
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let p = pod("metadata: {namespace: ns, labels: {app: train, tier: gpu}}");
        let sel = |y: &str| -> PodSelector { serde_yaml::from_str(y).unwrap() };
        assert!(selects(&sel("{}"), "ns", &p));
        assert!(!selects(&sel("{}"), "other", &p));
        assert!(selects(&sel("{namespaces: ['*']}"), "other", &p));
        assert!(selects(
            &sel("{selector: {matchLabels: {app: train}}}"),
            "ns",
            &p
        ));
        assert!(!selects(
            &sel("{selector: {matchLabels: {app: serve}}}"),
            "ns",
            &p
        ));
        assert!(selects(
            &sel("{selector: {matchExpressions: [{key: tier, operator: In, values: [gpu, tpu]}]}}"),
            "ns",
            &p
        ));
        assert!(!selects(
            &sel("{selector: {matchExpressions: [{key: tier, operator: NotIn, values: [gpu]}]}}"),
            "ns",
            &p
        ));
        assert!(selects(
            &sel("{selector: {matchExpressions: [{key: x, operator: DoesNotExist}]}}"),
            "ns",
            &p
        ));
    }

    #[test]
    fn data_annotations_and_keys() {
        let p = pod("metadata: {annotations: {data.tally.dev/plan: pro, other: x}}");
        let mut d = Map::new();
        annotation_data(&p, &mut d);
        assert_eq!(Value::Object(d), serde_json::json!({"plan": "pro"}));
        assert_eq!(data_key("app.kubernetes.io/name"), "app_kubernetes_io_name");
    }
}
