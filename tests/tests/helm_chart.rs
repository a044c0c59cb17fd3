//! The Helm chart, through Helm's own Go library (`scripts/helm-check.py`, PyPI
//! helm-sdkpy; there is no helm binary here):
//! - `helm lint` with the default values and with `ci/ci-values.yaml` (every template
//!   rendered, values.schema.json enforced): no errors; a wrong value is an error;
//! - `helm install` of the chart into the real control plane (namespace `tally-helm`
//!   with the default values, `tally-ci` with the CI values: both releases side by side,
//!   as their cluster-scoped names carry the namespace): the CRDs, workloads, ServiceAccounts, RBAC, Secrets,
//!   NetworkPolicy and ServiceMonitor it creates are checked as stored objects — the
//!   kinds, least-privilege rules, restricted security contexts, and credentials only
//!   by Secret reference; then `helm upgrade` keeps the generated agents' token;
//! - every workload's command line and `TALLY_*` environment parse with its binary's
//!   own argument parser;
//! - the chart's CRDs are the generated ones (the drift test in `crds/` covers
//!   `charts/tally/crds/` too).
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use tally_tests::kube::Cluster;
use tally_tests::repo;

fn helm_check(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("python3")
        .arg(repo().join("scripts/helm-check.py"))
        .args(args)
        .current_dir(repo())
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("No module named 'helm_sdkpy'") {
        let why =
            "helm_chart: the Helm library is not installed (`make tools` installs helm-sdkpy)";
        tally_tests::skip(why);
        return None;
    }
    Some((out.status.success(), text))
}

#[test]
fn the_chart_lints_with_default_and_ci_values_and_refuses_bad_values() {
    let chart = "charts/tally";
    let Some((ok, out)) = helm_check(&["lint", chart]) else {
        return;
    };
    assert!(ok, "lint with default values:\n{out}");
    let (ok, out) = helm_check(&["lint", chart, "charts/tally/ci/ci-values.yaml"]).unwrap();
    assert!(ok, "lint with the CI values:\n{out}");
    // The schema is enforced: lint must fail on a wrong value.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "server:\n  replicas: two\n").unwrap();
    let (ok, out) = helm_check(&["lint", chart, bad.to_str().unwrap()]).unwrap();
    assert!(!ok, "a string replica count must be refused:\n{out}");
    // Tokens in values: by SHA-256 is fine; an entry with neither token nor hash is not.
    let hashed = dir.path().join("hashed.yaml");
    std::fs::write(
        &hashed,
        "auth:\n  tokens:\n  - {name: a, tokenSha256: 42492da06234ad0ac76f5d5debdb6d1ae027cffbe746a1c13b89bb8bc0139137, namespaces: [team-a]}\n",
    )
    .unwrap();
    let (ok, out) = helm_check(&["lint", chart, hashed.to_str().unwrap()]).unwrap();
    assert!(ok, "a token given by its SHA-256:\n{out}");
    std::fs::write(
        &bad,
        "auth:\n  tokens:\n  - {name: a, namespaces: [team-a]}\n",
    )
    .unwrap();
    let (ok, out) = helm_check(&["lint", chart, bad.to_str().unwrap()]).unwrap();
    assert!(!ok, "a token entry without token or tokenSha256:\n{out}");
}

fn restricted(pod: &serde_json::Value, what: &str) {
    let spec = &pod["spec"]["template"]["spec"];
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{what}"
    );
    for c in spec["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{what}"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{what}: a memory limit"
        );
    }
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    assert!(
        volumes.iter().all(|v| v.get("hostPath").is_none()),
        "{what}: no hostPath"
    );
}

/// The container's command line and environment are what its binary accepts: every
/// `TALLY_*` variable is one the binary reads (a misspelt one would be silently
/// ignored), and args plus variables parse with the binary's own parser (clap), as the
/// variables turned into their flags. Secret-sourced values are stand-ins.
fn accepted_by_the_binary(pod: &serde_json::Value, what: &str) {
    use clap::{CommandFactory, Parser};
    let c = &pod["spec"]["template"]["spec"]["containers"][0];
    let bin = c["command"][0].as_str().unwrap_or_default().to_string();
    let root = match bin.as_str() {
        "tally-server" => tally_server::server::Args::command(),
        "tally-operator" => tally_operator::Args::command(),
        other => panic!("{what}: unexpected command {other:?}"),
    };
    let args: Vec<String> = c["args"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    // The subcommand the args name, if any; its flags follow it.
    let sub = args.first().and_then(|a| root.find_subcommand(a)).cloned();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for e in c["env"].as_array().cloned().unwrap_or_default() {
        let name = e["name"].as_str().unwrap();
        if !name.starts_with("TALLY_") {
            continue;
        }
        let value = e["value"].as_str().unwrap_or("from-a-secret").to_string();
        let find = |cmd: &clap::Command| {
            cmd.get_arguments()
                .find(|a| a.get_env().is_some_and(|n| n == name))
                .cloned()
        };
        let (arg, into) = match (sub.as_ref().and_then(find), find(&root)) {
            (Some(a), _) => (a, &mut after),
            (None, Some(a)) => (a, &mut before),
            (None, None) => panic!("{what}: {bin} reads no variable {name}"),
        };
        let long = arg.get_long().expect("env-backed args have a long flag");
        if arg.get_action().takes_values() {
            into.push(format!("--{long}={value}"));
        } else if value == "true" {
            into.push(format!("--{long}"));
        }
    }
    let argv = std::iter::once(bin.clone())
        .chain(before)
        .chain(args)
        .chain(after)
        .collect::<Vec<_>>();
    let parsed = match bin.as_str() {
        "tally-server" => tally_server::server::Args::try_parse_from(&argv).map(drop),
        _ => tally_operator::Args::try_parse_from(&argv).map(drop),
    };
    if let Err(e) = parsed {
        panic!("{what}: {bin} refuses its command line {argv:?}:\n{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_creates_least_privilege_restricted_objects() {
    let Some(cluster) = Cluster::connect("helm_install").await else {
        return;
    };
    let client = cluster.client().await;
    let ns = "tally-helm";
    cluster.namespaces(&client, &[ns]).await;
    let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_string();
    let result = tokio::task::spawn_blocking(move || {
        helm_check(&["install", "charts/tally", &kubeconfig, "tally-helm"])
    })
    .await
    .unwrap();
    let Some((ok, out)) = result else {
        return;
    };
    assert!(ok, "helm install into the control plane:\n{out}");

    // The CRDs come from the chart's crds/ folder.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["meters.tally.dev", "collectors.tally.dev"] {
        assert!(crds.get_opt(name).await.unwrap().is_some(), "CRD {name}");
    }

    // Three restricted workloads.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for (name, replicas) in [
        ("tally-operator", 2),
        ("tally-server", 2),
        ("tally-sink", 1),
    ] {
        let d = deployments
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("Deployment {name}: {e}"));
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["spec"]["replicas"], replicas, "{name}");
        restricted(&v, name);
        accepted_by_the_binary(&v, name);
    }
    let server = serde_json::to_value(deployments.get("tally-server").await.unwrap()).unwrap();
    let args = server["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--tokens-file") && !args.contains("--allow-unauthenticated"),
        "authentication is on by default: {args}"
    );
    let operator = serde_json::to_value(deployments.get("tally-operator").await.unwrap()).unwrap();
    let args = operator["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    for flag in [
        "--agent-ingest-url=http://tally-server.tally-helm:8080",
        "--agent-ingest-token-secret=tally-agent-token",
        "--no-agent-rbac",
    ] {
        assert!(args.contains(flag), "operator args lack {flag}: {args}");
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    assert!(services.get_opt("tally-server").await.unwrap().is_some());

    // The agents' token: generated, mounted into the agents by the operator.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let token = secrets.get("tally-agent-token").await.unwrap();
    let data = token.data.unwrap();
    let agent_token = String::from_utf8(data["token"].0.clone()).unwrap();
    assert!(agent_token.len() >= 40, "a generated token");
    let file = String::from_utf8(data["tokens.yaml"].0.clone()).unwrap();
    assert!(
        !file.contains(&agent_token),
        "the server's tokens file holds the token's SHA-256, not the token: {file}"
    );
    let tokens = tally_server::api::auth::Tokens::parse(&file).unwrap();
    assert_eq!(
        tokens.grant(&agent_token).map(|g| g.namespaces.clone()),
        Some(vec!["*".to_string()]),
        "the agents' token is granted every namespace: {file}"
    );

    // Least privilege.
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    let rules = |r: &ClusterRole| serde_json::to_value(&r.rules).unwrap();
    let op = cluster_roles
        .get("tally-operator-tally-helm")
        .await
        .unwrap();
    let op_rules = rules(&op);
    for rule in op_rules.as_array().unwrap() {
        let resources = rule["resources"].to_string();
        let verbs = rule["verbs"].to_string();
        assert!(!verbs.contains('*') && !resources.contains('*'), "{rule}");
        if resources.contains("secrets") {
            assert_eq!(
                rule["verbs"],
                serde_json::json!(["get"]),
                "Secrets are only read by name"
            );
        }
        assert!(
            !resources.contains("clusterroles") && !resources.contains("rolebindings"),
            "the operator writes no RBAC: {rule}"
        );
    }
    for agent in ["tally-agent", "tally-cluster-agent"] {
        let r = cluster_roles
            .get(&format!("{agent}-{ns}"))
            .await
            .unwrap_or_else(|e| panic!("{agent}'s ClusterRole: {e}"));
        let pods = serde_json::json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]});
        // The node agent also gets Nodes (its own: GPU sharing labels) and DRA claims,
        // lists ResourceSlices (its node's), and watches neither.
        let want = if agent == "tally-agent" {
            serde_json::json!([pods, {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
                {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get"]},
                {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"], "verbs": ["list"]}])
        } else {
            serde_json::json!([pods])
        };
        assert_eq!(rules(&r), want, "{agent} only reads pods (and its Node)");
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        assert!(
            sas.get_opt(agent).await.unwrap().is_some(),
            "{agent}'s ServiceAccount"
        );
    }
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    let lease =
        serde_json::to_value(roles.get("tally-cluster-agent").await.unwrap().rules).unwrap();
    assert!(
        lease
            .to_string()
            .contains("\"resourceNames\":[\"tally-cluster-agent\"]"),
        "{lease}"
    );

    let all_deployments = deployments.list(&ListParams::default()).await.unwrap();
    assert_eq!(all_deployments.items.len(), 3, "operator, server, sink");

    // `helm upgrade` (the release record is a Secret, as by default) keeps the agents'
    // token: the chart looks the Secret up instead of generating a new one, so agents
    // and server stay in step.
    let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_string();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        helm_check(&["upgrade", "charts/tally", &kubeconfig, "tally-helm"])
    })
    .await
    .unwrap()
    .unwrap();
    assert!(ok, "helm upgrade in the control plane:\n{out}");
    let after = secrets
        .get("tally-agent-token")
        .await
        .unwrap()
        .data
        .unwrap();
    assert_eq!(
        String::from_utf8(after["token"].0.clone()).unwrap(),
        agent_token,
        "the upgrade kept the agents' token"
    );
    assert_eq!(after["tokens.yaml"].0, data["tokens.yaml"].0);
    cluster.remove_namespaces(&client, &[ns]).await;
}

/// The CI values: secured Kafka, ClickHouse credentials, tokens from an existing
/// Secret, NetworkPolicy and ServiceMonitor — installed, and the wiring checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_with_the_ci_values_wires_every_secret() {
    let Some(cluster) = Cluster::connect("helm_install_ci_values").await else {
        return;
    };
    let client = cluster.client().await;
    let ns = "tally-ci";
    cluster.namespaces(&client, &[ns]).await;
    // The Prometheus Operator's kind, as a cluster that has it would serve it.
    let monitor: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"plural": "servicemonitors", "singular": "servicemonitor", "kind": "ServiceMonitor", "listKind": "ServiceMonitorList"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}}))
    .unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .create(&Default::default(), &monitor)
        .await
        .unwrap();
    // The apiserver serves a new CRD's kind a moment after accepting it.
    tally_tests::eventually(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(200),
        "the ServiceMonitor kind to be served",
        async || {
            let ar = kube::api::ApiResource {
                group: "monitoring.coreos.com".into(),
                version: "v1".into(),
                api_version: "monitoring.coreos.com/v1".into(),
                kind: "ServiceMonitor".into(),
                plural: "servicemonitors".into(),
            };
            Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), ns, &ar)
                .list(&ListParams::default())
                .await
                .ok()
        },
    )
    .await;
    let kubeconfig = cluster.kubeconfig.to_str().unwrap().to_string();
    let values = repo().join("charts/tally/ci/ci-values.yaml");
    let result = tokio::task::spawn_blocking(move || {
        helm_check(&[
            "install",
            "charts/tally",
            &kubeconfig,
            "tally-ci",
            values.to_str().unwrap(),
        ])
    })
    .await
    .unwrap();
    let Some((ok, out)) = result else {
        return;
    };
    assert!(ok, "helm install with the CI values:\n{out}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for name in ["tally-operator", "tally-server", "tally-sink"] {
        let d = serde_json::to_value(deployments.get(name).await.unwrap()).unwrap();
        restricted(&d, name);
        accepted_by_the_binary(&d, name);
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred", "{name}");
        let c = &pod["containers"][0];
        assert_eq!(c["image"], "registry.example/tally:0.1.0-ci", "{name}");
        let env = c["env"].as_array().unwrap();
        let from_secret = |var: &str| {
            env.iter()
                .find(|e| e["name"] == var)
                .map(|e| e["valueFrom"]["secretKeyRef"].clone())
                .unwrap_or_else(|| panic!("{name} lacks {var}"))
        };
        assert_eq!(
            from_secret("TALLY_KAFKA_SASL_PASSWORD")["name"],
            "tally-kafka"
        );
        assert_eq!(
            from_secret("TALLY_CLICKHOUSE_PASSWORD")["name"],
            "tally-clickhouse"
        );
        let plain = |var: &str| {
            env.iter()
                .find(|e| e["name"] == var)
                .map(|e| e["value"].clone())
        };
        assert_eq!(
            plain("TALLY_KAFKA_SECURITY_PROTOCOL"),
            Some("sasl_ssl".into())
        );
        assert_eq!(
            plain("TALLY_KAFKA_SASL_MECHANISM"),
            Some("SCRAM-SHA-512".into())
        );
        assert_eq!(
            plain("TALLY_KAFKA_SSL_CA_LOCATION"),
            Some("/etc/tally/kafka-ca/ca.crt".into())
        );
        // every component spreads tables over the same cluster and knows its replicas
        assert_eq!(
            plain("TALLY_CLICKHOUSE_CLUSTER"),
            Some("tally".into()),
            "{name}"
        );
        assert_eq!(
            plain("TALLY_CLICKHOUSE_REPLICA_URLS"),
            Some("http://chi-0-0.clickhouse:8123,http://chi-0-1.clickhouse:8123".into()),
            "{name}"
        );
        let mounts = c["volumeMounts"].to_string();
        assert!(mounts.contains("/etc/tally/kafka-ca"), "{name}: {mounts}");
        // No credential is written into the pod spec.
        assert!(!d.to_string().contains("password\":\""), "{name}");
    }
    assert_eq!(
        serde_json::to_value(deployments.get("tally-operator").await.unwrap()).unwrap()["spec"]["replicas"],
        3
    );
    let server = serde_json::to_value(deployments.get("tally-server").await.unwrap()).unwrap();
    let volumes = server["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(
        volumes.contains("\"secretName\":\"tally-tokens\""),
        "{volumes}"
    );
    assert!(
        volumes.contains("\"secretName\":\"tally-portal-keys\""),
        "portal keys mounted from portal.keysSecret: {volumes}"
    );
    let args = server["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--portal-keys-file=/etc/tally/portal/keys.yaml")
            && args.contains(
                "--portal-cors-origins=https://portal.example.com,https://app.example.com"
            ),
        "{args}"
    );
    assert!(
        Api::<Secret>::namespaced(client.clone(), ns)
            .get_opt("tally-tokens")
            .await
            .unwrap()
            .is_none(),
        "with auth.existingSecret the chart makes no tokens Secret"
    );
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let policy = serde_json::to_value(policies.get("tally-server").await.unwrap()).unwrap();
    assert!(
        policy["spec"]["ingress"][0]["from"]
            .to_string()
            .contains("tally.dev/api-access"),
        "{policy}"
    );
    let monitors = Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        ns,
        &kube::api::ApiResource {
            group: "monitoring.coreos.com".into(),
            version: "v1".into(),
            api_version: "monitoring.coreos.com/v1".into(),
            kind: "ServiceMonitor".into(),
            plural: "servicemonitors".into(),
        },
    );
    let monitor = monitors.get("tally-server").await.unwrap();
    assert_eq!(
        monitor.metadata.labels.unwrap()["release"],
        "prometheus",
        "the ServiceMonitor carries the labels Prometheus selects"
    );
    cluster.remove_namespaces(&client, &[ns]).await;
}
