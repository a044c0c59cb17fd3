//! `POST /watermarks` (how far a source has delivered; the agent sends them) and
//! `GET /meters/{slug}/completeness` (whether a range's answer is complete, and which
//! node or collector is behind: [`tally_meter::completeness`]).
use std::collections::{BTreeSet, HashMap};

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use chrono::Utc;
use k8s_openapi::api::core::v1::Node;
use tally_crds::Collector;
use tally_crds::Watermark;
use tally_meter::completeness::{Completeness, Existing, assess};

use super::auth::Access;
use super::problem::{Problem, ProblemItem};
use super::{AppState, meters::meter_of, namespace, run_blocking};

/// Record watermarks of the namespace's sources.
#[utoipa::path(post, path = "/api/v1/watermarks", tag = "completeness",
    request_body(content = Vec<Object>, content_type = "application/json",
        description = "Watermarks as the agent sends them: collector, node, source, types, until (Unix ms), gaps"),
    responses((status = 204, description = "Recorded (after every event the sender had delivered before)"),
              (status = 400, description = "Invalid watermarks: nothing was recorded; every problem is listed by index and field", body = Problem),
              (status = 503, description = "The store cannot take them now; retry", body = Problem)))]
pub(crate) async fn record_watermarks(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Extension(access): Extension<Access>,
    body: Body,
) -> Result<StatusCode, Problem> {
    let ns = namespace(&params, &access)?;
    let limit = state.limits.max_body_bytes;
    let bytes = to_bytes(body, limit).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Body too large",
            format!("the request body exceeds {limit} bytes; send fewer watermarks at once"),
        )
    })?;
    let invalid = |detail: String| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-watermarks",
            "Invalid watermarks",
            detail,
        )
    };
    let values: Vec<serde_json::Value> = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("the body must be a JSON array of watermarks: {e}")))?;
    let mut marks = Vec::with_capacity(values.len());
    let mut errors = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        match serde_json::from_value::<Watermark>(v) {
            Ok(m) => match m.validate() {
                Ok(()) => marks.push(m),
                Err(errs) => errors.extend(errs.into_iter().map(|e| ProblemItem {
                    index: Some(i),
                    field: Some(e.field),
                    parameter: None,
                    message: e.message,
                })),
            },
            Err(e) => errors.push(ProblemItem {
                index: Some(i),
                field: None,
                parameter: None,
                message: format!("not a watermark: {e}"),
            }),
        }
    }
    if !errors.is_empty() {
        return Err(
            invalid("nothing was recorded; fix the listed watermarks and resend".into())
                .with_errors(errors),
        );
    }
    if marks.is_empty() {
        return Ok(StatusCode::NO_CONTENT);
    }
    let pending = state.store.record_watermarks(&ns, marks)?;
    pending
        .await
        .map_err(|_| Problem::internal("the store stopped before confirming the write"))??;
    Ok(StatusCode::NO_CONTENT)
}

/// The range of a completeness question.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub(crate) struct RangeParams {
    /// Start (RFC 3339); absent: from the first event.
    from: Option<String>,
    /// End, exclusive (RFC 3339); absent: now.
    to: Option<String>,
}

fn time_param(name: &str, value: Option<&str>) -> Result<Option<i64>, Problem> {
    value
        .map(|v| {
            tally_crds::event::parse_time_ms(v).map_err(|e| {
                Problem::bad_parameter(name, format!("must be an RFC 3339 time ({e})"))
            })
        })
        .transpose()
}

/// Whether the meter's answer for `[from, to)` is complete: every source feeding it
/// (a Collector on a node) has delivered past `to` with no gap, and which one is
/// behind, down or blind, over which interval.
#[utoipa::path(get, path = "/api/v1/meters/{slug}/completeness", tag = "completeness",
    params(("slug" = String, Path), RangeParams),
    responses((status = 200, body = Completeness),
              (status = 400, description = "A bad parameter, named", body = Problem),
              (status = 404, body = Problem)))]
pub(crate) async fn meter_completeness(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Query(range): Query<RangeParams>,
    Extension(access): Extension<Access>,
) -> Result<Json<Completeness>, Problem> {
    let (ns, m) = meter_of(&state, &params, &access)?;
    let from = time_param("from", range.from.as_deref())?;
    let to =
        time_param("to", range.to.as_deref())?.unwrap_or_else(|| Utc::now().timestamp_millis());
    if from.is_some_and(|f| f >= to) {
        return Err(Problem::bad_parameter("from", "must be before to"));
    }
    let existing = match &state.kube {
        Some(client) => Existing {
            nodes: names(kube::Api::<Node>::all(client.0.clone()), "nodes").await,
            collectors: names(
                kube::Api::<Collector>::namespaced(client.0.clone(), &ns),
                "collectors",
            )
            .await,
        },
        None => Existing::default(),
    };
    let store = state.store.clone();
    let event_type = m.meter.spec.event_type.clone();
    let facts = run_blocking(&state, move || {
        store.completeness_facts(&ns, &event_type, from, to)
    })
    .await?;
    Ok(Json(assess(
        &m.meter.spec.event_type,
        from,
        to,
        &facts,
        &existing,
    )))
}

/// The names of what exists now (nodes, the namespace's Collectors); `None` when they
/// cannot be listed (then none of their sources is taken for ended).
async fn names<K>(api: kube::Api<K>, what: &str) -> Option<BTreeSet<String>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.list_metadata(&Default::default()).await {
        Ok(list) => Some(
            list.items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot list {what} (the server needs list on {what}); the sources of deleted {what} are reported as behind");
            None
        }
    }
}
