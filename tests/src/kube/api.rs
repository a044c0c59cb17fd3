//! HTTP routing of the in-memory API server: discovery, the resource verbs, and watch
//! streams (newline-delimited JSON events with bookmarks and 410 Gone).
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State as AxState};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::select::{FieldSelector, LabelSelector};
use super::store::{ApiError, Entry, ResourceDef, State, Write, WriteOpts};

/// Shared server state.
#[derive(Clone, Debug)]
pub struct Shared {
    /// The objects and their history.
    pub state: Arc<Mutex<State>>,
    /// How often watches get a bookmark.
    pub bookmark_every: Duration,
}

type Params = BTreeMap<String, String>;

fn json_response(code: u16, body: &Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

/// Every request lands here.
pub async fn handle(
    AxState(shared): AxState<Shared>,
    method: Method,
    uri: Uri,
    Query(q): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/');
    match path {
        "/version" => {
            return json_response(
                200,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-tally-kit", "platform": "linux/amd64"}),
            );
        }
        "/healthz" | "/readyz" | "/livez" => return (StatusCode::OK, "ok").into_response(),
        "/api" => {
            return json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            );
        }
        "/apis" => return json_response(200, &group_list(&shared.state.lock().unwrap())),
        "/openapi/v3" => return json_response(200, &openapi_root(&shared.state.lock().unwrap())),
        _ => {}
    }
    if let Some(gv) = path.strip_prefix("/openapi/v3/") {
        return match openapi_group_version(&shared.state.lock().unwrap(), gv) {
            Some(doc) => json_response(200, &doc),
            None => error(&ApiError::new(
                404,
                "NotFound",
                format!("no OpenAPI document for {gv}"),
            )),
        };
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return error(&ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            ));
        }
    };
    if rest.is_empty() {
        return json_response(
            200,
            &resource_list(&shared.state.lock().unwrap(), group, version),
        );
    }
    // namespaces/{ns}/{plural}/… vs a cluster-scoped path (namespaces/{name}/status is the latter).
    let (ns, rest) = match rest {
        ["namespaces", ns, plural, tail @ ..] if *plural != "status" && *plural != "finalize" => {
            (Some(*ns), {
                let mut v = vec![*plural];
                v.extend_from_slice(tail);
                v
            })
        }
        other => (None, other.to_vec()),
    };
    let Some(def) = shared
        .state
        .lock()
        .unwrap()
        .def(group, version, rest[0])
        .cloned()
    else {
        return error(&ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ));
    };
    if def.namespaced != ns.is_some()
        && !(def.namespaced && rest.len() == 1 && method == Method::GET)
    {
        return error(&ApiError::new(
            404,
            "NotFound",
            format!(
                "{} is {}namespaced",
                def.plural,
                if def.namespaced { "" } else { "not " }
            ),
        ));
    }
    let ns = ns.unwrap_or_default();
    let name = rest.get(1).copied();
    let sub = rest.get(2).copied();
    let binding = sub == Some("binding") && def.plural == "pods" && method == Method::POST;
    if let Some(s) = sub
        && (s != "status" || !def.status)
        && !binding
    {
        return error(&ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ));
    }
    let status_only = sub == Some("status");
    let opts = WriteOpts {
        manager: q.get("fieldManager").cloned().unwrap_or_else(|| {
            headers
                .get("user-agent")
                .and_then(|v| v.to_str().ok())
                .map(|ua| ua.split('/').next().unwrap_or(ua).to_string())
                .unwrap_or_default()
        }),
        force: q.get("force").map(String::as_str) == Some("true"),
        strict: q.get("fieldValidation").map(String::as_str) == Some("Strict"),
    };
    let protobuf = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/vnd.kubernetes.protobuf"));
    let parse_body = || -> Result<Value, ApiError> {
        if protobuf {
            return super::proto::decode(&body)
                .map_err(|e| ApiError::new(415, "UnsupportedMediaType", e));
        }
        serde_json::from_slice(&body)
            .or_else(|_| serde_yaml::from_slice::<Value>(&body))
            .map_err(|e| {
                ApiError::new(
                    400,
                    "BadRequest",
                    format!("the request body is not JSON or YAML: {e}"),
                )
            })
    };
    let record = |verb: &str| Write {
        verb: verb.to_string(),
        gvr: def.key(),
        object: format!("{ns}/{}", name.unwrap_or_default()),
        subresource: sub.unwrap_or_default().to_string(),
    };
    if binding {
        let n = name.unwrap_or_default();
        let result = parse_body().and_then(|b| {
            let mut s = shared.state.lock().unwrap();
            let r = bind(&mut s, &def, ns, n, &b, &opts);
            if r.is_ok() {
                s.writes.push(record("create"));
            }
            r
        });
        return match result {
            Ok(_) => json_response(
                201,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}),
            ),
            Err(e) => error(&e),
        };
    }
    let result = match (&method, name) {
        (&Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            return watch(shared, def, ns.to_string(), q).await;
        }
        (&Method::GET, None) => list(&shared, &def, ns, &q),
        (&Method::GET, Some(n)) => shared.state.lock().unwrap().get(&def, ns, n),
        (&Method::POST, None) => parse_body().and_then(|b| {
            let mut s = shared.state.lock().unwrap();
            let r = s.create(&def, ns, b, &opts);
            if r.is_ok() {
                s.writes.push(record("create"));
            }
            r
        }),
        (&Method::PUT, Some(n)) => parse_body().and_then(|b| {
            let mut s = shared.state.lock().unwrap();
            let r = s.update(&def, ns, n, b, status_only, &opts);
            if r.is_ok() {
                s.writes.push(record("update"));
            }
            r
        }),
        (&Method::PATCH, Some(n)) => {
            let ct = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let kind = match ct.split(';').next().unwrap_or_default().trim() {
                "application/merge-patch+json" => "merge",
                "application/json-patch+json" => "json",
                "application/strategic-merge-patch+json" => "strategic",
                "application/apply-patch+yaml" | "application/apply-patch+cbor" => "apply",
                other => {
                    return error(&ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                        ),
                    ));
                }
            };
            parse_body().and_then(|b| {
                let mut s = shared.state.lock().unwrap();
                let r = s.patch(&def, ns, n, kind, &b, status_only, &opts);
                if r.is_ok() {
                    s.writes.push(record(&format!("patch:{kind}")));
                }
                r
            })
        }
        (&Method::DELETE, Some(n)) => {
            let body_opts: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let policy = q
                .get("propagationPolicy")
                .cloned()
                .or_else(|| body_opts["propagationPolicy"].as_str().map(str::to_string))
                .unwrap_or_default();
            let mut s = shared.state.lock().unwrap();
            let r = s.delete(&def, ns, n, policy == "Orphan");
            if r.is_ok() {
                s.writes.push(record("delete"));
            }
            r
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        )),
    };
    let table = headers
        .get("accept")
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    match result {
        Ok(v) if table && method == Method::GET => {
            json_response(200, &super::table::render(&def, &v))
        }
        Ok(v) => json_response(if method == Method::POST { 201 } else { 200 }, &v),
        Err(e) => error(&e),
    }
}

fn selectors(q: &Params) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(
        q.get("labelSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )
    .map_err(|e| {
        ApiError::new(
            400,
            "BadRequest",
            format!("unable to parse labelSelector: {e}"),
        )
    })?;
    let fields = FieldSelector::parse(
        q.get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default(),
    )
    .map_err(|e| ApiError::new(400, "BadRequest", e))?;
    Ok((labels, fields))
}

fn list(shared: &Shared, def: &ResourceDef, ns: &str, q: &Params) -> Result<Value, ApiError> {
    let (labels, fields) = selectors(q)?;
    let s = shared.state.lock().unwrap();
    let ns = (!ns.is_empty()).then_some(ns);
    let mut items: Vec<Value> = s
        .list(def, ns)
        .into_iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .collect();
    // `continue` is the last (namespace/name) returned; items are ordered by it.
    let after = q.get("continue").filter(|c| !c.is_empty()).cloned();
    if let Some(after) = &after {
        items.retain(|o| {
            format!(
                "{}/{}",
                o["metadata"]["namespace"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            ) > *after
        });
    }
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let mut cont = Value::Null;
    if items.len() > limit {
        items.truncate(limit);
        let last = items.last().expect("limit > 0");
        cont = format!(
            "{}/{}",
            last["metadata"]["namespace"].as_str().unwrap_or_default(),
            last["metadata"]["name"].as_str().unwrap_or_default()
        )
        .into();
    }
    let mut meta = json!({"resourceVersion": s.rv().to_string()});
    if !cont.is_null() {
        meta["continue"] = cont;
        meta["remainingItemCount"] = 0.into();
    }
    Ok(
        json!({"apiVersion": def.api_version(), "kind": format!("{}List", def.kind), "metadata": meta, "items": items}),
    )
}

/// Translates a log entry for one watcher: `(type, object)` or nothing.
fn view(
    e: &Entry,
    gvr: &str,
    ns: &str,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Option<(&'static str, Value)> {
    if e.gvr != gvr {
        return None;
    }
    let in_ns = |o: &Value| ns.is_empty() || o["metadata"]["namespace"] == ns;
    let matches = |o: &Value| in_ns(o) && labels.matches(o) && fields.matches(o);
    let now = matches(&e.obj);
    match e.kind {
        "MODIFIED" => {
            let before = e.old.as_ref().is_some_and(matches);
            match (before, now) {
                (true, true) => Some(("MODIFIED", e.obj.clone())),
                (false, true) => Some(("ADDED", e.obj.clone())),
                (true, false) => Some(("DELETED", e.obj.clone())),
                (false, false) => None,
            }
        }
        kind => now.then(|| (kind, e.obj.clone())),
    }
}

fn line(kind: &str, obj: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": obj}).to_string();
    s.push('\n');
    Bytes::from(s)
}

async fn watch(shared: Shared, def: ResourceDef, ns: String, q: Params) -> Response {
    let (labels, fields) = match selectors(&q) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let initial = q.get("sendInitialEvents").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let bookmark_kind = def.kind.clone();
    let api_version = def.api_version();
    let (first, backlog, mut rx, mut seen) = {
        let s = shared.state.lock().unwrap();
        let mut first: Vec<Bytes> = Vec::new();
        let since = if rv_param.is_empty() || rv_param == "0" || initial {
            // Start with the current state as synthetic ADDED events.
            let nsf = (!ns.is_empty()).then_some(ns.as_str());
            for o in s
                .list(&def, nsf)
                .into_iter()
                .filter(|o| labels.matches(o) && fields.matches(o))
            {
                first.push(line("ADDED", &o));
            }
            if initial {
                let b = json!({"kind": bookmark_kind, "apiVersion": api_version, "metadata": {"resourceVersion": s.rv().to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}});
                first.push(line("BOOKMARK", &b));
            }
            s.rv()
        } else {
            match rv_param.parse::<u64>() {
                Ok(v) => v,
                Err(_) => {
                    return error(&ApiError::new(
                        400,
                        "BadRequest",
                        format!("invalid resourceVersion {rv_param:?}"),
                    ));
                }
            }
        };
        match s.subscribe(since) {
            Ok((backlog, rx)) => (first, backlog, rx, since.max(s.rv())),
            Err(e) => {
                // The real server answers an expired watch with 200 and one ERROR event.
                let body = line("ERROR", &e.status());
                return ([("content-type", "application/json")], body).into_response();
            }
        }
    };
    let (tx, out) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let every = shared.bookmark_every;
    tokio::spawn(async move {
        for b in first {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
        let mut last_sent = 0;
        for e in backlog {
            last_sent = e.rv;
            if let Some((k, o)) = view(&e, &def.key(), &ns, &labels, &fields)
                && tx.send(Ok(line(k, &o))).await.is_err()
            {
                return;
            }
        }
        seen = seen.max(last_sent);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tick.tick(), if bookmarks => {
                    let b = json!({"kind": bookmark_kind, "apiVersion": api_version, "metadata": {"resourceVersion": seen.to_string()}});
                    if tx.send(Ok(line("BOOKMARK", &b))).await.is_err() { return; }
                }
                r = rx.recv() => match r {
                    Ok(e) => {
                        if e.rv <= last_sent { continue; }
                        seen = seen.max(e.rv);
                        if let Some((k, o)) = view(&e, &def.key(), &ns, &labels, &fields)
                            && tx.send(Ok(line(k, &o))).await.is_err() { return; }
                    }
                    // Lagged or closed: end the stream; the client re-watches from its last resourceVersion.
                    Err(_) => return,
                },
                () = tx.closed() => return,
            }
        }
    });
    let stream = tokio_stream(out);
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("static response parts")
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn group_list(s: &State) -> Value {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in s.defs().filter(|d| !d.group.is_empty()) {
        let vs = groups.entry(d.group.clone()).or_default();
        if !vs.contains(&d.version) {
            vs.push(d.version.clone());
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0].clone()})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `api/v1`, `apis/{group}/{version}`: the path of a group version.
fn gv_path(d: &ResourceDef) -> String {
    if d.group.is_empty() {
        format!("api/{}", d.version)
    } else {
        format!("apis/{}/{}", d.group, d.version)
    }
}

/// `/openapi/v3`: one document per group version.
fn openapi_root(s: &State) -> Value {
    let paths: serde_json::Map<String, Value> = s
        .defs()
        .map(|d| {
            let p = gv_path(d);
            let url = json!({"serverRelativeURL": format!("/openapi/v3/{p}")});
            (p, url)
        })
        .collect();
    json!({"paths": paths})
}

/// `/openapi/v3/{group version}`: the resources' item paths with their PATCH operation,
/// which names its group-version-kind and accepts `fieldValidation` — what `kubectl`
/// reads to send `fieldValidation=Strict` instead of validating against schemas
/// itself. Schemas are not published (objects are validated on write).
fn openapi_group_version(s: &State, gv: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    for d in s.defs().filter(|d| gv_path(d) == gv) {
        let ns = if d.namespaced {
            "namespaces/{namespace}/"
        } else {
            ""
        };
        let patch = json!({"patch": {
            "x-kubernetes-group-version-kind": {"group": d.group, "version": d.version, "kind": d.kind},
            "x-kubernetes-action": "patch",
            "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            ],
            "responses": {"200": {"description": "OK"}},
        }});
        paths.insert(format!("/{gv}/{ns}{}/{{name}}", d.plural), patch);
    }
    (!paths.is_empty()).then(|| {
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes (tally test kit)", "version": "v1.33.0"},
               "paths": paths, "components": {"schemas": {}}})
    })
}

fn resource_list(s: &State, group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for d in s
        .defs()
        .filter(|d| d.group == group && d.version == version)
    {
        let verbs = [
            "create", "delete", "get", "list", "patch", "update", "watch",
        ];
        resources.push(json!({
            "name": d.plural, "singularName": d.kind.to_lowercase(), "namespaced": d.namespaced,
            "kind": d.kind, "verbs": verbs, "shortNames": d.short_names,
        }));
        if d.status {
            resources.push(json!({"name": format!("{}/status", d.plural), "singularName": "", "namespaced": d.namespaced, "kind": d.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// `pods/{name}/binding` (what a scheduler posts): sets `spec.nodeName` of a pod that
/// has none. A pod already on a node is a 409, as in the real server.
fn bind(
    s: &mut State,
    def: &ResourceDef,
    ns: &str,
    name: &str,
    binding: &Value,
    opts: &WriteOpts,
) -> Result<Value, ApiError> {
    let node = binding["target"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::new(400, "BadRequest", "the binding needs target.name"))?;
    let mut pod = s.get(def, ns, name)?;
    if let Some(on) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
        return Err(ApiError::new(
            409,
            "Conflict",
            format!("pod {name} is already assigned to node \"{on}\""),
        ));
    }
    pod["spec"]["nodeName"] = json!(node);
    s.update(def, ns, name, pod, false, opts)
}
