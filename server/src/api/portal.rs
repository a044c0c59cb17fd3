//! Customer-facing (portal) tokens: a token that reads one subject's usage of chosen
//! meters, and nothing else, to hand to a customer's browser or dashboard.
//!
//! - Issued by `POST /api/v1/portal/tokens` (OpenMeter's shape: `subject`,
//!   `allowedMeterSlugs`, `expiresAt`) with any API token granted the namespace (or by
//!   anyone when the API runs without tokens, on loopback). Listed by `GET
//!   /api/v1/portal/tokens`, invalidated by `POST /api/v1/portal/tokens/invalidate`
//!   (`{"id"}` or `{"subject"}`). The namespaced copies act on the path's namespace.
//! - A token is a JWT (HS256) signed with the first key of `--portal-keys-file`
//!   (`keys: [{id, secret}]`); every key of the file verifies tokens whose header names
//!   its `id`, so rotation is: put a new key first, keep the old one until its tokens
//!   have expired, then remove it (the file is read at start: restart the servers).
//! - The token reads only `GET /api/v1/portal/meters/{slug}/query`: its namespace, its
//!   subject (a `subject` parameter naming another → 403; absent → its own), its meters
//!   (another → 403). On any other route it is refused with 403. Missing, malformed,
//!   badly signed, expired or invalidated → 401.
//! - Each use reads the token's record in the store, so an invalidation (kept there,
//!   across restarts) holds on every server of the same store at once; a token
//!   without a record (e.g. its store was wiped) is refused.
//! - `--portal-cors-origins` lets browsers of those origins call the portal route.
use std::collections::HashMap;
use std::path::Path;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tally_meter::store::PortalTokenRecord;
use utoipa::ToSchema;

use super::auth::Access;
use super::problem::Problem;
use super::{AppState, namespace, parse_limit, run_blocking};

/// Shortest secret accepted (bytes): HS256 wants at least its 256-bit output.
const MIN_SECRET: usize = 32;
/// Lifetime of a token issued without `expiresAt`.
const DEFAULT_TTL_HOURS: i64 = 24;
/// Longest lifetime a token may be issued for.
const MAX_TTL_DAYS: i64 = 366;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: String,
    secret: String,
}

/// The keys of `--portal-keys-file`: the first signs, every one verifies.
pub struct PortalKeys {
    signing: (String, EncodingKey),
    verifying: HashMap<String, DecodingKey>,
}

impl std::fmt::Debug for PortalKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.verifying.keys().collect();
        ids.sort();
        f.debug_struct("PortalKeys")
            .field("signing", &self.signing.0)
            .field("verifying", &ids)
            .finish()
    }
}

/// The claims of a portal token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Claims {
    /// Token id: its record in the store.
    jti: String,
    /// The subject it reads.
    sub: String,
    /// The namespace it reads.
    ns: String,
    /// The meters it may query; empty: all of the namespace.
    #[serde(default)]
    meters: Vec<String>,
    /// Issued at (Unix seconds).
    iat: i64,
    /// Expires at (Unix seconds).
    exp: i64,
}

impl PortalKeys {
    /// Parses a keys file; errors name the entry and field.
    pub fn parse(text: &str) -> Result<PortalKeys, String> {
        let file: KeyFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut verifying = HashMap::new();
        let mut signing = None;
        for (i, k) in file.keys.iter().enumerate() {
            let id = k.id.trim();
            if id.is_empty() || id.len() > 64 {
                return Err(format!("keys[{i}].id: give an id of 1-64 characters"));
            }
            let secret = k.secret.trim();
            if secret.len() < MIN_SECRET {
                return Err(format!(
                    "keys[{i}].secret: must have at least {MIN_SECRET} characters (e.g. `openssl rand -hex 32`)"
                ));
            }
            if verifying
                .insert(id.to_string(), DecodingKey::from_secret(secret.as_bytes()))
                .is_some()
            {
                return Err(format!("keys[{i}].id: {id:?} is listed twice"));
            }
            signing.get_or_insert_with(|| {
                (id.to_string(), EncodingKey::from_secret(secret.as_bytes()))
            });
        }
        let signing = signing.ok_or("keys: list at least one key (the first signs)")?;
        Ok(PortalKeys { signing, verifying })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<PortalKeys, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the portal keys file {}: {e}", path.display()))?;
        PortalKeys::parse(&text).map_err(|e| format!("portal keys file {}: {e}", path.display()))
    }

    fn sign(&self, claims: &Claims) -> Result<String, Problem> {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.signing.0.clone());
        jsonwebtoken::encode(&header, claims, &self.signing.1)
            .map_err(|e| Problem::internal(format!("cannot sign the portal token: {e}")))
    }

    /// The claims of a token these keys signed, checked for expiry; else why not.
    fn verify(&self, token: &str) -> Result<Claims, String> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "not a portal token (a JWT)".to_string())?;
        let kid = header
            .kid
            .ok_or("the portal token names no key (kid)".to_string())?;
        let key = self.verifying.get(&kid).ok_or_else(|| {
            format!("the portal token's key {kid:?} is not among the server's portal keys (rotated away?)")
        })?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    "the portal token has expired; ask for a new one".to_string()
                }
                _ => format!("the portal token is not valid: {e}"),
            })
    }

    /// Whether `token` is a portal token these keys signed (expired or not): how the
    /// API's token check tells a portal token on another route (403) from garbage (401).
    pub fn recognizes(&self, token: &str) -> bool {
        match self.verify(token) {
            Ok(_) => true,
            Err(e) => e.contains("expired"),
        }
    }
}

fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A request to issue a portal token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PortalTokenRequest {
    /// The subject whose usage the token reads (as events name it).
    #[schema(min_length = 1, max_length = 256)]
    subject: String,
    /// Meters it may query (slugs); absent or empty: every meter of the namespace.
    #[serde(default)]
    allowed_meter_slugs: Option<Vec<String>>,
    /// When it expires (RFC 3339, in the future, at most 366 days ahead); default: in
    /// 24 hours.
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

/// A portal token (the `token` itself only in the answer that issued it).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PortalTokenView {
    id: String,
    subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_meter_slugs: Option<Vec<String>>,
    expires_at: String,
    /// Past `expiresAt`.
    expired: bool,
    created_at: String,
    /// When it was invalidated (absent while valid).
    #[serde(skip_serializing_if = "Option::is_none")]
    invalidated_at: Option<String>,
    /// The token to send as `Authorization: Bearer <token>` (issuing answer only).
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

fn view(r: &PortalTokenRecord, token: Option<String>) -> PortalTokenView {
    PortalTokenView {
        id: r.id.clone(),
        subject: r.subject.clone(),
        allowed_meter_slugs: (!r.allowed_meter_slugs.is_empty())
            .then(|| r.allowed_meter_slugs.clone()),
        expires_at: rfc3339(r.expires_ms),
        expired: r.expires_ms <= Utc::now().timestamp_millis(),
        created_at: rfc3339(r.created_ms),
        invalidated_at: r.invalidated_ms.map(rfc3339),
        token,
    }
}

fn bad_body(field: &str, message: impl Into<String>) -> Problem {
    let message = message.into();
    let mut p = Problem::new(
        StatusCode::BAD_REQUEST,
        "invalid-body",
        "Invalid request body",
        format!("{field}: {message}"),
    );
    p.errors.push(super::problem::ProblemItem {
        index: None,
        field: Some(field.to_string()),
        parameter: None,
        message,
    });
    p
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    serde_json::from_slice(body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-body",
            "Invalid request body",
            format!("the body must be a JSON object: {e}"),
        )
    })
}

fn keys(state: &AppState) -> Result<&PortalKeys, Problem> {
    state.auth.portal().ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "portal-off",
            "Portal tokens are off",
            "this server has no portal keys: start tally-server with --portal-keys-file FILE (keys: [{id, secret}])",
        )
    })
}

fn random_id() -> Result<String, Problem> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Problem::internal("no randomness for a token id"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Issue a portal token for one subject.
#[utoipa::path(post, path = "/api/v1/portal/tokens", tag = "portal", request_body = PortalTokenRequest,
    responses((status = 200, body = PortalTokenView, description = "The token, with `token` set (shown only here)"),
        (status = 400, body = Problem, description = "A field is wrong, or names a meter the namespace does not have"),
        (status = 404, body = Problem, description = "Portal tokens are off (no --portal-keys-file)")))]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    UrlPath(params): UrlPath<HashMap<String, String>>,
    Extension(access): Extension<Access>,
    body: Bytes,
) -> Result<Json<PortalTokenView>, Problem> {
    let ns = namespace(&params, &access)?;
    let keys = keys(&state)?;
    let req: PortalTokenRequest = json_body(&body)?;
    let subject = req.subject;
    if subject.is_empty() || subject.len() > tally_crds::event::MAX_SUBJECT_LEN {
        return Err(bad_body(
            "subject",
            format!(
                "give the subject (1-{} characters)",
                tally_crds::event::MAX_SUBJECT_LEN
            ),
        ));
    }
    let meters = req.allowed_meter_slugs.unwrap_or_default();
    let catalog = state.catalog();
    for (i, slug) in meters.iter().enumerate() {
        if catalog.get(&ns, slug).is_none() {
            return Err(bad_body(
                &format!("allowedMeterSlugs[{i}]"),
                format!("namespace {ns:?} has no meter {slug:?} (GET /api/v1/meters lists them)"),
            ));
        }
    }
    let now = Utc::now();
    let expires = req
        .expires_at
        .unwrap_or(now + chrono::Duration::hours(DEFAULT_TTL_HOURS));
    if expires <= now {
        return Err(bad_body("expiresAt", "must be in the future"));
    }
    if expires > now + chrono::Duration::days(MAX_TTL_DAYS) {
        return Err(bad_body(
            "expiresAt",
            format!("must be at most {MAX_TTL_DAYS} days ahead"),
        ));
    }
    // JWT times are whole seconds: the record keeps the same instant
    let record = PortalTokenRecord {
        id: random_id()?,
        namespace: ns.clone(),
        subject: subject.clone(),
        allowed_meter_slugs: meters.clone(),
        expires_ms: expires.timestamp() * 1000,
        created_ms: now.timestamp_millis(),
        invalidated_ms: None,
    };
    let token = keys.sign(&Claims {
        jti: record.id.clone(),
        sub: subject,
        ns,
        meters,
        iat: now.timestamp(),
        exp: expires.timestamp(),
    })?;
    let store = state.store.clone();
    let saved = record.clone();
    run_blocking(&state, move || store.save_portal_token(&saved)).await?;
    tracing::info!(id = %record.id, namespace = %record.namespace, subject = %record.subject, "Issued a portal token");
    Ok(Json(view(&record, Some(token))))
}

/// List the namespace's portal tokens, newest first (without the tokens themselves).
#[utoipa::path(get, path = "/api/v1/portal/tokens", tag = "portal",
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "default 100")),
    responses((status = 200, body = [PortalTokenView]), (status = 400, body = Problem)))]
pub(crate) async fn list_tokens(
    State(state): State<AppState>,
    UrlPath(params): UrlPath<HashMap<String, String>>,
    Extension(access): Extension<Access>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<PortalTokenView>>, Problem> {
    let ns = namespace(&params, &access)?;
    let limit = parse_limit(query.as_deref())?;
    let store = state.store.clone();
    let rows = run_blocking(&state, move || store.portal_tokens(&ns, limit)).await?;
    Ok(Json(rows.iter().map(|r| view(r, None)).collect()))
}

/// Which portal tokens to invalidate: one by `id`, or every token of a `subject`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged, deny_unknown_fields)]
pub(crate) enum InvalidateRequest {
    /// One token.
    #[serde(rename_all = "camelCase")]
    Id {
        /// The token's id.
        #[schema(min_length = 1)]
        id: String,
    },
    /// Every token of the subject issued so far.
    Subject {
        /// The subject.
        #[schema(min_length = 1)]
        subject: String,
    },
}

/// Invalidate a portal token (`id`) or every token of a subject (`subject`).
#[utoipa::path(post, path = "/api/v1/portal/tokens/invalidate", tag = "portal", request_body = InvalidateRequest,
    responses((status = 204, description = "Invalidated (on every server of the store)"),
        (status = 400, body = Problem), (status = 404, body = Problem, description = "No token with that id")))]
pub(crate) async fn invalidate_tokens(
    State(state): State<AppState>,
    UrlPath(params): UrlPath<HashMap<String, String>>,
    Extension(access): Extension<Access>,
    body: Bytes,
) -> Result<StatusCode, Problem> {
    let ns = namespace(&params, &access)?;
    let req: InvalidateRequest = serde_json::from_slice(&body).map_err(|_| {
        bad_body(
            "id",
            "give either {\"id\": …} (one token) or {\"subject\": …} (all of its tokens)",
        )
    })?;
    let (id, subject) = match req {
        InvalidateRequest::Id { id } if !id.is_empty() => (Some(id), None),
        InvalidateRequest::Subject { subject } if !subject.is_empty() => (None, Some(subject)),
        InvalidateRequest::Id { .. } => return Err(bad_body("id", "must not be empty")),
        InvalidateRequest::Subject { .. } => {
            return Err(bad_body("subject", "must not be empty"));
        }
    };
    let store = state.store.clone();
    let (ns2, id2) = (ns.clone(), id.clone());
    let known = match &id2 {
        Some(id) => {
            let (store, ns, id) = (store.clone(), ns2.clone(), id.clone());
            run_blocking(&state, move || store.portal_token(&ns, &id))
                .await?
                .is_some()
        }
        None => true,
    };
    if !known {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "portal-token-not-found",
            "Portal token not found",
            format!(
                "namespace {ns:?} has no portal token {:?} (GET /api/v1/portal/tokens lists them)",
                id.unwrap_or_default()
            ),
        ));
    }
    let at = Utc::now().timestamp_millis();
    let n = run_blocking(&state, move || {
        store.invalidate_portal_tokens(&ns2, id2.as_deref(), subject.as_deref(), at)
    })
    .await?;
    tracing::info!(namespace = %ns, invalidated = n, "Invalidated portal tokens");
    Ok(StatusCode::NO_CONTENT)
}

/// What a portal token may read (checked on each use).
struct PortalAccess {
    namespace: String,
    subject: String,
    meters: Vec<String>,
}

fn unauthorized(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        detail,
    )
}

fn forbidden(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::FORBIDDEN,
        "forbidden-portal",
        "Not allowed for this portal token",
        detail,
    )
}

async fn portal_access(state: &AppState, headers: &HeaderMap) -> Result<PortalAccess, Problem> {
    let keys = keys(state)?;
    let token = super::auth::bearer(headers)
        .ok_or_else(|| unauthorized("send the portal token: `Authorization: Bearer <token>`"))?;
    let claims = keys.verify(token).map_err(unauthorized)?;
    let store = state.store.clone();
    let (ns, id) = (claims.ns.clone(), claims.jti.clone());
    let record = run_blocking(state, move || store.portal_token(&ns, &id)).await?;
    let Some(record) = record else {
        return Err(unauthorized(
            "the portal token is not known to this server's store",
        ));
    };
    if let Some(at) = record.invalidated_ms {
        return Err(unauthorized(format!(
            "the portal token was invalidated at {}",
            rfc3339(at)
        )));
    }
    if record.expires_ms <= Utc::now().timestamp_millis() {
        return Err(unauthorized(
            "the portal token has expired; ask for a new one",
        ));
    }
    Ok(PortalAccess {
        namespace: record.namespace,
        subject: record.subject,
        meters: record.allowed_meter_slugs,
    })
}

/// Query a meter with a portal token: the token's subject only.
#[utoipa::path(get, path = "/api/v1/portal/meters/{slug}/query", tag = "portal",
    params(("slug" = String, Path),
        ("from" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "RFC 3339, inclusive"),
        ("to" = Option<chrono::DateTime<chrono::Utc>>, Query, description = "RFC 3339, exclusive; default: now"),
        ("windowSize" = Option<super::meters::WindowSizeDoc>, Query),
        ("windowTimeZone" = Option<String>, Query, description = "IANA zone windows align to; default UTC"),
        ("subject" = Option<Vec<String>>, Query, description = "only the token's own subject"),
        ("groupBy" = Option<Vec<String>>, Query)),
    security(("portal" = [])),
    responses((status = 200, body = super::meters::QueryResponse),
        (status = 400, body = Problem, description = "A parameter is wrong (as for /meters/{slug}/query)"), (status = 401, body = Problem, description = "No, a bad, an expired or an invalidated portal token"),
        (status = 403, body = Problem, description = "Another subject or a meter the token does not allow"),
        (status = 404, body = Problem)))]
pub(crate) async fn query_meter(
    State(state): State<AppState>,
    UrlPath(slug): UrlPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let access = match portal_access(&state, &headers).await {
        Ok(a) => a,
        Err(p) if p.status == 401 => {
            let mut res = p.into_response();
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tally-portal\""),
            );
            return Ok(res);
        }
        Err(p) => return Err(p),
    };
    if !access.meters.is_empty() && !access.meters.contains(&slug) {
        return Err(forbidden(format!(
            "this token may query only: {}",
            access.meters.join(", ")
        )));
    }
    let meter = state
        .catalog()
        .get(&access.namespace, &slug)
        .cloned()
        .ok_or_else(|| Problem::meter_not_found(&access.namespace, &slug))?;
    let mut spec = super::parse_query(&meter, query.as_deref().unwrap_or_default())?;
    if let Some(other) = spec.subjects.iter().find(|s| **s != access.subject) {
        return Err(forbidden(format!(
            "this token reads only subject {:?}, not {other:?}",
            access.subject
        )));
    }
    spec.subjects = vec![access.subject];
    super::meters::answer(&state, meter, spec, &headers).await
}

/// The CORS layer of the portal route for `origins` (`*`: any).
pub fn cors(origins: &[String]) -> Result<tower_http::cors::CorsLayer, String> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o.trim_end_matches('/'))
                    .map_err(|_| format!("--portal-cors-origins: {o:?} is not an origin"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(list)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([axum::http::Method::GET])
        .allow_headers([header::AUTHORIZATION, header::ACCEPT])
        .max_age(std::time::Duration::from_secs(600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = "keys:\n- {id: k2, secret: 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'}\n- {id: k1, secret: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'}\n";

    fn claims(exp_in: i64) -> Claims {
        let now = Utc::now().timestamp();
        Claims {
            jti: "t1".into(),
            sub: "acme".into(),
            ns: "default".into(),
            meters: vec!["tokens".into()],
            iat: now,
            exp: now + exp_in,
        }
    }

    #[test]
    fn the_first_key_signs_and_every_key_verifies() {
        let keys = PortalKeys::parse(KEYS).unwrap();
        let token = keys.sign(&claims(60)).unwrap();
        assert_eq!(keys.verify(&token).unwrap(), claims(60));
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().kid.as_deref(),
            Some("k2")
        );
        // after rotation the old key's tokens still verify while it is listed
        let old = PortalKeys::parse(
            "keys:\n- {id: k1, secret: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'}\n",
        )
        .unwrap();
        let t_old = old.sign(&claims(60)).unwrap();
        assert!(keys.verify(&t_old).is_ok());
        // a key removed: refused, naming it
        let only_new = PortalKeys::parse(
            "keys:\n- {id: k2, secret: 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'}\n",
        )
        .unwrap();
        assert!(only_new.verify(&t_old).unwrap_err().contains("\"k1\""));
    }

    #[test]
    fn forged_and_expired_tokens_are_refused() {
        let keys = PortalKeys::parse(KEYS).unwrap();
        let other = PortalKeys::parse(
            "keys:\n- {id: k2, secret: 'cccccccccccccccccccccccccccccccccccc'}\n",
        )
        .unwrap();
        let forged = other.sign(&claims(60)).unwrap();
        assert!(keys.verify(&forged).is_err());
        assert!(!keys.recognizes(&forged));
        let expired = keys.sign(&claims(-5)).unwrap();
        assert!(keys.verify(&expired).unwrap_err().contains("expired"));
        assert!(
            keys.recognizes(&expired),
            "an expired portal token is still one"
        );
        assert!(keys.verify("not.a.jwt").is_err());
    }

    #[test]
    fn bad_key_files_name_the_field() {
        for (text, field) in [
            ("keys:\n- {id: a, secret: short}\n", "keys[0].secret"),
            (
                "keys:\n- {id: '', secret: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'}\n",
                "keys[0].id",
            ),
            (
                "keys:\n- {id: a, secret: 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'}\n- {id: a, secret: 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb'}\n",
                "keys[1].id",
            ),
            ("keys: []\n", "keys:"),
        ] {
            let e = PortalKeys::parse(text).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
    }
}
