//! Keeping the sink in its consumer group when the broker's coordinator gets stuck.
//!
//! A sink that holds no partition for twice the session timeout rejoins its group (and
//! again after 24 s, 48 s, … up to 5 min, so sinks idle by design — more sinks than
//! partitions — do not keep the group rebalancing).
//!
//! tansu 0.6 (the broker the tests run) has a coordinator bug this alone does not cure:
//! when the group's leader dies and its expiry is first noticed by another member's
//! heartbeat, the dead member leaves the member list but stays the group's leader, so no
//! later joiner is ever made leader, nobody computes an assignment, and every member
//! waits forever (the group's state is in the broker's storage, so restarting sinks does
//! not help). The coordinator drops a leader that is not a member when it reloads the
//! group, which it does when two requests for the group overlap. So for a while after
//! each rejoin, a second client of the same group, which never joins it, re-commits the
//! group's own committed offsets about twice a second: one of them overlaps a join, and
//! the next join elects a leader. Kafka's coordinator does not have the bug; there the
//! re-commit of a non-member is refused (the sink log, not Kafka's offsets, is the
//! sink's progress, so either answer is harmless).
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::{SinkConfig, SinkStats};

/// Rejoin after holding nothing for this long (twice the 6 s session timeout), doubling.
const FIRST_REJOIN: Duration = Duration::from_secs(12);
const MAX_REJOIN: Duration = Duration::from_secs(300);
/// How long after a rejoin the coordinator is nudged, and how often.
const NUDGE_FOR: Duration = Duration::from_secs(20);
const NUDGE_EVERY: Duration = Duration::from_millis(500);
const BROKER_TIMEOUT: Duration = Duration::from_secs(2);

/// What the sink knows of its group membership.
pub(super) struct GroupWatch {
    last_check: Instant,
    idle_since: Instant,
    rejoin_after: Duration,
    rejoined_at: Option<Instant>,
    last_nudge: Instant,
    /// The client outside the group, and the topic's partitions it re-commits.
    nudger: Option<(BaseConsumer, Vec<i32>)>,
}

/// What the loop has to do after [`GroupWatch::tick`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Membership {
    /// Partitions are assigned, or the sink is waiting for an assignment.
    Steady,
    /// Nothing assigned for too long: unsubscribe and subscribe again.
    Rejoin(Duration),
}

impl GroupWatch {
    pub(super) fn new() -> GroupWatch {
        let now = Instant::now();
        GroupWatch {
            last_check: now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
            idle_since: now,
            rejoin_after: FIRST_REJOIN,
            rejoined_at: None,
            last_nudge: now,
            nudger: None,
        }
    }

    /// Looks at the assignment (at most once a second) and says whether to rejoin.
    pub(super) fn tick<C: rdkafka::consumer::ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        cfg: &SinkConfig,
        stats: &SinkStats,
    ) -> Membership {
        if self.last_check.elapsed() < Duration::from_secs(1) {
            return Membership::Steady;
        }
        self.last_check = Instant::now();
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        stats.assigned.set(assigned as i64);
        if assigned > 0 {
            self.idle_since = Instant::now();
            self.rejoin_after = FIRST_REJOIN;
            self.rejoined_at = None;
            self.nudger = None;
            return Membership::Steady;
        }
        if self.idle_since.elapsed() > self.rejoin_after {
            let waited = self.rejoin_after;
            self.idle_since = Instant::now();
            self.rejoin_after = (self.rejoin_after * 2).min(MAX_REJOIN);
            self.rejoined_at = Some(Instant::now());
            return Membership::Rejoin(waited);
        }
        if self.rejoined_at.is_some_and(|at| at.elapsed() < NUDGE_FOR) {
            self.nudge(cfg);
        }
        Membership::Steady
    }

    /// Re-commits the group's committed offsets from a client outside the group.
    fn nudge(&mut self, cfg: &SinkConfig) {
        if self.last_nudge.elapsed() < NUDGE_EVERY {
            return;
        }
        self.last_nudge = Instant::now();
        let topic = &cfg.kafka.topic;
        if self.nudger.is_none() {
            let side: BaseConsumer = match cfg.kafka.consumer_settings(&cfg.group).create() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "Cannot create the group nudger");
                    return;
                }
            };
            let partitions = match side.fetch_metadata(Some(topic), BROKER_TIMEOUT) {
                Ok(md) => md
                    .topics()
                    .iter()
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect(),
                Err(e) => {
                    tracing::debug!(error = %e, "Group nudge: no topic metadata");
                    return;
                }
            };
            self.nudger = Some((side, partitions));
        }
        let Some((side, partitions)) = &self.nudger else {
            return;
        };
        let mut wanted = TopicPartitionList::new();
        for &p in partitions {
            wanted.add_partition(topic, p);
        }
        let committed = side
            .committed_offsets(wanted, BROKER_TIMEOUT)
            .unwrap_or_default();
        let mut again = TopicPartitionList::new();
        for e in committed.elements() {
            if let Offset::Offset(o) = e.offset() {
                let _ = again.add_partition_offset(topic, e.partition(), Offset::Offset(o));
            }
        }
        if again.count() == 0 {
            // nothing committed yet: offset 0 is what `auto.offset.reset=earliest` reads
            if let Some(&p) = partitions.first() {
                let _ = again.add_partition_offset(topic, p, Offset::Offset(0));
            }
        }
        if let Err(e) = side.commit(&again, rdkafka::consumer::CommitMode::Sync) {
            tracing::debug!(error = %e, "Group nudge refused (expected on Kafka)");
        }
    }
}
