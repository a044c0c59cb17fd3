//! The agents' objects, built without an API server.
use serde_json::{Value, json};
use tally_crds::collector::IngestSink;

use super::*;

fn settings() -> AgentSettings {
    AgentSettings {
        namespace: "tally-system".into(),
        image: "tally:test".into(),
        sink: SinkConfig {
            ingest: Some(IngestSink {
                url: "http://tally-server.tally-system:8080".into(),
                token_file: None,
                batch_events: 500,
                timeout_ms: 10_000,
            }),
            kafka: None,
        },
        spool_host_path: "/var/lib/tally-agent".into(),
    }
}

fn collector(ns: &str, name: &str, spec: Value) -> Collector {
    serde_json::from_value(
        json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Collector",
        "metadata": {"name": name, "namespace": ns}, "spec": spec}),
    )
    .unwrap()
}

fn all() -> Vec<Collector> {
    vec![
        collector(
            "team-b",
            "gpus",
            json!({"eventType": "pod-runtime", "podRuntime": {}}),
        ),
        collector(
            "team-a",
            "gpus",
            json!({"eventType": "pod-runtime", "podRuntime": {"windowSecs": 30}}),
        ),
        collector(
            "billing",
            "openai",
            json!({"eventType": "llm", "httpApi": {"preset": "openai",
            "headers": [{"name": "Authorization", "prefix": "Bearer ", "valueFromFile": "/secrets/openai/key"}]}}),
        ),
    ]
}

#[test]
fn each_scope_gets_its_collectors_in_a_stable_order() {
    let (node, problems) = agent_config(&all(), Scope::Node, &settings());
    assert!(problems.is_empty(), "{problems:?}");
    let names: Vec<String> = node
        .collectors
        .iter()
        .map(|c| format!("{}/{}", c.namespace, c.name))
        .collect();
    assert_eq!(names, ["team-a/gpus", "team-b/gpus"]);
    let (cluster, _) = agent_config(&all(), Scope::Cluster, &settings());
    assert_eq!(cluster.collectors.len(), 1);
    assert_eq!(cluster.collectors[0].name, "openai");
    node.validate().unwrap();
    cluster.validate().unwrap();
}

#[test]
fn the_config_hash_is_stable_and_changes_with_any_collector() {
    let s = settings();
    let (a, _) = agent_config(&all(), Scope::Node, &s);
    let mut reversed = all();
    reversed.reverse();
    let (b, _) = agent_config(&reversed, Scope::Node, &s);
    let (cm_a, hash_a) = config_map(NODE_AGENT, &s, &a);
    let (_, hash_b) = config_map(NODE_AGENT, &s, &b);
    assert_eq!(
        hash_a, hash_b,
        "the order Collectors are listed in does not matter"
    );
    let mut changed = all();
    changed[0].spec.pod_runtime.as_mut().unwrap().window_secs = 120;
    let (c, _) = agent_config(&changed, Scope::Node, &s);
    assert_ne!(config_map(NODE_AGENT, &s, &c).1, hash_a);
    // The ConfigMap is the agent's own file format.
    let yaml = &cm_a.data.as_ref().unwrap()["agent.yaml"];
    let parsed: AgentConfig = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(parsed, a);
}

#[test]
fn invalid_and_deleting_collectors_are_left_out_with_a_reason() {
    let mut list = all();
    list.push(collector(
        "team-c",
        "empty",
        json!({"eventType": "", "podRuntime": {}}),
    ));
    let mut deleting = collector(
        "team-d",
        "going",
        json!({"eventType": "x", "podRuntime": {}}),
    );
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    list.push(deleting);
    let (node, problems) = agent_config(&list, Scope::Node, &settings());
    assert_eq!(node.collectors.len(), 2);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].0, "team-c/empty");
    assert_eq!(problems[0].1.field, "spec.eventType");
}

#[test]
fn the_daemonset_rolls_on_config_change_and_mounts_only_what_it_reads() {
    let ds = serde_json::to_value(daemonset(&settings(), "abc123")).unwrap();
    let pod = &ds["spec"]["template"];
    assert_eq!(pod["metadata"]["annotations"][CONFIG_HASH], "abc123");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(
        c["args"],
        json!(["--config", "/etc/tally-agent/agent.yaml", "--scope", "node"])
    );
    let env: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"NODE_NAME") && env.contains(&"MALLOC_ARENA_MAX"),
        "{env:?}"
    );
    let node_name = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .unwrap();
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    for m in c["volumeMounts"].as_array().unwrap() {
        let read_only = m["readOnly"] == true;
        match m["mountPath"].as_str().unwrap() {
            "/var/log/pods" | "/sys/fs/cgroup" | "/etc/tally-agent" => assert!(read_only, "{m}"),
            "/var/lib/tally-agent" => assert!(!read_only),
            other => panic!("unexpected mount {other}"),
        }
    }
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert!(sc["capabilities"].get("add").is_none());
    assert_eq!(pod["spec"]["serviceAccountName"], NODE_AGENT);
}

#[test]
fn the_cluster_agent_is_leader_elected_and_runs_as_non_root() {
    let d = serde_json::to_value(deployment(&settings(), "h")).unwrap();
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args[2..],
        ["--scope", "cluster", "--lease-name", CLUSTER_AGENT]
    );
    assert_eq!(c["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        d["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH],
        "h"
    );
    assert!(
        d["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.get("hostPath").is_none())
    );
}

#[test]
fn rbac_grants_the_least_the_agents_need() {
    let r = rbac(&settings());
    for role in &r.cluster_roles {
        let rules = role.rules.as_ref().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["pods".to_string()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
    }
    let lease = &r.roles[0].rules.as_ref().unwrap()[1];
    assert_eq!(
        lease.resource_names.as_deref(),
        Some(&[CLUSTER_AGENT.to_string()][..]),
        "one Lease only"
    );
    assert!(!lease.verbs.contains(&"delete".to_string()));
    for b in &r.cluster_role_bindings {
        assert_eq!(
            b.subjects.as_ref().unwrap()[0].namespace.as_deref(),
            Some("tally-system")
        );
    }
}
