//! The agent binary shipping to Kafka through the pipeline's producer: SIGKILLed
//! mid-stream and restarted, every line arrives as a valid envelope of the Collector's
//! namespace, and the distinct events add up exactly (re-sent ones carry the same id,
//! which the sink deduplicates).
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use tally_tests::{Proc, bin, free_port, kafka, log_agent_config, wait_for, write_usage_lines};

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_ships_to_kafka_exactly_once_after_dedup() {
    let Some(brokers) = kafka("agent → Kafka") else {
        return;
    };
    let topic = format!("agent-test-{}-{}", std::process::id(), free_port());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(&topic, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let config = root.join("agent.yaml");
    std::fs::write(
        &config,
        log_agent_config(
            &format!("kafka: {{brokers: '{brokers}', topic: '{topic}', batchEvents: 100}}"),
            &root.join("spool"),
            &metrics,
            &logs,
        ),
    )
    .unwrap();
    let mut agent = Proc::start(
        bin("tally-agent"),
        &["--config", config.to_str().unwrap()],
        &[("RUST_LOG", "info")],
        root.join("agent.log"),
    );
    wait_for(Duration::from_secs(30), "the agent's /metrics", || {
        std::net::TcpStream::connect(&metrics).is_ok()
    });
    let file = logs.join("app.log");
    let mut expected = BTreeMap::new();
    write_usage_lines(&file, 0, 300, &mut expected);
    agent.kill9();
    write_usage_lines(&file, 300, 500, &mut expected);
    agent.spawn();
    write_usage_lines(&file, 500, 800, &mut expected);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seen: HashMap<String, (String, u64)> = HashMap::new();
    let mut messages = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.len() < 800 && Instant::now() < deadline {
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = msg.unwrap();
        messages += 1;
        let (ns, event, _) =
            tally_crds::Envelope::decode(msg.payload().unwrap()).expect("a valid envelope");
        assert_eq!(ns, "team-a");
        assert_eq!(event.source, "tally/team-a/app-logs");
        let key = std::str::from_utf8(msg.key().unwrap()).unwrap();
        assert_eq!(key, format!("team-a/{}", event.subject));
        let tokens = event.data.as_ref().unwrap()["tokens"].as_u64().unwrap();
        seen.insert(event.id.clone(), (event.subject.clone(), tokens));
    }
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    for (subject, tokens) in seen.values() {
        *got.entry(subject.clone()).or_default() += tokens;
    }
    assert_eq!(
        seen.len(),
        800,
        "distinct events ({messages} messages)\n{}",
        agent.log()
    );
    assert_eq!(got, expected);
    assert!(agent.terminate(), "graceful shutdown:\n{}", agent.log());
}
