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
