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
//!   election over a Lease in its namespace, one replica (Recreate) whose spool is a
//!   PersistentVolumeClaim ([`spool_claim`]), so checkpoints survive rescheduling;
//!   restricted security.
//! - Least-privilege RBAC ([`rbac`]): the node agent may only get/list/watch pods (RBAC
//!   cannot narrow a list to one node; the agent always lists with
//!   `spec.nodeName=<its node>`); the cluster agent may read pods and use one Lease.
use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde_json::json;
use tally_crds::collector::Scope;
use tally_crds::collector::{AgentConfig, CollectorConfig, Delivery, SecretKeyRef, SpoolConfig};
use tally_crds::{Collector, CollectorSpec, SpecError};

/// Name of the node agent's DaemonSet, ServiceAccount and RBAC objects.
pub const NODE_AGENT: &str = "tally-agent";
/// Name of the cluster agent's Deployment, ServiceAccount, Lease and RBAC objects.
pub const CLUSTER_AGENT: &str = "tally-cluster-agent";
/// The cluster agent's spool volume claim.
pub const CLUSTER_AGENT_SPOOL: &str = "tally-cluster-agent-spool";
/// Pod-template annotation carrying the configuration's hash.
pub const CONFIG_HASH: &str = "tally.dev/config-hash";
/// Where the agents' configuration is mounted.
pub const CONFIG_DIR: &str = "/etc/tally-agent";
/// Where the keys of the scope's Secret are mounted.
pub const SECRETS_DIR: &str = "/var/run/secrets/tally";

/// How the agents are deployed (from the operator's configuration).
#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// Namespace the agents run in (the operator's).
    pub namespace: String,
    /// The tally image (it holds every binary).
    pub image: String,
    /// Where agents send events.
    pub sink: Delivery,
    /// Host folder of the node agent's spool (survives pod restarts).
    pub spool_host_path: String,
    /// Secret (in [`AgentSettings::namespace`], key `token`) holding the bearer token
    /// the agents send to the ingest API; mounted at [`INGEST_TOKEN_DIR`].
    pub ingest_token_secret: Option<String>,
    /// Whether the operator creates the agents' ServiceAccounts and RBAC (a Helm chart
    /// may create them instead, so the operator needs no RBAC-writing permissions).
    pub manage_rbac: bool,
    /// Size of the cluster agent's spool claim, e.g. `2Gi`.
    pub cluster_spool_size: String,
    /// StorageClass of that claim (`None`: the cluster's default).
    pub cluster_spool_class: Option<String>,
}

/// Where the ingest token Secret is mounted.
pub const INGEST_TOKEN_DIR: &str = "/var/run/secrets/tally-ingest";

impl AgentSettings {
    /// The sink as the agents see it: with a mounted token file when one is configured.
    fn agent_sink(&self) -> Delivery {
        let mut sink = self.sink.clone();
        if let (Some(ingest), Some(_)) = (&mut sink.ingest, &self.ingest_token_secret) {
            ingest.token_file = Some(format!("{INGEST_TOKEN_DIR}/token"));
        }
        sink
    }

    /// The ingest token's volume and mount, when configured.
    fn token_volume(&self) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
        match &self.ingest_token_secret {
            Some(name) => (
                vec![
                    json!({"name": "ingest-token", "secret": {"secretName": name, "defaultMode": 0o440,
                            "items": [{"key": "token", "path": "token"}]}}),
                ],
                vec![
                    json!({"name": "ingest-token", "mountPath": INGEST_TOKEN_DIR, "readOnly": true}),
                ],
            ),
            None => (Vec::new(), Vec::new()),
        }
    }
}

/// One scope's rendering: the agent's configuration, the Secret keys it reads, and
/// the Collectors left out with their problem.
#[derive(Clone, Debug)]
pub struct Rendered {
    /// The agents' configuration.
    pub config: AgentConfig,
    /// Secret keys to mount, ordered by file.
    pub secrets: Vec<MountedKey>,
    /// `namespace/name` of each Collector left out, and why.
    pub problems: Vec<(String, SpecError)>,
}

/// A Secret key of a Collector's namespace, mounted into the agent as [`MountedKey::file`]
/// (a key of the scope's Secret, [`secret_name`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MountedKey {
    /// The mounted file's name (also its key in the scope's Secret).
    pub file: String,
    /// The Collector's namespace, where the Secret is.
    pub namespace: String,
    /// The referenced Secret key.
    pub reference: SecretKeyRef,
    /// `namespace/name` of the Collector referencing it.
    pub collector: String,
}

/// What a Collector may not do that a hand-written agent configuration may: read the
/// agent's own files (its ServiceAccount token, other Collectors' mounted Secrets).
pub fn cluster_rules(spec: &CollectorSpec) -> Result<(), SpecError> {
    if let Some(api) = &spec.http_api {
        for (i, h) in api.headers.iter().enumerate() {
            if h.value_from_file.is_some() {
                return Err(SpecError {
                    field: format!("spec.httpApi.headers[{i}].valueFromFile"),
                    message: "a Collector may not read the agent's files; put the value in a Secret of this namespace and use valueFromSecret: {name, key}".into(),
                });
            }
        }
    }
    Ok(())
}

/// Every check a Collector must pass to be rendered.
pub fn check(spec: &CollectorSpec) -> Result<(), SpecError> {
    spec.validate()?;
    cluster_rules(spec)
}

/// The scope's Secret holding the mounted keys.
pub fn secret_name(agent: &str) -> String {
    format!("{agent}-secrets")
}

/// The Collectors one scope's agent runs, with the problems of those left out. A
/// `valueFromSecret` header becomes a `valueFromFile` of the mounted key.
pub fn agent_config(collectors: &[Collector], scope: Scope, settings: &AgentSettings) -> Rendered {
    let mut chosen = Vec::new();
    let mut problems = Vec::new();
    let mut secrets = Vec::new();
    for c in collectors {
        if c.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ns = c.namespace().unwrap_or_default();
        let key = format!("{ns}/{}", c.name_any());
        if let Err(e) = check(&c.spec) {
            problems.push((key, e));
            continue;
        }
        let Ok(source) = c.spec.source() else {
            continue;
        };
        if source.scope() != scope {
            continue;
        }
        let mut spec = c.spec.clone();
        if let Some(api) = &mut spec.http_api {
            for h in &mut api.headers {
                if let Some(r) = h.value_from_secret.take() {
                    // Names hold no `_` (DNS subdomains), so this cannot collide.
                    let file = format!("{ns}_{}_{}_{}", c.name_any(), r.name, r.key);
                    h.value_from_file = Some(format!("{SECRETS_DIR}/{file}"));
                    secrets.push(MountedKey {
                        file,
                        namespace: ns.clone(),
                        reference: r,
                        collector: key.clone(),
                    });
                }
            }
        }
        chosen.push(CollectorConfig {
            namespace: ns,
            name: c.name_any(),
            spec,
        });
    }
    chosen.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    secrets.sort();
    secrets.dedup_by(|a, b| a.file == b.file);
    let spool = match scope {
        Scope::Node => SpoolConfig {
            path: "/var/lib/tally-agent/spool".into(),
            ..SpoolConfig::default()
        },
        // The cluster agent's spool is on its PersistentVolumeClaim.
        Scope::Cluster => SpoolConfig {
            path: "/var/lib/tally-cluster-agent/spool".into(),
            ..SpoolConfig::default()
        },
    };
    let config = AgentConfig {
        sink: settings.agent_sink(),
        spool,
        metrics_listen: "0.0.0.0:9465".into(),
        collectors: chosen,
    };
    Rendered {
        config,
        secrets,
        problems,
    }
}

/// The scope's Secret of mounted keys (`data`: file name → value), in the agents'
/// namespace. Only the referenced keys are in it.
pub fn secret(agent: &str, settings: &AgentSettings, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(agent)),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels(agent)),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
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

/// Adds the ingest token's volume and mount to a workload's pod template.
fn with_token(workload: &mut serde_json::Value, settings: &AgentSettings) {
    let (volumes, mounts) = settings.token_volume();
    let spec = &mut workload["spec"]["template"]["spec"];
    if let Some(v) = spec["volumes"].as_array_mut() {
        v.extend(volumes);
    }
    if let Some(m) = spec["containers"][0]["volumeMounts"].as_array_mut() {
        m.extend(mounts);
    }
}

/// The node agent DaemonSet for configuration `hash`.
pub fn daemonset(settings: &AgentSettings, hash: &str) -> DaemonSet {
    let mut pod = json!({
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
                            {"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": true},
                            {"name": "pod-logs", "mountPath": "/var/log/pods", "readOnly": true},
                            {"name": "cgroup", "mountPath": "/sys/fs/cgroup", "readOnly": true},
                            {"name": "spool", "mountPath": "/var/lib/tally-agent"},
                        ],
                    }],
                    "volumes": [
                        {"name": "config", "configMap": {"name": NODE_AGENT}},
                        {"name": "secrets", "secret": {"secretName": secret_name(NODE_AGENT), "optional": true, "defaultMode": 0o400}},
                        {"name": "pod-logs", "hostPath": {"path": "/var/log/pods", "type": "Directory"}},
                        {"name": "cgroup", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}},
                        {"name": "spool", "hostPath": {"path": settings.spool_host_path, "type": "DirectoryOrCreate"}},
                    ],
                },
            },
        },
    });
    with_token(&mut pod, settings);
    serde_json::from_value(pod).expect("a valid DaemonSet")
}

/// The leader-elected cluster agent Deployment for configuration `hash`.
pub fn deployment(settings: &AgentSettings, hash: &str) -> Deployment {
    let mut pod = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": CLUSTER_AGENT, "namespace": settings.namespace, "labels": labels(CLUSTER_AGENT)},
        "spec": {
            // One pod with a persistent spool: its checkpoints (counter baselines, API
            // cursors) survive a restart or a move to another node, so no usage
            // between the last scrape and the next is lost. Recreate: the old pod is
            // gone before the new one mounts the volume; the Lease guards the rest.
            "replicas": 1,
            "strategy": {"type": "Recreate"},
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
                            {"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": true},
                            {"name": "spool", "mountPath": "/var/lib/tally-cluster-agent"},
                        ],
                    }],
                    "volumes": [
                        {"name": "config", "configMap": {"name": CLUSTER_AGENT}},
                        {"name": "secrets", "secret": {"secretName": secret_name(CLUSTER_AGENT), "optional": true, "defaultMode": 0o440}},
                        {"name": "spool", "persistentVolumeClaim": {"claimName": CLUSTER_AGENT_SPOOL}},
                    ],
                },
            },
        },
    });
    with_token(&mut pod, settings);
    serde_json::from_value(pod).expect("a valid Deployment")
}

/// The cluster agent's spool claim (ReadWriteOnce, `--cluster-agent-spool-size`, the
/// cluster's default StorageClass unless `--cluster-agent-storage-class`).
pub fn spool_claim(settings: &AgentSettings) -> PersistentVolumeClaim {
    let mut spec = json!({"accessModes": ["ReadWriteOnce"],
                          "resources": {"requests": {"storage": settings.cluster_spool_size}}});
    if let Some(class) = &settings.cluster_spool_class {
        spec["storageClassName"] = json!(class);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLUSTER_AGENT_SPOOL, "namespace": settings.namespace, "labels": labels(CLUSTER_AGENT)},
        "spec": spec,
    }))
    .expect("a valid PersistentVolumeClaim")
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
    // Node agents also get their Node (GPU sharing labels), the DRA claims of their
    // pods and list their node's ResourceSlices; RBAC cannot narrow that to each
    // agent's own node.
    let rules = |name: &str| {
        let pods =
            json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]});
        if name == NODE_AGENT {
            json!([pods, {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
                {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get"]},
                {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"], "verbs": ["list"]}])
        } else {
            json!([pods])
        }
    };
    let read_pods = |name: &str| -> ClusterRole {
        serde_json::from_value(
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name, "labels": labels(name)},
            "rules": rules(name)}),
        )
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
