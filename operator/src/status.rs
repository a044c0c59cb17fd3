//! Pure status building: conditions that keep their `lastTransitionTime` while their
//! status holds, so recomputing an unchanged status yields an equal value (and the
//! controller writes nothing at rest).
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use tally_crds::{MeterStatus, MeterStorage};

/// Why a meter is or is not ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `Ready` condition status.
    pub ready: bool,
    /// CamelCase reason (`Provisioned`, `Backfilling`, `InvalidSpec`, …).
    pub reason: &'static str,
    /// What it means and, when not ready, what to fix.
    pub message: String,
    /// Something needs attention even when ready (`Degraded=True`): reason and message.
    pub degraded: Option<(&'static str, String)>,
}

/// A condition, keeping the previous transition time when its status did not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The status a meter should have.
pub fn desired(
    previous: &MeterStatus,
    generation: Option<i64>,
    slug: &str,
    verdict: &Verdict,
    storage: Option<MeterStorage>,
    now: Timestamp,
) -> MeterStatus {
    let (degraded, d_reason, d_message) = match &verdict.degraded {
        Some((r, m)) => (true, *r, m.as_str()),
        None if !verdict.ready && verdict.reason != "Backfilling" => {
            (true, verdict.reason, verdict.message.as_str())
        }
        None => (false, "AsExpected", "nothing needs attention"),
    };
    MeterStatus {
        observed_generation: generation,
        slug: Some(slug.to_string()),
        conditions: vec![
            condition(
                &previous.conditions,
                "Ready",
                verdict.ready,
                verdict.reason,
                &verdict.message,
                generation,
                now,
            ),
            condition(
                &previous.conditions,
                "Degraded",
                degraded,
                d_reason,
                d_message,
                generation,
                now,
            ),
        ],
        storage,
    }
}

/// The condition of type `type_` in a status, if any.
pub fn find<'a>(status: Option<&'a MeterStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(ready: bool, reason: &'static str) -> Verdict {
        Verdict {
            ready,
            reason,
            message: format!("{reason} message"),
            degraded: None,
        }
    }

    #[test]
    fn an_unchanged_verdict_rebuilds_an_equal_status() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = Timestamp::from_second(1_700_000_100).unwrap();
        let first = desired(
            &MeterStatus::default(),
            Some(1),
            "calls",
            &verdict(true, "Provisioned"),
            None,
            t0,
        );
        let again = desired(
            &first,
            Some(1),
            "calls",
            &verdict(true, "Provisioned"),
            None,
            t1,
        );
        assert_eq!(first, again, "no write at rest");
        let failed = desired(
            &again,
            Some(2),
            "calls",
            &verdict(false, "InvalidSpec"),
            None,
            t1,
        );
        let ready = &failed.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.last_transition_time.0),
            ("False", t1)
        );
        let degraded = &failed.conditions[1];
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "InvalidSpec")
        );
    }

    #[test]
    fn backfilling_is_not_ready_but_not_degraded() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let s = desired(
            &MeterStatus::default(),
            Some(1),
            "calls",
            &verdict(false, "Backfilling"),
            None,
            t0,
        );
        assert_eq!(s.conditions[1].status, "False");
    }
}
