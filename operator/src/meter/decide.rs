//! The Meter reconcile as a pure decision: from what is known about a Meter (its spec
//! compiled or not, its status, the pipeline's health, and what storage reported so
//! far) [`decide`] returns the next step: ask storage something, or write this status.
//! The reconcile in `meter.rs` runs the storage steps through [`RollupStorage`] and
//! feeds their answers back until the decision is a status. No I/O here, so every
//! state of the module docs of `meter.rs` is a row of the table test below.
use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tally_clickhouse::provision::MeterRecord;
use tally_clickhouse::rollup::id_of_table;
use tally_crds::MeterStorage;
use tally_meter::engine::CompiledMeter;

use crate::status::Verdict;

/// What storage does for a Meter: the seam between the decision and ClickHouse.
pub(crate) trait RollupStorage {
    /// Creates (or finds) the meter's rollup and view, returning its record.
    async fn prepare(&self, m: &CompiledMeter) -> tally_meter::Result<MeterRecord>;
    /// `None` once the sink has passed `cutover`; else what it waits for.
    async fn cutover_passed(&self, cutover: i64) -> tally_meter::Result<Option<String>>;
    /// Backfills the events stored before the cutover.
    async fn backfill(&self, m: &CompiledMeter, rec: MeterRecord) -> tally_meter::Result<()>;
    /// Drops rollups (and their views) by id.
    async fn drop_rollups(&self, ids: &[i64]) -> tally_meter::Result<()>;
}

/// The prepared rollup's record, as far as the decision needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Prepared {
    /// Whether its backfill is done.
    pub backfilled: bool,
    /// Its cutover (Unix seconds).
    pub cutover: i64,
}

/// Everything the decision reads.
#[derive(Clone, Debug)]
pub(crate) struct Facts {
    /// `field: message` for each spec error (empty: the spec compiles).
    pub spec_errors: Vec<String>,
    /// The Meter's namespace and slug.
    pub namespace: String,
    /// The slug (`spec.slug` or the name).
    pub slug: String,
    /// The oldest Meter of the namespace serving the slug, when it is another one.
    pub slug_owner: Option<String>,
    /// Whether this leader has reached storage once.
    pub health_checked: bool,
    /// Why ClickHouse cannot be reached, if it cannot.
    pub clickhouse_problem: Option<String>,
    /// Why Kafka cannot be reached, if it cannot.
    pub kafka_problem: Option<String>,
    /// The storage part of the current status.
    pub storage: Option<MeterStorage>,
    /// The rollup table the definition needs.
    pub wanted: String,
    /// Rollup tables other Meters use.
    pub used_elsewhere: BTreeSet<String>,
    /// Answer of [`Next::Prepare`].
    pub prepared: Option<Prepared>,
    /// Answer of [`Next::CheckCutover`]: `Some(None)` = passed, `Some(Some(wait))`.
    pub cutover_wait: Option<Option<String>>,
    /// [`Next::Backfill`] done.
    pub backfilled_now: bool,
    /// [`Next::DropRetiring`] done.
    pub retiring_dropped: bool,
    /// The time of the last answer.
    pub now: DateTime<Utc>,
    /// How long a replaced rollup is kept.
    pub drain: Duration,
    /// How often a ready meter is checked again.
    pub resync: Duration,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Next {
    /// Write this status; then requeue after the duration, or wait for a change.
    Report {
        verdict: Verdict,
        storage: Option<Box<MeterStorage>>,
        requeue: Option<Duration>,
    },
    /// Change nothing and look again after the duration.
    Wait(Duration),
    /// Ask storage for the rollup ([`RollupStorage::prepare`]).
    Prepare,
    /// Ask whether the sink passed the cutover ([`RollupStorage::cutover_passed`]).
    CheckCutover(i64),
    /// Backfill ([`RollupStorage::backfill`]).
    Backfill,
    /// Drop the replaced rollup whose drain period ended.
    DropRetiring(i64),
}

fn served_message(table: &str) -> String {
    format!("queries read rollup {table}; events stored before its cutover were backfilled")
}

/// The next step for a Meter with these facts.
pub(crate) fn decide(f: &Facts) -> Next {
    let storage0 = f.storage.clone();
    if !f.spec_errors.is_empty() {
        return Next::Report {
            verdict: Verdict {
                ready: false,
                reason: "InvalidSpec",
                message: format!(
                    "{}. Fix the Meter and apply it again; it is not served until then.",
                    f.spec_errors.join("; ")
                ),
                degraded: None,
            },
            storage: storage0.map(Box::new),
            requeue: None,
        };
    }
    if let Some(owner) = &f.slug_owner {
        return Next::Report {
            verdict: Verdict {
                ready: false,
                reason: "SlugConflict",
                message: format!(
                    "slug {:?} is already served by Meter {owner} in namespace {}; set a different spec.slug",
                    f.slug, f.namespace
                ),
                degraded: None,
            },
            storage: storage0.map(Box::new),
            requeue: Some(Duration::from_secs(30)),
        };
    }
    if !f.health_checked {
        // A new leader has not reached ClickHouse yet: change nothing.
        return Next::Wait(Duration::from_millis(500));
    }
    // The table queries read now, if any.
    let served = storage0
        .as_ref()
        .filter(|s| s.backfilled)
        .and_then(|s| s.rollup_table.clone());
    if let Some(problem) = &f.clickhouse_problem {
        let problem = format!("{problem}; the operator retries with backoff");
        // A meter already served stays Ready (its queries answer 503 while ClickHouse is
        // down, rather than 404); Degraded says what is wrong.
        let verdict = match &served {
            Some(table) => Verdict {
                ready: true,
                reason: "Provisioned",
                message: served_message(table),
                degraded: Some(("StorageUnavailable", problem)),
            },
            None => Verdict {
                ready: false,
                reason: "StorageUnavailable",
                message: problem,
                degraded: None,
            },
        };
        return Next::Report {
            verdict,
            storage: storage0.map(Box::new),
            requeue: Some(Duration::from_secs(10)),
        };
    }
    let kafka = f.kafka_problem.as_ref().map(|m| {
        (
            "KafkaUnavailable",
            format!("{m}; events cannot be ingested until it is reachable"),
        )
    });
    let Some(rec) = f.prepared else {
        return Next::Prepare;
    };
    let wanted = &f.wanted;
    let mut storage = storage0.unwrap_or_default();
    storage.store = "clickhouse".into();
    let cutover = DateTime::<Utc>::from_timestamp(rec.cutover, 0);
    if !rec.backfilled && !f.backfilled_now {
        match &f.cutover_wait {
            None => return Next::CheckCutover(rec.cutover),
            Some(None) => return Next::Backfill,
            Some(Some(wait)) => {
                storage.pending_rollup_table = Some(wanted.clone());
                storage.backfill = Some(wait.clone());
                if served.is_none() {
                    storage.backfilled = false;
                    storage.cutover = cutover;
                }
                let verdict = match &served {
                    Some(old) if old != wanted => Verdict {
                        ready: true,
                        reason: "Rebuilding",
                        message: format!(
                            "the definition changed: {old} serves queries while {wanted} is backfilled ({wait})"
                        ),
                        degraded: kafka,
                    },
                    _ => Verdict {
                        ready: false,
                        reason: "Backfilling",
                        message: format!(
                            "rollup {wanted} is created; {wait}, then events stored before it are backfilled"
                        ),
                        degraded: kafka,
                    },
                };
                return Next::Report {
                    verdict,
                    storage: Some(Box::new(storage)),
                    requeue: Some(Duration::from_secs(1)),
                };
            }
        }
    }
    // The wanted rollup is backfilled: it serves.
    let now = f.now;
    if let Some(old) = served.filter(|old| old != wanted) {
        storage.retiring_rollup_table = Some(old);
        storage.retire_at = Some(now + f.drain);
    }
    storage.rollup_table = Some(wanted.clone());
    storage.backfilled = true;
    storage.cutover = cutover;
    storage.pending_rollup_table = None;
    storage.backfill = Some("complete".into());
    let mut requeue = f.resync;
    if let (Some(old), Some(at)) = (storage.retiring_rollup_table.clone(), storage.retire_at) {
        if at <= now {
            let droppable = !f.used_elsewhere.contains(&old) && old != *wanted;
            if let Some(id) = id_of_table(&old).filter(|_| droppable && !f.retiring_dropped) {
                return Next::DropRetiring(id);
            }
            storage.retiring_rollup_table = None;
            storage.retire_at = None;
        } else {
            requeue =
                requeue.min((at - now).to_std().unwrap_or_default() + Duration::from_millis(100));
        }
    }
    Next::Report {
        verdict: Verdict {
            ready: true,
            reason: "Provisioned",
            message: served_message(wanted),
            degraded: kafka,
        },
        storage: Some(Box::new(storage)),
        requeue: Some(requeue),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "rollup_7";
    const NEW: &str = "rollup_9";

    fn facts() -> Facts {
        Facts {
            spec_errors: vec![],
            namespace: "team-a".into(),
            slug: "tokens".into(),
            slug_owner: None,
            health_checked: true,
            clickhouse_problem: None,
            kafka_problem: None,
            storage: None,
            wanted: NEW.into(),
            used_elsewhere: BTreeSet::new(),
            prepared: None,
            cutover_wait: None,
            backfilled_now: false,
            retiring_dropped: false,
            now: DateTime::<Utc>::from_timestamp(1_800_000_000, 0).unwrap(),
            drain: Duration::from_secs(60),
            resync: Duration::from_secs(300),
        }
    }

    fn served(table: &str) -> Option<MeterStorage> {
        Some(MeterStorage {
            store: "clickhouse".into(),
            rollup_table: Some(table.into()),
            backfilled: true,
            ..MeterStorage::default()
        })
    }

    /// The reason (or step) of a decision, with its requeue, for the table.
    fn show(n: &Next) -> String {
        match n {
            Next::Report {
                verdict, requeue, ..
            } => format!(
                "{}{} ready={} requeue={:?}",
                verdict.reason,
                verdict
                    .degraded
                    .as_ref()
                    .map_or(String::new(), |(r, _)| format!("+{r}")),
                verdict.ready,
                requeue.map(|d| d.as_secs())
            ),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn every_state_of_the_meter_is_one_decision() {
        let prepared = |backfilled| {
            Some(Prepared {
                backfilled,
                cutover: 1_800_000_005,
            })
        };
        let waiting = Some(Some("waiting for the sink to pass the cutover".to_string()));
        let rows: Vec<(&str, Facts, &str)> = vec![
            (
                "bad spec",
                Facts {
                    spec_errors: vec!["spec.valueProperty: not singular".into()],
                    ..facts()
                },
                "InvalidSpec ready=false requeue=None",
            ),
            (
                "slug taken",
                Facts {
                    slug_owner: Some("older".into()),
                    ..facts()
                },
                "SlugConflict ready=false requeue=Some(30)",
            ),
            (
                "new leader",
                Facts {
                    health_checked: false,
                    ..facts()
                },
                "Wait(500ms)",
            ),
            (
                "ClickHouse down, never served",
                Facts {
                    clickhouse_problem: Some("refused".into()),
                    ..facts()
                },
                "StorageUnavailable ready=false requeue=Some(10)",
            ),
            (
                "ClickHouse down, served",
                Facts {
                    clickhouse_problem: Some("refused".into()),
                    storage: served(NEW),
                    ..facts()
                },
                "Provisioned+StorageUnavailable ready=true requeue=Some(10)",
            ),
            ("first look", facts(), "Prepare"),
            (
                "prepared, not backfilled",
                Facts {
                    prepared: prepared(false),
                    ..facts()
                },
                "CheckCutover(1800000005)",
            ),
            (
                "sink not past the cutover",
                Facts {
                    prepared: prepared(false),
                    cutover_wait: waiting.clone(),
                    ..facts()
                },
                "Backfilling ready=false requeue=Some(1)",
            ),
            (
                "changed definition, waiting",
                Facts {
                    prepared: prepared(false),
                    cutover_wait: waiting,
                    storage: served(OLD),
                    ..facts()
                },
                "Rebuilding ready=true requeue=Some(1)",
            ),
            (
                "cutover passed",
                Facts {
                    prepared: prepared(false),
                    cutover_wait: Some(None),
                    ..facts()
                },
                "Backfill",
            ),
            (
                "backfilled now",
                Facts {
                    prepared: prepared(false),
                    cutover_wait: Some(None),
                    backfilled_now: true,
                    ..facts()
                },
                "Provisioned ready=true requeue=Some(300)",
            ),
            (
                "backfilled before",
                Facts {
                    prepared: prepared(true),
                    ..facts()
                },
                "Provisioned ready=true requeue=Some(300)",
            ),
            (
                "Kafka down",
                Facts {
                    prepared: prepared(true),
                    kafka_problem: Some("no brokers".into()),
                    ..facts()
                },
                "Provisioned+KafkaUnavailable ready=true requeue=Some(300)",
            ),
            (
                "swapped: the old one drains",
                Facts {
                    prepared: prepared(true),
                    storage: served(OLD),
                    ..facts()
                },
                "Provisioned ready=true requeue=Some(60)",
            ),
        ];
        let mut wrong = Vec::new();
        for (what, f, want) in rows {
            let got = show(&decide(&f));
            if got != want {
                wrong.push(format!("{what}: want {want}, got {got}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    fn retiring(at: DateTime<Utc>) -> Option<MeterStorage> {
        let mut s = served(NEW).unwrap();
        s.retiring_rollup_table = Some(OLD.into());
        s.retire_at = Some(at);
        Some(s)
    }

    #[test]
    fn a_replaced_rollup_is_dropped_after_its_drain_unless_another_meter_uses_it() {
        let base = Facts {
            prepared: Some(Prepared {
                backfilled: true,
                cutover: 1,
            }),
            ..facts()
        };
        let due = Facts {
            storage: retiring(base.now),
            ..base.clone()
        };
        assert_eq!(decide(&due), Next::DropRetiring(7));
        let Next::Report { storage, .. } = decide(&Facts {
            retiring_dropped: true,
            ..due.clone()
        }) else {
            panic!("a status after the drop");
        };
        let storage = storage.unwrap();
        assert_eq!(
            (storage.retiring_rollup_table, storage.retire_at),
            (None, None)
        );
        // shared with another Meter: forgotten, not dropped
        let shared = Facts {
            used_elsewhere: [OLD.to_string()].into(),
            ..due
        };
        assert!(matches!(decide(&shared), Next::Report { .. }));
        // not due yet: requeued for the end of the drain
        let later = Facts {
            storage: retiring(base.now + chrono::Duration::seconds(20)),
            ..base
        };
        assert_eq!(
            show(&decide(&later)),
            "Provisioned ready=true requeue=Some(20)"
        );
    }

    #[test]
    fn a_waiting_backfill_keeps_serving_the_old_rollup_and_records_the_new_one() {
        let f = Facts {
            prepared: Some(Prepared {
                backfilled: false,
                cutover: 1_800_000_005,
            }),
            cutover_wait: Some(Some("waiting".into())),
            storage: served(OLD),
            ..facts()
        };
        let Next::Report { storage, .. } = decide(&f) else {
            panic!("a status");
        };
        let s = storage.unwrap();
        assert_eq!(s.rollup_table.as_deref(), Some(OLD));
        assert_eq!(s.pending_rollup_table.as_deref(), Some(NEW));
        assert!(s.backfilled, "the served rollup stays backfilled");
    }
}
