//! The agent binary shipping to the standalone server: SIGKILLed mid-stream and
//! restarted, with a 30-second ingest outage (and a log rotation inside it), the query
//! API still reports exact totals.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tally_tests::{Proc, bin, free_port, log_agent_config, wait_for, write_usage_lines};

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

async fn totals(client: &reqwest::Client, addr: &str) -> Option<BTreeMap<String, u64>> {
    let url =
        format!("http://{addr}/api/v1/namespaces/team-a/meters/llm_tokens/query?groupBy=subject");
    let body: Value = client.get(url).send().await.ok()?.json().await.ok()?;
    Some(
        body["data"]
            .as_array()?
            .iter()
            .map(|row| {
                (
                    row["subject"].as_str().unwrap_or_default().to_string(),
                    row["value"].as_f64().unwrap_or_default() as u64,
                )
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_survives_sigkill_and_a_30s_ingest_outage_with_exact_totals() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let manifests = root.join("manifests");
    let logs = root.join("logs");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(manifests.join("meter.yaml"), METER).unwrap();

    let addr = format!("127.0.0.1:{}", free_port());
    let data = root.join("data");
    let server_args = [
        "--listen",
        addr.as_str(),
        "--data",
        data.to_str().unwrap(),
        "--manifests",
        manifests.to_str().unwrap(),
    ];
    let mut server = Proc::start(
        bin("tally-server"),
        &server_args,
        &[("RUST_LOG", "warn")],
        root.join("server.log"),
    );
    let up = |a: &str| std::net::TcpStream::connect(a).is_ok();
    wait_for(Duration::from_secs(30), "tally-server to listen", || {
        up(&addr)
    });

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
        up(&metrics)
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
    server.spawn();
    wait_for(
        Duration::from_secs(30),
        "tally-server to listen again",
        || up(&addr),
    );
    write_usage_lines(&file, 1600, 2000, &mut expected);

    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut got = None;
    while Instant::now() < deadline {
        got = totals(&client, &addr).await;
        if got.as_ref() == Some(&expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        got.as_ref(),
        Some(&expected),
        "totals differ.\nagent log:\n{}",
        agent.log()
    );
    // Nothing more arrives later (no double count from re-sent batches).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(totals(&client, &addr).await.as_ref(), Some(&expected));

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
