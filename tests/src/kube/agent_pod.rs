//! The kubelet's part for tally's agent pods: the container of a pod the real
//! DaemonSet or Deployment controller made is tally's binary, started from the
//! workload's pod template as a kubelet would start it — its command and arguments,
//! literal and downward-API environment, the configuration ConfigMap projected into a
//! folder (each file swapped atomically) — with stand-ins only for what a pod has and a
//! process here has not: the API access of its ServiceAccount (a kubeconfig), the
//! spool's volume and the metrics port.
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec};
use kube::api::Api;

use crate::{Proc, bin, eventually, free_port};

/// The annotation carrying the agents' configuration hash (the operator's).
pub const CONFIG_HASH: &str = "tally.dev/config-hash";

/// Where one agent pod runs.
#[derive(Clone, Copy, Debug)]
pub struct PodPlace<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The pod's name (what `metadata.name` resolves to).
    pub name: &'a str,
    /// The node it is bound to (`spec.nodeName`).
    pub node: &'a str,
}

/// An agent container: the process and where its configuration is projected.
#[derive(Debug)]
pub struct AgentContainer {
    /// The running binary.
    pub proc: Proc,
    /// Its metrics address (`127.0.0.1:port`).
    pub metrics: String,
    config_dir: PathBuf,
    config_map: String,
    namespace: String,
}

impl AgentContainer {
    /// Starts the first container of `template` for the pod at `place`, with API access
    /// through `kubeconfig`, its files under `dir` (named after the pod), and waits for
    /// its `/healthz`. The projected ConfigMap's hash must be the template's.
    pub async fn start(
        client: &kube::Client,
        kubeconfig: &Path,
        template: PodTemplateSpec,
        place: PodPlace<'_>,
        dir: &Path,
    ) -> AgentContainer {
        let hash = template
            .metadata
            .and_then(|m| m.annotations)
            .unwrap_or_default()[CONFIG_HASH]
            .clone();
        let spec = template.spec.expect("a pod spec");
        let c = &spec.containers[0];
        let mount = c
            .volume_mounts
            .as_ref()
            .and_then(|ms| ms.iter().find(|m| m.name == "config"))
            .expect("the configuration is mounted")
            .mount_path
            .clone();
        let config_map = spec
            .volumes
            .as_ref()
            .and_then(|vs| vs.iter().find(|v| v.name == "config"))
            .and_then(|v| v.config_map.as_ref())
            .expect("from a ConfigMap")
            .name
            .clone();
        let config_dir = dir.join(format!("{}-config", place.name));
        let projected = project(client, place.namespace, &config_map, &config_dir).await;
        assert_eq!(
            projected, hash,
            "the pod template carries the config's hash"
        );

        let mut env: Vec<(String, String)> = Vec::new();
        for e in c.env.as_deref().unwrap_or_default() {
            if let Some(v) = &e.value {
                env.push((e.name.clone(), v.clone()));
            }
            let field = e
                .value_from
                .as_ref()
                .and_then(|f| f.field_ref.as_ref())
                .map(|f| f.field_path.as_str());
            let resolved = match field {
                Some("spec.nodeName") => Some(place.node),
                Some("metadata.namespace") => Some(place.namespace),
                Some("metadata.name") => Some(place.name),
                _ => None,
            };
            if let Some(v) = resolved {
                env.push((e.name.clone(), v.to_string()));
            }
        }
        let metrics = format!("127.0.0.1:{}", free_port());
        env.extend([
            ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            (
                "TALLY_AGENT_SPOOL".into(),
                dir.join(format!("{}-spool", place.name))
                    .display()
                    .to_string(),
            ),
            ("TALLY_AGENT_METRICS_LISTEN".into(), metrics.clone()),
            ("RUST_LOG".into(), "info".into()),
        ]);
        let args: Vec<String> = c
            .args
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|a| a.replace(&mount, config_dir.to_str().expect("UTF-8 path")))
            .collect();
        let program = c.command.as_ref().expect("a command")[0].clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let log = dir.join(format!("{}.log", place.name));
        let proc = Proc::start(bin(&program), &args, &env, log);
        let http = reqwest::Client::new();
        eventually(
            Duration::from_secs(30),
            Duration::from_millis(250),
            "the agent's /healthz",
            async || {
                http.get(format!("http://{metrics}/healthz"))
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            },
        )
        .await;
        AgentContainer {
            proc,
            metrics,
            config_dir,
            config_map,
            namespace: place.namespace.to_string(),
        }
    }

    /// The kubelet's periodic sync of the mounted ConfigMap; returns its config hash.
    pub async fn sync_config(&self, client: &kube::Client) -> String {
        project(client, &self.namespace, &self.config_map, &self.config_dir).await
    }
}

/// Writes ConfigMap `ns/name`'s files into `dir`, each replaced atomically (the
/// kubelet swaps a symlink); returns the ConfigMap's config hash.
async fn project(client: &kube::Client, ns: &str, name: &str, dir: &Path) -> String {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = cms
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("ConfigMap {ns}/{name}: {e}"));
    std::fs::create_dir_all(dir).expect("the config folder");
    for (file, text) in cm.data.unwrap_or_default() {
        let tmp = dir.join(format!("..{file}.tmp"));
        std::fs::write(&tmp, text).expect("write a projected file");
        std::fs::rename(&tmp, dir.join(&file)).expect("swap a projected file");
    }
    cm.metadata.annotations.unwrap_or_default()[CONFIG_HASH].clone()
}
