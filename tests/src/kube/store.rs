//! The API server's state and its write semantics: resourceVersions, generation,
//! uid/creationTimestamp, optimistic concurrency (409), the status subresource,
//! finalizers and deletionTimestamp, ownerReference garbage collection, server-side
//! apply field ownership, CRD registration, and the event log that watches replay.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::schema::{self, Cause};

/// A servable resource (built-in or registered by a CRD).
#[derive(Clone, Debug)]
pub struct ResourceDef {
    /// API group (`""` for core).
    pub group: String,
    /// Version.
    pub version: String,
    /// Plural name (the URL segment).
    pub plural: String,
    /// Kind.
    pub kind: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Whether `/status` is a subresource (then the main resource ignores status).
    pub status: bool,
    /// The CRD's `openAPIV3Schema` (built-ins are not validated).
    pub schema: Option<Value>,
    /// Short names for discovery.
    pub short_names: Vec<String>,
    /// The CRD version's `additionalPrinterColumns` (for `kubectl get` tables).
    pub columns: Vec<Value>,
}

impl ResourceDef {
    /// `group/version`, or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Key of the resource in the server's maps.
    pub fn key(&self) -> String {
        gvr_key(&self.group, &self.version, &self.plural)
    }
}

/// Key of a resource: `group/version/plural`.
pub fn gvr_key(group: &str, version: &str, plural: &str) -> String {
    format!("{group}/{version}/{plural}")
}

fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    status: bool,
) -> ResourceDef {
    ResourceDef {
        group: group.into(),
        version: version.into(),
        plural: plural.into(),
        kind: kind.into(),
        namespaced,
        status,
        schema: None,
        short_names: Vec::new(),
        columns: Vec::new(),
    }
}

/// The built-in kinds tally's binaries and tests use.
pub fn builtins() -> Vec<ResourceDef> {
    vec![
        builtin("", "v1", "namespaces", "Namespace", false, true),
        builtin("", "v1", "nodes", "Node", false, true),
        builtin("", "v1", "pods", "Pod", true, true),
        builtin("", "v1", "configmaps", "ConfigMap", true, false),
        builtin("", "v1", "secrets", "Secret", true, false),
        builtin("", "v1", "serviceaccounts", "ServiceAccount", true, false),
        builtin("", "v1", "services", "Service", true, true),
        builtin("", "v1", "events", "Event", true, false),
        builtin("apps", "v1", "daemonsets", "DaemonSet", true, true),
        builtin("apps", "v1", "deployments", "Deployment", true, true),
        builtin("coordination.k8s.io", "v1", "leases", "Lease", true, false),
        builtin("events.k8s.io", "v1", "events", "Event", true, false),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "Role",
            true,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            false,
        ),
        builtin(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            true,
            true,
        ),
        builtin(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
            false,
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
        ),
    ]
}

/// An API error, answered as a `metav1.Status`.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status.
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `Expired`, `BadRequest`, …
    pub reason: &'static str,
    /// Human message.
    pub message: String,
    /// Field causes (for `Invalid` and apply conflicts).
    pub causes: Vec<Cause>,
}

impl ApiError {
    /// A plain error.
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            causes: Vec::new(),
        }
    }

    /// The `metav1.Status` body.
    pub fn status(&self) -> Value {
        let causes: Vec<Value> = self
            .causes
            .iter()
            .map(|c| json!({"field": c.field, "message": c.message, "reason": c.reason}))
            .collect();
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
            "details": {"causes": causes},
        })
    }
}

type Res<T> = Result<T, ApiError>;

/// One entry of the event log.
#[derive(Debug)]
pub struct Entry {
    /// The resourceVersion this change produced.
    pub rv: u64,
    /// The resource key.
    pub gvr: String,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    /// The object before the change (for selector transitions).
    pub old: Option<Value>,
    /// The object after the change (the last state for `DELETED`).
    pub obj: Value,
}

/// A write the server accepted, for tests that count writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Write {
    /// HTTP verb.
    pub verb: String,
    /// Resource key.
    pub gvr: String,
    /// `namespace/name`.
    pub object: String,
    /// Subresource, if any.
    pub subresource: String,
}

/// The logged entries after a resourceVersion, and the live ones after them.
pub type Subscription = (Vec<Arc<Entry>>, broadcast::Receiver<Arc<Entry>>);

/// Field ownership of one object: manager → (operation, owned leaf paths).
type Managers = BTreeMap<String, (String, BTreeSet<String>)>;

/// Options of a write.
#[derive(Clone, Debug, Default)]
pub struct WriteOpts {
    /// `fieldManager` (or the user agent).
    pub manager: String,
    /// `force` for apply.
    pub force: bool,
    /// `fieldValidation=Strict`.
    pub strict: bool,
}

/// The whole server state.
#[derive(Debug)]
pub struct State {
    rv: u64,
    uids: u64,
    seed: u64,
    defs: BTreeMap<String, ResourceDef>,
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    managers: BTreeMap<(String, String, String), Managers>,
    log: VecDeque<Arc<Entry>>,
    log_cap: usize,
    /// Watches from resourceVersions below this are answered 410 Gone.
    compacted: u64,
    tx: broadcast::Sender<Arc<Entry>>,
    /// Accepted writes.
    pub writes: Vec<Write>,
}

fn now() -> String {
    crate::rfc3339(crate::unix_now())
}

fn obj_key(obj: &Value) -> (String, String) {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// Everything but `metadata` and `status`: a change here bumps `metadata.generation`.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.as_object().cloned().unwrap_or_default();
    for k in ["metadata", "status", "apiVersion", "kind"] {
        o.remove(k);
    }
    Value::Object(o)
}

impl State {
    /// A fresh server with the built-in kinds.
    pub fn new() -> State {
        let (tx, _) = broadcast::channel(65_536);
        let mut s = State {
            rv: 1000,
            uids: 0,
            seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(7),
            defs: BTreeMap::new(),
            objects: BTreeMap::new(),
            managers: BTreeMap::new(),
            log: VecDeque::new(),
            log_cap: 100_000,
            compacted: 0,
            tx,
            writes: Vec::new(),
        };
        for d in builtins() {
            s.defs.insert(d.key(), d);
        }
        s
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// All servable resources.
    pub fn defs(&self) -> impl Iterator<Item = &ResourceDef> {
        self.defs.values()
    }

    /// The resource at `group/version/plural`.
    pub fn def(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceDef> {
        self.defs.get(&gvr_key(group, version, plural))
    }

    /// Forgets the event log up to now: watches from older resourceVersions get 410.
    pub fn compact(&mut self) {
        self.log.clear();
        self.compacted = self.rv;
    }

    /// Subscribes to changes after `since`: the logged entries after it, then live ones.
    pub fn subscribe(&self, since: u64) -> Res<Subscription> {
        if since < self.compacted {
            return Err(ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {since} ({})", self.compacted),
            ));
        }
        let backlog = self.log.iter().filter(|e| e.rv > since).cloned().collect();
        Ok((backlog, self.tx.subscribe()))
    }

    /// Gets one object.
    pub fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> Res<Value> {
        self.objects
            .get(&def.key())
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| not_found(def, name))
    }

    /// Objects of a resource (in `ns`, or all namespaces), ordered by (namespace, name).
    pub fn list(&self, def: &ResourceDef, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .get(&def.key())
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| ns.is_none_or(|want| want == n))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn next_uid(&mut self) -> String {
        self.uids += 1;
        format!(
            "{:08x}-{:04x}-4000-8000-{:012x}",
            self.seed as u32,
            (self.seed >> 32) as u16,
            self.uids
        )
    }

    /// Records a change: a new resourceVersion, the log, the watchers.
    fn emit(&mut self, gvr: &str, kind: &'static str, old: Option<Value>, obj: Value) {
        let e = Arc::new(Entry {
            rv: self.rv,
            gvr: gvr.to_string(),
            kind,
            old,
            obj,
        });
        if self.log.len() >= self.log_cap
            && let Some(first) = self.log.pop_front()
        {
            self.compacted = first.rv;
        }
        self.log.push_back(e.clone());
        let _ = self.tx.send(e);
    }

    fn validate(
        &self,
        def: &ResourceDef,
        obj: &mut Value,
        old: Option<&Value>,
        strict: bool,
    ) -> Res<()> {
        if def.group.is_empty() && def.kind == "Secret" {
            fold_string_data(obj);
        }
        let (ns, name) = obj_key(obj);
        if name.is_empty() {
            return Err(invalid(
                def,
                &name,
                vec![Cause {
                    field: "metadata.name".into(),
                    message: "Required value: name or generateName is required".into(),
                    reason: "FieldValueRequired",
                }],
            ));
        }
        if def.namespaced && ns.is_empty() {
            return Err(invalid(
                def,
                &name,
                vec![Cause {
                    field: "metadata.namespace".into(),
                    message: "Required value".into(),
                    reason: "FieldValueRequired",
                }],
            ));
        }
        if let Some(schema) = &def.schema {
            let causes = schema::validate(schema, obj, old, strict);
            if !causes.is_empty() {
                return Err(invalid(def, &name, causes));
            }
        }
        if let Some(old) = old
            && old["metadata"].get("deletionTimestamp").is_some()
        {
            let before: BTreeSet<&str> = finalizers(old).into_iter().collect();
            if let Some(added) = finalizers(obj).into_iter().find(|f| !before.contains(f)) {
                return Err(invalid(
                    def,
                    &name,
                    vec![Cause {
                        field: "metadata.finalizers".into(),
                        message: format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [\"{added}\"]"
                        ),
                        reason: "FieldValueForbidden",
                    }],
                ));
            }
        }
        Ok(())
    }

    /// Creates an object (`POST`).
    pub fn create(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        mut obj: Value,
        opts: &WriteOpts,
    ) -> Res<Value> {
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the body must be a JSON object",
            ));
        };
        map.insert("apiVersion".into(), def.api_version().into());
        map.insert("kind".into(), def.kind.clone().into());
        let meta = map.entry("metadata").or_insert_with(|| json!({}));
        if !meta.is_object() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "metadata must be an object",
            ));
        }
        if meta
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
            && let Some(prefix) = meta
                .get("generateName")
                .and_then(Value::as_str)
                .map(str::to_string)
        {
            self.uids += 1;
            meta["name"] = format!(
                "{prefix}{:05x}",
                (self.seed ^ self.uids.wrapping_mul(0x9e37_79b9)) & 0xfffff
            )
            .into();
        }
        if def.namespaced {
            match meta.get("namespace").and_then(Value::as_str) {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::new(
                        400,
                        "BadRequest",
                        format!(
                            "the namespace of the provided object ({n}) does not match the namespace sent on the request ({ns})"
                        ),
                    ));
                }
                _ => meta["namespace"] = ns.into(),
            }
        } else if let Some(m) = meta.as_object_mut() {
            m.remove("namespace");
        }
        if def.status
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        self.validate(def, &mut obj, None, opts.strict)?;
        let key = obj_key(&obj);
        if self
            .objects
            .get(&def.key())
            .is_some_and(|m| m.contains_key(&key))
        {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{}\" already exists", resource_name(def), key.1),
            ));
        }
        self.rv += 1;
        let uid = self.next_uid();
        let meta = &mut obj["metadata"];
        meta["uid"] = uid.into();
        meta["creationTimestamp"] = now().into();
        meta["generation"] = 1.into();
        meta["resourceVersion"] = self.rv.to_string().into();
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("managedFields");
        }
        if def.key() == gvr_key("apiextensions.k8s.io", "v1", "customresourcedefinitions") {
            establish(&mut obj);
        }
        let mut owned = Managers::new();
        if !opts.manager.is_empty() {
            owned.insert(opts.manager.clone(), ("Update".into(), leaves(&obj)));
        }
        self.managers
            .insert((def.key(), key.0.clone(), key.1.clone()), owned);
        self.objects
            .entry(def.key())
            .or_default()
            .insert(key, obj.clone());
        self.emit(&def.key(), "ADDED", None, obj.clone());
        self.after_write(def, &obj);
        Ok(obj)
    }

    /// Replaces an object (`PUT`, or `PUT …/status` with `status_only`).
    pub fn update(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        obj: Value,
        status_only: bool,
        opts: &WriteOpts,
    ) -> Res<Value> {
        let old = self.get(def, ns, name)?;
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str()
            && !rv.is_empty()
            && rv
                != old["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
        {
            return Err(conflict(def, name));
        }
        self.commit(def, old, obj, status_only, opts)
    }

    /// Builds the stored object from the old one and the submitted one, validates it,
    /// and stores it (or removes it, when deleting and the last finalizer went).
    fn commit(
        &mut self,
        def: &ResourceDef,
        old: Value,
        submitted: Value,
        status_only: bool,
        opts: &WriteOpts,
    ) -> Res<Value> {
        let (ns, name) = obj_key(&old);
        let mut new = if status_only {
            let mut n = old.clone();
            n["status"] = submitted.get("status").cloned().unwrap_or(Value::Null);
            if n["status"].is_null()
                && let Some(m) = n.as_object_mut()
            {
                m.remove("status");
            }
            n
        } else {
            let mut n = submitted;
            if !n.is_object() {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "the body must be a JSON object",
                ));
            }
            if def.status {
                match old.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        if let Some(m) = n.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            n
        };
        new["apiVersion"] = def.api_version().into();
        new["kind"] = def.kind.clone().into();
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        for k in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "namespace",
            "name",
            "generation",
        ] {
            match old["metadata"].get(k) {
                Some(v) => new["metadata"][k] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(k);
                    }
                }
            }
        }
        if let Some(m) = new["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
        self.validate(def, &mut new, Some(&old), opts.strict)?;
        let mut compare = new.clone();
        compare["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if compare == old {
            return Ok(old); // a no-op write does not change the resourceVersion
        }
        if spec_part(&new) != spec_part(&old) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = (g + 1).into();
        }
        self.rv += 1;
        new["metadata"]["resourceVersion"] = self.rv.to_string().into();
        if !opts.manager.is_empty() {
            let owned = self
                .managers
                .entry((def.key(), ns.clone(), name.clone()))
                .or_default();
            let changed: BTreeSet<String> = leaves(&new)
                .into_iter()
                .filter(|p| at(&new, p) != at(&old, p))
                .collect();
            for (_, (_, set)) in owned.iter_mut() {
                // A changed field moves to this manager; a removed field is owned by nobody.
                set.retain(|p| !changed.contains(p) && at(&new, p).is_some());
            }
            owned
                .entry(opts.manager.clone())
                .or_insert_with(|| ("Update".into(), BTreeSet::new()))
                .1
                .extend(changed);
        }
        if new["metadata"].get("deletionTimestamp").is_some() && finalizers(&new).is_empty() {
            self.remove(def, &ns, &name, Some(new.clone()));
            return Ok(new);
        }
        self.objects
            .entry(def.key())
            .or_default()
            .insert((ns, name), new.clone());
        self.emit(&def.key(), "MODIFIED", Some(old), new.clone());
        self.after_write(def, &new);
        Ok(new)
    }

    /// Patches an object. `kind` is the Content-Type's patch type.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        kind: &str,
        body: &Value,
        status_only: bool,
        opts: &WriteOpts,
    ) -> Res<Value> {
        let current = self.get(def, ns, name);
        if kind == "apply" {
            return self.apply(def, ns, name, current.ok(), body, status_only, opts);
        }
        let old = current?;
        let mut new = old.clone();
        match kind {
            "merge" | "strategic" => {
                if kind == "strategic" && def.schema.is_some() {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "strategic merge patch is not supported for custom resources; use a merge or JSON patch",
                    ));
                }
                json_patch::merge(&mut new, body);
            }
            "json" => {
                // As in the real server, `test` of a missing path against null succeeds
                // (kube's finalizer helper relies on it); the json-patch crate fails it.
                let mut ops = body.as_array().cloned().unwrap_or_default();
                ops.retain(|op| {
                    !(op["op"] == "test"
                        && op["value"].is_null()
                        && op["path"]
                            .as_str()
                            .is_some_and(|p| new.pointer(p).is_none()))
                });
                let p: json_patch::Patch =
                    serde_json::from_value(Value::Array(ops)).map_err(|e| {
                        ApiError::new(400, "BadRequest", format!("invalid JSON patch: {e}"))
                    })?;
                json_patch::patch(&mut new, &p).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!("the JSON patch could not be applied: {e}"),
                    )
                })?;
            }
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("unsupported patch type {other}"),
                ));
            }
        }
        if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
            && rv
                != old["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
        {
            return Err(conflict(def, name));
        }
        self.commit(def, old, new, status_only, opts)
    }

    /// Server-side apply with field ownership.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        current: Option<Value>,
        config: &Value,
        status_only: bool,
        opts: &WriteOpts,
    ) -> Res<Value> {
        if opts.manager.is_empty() {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "PATCH with apply requires a non-empty fieldManager",
            ));
        }
        let scoped = scope(config, def.status, status_only);
        let cfg_leaves = leaves(&scoped);
        let Some(current) = current else {
            if status_only {
                return Err(not_found(def, name));
            }
            let mut obj = config.clone();
            obj["metadata"]["name"] = name.into();
            let created = self.create(
                def,
                ns,
                obj,
                &WriteOpts {
                    manager: String::new(),
                    ..opts.clone()
                },
            )?;
            self.managers
                .entry((def.key(), ns.to_string(), name.to_string()))
                .or_default()
                .insert(opts.manager.clone(), ("Apply".into(), cfg_leaves));
            return Ok(created);
        };
        let key = (def.key(), ns.to_string(), name.to_string());
        let mut owned = self.managers.get(&key).cloned().unwrap_or_default();
        let mut conflicts = Vec::new();
        for p in &cfg_leaves {
            if at(&scoped, p) == at(&current, p) {
                continue;
            }
            for (m, (_, set)) in &owned {
                if *m != opts.manager && set.contains(p) {
                    conflicts.push(Cause {
                        field: p.replace('/', "."),
                        message: format!("conflict with \"{m}\""),
                        reason: "FieldManagerConflict",
                    });
                }
            }
        }
        if !conflicts.is_empty() && !opts.force {
            let list: Vec<String> = conflicts
                .iter()
                .map(|c| format!("{}: {}", c.message, c.field))
                .collect();
            let mut e = ApiError::new(
                409,
                "Conflict",
                format!(
                    "Apply failed with {} conflict(s): {}",
                    conflicts.len(),
                    list.join("; ")
                ),
            );
            e.causes = conflicts;
            return Err(e);
        }
        let mut new = current.clone();
        merge_apply(&mut new, &scoped);
        let previous = owned
            .get(&opts.manager)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        for p in previous.difference(&cfg_leaves) {
            let shared = owned
                .iter()
                .any(|(m, (_, s))| *m != opts.manager && s.contains(p));
            // An empty map applied before and filled now is still applied.
            let filled = cfg_leaves.iter().any(|l| {
                l.len() > p.len() && l.starts_with(p.as_str()) && l.as_bytes()[p.len()] == b'/'
            });
            if !shared && !filled {
                remove_path(&mut new, p);
            }
        }
        for p in &cfg_leaves {
            let differs = at(&scoped, p) != at(&current, p);
            for (m, (_, set)) in owned.iter_mut() {
                if *m != opts.manager && differs {
                    set.remove(p);
                }
            }
        }
        owned.insert(opts.manager.clone(), ("Apply".into(), cfg_leaves));
        owned.retain(|_, (_, s)| !s.is_empty());
        let result = self.commit(
            def,
            current,
            new,
            status_only,
            &WriteOpts {
                manager: String::new(),
                ..opts.clone()
            },
        )?;
        if self
            .objects
            .get(&def.key())
            .is_some_and(|m| m.contains_key(&(ns.to_string(), name.to_string())))
        {
            self.managers.insert(key, owned);
        }
        Ok(result)
    }

    /// Field managers of an object and the paths each owns (`/`-separated), for tests.
    pub fn managers(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
    ) -> BTreeMap<String, BTreeSet<String>> {
        self.managers
            .get(&(def.key(), ns.to_string(), name.to_string()))
            .map(|m| m.iter().map(|(k, (_, s))| (k.clone(), s.clone())).collect())
            .unwrap_or_default()
    }

    /// Deletes an object: marks it (finalizers) or removes it (and collects garbage).
    pub fn delete(&mut self, def: &ResourceDef, ns: &str, name: &str, orphan: bool) -> Res<Value> {
        let old = self.get(def, ns, name)?;
        if !finalizers(&old).is_empty() {
            if old["metadata"].get("deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut new = old.clone();
            self.rv += 1;
            new["metadata"]["deletionTimestamp"] = now().into();
            new["metadata"]["deletionGracePeriodSeconds"] = 0.into();
            new["metadata"]["resourceVersion"] = self.rv.to_string().into();
            self.objects
                .entry(def.key())
                .or_default()
                .insert((ns.to_string(), name.to_string()), new.clone());
            self.emit(&def.key(), "MODIFIED", Some(old), new.clone());
            return Ok(new);
        }
        if orphan {
            self.orphan(old["metadata"]["uid"].as_str().unwrap_or_default());
        }
        self.remove(def, ns, name, None);
        Ok(old)
    }

    fn remove(&mut self, def: &ResourceDef, ns: &str, name: &str, last: Option<Value>) {
        let key = (ns.to_string(), name.to_string());
        let Some(stored) = self
            .objects
            .get_mut(&def.key())
            .and_then(|m| m.remove(&key))
        else {
            return;
        };
        self.managers.remove(&(def.key(), key.0, key.1));
        self.rv += 1;
        let mut gone = last.unwrap_or(stored.clone());
        gone["metadata"]["resourceVersion"] = self.rv.to_string().into();
        let uid = gone["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.emit(&def.key(), "DELETED", Some(stored), gone);
        if def.key() == gvr_key("apiextensions.k8s.io", "v1", "customresourcedefinitions") {
            // Deleting a CRD deletes its objects and stops serving the kind.
            for served in self
                .defs
                .values()
                .filter(|d| d.schema.is_some())
                .cloned()
                .collect::<Vec<_>>()
            {
                if !self.crd_serves(&served) {
                    for obj in self.list(&served, None) {
                        let (n, m) = obj_key(&obj);
                        self.remove(&served, &n, &m, None);
                    }
                    self.defs.remove(&served.key());
                }
            }
        }
        self.collect_garbage(&uid);
    }

    fn crd_serves(&self, def: &ResourceDef) -> bool {
        self.list(&crd_def(), None).iter().any(|crd| {
            crd["spec"]["group"] == def.group.as_str()
                && crd["spec"]["names"]["plural"] == def.plural.as_str()
        })
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.objects
            .values()
            .any(|m| m.values().any(|o| o["metadata"]["uid"] == uid))
    }

    /// Background propagation: dependents whose owners are all gone are deleted.
    fn collect_garbage(&mut self, uid: &str) {
        if uid.is_empty() {
            return;
        }
        let mut doomed = Vec::new();
        for (gvr, objs) in &self.objects {
            for obj in objs.values() {
                let owners: Vec<&str> = obj["metadata"]["ownerReferences"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|o| o["uid"].as_str()).collect())
                    .unwrap_or_default();
                if owners.contains(&uid) && owners.iter().all(|o| !self.uid_exists(o)) {
                    let (n, m) = obj_key(obj);
                    doomed.push((gvr.clone(), n, m));
                }
            }
        }
        for (gvr, ns, name) in doomed {
            if let Some(def) = self.defs.get(&gvr).cloned() {
                let _ = self.delete(&def, &ns, &name, false);
            }
        }
    }

    /// Orphan propagation: dependents lose their owner reference to `uid`.
    fn orphan(&mut self, uid: &str) {
        let mut changed = Vec::new();
        for (gvr, objs) in &self.objects {
            for obj in objs.values() {
                if let Some(refs) = obj["metadata"]["ownerReferences"].as_array()
                    && refs.iter().any(|r| r["uid"] == uid)
                {
                    let mut new = obj.clone();
                    let kept: Vec<Value> =
                        refs.iter().filter(|r| r["uid"] != uid).cloned().collect();
                    new["metadata"]["ownerReferences"] = Value::Array(kept);
                    changed.push((gvr.clone(), obj.clone(), new));
                }
            }
        }
        for (gvr, old, new) in changed {
            if let Some(def) = self.defs.get(&gvr).cloned() {
                let _ = self.commit(&def, old, new, false, &WriteOpts::default());
            }
        }
    }

    /// Registers the kinds a CRD serves.
    fn after_write(&mut self, def: &ResourceDef, obj: &Value) {
        if def.key() != gvr_key("apiextensions.k8s.io", "v1", "customresourcedefinitions") {
            return;
        }
        let spec = &obj["spec"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        for version in spec["versions"].as_array().into_iter().flatten() {
            if version["served"] == false {
                continue;
            }
            let d = ResourceDef {
                group: s(&spec["group"]),
                version: s(&version["name"]),
                plural: s(&spec["names"]["plural"]),
                kind: s(&spec["names"]["kind"]),
                namespaced: spec["scope"] == "Namespaced",
                status: version["subresources"].get("status").is_some(),
                schema: Some(version["schema"]["openAPIV3Schema"].clone()),
                short_names: spec["names"]["shortNames"]
                    .as_array()
                    .map(|a| a.iter().map(s).collect())
                    .unwrap_or_default(),
                columns: version["additionalPrinterColumns"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            };
            self.defs.insert(d.key(), d);
        }
    }
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

fn crd_def() -> ResourceDef {
    builtins()
        .into_iter()
        .find(|d| d.plural == "customresourcedefinitions")
        .expect("built in")
}

/// A CRD is established at once (no naming conflicts are checked).
fn establish(crd: &mut Value) {
    let t = now();
    crd["status"] = json!({
        "acceptedNames": crd["spec"]["names"].clone(),
        "storedVersions": crd["spec"]["versions"].as_array().map(|v| v.iter().filter(|x| x["storage"] == true).map(|x| x["name"].clone()).collect::<Vec<_>>()).unwrap_or_default(),
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": t},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": t},
        ],
    });
}

fn finalizers(obj: &Value) -> Vec<&str> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn resource_name(def: &ResourceDef) -> String {
    if def.group.is_empty() {
        def.plural.clone()
    } else {
        format!("{}.{}", def.plural, def.group)
    }
}

fn not_found(def: &ResourceDef, name: &str) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", resource_name(def)),
    )
}

fn conflict(def: &ResourceDef, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            resource_name(def)
        ),
    )
}

fn invalid(def: &ResourceDef, name: &str, causes: Vec<Cause>) -> ApiError {
    let list: Vec<String> = causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect();
    let kind = if def.group.is_empty() {
        def.kind.clone()
    } else {
        format!("{}.{}", def.kind, def.group)
    };
    let mut e = ApiError::new(
        422,
        "Invalid",
        format!("{kind} \"{name}\" is invalid: {}", list.join(", ")),
    );
    e.causes = causes;
    e
}

/// The part of an applied configuration a request owns: the status for `/status`,
/// everything but the status otherwise (when status is a subresource). Identity fields
/// are not owned.
fn scope(config: &Value, has_status: bool, status_only: bool) -> Value {
    let mut out = Map::new();
    for (k, v) in config.as_object().into_iter().flatten() {
        let keep = match k.as_str() {
            "apiVersion" | "kind" => false,
            "status" => status_only || !has_status,
            "metadata" => !status_only,
            _ => !status_only,
        };
        if keep {
            out.insert(k.clone(), v.clone());
        }
    }
    if let Some(m) = out.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "name",
            "namespace",
            "resourceVersion",
            "uid",
            "managedFields",
            "creationTimestamp",
            "generation",
        ] {
            m.remove(k);
        }
        if m.is_empty() {
            out.remove("metadata");
        }
    }
    Value::Object(out)
}

/// Leaf paths of a value (`/`-separated keys): scalars, arrays (atomic) and empty objects.
pub fn leaves(v: &Value) -> BTreeSet<String> {
    fn walk(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, c) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}/{k}")
                    };
                    walk(c, &p, out);
                }
            }
            _ if !prefix.is_empty() => {
                out.insert(prefix.to_string());
            }
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    walk(v, "", &mut out);
    out
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('/').try_fold(v, |v, k| v.get(k))
}

fn remove_path(v: &mut Value, path: &str) {
    let mut parts: Vec<&str> = path.split('/').collect();
    let Some(last) = parts.pop() else { return };
    let mut cur = v;
    for p in parts {
        match cur.get_mut(p) {
            Some(c) => cur = c,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

/// Apply's merge: objects merge key by key, everything else (lists too) is replaced.
fn merge_apply(target: &mut Value, config: &Value) {
    match (target.as_object_mut(), config.as_object()) {
        (Some(t), Some(c)) => {
            for (k, v) in c {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_apply(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        _ => *target = config.clone(),
    }
}

/// A Secret's `stringData` is write-only: the server merges it into `data`
/// (base64), as the real API server does.
fn fold_string_data(secret: &mut Value) {
    let Some(Value::Object(strings)) = secret.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return;
    };
    if !secret["data"].is_object() {
        secret["data"] = json!({});
    }
    for (k, v) in strings {
        let bytes = k8s_openapi::ByteString(v.as_str().unwrap_or_default().as_bytes().to_vec());
        secret["data"][k] = serde_json::to_value(bytes).unwrap_or_default();
    }
}
