//! An in-memory Kubernetes API server for tests: plain HTTP on 127.0.0.1 and a
//! kubeconfig pointing at it, so tally's binaries and tests talk to it through an
//! ordinary `kube::Client` — and the same tests run against a real cluster by pointing
//! `TALLY_KUBECONFIG` at one ([`Cluster::connect`]).
//!
//! # What it implements (with the real API's semantics)
//! - Discovery: `/api`, `/apis`, `/api/v1`, `/apis/{group}/{version}`, `/version`.
//! - Built-in kinds tally uses (pods, nodes, namespaces, configmaps, secrets, services,
//!   serviceaccounts, persistentvolumeclaims, events, daemonsets, deployments, leases,
//!   RBAC, network policies,
//!   CRDs) and every
//!   kind a `CustomResourceDefinition` registers, as soon as it is created (deleting the
//!   CRD deletes its objects).
//! - Custom resources are validated against the CRD's OpenAPI schema (types, required,
//!   enum, pattern, lengths, bounds), unknown fields are pruned (or rejected with
//!   `fieldValidation=Strict`), and the CRD's CEL rules run with `self` and `oldSelf`
//!   ([`schema`]).
//! - create / get / list (with `limit`/`continue`) / update / delete; `uid`,
//!   `creationTimestamp`, `generation` (bumped when anything but metadata and status
//!   changes) and a global `resourceVersion`; `generateName`.
//! - Optimistic concurrency: an update or patch naming a stale `resourceVersion` gets
//!   409 Conflict; a create of an existing name 409 AlreadyExists.
//! - Watch (`?watch=true`) from a resourceVersion, replaying the event log; `0`/absent
//!   starts with the current objects; `sendInitialEvents`; `BOOKMARK` events when asked
//!   for (`allowWatchBookmarks`); `timeoutSeconds`; a resourceVersion older than the
//!   log ([`KubeKit::compact`]) gets an `ERROR` event with 410 Expired, as from etcd
//!   compaction. Objects moving in or out of a selector arrive as ADDED/DELETED.
//! - Label selectors (equality and set-based) and field selectors on any dotted path.
//! - The status subresource: `/status` writes only the status; main-resource writes
//!   keep the stored status.
//! - Merge patches, JSON patches (including `test`), and server-side apply with field
//!   managers: ownership per leaf field, 409 conflicts naming the other manager unless
//!   `force=true`, removal of fields a manager stops applying. Strategic merge patches on
//!   built-ins are treated as merge patches.
//! - `/openapi/v3`: per group version, each resource's PATCH operation with its
//!   group-version-kind and the `fieldValidation` parameter (so `kubectl apply` leaves
//!   validation to the server); no schemas.
//! - A Secret's `stringData` is folded into `data` (base64) on write; Secrets may be
//!   written as protobuf, as client-go's typed clients (Helm's release store) do
//!   ([`proto`]).
//! - `pods/{name}/binding` (a scheduler's binding: sets `spec.nodeName` once; 409 when
//!   the pod is already on a node).
//! - Server-side printing for `kubectl get` (`Accept: …;as=Table`): a CRD's
//!   `additionalPrinterColumns` (JSONPath by `serde_json_path`), Name and Age otherwise.
//! - Finalizers and `deletionTimestamp` (no new finalizers while deleting; the object
//!   goes when the last finalizer is removed); ownerReference garbage collection
//!   (background: dependents whose owners are all gone are deleted; `Orphan` removes
//!   the reference instead).
//!
//! # What it does not implement
//! Authentication and authorization (any token is accepted; RBAC objects are stored,
//! not enforced), admission webhooks, defaulting from schema `default`s, CRD version
//! conversion, `format` checks, `x-kubernetes-list-type` map/set merging in apply (lists
//! are atomic), `metadata.managedFields` in responses (ownership is kept internally
//! and exposed by [`KubeKit::managers`]), `dryRun`, foreground deletion, namespace
//! lifecycle (objects may be created in namespaces that do not exist), scheduling and
//! every controller (no Deployment makes pods; tests act as kubelet and node
//! controller), watch caches' exact bookmark timing (every [`KubeKit::start_with`]
//! interval), protobuf for anything but Secrets, HTTPS.
pub mod api;
pub mod kubelet;
pub mod proto;
pub mod schema;
pub mod select;
pub mod store;
pub mod table;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use store::{ResourceDef, State, Write};

/// A running in-memory API server. Stops when dropped.
#[derive(Debug)]
pub struct KubeKit {
    shared: api::Shared,
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// A kubeconfig file pointing at it.
    pub kubeconfig: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeKit {
    /// Starts a server with 1 s bookmarks, writing its kubeconfig into `dir`.
    pub fn start(dir: &Path) -> KubeKit {
        KubeKit::start_with(dir, Duration::from_secs(1))
    }

    /// Starts a server whose watches get a bookmark every `bookmark_every`. It runs on its
    /// own thread and runtime, so a test may block without stalling it.
    pub fn start_with(dir: &Path, bookmark_every: Duration) -> KubeKit {
        let shared = api::Shared {
            state: Arc::new(Mutex::new(State::new())),
            bookmark_every,
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = axum::Router::new()
            .fallback(api::handle)
            .with_state(shared.clone());
        let thread = std::thread::Builder::new()
            .name("kube-kit".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("kit runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    // Not a graceful shutdown: open watches would hold it for their timeout.
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stopped => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .expect("spawn the kit thread");
        std::fs::create_dir_all(dir).expect("kubeconfig dir");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&url)).expect("write kubeconfig");
        KubeKit {
            shared,
            url,
            kubeconfig,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Writes accepted so far.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.state.lock().unwrap().writes.clone()
    }

    /// Waits `quiet` and returns the writes accepted meanwhile, Lease renewals aside (a
    /// leader-elected process renews its Lease forever; everything else should be still).
    pub async fn writes_at_rest(&self, quiet: Duration) -> Vec<Write> {
        let before = self.writes().len();
        tokio::time::sleep(quiet).await;
        self.writes()
            .split_off(before)
            .into_iter()
            .filter(|w| !w.gvr.ends_with("/leases"))
            .collect()
    }

    /// Forgets the event log: watches from earlier resourceVersions get 410 Gone.
    pub fn compact(&self) {
        self.shared.state.lock().unwrap().compact();
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state.lock().unwrap().rv()
    }

    /// Field managers of an object and the fields each owns.
    pub fn managers(
        &self,
        group: &str,
        version: &str,
        plural: &str,
        ns: &str,
        name: &str,
    ) -> BTreeMap<String, BTreeSet<String>> {
        let s = self.shared.state.lock().unwrap();
        match s.def(group, version, plural) {
            Some(d) => s.managers(&d.clone(), ns, name),
            None => BTreeMap::new(),
        }
    }
}

impl Drop for KubeKit {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A kubeconfig for `url` (no credentials: the kit does not authenticate).
pub fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kit\n  cluster:\n    server: {url}\nusers:\n- name: kit\n  user:\n    token: kit\ncontexts:\n- name: kit\n  context:\n    cluster: kit\n    user: kit\n    namespace: default\ncurrent-context: kit\n"
    )
}

/// The API a test runs against: the kit, or the real cluster named by
/// `TALLY_KUBECONFIG` (`make test-e2e KUBECONFIG=…` sets it).
#[derive(Debug)]
pub struct Cluster {
    /// The kit, when not on a real cluster.
    pub kit: Option<KubeKit>,
    /// The kubeconfig to hand to binaries.
    pub kubeconfig: PathBuf,
}

impl Cluster {
    /// Starts the kit in `dir`, or uses `TALLY_KUBECONFIG`.
    pub fn connect(dir: &Path) -> Cluster {
        match std::env::var("TALLY_KUBECONFIG")
            .ok()
            .filter(|k| !k.is_empty())
        {
            Some(k) => Cluster {
                kit: None,
                kubeconfig: PathBuf::from(k),
            },
            None => {
                let kit = KubeKit::start(dir);
                Cluster {
                    kubeconfig: kit.kubeconfig.clone(),
                    kit: Some(kit),
                }
            }
        }
    }

    /// A client for it.
    pub async fn client(&self) -> kube::Client {
        let kc =
            kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read the kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("a config from the kubeconfig");
        kube::Client::try_from(config).expect("a kube client")
    }
}

/// Acts as the kubelet for a pod given as JSON (spec and status): creates it (or keeps
/// the existing one) and writes its status through the status subresource, as a
/// kubelet does. The server assigns the uid.
pub async fn put_pod(client: &kube::Client, pod: serde_json::Value) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, Patch, PatchParams, PostParams};
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
    match api.create(&PostParams::default(), &created).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating pod {ns}/{name}: {e}"),
    }
    let status = serde_json::json!({"status": pod["status"].clone()});
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("writing the status of pod {ns}/{name}: {e}"));
}
