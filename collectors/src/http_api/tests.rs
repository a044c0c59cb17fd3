use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use serde_json::Value;
use tally_crds::CollectorSpec;

use super::*;

/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600;

type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

fn fixture(name: &str) -> Value {
    let path = format!(
        "{}/tests/fixtures/openai/{name}.json",
        std::env::var("CARGO_MANIFEST_DIR").unwrap()
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// A fake of the OpenAI usage endpoint: checks the key, pages through the fixtures.
async fn openai_server(seen: Seen) -> String {
    async fn usage(
        State(seen): State<Seen>,
        headers: HeaderMap,
        Query(q): Query<Vec<(String, String)>>,
    ) -> Result<axum::Json<Value>, StatusCode> {
        if headers.get("authorization").and_then(|v| v.to_str().ok())
            != Some("Bearer sk-admin-test")
        {
            return Err(StatusCode::UNAUTHORIZED);
        }
        let page = q.iter().find(|(k, _)| k == "page").map(|(_, v)| v.clone());
        seen.lock().unwrap().push(q);
        Ok(axum::Json(match page.as_deref() {
            None => fixture("completions-page1"),
            Some("page_AAAAAGdGxdEiJdKOAAAAAGcqsYA=") => fixture("completions-page2"),
            Some(_) => return Err(StatusCode::BAD_REQUEST),
        }))
    }
    serve(
        Router::new()
            .route("/v1/organization/usage/completions", get(usage))
            .with_state(seen),
    )
    .await
}

fn poller(yaml: &str, checkpoints: &BTreeMap<String, String>) -> HttpPoller {
    let spec: CollectorSpec =
        serde_yaml::from_str(&format!("eventType: llm-tokens\nhttpApi:\n{yaml}")).unwrap();
    spec.validate().unwrap();
    HttpPoller::new(
        Origin::new("billing", "openai", &spec),
        spec.http_api.clone().unwrap(),
        checkpoints,
    )
    .unwrap()
}

#[tokio::test]
async fn the_openai_preset_maps_closed_buckets_per_group() {
    let seen = Seen::default();
    let url = openai_server(seen.clone()).await;
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), "sk-admin-test\n").unwrap();
    let cfg = format!(
        "  preset: openai\n  url: {url}\n  delaySecs: 0\n  lookbackSecs: 240\n  headers: [{{name: Authorization, prefix: 'Bearer ', valueFromFile: '{}'}}]\n",
        key.path().display()
    );
    let mut p = poller(&cfg, &BTreeMap::new());
    // At 00:04:00 the range is [00:00, 00:04); the fixture's last bucket (00:03–00:04)
    // is closed, and all buckets are in range.
    let now = T0 + 240 + 30;
    assert_eq!(p.next_range(now), Some((T0, T0 + 240)));
    let poll = p.poll(&reqwest::Client::new(), now).await.unwrap();
    assert!(poll.caught_up);
    let events = &poll.output.events;
    assert_eq!(events.len(), 4);
    assert_eq!(events[0].subject, "proj_acme");
    assert_eq!(events[1].subject, "proj_globex");
    let d = events[0].data.as_ref().unwrap();
    assert_eq!(d["input_tokens"], 1200.0);
    assert_eq!(d["output_tokens"], 340.0);
    assert_eq!(d["input_cached_tokens"], 800.0);
    assert_eq!(d["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(d["api_key_id"], "key_acme_prod");
    assert_eq!(events[0].time, "2026-01-01T00:00:00.000Z");
    assert_eq!(events[0].source, "tally/billing/openai");
    assert_eq!(
        poll.output.checkpoints["until"],
        Some((T0 + 240).to_string())
    );
    // complete up to the end of the closed buckets fetched
    assert_eq!(
        poll.output.watermark.as_ref().map(|m| m.until_ms),
        Some((T0 + 240) * 1000)
    );

    let q = seen.lock().unwrap().clone();
    assert_eq!(q.len(), 2, "two pages");
    let has = |k: &str, v: &str| q[0].iter().any(|(a, b)| a == k && b == v);
    assert!(has("start_time", &T0.to_string()) && has("end_time", &(T0 + 240).to_string()));
    assert!(has("bucket_width", "1m") && has("group_by", "project_id") && has("group_by", "model"));

    // Polling the same range again (a new leader without the checkpoint) gives the
    // same ids, which dedup absorbs; a new poll right after has nothing to ask.
    let mut again = poller(&cfg, &BTreeMap::new());
    let ids2: Vec<String> = again
        .poll(&reqwest::Client::new(), now)
        .await
        .unwrap()
        .output
        .events
        .into_iter()
        .map(|e| e.id)
        .collect();
    let ids1: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids1, ids2);
    // ids and sources are stored: see crate::assert_pinned
    crate::assert_pinned(
        "httpApi (openai)",
        events,
        &[
            "tally/billing/openai 5cd36d73a35b5d166020fe4d2ae3cdbc",
            "tally/billing/openai 74f7cae2ef3be19912ba477b37c7766b",
            "tally/billing/openai a37700ce3126922ea2b7e12d1e8741b4",
            "tally/billing/openai ef1ae2474b25105736d226c10797824f",
        ],
    );
    assert!(
        p.poll(&reqwest::Client::new(), now)
            .await
            .unwrap()
            .output
            .events
            .is_empty()
    );
}

#[tokio::test]
async fn open_buckets_are_never_requested_or_emitted() {
    let seen = Seen::default();
    let url = openai_server(seen.clone()).await;
    let cfg = format!(
        "  preset: openai\n  url: {url}\n  delaySecs: 60\n  lookbackSecs: 240\n  headers: [{{name: Authorization, value: 'Bearer sk-admin-test'}}]\n  openai: {{subject: apiKey}}\n"
    );
    let mut p = poller(&cfg, &BTreeMap::new());
    // At 00:04:10 with a 60 s delay only buckets up to 00:03 are trusted: the server's
    // 00:03–00:04 bucket is dropped.
    let poll = p.poll(&reqwest::Client::new(), T0 + 250).await.unwrap();
    let subjects: Vec<&str> = poll
        .output
        .events
        .iter()
        .map(|e| e.subject.as_str())
        .collect();
    assert_eq!(
        subjects,
        vec!["key_acme_prod", "key_globex", "key_acme_dev"]
    );
}

#[tokio::test]
async fn a_missing_secret_and_a_refusal_are_errors_that_keep_the_checkpoint() {
    let url = openai_server(Seen::default()).await;
    let mut p = poller(
        &format!(
            "  preset: openai\n  url: {url}\n  headers: [{{name: Authorization, prefix: 'Bearer ', valueFromEnv: TALLY_TEST_UNSET_KEY}}]\n"
        ),
        &BTreeMap::from([("until".to_string(), T0.to_string())]),
    );
    let err = p
        .poll(&reqwest::Client::new(), T0 + 3600)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TALLY_TEST_UNSET_KEY"), "{err}");
    let mut wrong = poller(
        &format!(
            "  preset: openai\n  url: {url}\n  headers: [{{name: Authorization, value: 'Bearer nope'}}]\n"
        ),
        &BTreeMap::from([("until".to_string(), T0.to_string())]),
    );
    let err = wrong
        .poll(&reqwest::Client::new(), T0 + 3600)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(wrong.next_range(T0 + 3600).map(|r| r.0), Some(T0));
}

#[tokio::test]
async fn a_generic_api_pages_by_cursor_and_maps_by_jsonpath() {
    async fn usage(Query(q): Query<BTreeMap<String, String>>) -> axum::Json<Value> {
        let start: i64 = q["from"].parse().unwrap();
        axum::Json(match q.get("cursor").map(String::as_str) {
            None => serde_json::json!({
                "items": [
                    {"uid": "u-1", "account": {"id": "acme"}, "ts": start, "gb": 1.5, "region": "eu"},
                    {"uid": "u-2", "account": {"id": "globex"}, "ts": "2026-01-01T00:00:30Z", "gb": 2}
                ],
                "meta": {"next": "c2"}
            }),
            Some("c2") => serde_json::json!({
                "items": [{"uid": "u-3", "account": {"id": "acme"}, "ts": start + 10, "gb": 0.5}],
                "meta": {"next": null}
            }),
            Some(_) => serde_json::json!({"items": []}),
        })
    }
    let url = serve(Router::new().route("/usage", get(usage))).await;
    let mut p = poller(
        &format!(
            "  url: '{url}/usage?from={{start}}&to={{end}}'\n  delaySecs: 0\n  lookbackSecs: 60\n  mapping:\n    items: '$.items[*]'\n    id: '$.uid'\n    subject: '$.account.id'\n    time: '$.ts'\n    value: '$.gb'\n    data: {{region: '$.region'}}\n    nextCursor: '$.meta.next'\n    cursorParam: cursor\n"
        ),
        &BTreeMap::new(),
    );
    let poll = p.poll(&reqwest::Client::new(), T0 + 60).await.unwrap();
    let got: Vec<(String, String, Value)> = poll
        .output
        .events
        .iter()
        .map(|e| {
            (
                e.id.clone(),
                e.subject.clone(),
                e.data.as_ref().unwrap()["value"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("u-1".into(), "acme".into(), serde_json::json!(1.5)),
            ("u-2".into(), "globex".into(), serde_json::json!(2)),
            ("u-3".into(), "acme".into(), serde_json::json!(0.5)),
        ]
    );
    assert_eq!(poll.output.events[0].data.as_ref().unwrap()["region"], "eu");
    assert_eq!(poll.output.events[1].time, "2026-01-01T00:00:30.000Z");
}

#[test]
fn a_bad_jsonpath_names_the_field() {
    let spec: CollectorSpec = serde_yaml::from_str(
        "eventType: x\nhttpApi:\n  url: http://a\n  mapping: {items: '$.items[*]', id: '$[', subject: '$.s', time: '$.t'}\n",
    )
    .unwrap();
    let err = HttpPoller::new(
        Origin::new("a", "b", &spec),
        spec.http_api.clone().unwrap(),
        &BTreeMap::new(),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("spec.httpApi.mapping.id"),
        "{err}"
    );
}
