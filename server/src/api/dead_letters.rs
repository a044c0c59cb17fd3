//! `GET /dead-letters`: messages the sink could not store, with the reason.
use std::collections::HashMap;

use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};

use super::auth::Access;
use super::problem::Problem;
use super::{AppState, namespace, parse_limit, run_blocking};

/// List messages the sink could not store, newest first, with the reason. Without a
/// namespace in the path, lists those of every namespace (and those whose namespace
/// could not be read).
#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "events",
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1-1000, default 100")),
    responses((status = 200, body = [tally_meter::store::DeadLetter]), (status = 400, body = Problem)))]
pub(crate) async fn list_dead_letters(
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
