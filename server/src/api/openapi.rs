//! The OpenAPI document as the server is configured: every route it serves (the
//! namespaced copies and the operational routes too), problems as
//! `application/problem+json`, and the bearer requirement only when tokens are on.
use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, Required, Response};

use super::AppState;

/// Where every `/api/v1/…` route is served again for one namespace.
const NAMESPACED: &str = "/api/v1/namespaces/{namespace}";
const PROBLEM: &str = "application/problem+json";

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up", content_type = "text/plain", body = String)))]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the server takes requests.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "The server takes requests", content_type = "text/plain", body = String)))]
pub(crate) async fn readyz() -> &'static str {
    "ok"
}

/// The server's metrics in the OpenMetrics text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus / OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    tally_runtime::admin::metrics_response(state.metrics.encode())
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this server, as configured", content_type = "application/json", body = Object)))]
pub(crate) async fn openapi(State(state): State<AppState>) -> Json<OpenApi> {
    Json(document(state.auth.enabled()))
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .flatten()
}

fn problem_response(description: &str) -> RefOr<Response> {
    let mut r = Response::new(description);
    r.content.insert(
        PROBLEM.into(),
        Content::new(Some(Ref::from_schema_name("Problem"))),
    );
    RefOr::T(r)
}

/// The API's routes (behind the token check, and served again per namespace); the
/// document itself and the operational routes are open.
fn behind_auth(path: &str) -> bool {
    path.starts_with("/api/v1/") && path != "/api/v1/openapi.json" && !portal_route(path)
}

/// The customer-facing route: its own token ([`super::portal`]), served once.
fn portal_route(path: &str) -> bool {
    path.starts_with("/api/v1/portal/meters/")
}

/// The document for a server with tokens (`auth`) or without.
pub fn document(auth: bool) -> OpenApi {
    let mut doc = super::api_doc();
    let api: Vec<(String, PathItem)> = doc
        .paths
        .paths
        .iter()
        .filter(|(p, _)| behind_auth(p))
        .map(|(p, i)| (p.clone(), i.clone()))
        .collect();
    for (path, mut item) in api {
        for op in operations(&mut item) {
            op.parameters.get_or_insert_with(Vec::new).insert(
                0,
                ParameterBuilder::new()
                    .name("namespace")
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .description(Some("The namespace (a token must be granted it)"))
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .pattern(Some("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))
                            .max_length(Some(63)),
                    ))
                    .build(),
            );
            if let Some(id) = &mut op.operation_id {
                id.push_str("_in_namespace");
            }
            op.responses
                .responses
                .entry("400".into())
                .or_insert_with(|| {
                    problem_response("The namespace is not a Kubernetes namespace name")
                });
        }
        let namespaced = format!("{NAMESPACED}{}", &path["/api/v1".len()..]);
        doc.paths.paths.insert(namespaced, item);
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        let guarded = behind_auth(path);
        for op in operations(item) {
            for (status, resp) in op.responses.responses.iter_mut() {
                let RefOr::T(r) = resp else { continue };
                if (status.starts_with('4') || status.starts_with('5'))
                    && let Some(c) = r.content.shift_remove("application/json")
                {
                    r.content.insert(PROBLEM.into(), c);
                }
            }
            if guarded && auth {
                let responses = &mut op.responses.responses;
                responses.insert(
                    "401".into(),
                    problem_response("No token, or a token the server does not know"),
                );
                responses.insert(
                    "403".into(),
                    problem_response("The token is not granted this namespace"),
                );
            }
            if !guarded && !portal_route(path) {
                // operational routes are open in every configuration
                op.security = Some(Vec::new());
            }
        }
    }
    event_limits(&mut doc);
    query_parameters(&mut doc);
    if !auth {
        // the portal route keeps its own scheme
        doc.security = None;
        if let Some(c) = doc.components.as_mut() {
            c.security_schemes.remove("bearer");
        }
    }
    doc
}

/// The CloudEvent schema's limits, from the constants `UsageEvent::from_json` checks:
/// the attributes' lengths, and for extension attributes (beside the known ones) names
/// of 1-20 lowercase letters or digits, scalar values, at most 32.
fn event_limits(doc: &mut OpenApi) {
    use tally_crds::event as limits;
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    let Some(RefOr::T(Schema::Object(event))) = components.schemas.get_mut("CloudEvent") else {
        return;
    };
    for (name, max) in [
        ("id", limits::MAX_ID_LEN),
        ("source", limits::MAX_SOURCE_LEN),
        ("type", limits::MAX_TYPE_LEN),
        ("subject", limits::MAX_SUBJECT_LEN),
        ("time", limits::MAX_TIME_LEN),
        ("dataschema", limits::MAX_DATASCHEMA_LEN),
    ] {
        if let Some(RefOr::T(Schema::Object(attribute))) = event.properties.get_mut(name) {
            attribute.max_length = Some(max);
        }
    }
    let known = event.properties.len();
    event.property_names = Some(Box::new(Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(format!(
                "^[a-z0-9]{{1,{}}}$",
                limits::MAX_EXTENSION_NAME_LEN
            )))
            .build(),
    )));
    let scalar = OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(limits::MAX_EXTENSION_VALUE_LEN)),
        )
        .item(ObjectBuilder::new().schema_type(Type::Number))
        .item(ObjectBuilder::new().schema_type(Type::Boolean))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .build();
    event.additional_properties = Some(Box::new(AdditionalProperties::RefOr(RefOr::T(
        Schema::OneOf(scalar),
    ))));
    event.max_properties = Some(known + limits::MAX_EXTENSIONS);
}

/// What the query parameters accept, beyond their types: `windowTimeZone` one of the
/// IANA names the server knows (chrono-tz's), `subject` and `groupBy` non-empty.
/// (`groupBy` and `filterGroupBy[…]` must also name a groupBy of the meter in the path,
/// which a schema cannot say: the 400 answer is documented for it.)
fn query_parameters(doc: &mut OpenApi) {
    let zones: Vec<serde_json::Value> = chrono_tz::TZ_VARIANTS
        .iter()
        .map(|z| serde_json::Value::from(z.name()))
        .collect();
    let non_empty = |max: Option<usize>| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(max)
            .build()
    };
    for item in doc.paths.paths.values_mut() {
        for op in operations(item) {
            for param in op.parameters.iter_mut().flatten() {
                let schema: Schema = match param.name.as_str() {
                    "windowTimeZone" => Schema::Object(
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .enum_values(Some(zones.clone()))
                            .build(),
                    ),
                    "subject" => Schema::Array(utoipa::openapi::schema::Array::new(non_empty(
                        Some(tally_crds::event::MAX_SUBJECT_LEN),
                    ))),
                    "groupBy" => {
                        Schema::Array(utoipa::openapi::schema::Array::new(non_empty(None)))
                    }
                    _ => continue,
                };
                param.schema = Some(RefOr::T(schema));
            }
        }
    }
}
