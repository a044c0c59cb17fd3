//! Customer-facing (portal) tokens on the real server: a token reads its subject's
//! allowed meters and nothing else (another subject or meter → 403, any other route →
//! 403, expired or invalidated → 401); invalidation survives a restart (embedded store)
//! and holds on every server of one ClickHouse store; CORS for the portal route.
mod common;

use std::time::Duration;

use common::services::services;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

const METERS: &str = "apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: tokens, namespace: team-a}
spec: {eventType: llm, aggregation: SUM, valueProperty: $.tokens}
---
apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: calls, namespace: team-a}
spec: {eventType: llm, aggregation: COUNT}
---
apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: margin, namespace: team-a}
spec: {eventType: llm, aggregation: SUM, valueProperty: $.cost}
";

const ADMIN: &str = "admin-of-team-a-0123456789";
const OTHER: &str = "admin-of-team-b-0123456789";
const KEYS: &str = "keys:\n- {id: k1, secret: 'portal-signing-secret-0123456789abcdef'}\n";

struct Files {
    _dir: tempfile::TempDir,
    tokens: String,
    keys: String,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!(
            "tokens:\n- {{name: team-a, token: {ADMIN}, namespaces: [team-a]}}\n- {{name: team-b, token: {OTHER}, namespaces: [team-b]}}\n"
        ),
    )
    .unwrap();
    let keys = dir.path().join("portal-keys.yaml");
    std::fs::write(&keys, KEYS).unwrap();
    Files {
        tokens: tokens.to_str().unwrap().to_string(),
        keys: keys.to_str().unwrap().to_string(),
        _dir: dir,
    }
}

async fn call(
    c: &reqwest::Client,
    method: Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = c.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn issue(c: &reqwest::Client, s: &Server, body: Value) -> (String, String) {
    let (status, t) = call(
        c,
        Method::POST,
        s.url("/api/v1/portal/tokens"),
        Some(ADMIN),
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{t}");
    assert!(t.get("token").is_some() && t["expired"] == false, "{t}");
    (
        t["id"].as_str().unwrap().to_string(),
        t["token"].as_str().unwrap().to_string(),
    )
}

async fn portal(c: &reqwest::Client, s: &Server, token: &str, path_query: &str) -> (u16, Value) {
    call(
        c,
        Method::GET,
        s.url(&format!("/api/v1/portal/meters/{path_query}")),
        Some(token),
        None,
    )
    .await
}

fn total(body: &Value) -> f64 {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"].as_f64().unwrap())
        .sum()
}

fn events() -> Value {
    // acme: 3 calls, 7.5 + 11 + 20 tokens; globex: 2 calls, 1000 tokens
    let e = |id: &str, subject: &str, tokens: f64, cost: f64| {
        json!({"specversion": "1.0", "id": id, "source": "app", "type": "llm", "subject": subject,
               "time": "2026-03-01T10:00:00Z", "data": {"tokens": tokens, "cost": cost}})
    };
    json!([
        e("a1", "acme", 7.5, 1.0),
        e("a2", "acme", 11.0, 2.0),
        e("a3", "acme", 20.0, 3.0),
        e("g1", "globex", 400.0, 9.0),
        e("g2", "globex", 600.0, 9.0)
    ])
}

#[tokio::test]
async fn a_portal_token_reads_its_subject_and_meters_and_nothing_else() {
    let f = files();
    let mut s = Server::start(
        &[("m.yaml", METERS)],
        &[
            "--tokens-file",
            &f.tokens,
            "--portal-keys-file",
            &f.keys,
            "--portal-cors-origins",
            "https://portal.example.com",
        ],
    );
    let c = client();
    let (status, body) = call(
        &c,
        Method::POST,
        s.url("/api/v1/events"),
        Some(ADMIN),
        Some(events()),
    )
    .await;
    assert_eq!(status, 204, "{body}");

    // Issuing needs an API token granted the namespace.
    let req = json!({"subject": "acme", "allowedMeterSlugs": ["tokens", "calls"]});
    let (status, _) = call(
        &c,
        Method::POST,
        s.url("/api/v1/portal/tokens"),
        None,
        Some(req.clone()),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = call(
        &c,
        Method::POST,
        s.url("/api/v1/namespaces/team-a/portal/tokens"),
        Some(OTHER),
        Some(req.clone()),
    )
    .await;
    assert_eq!(status, 403, "team B's token cannot issue for team A");
    let (id, token) = issue(&c, &s, req).await;

    // Its subject's allowed meters, exactly.
    let (status, body) = portal(&c, &s, &token, "tokens/query").await;
    assert_eq!((status, total(&body)), (200, 38.5), "{body}");
    let (status, body) = portal(&c, &s, &token, "calls/query?subject=acme&groupBy=subject").await;
    assert_eq!((status, total(&body)), (200, 3.0), "{body}");
    assert_eq!(body["data"][0]["subject"], "acme", "{body}");

    // Another subject, another meter: 403.
    let (status, body) = portal(&c, &s, &token, "tokens/query?subject=globex").await;
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("acme"), "{body}");
    let (status, _) = portal(&c, &s, &token, "tokens/query?subject=acme&subject=globex").await;
    assert_eq!(status, 403);
    let (status, body) = portal(&c, &s, &token, "margin/query").await;
    assert_eq!(status, 403, "{body}");

    // Any other route: 403.
    for (method, path, body) in [
        (Method::GET, "/api/v1/meters", None),
        (Method::GET, "/api/v1/meters/tokens/query", None),
        (
            Method::GET,
            "/api/v1/namespaces/team-a/meters/tokens/query?subject=acme",
            None,
        ),
        (Method::POST, "/api/v1/events", Some(events())),
        (Method::GET, "/api/v1/events", None),
        (Method::GET, "/api/v1/portal/tokens", None),
        (
            Method::POST,
            "/api/v1/portal/tokens",
            Some(json!({"subject": "globex"})),
        ),
        (Method::GET, "/api/v1/dead-letters", None),
    ] {
        let (status, problem) = call(&c, method.clone(), s.url(path), Some(&token), body).await;
        assert_eq!(status, 403, "{method} {path}: {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains("portal"),
            "{problem}"
        );
    }

    // No token, garbage, another server's key: 401.
    let (status, _) = call(
        &c,
        Method::GET,
        s.url("/api/v1/portal/meters/tokens/query"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = portal(&c, &s, "not-a-token", "tokens/query").await;
    assert_eq!(status, 401);
    let (status, _) = portal(&c, &s, ADMIN, "tokens/query").await;
    assert_eq!(status, 401, "an API token is no portal token");
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let (status, _) = portal(&c, &s, &forged, "tokens/query").await;
    assert_eq!(status, 401, "a token with a broken signature");

    // Expired: 401.
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let (_, short) = issue(&c, &s, json!({"subject": "acme", "expiresAt": soon})).await;
    let (status, _) = portal(&c, &s, &short, "margin/query").await;
    assert_eq!(status, 200, "no allowedMeterSlugs: every meter");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (status, body) = portal(&c, &s, &short, "margin/query").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    // Invalidated by id: 401; the subject's other token still reads, until the subject
    // is invalidated; a token issued afterwards reads.
    let (_, second) = issue(&c, &s, json!({"subject": "acme"})).await;
    let (_, globex) = issue(&c, &s, json!({"subject": "globex"})).await;
    let (status, _) = call(
        &c,
        Method::POST,
        s.url("/api/v1/portal/tokens/invalidate"),
        Some(ADMIN),
        Some(json!({"id": id})),
    )
    .await;
    assert_eq!(status, 204);
    let (status, body) = portal(&c, &s, &token, "tokens/query").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("invalidated"),
        "{body}"
    );
    assert_eq!(portal(&c, &s, &second, "tokens/query").await.0, 200);
    let (status, _) = call(
        &c,
        Method::POST,
        s.url("/api/v1/portal/tokens/invalidate"),
        Some(ADMIN),
        Some(json!({"subject": "acme"})),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(portal(&c, &s, &second, "tokens/query").await.0, 401);
    let (status, body) = portal(&c, &s, &globex, "tokens/query").await;
    assert_eq!((status, total(&body)), (200, 1000.0), "{body}");
    let (_, third) = issue(&c, &s, json!({"subject": "acme"})).await;

    // The list: newest first, without the tokens, invalidation shown.
    let (status, list) = call(
        &c,
        Method::GET,
        s.url("/api/v1/portal/tokens?limit=10"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 5, "{list:?}");
    assert!(list.iter().all(|t| t.get("token").is_none()), "{list:?}");
    let first = list.iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert!(first["invalidatedAt"].is_string(), "{first}");
    assert_eq!(first["allowedMeterSlugs"], json!(["tokens", "calls"]));
    assert!(list.iter().any(|t| t["expired"] == true), "{list:?}");

    // Invalidation survives a restart; a valid token stays valid.
    s.restart();
    assert_eq!(portal(&c, &s, &token, "tokens/query").await.0, 401);
    assert_eq!(portal(&c, &s, &second, "tokens/query").await.0, 401);
    let (status, body) = portal(&c, &s, &third, "tokens/query").await;
    assert_eq!((status, total(&body)), (200, 38.5), "{body}");

    // Browsers of the configured origin may call the portal route.
    let preflight = |origin: &'static str| {
        c.request(Method::OPTIONS, s.url("/api/v1/portal/meters/tokens/query"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let ok = preflight("https://portal.example.com").await.unwrap();
    assert_eq!(
        ok.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("https://portal.example.com")
    );
    let other = preflight("https://evil.example.net").await.unwrap();
    assert!(
        other.headers().get("access-control-allow-origin").is_none(),
        "{:?}",
        other.headers()
    );
}

#[tokio::test]
async fn bad_portal_requests_name_the_field() {
    let f = files();
    let s = Server::start(
        &[("m.yaml", METERS)],
        &["--tokens-file", &f.tokens, "--portal-keys-file", &f.keys],
    );
    let c = client();
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    for (body, field) in [
        (
            json!({"subject": "acme", "allowedMeterSlugs": ["tokens", "nope"]}),
            "allowedMeterSlugs[1]",
        ),
        (json!({"subject": "acme", "expiresAt": past}), "expiresAt"),
        (
            json!({"subject": "acme", "expiresAt": "2999-01-01T00:00:00Z"}),
            "expiresAt",
        ),
        (json!({"subject": ""}), "subject"),
    ] {
        let (status, problem) = call(
            &c,
            Method::POST,
            s.url("/api/v1/portal/tokens"),
            Some(ADMIN),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body}: {problem}");
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    let (status, problem) = call(
        &c,
        Method::POST,
        s.url("/api/v1/portal/tokens"),
        Some(ADMIN),
        Some(json!({"allowedMeterSlugs": []})),
    )
    .await;
    assert_eq!(status, 400, "a missing subject: {problem}");
    let (status, problem) = call(
        &c,
        Method::POST,
        s.url("/api/v1/portal/tokens/invalidate"),
        Some(ADMIN),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 400, "{problem}");
    let (status, problem) = call(
        &c,
        Method::POST,
        s.url("/api/v1/portal/tokens/invalidate"),
        Some(ADMIN),
        Some(json!({"id": "0123"})),
    )
    .await;
    assert_eq!(status, 404, "{problem}");
    // without --portal-keys-file the routes say how to turn them on
    let off = Server::start(&[("m.yaml", METERS)], &["--tokens-file", &f.tokens]);
    let (status, problem) = call(
        &c,
        Method::POST,
        off.url("/api/v1/portal/tokens"),
        Some(ADMIN),
        Some(json!({"subject": "acme"})),
    )
    .await;
    assert_eq!(status, 404, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("--portal-keys-file"),
        "{problem}"
    );
}

/// Two servers on one ClickHouse store (as replicas of a Deployment are): a token
/// issued through one reads through the other, and once invalidated through the other
/// the first refuses it too.
#[tokio::test]
async fn an_invalidation_holds_on_every_server_of_a_clickhouse_store() {
    let Some(svc) = services("portal tokens on ClickHouse") else {
        return;
    };
    let f = files();
    for (version, url) in [("26.9", &svc.clickhouse26), ("18.16", &svc.clickhouse)] {
        let stamp = format!(
            "{}_{}",
            std::process::id(),
            chrono::Utc::now().timestamp_millis()
        );
        let (db, topic) = (format!("portal_{stamp}"), format!("portal-{stamp}"));
        let args = vec![
            "--kafka",
            &svc.kafka,
            "--topic",
            &topic,
            "--clickhouse",
            url,
            "--clickhouse-database",
            &db,
            "--tokens-file",
            &f.tokens,
            "--portal-keys-file",
            &f.keys,
        ];
        let mut provisioning = args.clone();
        provisioning.push("--provision");
        let b = Server::start(&[("m.yaml", METERS)], &provisioning);
        let a = Server::start(&[("m.yaml", METERS)], &args);
        let c = client();
        let (id, token) = issue(&c, &b, json!({"subject": "acme"})).await;
        // the second server serves the meter once its rollup is provisioned
        let read = tally_tests::eventually(
            Duration::from_secs(60),
            Duration::from_millis(200),
            "the other server to serve the meter",
            async || {
                let (status, body) = portal(&c, &a, &token, "tokens/query").await;
                (status == 200).then_some(body)
            },
        )
        .await;
        assert!(read["data"].is_array(), "{version}: {read}");
        let (status, _) = call(
            &c,
            Method::POST,
            a.url("/api/v1/portal/tokens/invalidate"),
            Some(ADMIN),
            Some(json!({"id": id})),
        )
        .await;
        assert_eq!(status, 204, "{version}");
        for s in [&a, &b] {
            let (status, body) = portal(&c, s, &token, "tokens/query").await;
            assert_eq!(status, 401, "{version} at {}: {body}", s.addr);
        }
        let _ = drop_database(url, &db).await;
    }
}

async fn drop_database(url: &str, db: &str) -> Result<(), reqwest::Error> {
    client()
        .post(url)
        .body(format!("DROP DATABASE IF EXISTS {db}"))
        .send()
        .await
        .map(drop)
}
