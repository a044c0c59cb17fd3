//! The sink's counters, exported by `tally-server sink` on `/metrics`.
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters of a running sink (exported by `tally-server sink` on `/metrics`).
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Messages whose batch is done (stored, duplicate or dead-lettered).
    pub applied: Counter,
    /// Events stored.
    pub stored: Counter,
    /// Duplicates dropped.
    pub duplicates: Counter,
    /// Dead letters.
    pub dead_letters: Counter,
    /// Batches repaired after a crash or failed attempt.
    pub repairs: Counter,
    /// Dedup lookups that went to ClickHouse.
    pub lookups: Counter,
    /// Times the sink rejoined its consumer group after holding no partition.
    pub rejoins: Counter,
    /// Kafka partitions assigned to this sink now (checked once a second).
    pub assigned: Gauge,
    /// Microseconds spent applying batches (begin to done), excluding waiting for Kafka.
    pub apply_micros: Counter,
    /// Unix ms when the first message arrived (0 = none yet).
    pub first_message_ms: AtomicU64,
}

impl SinkStats {
    /// The counters in the Prometheus text format (prefix `tally_sink_`).
    pub fn encode(&self) -> String {
        let mut r = Registry::with_prefix("tally_sink");
        for (name, help, c) in [
            (
                "messages_applied",
                "Kafka messages whose batch is done",
                &self.applied,
            ),
            ("events_stored", "Events stored in ClickHouse", &self.stored),
            (
                "events_deduplicated",
                "Events dropped as duplicates of a stored (namespace, source, id)",
                &self.duplicates,
            ),
            (
                "dead_letters",
                "Messages that could not be stored",
                &self.dead_letters,
            ),
            (
                "repairs",
                "Batches repaired after a crash or a failed attempt",
                &self.repairs,
            ),
            (
                "dedup_lookups",
                "Dedup lookups that went to ClickHouse",
                &self.lookups,
            ),
            (
                "group_rejoins",
                "Times the sink rejoined its consumer group after holding no partition",
                &self.rejoins,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        r.register(
            "partitions_assigned",
            "Kafka partitions assigned to this sink now",
            self.assigned.clone(),
        );
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}
