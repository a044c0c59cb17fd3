//! The standalone server over HTTP: problems, dedup, backfill, durability.
mod common;

use common::*;
use serde_json::json;

const TOKENS: &str = "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: tokens}\nspec: {eventType: llm, aggregation: SUM, valueProperty: $.tokens, groupBy: {model: $.model}}\n";

async fn total(c: &reqwest::Client, s: &Server, slug: &str) -> serde_json::Value {
    let (status, body) = get_json(
        c,
        &s.url(&format!(
            "/api/v1/meters/{slug}/query?from=2024-01-01T00:00:00Z&to=2025-01-01T00:00:00Z"
        )),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["data"]
        .get(0)
        .map(|r| r["value"].clone())
        .unwrap_or(json!(null))
}

#[tokio::test]
async fn bad_requests_are_rfc7807_problems_naming_the_field() {
    let s = Server::start(&[("m.yaml", TOKENS)], &["--max-body-bytes", "2000"]);
    let c = client();
    let (status, body) = post_events(&c, &s, &json!([event("a", "llm", "acme", "2024-01-01T00:00:00Z", json!({})), {"specversion": "1.0", "id": "b", "source": "s", "type": "llm", "subject": "x", "time": "soon", "data": [1]}])).await;
    assert_eq!(status, 400);
    assert_eq!(body["status"], 400);
    assert_eq!(
        body["errors"],
        json!([{"index": 1, "field": "time", "message": body["errors"][0]["message"]}, {"index": 1, "field": "data", "message": "must be a JSON object, got an array"}])
    );
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("nothing was stored")
    );
    // all-or-nothing: the valid event of the rejected request was not stored
    assert_eq!(total(&c, &s, "tokens").await, json!(null));

    let long = format!("[{}]", " ".repeat(3000));
    for (content_type, body, status) in [
        ("text/plain", "{}", 415),
        ("application/json", long.as_str(), 413),
        ("application/json", "{nope", 400),
        ("application/cloudevents+json", "[]", 400),
        ("application/cloudevents-batch+json", "{}", 400),
    ] {
        let res = c
            .post(s.url("/api/v1/events"))
            .header("content-type", content_type)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{content_type} {body:.20}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }

    let (status, body) = get_json(&c, &s.url("/api/v1/meters/unknown/query")).await;
    assert_eq!(
        (status, body["title"].as_str()),
        (404, Some("Meter not found"))
    );
    let (status, _) = get_json(&c, &s.url("/api/v1/namespaces/other/meters/tokens")).await;
    assert_eq!(
        status, 404,
        "a meter of namespace default is not served in namespace other"
    );
    for (query, parameter) in [
        ("from=yesterday", "from"),
        ("windowSize=WEEK", "windowSize"),
        ("windowTimeZone=Mars/Olympus", "windowTimeZone"),
        ("groupBy=region", "groupBy"),
        ("filterGroupBy[region]=eu", "filterGroupBy[region]"),
        ("frm=2024-01-01T00:00:00Z", "frm"),
        ("from=2024-02-01T00:00:00Z&to=2024-01-01T00:00:00Z", "from"),
    ] {
        let (status, body) =
            get_json(&c, &s.url(&format!("/api/v1/meters/tokens/query?{query}"))).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(body["errors"][0]["parameter"], parameter, "{query}: {body}");
    }
    let (status, body) = get_json(&c, &s.url("/api/v1/events?limit=0")).await;
    assert_eq!(
        (status, body["errors"][0]["parameter"].as_str()),
        (400, Some("limit"))
    );
}

#[tokio::test]
async fn duplicates_count_once_also_across_a_restart() {
    let mut s = Server::start(&[("m.yaml", TOKENS)], &[]);
    let c = client();
    let e = event(
        "dup-1",
        "llm",
        "acme",
        "2024-03-01T10:00:00Z",
        json!({"tokens": 10, "model": "m"}),
    );
    assert_eq!(post_events(&c, &s, &json!([e, e])).await.0, 204);
    assert_eq!(post_events(&c, &s, &e).await.0, 204);
    assert_eq!(total(&c, &s, "tokens").await, json!(10));
    s.restart();
    assert_eq!(post_events(&c, &s, &e).await.0, 204);
    // same id from another source is another event
    let mut other = e.clone();
    other["source"] = json!("elsewhere");
    assert_eq!(post_events(&c, &s, &other).await.0, 204);
    assert_eq!(total(&c, &s, "tokens").await, json!(20));
    let metrics = get_text(&c, &s.url("/metrics")).await;
    assert!(
        metrics.contains("tally_events_deduplicated_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_acknowledged_event_survives_kill_9() {
    let mut s = Server::start(&[("m.yaml", TOKENS)], &[]);
    let c = client();
    let batch: Vec<_> = (0..500)
        .map(|i| {
            event(
                &format!("k{i}"),
                "llm",
                "acme",
                "2024-03-01T10:00:00Z",
                json!({"tokens": 2, "model": "m"}),
            )
        })
        .collect();
    assert_eq!(post_events(&c, &s, &json!(batch)).await.0, 204);
    s.kill9_and_restart();
    assert_eq!(total(&c, &s, "tokens").await, json!(1000));
}

#[tokio::test]
async fn a_meter_added_after_its_events_counts_them_and_reloads_follow_the_rules() {
    let s = Server::start(&[("m.yaml", TOKENS)], &[]);
    let c = client();
    let events: Vec<_> = (0..20)
        .map(|i| {
            event(
                &format!("r{i}"),
                "api",
                if i % 2 == 0 { "acme" } else { "globex" },
                "2024-03-01T10:00:00Z",
                json!({"route": format!("/r{}", i % 3)}),
            )
        })
        .collect();
    assert_eq!(post_events(&c, &s, &json!(events)).await.0, 204);
    let requests = "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: requests}\nspec: {eventType: api, aggregation: COUNT}\n";
    std::fs::write(s.manifests.join("requests.yaml"), requests).unwrap();
    eventually(async || get_json(&c, &s.url("/api/v1/meters/requests")).await.0 == 200).await;
    assert_eq!(total(&c, &s, "requests").await, json!(20));
    // new events keep counting, exactly once
    assert_eq!(
        post_events(
            &c,
            &s,
            &event("r20", "api", "acme", "2024-03-01T10:05:00Z", json!({}))
        )
        .await
        .0,
        204
    );
    assert_eq!(total(&c, &s, "requests").await, json!(21));

    // a changed groupBy is applied (rollup rebuilt); a changed aggregation is rejected
    std::fs::write(
        s.manifests.join("requests.yaml"),
        requests.replace("COUNT}", "COUNT, groupBy: {route: $.route}}"),
    )
    .unwrap();
    eventually(async || {
        get_json(&c, &s.url("/api/v1/meters/requests")).await.1["groupBy"]["route"] == "$.route"
    })
    .await;
    let (_, body) = get_json(&c, &s.url("/api/v1/meters/requests/query?from=2024-01-01T00:00:00Z&to=2025-01-01T00:00:00Z&groupBy=route")).await;
    let values: Vec<_> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["groupBy"]["route"].clone(), r["value"].clone()))
        .collect();
    assert_eq!(
        values,
        vec![
            (json!(null), json!(1)),
            (json!("/r0"), json!(7)),
            (json!("/r1"), json!(7)),
            (json!("/r2"), json!(6))
        ]
    );
    std::fs::write(
        s.manifests.join("requests.yaml"),
        requests.replace("COUNT}", "MAX, valueProperty: $.n}"),
    )
    .unwrap();
    // the reload must have happened (and refused the change) before "unchanged" means anything
    let rejected = r#"tally_reloads_total{what="meters",outcome="rejected"}"#;
    eventually(async || metric(&c, &s, rejected).await >= 1.0).await;
    let (_, m) = get_json(&c, &s.url("/api/v1/meters/requests")).await;
    assert_eq!(
        m["aggregation"], "COUNT",
        "an immutable change keeps the old definition"
    );
    assert_eq!(total(&c, &s, "requests").await, json!(21));

    // a removed meter stops being served; its events stay and count again when re-added
    std::fs::remove_file(s.manifests.join("requests.yaml")).unwrap();
    eventually(async || get_json(&c, &s.url("/api/v1/meters/requests")).await.0 == 404).await;
    std::fs::write(s.manifests.join("again.yaml"), requests).unwrap();
    eventually(async || get_json(&c, &s.url("/api/v1/meters/requests")).await.0 == 200).await;
    assert_eq!(total(&c, &s, "requests").await, json!(21));
}

#[tokio::test]
async fn per_meter_validation_errors_are_listed_and_do_not_block_other_meters() {
    let count = "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: calls}\nspec: {eventType: llm, aggregation: COUNT}\n";
    let s = Server::start(&[("m.yaml", TOKENS), ("c.yaml", count)], &[]);
    let c = client();
    let e = event(
        "v1",
        "llm",
        "acme",
        "2024-03-01T10:00:00Z",
        json!({"tokens": "many", "model": "m"}),
    );
    assert_eq!(post_events(&c, &s, &e).await.0, 204);
    assert_eq!(total(&c, &s, "calls").await, json!(1));
    assert_eq!(total(&c, &s, "tokens").await, json!(null));
    let (_, events) = get_json(&c, &s.url("/api/v1/events?limit=5")).await;
    assert_eq!(events[0]["event"]["id"], "v1");
    assert_eq!(events[0]["validationErrors"][0]["meter"], "tokens");
    assert!(
        events[0]["validationError"]
            .as_str()
            .unwrap()
            .contains("expected a finite number")
    );
}

#[tokio::test]
async fn namespaces_are_isolated() {
    let other = "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: tokens, namespace: team-b}\nspec: {eventType: llm, aggregation: SUM, valueProperty: $.tokens}\n";
    let s = Server::start(&[("m.yaml", TOKENS), ("b.yaml", other)], &[]);
    let c = client();
    let e = event(
        "same-id",
        "llm",
        "acme",
        "2024-03-01T10:00:00Z",
        json!({"tokens": 5}),
    );
    assert_eq!(post_events(&c, &s, &e).await.0, 204);
    let res = c
        .post(s.url("/api/v1/namespaces/team-b/events"))
        .header("content-type", "application/cloudevents+json")
        .body(json!(e).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(total(&c, &s, "tokens").await, json!(5));
    let (_, b) = get_json(&c, &s.url("/api/v1/namespaces/team-b/meters/tokens/query?from=2024-01-01T00:00:00Z&to=2025-01-01T00:00:00Z")).await;
    assert_eq!(b["data"][0]["value"], json!(5));
    let (status, _) = get_json(&c, &s.url("/api/v1/namespaces/Bad_NS/meters")).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn openapi_health_and_metrics_are_served() {
    let s = Server::start(&[("m.yaml", TOKENS)], &[]);
    let c = client();
    let (status, doc) = get_json(&c, &s.url("/api/v1/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc["paths"]["/api/v1/meters/{slug}/query"]["get"].is_object());
    // without tokens nothing asks for one: no requirement, no API token scheme, no
    // 401; the portal route alone keeps its own token
    assert!(doc.get("security").is_none(), "{}", doc["security"]);
    let schemes: Vec<&String> = doc["components"]["securitySchemes"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    assert_eq!(
        schemes,
        ["portal"],
        "{}",
        doc["components"]["securitySchemes"]
    );
    let portal = &doc["paths"]["/api/v1/portal/meters/{slug}/query"]["get"];
    assert_eq!(
        portal["security"],
        serde_json::json!([{"portal": []}]),
        "{portal}"
    );
    assert!(
        doc["paths"]
            .get("/api/v1/namespaces/{namespace}/portal/meters/{slug}/query")
            .is_none(),
        "the portal route is served once, outside the namespaces"
    );
    let query = &doc["paths"]["/api/v1/meters/{slug}/query"]["get"]["responses"];
    assert!(query.get("401").is_none(), "{query}");
    assert!(
        query["400"]["content"]["application/problem+json"].is_object(),
        "problems are documented as application/problem+json: {query}"
    );
    assert_every_route_is_documented(&doc);
    // `{}` is no event: the CloudEvent schema requires what the server requires
    let event = &doc["components"]["schemas"]["CloudEvent"];
    let mut required: Vec<&str> = event["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    required.sort();
    assert_eq!(
        required,
        ["id", "source", "specversion", "subject", "type"],
        "{event}"
    );
    assert_eq!(event["propertyNames"]["pattern"], "^[a-z0-9]{1,20}$");
    assert_eq!(event["properties"]["type"]["maxLength"], 256, "{event}");
    let params = doc["paths"]["/api/v1/meters/{slug}/query"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let from = params.iter().find(|p| p["name"] == "from").unwrap();
    assert_eq!(from["schema"]["format"], "date-time", "{from}");
    assert_eq!(c.get(s.url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(s.url("/readyz")).send().await.unwrap().status(), 200);
    let metrics = get_text(&c, &s.url("/metrics")).await;
    assert!(
        metrics.contains("tally_http_request_duration_seconds"),
        "{metrics}"
    );
}

/// Every route the router serves (read from `server/src/api/mod.rs`, the API's under
/// both the plain and the namespaced prefix) is a path of the document, and no error
/// answer in the document is plain `application/json`.
pub fn assert_every_route_is_documented(doc: &serde_json::Value) {
    let src = std::fs::read_to_string(repo().join("server/src/api/mod.rs")).unwrap();
    let router = &src[src.find("pub fn router(").expect("the router")..];
    let router = &router[..router.find("\n}\n").expect("its end")];
    let prefixes: Vec<&str> = [
        "\"/api/v1\", api",
        "\"/api/v1/namespaces/{namespace}\", api",
    ]
    .into_iter()
    .filter(|n| router.contains(n))
    .map(|n| n.split('"').nth(1).unwrap())
    .collect();
    assert_eq!(prefixes.len(), 2, "the API is nested under two prefixes");
    // the API's routes come before its auth layer; the open ones after
    let api_end = router.find(".route_layer(").expect("the API's auth layer");
    let mut served = Vec::new();
    for (i, _) in router.match_indices(".route(") {
        let rest = router[i + ".route(".len()..]
            .trim_start()
            .trim_start_matches('"');
        let path = rest[..rest.find('"').unwrap()].to_string();
        if i < api_end {
            served.extend(prefixes.iter().map(|p| format!("{p}{path}")));
        } else {
            served.push(path);
        }
    }
    assert!(
        served.len() >= 16,
        "routes read from the router: {served:?}"
    );
    let paths = doc["paths"].as_object().unwrap();
    for path in &served {
        assert!(
            paths.contains_key(path),
            "{path} is served but not in the OpenAPI document"
        );
    }
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            for (status, resp) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    assert!(
                        resp["content"].get("application/json").is_none(),
                        "{method} {path} {status} is documented as application/json"
                    );
                }
            }
        }
    }
}

/// `POST /watermarks` refuses invalid records naming index and field (and records
/// nothing of the request); `GET .../completeness` names a bad parameter, and answers
/// from what was recorded.
#[tokio::test]
async fn watermarks_are_validated_and_completeness_answers_over_http() {
    let s = Server::start(&[("m.yaml", TOKENS)], &[]);
    let c = client();
    let good = json!({"collector": "pods", "node": "n1", "source": "tally/default/pods",
        "types": ["llm"], "until": 1_717_200_000_000i64});
    let post = async |body: serde_json::Value| {
        let res = c
            .post(s.url("/api/v1/watermarks"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (
            status,
            res.json::<serde_json::Value>().await.unwrap_or_default(),
        )
    };
    let (status, body) = post(
        json!([good, {"collector": "", "source": "s", "types": [], "until": -1,
        "gaps": [{"from": 5, "to": 5, "reason": "x"}]}, {"until": "soon"}]),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let fields: Vec<(u64, String)> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["field"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            (1, "collector"),
            (1, "types"),
            (1, "until"),
            (1, "gaps[0]"),
            (2, "-")
        ]
        .map(|(i, f)| (i, f.to_string()))
        .to_vec(),
        "{body}"
    );
    let url = |q: &str| s.url(&format!("/api/v1/meters/tokens/completeness{q}"));
    // nothing recorded by the refused request
    let (status, body) = get_json(&c, &url("?to=2024-06-01T00:00:00Z")).await;
    assert_eq!(
        (status, body["status"].clone()),
        (200, json!("unknown")),
        "{body}"
    );
    let (status, _) = post(json!([good])).await;
    assert_eq!(status, 204);
    let (_, body) = get_json(
        &c,
        &url("?from=2024-05-01T00:00:00Z&to=2024-06-01T00:00:00Z"),
    )
    .await;
    assert_eq!(body["status"], "complete", "{body}");
    assert_eq!(body["sources"][0]["node"], "n1");
    let (_, body) = get_json(
        &c,
        &url("?from=2024-05-01T00:00:00Z&to=2024-07-01T00:00:00Z"),
    )
    .await;
    assert_eq!(body["sources"][0]["status"], "behind", "{body}");
    assert_eq!(
        body["sources"][0]["missing"][0]["from"],
        "2024-06-01T00:00:00.000Z"
    );
    for (q, parameter) in [
        ("?to=soon", "to"),
        ("?from=2024-07-01T00:00:00Z&to=2024-06-01T00:00:00Z", "from"),
    ] {
        let (status, body) = get_json(&c, &url(q)).await;
        assert_eq!(status, 400, "{q}: {body}");
        assert_eq!(body["errors"][0]["parameter"], parameter, "{body}");
    }
    let (status, _) = get_json(&c, &s.url("/api/v1/meters/nope/completeness")).await;
    assert_eq!(status, 404);
}

/// The README's completeness answer is the server's: its two sources' watermarks are
/// recorded, and the README's request is answered with exactly the README's JSON.
#[tokio::test]
async fn the_readme_completeness_answer_is_the_servers() {
    let readme =
        std::fs::read_to_string(format!("{}/../README.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let block = readme
        .split("<!-- completeness-answer -->\n```console\n")
        .nth(1)
        .and_then(|r| r.split("```\n<!-- /completeness-answer -->").next())
        .expect("README has the completeness-answer block");
    let (command, answer) = block.split_once('\n').unwrap();
    let url = command
        .strip_prefix("$ curl -s 'http://localhost:8080")
        .and_then(|u| u.strip_suffix('\''))
        .expect("the block starts with the curl command");
    let shown: serde_json::Value = serde_json::from_str(answer).unwrap();
    const GPU: &str = "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: gpu-seconds, namespace: team-a}\nspec: {eventType: pod-runtime, aggregation: SUM, valueProperty: $.gpu_seconds}\n";
    let s = Server::start(&[("gpu.yaml", GPU)], &[]);
    let c = client();
    let ms = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t)
            .unwrap()
            .timestamp_millis()
    };
    let marks = json!([
        {"collector": "gpus", "node": "gpu-node-7", "source": "tally/team-a/gpus", "types": ["pod-runtime"], "until": ms("2026-12-02T04:41:10Z")},
        {"collector": "gpus", "node": "gpu-node-1", "source": "tally/team-a/gpus", "types": ["pod-runtime"], "until": ms("2026-12-02T05:00:20Z")}
    ]);
    let r = c
        .post(s.url("/api/v1/namespaces/team-a/watermarks"))
        .json(&marks)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (status, got) = get_json(&c, &s.url(url)).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got, shown);
}
