//! The exact requests one reconcile makes, against a mocked API (tower-test): the
//! finalizer patch, the status apply (shape, field manager, force) and the Event, and
//! no request at all when nothing changed.
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::reflector;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tally_clickhouse::ChConfig;

use super::*;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn meter(name: &str, value_property: &str, finalizers: &[&str], created: &str) -> Meter {
    serde_json::from_value(json!({
        "apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
        "metadata": {"name": name, "namespace": "acme", "uid": format!("uid-{name}"), "generation": 3,
                     "resourceVersion": "7", "finalizers": finalizers, "creationTimestamp": created},
        "spec": {"eventType": "llm", "aggregation": "SUM", "valueProperty": value_property, "slug": "tokens"},
    }))
    .unwrap()
}

fn context(client: Client, health: Health, others: &[Meter]) -> Arc<Context> {
    let (store, mut writer) = reflector::store::<DeserializeGuard<Meter>>();
    for m in others {
        writer.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(m.clone()))));
    }
    Arc::new(Context {
        client: client.clone(),
        ch: Ch::new(&ChConfig {
            url: "http://127.0.0.1:9".into(),
            database: "tally".into(),
            user: String::new(),
            password: String::new(),
            cluster: None,
            replica_urls: Vec::new(),
        })
        .unwrap(),
        cutover: CutoverConfig::default(),
        health: Arc::new(health),
        metrics: Arc::new(Metrics::default()),
        recorder: Recorder::new(
            client,
            kube::runtime::events::Reporter {
                controller: "tally-operator".into(),
                instance: Some("test".into()),
            },
        ),
        store,
        drain: Duration::from_secs(60),
        resync: Duration::from_secs(300),
        failures: Mutex::new(HashMap::new()),
    })
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, body: &Value) {
    let mut r = Response::new(Body::from(serde_json::to_vec(body).unwrap()));
    *r.status_mut() = StatusCode::OK;
    send.send_response(r);
}

async fn body_json(req: Request<Body>) -> Value {
    use http_body_util::BodyExt;
    let bytes = req.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

async fn run(
    m: Meter,
    health: Health,
    others: &[Meter],
    script: impl AsyncFnOnce(&mut Handle),
) -> Action {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "acme"), health, others);
    let (action, ()) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(5),
            reconcile(Arc::new(DeserializeGuard(Ok(m))), ctx)
        ),
        script(&mut handle)
    );
    action
        .expect("the reconcile finished")
        .expect("the reconcile succeeded")
}

/// Expects the status apply and returns its body; answers with the meter carrying it.
async fn expect_status_apply(h: &mut Handle, m: &Meter) -> Value {
    let (req, send) = h.next_request().await.expect("a status request");
    assert_eq!(req.method(), "PATCH");
    assert_eq!(
        req.uri().path(),
        "/apis/tally.dev/v1alpha1/namespaces/acme/meters/calls/status"
    );
    let query = req.uri().query().unwrap_or_default().to_string();
    assert!(
        query.contains("fieldManager=tally-operator") && query.contains("force=true"),
        "{query}"
    );
    assert_eq!(
        req.headers()["content-type"],
        "application/apply-patch+yaml"
    );
    let body = body_json(req).await;
    let mut answer = serde_json::to_value(m).unwrap();
    answer["status"] = body["status"].clone();
    respond(send, &answer);
    body
}

async fn expect_event(h: &mut Handle, reason: &str) -> Value {
    let (req, send) = h.next_request().await.expect("an Event");
    assert_eq!(req.method(), "POST");
    assert_eq!(
        req.uri().path(),
        "/apis/events.k8s.io/v1/namespaces/acme/events"
    );
    let body = body_json(req).await;
    assert_eq!(body["reason"], reason);
    assert_eq!(body["regarding"]["name"], "calls");
    respond(send, &body);
    body
}

#[tokio::test]
async fn a_new_meter_first_gets_the_finalizer_by_json_patch() {
    let m = meter("calls", "$.tokens", &[], "2026-01-01T00:00:00Z");
    let action = run(m.clone(), Health::healthy(), &[], async |h: &mut Handle| {
        let (req, send) = h.next_request().await.unwrap();
        assert_eq!(req.method(), "PATCH");
        assert_eq!(
            req.uri().path(),
            "/apis/tally.dev/v1alpha1/namespaces/acme/meters/calls"
        );
        assert_eq!(req.headers()["content-type"], "application/json-patch+json");
        let patch = body_json(req).await;
        let ops: Vec<&str> = patch
            .as_array()
            .unwrap()
            .iter()
            .map(|op| op["op"].as_str().unwrap())
            .collect();
        assert!(ops.contains(&"test"), "guarded by a test op: {patch}");
        assert!(patch.to_string().contains(FINALIZER), "{patch}");
        let mut answer = serde_json::to_value(&m).unwrap();
        answer["metadata"]["finalizers"] = json!([FINALIZER]);
        respond(send, &answer);
    })
    .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn an_invalid_meter_gets_ready_false_naming_the_field_and_a_warning_event() {
    let m = meter(
        "calls",
        "$.items[*].tokens",
        &[FINALIZER],
        "2026-01-01T00:00:00Z",
    );
    let mut applied = Value::Null;
    run(m.clone(), Health::healthy(), &[], async |h: &mut Handle| {
        applied = expect_status_apply(h, &m).await;
        expect_event(h, "InvalidSpec").await;
    })
    .await;
    assert_eq!(applied["apiVersion"], "tally.dev/v1alpha1");
    assert_eq!(applied["kind"], "Meter");
    assert_eq!(
        applied.as_object().unwrap().len(),
        3,
        "only apiVersion, kind and status: {applied}"
    );
    let status = &applied["status"];
    assert_eq!(status["observedGeneration"], 3);
    assert_eq!(status["slug"], "tokens");
    let ready = &status["conditions"][0];
    assert_eq!(
        (
            ready["type"].as_str(),
            ready["status"].as_str(),
            ready["reason"].as_str()
        ),
        (Some("Ready"), Some("False"), Some("InvalidSpec"))
    );
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("spec.valueProperty"),
        "{ready}"
    );
    assert_eq!(status["conditions"][1]["type"], "Degraded");
    assert_eq!(status["conditions"][1]["status"], "True");

    // The same meter with that status again: no request at all.
    let mut again = m.clone();
    again.status = Some(serde_json::from_value(status.clone()).unwrap());
    let action = run(again, Health::healthy(), &[], async |_h: &mut Handle| {}).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn an_unreachable_clickhouse_shows_as_a_condition_naming_the_endpoint() {
    let m = meter("calls", "$.tokens", &[FINALIZER], "2026-01-01T00:00:00Z");
    let (health, _rx) = Health::new();
    health.report_clickhouse(Some(
        "ClickHouse at http://127.0.0.1:9 is unavailable: refused".into(),
    ));
    let mut applied = Value::Null;
    let action = run(m.clone(), health, &[], async |h: &mut Handle| {
        applied = expect_status_apply(h, &m).await;
        expect_event(h, "StorageUnavailable").await;
    })
    .await;
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    let ready = &applied["status"]["conditions"][0];
    assert_eq!(ready["reason"], "StorageUnavailable");
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("http://127.0.0.1:9"),
        "{ready}"
    );
}

#[tokio::test]
async fn a_served_meter_stays_ready_and_degraded_while_clickhouse_is_down_and_a_new_leader_waits() {
    let mut m = meter("calls", "$.tokens", &[FINALIZER], "2026-01-01T00:00:00Z");
    m.status = Some(
        serde_json::from_value(json!({"slug": "tokens", "observedGeneration": 3,
        "storage": {"store": "clickhouse", "rollupTable": "rollup_1", "backfilled": true}}))
        .unwrap(),
    );
    // Not checked yet: nothing is written.
    let (unknown, _rx) = Health::new();
    let action = run(m.clone(), unknown, &[], async |_h: &mut Handle| {}).await;
    assert_eq!(action, Action::requeue(Duration::from_millis(500)));
    // Down: Ready stays True, Degraded says why, with a warning Event.
    let (down, _rx) = Health::new();
    down.report_clickhouse(Some(
        "ClickHouse at http://127.0.0.1:9 is unavailable".into(),
    ));
    let mut applied = Value::Null;
    run(m.clone(), down, &[], async |h: &mut Handle| {
        applied = expect_status_apply(h, &m).await;
        expect_event(h, "StorageUnavailable").await;
        expect_event(h, "Provisioned").await;
    })
    .await;
    let conditions = &applied["status"]["conditions"];
    assert_eq!(
        (
            conditions[0]["status"].as_str(),
            conditions[0]["reason"].as_str()
        ),
        (Some("True"), Some("Provisioned"))
    );
    assert_eq!(
        (
            conditions[1]["status"].as_str(),
            conditions[1]["reason"].as_str()
        ),
        (Some("True"), Some("StorageUnavailable"))
    );
}

#[tokio::test]
async fn a_slug_taken_by_an_older_meter_is_a_conflict() {
    let older = meter("first", "$.tokens", &[FINALIZER], "2025-01-01T00:00:00Z");
    let m = meter("calls", "$.tokens", &[FINALIZER], "2026-01-01T00:00:00Z");
    let mut applied = Value::Null;
    run(
        m.clone(),
        Health::healthy(),
        &[older, m.clone()],
        async |h: &mut Handle| {
            applied = expect_status_apply(h, &m).await;
            expect_event(h, "SlugConflict").await;
        },
    )
    .await;
    let msg = applied["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("Meter first") && msg.contains("spec.slug"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_meter_that_does_not_deserialize_is_skipped_without_requests() {
    let guard: DeserializeGuard<Meter> = serde_json::from_value(json!({
        "apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
        "metadata": {"name": "broken", "namespace": "acme"},
        "spec": {"eventType": 7, "aggregation": "SOMETIMES"},
    }))
    .unwrap();
    assert!(guard.0.is_err());
    let (service, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "acme"), Health::healthy(), &[]);
    let action = tokio::time::timeout(
        Duration::from_secs(2),
        reconcile(Arc::new(guard), ctx.clone()),
    )
    .await
    .expect("no request was made")
    .unwrap();
    assert_eq!(action, Action::await_change());
    assert!(ctx.metrics.encode().contains("reason=\"malformed\""));
}
