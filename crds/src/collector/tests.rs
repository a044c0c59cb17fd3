use kube::CustomResourceExt;

use super::*;

fn spec(yaml: &str) -> CollectorSpec {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn a_pod_runtime_collector_reads_with_defaults() {
    let s = spec(
        "eventType: pod-runtime\npodRuntime:\n  pods:\n    selector:\n      matchLabels: {app: train}\n",
    );
    s.validate().unwrap();
    let Source::PodRuntime(p) = s.source().unwrap() else {
        panic!("not podRuntime")
    };
    assert_eq!(p.window_secs, 60);
    assert_eq!(p.settle_secs, 15);
    assert!(p.cgroup.enabled);
    assert_eq!(p.cgroup.root, "/sys/fs/cgroup");
    assert_eq!(s.source().unwrap().scope(), Scope::Node);
}

#[test]
fn exactly_one_source_is_required() {
    let none = spec("eventType: x\n");
    assert_eq!(none.validate().unwrap_err().field, "spec");
    let two = spec(
        "eventType: x\npodRuntime: {}\nlogs:\n  paths: [/tmp/a.log]\n  parser: {kind: json}\n  mapping: {}\n",
    );
    let err = two.validate().unwrap_err();
    assert!(err.message.contains("podRuntime and logs"), "{err}");
}

#[test]
fn unknown_fields_are_rejected_by_name() {
    let err = serde_yaml::from_str::<CollectorSpec>("eventType: x\npodRuntime: {windowSec: 60}\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("windowSec"), "{err}");
}

#[test]
fn rules_the_schema_cannot_express_name_the_field() {
    let cases = [
        (
            "eventType: x\npodRuntime: {windowSecs: 7}\n",
            "spec.podRuntime.windowSecs",
        ),
        (
            "eventType: x\nprometheus:\n  targets: [http://a/metrics]\n  metrics: [{name: a, nameRegex: b, kind: counter}]\n",
            "spec.prometheus.metrics[0]",
        ),
        (
            "eventType: x\nprometheus:\n  metrics: [{name: a, kind: gauge}]\n",
            "spec.prometheus",
        ),
        (
            "eventType: x\nhttpApi: {preset: openai, bucketSecs: 300}\n",
            "spec.httpApi.bucketSecs",
        ),
        (
            "eventType: x\nhttpApi:\n  mapping: {items: '$.data[*]', id: '$.id', subject: '$.s', time: '$.t'}\n",
            "spec.httpApi.url",
        ),
        (
            "eventType: x\nhttpApi:\n  preset: openai\n  headers: [{name: Authorization}]\n",
            "spec.httpApi.headers[0]",
        ),
        (
            "eventType: x\nlogs:\n  paths: [/a]\n  parser: {kind: regex}\n  mapping: {}\n",
            "spec.logs.parser.regex",
        ),
    ];
    for (yaml, field) in cases {
        let err = spec(yaml).validate().unwrap_err();
        assert_eq!(err.field, field, "{yaml}: {err}");
    }
}

#[test]
fn scopes_follow_the_source() {
    let cluster = spec(
        "eventType: x\nprometheus:\n  targets: [http://a/metrics]\n  metrics: [{name: a, kind: gauge}]\n",
    );
    assert_eq!(cluster.source().unwrap().scope(), Scope::Cluster);
    let node = spec(
        "eventType: x\nprometheus:\n  pods: {port: 9400}\n  metrics: [{name: a, kind: gauge}]\n",
    );
    assert_eq!(node.source().unwrap().scope(), Scope::Node);
    let api = spec("eventType: x\nhttpApi: {preset: openai}\n");
    assert_eq!(api.source().unwrap().scope(), Scope::Cluster);
}

#[test]
fn the_crd_carries_the_one_source_rule_and_printer_columns() {
    let yaml = serde_yaml::to_string(&Collector::crd()).unwrap();
    assert!(yaml.contains("set exactly one source"), "{yaml}");
    assert!(yaml.contains("Ready Agents"));
    assert!(yaml.contains("shortNames"));
}

#[test]
fn an_agent_config_names_the_bad_collector() {
    let cfg: AgentConfig = serde_yaml::from_str(
        "sink: {ingest: {url: 'http://127.0.0.1:8080'}}\ncollectors:\n- {namespace: a, name: b, spec: {eventType: x, podRuntime: {windowSecs: 7}}}\n",
    )
    .unwrap();
    let err = cfg.validate().unwrap_err();
    assert_eq!(err.field, "collectors[0].spec.podRuntime.windowSecs");
    let both: AgentConfig =
        serde_yaml::from_str("sink: {ingest: {url: 'http://x'}, kafka: {brokers: 'k:9092'}}\n")
            .unwrap();
    assert_eq!(both.validate().unwrap_err().field, "sink");
}

#[test]
fn event_source_is_stable() {
    assert_eq!(event_source("team-a", "gpu"), "tally/team-a/gpu");
}
