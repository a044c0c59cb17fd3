//! The agent re-reads its configuration when the file changes: a new collector starts,
//! and an invalid file is refused while the running configuration keeps working.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tally_tests::{Proc, bin, free_port, log_agent_config, wait_for, write_usage_lines};

const METER: &str = "apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: tokens, namespace: team-a}
spec: {eventType: llm-tokens, aggregation: SUM, valueProperty: $.tokens}
";

async fn total(client: &reqwest::Client, addr: &str) -> u64 {
    let url = format!("http://{addr}/api/v1/namespaces/team-a/meters/tokens/query");
    let Ok(resp) = client.get(url).send().await else {
        return 0;
    };
    let body: Value = resp.json().await.unwrap_or_default();
    body["data"][0]["value"].as_f64().unwrap_or(0.0) as u64
}

async fn until_total(client: &reqwest::Client, addr: &str, want: u64, agent: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while total(client, addr).await != want {
        assert!(
            Instant::now() < deadline,
            "total never reached {want}:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_configuration_is_applied_and_an_invalid_one_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (first, second, manifests) = (root.join("first"), root.join("second"), root.join("m"));
    for d in [&first, &second, &manifests] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(manifests.join("meter.yaml"), METER).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let _server = Proc::start(
        bin("tally-server"),
        &[
            "--listen",
            &addr,
            "--data",
            root.join("data").to_str().unwrap(),
            "--manifests",
            manifests.to_str().unwrap(),
        ],
        &[("RUST_LOG", "warn")],
        root.join("server.log"),
    );
    wait_for(Duration::from_secs(30), "tally-server", || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    let sink = format!("ingest: {{url: 'http://{addr}'}}");
    let metrics = format!("127.0.0.1:{}", free_port());
    let config = root.join("agent.yaml");
    let spool = root.join("spool");
    std::fs::write(&config, log_agent_config(&sink, &spool, &metrics, &first)).unwrap();
    let agent = Proc::start(
        bin("tally-agent"),
        &["--config", config.to_str().unwrap()],
        &[],
        root.join("agent.log"),
    );
    let client = reqwest::Client::new();
    let mut expected = BTreeMap::new();
    write_usage_lines(&first.join("a.log"), 0, 30, &mut expected);
    let sum = |e: &BTreeMap<String, u64>| e.values().sum::<u64>();
    until_total(&client, &addr, sum(&expected), &agent).await;

    // Point the collector at another folder: lines there count, the old folder no longer.
    std::fs::write(&config, log_agent_config(&sink, &spool, &metrics, &second)).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    write_usage_lines(&second.join("b.log"), 100, 130, &mut expected);
    until_total(&client, &addr, sum(&expected), &agent).await;

    // An invalid file is refused; the running configuration keeps going.
    std::fs::write(&config, "sink: {}\ncollectors: nope\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    write_usage_lines(&second.join("b.log"), 200, 210, &mut expected);
    until_total(&client, &addr, sum(&expected), &agent).await;
    assert!(
        agent.log().contains("New configuration is invalid"),
        "{}",
        agent.log()
    );
}
