//! The agents' objects, built without an API server.
use serde_json::{Value, json};
use tally_crds::collector::IngestSink;

use super::*;

fn settings() -> AgentSettings {
    AgentSettings {
        namespace: "tally-system".into(),
        image: "tally:test".into(),
        sink: Delivery {
            ingest: Some(IngestSink {
                url: "http://tally-server.tally-system:8080".into(),
                token_file: None,
                batch_events: 500,
                timeout_ms: 10_000,
            }),
            kafka: None,
        },
        spool_host_path: "/var/lib/tally-agent".into(),
        ingest_token_secret: None,
        manage_rbac: true,
        cluster_spool_size: "2Gi".into(),
        cluster_spool_class: None,
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
            "headers": [{"name": "Authorization", "prefix": "Bearer ", "valueFromSecret": {"name": "openai", "key": "admin-key"}}]}}),
        ),
    ]
}

#[test]
fn each_scope_gets_its_collectors_in_a_stable_order() {
    let Rendered {
        config: node,
        problems,
        ..
    } = agent_config(&all(), Scope::Node, &settings());
    assert!(problems.is_empty(), "{problems:?}");
    let names: Vec<String> = node
        .collectors
        .iter()
        .map(|c| format!("{}/{}", c.namespace, c.name))
        .collect();
    assert_eq!(names, ["team-a/gpus", "team-b/gpus"]);
    let cluster = agent_config(&all(), Scope::Cluster, &settings()).config;
    assert_eq!(cluster.collectors.len(), 1);
    assert_eq!(cluster.collectors[0].name, "openai");
    node.validate().unwrap();
    cluster.validate().unwrap();
}

#[test]
fn the_config_hash_is_stable_and_changes_with_any_collector() {
    let s = settings();
    let a = agent_config(&all(), Scope::Node, &s).config;
    let mut reversed = all();
    reversed.reverse();
    let b = agent_config(&reversed, Scope::Node, &s).config;
    let (cm_a, hash_a) = config_map(NODE_AGENT, &s, &a);
    let (_, hash_b) = config_map(NODE_AGENT, &s, &b);
    assert_eq!(
        hash_a, hash_b,
        "the order Collectors are listed in does not matter"
    );
    let mut changed = all();
    changed[0].spec.pod_runtime.as_mut().unwrap().window_secs = 120;
    let c = agent_config(&changed, Scope::Node, &s).config;
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
    let Rendered {
        config: node,
        problems,
        ..
    } = agent_config(&list, Scope::Node, &settings());
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
            "/var/log/pods" | "/sys/fs/cgroup" | "/etc/tally-agent" | SECRETS_DIR => {
                assert!(read_only, "{m}")
            }
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
    // One pod on a persistent spool, replaced (not surged) so two never share it.
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
    let spool = d["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "spool")
        .unwrap()
        .clone();
    assert_eq!(
        spool["persistentVolumeClaim"]["claimName"],
        CLUSTER_AGENT_SPOOL
    );
    let mut s = settings();
    let claim = serde_json::to_value(spool_claim(&s)).unwrap();
    assert_eq!(claim["spec"]["accessModes"], json!(["ReadWriteOnce"]));
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "2Gi");
    assert!(claim["spec"].get("storageClassName").is_none());
    s.cluster_spool_class = Some("fast".into());
    let claim = serde_json::to_value(spool_claim(&s)).unwrap();
    assert_eq!(claim["spec"]["storageClassName"], "fast");
}

#[test]
fn rbac_grants_the_least_the_agents_need() {
    let r = rbac(&settings());
    for role in &r.cluster_roles {
        let rules = role.rules.as_ref().unwrap();
        let node_agent = role.metadata.name.as_deref() == Some(NODE_AGENT);
        assert_eq!(rules.len(), if node_agent { 4 } else { 1 });
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["pods".to_string()][..])
        );
        assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
        if node_agent {
            // its Node's GPU labels: get only, never list or watch
            assert_eq!(
                rules[1].resources.as_deref(),
                Some(&["nodes".to_string()][..])
            );
            assert_eq!(rules[1].verbs, ["get"]);
            // DRA: claims by name, slices listed (by spec.nodeName), never watched
            assert_eq!(
                rules[2].resources.as_deref(),
                Some(&["resourceclaims".to_string()][..])
            );
            assert_eq!(rules[2].verbs, ["get"]);
            assert_eq!(
                rules[3].resources.as_deref(),
                Some(&["resourceslices".to_string()][..])
            );
            assert_eq!(rules[3].verbs, ["list"]);
        }
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

#[test]
fn secrets_are_mounted_by_reference_and_never_in_the_config_map() {
    let r = agent_config(&all(), Scope::Cluster, &settings());
    assert_eq!(r.secrets.len(), 1);
    let k = &r.secrets[0];
    assert_eq!(
        (
            k.namespace.as_str(),
            k.reference.name.as_str(),
            k.reference.key.as_str()
        ),
        ("billing", "openai", "admin-key")
    );
    assert_eq!(k.collector, "billing/openai");
    let header = &r.config.collectors[0]
        .spec
        .http_api
        .as_ref()
        .unwrap()
        .headers[0];
    assert_eq!(header.value_from_secret, None);
    assert_eq!(
        header.value_from_file.as_deref(),
        Some(format!("{SECRETS_DIR}/{}", k.file).as_str())
    );
    // The rendered configuration is valid for the agent and names no Secret value.
    r.config.validate().unwrap();
    let (cm, _) = config_map(CLUSTER_AGENT, &settings(), &r.config);
    let yaml = &cm.data.as_ref().unwrap()["agent.yaml"];
    assert!(!yaml.contains("valueFromSecret"), "{yaml}");
    // The scope's Secret holds exactly the referenced keys, and both workloads mount it.
    let data = BTreeMap::from([(k.file.clone(), ByteString(b"sk-admin".to_vec()))]);
    let secret = secret(CLUSTER_AGENT, &settings(), data);
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("tally-cluster-agent-secrets")
    );
    assert_eq!(secret.metadata.namespace.as_deref(), Some("tally-system"));
    for (pod, name) in [
        (
            serde_json::to_value(deployment(&settings(), "h")).unwrap(),
            "tally-cluster-agent-secrets",
        ),
        (
            serde_json::to_value(daemonset(&settings(), "h")).unwrap(),
            "tally-agent-secrets",
        ),
    ] {
        let volumes = pod["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .clone();
        let v = volumes.iter().find(|v| v["name"] == "secrets").unwrap();
        assert_eq!(v["secret"]["secretName"], name);
        assert_eq!(v["secret"]["optional"], true);
    }
}

#[test]
fn a_collector_may_not_read_the_agents_files() {
    let list = vec![collector(
        "billing",
        "steal",
        json!({"eventType": "llm", "httpApi": {"preset": "openai", "headers": [{"name": "Authorization",
        "valueFromFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}]}}),
    )];
    let r = agent_config(&list, Scope::Cluster, &settings());
    assert!(r.config.collectors.is_empty());
    assert_eq!(
        r.problems[0].1.field,
        "spec.httpApi.headers[0].valueFromFile"
    );
    assert!(r.problems[0].1.message.contains("valueFromSecret"));
}

#[test]
fn the_ingest_token_is_mounted_and_only_its_path_is_configured() {
    let mut s = settings();
    s.ingest_token_secret = Some("tally-agent-token".into());
    let r = agent_config(&all(), Scope::Node, &s);
    let ingest = r.config.sink.ingest.as_ref().unwrap();
    assert_eq!(
        ingest.token_file.as_deref(),
        Some("/var/run/secrets/tally-ingest/token")
    );
    for pod in [
        serde_json::to_value(daemonset(&s, "h")).unwrap(),
        serde_json::to_value(deployment(&s, "h")).unwrap(),
    ] {
        let spec = &pod["spec"]["template"]["spec"];
        let v = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "ingest-token")
            .expect("the token volume");
        assert_eq!(v["secret"]["secretName"], "tally-agent-token");
        let m = spec["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "ingest-token")
            .expect("its mount");
        assert_eq!(m["readOnly"], true);
    }
    // Without one, nothing is mounted.
    let plain = serde_json::to_value(daemonset(&settings(), "h")).unwrap();
    assert!(!plain.to_string().contains("ingest-token"));
}
