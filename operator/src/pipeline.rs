//! Provisioning what the data path needs before any meter: the Kafka topic (partitions,
//! replication, retention) and ClickHouse's database, raw, feed, dedup, dead-letter and
//! bookkeeping tables. Idempotent (create-if-missing), retried with backoff while an
//! endpoint is unreachable, and re-checked every [`RECHECK`] so a ClickHouse that comes
//! back empty is set up again. What is wrong is kept in [`Health`] (Meters show it as a
//! condition) and logged naming the endpoint.
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tally_clickhouse::Ch;
use tally_kafka::KafkaConfig;
use tokio::sync::watch;

/// How often a healthy pipeline is checked again (a cheap read; no writes).
pub const RECHECK: Duration = Duration::from_secs(30);

/// The pipeline's health: `None` when fine, else what is wrong.
#[derive(Debug, Default)]
pub struct Health {
    checked: AtomicBool,
    clickhouse: RwLock<Option<String>>,
    kafka: RwLock<Option<String>>,
    changed: Option<watch::Sender<u64>>,
}

impl Health {
    /// A health that announces changes on the returned receiver (to re-reconcile meters).
    pub fn new() -> (Health, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        let h = Health {
            checked: AtomicBool::new(false),
            clickhouse: RwLock::new(None),
            kafka: RwLock::new(None),
            changed: Some(tx),
        };
        (h, rx)
    }

    /// A health where everything is fine (tests).
    pub fn healthy() -> Health {
        let h = Health::default();
        h.checked.store(true, Ordering::SeqCst);
        h
    }

    /// Whether ClickHouse has been checked at least once. Until then nothing is known,
    /// and meters are left as they are (a new leader must not flip served meters).
    pub fn checked(&self) -> bool {
        self.checked.load(Ordering::SeqCst)
    }

    /// Records the outcome of a ClickHouse check (`None`: fine).
    pub fn report_clickhouse(&self, problem: Option<String>) {
        // Marked checked before the change is announced, so the reconciles it triggers
        // see it; the first check is announced even when nothing is wrong.
        let first = !self.checked.swap(true, Ordering::SeqCst);
        self.set(&self.clickhouse, problem, first);
    }

    /// What is wrong with ClickHouse, if anything.
    pub fn clickhouse(&self) -> Option<String> {
        self.clickhouse
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What is wrong with Kafka, if anything.
    pub fn kafka(&self) -> Option<String> {
        self.kafka.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stores `value`; announces it when it changed or `announce` is set.
    fn set(&self, which: &RwLock<Option<String>>, value: Option<String>, announce: bool) {
        let mut cur = which.write().unwrap_or_else(|e| e.into_inner());
        if *cur != value || announce {
            *cur = value;
            if let Some(tx) = &self.changed {
                tx.send_modify(|n| *n += 1);
            }
        }
    }
}

/// Keeps the pipeline provisioned until the task is dropped.
pub async fn keep_provisioned(ch: Ch, kafka: Option<(KafkaConfig, i32, i32)>, health: &Health) {
    let mut backoff = Duration::from_secs(1);
    let mut schema_ok = false;
    let mut topic_ok = false;
    loop {
        let ch_result = if schema_ok {
            ch.now().await.map(|_| ())
        } else {
            ch.ensure_schema().await
        };
        match ch_result {
            Ok(()) => {
                if !schema_ok {
                    tracing::info!(clickhouse = %ch.url(), database = %ch.db(), "ClickHouse schema provisioned");
                }
                schema_ok = true;
                health.report_clickhouse(None);
            }
            Err(e) => {
                schema_ok = false;
                let msg = format!("ClickHouse at {} is unavailable: {e}", ch.url());
                tracing::error!(clickhouse = %ch.url(), error = %e, "ClickHouse unavailable; retrying");
                health.report_clickhouse(Some(msg));
            }
        }
        if let Some((k, partitions, replication)) = kafka.as_ref().filter(|_| !topic_ok) {
            match k.ensure_topic(*partitions, *replication).await {
                Ok(()) => {
                    tracing::info!(kafka = %k.brokers, topic = %k.topic, "Kafka topic provisioned");
                    topic_ok = true;
                    health.set(&health.kafka, None, false)
                }
                Err(e) => {
                    tracing::error!(kafka = %k.brokers, topic = %k.topic, error = %e, "Kafka unavailable; retrying");
                    health.set(
                        &health.kafka,
                        Some(format!("Kafka at {}: {e}", k.brokers)),
                        false,
                    );
                }
            }
        }
        let healthy = health.clickhouse().is_none() && health.kafka().is_none();
        let wait = if healthy {
            backoff = Duration::from_secs(1);
            RECHECK
        } else {
            let w = backoff;
            backoff = (backoff * 2).min(Duration::from_secs(30));
            w
        };
        tokio::time::sleep(wait).await;
    }
}
