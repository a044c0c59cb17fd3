//! `POST /events` (ingest, all or nothing) and `GET /events` (recent events with
//! their per-meter validation errors).
use std::collections::HashMap;

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use chrono::Utc;
use serde::Serialize;
use serde_json::Value;
use tally_crds::UsageEvent;
use utoipa::ToSchema;

use super::auth::Access;
use super::problem::{Problem, ProblemItem};
use super::{AppState, namespace, parse_limit, run_blocking};

/// A CloudEvent 1.0 as `POST /events` takes it: the rules `UsageEvent::from_json`
/// applies, as far as JSON Schema says them (documentation only). The length limits and
/// the extension attributes' rules are added from `tally_crds::event`'s constants
/// (`openapi::event_limits`).
#[derive(Serialize, ToSchema)]
#[schema(as = CloudEvent)]
pub(crate) struct CloudEventDoc {
    /// Always `1.0`.
    #[schema(pattern = "^1\\.0$", example = "1.0")]
    specversion: String,
    /// Unique within `source`; a re-sent event with the same id counts once.
    #[schema(min_length = 1, example = "req-7f3a")]
    id: String,
    /// Who produced it, e.g. a service's URI.
    #[schema(min_length = 1, example = "//api.example.com")]
    source: String,
    /// The event type meters select on.
    #[serde(rename = "type")]
    #[schema(min_length = 1, example = "llm.tokens")]
    ty: String,
    /// The customer billed.
    #[schema(min_length = 1, example = "customer-42")]
    subject: String,
    /// RFC 3339; absent: the time the server received it.
    #[schema(value_type = Option<String>, format = DateTime)]
    time: Option<String>,
    /// `application/json` when present.
    #[schema(
        pattern = "^[Aa][Pp][Pp][Ll][Ii][Cc][Aa][Tt][Ii][Oo][Nn]/[Jj][Ss][Oo][Nn]\\s*(;.*)?$"
    )]
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    /// The usage payload, at most 64 KiB serialized.
    #[schema(value_type = Option<Object>)]
    data: Option<Value>,
}

/// The body of `POST /events` as `application/json`: one event or an array.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[schema(as = CloudEvents)]
#[allow(dead_code)] // a schema for the document; the handler reads the body as JSON
pub(crate) enum CloudEventsDoc {
    One(CloudEventDoc),
    Many(Vec<CloudEventDoc>),
}

/// Ingest CloudEvents.
#[utoipa::path(post, path = "/api/v1/events", tag = "events",
    request_body(content(
        (CloudEventDoc = "application/cloudevents+json"),
        (Vec<CloudEventDoc> = "application/cloudevents-batch+json"),
        (CloudEventsDoc = "application/json")),
        description = "One CloudEvent (application/cloudevents+json), an array (application/cloudevents-batch+json), or either as application/json"),
    responses((status = 204, description = "Every event is durably stored (duplicates are accepted and counted once)"),
              (status = 400, description = "Invalid events: nothing was stored; every problem is listed by index and field", body = Problem),
              (status = 413, description = "Body too large", body = Problem),
              (status = 415, description = "Unsupported content type", body = Problem),
              (status = 503, description = "At capacity; retry after Retry-After", body = Problem)))]
pub(crate) async fn ingest_events(
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
pub(crate) struct IngestedEvent {
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
pub(crate) struct MeterError {
    meter: String,
    message: String,
}

/// List recent events, newest first, with their per-meter validation errors.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1-1000, default 100")),
    responses((status = 200, body = [IngestedEvent]), (status = 400, body = Problem)))]
pub(crate) async fn list_events(
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
