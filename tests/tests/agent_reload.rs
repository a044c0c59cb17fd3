//! The agent re-reads its configuration when the file changes: a new collector starts,
//! and an invalid file is refused while the running configuration keeps working.
use std::collections::BTreeMap;
use std::time::Duration;

use tally_tests::{
    Proc, Standalone, bin, eventually, free_port, log_agent_config, subject_totals,
    write_usage_lines,
};

const METER: &str = "apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: tokens, namespace: team-a}
spec: {eventType: llm-tokens, aggregation: SUM, valueProperty: $.tokens}
";

async fn until_total(client: &reqwest::Client, addr: &str, want: u64, agent: &Proc) {
    let what = format!("the total to reach {want}; agent log:\n{}", agent.log());
    eventually(
        Duration::from_secs(30),
        Duration::from_millis(300),
        &what,
        async || {
            let total = subject_totals(client, addr, "team-a", "tokens")
                .await
                .map_or(0, |t| t.values().sum::<u64>());
            (total == want).then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_configuration_is_applied_and_an_invalid_one_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (first, second) = (root.join("first"), root.join("second"));
    for d in [&first, &second] {
        std::fs::create_dir_all(d).unwrap();
    }
    let server = Standalone::with_meter(root, METER);
    let addr = &server.addr;
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
    until_total(&client, addr, sum(&expected), &agent).await;

    // Point the collector at another folder: lines there count, the old folder no longer.
    std::fs::write(&config, log_agent_config(&sink, &spool, &metrics, &second)).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    write_usage_lines(&second.join("b.log"), 100, 130, &mut expected);
    until_total(&client, addr, sum(&expected), &agent).await;

    // An invalid file is refused; the running configuration keeps going.
    std::fs::write(&config, "sink: {}\ncollectors: nope\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    write_usage_lines(&second.join("b.log"), 200, 210, &mut expected);
    until_total(&client, addr, sum(&expected), &agent).await;
    assert!(
        agent.log().contains("New configuration is invalid"),
        "{}",
        agent.log()
    );
}
