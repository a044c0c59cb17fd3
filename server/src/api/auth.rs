//! Bearer-token authentication of the HTTP API: each token is granted namespaces.
//!
//! - Tokens come from a YAML file (`--tokens-file`; in the chart, a mounted Secret):
//!   `tokens: [{name, token | tokenSha256, namespaces: [...]}]`. `tokenSha256` (the hex
//!   SHA-256 of the token) keeps the token itself out of the file. The file is re-read
//!   when it changes, so rotating the Secret needs no restart; an invalid new file is
//!   logged and the tokens in force are kept.
//! - Tokens are held and looked up by their SHA-256 digest only, so neither a memory
//!   dump nor the timing of a lookup gives a token away.
//! - `Authorization: Bearer <token>`: none or an unknown one → 401 (with
//!   `WWW-Authenticate`); a namespace the token is not granted → 403. Every route under
//!   `/api/v1` is checked; `/healthz`, `/readyz`, `/metrics` and the OpenAPI document
//!   are not.
//! - The namespace-less OpenMeter routes (`/api/v1/events`, `/api/v1/meters/…`) act on
//!   the token's first namespace, so OpenMeter clients that send only a token keep
//!   working.
//! - `"*"` grants every namespace (the agents' token: Collectors live in many).
//! - Without a tokens file every request is allowed and the namespace-less routes act
//!   on `default` ([`Auth::disabled`]); `tally-server` starts so only on loopback.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;

use super::portal::PortalKeys;
use super::problem::Problem;
use crate::metrics::ReloadLabels;

/// The tokens file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenEntry {
    /// A name for logs (never the token itself).
    #[serde(default)]
    name: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_sha256: Option<String>,
    namespaces: Vec<String>,
}

/// The lowercase hex SHA-256 of a token (`tokenSha256`): how tokens are held and
/// looked up.
pub fn digest(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// What one token may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's name (for logs).
    pub name: String,
    /// Granted namespaces in order; `*` is every namespace.
    pub namespaces: Vec<String>,
}

impl Grant {
    fn allows(&self, ns: &str) -> bool {
        self.namespaces.iter().any(|n| n == "*" || n == ns)
    }

    /// The namespace of the namespace-less routes: the first granted one (`default`
    /// when the first is `*`).
    fn default_namespace(&self) -> &str {
        match self.namespaces.first().map(String::as_str) {
            Some("*") | None => "default",
            Some(ns) => ns,
        }
    }
}

/// Valid tokens and their grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    /// By the hex SHA-256 of the token.
    by_digest: HashMap<String, Grant>,
}

impl Tokens {
    /// Parses a tokens file; errors name the entry and field.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let file: TokenFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_digest = HashMap::new();
        for (i, t) in file.tokens.into_iter().enumerate() {
            let at = |field: &str| format!("tokens[{i}].{field}");
            let (key, field) = match (&t.token, &t.token_sha256) {
                (Some(token), None) => {
                    if token.trim().len() < 16 {
                        return Err(format!(
                            "{}: a token must have at least 16 characters (e.g. `openssl rand -hex 32`)",
                            at("token")
                        ));
                    }
                    (digest(token.trim()), "token")
                }
                (None, Some(hex)) => {
                    let hex = hex.trim().to_ascii_lowercase();
                    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!(
                            "{}: must be 64 hex digits, the SHA-256 of the token (`printf %s \"$TOKEN\" | sha256sum`)",
                            at("tokenSha256")
                        ));
                    }
                    (hex, "tokenSha256")
                }
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "tokens[{i}]: give either token or tokenSha256, not both"
                    ));
                }
                (None, None) => {
                    return Err(format!(
                        "tokens[{i}]: give the token (`token`) or its SHA-256 (`tokenSha256`)"
                    ));
                }
            };
            if t.namespaces.is_empty() {
                return Err(format!(
                    "{}: grant at least one namespace (or \"*\" for all)",
                    at("namespaces")
                ));
            }
            for (j, ns) in t.namespaces.iter().enumerate() {
                if ns != "*" && !tally_crds::envelope::is_namespace(ns) {
                    return Err(format!(
                        "{}: {ns:?} is not a namespace name (lowercase letters, digits and '-', at most 63) nor \"*\"",
                        at(&format!("namespaces[{j}]"))
                    ));
                }
            }
            let name = if t.name.is_empty() {
                format!("tokens[{i}]")
            } else {
                t.name
            };
            let grant = Grant {
                name,
                namespaces: t.namespaces,
            };
            if by_digest.insert(key, grant).is_some() {
                return Err(format!("{}: the same token is listed twice", at(field)));
            }
        }
        Ok(Tokens { by_digest })
    }

    /// Reads and merges the files; a token listed in two of them is an error.
    pub fn load(paths: &[PathBuf]) -> Result<(Tokens, String), String> {
        let mut all = Tokens::default();
        let mut texts = String::new();
        for path in paths {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the tokens file {}: {e}", path.display()))?;
            let tokens =
                Tokens::parse(&text).map_err(|e| format!("tokens file {}: {e}", path.display()))?;
            for (key, grant) in tokens.by_digest {
                if all.by_digest.insert(key, grant).is_some() {
                    return Err(format!(
                        "tokens file {}: a token is also listed in another tokens file",
                        path.display()
                    ));
                }
            }
            texts.push_str(&text);
            texts.push('\0');
        }
        Ok((all, texts))
    }

    /// What `token` is granted, if it is a valid token.
    pub fn grant(&self, token: &str) -> Option<&Grant> {
        self.by_digest.get(&digest(token.trim()))
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// What one request may use (inserted by [`authorize`]).
#[derive(Debug, Clone)]
pub struct Access {
    default_ns: String,
    grant: Option<Grant>,
}

impl Access {
    /// Everything, namespace-less routes on `default` (no authentication configured).
    pub fn open() -> Access {
        Access {
            default_ns: "default".into(),
            grant: None,
        }
    }

    /// The namespace of a namespace-less route.
    pub fn default_namespace(&self) -> &str {
        &self.default_ns
    }

    /// Whether the whole store may be read (dead letters of every namespace).
    pub fn unrestricted(&self) -> bool {
        self.grant
            .as_ref()
            .is_none_or(|g| g.namespaces.iter().any(|n| n == "*"))
    }

    /// 403 unless `ns` is granted.
    pub fn check(&self, ns: &str) -> Result<(), Problem> {
        match &self.grant {
            Some(g) if !g.allows(ns) => Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden-namespace",
                "Namespace not granted",
                format!(
                    "token {:?} may not use namespace {ns:?}; it is granted: {}",
                    g.name,
                    g.namespaces.join(", ")
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// The API's authentication: disabled, or the tokens of a file; and the keys of the
/// customer-facing tokens ([`super::portal`]), which are refused here (403).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Option<Arc<RwLock<Arc<Tokens>>>>,
    portal: Option<Arc<PortalKeys>>,
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

impl Auth {
    /// No authentication.
    pub fn disabled() -> Auth {
        Auth::default()
    }

    /// Tokens that do not change.
    pub fn fixed(tokens: Tokens) -> Auth {
        Auth {
            tokens: Some(Arc::new(RwLock::new(Arc::new(tokens)))),
            portal: None,
        }
    }

    /// Also knows portal tokens signed with `keys` (to serve the portal route, and to
    /// refuse them on every other route).
    pub fn with_portal(mut self, keys: PortalKeys) -> Auth {
        self.portal = Some(Arc::new(keys));
        self
    }

    /// The portal keys, when portal tokens are on.
    pub fn portal(&self) -> Option<&PortalKeys> {
        self.portal.as_deref()
    }

    /// 403 when `headers` carry a portal token: it reads only the portal route.
    fn refuse_portal(&self, headers: &axum::http::HeaderMap) -> Result<(), Problem> {
        match (&self.portal, bearer(headers)) {
            (Some(keys), Some(token)) if keys.recognizes(token) => Err(Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden-portal",
                "Not allowed for a portal token",
                "a portal token reads only GET /api/v1/portal/meters/{slug}/query (its own subject and meters)",
            )),
            _ => Ok(()),
        }
    }

    /// The tokens of `paths`, re-read every `every` when their content changed; each
    /// re-read is counted in `reloads` (`what="tokens"`).
    pub fn from_files(
        paths: Vec<PathBuf>,
        every: Duration,
        reloads: Family<ReloadLabels, Counter>,
    ) -> Result<Auth, String> {
        let (tokens, mut text) = Tokens::load(&paths)?;
        let auth = Auth::fixed(tokens);
        let shared = auth.tokens.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let now: Option<String> = paths
                    .iter()
                    .map(|p| std::fs::read_to_string(p).ok().map(|t| t + "\0"))
                    .collect();
                if now.is_none_or(|n| n == text) {
                    continue;
                }
                match Tokens::load(&paths) {
                    Ok((t, new_text)) => {
                        tracing::info!(tokens = t.len(), "Tokens reloaded");
                        reloads
                            .get_or_create(&ReloadLabels::new("tokens", true))
                            .inc();
                        if let Some(s) = &shared
                            && let Ok(mut w) = s.write()
                        {
                            *w = Arc::new(t);
                        }
                        text = new_text;
                    }
                    Err(e) => {
                        reloads
                            .get_or_create(&ReloadLabels::new("tokens", false))
                            .inc();
                        tracing::error!(error = %e, "New tokens are invalid; keeping the tokens in force")
                    }
                }
            }
        });
        Ok(auth)
    }

    /// Whether requests must carry a token.
    pub fn enabled(&self) -> bool {
        self.tokens.is_some()
    }

    fn access(&self, headers: &axum::http::HeaderMap) -> Result<Access, Problem> {
        let Some(tokens) = &self.tokens else {
            self.refuse_portal(headers)?;
            return Ok(Access::open());
        };
        let tokens = tokens.read().map(|t| t.clone()).unwrap_or_default();
        let unauthorized = |detail: &str| {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                detail.to_string(),
            )
        };
        if !headers.contains_key(header::AUTHORIZATION) {
            return Err(unauthorized(
                "send a token: `Authorization: Bearer <token>` (tokens are configured in the server's tokens file)",
            ));
        }
        let token = bearer(headers)
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
        let Some(grant) = tokens.grant(token) else {
            self.refuse_portal(headers)?;
            return Err(unauthorized(
                "the token is not valid (unknown, or rotated away)",
            ));
        };
        Ok(Access {
            default_ns: grant.default_namespace().to_string(),
            grant: Some(grant.clone()),
        })
    }
}

/// Middleware of the `/api/v1` routes: 401 without a valid token, else the request's
/// [`Access`] for the handlers.
pub async fn authorize(State(auth): State<Auth>, mut req: Request, next: Next) -> Response {
    match auth.access(req.headers()) {
        Ok(access) => {
            req.extensions_mut().insert(access);
            next.run(req).await
        }
        Err(problem) => {
            let mut res = problem.into_response();
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tally\""),
            );
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The third token is `cccccccccccccccccccc`, given by its SHA-256 only.
    const FILE: &str = "tokens:\n- {name: team-a, token: aaaaaaaaaaaaaaaaaaaa, namespaces: [team-a, shared]}\n- {token: '  bbbbbbbbbbbbbbbbbbbb ', namespaces: ['*']}\n- {name: hashed, tokenSha256: 0F6B5D8C3C0B9E5A8F9E2C3E4D5B6A7C8D9E0F1A2B3C4D5E6F708192A3B4C5D6, namespaces: [team-c]}\n";

    fn bearer(t: &str) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn tokens_grant_their_namespaces_and_the_first_is_the_default() {
        let auth = Auth::fixed(Tokens::parse(FILE).unwrap());
        let a = auth.access(&bearer("aaaaaaaaaaaaaaaaaaaa")).unwrap();
        assert_eq!(a.default_namespace(), "team-a");
        assert!(a.check("shared").is_ok());
        let denied = a.check("team-b").unwrap_err();
        assert_eq!(denied.status, 403);
        assert!(
            denied.detail.contains("team-a, shared"),
            "{}",
            denied.detail
        );
        assert!(!a.unrestricted());
        let all = auth.access(&bearer("bbbbbbbbbbbbbbbbbbbb")).unwrap();
        assert!(all.check("anything").is_ok() && all.unrestricted());
        assert_eq!(all.default_namespace(), "default");
    }

    #[test]
    fn a_token_given_by_its_sha256_is_accepted_and_tokens_are_held_hashed() {
        let text = FILE.replace(
            "0F6B5D8C3C0B9E5A8F9E2C3E4D5B6A7C8D9E0F1A2B3C4D5E6F708192A3B4C5D6",
            &digest("cccccccccccccccccccc").to_uppercase(),
        );
        let tokens = Tokens::parse(&text).unwrap();
        assert!(
            !format!("{tokens:?}").contains("aaaaaaaaaaaaaaaaaaaa"),
            "no token is kept in clear"
        );
        let auth = Auth::fixed(tokens);
        let c = auth.access(&bearer("cccccccccccccccccccc")).unwrap();
        assert_eq!(c.default_namespace(), "team-c");
        // `printf %s aaaaaaaaaaaaaaaaaaaa | sha256sum`
        assert_eq!(
            digest("aaaaaaaaaaaaaaaaaaaa"),
            "42492da06234ad0ac76f5d5debdb6d1ae027cffbe746a1c13b89bb8bc0139137"
        );
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_401() {
        let auth = Auth::fixed(Tokens::parse(FILE).unwrap());
        assert_eq!(
            auth.access(&axum::http::HeaderMap::new())
                .unwrap_err()
                .status,
            401
        );
        let mut basic = axum::http::HeaderMap::new();
        basic.insert(header::AUTHORIZATION, "Basic eDp5".parse().unwrap());
        assert_eq!(auth.access(&basic).unwrap_err().status, 401);
        assert_eq!(
            auth.access(&bearer("dddddddddddddddddddd"))
                .unwrap_err()
                .status,
            401
        );
        assert!(
            Auth::disabled()
                .access(&axum::http::HeaderMap::new())
                .is_ok()
        );
    }

    #[test]
    fn bad_files_name_the_entry() {
        for (text, field) in [
            (
                "tokens:\n- {token: short, namespaces: [a]}\n",
                "tokens[0].token",
            ),
            (
                "tokens:\n- {token: aaaaaaaaaaaaaaaaaaaa, namespaces: []}\n",
                "tokens[0].namespaces",
            ),
            (
                "tokens:\n- {token: aaaaaaaaaaaaaaaaaaaa, namespaces: [Team_A]}\n",
                "tokens[0].namespaces[0]",
            ),
            (
                "tokens:\n- {token: aaaaaaaaaaaaaaaaaaaa, namespaces: [a]}\n- {token: aaaaaaaaaaaaaaaaaaaa, namespaces: [b]}\n",
                "tokens[1].token",
            ),
            (
                "tokens:\n- {tokenSha256: abc, namespaces: [a]}\n",
                "tokens[0].tokenSha256",
            ),
            (
                "tokens:\n- {token: aaaaaaaaaaaaaaaaaaaa, tokenSha256: 42492da06234ad0ac76f5d5debdb6d1ae027cffbe746a1c13b89bb8bc0139137, namespaces: [a]}\n",
                "tokens[0]: give either",
            ),
            (
                "tokens:\n- {namespaces: [a]}\n",
                "tokens[0]: give the token",
            ),
            (
                "tokens:\n- {token: aaaaaaaaaaaaaaaaaaaa, namespaces: [a]}\n- {tokenSha256: 42492da06234ad0ac76f5d5debdb6d1ae027cffbe746a1c13b89bb8bc0139137, namespaces: [b]}\n",
                "tokens[1].tokenSha256",
            ),
        ] {
            let e = Tokens::parse(text).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
        assert!(
            Tokens::parse("tokens:\n- {token: aaaaaaaaaaaaaaaaaaaa, namespaces: [a], role: x}\n")
                .is_err()
        );
    }
}
