//! The agent binary shipping to the standalone server: SIGKILLed mid-stream and
//! restarted, with a 30-second ingest outage (and a log rotation inside it), the query
//! API still reports exact totals.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tally_tests::{
    Proc, Standalone, await_subject_totals, bin, free_port, log_agent_config, subject_totals,
    wait_for, write_usage_lines,
};

const METER: &str = "apiVersion: tally.dev/v1alpha1
kind: Meter
metadata:
  name: llm-tokens
  namespace: team-a
spec:
  eventType: llm-tokens
  aggregation: SUM
  valueProperty: $.tokens
";

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_survives_sigkill_and_a_30s_ingest_outage_with_exact_totals() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut server = Standalone::with_meter(root, METER);
    let addr = server.addr.clone();

    let metrics = format!("127.0.0.1:{}", free_port());
    let config = root.join("agent.yaml");
    std::fs::write(
        &config,
        log_agent_config(
            &format!("ingest: {{url: 'http://{addr}', batchEvents: 50, timeoutMs: 2000}}"),
            &root.join("spool"),
            &metrics,
            &logs,
        ),
    )
    .unwrap();
    let agent_args = ["--config", config.to_str().unwrap()];
    let mut agent = Proc::start(
        bin("tally-agent"),
        &agent_args,
        &[("RUST_LOG", "info")],
        root.join("agent.log"),
    );
    wait_for(Duration::from_secs(30), "the agent's /metrics", || {
        std::net::TcpStream::connect(&metrics).is_ok()
    });

    let file = logs.join("app.log");
    let mut expected = BTreeMap::new();
    write_usage_lines(&file, 0, 400, &mut expected);
    // SIGKILL while it is reading and shipping, then restart.
    agent.kill9();
    write_usage_lines(&file, 400, 600, &mut expected);
    agent.spawn();
    write_usage_lines(&file, 600, 900, &mut expected);

    // The ingest API goes away for 30 s; the agent keeps reading into its spool, and
    // the log rotates meanwhile.
    server.kill9();
    let outage = Instant::now();
    write_usage_lines(&file, 900, 1200, &mut expected);
    std::fs::rename(&file, logs.join("app.log.1")).unwrap();
    write_usage_lines(&file, 1200, 1500, &mut expected);
    agent.kill9(); // and the agent dies once more during the outage
    agent.spawn();
    write_usage_lines(&file, 1500, 1600, &mut expected);
    let left = Duration::from_secs(30).saturating_sub(outage.elapsed());
    tokio::time::sleep(left).await;
    server.restart();
    write_usage_lines(&file, 1600, 2000, &mut expected);

    let client = reqwest::Client::new();
    let query = ("team-a", "llm_tokens");
    let got = await_subject_totals(&client, &addr, query, &expected, Duration::from_secs(90)).await;
    assert_eq!(
        got.as_ref(),
        Some(&expected),
        "totals differ.\nagent log:\n{}",
        agent.log()
    );
    // Nothing more arrives later (no double count from re-sent batches).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        subject_totals(&client, &addr, query.0, query.1)
            .await
            .as_ref(),
        Some(&expected)
    );

    let m = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("tally_agent_events_sent_total"), "{m}");
    assert!(
        agent.terminate(),
        "graceful shutdown exits 0:\n{}",
        agent.log()
    );
    server.kill9();
}
