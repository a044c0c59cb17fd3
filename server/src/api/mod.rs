//! The HTTP API, compatible with OpenMeter's v1 events/meters/query routes.
//!
//! Routes exist twice: `/api/v1/...` acts on namespace `default`, and
//! `/api/v1/namespaces/{namespace}/...` on the named one.
//!
//! Bounds (overload is answered, never queued without limit):
//! - a request body above `max_body_bytes` → 413;
//! - ingest bodies in flight share a byte budget; when it is spent, and when the
//!   store's queue is full → 503 with `Retry-After`;
//! - queries run on a bounded number of blocking workers; beyond that → 503;
//! - a query answer above `max_query_rows` rows → 400 (refused, not truncated).
pub mod auth;
pub mod problem;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::body::{Body, to_bytes};
use axum::extract::{Extension, MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;

use serde::Serialize;
use serde_json::Value;
use tally_crds::{UsageEvent, canonical_f64};
use tokio::sync::Semaphore;
use utoipa::{OpenApi, ToSchema};

use self::auth::{Access, Auth};
use self::problem::{Problem, ProblemItem};
use crate::metrics::{HttpLabels, Metrics};
use tally_meter::engine::window::render;
use tally_meter::query::{QueryAnswer, QuerySpec};
use tally_meter::store::{Store, StoredMeter};

/// Limits of the API.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Bytes of ingest bodies that may be in flight at once.
    pub ingest_budget_bytes: usize,
    /// Queries that may run at once.
    pub max_concurrent_queries: usize,
    /// Most rows a query may return.
    pub max_query_rows: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            ingest_budget_bytes: 64 << 20,
            max_concurrent_queries: 16,
            max_query_rows: tally_meter::query::DEFAULT_MAX_ROWS,
        }
    }
}

/// The meters the API serves, by namespace and slug.
#[derive(Debug, Default)]
pub struct Catalog {
    meters: HashMap<String, BTreeMap<String, StoredMeter>>,
}

impl Catalog {
    /// A catalog of stored meters.
    pub fn new(meters: Vec<StoredMeter>) -> Catalog {
        let mut by_ns: HashMap<String, BTreeMap<String, StoredMeter>> = HashMap::new();
        for m in meters {
            by_ns
                .entry(m.meter.namespace.clone())
                .or_default()
                .insert(m.meter.slug.clone(), m);
        }
        Catalog { meters: by_ns }
    }

    fn get(&self, ns: &str, slug: &str) -> Option<&StoredMeter> {
        self.meters.get(ns)?.get(slug)
    }

    fn list(&self, ns: &str) -> Vec<&StoredMeter> {
        self.meters
            .get(ns)
            .map(|m| m.values().collect())
            .unwrap_or_default()
    }
}

/// Shared state of the handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    store: Arc<dyn Store>,
    catalog: Arc<RwLock<Arc<Catalog>>>,
    metrics: Arc<Metrics>,
    limits: Limits,
    ingest_budget: Arc<Semaphore>,
    queries: Arc<Semaphore>,
    auth: Auth,
}

impl AppState {
    /// State over a store.
    pub fn new(store: Arc<dyn Store>, limits: Limits, metrics: Arc<Metrics>) -> AppState {
        AppState {
            store,
            catalog: Arc::default(),
            metrics,
            ingest_budget: Arc::new(Semaphore::new(
                limits.ingest_budget_bytes.div_ceil(1024).max(1),
            )),
            queries: Arc::new(Semaphore::new(limits.max_concurrent_queries.max(1))),
            limits,
            auth: Auth::disabled(),
        }
    }

    /// Requires tokens on the `/api/v1` routes ([`auth`]).
    pub fn with_auth(mut self, auth: Auth) -> AppState {
        self.auth = auth;
        self
    }

    /// Publishes the meters to serve.
    pub fn publish(&self, catalog: Catalog) {
        if let Ok(mut c) = self.catalog.write() {
            *c = Arc::new(catalog);
        }
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().map(|c| c.clone()).unwrap_or_default()
    }
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/events", post(ingest_events).get(list_events))
        .route("/meters", get(list_meters))
        .route("/meters/{slug}", get(get_meter))
        .route("/meters/{slug}/subjects", get(list_subjects))
        .route("/meters/{slug}/query", get(query_meter))
        .route("/dead-letters", get(list_dead_letters))
        .route_layer(middleware::from_fn_with_state(
            state.auth.clone(),
            auth::authorize,
        ));
    Router::new()
        .nest("/api/v1", api.clone())
        .nest("/api/v1/namespaces/{namespace}", api)
        .route("/api/v1/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "no such route; GET /api/v1/openapi.json lists the API",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let method = req.method().to_string();
    let res = next.run(req).await;
    let labels = HttpLabels {
        route,
        method,
        status: res.status().as_u16(),
    };
    state
        .metrics
        .http_request_duration
        .get_or_create(&labels)
        .observe(start.elapsed().as_secs_f64());
    res
}

/// The request's namespace: the path's, else the token's first ([`auth`]); 403 when
/// the token is not granted it.
fn namespace(params: &HashMap<String, String>, access: &Access) -> Result<String, Problem> {
    let ns = params
        .get("namespace")
        .map_or(access.default_namespace(), String::as_str);
    let ok = tally_crds::envelope::is_namespace(ns);
    if !ok {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-namespace",
            "Invalid namespace",
            format!(
                "namespace {ns:?} must be a Kubernetes namespace name (lowercase letters, digits and '-', at most 63)"
            ),
        ));
    }
    access.check(ns)?;
    Ok(ns.to_string())
}

fn meter_of(
    state: &AppState,
    params: &HashMap<String, String>,
    access: &Access,
) -> Result<(String, StoredMeter), Problem> {
    let ns = namespace(params, access)?;
    let slug = params.get("slug").cloned().unwrap_or_default();
    let catalog = state.catalog();
    let meter = catalog
        .get(&ns, &slug)
        .cloned()
        .ok_or_else(|| Problem::meter_not_found(&ns, &slug))?;
    Ok((ns, meter))
}

/// Ingest CloudEvents.
#[utoipa::path(post, path = "/api/v1/events", tag = "events",
    request_body(content = Object, description = "One CloudEvent (application/cloudevents+json or application/json) or an array (application/cloudevents-batch+json or application/json)"),
    responses((status = 204, description = "Every event is durably stored (duplicates are accepted and counted once)"),
              (status = 400, description = "Invalid events: nothing was stored; every problem is listed by index and field", body = Problem),
              (status = 413, description = "Body too large", body = Problem),
              (status = 415, description = "Unsupported content type", body = Problem),
              (status = 503, description = "At capacity; retry after Retry-After", body = Problem)))]
async fn ingest_events(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Extension(access): Extension<Access>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, Problem> {
    let ns = namespace(&params, &access)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let shape = match media.as_str() {
        "application/cloudevents+json" => Shape::One,
        "application/cloudevents-batch+json" => Shape::Batch,
        "application/json" => Shape::Either,
        _ => {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported content type",
                format!(
                    "Content-Type {content_type:?} is not supported; send application/cloudevents+json (one event), application/cloudevents-batch+json (an array) or application/json (either)"
                ),
            ));
        }
    };
    let limit = state.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    // reserve the body's share of the in-flight budget before reading it
    let kib = (declared.unwrap_or(limit).div_ceil(1024)).max(1) as u32;
    let Ok(_permit) = state.ingest_budget.clone().try_acquire_many_owned(kib) else {
        state.metrics.requests_overloaded.inc();
        return Err(Problem::overloaded(
            "too many ingest requests are in flight; retry after the Retry-After delay",
            1,
        ));
    };
    let bytes = to_bytes(body, limit).await.map_err(|_| too_large(limit))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-json",
            "Invalid JSON",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let items: Vec<&Value> = match (shape, &value) {
        (Shape::One | Shape::Either, Value::Object(_)) => vec![&value],
        (Shape::Batch | Shape::Either, Value::Array(list)) => list.iter().collect(),
        (Shape::One, _) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-events",
                "Invalid events",
                "application/cloudevents+json takes one event (a JSON object); send arrays as application/cloudevents-batch+json",
            ));
        }
        (Shape::Batch, _) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-events",
                "Invalid events",
                "application/cloudevents-batch+json takes a JSON array of events",
            ));
        }
        (Shape::Either, _) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-events",
                "Invalid events",
                "the body must be an event (object) or an array of events",
            ));
        }
    };
    let now = Utc::now().timestamp_millis();
    let mut events = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    let mut bad = 0usize;
    for (i, item) in items.iter().enumerate() {
        match UsageEvent::from_json(item, now) {
            Ok(e) => events.push(e),
            Err(errs) => {
                bad += 1;
                errors.extend(errs.into_iter().map(|e| ProblemItem {
                    index: Some(i),
                    field: Some(e.field),
                    parameter: None,
                    message: e.message,
                }));
            }
        }
    }
    if !errors.is_empty() {
        state.metrics.events_rejected.inc_by(bad as u64);
        return Err(Problem::new(StatusCode::BAD_REQUEST, "invalid-events", "Invalid events",
            format!("{bad} of {} events are invalid; nothing was stored. Fix the listed fields and resend the request", items.len())).with_errors(errors));
    }
    if events.is_empty() {
        return Ok(StatusCode::NO_CONTENT);
    }
    let pending = state.store.submit(&ns, events).inspect_err(|e| {
        if matches!(e, tally_meter::Error::Overloaded) {
            state.metrics.requests_overloaded.inc();
        }
    })?;
    let outcome = pending
        .await
        .map_err(|_| Problem::internal("the store stopped before confirming the write"))??;
    state.metrics.events_accepted.inc_by(outcome.stored as u64);
    state
        .metrics
        .events_deduplicated
        .inc_by(outcome.deduplicated as u64);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Clone, Copy)]
enum Shape {
    One,
    Batch,
    Either,
}

fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        "Body too large",
        format!("the request body exceeds {limit} bytes; split the batch into smaller requests"),
    )
}

/// A stored event with the meters it did not count for.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct IngestedEvent {
    /// The CloudEvent.
    #[schema(value_type = Object)]
    event: Value,
    /// When it was stored.
    ingested_at: String,
    /// All validation errors joined (OpenMeter's field).
    #[serde(skip_serializing_if = "Option::is_none")]
    validation_error: Option<String>,
    /// Per meter: why the event did not count for it.
    validation_errors: Vec<MeterError>,
}

#[derive(Serialize, ToSchema)]
struct MeterError {
    meter: String,
    message: String,
}

/// List recent events, newest first, with their per-meter validation errors.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(("limit" = Option<usize>, Query, description = "1-1000, default 100")),
    responses((status = 200, body = [IngestedEvent]), (status = 400, body = Problem)))]
async fn list_events(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Extension(access): Extension<Access>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<IngestedEvent>>, Problem> {
    let ns = namespace(&params, &access)?;
    let limit = parse_limit(query.as_deref())?;
    let store = state.store.clone();
    let events = run_blocking(&state, move || store.recent_events(&ns, limit)).await?;
    Ok(Json(
        events
            .into_iter()
            .map(|e| IngestedEvent {
                event: serde_json::to_value(e.event.to_cloud_event()).unwrap_or_default(),
                ingested_at: tally_crds::event::format_ms(e.ingested_ms),
                validation_error: (!e.validation_errors.is_empty()).then(|| {
                    e.validation_errors
                        .iter()
                        .map(|(m, msg)| format!("{m}: {msg}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                }),
                validation_errors: e
                    .validation_errors
                    .into_iter()
                    .map(|(meter, message)| MeterError { meter, message })
                    .collect(),
            })
            .collect(),
    ))
}

/// Parses the only parameter of the listing routes: `limit` (1-1000, default 100).
fn parse_limit(query: Option<&str>) -> Result<usize, Problem> {
    let mut limit = 100usize;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        Problem::bad_parameter(
                            "limit",
                            format!("must be an integer from 1 to 1000, got {v:?}"),
                        )
                    })?
            }
            other => {
                return Err(Problem::bad_parameter(
                    other,
                    "unknown parameter; this route takes limit",
                ));
            }
        }
    }
    Ok(limit)
}

/// List messages the sink could not store, newest first, with the reason. Without a
/// namespace in the path, lists those of every namespace (and those whose namespace
/// could not be read).
#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "events",
    params(("limit" = Option<usize>, Query, description = "1-1000, default 100")),
    responses((status = 200, body = [tally_meter::store::DeadLetter]), (status = 400, body = Problem)))]
async fn list_dead_letters(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Extension(access): Extension<Access>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<tally_meter::store::DeadLetter>>, Problem> {
    // Every namespace's dead letters only to those who may read every namespace.
    let ns = match params.get("namespace") {
        None if access.unrestricted() => None,
        _ => Some(namespace(&params, &access)?),
    };
    let limit = parse_limit(query.as_deref())?;
    let store = state.store.clone();
    Ok(Json(
        run_blocking(&state, move || store.dead_letters(ns.as_deref(), limit)).await?,
    ))
}

async fn run_blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce() -> tally_meter::Result<T> + Send + 'static,
) -> Result<T, Problem> {
    let Ok(_permit) = state.queries.clone().try_acquire_owned() else {
        state.metrics.requests_overloaded.inc();
        return Err(Problem::overloaded(
            "too many queries are running; retry after the Retry-After delay",
            1,
        ));
    };
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Problem::internal(format!("query task failed: {e}")))?
        .map_err(Problem::from)
}

/// A meter as the API shows it (OpenMeter's shape plus tally's fields).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct MeterView {
    /// `metadata.name`.
    id: String,
    slug: String,
    namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    aggregation: String,
    event_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_property: Option<String>,
    group_by: BTreeMap<String, String>,
    #[schema(value_type = Vec<Object>)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    filter: Vec<tally_crds::FilterCondition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_from: Option<String>,
    /// Granularity of the stored rollup.
    window_size: &'static str,
}

fn view(m: &StoredMeter) -> MeterView {
    let s = &m.meter.spec;
    MeterView {
        id: m.meter.name.clone(),
        slug: m.meter.slug.clone(),
        namespace: m.meter.namespace.clone(),
        description: s.description.clone(),
        aggregation: s.aggregation.as_str().to_string(),
        event_type: s.event_type.clone(),
        value_property: s.value_property.clone(),
        group_by: s.group_by.clone(),
        filter: s.filter.clone(),
        event_from: s
            .event_from
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        window_size: "MINUTE",
    }
}

/// List the meters of the namespace.
#[utoipa::path(get, path = "/api/v1/meters", tag = "meters", responses((status = 200, body = [MeterView])))]
async fn list_meters(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Extension(access): Extension<Access>,
) -> Result<Json<Vec<MeterView>>, Problem> {
    let ns = namespace(&params, &access)?;
    Ok(Json(
        state.catalog().list(&ns).into_iter().map(view).collect(),
    ))
}

/// Get one meter.
#[utoipa::path(get, path = "/api/v1/meters/{slug}", tag = "meters", params(("slug" = String, Path)),
    responses((status = 200, body = MeterView), (status = 404, body = Problem)))]
async fn get_meter(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Extension(access): Extension<Access>,
) -> Result<Json<MeterView>, Problem> {
    let (_, m) = meter_of(&state, &params, &access)?;
    Ok(Json(view(&m)))
}

/// Subjects with usage on the meter.
#[utoipa::path(get, path = "/api/v1/meters/{slug}/subjects", tag = "meters", params(("slug" = String, Path)),
    responses((status = 200, body = [String]), (status = 404, body = Problem)))]
async fn list_subjects(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Extension(access): Extension<Access>,
) -> Result<Json<Vec<String>>, Problem> {
    let (_, m) = meter_of(&state, &params, &access)?;
    let store = state.store.clone();
    Ok(Json(
        run_blocking(&state, move || store.subjects(&m)).await?,
    ))
}

/// A query answer.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct QueryResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_size: Option<String>,
    data: Vec<QueryRowView>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct QueryRowView {
    #[schema(value_type = f64)]
    value: Value,
    window_start: String,
    window_end: String,
    subject: Option<String>,
    group_by: BTreeMap<String, Option<String>>,
}

/// Query a meter: values per window, subject and group-by values.
#[utoipa::path(get, path = "/api/v1/meters/{slug}/query", tag = "meters",
    params(("slug" = String, Path),
        ("from" = Option<String>, Query, description = "RFC 3339, inclusive; default: the meter's first event"),
        ("to" = Option<String>, Query, description = "RFC 3339, exclusive; default: now"),
        ("windowSize" = Option<String>, Query, description = "MINUTE, HOUR, DAY or MONTH; absent: one row for the whole range"),
        ("windowTimeZone" = Option<String>, Query, description = "IANA zone windows align to; default UTC"),
        ("subject" = Option<Vec<String>>, Query, description = "repeatable"),
        ("groupBy" = Option<Vec<String>>, Query, description = "repeatable; a groupBy name of the meter or subject"),
        ("filterGroupBy[key]" = Option<String>, Query, description = "only rows whose group-by key has this value (repeat for several values)")),
    responses((status = 200, body = QueryResponse, description = "JSON, or CSV with Accept: text/csv"), (status = 400, body = Problem), (status = 404, body = Problem)))]
async fn query_meter(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Extension(access): Extension<Access>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let (_, m) = meter_of(&state, &params, &access)?;
    let spec = parse_query(&m, query.as_deref().unwrap_or_default())?;
    let store = state.store.clone();
    let max_rows = state.limits.max_query_rows;
    let (meter, spec2) = (m.clone(), spec.clone());
    let answer = run_blocking(&state, move || store.query(&meter, &spec2, max_rows)).await?;
    let csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/csv"));
    if csv {
        return Ok(render_csv(&spec, &answer));
    }
    let tz = spec.tz;
    Ok(Json(QueryResponse {
        from: answer.from_ms.map(|f| render(f, tz)),
        to: render(answer.to_ms, tz),
        window_size: spec.window_size.map(|w| w.as_str().to_string()),
        data: answer
            .rows
            .into_iter()
            .map(|r| QueryRowView {
                value: number(r.value),
                window_start: render(r.window_start_ms, tz),
                window_end: render(r.window_end_ms, tz),
                subject: r.subject,
                group_by: r.group_by,
            })
            .collect(),
    })
    .into_response())
}

/// Integers as JSON integers (`3`, not `3.0`), other values as floats.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

fn render_csv(spec: &QuerySpec, answer: &QueryAnswer) -> Response {
    let groups: Vec<&String> = spec.group_by.iter().filter(|g| *g != "subject").collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header = vec![
        "window_start".to_string(),
        "window_end".to_string(),
        "subject".to_string(),
    ];
    header.extend(groups.iter().map(|g| g.to_string()));
    header.push("value".into());
    let _ = w.write_record(&header);
    for r in &answer.rows {
        let mut rec = vec![
            render(r.window_start_ms, spec.tz),
            render(r.window_end_ms, spec.tz),
            r.subject.clone().unwrap_or_default(),
        ];
        rec.extend(
            groups
                .iter()
                .map(|g| r.group_by.get(*g).cloned().flatten().unwrap_or_default()),
        );
        rec.push(canonical_f64(r.value));
        let _ = w.write_record(&rec);
    }
    let body = w.into_inner().unwrap_or_default();
    let mut res = (StatusCode::OK, body).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    res
}

/// Parses query parameters against a meter; each error names its parameter.
pub fn parse_query(m: &StoredMeter, query: &str) -> Result<QuerySpec, Problem> {
    QuerySpec::parse(&m.meter, query, Utc::now().timestamp_millis())
        .map_err(|e| Problem::bad_parameter(&e.parameter, e.detail))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tally",
        description = "Usage metering: CloudEvents in, exact usage per subject and window out. Every route also exists under /api/v1/namespaces/{namespace}/."
    ),
    paths(
        ingest_events,
        list_events,
        list_dead_letters,
        list_meters,
        get_meter,
        list_subjects,
        query_meter
    ),
    components(schemas(
        Problem,
        ProblemItem,
        IngestedEvent,
        MeterError,
        MeterView,
        QueryResponse,
        QueryRowView
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

/// The bearer-token scheme of [`auth`]: without a valid token every route answers 401,
/// outside the token's namespaces 403 (both `application/problem+json`).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token granted namespaces (the server's --tokens-file); the plain routes act on its first namespace. Missing or unknown: 401; a namespace it is not granted: 403.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI 3 document, generated from the handlers' annotations.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi_document())
}
