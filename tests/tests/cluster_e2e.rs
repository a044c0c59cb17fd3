//! The whole system on a cluster — the real control plane (or `TALLY_KUBECONFIG`),
//! real tansu and ClickHouse, and the real binaries: `tally-operator`, `tally-agent`
//! (run from the DaemonSet and ConfigMap the operator rendered), `tally-server sink` and
//! `tally-server --kubernetes`.
//!
//! It first replays the README's "Meter + Collector on a cluster" walkthrough (between
//! the `cluster-walkthrough` markers) command by command with the real `kubectl` and
//! `curl`, checking each output the README shows (ages and apply verbs aside). In
//! between, the test plays the parts of a cluster that run no code here: the scheduler
//! binds pods, the kubelet of node `gpu-node-1` registers its Node, keeps it Ready,
//! writes pod status and runs the agent container of the pod the real DaemonSet
//! controller made (the rendered arguments and environment, the ConfigMap projected
//! into a folder); the DaemonSet's readiness is the real controller's.
//!
//! Then, beyond the README: a pod restarted mid-run while the agent is SIGKILLed and
//! restarted, with pods on another node and in another namespace that must not count →
//! GPU-seconds per subject exact to the second; a changed Collector → a new config hash
//! on the ConfigMap and the DaemonSet's pod template, and the agent measuring with the
//! new configuration once the kubelet updates its file; the Collector deleted → the
//! agents' objects removed.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tally_crds::Collector;
use tally_tests::kube::Cluster;
use tally_tests::kube::agent_pod::{AgentContainer, CONFIG_HASH, PodPlace};
use tally_tests::kube::kubelet::{Node, PodRunner, container, finished, running, terminated};
use tally_tests::stack::{Pipeline, Stack};
use tally_tests::{
    KeptDir, clickhouse, eventually, group_totals, kafka, repo, rfc3339, subject_totals, unix_now,
};

const NS: &str = "ml-team";
const AGENTS_NS: &str = "tally-system";
const METER: (&str, &str) = (NS, "gpu_seconds");

async fn within<T>(secs: u64, what: &str, probe: impl AsyncFnMut() -> Option<T>) -> T {
    eventually(
        Duration::from_secs(secs),
        Duration::from_millis(250),
        what,
        probe,
    )
    .await
}

/// Sleeps until Unix second `t`.
async fn until(t: i64) {
    let wait = t - unix_now();
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(wait as u64)).await;
    }
}

// ---------------------------------------------------------------------------------
// The README walkthrough: commands and the output they must print.

struct Step {
    command: String,
    expected: Vec<String>,
}

fn walkthrough() -> Vec<Step> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("<!-- cluster-walkthrough -->")
        .expect("README has the cluster walkthrough");
    let end = readme
        .find("<!-- /cluster-walkthrough -->")
        .expect("and its end marker");
    let mut steps: Vec<Step> = Vec::new();
    for line in readme[start..end].lines() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            steps.push(Step {
                command: cmd.to_string(),
                expected: Vec::new(),
            });
        } else if let Some(step) = steps.last_mut()
            && !line.starts_with("```")
            && !line.trim().is_empty()
        {
            step.expected.push(line.to_string());
        }
    }
    assert!(steps.len() >= 5, "the walkthrough has its commands");
    steps
}

/// Words that differ from run to run: ages (`12s`, `3m4s`) and apply's verb.
fn varies(word: &str) -> bool {
    let age = !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphanumeric())
        && word.starts_with(|c: char| c.is_ascii_digit())
        && word
            .split(|c: char| c.is_ascii_digit())
            .filter(|u| !u.is_empty())
            .all(|u| ["s", "m", "h", "d", "y"].contains(&u));
    age || ["created", "configured", "unchanged"].contains(&word)
}

/// Every expected line is printed (in any order, among others), word by word, except
/// for words that vary between runs.
fn shows(expected: &[String], actual: &str) -> bool {
    expected.iter().all(|e| {
        let want: Vec<&str> = e.split_whitespace().collect();
        actual.lines().any(|a| {
            let got: Vec<&str> = a.split_whitespace().collect();
            got.len() == want.len()
                && want
                    .iter()
                    .zip(&got)
                    .all(|(w, g)| w == g || (varies(w) && varies(g)))
        })
    })
}

async fn sh(command: &str, kubeconfig: &Path) -> (bool, String) {
    let (command, kubeconfig) = (command.to_string(), kubeconfig.to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("bash")
            .args(["-o", "pipefail", "-c", &command])
            .env("KUBECONFIG", kubeconfig)
            .current_dir(repo())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs a walkthrough command until it prints what the README shows (`kubectl apply`
/// once: it must succeed at the first try).
async fn replay(step: &Step, kubeconfig: &Path, server: Option<&str>) {
    let command = match server {
        Some(addr) => step.command.replace("localhost:8080", addr),
        None => step.command.clone(),
    };
    let once = command.starts_with("kubectl apply") || command.starts_with("kubectl delete");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (ok, out) = sh(&command, kubeconfig).await;
        // The apiserver's warnings (e.g. an unrecognized schema format) would show too.
        assert!(
            !out.contains("Warning:"),
            "`{command}` prints a warning the README does not show:\n{out}"
        );
        if ok && shows(&step.expected, &out) {
            eprintln!("$ {}\n{out}", step.command);
            return;
        }
        assert!(
            !once && std::time::Instant::now() < deadline,
            "`{command}` does not print what the README shows.\nexpected:\n{}\ngot ({}):\n{out}",
            step.expected.join("\n"),
            if ok { "exit 0" } else { "failed" }
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn tools_present(test: &str) -> bool {
    for tool in ["kubectl", "curl", "jq"] {
        let present = std::process::Command::new(tool)
            .arg("--help")
            .output()
            .is_ok();
        if !present {
            let why = format!("{test}: {tool} is not installed (the README's commands use it)");
            tally_tests::skip(&why);
            return false;
        }
    }
    true
}

// ---------------------------------------------------------------------------------
// The kubelet for the agent pod, pods as the user creates them.

/// Node 1's agent: the container of the pod the DaemonSet controller made for it, run
/// once the DaemonSet exists; returns when the controller counts the pod ready.
async fn start_agent(
    client: &kube::Client,
    kubeconfig: &Path,
    node: &Node,
    dir: &Path,
) -> AgentContainer {
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), AGENTS_NS);
    let ds = within(30, "the node agents' DaemonSet", async || {
        dss.get_opt("tally-agent").await.unwrap()
    })
    .await;
    let template = ds.spec.unwrap().template;
    let env = serde_json::to_value(&template.spec.as_ref().unwrap().containers[0].env).unwrap();
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "NODE_NAME from the downward API: {env}"
    );
    let name = format!("tally-agent-{}", node.name);
    let place = PodPlace {
        namespace: AGENTS_NS,
        name: &name,
        node: &node.name,
    };
    let agent = AgentContainer::start(client, kubeconfig, template, place, dir).await;
    // The test's kubelet reports the DaemonSet's pod running; the real DaemonSet
    // controller counts it ready.
    within(
        30,
        "the DaemonSet controller to count its pod ready",
        async || {
            let ds = dss.get("tally-agent").await.ok()?;
            (ds.status?.number_ready >= 1).then_some(())
        },
    )
    .await;
    agent
}

fn gpu_pod(name: &str, ns: &str, subject: &str, gpus: u32, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
                     "annotations": {"tally.dev/subject": subject}},
        "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "main", "image": "trainer",
                 "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}]},
    }))
    .unwrap()
}

async fn exact_subjects(http: &reqwest::Client, server: &str, expected: &BTreeMap<String, u64>) {
    let mut last = None;
    let got = eventually(
        Duration::from_secs(90),
        Duration::from_millis(300),
        &format!("GPU-seconds per subject = {expected:?}"),
        async || {
            last = subject_totals(http, server, METER.0, METER.1).await;
            (last.as_ref() == Some(expected)).then(|| last.clone())
        },
    )
    .await;
    // Nothing arrives twice later.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        subject_totals(http, server, METER.0, METER.1).await,
        got,
        "the totals stay exact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meter_and_collector_on_a_cluster_bill_gpu_seconds_exactly() {
    let test = "cluster_e2e";
    let (Some(brokers), Some(ch)) = (kafka(test), clickhouse(test)) else {
        return;
    };
    if !tools_present(test) {
        return;
    }
    let dir = KeptDir(Some(tempfile::tempdir().unwrap()));
    eprintln!(
        "logs in {} (kept with TALLY_KEEP_LOGS=1)",
        dir.path().display()
    );
    let Some(cluster) = Cluster::connect(test).await else {
        return;
    };
    let kc = cluster.kubeconfig.clone();
    let operator_kc = cluster.kubeconfig_as("tally-operator", dir.path());
    let client = cluster.client().await;
    let http = reqwest::Client::new();
    let unique = format!("{}_{}", std::process::id(), unix_now());
    let (db, topic) = (format!("tally_e2e_{unique}"), format!("tally-e2e-{unique}"));

    // The README's cluster has one node, the one the agent runs on; a second joins
    // after the walkthrough. The test's kubelets run the pods the controllers make in
    // tally's namespace (the agent container of node 1's is the process below).
    let node = Node::register(&client, "gpu-node-1").await;
    cluster
        .namespaces(&client, &[AGENTS_NS, "other-team"])
        .await;
    let _runner = PodRunner::start(&client, AGENTS_NS, &[&node]);

    // ---- The README walkthrough -------------------------------------------------
    let mut stack: Option<Stack> = None;
    let mut agent: Option<AgentContainer> = None;
    for step in walkthrough() {
        let server = stack.as_ref().map(|s| s.server.clone());
        replay(&step, &kc, server.as_deref()).await;
        if step.command.contains("crds/") {
            // The walkthrough starts with tally running against the cluster.
            stack = Some(Stack::start(
                dir.path(),
                (&kc, &operator_kc),
                &Pipeline {
                    brokers: &brokers,
                    clickhouse: &ch,
                    database: &db,
                    topic: &topic,
                },
                1,
                &["--agent-image", "tally:e2e", "--collector-status-secs", "2"],
            ));
        } else if step.command.contains("examples/cluster/gpu-billing.yaml") {
            agent = Some(start_agent(&client, &kc, &node, dir.path()).await);
        } else if step.command.contains("examples/cluster/train-pod.yaml") {
            // The README's pod runs 20 s on its two GPUs.
            node.run_pod(&client, (NS, "train-1"), "train", 20).await;
        }
    }
    let stack = stack.expect("the walkthrough installs the CRDs");
    let mut agent = agent.expect("the walkthrough applies the Collector");
    let server = stack.server.clone();
    let mut expected = BTreeMap::from([("acme".to_string(), 40u64)]);
    exact_subjects(&http, &server, &expected).await;

    // ---- A restart, the agent SIGKILLed and restarted, pods that do not count -------
    let other_node = Node::register(&client, "gpu-node-2").await;
    let _other_runner = PodRunner::start(&client, AGENTS_NS, &[&other_node]);
    let pods = Api::<Pod>::namespaced(client.clone(), NS);
    let pp = PostParams::default();
    pods.create(&pp, &gpu_pod("finetune-2", NS, "globex", 1, json!({})))
        .await
        .unwrap();
    pods.create(&pp, &gpu_pod("elsewhere", NS, "initech", 4, json!({})))
        .await
        .unwrap();
    Api::<Pod>::namespaced(client.clone(), "other-team")
        .create(
            &pp,
            &gpu_pod("not-ours", "other-team", "initech", 8, json!({})),
        )
        .await
        .unwrap();
    node.bind(&client, NS, "finetune-2").await;
    other_node.bind(&client, NS, "elsewhere").await;
    node.bind(&client, "other-team", "not-ours").await;
    let s1 = unix_now();
    node.pod_status(&client, NS, "finetune-2", running("main", s1))
        .await;
    other_node
        .pod_status(&client, NS, "elsewhere", running("main", s1))
        .await;
    node.pod_status(&client, "other-team", "not-ours", running("main", s1))
        .await;
    until(s1 + 6).await;
    agent.proc.kill9();
    until(s1 + 8).await;
    // The container fails after 8 s; the kubelet restarts it at s1 + 10.
    let failed = terminated(s1, s1 + 8, 1);
    let waiting = json!({"phase": "Running", "containerStatuses": [container("main", 1,
        json!({"waiting": {"reason": "ContainerCreating"}}), failed.clone())]});
    node.pod_status(&client, NS, "finetune-2", waiting).await;
    until(s1 + 10).await;
    let again = json!({"phase": "Running", "containerStatuses": [container("main", 1,
        json!({"running": {"startedAt": rfc3339(s1 + 10)}}), failed.clone())]});
    node.pod_status(&client, NS, "finetune-2", again).await;
    until(s1 + 12).await;
    agent.proc.spawn();
    until(s1 + 20).await;
    let done = finished("main", 1, s1 + 10, s1 + 20, failed);
    node.pod_status(&client, NS, "finetune-2", done).await;
    let not_ours = finished("main", 0, s1, s1 + 20, json!({}));
    other_node
        .pod_status(&client, NS, "elsewhere", not_ours.clone())
        .await;
    node.pod_status(&client, "other-team", "not-ours", not_ours)
        .await;
    expected.insert("globex".into(), 8 + 10);
    exact_subjects(&http, &server, &expected).await;

    // ---- A changed Collector: new hash, the agent picks the new configuration up ----
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), AGENTS_NS);
    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), AGENTS_NS);
    let hash_of = |cm: &ConfigMap| cm.metadata.annotations.as_ref().unwrap()[CONFIG_HASH].clone();
    let old_hash = hash_of(&cms.get("tally-agent").await.unwrap());
    let collectors: Api<Collector> = Api::namespaced(client.clone(), NS);
    let with_labels = Patch::Merge(json!({"spec": {"podRuntime": {"labels": ["team"]}}}));
    collectors
        .patch("gpu-pods", &PatchParams::default(), &with_labels)
        .await
        .unwrap();
    let new_hash = within(30, "a new config hash", async || {
        let h = hash_of(&cms.get("tally-agent").await.unwrap());
        (h != old_hash).then_some(h)
    })
    .await;
    within(30, "the DaemonSet's pod template to carry it", async || {
        let ds = dss.get("tally-agent").await.unwrap();
        let annotations = ds.spec?.template.metadata?.annotations?;
        (annotations[CONFIG_HASH] == new_hash).then_some(())
    })
    .await;
    assert_eq!(agent.sync_config(&client).await, new_hash);
    within(30, "the agent to reload its configuration", async || {
        agent
            .proc
            .log()
            .contains("Configuration changed")
            .then_some(())
    })
    .await;
    pods.create(
        &pp,
        &gpu_pod("eval-3", NS, "acme", 1, json!({"team": "research"})),
    )
    .await
    .unwrap();
    node.run_pod(&client, (NS, "eval-3"), "main", 6).await;
    *expected.get_mut("acme").unwrap() += 6;
    exact_subjects(&http, &server, &expected).await;
    let by_team = group_totals(&http, &server, METER, "team").await.unwrap();
    assert_eq!(
        by_team.get("research"),
        Some(&6),
        "the new configuration's label reached the events: {by_team:?}"
    );

    let status = collectors.get("gpu-pods").await.unwrap().status.unwrap();
    assert!(status.last_event_time.is_some(), "{status:?}");
    assert_eq!(status.conditions[0].reason, "AgentsReady");

    // ---- The Collector deleted: the agents' objects go ------------------------------
    collectors
        .delete("gpu-pods", &DeleteParams::default())
        .await
        .unwrap();
    within(
        30,
        "the DaemonSet, its ConfigMap and the agents' RBAC to go",
        async || {
            (dss.get_opt("tally-agent").await.unwrap().is_none()
                && cms.get_opt("tally-agent").await.unwrap().is_none()
                && Api::<ClusterRole>::all(client.clone())
                    .get_opt("tally-agent")
                    .await
                    .unwrap()
                    .is_none())
            .then_some(())
        },
    )
    .await;
    // The garbage collector removes the DaemonSet's pods: the agent stops gracefully.
    let agent_pods = Api::<Pod>::namespaced(client.clone(), AGENTS_NS);
    let of_agent = kube::api::ListParams::default().labels("app.kubernetes.io/name=tally-agent");
    within(
        60,
        "the garbage collector to remove the agents' pods",
        async || {
            agent_pods
                .list(&of_agent)
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert!(
        agent.proc.terminate(),
        "graceful stop:\n{}",
        agent.proc.log()
    );
    assert_eq!(
        subject_totals(&http, &server, METER.0, METER.1).await,
        Some(expected),
        "the usage stays"
    );
    drop(stack);
    if let Some(plane) = cluster.plane {
        tally_tests::say(&plane.report());
    }
    node.remove(&client).await;
    other_node.remove(&client).await;
}
