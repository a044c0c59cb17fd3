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
mod completeness;
mod dead_letters;
mod events;
mod meters;
pub mod openapi;
pub mod portal;
pub mod problem;

pub use meters::parse_query;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};

use tokio::sync::Semaphore;
use utoipa::OpenApi;

use self::auth::{Access, Auth};
use self::problem::{Problem, ProblemItem};
use crate::catalog::Catalog;
use crate::metrics::{HttpLabels, Metrics};
use tally_meter::store::Store;

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
    portal_cors: Option<tower_http::cors::CorsLayer>,
    /// The Kubernetes API, when the server runs in a cluster (completeness asks which
    /// nodes exist).
    kube: Option<KubeClient>,
}

/// The Kubernetes client of a server in a cluster.
#[derive(Clone)]
pub(crate) struct KubeClient(pub(crate) kube::Client);

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeClient")
    }
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
            portal_cors: None,
            kube: None,
        }
    }

    /// Answers completeness with the cluster's nodes: a deleted node's sources end.
    pub fn with_kube(mut self, client: kube::Client) -> AppState {
        self.kube = Some(KubeClient(client));
        self
    }

    /// Lets browsers of these origins call the portal route (CORS).
    pub fn with_portal_cors(mut self, cors: tower_http::cors::CorsLayer) -> AppState {
        self.portal_cors = Some(cors);
        self
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

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().map(|c| c.clone()).unwrap_or_default()
    }
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/events",
            post(events::ingest_events).get(events::list_events),
        )
        .route("/meters", get(meters::list_meters))
        .route("/meters/{slug}", get(meters::get_meter))
        .route("/meters/{slug}/subjects", get(meters::list_subjects))
        .route("/meters/{slug}/query", get(meters::query_meter))
        .route(
            "/meters/{slug}/completeness",
            get(completeness::meter_completeness),
        )
        .route("/watermarks", post(completeness::record_watermarks))
        .route("/dead-letters", get(dead_letters::list_dead_letters))
        .route(
            "/portal/tokens",
            post(portal::create_token).get(portal::list_tokens),
        )
        .route("/portal/tokens/invalidate", post(portal::invalidate_tokens))
        .route_layer(middleware::from_fn_with_state(
            state.auth.clone(),
            auth::authorize,
        ));
    Router::new()
        .nest("/api/v1", api.clone())
        .nest("/api/v1/namespaces/{namespace}", api)
        .route(
            "/api/v1/portal/meters/{slug}/query",
            match state.portal_cors.clone() {
                Some(cors) => get(portal::query_meter).layer(cors),
                None => get(portal::query_meter),
            },
        )
        .route("/api/v1/openapi.json", get(openapi::openapi))
        .route("/healthz", get(openapi::healthz))
        .route("/readyz", get(openapi::readyz))
        .route("/metrics", get(openapi::metrics))
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
pub(crate) fn namespace(
    params: &HashMap<String, String>,
    access: &Access,
) -> Result<String, Problem> {
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

/// Parses the only parameter of the listing routes: `limit` (1-1000, default 100).
pub(crate) fn parse_limit(query: Option<&str>) -> Result<usize, Problem> {
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

pub(crate) async fn run_blocking<T: Send + 'static>(
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

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tally",
        description = "Usage metering: CloudEvents in, exact usage per subject and window out. Every route also exists under /api/v1/namespaces/{namespace}/."
    ),
    paths(
        openapi::healthz,
        openapi::readyz,
        openapi::metrics,
        openapi::openapi,
        events::ingest_events,
        events::list_events,
        dead_letters::list_dead_letters,
        meters::list_meters,
        meters::get_meter,
        meters::list_subjects,
        meters::query_meter,
        completeness::meter_completeness,
        completeness::record_watermarks,
        portal::create_token,
        portal::list_tokens,
        portal::invalidate_tokens,
        portal::query_meter
    ),
    components(schemas(
        Problem,
        ProblemItem,
        events::IngestedEvent,
        events::CloudEventDoc,
        events::CloudEventsDoc,
        events::MeterError,
        meters::MeterView,
        meters::WindowSizeDoc,
        meters::QueryResponse,
        meters::QueryRowView,
        tally_meter::completeness::Completeness,
        tally_meter::completeness::Status,
        tally_meter::completeness::SourceReport,
        tally_meter::completeness::SourceStatus,
        tally_meter::completeness::Missing,
        tally_meter::completeness::UnknownSource,
        portal::PortalTokenRequest,
        portal::PortalTokenView,
        portal::InvalidateRequest
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
        components.add_security_scheme(
            "portal",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A portal token (POST /api/v1/portal/tokens): reads one subject's usage of its meters on the portal route only.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The handlers' annotations, before [`openapi::document`] completes them.
fn api_doc() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The OpenAPI 3 document of a server with bearer tokens ([`openapi::document`] gives
/// the one for either configuration, as `/api/v1/openapi.json` serves it).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    openapi::document(true)
}
