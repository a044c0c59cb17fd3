//! Pure builders of the agents' Kubernetes objects (Collector spec → objects), the first
//! piece of the Collector controller: no API server is needed to test them.
//!
//! - One agent configuration per scope ([`agent_config`]): every valid, not-deleting
//!   Collector of that scope, ordered by namespace and name, so the same Collectors
//!   always render the same bytes.
//! - A ConfigMap holding it, and its content hash ([`config_map`]); the hash goes into
//!   the pod template's annotations, so a changed configuration rolls the agents.
//! - The node agent DaemonSet ([`daemonset`]): `--scope node`, `NODE_NAME` from the
//!   downward API, read-only hostPaths for `/var/log/pods` and `/sys/fs/cgroup`, a
//!   hostPath for its spool, `MALLOC_ARENA_MAX=1` (the measured footprint assumes it),
//!   uid 0 (to read the kubelet's 0640 log files as their owner) with every capability
//!   dropped, no privilege escalation, a read-only root filesystem, RuntimeDefault
//!   seccomp. hostPath volumes need the namespace's Pod Security level `privileged`.
//! - The cluster agent Deployment ([`deployment`]): `--scope cluster` with leader
//!   election over a Lease in its namespace, two replicas, restricted security.
//! - Least-privilege RBAC ([`rbac`]): the node agent may only get/list/watch pods (RBAC
//!   cannot narrow a list to one node; the agent always lists with
//!   `spec.nodeName=<its node>`); the cluster agent may read pods and use one Lease.
use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::ResourceExt;
use serde_json::json;
use tally_crds::collector::Scope;
use tally_crds::collector::{AgentConfig, CollectorConfig, SinkConfig, SpoolConfig};
use tally_crds::{Collector, SpecError};

/// Name of the node agent's DaemonSet, ServiceAccount and RBAC objects.
pub const NODE_AGENT: &str = "tally-agent";
/// Name of the cluster agent's Deployment, ServiceAccount, Lease and RBAC objects.
pub const CLUSTER_AGENT: &str = "tally-cluster-agent";
/// Pod-template annotation carrying the configuration's hash.
pub const CONFIG_HASH: &str = "tally.dev/config-hash";
/// Where the agents' configuration is mounted.
const CONFIG_DIR: &str = "/etc/tally-agent";

/// How the agents are deployed (from the operator's configuration).
#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// Namespace the agents run in (the operator's).
    pub namespace: String,
    /// The tally image (it holds every binary).
    pub image: String,
    /// Where agents send events.
    pub sink: SinkConfig,
    /// Host folder of the node agent's spool (survives pod restarts).
    pub spool_host_path: String,
}

/// The Collectors one scope's agent runs, with the problems of those left out.
pub fn agent_config(
    collectors: &[Collector],
    scope: Scope,
    settings: &AgentSettings,
) -> (AgentConfig, Vec<(String, SpecError)>) {
    let mut chosen = Vec::new();
    let mut problems = Vec::new();
    for c in collectors {
        if c.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let key = format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any());
        if let Err(e) = c.spec.validate() {
            problems.push((key, e));
            continue;
        }
        let Ok(source) = c.spec.source() else {
            continue;
        };
        if source.scope() != scope {
            continue;
        }
        chosen.push(CollectorConfig {
            namespace: c.namespace().unwrap_or_default(),
            name: c.name_any(),
            spec: c.spec.clone(),
        });
    }
    chosen.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let spool = match scope {
        Scope::Node => SpoolConfig {
            path: "/var/lib/tally-agent/spool".into(),
            ..SpoolConfig::default()
        },
        // The cluster agent's spool is on its pod's own disk (an emptyDir).
        Scope::Cluster => SpoolConfig {
            path: "/var/lib/tally-cluster-agent/spool".into(),
            ..SpoolConfig::default()
        },
    };
    let config = AgentConfig {
        sink: settings.sink.clone(),
        spool,
        metrics_listen: "0.0.0.0:9465".into(),
        collectors: chosen,
    };
    (config, problems)
}

/// The ConfigMap holding `config` as `agent.yaml`, and the configuration's hash.
pub fn config_map(
    name: &str,
    settings: &AgentSettings,
    config: &AgentConfig,
) -> (ConfigMap, String) {
    let yaml = serde_yaml::to_string(config).expect("an agent configuration serializes");
    let hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(yaml.as_bytes()));
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels(name),
                     "annotations": {CONFIG_HASH: hash}},
        "data": {"agent.yaml": yaml},
    }))
    .expect("a valid ConfigMap");
    (cm, hash)
}

fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), name.to_string()),
        ("app.kubernetes.io/part-of".to_string(), "tally".to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "tally-operator".to_string(),
        ),
    ])
}

/// Container security. The node agent runs as uid 0 with every capability dropped: the
/// kubelet writes pod logs as root with mode 0640, which the owner (root) may read
/// without any capability; nothing else of root's remains.
fn container_security(root: bool) -> serde_json::Value {
    let uid = if root { 0 } else { 65532 };
    json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": !root,
           "runAsUser": uid, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}})
}

fn env(scope: Scope) -> serde_json::Value {
    let mut env = vec![
        json!({"name": "MALLOC_ARENA_MAX", "value": "1"}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
    ];
    if scope == Scope::Node {
        env.push(
            json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}),
        );
    }
    json!(env)
}

/// The node agent DaemonSet for configuration `hash`.
pub fn daemonset(settings: &AgentSettings, hash: &str) -> DaemonSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": NODE_AGENT, "namespace": settings.namespace, "labels": labels(NODE_AGENT)},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": NODE_AGENT}},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
            "template": {
                "metadata": {"labels": labels(NODE_AGENT), "annotations": {CONFIG_HASH: hash}},
                "spec": {
                    "serviceAccountName": NODE_AGENT,
                    "priorityClassName": "system-node-critical",
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "agent", "image": settings.image,
                        "command": ["tally-agent"],
                        "args": ["--config", format!("{CONFIG_DIR}/agent.yaml"), "--scope", "node"],
                        "env": env(Scope::Node),
                        "ports": [{"name": "metrics", "containerPort": 9465}],
                        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                        "securityContext": container_security(true),
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 30},
                        "volumeMounts": [
                            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": true},
                            {"name": "pod-logs", "mountPath": "/var/log/pods", "readOnly": true},
                            {"name": "cgroup", "mountPath": "/sys/fs/cgroup", "readOnly": true},
                            {"name": "spool", "mountPath": "/var/lib/tally-agent"},
                        ],
                    }],
                    "volumes": [
                        {"name": "config", "configMap": {"name": NODE_AGENT}},
                        {"name": "pod-logs", "hostPath": {"path": "/var/log/pods", "type": "Directory"}},
                        {"name": "cgroup", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}},
                        {"name": "spool", "hostPath": {"path": settings.spool_host_path, "type": "DirectoryOrCreate"}},
                    ],
                },
            },
        },
    }))
    .expect("a valid DaemonSet")
}

/// The leader-elected cluster agent Deployment for configuration `hash`.
pub fn deployment(settings: &AgentSettings, hash: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": CLUSTER_AGENT, "namespace": settings.namespace, "labels": labels(CLUSTER_AGENT)},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app.kubernetes.io/name": CLUSTER_AGENT}},
            "template": {
                "metadata": {"labels": labels(CLUSTER_AGENT), "annotations": {CONFIG_HASH: hash}},
                "spec": {
                    "serviceAccountName": CLUSTER_AGENT,
                    "securityContext": {"runAsNonRoot": true, "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "agent", "image": settings.image,
                        "command": ["tally-agent"],
                        "args": ["--config", format!("{CONFIG_DIR}/agent.yaml"), "--scope", "cluster", "--lease-name", CLUSTER_AGENT],
                        "env": env(Scope::Cluster),
                        "ports": [{"name": "metrics", "containerPort": 9465}],
                        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}},
                        "securityContext": container_security(false),
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 30},
                        "volumeMounts": [
                            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": true},
                            {"name": "spool", "mountPath": "/var/lib/tally-cluster-agent"},
                        ],
                    }],
                    "volumes": [
                        {"name": "config", "configMap": {"name": CLUSTER_AGENT}},
                        {"name": "spool", "emptyDir": {"sizeLimit": "2Gi"}},
                    ],
                },
            },
        },
    }))
    .expect("a valid Deployment")
}

/// The agents' identities and least-privilege permissions.
#[derive(Clone, Debug)]
pub struct Rbac {
    /// One per agent.
    pub service_accounts: Vec<ServiceAccount>,
    /// Pod reading, cluster-wide (pods of every namespace may run on a node).
    pub cluster_roles: Vec<ClusterRole>,
    /// Binds each agent to its ClusterRole.
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    /// The cluster agent's one Lease.
    pub roles: Vec<Role>,
    /// Binds the cluster agent to it.
    pub role_bindings: Vec<RoleBinding>,
}

/// RBAC for both agents.
pub fn rbac(settings: &AgentSettings) -> Rbac {
    let ns = &settings.namespace;
    let sa = |name: &str| -> ServiceAccount {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": ns, "labels": labels(name)}}))
        .expect("a valid ServiceAccount")
    };
    let read_pods = |name: &str| -> ClusterRole {
        serde_json::from_value(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels(name)},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]}))
        .expect("a valid ClusterRole")
    };
    let bind = |name: &str| -> ClusterRoleBinding {
        serde_json::from_value(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": labels(name)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]}))
        .expect("a valid ClusterRoleBinding")
    };
    let lease_role: Role = serde_json::from_value(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": CLUSTER_AGENT, "namespace": ns, "labels": labels(CLUSTER_AGENT)},
        "rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [CLUSTER_AGENT], "verbs": ["get", "update", "patch"]},
        ]}))
    .expect("a valid Role");
    let lease_binding: RoleBinding = serde_json::from_value(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": CLUSTER_AGENT, "namespace": ns, "labels": labels(CLUSTER_AGENT)},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CLUSTER_AGENT},
        "subjects": [{"kind": "ServiceAccount", "name": CLUSTER_AGENT, "namespace": ns}]}),
    )
    .expect("a valid RoleBinding");
    Rbac {
        service_accounts: vec![sa(NODE_AGENT), sa(CLUSTER_AGENT)],
        cluster_roles: vec![read_pods(NODE_AGENT), read_pods(CLUSTER_AGENT)],
        cluster_role_bindings: vec![bind(NODE_AGENT), bind(CLUSTER_AGENT)],
        roles: vec![lease_role],
        role_bindings: vec![lease_binding],
    }
}

#[cfg(test)]
mod tests;
