//! The sink's settings.
use std::time::Duration;

use tally_kafka::KafkaConfig;

use crate::ChConfig;

/// Sink settings.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// Kafka and the topic.
    pub kafka: KafkaConfig,
    /// Consumer group.
    pub group: String,
    /// ClickHouse.
    pub clickhouse: ChConfig,
    /// Flush a batch at this many messages.
    pub batch_rows: usize,
    /// Flush a batch at this many payload bytes.
    pub batch_bytes: usize,
    /// Flush a non-empty batch after this long.
    pub batch_wait: Duration,
    /// How long an identity is remembered for dedup (by ingestion time).
    pub dedup_window: Duration,
    /// Memory for recent identities; beyond it, ClickHouse is asked.
    pub dedup_memory_bytes: usize,
    /// Bound between reading ClickHouse's clock and writing `begin`, seconds.
    pub grace_secs: i64,
    /// Give up (exit with an error) after failing this long on one batch.
    pub max_retry: Duration,
}

impl SinkConfig {
    /// Defaults around `kafka` and `clickhouse`.
    pub fn new(kafka: KafkaConfig, clickhouse: ChConfig) -> SinkConfig {
        SinkConfig {
            kafka,
            group: "tally-sink".into(),
            clickhouse,
            batch_rows: 50_000,
            batch_bytes: 32 << 20,
            batch_wait: Duration::from_secs(1),
            dedup_window: Duration::from_secs(32 * 86400),
            dedup_memory_bytes: 64 << 20,
            grace_secs: 5,
            max_retry: Duration::from_secs(300),
        }
    }
}
