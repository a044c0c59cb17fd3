//! The agent binary scraping a counter, SIGKILLed between scrapes and restarted: the
//! total shipped is exactly the counter's growth since the first scrape (the baseline),
//! with nothing lost or counted twice across the restart and a counter reset.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use tally_tests::{
    Proc, Standalone, await_subject_totals, bin, free_port, subject_totals, wait_for,
};

const METER: &str = "apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: tokens, namespace: team-a}
spec: {eventType: vllm-tokens, aggregation: SUM, valueProperty: $.value}
";

/// The exporter: the counter grows by 7 per scrape while `growing`; `served` records
/// every value handed out. A reset restarts the counter at 0 (a process restart).
#[derive(Default)]
struct Exporter {
    value: u64,
    growing: bool,
    served: Vec<u64>,
}

async fn metrics(State(e): State<Arc<Mutex<Exporter>>>) -> String {
    let mut e = e.lock().unwrap();
    if e.growing {
        e.value += 7;
    }
    let v = e.value;
    e.served.push(v);
    format!(
        "# TYPE vllm_generation_tokens_total counter\nvllm_generation_tokens_total{{tenant=\"acme\"}} {v}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn counter_increases_are_exact_across_an_agent_sigkill_and_a_reset() {
    let exporter = Arc::new(Mutex::new(Exporter {
        value: 1000,
        growing: true,
        served: Vec::new(),
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}/metrics", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(exporter.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let server = Standalone::with_meter(root, METER);
    let addr = &server.addr;
    let config = root.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "sink:\n  ingest: {{url: 'http://{addr}'}}\nspool: {{path: '{}'}}\nmetricsListen: '127.0.0.1:{}'\ncollectors:\n- namespace: team-a\n  name: vllm\n  spec:\n    eventType: vllm-tokens\n    prometheus:\n      targets: ['{target}']\n      intervalSecs: 1\n      subjectLabel: tenant\n      metrics: [{{name: vllm_generation_tokens_total, kind: counter}}]\n",
            root.join("spool").display(),
            free_port()
        ),
    )
    .unwrap();
    let mut agent = Proc::start(
        bin("tally-agent"),
        &["--config", config.to_str().unwrap()],
        &[],
        root.join("agent.log"),
    );
    let scrapes = |n: usize| {
        let e = exporter.clone();
        move || e.lock().unwrap().served.len() >= n
    };
    wait_for(Duration::from_secs(30), "4 scrapes", scrapes(4));
    agent.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.spawn();
    wait_for(Duration::from_secs(30), "8 scrapes", scrapes(8));
    // The exporter restarts: its counter starts again from 0.
    exporter.lock().unwrap().value = 0;
    wait_for(Duration::from_secs(30), "11 scrapes", scrapes(11));
    exporter.lock().unwrap().growing = false;
    let served = exporter.lock().unwrap().served.clone();
    // Growth seen by the agent: from the first value (baseline) to the reset, then
    // everything after the reset. The scrape that the SIGKILL interrupted before its
    // commit is simply redone from the checkpoint.
    let reset_at = served.windows(2).position(|w| w[1] < w[0]).unwrap() + 1;
    let growth = (served[reset_at - 1] - served[0]) + exporter.lock().unwrap().value;
    let expected = BTreeMap::from([("acme".to_string(), growth)]);
    let client = reqwest::Client::new();
    let query = ("team-a", "tokens");
    let got = await_subject_totals(&client, addr, query, &expected, Duration::from_secs(30)).await;
    assert_eq!(
        got.as_ref(),
        Some(&expected),
        "served {served:?}\n{}",
        agent.log()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        subject_totals(&client, addr, query.0, query.1)
            .await
            .as_ref(),
        Some(&expected),
        "nothing counted twice"
    );
}

/// A DCGM-like exporter: `DCGM_FI_PROF_GR_ENGINE_ACTIVE` of two pods' GPUs, each
/// sample stamped with the exporter's own clock (ms), its values and times logged;
/// request `fail_at` is answered 500 (a missed scrape); after `stop_after` requests
/// the series are gone (the pods ended).
struct Dcgm {
    requests: usize,
    fail_at: usize,
    stop_after: usize,
    /// (series subject, time ms, value) of every sample served.
    log: Vec<(&'static str, i64, f64)>,
}

async fn dcgm(State(e): State<Arc<Mutex<Dcgm>>>) -> (axum::http::StatusCode, String) {
    let mut e = e.lock().unwrap();
    e.requests += 1;
    let n = e.requests;
    if n == e.fail_at {
        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, String::new());
    }
    if n > e.stop_after {
        return (
            axum::http::StatusCode::OK,
            "# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge\n".into(),
        );
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut body = String::from("# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge\n");
    for (i, (subject, pod)) in [("acme", "train-1"), ("globex", "infer-2")]
        .into_iter()
        .enumerate()
    {
        let v = ((n * 37 + i * 11) % 100) as f64 / 100.0;
        e.log.push((subject, t, v));
        body.push_str(&format!(
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu=\"{i}\",customer=\"{subject}\",pod=\"{pod}\",namespace=\"team-a\"}} {v} {t}\n"
        ));
    }
    (axum::http::StatusCode::OK, body)
}

/// The rule, computed here from the exporter's log alone: a sample's value holds
/// until the next sample; samples further apart than `gap_ms` are a gap; split at
/// `window_ms` edges. (window start, subject) → value × seconds.
fn expected_integrals(
    log: &[(&'static str, i64, f64)],
    gap_ms: i64,
    window_ms: i64,
) -> BTreeMap<(i64, String), f64> {
    let mut out: BTreeMap<(i64, String), f64> = BTreeMap::new();
    for subject in ["acme", "globex"] {
        let samples: Vec<(i64, f64)> = log
            .iter()
            .filter(|(s, _, _)| *s == subject)
            .map(|(_, t, v)| (*t, *v))
            .collect();
        for pair in samples.windows(2) {
            let ((t0, v0), (t1, _)) = (pair[0], pair[1]);
            if t1 - t0 > gap_ms {
                continue;
            }
            let mut a = t0;
            while a < t1 {
                let w = a.div_euclid(window_ms) * window_ms;
                let b = t1.min(w + window_ms);
                *out.entry((w, subject.to_string())).or_default() += v0 * (b - a) as f64 / 1000.0;
                a = b;
            }
        }
    }
    out
}

/// `gaugeIntegral` over a DCGM-style ratio gauge: the busy-GPU-seconds per window and
/// subject that the agent ships equal those computed from the exporter's own log of
/// sample times and values, within 1e-9, with a missed scrape counted as a gap.
#[tokio::test(flavor = "multi_thread")]
async fn a_gauge_integral_equals_the_one_computed_from_the_exporters_log() {
    let exporter = Arc::new(Mutex::new(Dcgm {
        requests: 0,
        fail_at: 6,
        stop_after: 14,
        log: Vec::new(),
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}/metrics", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/metrics", get(dcgm))
        .with_state(exporter.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let meter = "apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: gpu-busy-seconds, namespace: team-a}
spec: {eventType: dcgm, aggregation: SUM, valueProperty: $.value}
";
    let server = Standalone::with_meter(root, meter);
    let addr = &server.addr;
    let config = root.join("agent.yaml");
    // interval 1 s, timeout 300 ms: the gap limit is 1.5 s + 0.3 s
    std::fs::write(
        &config,
        format!(
            "sink:\n  ingest: {{url: 'http://{addr}'}}\nspool: {{path: '{}'}}\nmetricsListen: '127.0.0.1:{}'\ncollectors:\n- namespace: team-a\n  name: dcgm\n  spec:\n    eventType: dcgm\n    prometheus:\n      targets: ['{target}']\n      intervalSecs: 1\n      timeoutMs: 300\n      subjectLabel: customer\n      metrics: [{{name: DCGM_FI_PROF_GR_ENGINE_ACTIVE, kind: gaugeIntegral, windowSecs: 5}}]\n",
            root.join("spool").display(),
            free_port()
        ),
    )
    .unwrap();
    let mut agent = Proc::start(
        bin("tally-agent"),
        &["--config", config.to_str().unwrap()],
        &[],
        root.join("agent.log"),
    );
    let done = {
        let e = exporter.clone();
        move || e.lock().unwrap().requests >= 16
    };
    wait_for(Duration::from_secs(60), "16 scrapes", done);
    let log = exporter.lock().unwrap().log.clone();
    let expected = expected_integrals(&log, 1800, 5000);
    assert!(
        log.windows(4).any(|w| w[2].1 - w[0].1 > 1800),
        "the missed scrape made a gap: {log:?}"
    );
    // The last windows are sent once they end (the series are gone).
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let got = loop {
        let body: serde_json::Value = http
            .get(format!(
                "http://{addr}/api/v1/namespaces/team-a/events?limit=1000"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut got: BTreeMap<(i64, String), f64> = BTreeMap::new();
        for item in body.as_array().unwrap() {
            let e = &item["event"];
            let t = chrono::DateTime::parse_from_rfc3339(e["time"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            *got.entry((t, e["subject"].as_str().unwrap().to_string()))
                .or_default() += e["data"]["value"].as_f64().unwrap();
        }
        let matches = got.len() == expected.len()
            && got
                .iter()
                .zip(&expected)
                .all(|((gk, gv), (ek, ev))| gk == ek && (gv - ev).abs() < 1e-9);
        if matches || std::time::Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "windows; agent log:\n{}",
        agent.log()
    );
    for (k, v) in &expected {
        assert!(
            (got[k] - v).abs() < 1e-9,
            "{k:?}: got {} expected {v}",
            got[k]
        );
    }
    let totals = subject_totals(&http, addr, "team-a", "gpu_busy_seconds").await;
    assert!(
        totals.is_some_and(|t| t.len() == 2),
        "the meter answers per subject"
    );
    eprintln!("busy-GPU-seconds per window and subject: {got:?}");
    assert!(agent.terminate(), "graceful shutdown:\n{}", agent.log());
}
