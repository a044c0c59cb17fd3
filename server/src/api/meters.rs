//! `GET /meters`, `/meters/{slug}`, `/meters/{slug}/subjects` and
//! `/meters/{slug}/query` (JSON or CSV).
use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Serialize;
use serde_json::Value;
use tally_crds::canonical_f64;
use tally_meter::engine::window::render;
use tally_meter::query::{QueryAnswer, QuerySpec};
use tally_meter::store::StoredMeter;
use utoipa::ToSchema;

use super::auth::Access;
use super::problem::Problem;
use super::{AppState, namespace, run_blocking};

pub(crate) fn meter_of(
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

/// A meter as the API shows it (OpenMeter's shape plus tally's fields).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MeterView {
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
pub(crate) async fn list_meters(
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
pub(crate) async fn get_meter(
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
pub(crate) async fn list_subjects(
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
pub(crate) struct QueryResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    window_size: Option<String>,
    data: Vec<QueryRowView>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct QueryRowView {
    #[schema(value_type = f64)]
    value: Value,
    window_start: String,
    window_end: String,
    subject: Option<String>,
    group_by: BTreeMap<String, Option<String>>,
}

/// A query's window size (documentation of the `windowSize` parameter).
#[derive(ToSchema)]
#[schema(as = WindowSize)]
#[allow(dead_code, clippy::upper_case_acronyms)] // the document's enum; the handler parses the string
pub(crate) enum WindowSizeDoc {
    MINUTE,
    HOUR,
    DAY,
    MONTH,
}

/// Query a meter: values per window, subject and group-by values.
#[utoipa::path(get, path = "/api/v1/meters/{slug}/query", tag = "meters",
    params(("slug" = String, Path),
        ("from" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "RFC 3339, inclusive; default: the meter's first event; after `to`: 400"),
        ("to" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "RFC 3339, exclusive; default: now"),
        ("windowSize" = Option<WindowSizeDoc>, Query, description = "absent: one row for the whole range"),
        ("windowTimeZone" = Option<String>, Query, description = "IANA zone windows align to; default UTC"),
        ("subject" = Option<Vec<String>>, Query, description = "repeatable"),
        ("groupBy" = Option<Vec<String>>, Query, description = "repeatable; a groupBy name of the meter or subject"),
        ("filterGroupBy[key]" = Option<String>, Query, description = "only rows whose group-by key has this value (repeat for several values)")),
    responses((status = 200, body = QueryResponse, description = "JSON, or CSV with Accept: text/csv"),
        (status = 400, body = Problem, description = "A parameter is wrong, naming it: also schema-valid values that depend on the meter or on each other (`from` not before `to`, a `groupBy` or `filterGroupBy[name]` the meter does not have), and answers above --max-query-rows"),
        (status = 404, body = Problem)))]
pub(crate) async fn query_meter(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    Extension(access): Extension<Access>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let (_, m) = meter_of(&state, &params, &access)?;
    let spec = parse_query(&m, query.as_deref().unwrap_or_default())?;
    answer(&state, m, spec, &headers).await
}

/// Runs a parsed query and renders it as JSON, or CSV when `headers` accept it.
pub(crate) async fn answer(
    state: &AppState,
    m: StoredMeter,
    spec: QuerySpec,
    headers: &HeaderMap,
) -> Result<Response, Problem> {
    let store = state.store.clone();
    let max_rows = state.limits.max_query_rows;
    let (meter, spec2) = (m.clone(), spec.clone());
    let answer = run_blocking(state, move || store.query(&meter, &spec2, max_rows)).await?;
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
