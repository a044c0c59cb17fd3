//! RBAC for real: the chart installed by Helm's library into a control plane that
//! enforces RBAC, then every tally binary run on **its own ServiceAccount's token**
//! (TokenRequest) with exactly the chart's Roles — never the admin's — through a whole
//! story: `tally-operator` (`--no-agent-rbac`, as the chart runs it) provisions a Meter
//! and turns two Collectors into the agents' ConfigMaps, Secret, DaemonSet, Deployment
//! and spool claim, writing statuses, Events and the finalizer; `tally-server
//! --kubernetes` reads the Meter; the node agent, started from the DaemonSet's pod,
//! measures a pod's GPU-seconds exactly; the cluster agent, from the Deployment's pod,
//! takes its Lease.
//!
//! A verb the chart forgot fails the test: the apiserver's audit log must show no
//! request of these identities refused (403), and the story must complete. Verbs the
//! chart grants that no identity used are printed (a finding, not a failure: some are
//! used only on paths this story does not take, like a Lease update after expiry). A
//! server-side apply that creates an object is audited as `patch` but authorized as
//! `create` too (seen: without `create`, the operator's first apply of its ConfigMap
//! is refused), so a `patch` answered 201 counts as both.
//! Needs a control plane that enforces RBAC: the kit's own (on `TALLY_KUBECONFIG` it
//! says why it skips).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tally_tests::kube::agent_pod::{AgentContainer, PodPlace};
use tally_tests::kube::control_plane::AuditMark;
use tally_tests::kube::kubelet::{Node, PodRunner};
use tally_tests::kube::{Cluster, ControlPlane};
use tally_tests::stack::{Pipeline, Stack};
use tally_tests::{KeptDir, clickhouse, eventually, kafka, repo, subject_totals, unix_now};

/// The chart's release namespace.
const NS: &str = "tally-system";

/// The chart's ServiceAccounts this story runs binaries as.
const ACCOUNTS: [&str; 4] = [
    "tally-operator",
    "tally-server",
    "tally-agent",
    "tally-cluster-agent",
];

/// Requests of these identities the apiserver refused (403) since `mark`, one line
/// each: `account: verb resource namespace/name`.
fn refusals(plane: &ControlPlane, mark: AuditMark) -> Vec<String> {
    plane
        .audit_events_since(mark)
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .filter_map(|e| {
            let account = account_of(e)?;
            let (verb, resource) = verb_resource(e);
            let o = &e["objectRef"];
            Some(format!(
                "{account}: {verb} {resource} {}/{}",
                o["namespace"].as_str().unwrap_or_default(),
                o["name"].as_str().unwrap_or_default()
            ))
        })
        .collect()
}

/// An audit event's verb and resource (`meters/status` for a subresource).
fn verb_resource(e: &serde_json::Value) -> (String, String) {
    let o = &e["objectRef"];
    let resource = match o["subresource"].as_str() {
        Some(sub) => format!("{}/{sub}", o["resource"].as_str().unwrap_or_default()),
        None => o["resource"].as_str().unwrap_or_default().to_string(),
    };
    (e["verb"].as_str().unwrap_or_default().to_string(), resource)
}

/// Waits up to `secs` for `probe`, failing at once — naming the request — when the
/// chart's RBAC refused one of the binaries anything meanwhile.
async fn within<T>(
    (plane, mark): (&ControlPlane, AuditMark),
    secs: u64,
    what: &str,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    eventually(
        Duration::from_secs(secs),
        Duration::from_millis(250),
        what,
        async || {
            let refused = refusals(plane, mark);
            assert!(
                refused.is_empty(),
                "while waiting for {what}, the chart's RBAC refused:\n{}",
                refused.join("\n")
            );
            probe().await
        },
    )
    .await
}

/// Which of [`ACCOUNTS`] made an audited request, if any.
fn account_of(e: &serde_json::Value) -> Option<&'static str> {
    let who = e["user"]["username"].as_str()?;
    ACCOUNTS
        .into_iter()
        .find(|a| who == format!("system:serviceaccount:{NS}:{a}"))
}

/// A kubeconfig for `account` with a token from the TokenRequest API.
async fn token_kubeconfig(
    client: &kube::Client,
    plane: &ControlPlane,
    account: &str,
    dir: &Path,
) -> PathBuf {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600}}))
    .unwrap();
    let granted = sas
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("a token for ServiceAccount {NS}/{account}: {e}"));
    let token = granted.status.expect("a granted token").token;
    plane.kubeconfig_with_token(&token, &format!("{account}.kubeconfig"), dir)
}

/// `helm install` of the chart (default values) into `NS`.
async fn helm_install(kubeconfig: &Path) -> Option<()> {
    let kc = kubeconfig.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(repo().join("scripts/helm-check.py"))
            .args(["install", "charts/tally"])
            .arg(&kc)
            .arg(NS)
            .current_dir(repo())
            .output()
    })
    .await
    .unwrap();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            tally_tests::skip(&format!("rbac_e2e: python3 does not run ({e})"));
            return None;
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("No module named") {
        tally_tests::skip(&format!(
            "rbac_e2e: Helm's library is not installed (`make tools`): {text}"
        ));
        return None;
    }
    assert!(out.status.success(), "helm install:\n{text}");
    Some(())
}

/// The `(verb, resource)` pairs the chart's Roles grant `account` (through the
/// bindings whose subject it is).
async fn granted(client: &kube::Client, account: &str) -> BTreeSet<(String, String)> {
    let is_subject = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount" && s.name == account && s.namespace.as_deref() == Some(NS)
        })
    };
    let mut rules: Vec<PolicyRule> = Vec::new();
    for b in Api::<ClusterRoleBinding>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        if is_subject(&b.subjects) {
            let role = Api::<ClusterRole>::all(client.clone())
                .get(&b.role_ref.name)
                .await
                .unwrap();
            rules.extend(role.rules.unwrap_or_default());
        }
    }
    for b in Api::<RoleBinding>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        if is_subject(&b.subjects) {
            let role = Api::<Role>::namespaced(client.clone(), NS)
                .get(&b.role_ref.name)
                .await
                .unwrap();
            rules.extend(role.rules.unwrap_or_default());
        }
    }
    let mut pairs = BTreeSet::new();
    for r in rules {
        for verb in &r.verbs {
            for resource in r.resources.iter().flatten() {
                pairs.insert((verb.clone(), resource.clone()));
            }
        }
    }
    pairs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_binary_runs_on_its_own_service_account_with_the_charts_roles() {
    let test = "rbac_e2e";
    let (Some(brokers), Some(ch)) = (kafka(test), clickhouse(test)) else {
        return;
    };
    let Some(cluster) = Cluster::connect(test).await else {
        return;
    };
    let Some(plane) = cluster.own_plane("rbac_e2e: RBAC enforcement") else {
        return;
    };
    let dir = KeptDir(Some(tempfile::tempdir().unwrap()));
    let admin = cluster.client().await;
    cluster.namespaces(&admin, &[NS]).await;
    if helm_install(&cluster.kubeconfig).await.is_none() {
        return;
    }
    let mut kubeconfigs = BTreeMap::new();
    for account in ACCOUNTS {
        let kc = token_kubeconfig(&admin, plane, account, dir.path()).await;
        kubeconfigs.insert(account, kc);
    }
    let since = plane.audit_mark();
    let audit = (plane, since);

    // The pipeline, each binary on its ServiceAccount; agents ship to Kafka.
    let unique = format!("{}_{}", std::process::id(), unix_now());
    let (db, topic) = (
        format!("tally_rbac_{unique}"),
        format!("tally-rbac-{unique}"),
    );
    let pipeline = Pipeline {
        brokers: &brokers,
        clickhouse: &ch,
        database: &db,
        topic: &topic,
    };
    let stack = Stack::start(
        dir.path(),
        (&kubeconfigs["tally-server"], &kubeconfigs["tally-operator"]),
        &pipeline,
        1,
        &[
            "--no-agent-rbac",
            "--agent-image",
            "tally:rbac",
            "--collector-status-secs",
            "2",
        ],
    );
    let node = Node::register(&admin, "rbac-node-1").await;
    let _runner = PodRunner::start(&admin, NS, &[&node]);

    // The user (admin) applies the README's Meter and Collector, and a cluster-scoped
    // Collector (its vendor API is unreachable, which does not matter here).
    let (ok, out) = {
        let kc = cluster.kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            let o = std::process::Command::new("kubectl")
                .args(["apply", "-f", "examples/cluster/gpu-billing.yaml"])
                .env("KUBECONFIG", &kc)
                .current_dir(repo())
                .output()
                .expect("kubectl runs");
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .await
        .unwrap()
    };
    assert!(ok, "kubectl apply: {out}");
    let openai: tally_crds::Collector =
        serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1",
        "kind": "Collector", "metadata": {"name": "openai", "namespace": "ml-team"},
        "spec": {"eventType": "llm", "httpApi": {"preset": "openai", "url": "http://127.0.0.1:9",
        "headers": [{"name": "Authorization", "value": "Bearer sk-test"}]}}}))
        .unwrap();
    Api::<tally_crds::Collector>::namespaced(admin.clone(), "ml-team")
        .create(&PostParams::default(), &openai)
        .await
        .unwrap();

    // The operator, on its own token: the Meter provisioned and Ready, the agents' objects.
    let meters: Api<tally_crds::Meter> = Api::namespaced(admin.clone(), "ml-team");
    within(audit, 60, "the Meter to be Ready", async || {
        let m = meters.get("gpu-seconds").await.ok()?;
        m.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(())
    })
    .await;
    let dss: Api<DaemonSet> = Api::namespaced(admin.clone(), NS);
    let ds = within(audit, 30, "the node agents' DaemonSet", async || {
        dss.get_opt("tally-agent").await.ok()?
    })
    .await;
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    let dep = within(audit, 30, "the cluster agent's Deployment", async || {
        deps.get_opt("tally-cluster-agent").await.ok()?
    })
    .await;

    // The node agent, on its own token, from the DaemonSet's pod.
    let agent_name = format!("tally-agent-{}", node.name);
    let node_agent = AgentContainer::start(
        &admin,
        &kubeconfigs["tally-agent"],
        ds.spec.unwrap().template,
        PodPlace {
            namespace: NS,
            name: &agent_name,
            node: &node.name,
        },
        dir.path(),
    )
    .await;
    let collectors: Api<tally_crds::Collector> = Api::namespaced(admin.clone(), "ml-team");
    within(
        audit,
        60,
        "the Collector to be Ready (its agents ready)",
        async || {
            let s = collectors.get("gpu-pods").await.ok()?.status?;
            (s.conditions.first()?.status == "True").then_some(())
        },
    )
    .await;

    // The cluster agent, on its own token, from the Deployment's pod: it takes the Lease.
    let cluster_agent_pod = "tally-cluster-agent-0";
    let cluster_agent = AgentContainer::start(
        &admin,
        &kubeconfigs["tally-cluster-agent"],
        dep.spec.unwrap().template,
        PodPlace {
            namespace: NS,
            name: cluster_agent_pod,
            node: &node.name,
        },
        dir.path(),
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NS);
    within(
        audit,
        30,
        "the cluster agent to hold its Lease",
        async || {
            let l = leases.get_opt("tally-cluster-agent").await.ok()??;
            (l.spec?.holder_identity.as_deref() == Some(cluster_agent_pod)).then_some(())
        },
    )
    .await;

    // A pod runs 6 s on 2 GPUs: the server, on its own token, answers exactly.
    let pod: Pod = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("examples/cluster/train-pod.yaml")).unwrap(),
    )
    .unwrap();
    Api::<Pod>::namespaced(admin.clone(), "ml-team")
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    node.run_pod(&admin, ("ml-team", "train-1"), "train", 6)
        .await;
    let http = reqwest::Client::new();
    let expected = BTreeMap::from([("acme".to_string(), 12u64)]);
    within(audit, 90, "GPU-seconds of acme = 12", async || {
        let got = subject_totals(&http, &stack.server, "ml-team", "gpu_seconds").await;
        (got.as_ref() == Some(&expected)).then_some(())
    })
    .await;

    // The audit log: nothing these identities asked was refused; what the chart grants
    // and nobody used is printed.
    let refused = refusals(plane, since);
    assert!(
        refused.is_empty(),
        "requests the chart's RBAC refused:\n{}",
        refused.join("\n")
    );
    let mut used: BTreeMap<&str, BTreeSet<(String, String)>> = BTreeMap::new();
    for e in plane.audit_events_since(since) {
        if let Some(account) = account_of(&e) {
            let (verb, resource) = verb_resource(&e);
            // A server-side apply that made the object was authorized as a create too.
            if verb == "patch" && e["responseStatus"]["code"] == 201 {
                used.entry(account)
                    .or_default()
                    .insert(("create".into(), resource.clone()));
            }
            used.entry(account).or_default().insert((verb, resource));
        }
    }
    for account in ACCOUNTS {
        let granted = granted(&admin, account).await;
        let used = used.remove(account).unwrap_or_default();
        let unused: Vec<String> = granted
            .iter()
            .filter(|g| !used.contains(g))
            .map(|(v, r)| format!("{v} {r}"))
            .collect();
        tally_tests::say(&format!(
            "rbac_e2e: {account} used {} of {} granted verbs; granted, not used: {}",
            granted.len() - unused.len(),
            granted.len(),
            if unused.is_empty() {
                "none".to_string()
            } else {
                unused.join(", ")
            }
        ));
    }
    drop(cluster_agent);
    drop(node_agent);
    drop(stack);
    node.remove(&admin).await;
}
