//! Keeping dedup storage and the sink log bounded: expired monthly `event_ids`
//! partitions are dropped, old `sink_log` rows deleted (at start and hourly).
use tally_meter::Result;

use super::Sink;
use crate::lit;
use crate::provision::delete_where;

impl Sink {
    /// Drops the monthly `event_ids` partitions that lie wholly before the dedup window,
    /// so dedup storage stays bounded (18.16 has no TTL).
    pub(super) async fn prune_identities(&self) -> Result<()> {
        let now = self.ch.now().await?;
        let window_start = now - self.cfg.dedup_window.as_secs() as i64;
        let parts: Vec<String> = self
            .ch
            .fetch(
                "list dedup partitions",
                &format!(
                    "SELECT DISTINCT partition FROM system.parts WHERE database = {} AND table = 'event_ids' AND active",
                    lit(self.ch.db())
                ),
            )
            .await?;
        for p in parts {
            let Ok(yyyymm) = p.trim_matches('\'').parse::<i32>() else {
                continue;
            };
            let (y, m) = (yyyymm / 100, (yyyymm % 100) as u32);
            let next = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let Some(month_end) = chrono::NaiveDate::from_ymd_opt(next.0, next.1, 1)
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|d| d.and_utc().timestamp())
            else {
                continue;
            };
            if month_end <= window_start {
                self.ch
                    .exec(
                        "drop expired dedup identities",
                        &format!(
                            "ALTER TABLE {}.event_ids DROP PARTITION {yyyymm}",
                            self.ch.db()
                        ),
                    )
                    .await?;
                tracing::info!(
                    partition = yyyymm,
                    "Dropped dedup identities older than the dedup window"
                );
            }
        }
        Ok(())
    }

    /// Deletes `sink_log` rows older than a week, except each partition's latest batch
    /// (its `begin` and `done`), which is all that restarts and backfills read.
    pub(super) async fn prune_log(&self) -> Result<()> {
        let week_ago = chrono::Utc::now().timestamp_millis() - 7 * 86_400_000;
        let latest: Vec<(i32, i64)> = self
            .ch
            .fetch(
                "read the sink log",
                &format!(
                    "SELECT kafka_partition, max(start_offset) FROM {}.sink_log WHERE topic = {} GROUP BY kafka_partition",
                    self.ch.db(),
                    lit(&self.cfg.kafka.topic)
                ),
            )
            .await?;
        if latest.is_empty() {
            return Ok(());
        }
        let older = latest
            .iter()
            .map(|(p, start)| format!("(kafka_partition = {p} AND start_offset < {start})"))
            .collect::<Vec<_>>()
            .join(" OR ");
        delete_where(
            &self.ch,
            "sink_log",
            &format!(
                "topic = {} AND logged_ms < {week_ago} AND ({older})",
                lit(&self.cfg.kafka.topic)
            ),
        )
        .await
    }
}
