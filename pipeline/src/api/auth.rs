//! Bearer-token authentication of the HTTP API: each token is granted namespaces.
//!
//! - Tokens come from a YAML file (`--tokens-file`; in the chart, a mounted Secret):
//!   `tokens: [{name, token, namespaces: [...]}]`. The file is re-read when it
//!   changes, so rotating the Secret needs no restart; an invalid new file is logged
//!   and the tokens in force are kept.
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
use serde::Deserialize;

use super::problem::Problem;

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
    token: String,
    namespaces: Vec<String>,
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
    by_token: HashMap<String, Grant>,
}

impl Tokens {
    /// Parses a tokens file; errors name the entry and field.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let file: TokenFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_token = HashMap::new();
        for (i, t) in file.tokens.into_iter().enumerate() {
            let at = |field: &str| format!("tokens[{i}].{field}");
            if t.token.trim().len() < 16 {
                return Err(format!(
                    "{}: a token must have at least 16 characters (e.g. `openssl rand -hex 32`)",
                    at("token")
                ));
            }
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
            if by_token.insert(t.token.trim().to_string(), grant).is_some() {
                return Err(format!("{}: the same token is listed twice", at("token")));
            }
        }
        Ok(Tokens { by_token })
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
            for (token, grant) in tokens.by_token {
                if all.by_token.insert(token, grant).is_some() {
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

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
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

/// The API's authentication: disabled, or the tokens of a file.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Option<Arc<RwLock<Arc<Tokens>>>>,
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
        }
    }

    /// The tokens of `paths`, re-read every `every` when their content changed.
    pub fn from_files(paths: Vec<PathBuf>, every: Duration) -> Result<Auth, String> {
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
                        if let Some(s) = &shared
                            && let Ok(mut w) = s.write()
                        {
                            *w = Arc::new(t);
                        }
                        text = new_text;
                    }
                    Err(e) => {
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
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(unauthorized(
                "send a token: `Authorization: Bearer <token>` (tokens are configured in the server's tokens file)",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
        let grant = tokens
            .by_token
            .get(token)
            .ok_or_else(|| unauthorized("the token is not valid (unknown, or rotated away)"))?;
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

    const FILE: &str = "tokens:\n- {name: team-a, token: aaaaaaaaaaaaaaaaaaaa, namespaces: [team-a, shared]}\n- {token: '  bbbbbbbbbbbbbbbbbbbb ', namespaces: ['*']}\n";

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
            auth.access(&bearer("cccccccccccccccccccc"))
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
