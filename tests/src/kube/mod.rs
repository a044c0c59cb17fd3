//! Kubernetes for tests: a real control plane (etcd + kube-apiserver +
//! kube-controller-manager from `KUBEBUILDER_ASSETS`, [`control_plane`]) started once
//! per test binary, or any control plane named by `TALLY_KUBECONFIG` (`make test-e2e
//! KUBECONFIG=…` sets it) — one **without scheduler or kubelets**, never a cluster
//! that runs workloads: tests create Nodes and bind pods themselves.
//!
//! Tests play only the parts that run no code here ([`kubelet`]): the scheduler (bind
//! pods) and each node's kubelet (Node heartbeat, pod status, finishing a pod's
//! deletion). Every controller — Deployment, ReplicaSet, DaemonSet, garbage
//! collector, namespace, service accounts, node lifecycle — is the real one, and so is
//! the API: schema and CEL validation, server-side apply, watches, RBAC.
//!
//! Without assets and without `TALLY_KUBECONFIG`, [`Cluster::connect`] prints why the
//! test is skipped, and fails it under `CI` (CI never passes by skipping).
pub mod agent_pod;
pub mod control_plane;
pub mod kubelet;

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};

pub use control_plane::ControlPlane;

/// The control plane a test runs against.
#[derive(Debug)]
pub struct Cluster {
    /// The admin kubeconfig to hand to binaries.
    pub kubeconfig: PathBuf,
    /// This binary's own control plane; `None` on `TALLY_KUBECONFIG`.
    pub plane: Option<&'static ControlPlane>,
}

impl Cluster {
    /// This binary's control plane, or `TALLY_KUBECONFIG`'s; `None` (after saying why)
    /// when there is neither, outside CI. Incomplete assets or a control plane that
    /// does not start fail the test.
    pub async fn connect(test: &str) -> Option<Cluster> {
        if let Some(k) = std::env::var_os("TALLY_KUBECONFIG").filter(|k| !k.is_empty()) {
            return Some(Cluster {
                kubeconfig: PathBuf::from(k),
                plane: None,
            });
        }
        if std::env::var_os("KUBEBUILDER_ASSETS").is_none_or(|a| a.is_empty()) {
            crate::skip(&format!(
                "{test}: no Kubernetes control plane: set KUBEBUILDER_ASSETS (a folder with etcd, kube-apiserver and kube-controller-manager) or TALLY_KUBECONFIG"
            ));
            return None;
        }
        match ControlPlane::shared().await {
            Ok(plane) => Some(Cluster {
                kubeconfig: plane.kubeconfig.clone(),
                plane: Some(plane),
            }),
            Err(e) => panic!("{test}: the control plane did not start: {e}"),
        }
    }

    /// An admin client.
    pub async fn client(&self) -> kube::Client {
        control_plane::client_for(&self.kubeconfig)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A kubeconfig in `dir` authenticating as `identity` (one of
    /// [`control_plane::IDENTITIES`]) on the kit's own control plane, so the audit log
    /// names what that binary did; the admin kubeconfig on `TALLY_KUBECONFIG`.
    pub fn kubeconfig_as(&self, identity: &str, dir: &std::path::Path) -> PathBuf {
        match self.plane {
            Some(p) => p.kubeconfig_as(identity, dir),
            None => self.kubeconfig.clone(),
        }
    }

    /// This binary's own control plane, or `None` after saying why `what` is skipped
    /// on `TALLY_KUBECONFIG` (it needs the audit log or static identities only a
    /// control plane the kit started has).
    pub fn own_plane(&self, what: &str) -> Option<&'static ControlPlane> {
        if self.plane.is_none() {
            crate::skip(&format!(
                "{what}: needs the kit's own control plane (its audit log and token identities), not TALLY_KUBECONFIG"
            ));
        }
        self.plane
    }

    /// Creates each namespace that does not exist yet (a real API refuses objects in a
    /// namespace that does not exist).
    pub async fn namespaces(&self, client: &kube::Client, names: &[&str]) {
        let api: Api<Namespace> = Api::all(client.clone());
        for name in names {
            let ns: Namespace =
                serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
                    .expect("a valid Namespace");
            create_or_keep(&api, &ns, &format!("namespace {name}")).await;
        }
    }
}

/// Creates `obj`, or keeps the object of that name already there (409 AlreadyExists);
/// any other error fails the test, naming `what`.
pub(crate) async fn create_or_keep<K>(api: &Api<K>, obj: &K, what: &str)
where
    K: Clone
        + std::fmt::Debug
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating {what}: {e}"),
    }
}

impl Cluster {
    /// Deletes namespaces a test made and waits (up to 60 s) until they are gone, so a
    /// later test binary on the same control plane (`TALLY_KUBECONFIG`) does not meet
    /// their objects — an operator there would act on a leftover Collector.
    pub async fn remove_namespaces(&self, client: &kube::Client, names: &[&str]) {
        let api: Api<Namespace> = Api::all(client.clone());
        for name in names {
            let _ = api.delete(name, &Default::default()).await;
        }
        crate::eventually(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_millis(250),
            &format!("namespaces {names:?} to be deleted"),
            async || {
                for name in names {
                    if api.get_opt(name).await.ok()?.is_some() {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await;
    }
}

/// Acts as the user and the kubelet for a pod given as JSON (spec with `nodeName`, and
/// status): creates it (or keeps the existing one) and writes its status through the
/// status subresource, as the kubelet of its node does. The server assigns the uid.
pub async fn put_pod(client: &kube::Client, pod: serde_json::Value) {
    let ns = pod["metadata"]["namespace"]
        .as_str()
        .expect("pod namespace")
        .to_string();
    let name = pod["metadata"]["name"]
        .as_str()
        .expect("pod name")
        .to_string();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut spec = pod.clone();
    if let Some(o) = spec.as_object_mut() {
        o.remove("status");
    }
    if let Some(m) = spec["metadata"].as_object_mut() {
        m.remove("uid");
    }
    let created: Pod = serde_json::from_value(spec).expect("a valid pod");
    create_or_keep(&api, &created, &format!("pod {ns}/{name}")).await;
    let status = serde_json::json!({"status": pod["status"].clone()});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("writing the status of pod {ns}/{name}: {e}"));
}
