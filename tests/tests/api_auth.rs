//! Authentication of the HTTP API (`tally-server --tokens-file`): no token → 401, a
//! token reading a namespace it is not granted → 403, a valid token ingests and queries
//! only its namespaces; the namespace-less OpenMeter routes act on the token's first
//! namespace; the tokens file is re-read when it changes; health stays open; the agent's
//! ingest sink sends the token of its `tokenFile`.
use std::time::Duration;

use serde_json::{Value, json};
use tally_tests::{
    Proc, Standalone, bin, eventually, free_port, log_agent_config, subject_totals,
    write_usage_lines,
};

const METERS: &str = "apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: llm-tokens, namespace: team-a}
spec: {eventType: llm, aggregation: SUM, valueProperty: $.tokens}
---
apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: llm-tokens, namespace: team-b}
spec: {eventType: llm, aggregation: SUM, valueProperty: $.tokens}
---
apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: agent-tokens, namespace: team-a}
spec: {eventType: llm-tokens, aggregation: SUM, valueProperty: $.tokens}
";

const A: &str = "token-of-team-a-0123456789";
const B: &str = "token-of-team-b-0123456789";
const C: &str = "token-added-later-0123456789";

fn tokens(extra: &str) -> String {
    format!(
        "tokens:\n- {{name: team-a, token: {A}, namespaces: [team-a]}}\n- {{name: team-b, token: {B}, namespaces: [team-b, team-a]}}\n{extra}"
    )
}

fn event(id: &str, tokens: u64) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "app", "type": "llm", "subject": "acme",
           "time": "2026-01-01T00:00:00Z", "data": {"tokens": tokens}})
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let mut req = http.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        challenge,
    )
}

fn total(body: &Value) -> u64 {
    body["data"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| r["value"].as_f64().unwrap() as u64)
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn tokens_scope_every_request_to_their_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("meters.yaml"), METERS).unwrap();
    let tokens_file = dir.path().join("tokens.yaml");
    std::fs::write(&tokens_file, tokens("")).unwrap();
    let server = Standalone::start_with(
        dir.path(),
        &manifests,
        &["--tokens-file", tokens_file.to_str().unwrap()],
    );
    let base = format!("http://{}/api/v1", server.addr);
    let http = reqwest::Client::new();
    use reqwest::Method as M;

    // No token, a malformed one, an unknown one: 401 with a Bearer challenge.
    for token in [None, Some("not-a-known-token-000000")] {
        let (status, body, challenge) = call(
            &http,
            M::GET,
            format!("{base}/namespaces/team-a/meters"),
            token,
            None,
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["status"], 401);
        assert!(body["detail"].as_str().unwrap().contains("token"), "{body}");
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"tally\""));
    }
    let (status, _, _) = call(
        &http,
        M::POST,
        format!("{base}/events"),
        None,
        Some(event("x", 1)),
    )
    .await;
    assert_eq!(status, 401, "ingest needs a token too");

    // Team A reading or writing team B: 403, naming what it may use.
    let (status, body, _) = call(
        &http,
        M::GET,
        format!("{base}/namespaces/team-b/meters/llm_tokens/query"),
        Some(A),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("team-a"),
        "{body}"
    );
    let (status, _, _) = call(
        &http,
        M::POST,
        format!("{base}/namespaces/team-b/events"),
        Some(A),
        Some(event("sneak", 1000)),
    )
    .await;
    assert_eq!(status, 403, "team A cannot write into team B");

    // The namespace-less OpenMeter routes act on the token's first namespace.
    let (status, body, _) = call(
        &http,
        M::POST,
        format!("{base}/events"),
        Some(A),
        Some(event("a1", 7)),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let (status, body, _) = call(
        &http,
        M::POST,
        format!("{base}/namespaces/team-b/events"),
        Some(B),
        Some(event("b1", 100)),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let (status, body, _) = call(
        &http,
        M::GET,
        format!("{base}/meters/llm_tokens/query"),
        Some(A),
        None,
    )
    .await;
    assert_eq!(
        (status, total(&body)),
        (200, 7),
        "team A sees only its own: {body}"
    );
    let (_, body, _) = call(
        &http,
        M::GET,
        format!("{base}/meters/llm_tokens/query"),
        Some(B),
        None,
    )
    .await;
    assert_eq!(
        total(&body),
        100,
        "team B's first namespace is team-b: {body}"
    );
    let (status, body, _) = call(
        &http,
        M::GET,
        format!("{base}/namespaces/team-a/meters/llm_tokens/query"),
        Some(B),
        None,
    )
    .await;
    assert_eq!(
        (status, total(&body)),
        (200, 7),
        "B is granted team-a too: {body}"
    );
    let (status, body, _) =
        call(&http, M::GET, format!("{base}/dead-letters"), Some(A), None).await;
    assert_eq!(
        status, 200,
        "dead letters of its own namespace only: {body}"
    );

    // With tokens the document asks for one on every API route (401/403 documented as
    // problems) and on no operational one.
    let doc: serde_json::Value = http
        .get(format!("http://{}/api/v1/openapi.json", server.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        doc["security"][0]["bearer"],
        serde_json::json!([]),
        "{}",
        doc["security"]
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for path in [
        "/api/v1/meters/{slug}/query",
        "/api/v1/namespaces/{namespace}/meters/{slug}/query",
    ] {
        let responses = &doc["paths"][path]["get"]["responses"];
        for status in ["401", "403"] {
            assert!(
                responses[status]["content"]["application/problem+json"].is_object(),
                "{path} documents {status}: {responses}"
            );
        }
    }
    assert_eq!(
        doc["paths"]["/healthz"]["get"]["security"],
        serde_json::json!([])
    );

    // Health, metrics and the API description stay open.
    for path in ["/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"] {
        let r = http
            .get(format!("http://{}{path}", server.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }

    // The agent sends its token file's token: its usage lands in team-a, exactly.
    let token_file = dir.path().join("agent-token");
    std::fs::write(&token_file, format!("{A}\n")).unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let sink = format!(
        "ingest: {{url: 'http://{}', tokenFile: '{}'}}",
        server.addr,
        token_file.display()
    );
    let config = dir.path().join("agent.yaml");
    let metrics = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &config,
        log_agent_config(&sink, &dir.path().join("spool"), &metrics, &logs),
    )
    .unwrap();
    let mut expected = std::collections::BTreeMap::new();
    write_usage_lines(&logs.join("app.log"), 0, 120, &mut expected);
    let mut agent = Proc::start(
        bin("tally-agent"),
        &["--config", config.to_str().unwrap()],
        &[],
        dir.path().join("agent.log"),
    );
    let authed = reqwest::Client::builder()
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {A}").parse().unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .unwrap();
    let got = eventually(
        Duration::from_secs(30),
        Duration::from_millis(250),
        "the agent's usage, sent with its token",
        async || {
            subject_totals(&authed, &server.addr, "team-a", "agent_tokens")
                .await
                .filter(|t| *t == expected)
        },
    )
    .await;
    assert_eq!(got, expected);
    assert!(agent.terminate(), "{}", agent.log());

    // A token added to the file, by its SHA-256 only, works once the server re-reads
    // it; no restart.
    std::fs::write(
        &tokens_file,
        tokens(&format!(
            "- {{name: later, tokenSha256: {}, namespaces: [team-b]}}\n",
            tally_server::api::auth::digest(C)
        )),
    )
    .unwrap();
    eventually(
        Duration::from_secs(15),
        Duration::from_millis(250),
        "the new token to be accepted",
        async || {
            let (status, _, _) = call(&http, M::GET, format!("{base}/meters"), Some(C), None).await;
            (status == 200).then_some(())
        },
    )
    .await;
    // An invalid file keeps the tokens in force.
    std::fs::write(&tokens_file, "tokens: [{token: short, namespaces: []}]\n").unwrap();
    // first the fact that the server re-read the file and refused it, then "unchanged"
    let rejected = r#"tally_reloads_total{what="tokens",outcome="rejected"}"#;
    eventually(
        Duration::from_secs(15),
        Duration::from_millis(250),
        "the server to refuse the invalid tokens file",
        async || {
            let text = http
                .get(format!("http://{}/metrics", server.addr))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.lines()
                .any(|l| l.starts_with(rejected) && !l.ends_with(" 0"))
                .then_some(())
        },
    )
    .await;
    let (status, _, _) = call(&http, M::GET, format!("{base}/meters"), Some(C), None).await;
    assert_eq!(
        status, 200,
        "an invalid tokens file does not lock anyone out"
    );
}
