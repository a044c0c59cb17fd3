//! The agent's `/metrics` (prometheus-client registry, prefix `tally_agent`).
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of per-collector series: `namespace/name` (bounded by the configuration).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollectorLabel {
    /// `namespace/name` of the Collector.
    pub collector: String,
}

/// Counters and gauges of one agent.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events committed to the spool, per collector.
    pub events_spooled: Family<CollectorLabel, Counter>,
    /// Pod windows with an accelerator whose share of a GPU is unknown (reported in
    /// the event's `gpu_unknown`, not billed), per collector.
    pub gpu_share_unknown: Family<CollectorLabel, Counter>,
    /// Collector steps that failed (scrape, poll), per collector.
    pub collector_errors: Family<CollectorLabel, Counter>,
    /// Events the sink acknowledged.
    pub events_sent: Counter,
    /// Events the sink refused as invalid (logged; they cannot ever be delivered).
    pub events_rejected: Counter,
    /// Delivery attempts that failed and will be retried.
    pub send_failures: Counter,
    /// Times a collector waited because the spool was full.
    pub spool_full: Counter,
    /// Bytes of undelivered events in the spool.
    pub spool_bytes: Gauge,
    /// Undelivered events in the spool.
    pub spool_events: Gauge,
    /// The last watermark delivered (Unix ms), per collector: complete up to there.
    pub watermark_ms: Family<CollectorLabel, Gauge>,
}

impl Metrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tally_agent");
        r.register(
            "events_spooled",
            "Events committed to the disk spool",
            self.events_spooled.clone(),
        );
        r.register(
            "gpu_share_unknown",
            "Pod windows with an accelerator whose share of a GPU is unknown (not billed)",
            self.gpu_share_unknown.clone(),
        );
        r.register(
            "collector_errors",
            "Collector steps that failed",
            self.collector_errors.clone(),
        );
        r.register(
            "events_sent",
            "Events the sink acknowledged",
            self.events_sent.clone(),
        );
        r.register(
            "events_rejected",
            "Events the sink refused as invalid",
            self.events_rejected.clone(),
        );
        r.register(
            "send_failures",
            "Delivery attempts that will be retried",
            self.send_failures.clone(),
        );
        r.register(
            "spool_full",
            "Times a collector waited for spool space",
            self.spool_full.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes of undelivered events",
            self.spool_bytes.clone(),
        );
        r.register(
            "spool_events",
            "Undelivered events",
            self.spool_events.clone(),
        );
        r.register(
            "watermark_ms",
            "The last watermark delivered (Unix ms): events before it are all sent",
            self.watermark_ms.clone(),
        );
    }

    /// Series label of a collector.
    pub fn label(collector: &str) -> CollectorLabel {
        CollectorLabel {
            collector: collector.to_string(),
        }
    }
}
