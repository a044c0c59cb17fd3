//! The one Kafka producer of usage events (the server's ingest API and `tally-agent`
//! use it; the agent links only this crate and `tally-crds`), the
//! topic set-up, and the settings the sink consumes with.
//!
//! - Idempotent producer, `acks=all`, lz4, with a bounded delivery timeout: a request is
//!   answered 2xx only after Kafka acknowledged every one of its events, and 503 (never a
//!   hang) when Kafka does not acknowledge within `message.timeout.ms`. Events of a failed
//!   request may still have been written; the client's retry is deduplicated by the sink
//!   by (namespace, source, id).
//! - Key `<namespace>/<subject>` ([`tally_crds::envelope::message_key`]), so one
//!   customer's events share a partition. **Changing the partition count moves keys to
//!   other partitions**: stop producers, let the sink drain the topic (consumer lag 0),
//!   then change it and restart; the sink's crash repair relies on a subject's events
//!   living in one partition.
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use tally_crds::{Envelope, UsageEvent, Watermark};

/// Errors of the Kafka transport.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The producer's local queue is full; the caller should retry later.
    #[error("failed to queue events: the Kafka producer's queue is full")]
    Overloaded,
    /// Kafka is unreachable or refused; retry later.
    #[error("{0}")]
    Unavailable(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where Kafka is and how to talk to it.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `host:port,…`.
    pub brokers: String,
    /// The events topic.
    pub topic: String,
    /// How long a produce may wait for acknowledgement before the request fails (ms).
    pub message_timeout_ms: u64,
    /// How long the producer waits to fill a batch (ms).
    pub linger_ms: u64,
    /// Extra librdkafka settings (`security.protocol`, `sasl.*`, …).
    pub extra: Vec<(String, String)>,
    /// `retention.ms` of the topic when tally creates it (`None`: the broker's default).
    pub retention_ms: Option<i64>,
}

/// The Kafka flags every binary that talks to Kafka flattens (`tally-server`, its
/// `sink`, `tally-operator`).
#[derive(clap::Args, Clone, Debug)]
pub struct KafkaArgs {
    /// Kafka brokers (`host:port,…`). tally-server: ingest produces to Kafka instead of
    /// the embedded store; tally-operator: the events topic is provisioned.
    #[arg(long = "kafka", env = "TALLY_KAFKA", global = true)]
    pub brokers: Option<String>,
    /// The events topic.
    #[arg(
        long,
        env = "TALLY_TOPIC",
        default_value = "tally-events",
        global = true
    )]
    pub topic: String,
    /// Partitions of the events topic when tally creates it (changing it later needs a
    /// drain; see the README).
    #[arg(
        long,
        env = "TALLY_TOPIC_PARTITIONS",
        default_value_t = 8,
        global = true
    )]
    pub topic_partitions: i32,
    /// Kafka security (TLS, SASL).
    #[command(flatten)]
    pub security: KafkaSecurity,
}

impl KafkaArgs {
    /// Producer and consumer settings for `brokers`, with the topic and security.
    pub fn config(&self, brokers: &str) -> KafkaConfig {
        let mut k = KafkaConfig::new(brokers);
        k.topic = self.topic.clone();
        self.security.apply(&mut k);
        k
    }
}

/// How tally connects to a secured Kafka (flags or environment; in the chart the SASL
/// credentials come from a Secret through the environment). Each set field becomes the
/// librdkafka setting of the same name.
#[derive(clap::Args, Clone, Default)]
pub struct KafkaSecurity {
    /// `security.protocol`: plaintext, ssl, sasl_plaintext or sasl_ssl.
    #[arg(long, env = "TALLY_KAFKA_SECURITY_PROTOCOL", global = true,
          value_parser = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"])]
    pub kafka_security_protocol: Option<String>,
    /// `sasl.mechanism`: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long, env = "TALLY_KAFKA_SASL_MECHANISM", global = true,
          value_parser = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])]
    pub kafka_sasl_mechanism: Option<String>,
    /// `sasl.username`.
    #[arg(long, env = "TALLY_KAFKA_SASL_USERNAME", global = true)]
    pub kafka_sasl_username: Option<String>,
    /// `sasl.password` (prefer the environment variable).
    #[arg(
        long,
        env = "TALLY_KAFKA_SASL_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    pub kafka_sasl_password: Option<String>,
    /// `ssl.ca.location`: PEM file of the brokers' CA.
    #[arg(long, env = "TALLY_KAFKA_SSL_CA_LOCATION", global = true)]
    pub kafka_ssl_ca_location: Option<String>,
}

impl std::fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSecurity")
            .field("protocol", &self.kafka_security_protocol)
            .field("mechanism", &self.kafka_sasl_mechanism)
            .field("username", &self.kafka_sasl_username)
            .field(
                "password",
                &self.kafka_sasl_password.as_ref().map(|_| "<redacted>"),
            )
            .field("ca", &self.kafka_ssl_ca_location)
            .finish()
    }
}

impl KafkaSecurity {
    /// Adds the settings to `config`.
    pub fn apply(&self, config: &mut KafkaConfig) {
        for (key, value) in [
            ("security.protocol", &self.kafka_security_protocol),
            ("sasl.mechanism", &self.kafka_sasl_mechanism),
            ("sasl.username", &self.kafka_sasl_username),
            ("sasl.password", &self.kafka_sasl_password),
            ("ssl.ca.location", &self.kafka_ssl_ca_location),
        ] {
            if let Some(v) = value {
                config.extra.push((key.to_string(), v.clone()));
            }
        }
    }
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra: Vec<(&str, &str)> = self
            .extra
            .iter()
            .map(|(k, v)| {
                let shown = if k.contains("password") {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("message_timeout_ms", &self.message_timeout_ms)
            .field("linger_ms", &self.linger_ms)
            .field("extra", &extra)
            .field("retention_ms", &self.retention_ms)
            .finish()
    }
}

impl KafkaConfig {
    /// Defaults for `brokers`.
    pub fn new(brokers: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_string(),
            topic: "tally-events".into(),
            message_timeout_ms: 10_000,
            linger_ms: 5,
            extra: Vec::new(),
            retention_ms: None,
        }
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// The producer settings (also what the benchmark's raw producer uses).
    pub fn producer_settings(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", self.linger_ms.to_string())
            .set("batch.size", (1 << 20).to_string())
            .set("message.timeout.ms", self.message_timeout_ms.to_string())
            .set("queue.buffering.max.messages", "1000000");
        c
    }

    /// The sink's consumer settings: manual commits, from the start of the log.
    pub fn consumer_settings(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("max.poll.interval.ms", "600000")
            .set("fetch.max.bytes", (64 << 20).to_string());
        c
    }

    /// Creates the topic if it does not exist.
    pub async fn ensure_topic(&self, partitions: i32, replication: i32) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.base().create().map_err(|e| {
            Error::Unavailable(format!("Kafka admin client for {}: {e}", self.brokers))
        })?;
        let retention = self.retention_ms.map(|r| r.to_string());
        let mut topic = NewTopic::new(
            &self.topic,
            partitions,
            TopicReplication::Fixed(replication),
        );
        if let Some(r) = &retention {
            topic = topic.set("retention.ms", r);
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let res = admin.create_topics([&topic], &opts).await.map_err(|e| {
            Error::Unavailable(format!(
                "failed to create topic {} on Kafka at {}: {e}",
                self.topic, self.brokers
            ))
        })?;
        for r in res {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(Error::Unavailable(format!(
                        "failed to create topic {t} on Kafka at {}: {code}",
                        self.brokers
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The idempotent producer of envelopes.
pub struct Producer {
    inner: FutureProducer,
    config: KafkaConfig,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("brokers", &self.config.brokers)
            .field("topic", &self.config.topic)
            .finish()
    }
}

impl Producer {
    /// A producer for `config` (connects lazily).
    pub fn new(config: &KafkaConfig) -> Result<Producer> {
        let inner = config.producer_settings().create().map_err(|e| {
            Error::Unavailable(format!("Kafka producer for {}: {e}", config.brokers))
        })?;
        Ok(Producer {
            inner,
            config: config.clone(),
        })
    }

    /// Produces one envelope per event and resolves once Kafka acknowledged all of them.
    pub async fn send(
        &self,
        namespace: &str,
        events: &[UsageEvent],
        ingested_ms: i64,
    ) -> Result<()> {
        let envelopes: Vec<Envelope> = events
            .iter()
            .map(|e| Envelope::new(namespace, e, ingested_ms))
            .collect();
        self.send_envelopes(&envelopes).await
    }

    /// Produces envelopes and resolves once Kafka acknowledged all of them.
    pub async fn send_envelopes(&self, envelopes: &[Envelope]) -> Result<()> {
        let mut deliveries = Vec::with_capacity(envelopes.len());
        for env in envelopes {
            let (key, payload) = (env.key(), env.to_bytes());
            deliveries.push(
                self.queue(
                    FutureRecord::to(&self.config.topic)
                        .key(key.as_str())
                        .payload(payload.as_slice()),
                )?,
            );
        }
        self.acknowledged(deliveries).await
    }

    /// Queues one record; a full local queue is [`Error::Overloaded`].
    fn queue(&self, record: FutureRecord<'_, str, [u8]>) -> Result<DeliveryFuture> {
        match self.inner.send_result(record) {
            Ok(d) => Ok(d),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(Error::Overloaded)
            }
            Err((e, _)) => Err(self.unavailable(e)),
        }
    }

    /// Waits until Kafka acknowledged every queued record.
    async fn acknowledged(&self, deliveries: Vec<DeliveryFuture>) -> Result<()> {
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(self.unavailable(e)),
                Err(_) => return Err(Error::Unavailable("the Kafka producer stopped".into())),
            }
        }
        Ok(())
    }

    /// The topic's partition count, from the brokers' metadata (blocking; run off the
    /// async workers).
    fn partitions(&self) -> Result<i32> {
        let md = self
            .inner
            .client()
            .fetch_metadata(Some(&self.config.topic), Duration::from_secs(10))
            .map_err(|e| self.unavailable(e))?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == self.config.topic)
            .map_or(0, |t| t.partitions().len());
        if n == 0 {
            return Err(Error::Unavailable(format!(
                "Kafka at {} does not know topic {} yet",
                self.config.brokers, self.config.topic
            )));
        }
        Ok(n as i32)
    }

    /// Produces each watermark to **every** partition of the topic (with `partitions`
    /// set to their count) and resolves once Kafka acknowledged all of them. Call it
    /// only after the events it vouches for were acknowledged: then each copy follows
    /// them on its partition.
    pub async fn send_watermarks(
        self: &std::sync::Arc<Self>,
        namespace: &str,
        marks: &[Watermark],
    ) -> Result<()> {
        let me = self.clone();
        let n = tokio::task::spawn_blocking(move || me.partitions())
            .await
            .map_err(|_| Error::Unavailable("the metadata request was cancelled".into()))??;
        let mut deliveries = Vec::with_capacity(marks.len() * n as usize);
        for m in marks {
            let mut m = m.clone();
            m.partitions = n;
            let payload = m.to_payload(namespace);
            let key = format!("{namespace}/watermark");
            for p in 0..n {
                let record = FutureRecord::to(&self.config.topic)
                    .key(key.as_str())
                    .partition(p)
                    .payload(payload.as_slice());
                deliveries.push(self.queue(record)?);
            }
        }
        self.acknowledged(deliveries).await
    }

    fn unavailable(&self, e: KafkaError) -> Error {
        Error::Unavailable(format!(
            "Kafka at {} did not acknowledge the events ({e}); retry the request (re-sent events are deduplicated)",
            self.config.brokers
        ))
    }

    /// Waits up to `timeout` for queued messages to be delivered.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.inner.flush(timeout);
    }
}
