//! Budget semantics without I/O: a budget's period at an instant, and which thresholds
//! a usage figure has crossed or no longer crosses, against what was already recorded.
//!
//! A crossing is recorded once per (budget, subject, period, threshold); its record is
//! what makes every action happen exactly once ([`BudgetLedger`]). A threshold that is
//! no longer crossed (the limit was raised: SUM and COUNT usage never falls within a
//! period) is **re-armed**: its record is marked so, and the next crossing is a new one
//! (`seq + 1`, a new webhook id).
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use tally_crds::budget::Calendar;

use crate::Result;

/// `[start, end)` in ms of the period containing `now_ms`: local midnight of the day,
/// of Monday, or of the first of the month, in `tz`. A midnight that does not exist
/// locally (a DST jump at 00:00) starts at the first local time after it.
pub fn period_bounds(calendar: Calendar, tz: Tz, now_ms: i64) -> (i64, i64) {
    let now = DateTime::<Utc>::from_timestamp_millis(now_ms)
        .unwrap_or_default()
        .with_timezone(&tz);
    let today = now.date_naive();
    let (start, next) = match calendar {
        Calendar::Day => (today, today + Duration::days(1)),
        Calendar::Week => {
            let monday = today - Duration::days(today.weekday().num_days_from_monday() as i64);
            (monday, monday + Duration::days(7))
        }
        Calendar::Month => {
            let first = NaiveDate::from_ymd_opt(today.year(), today.month(), 1).unwrap_or(today);
            let next = if today.month() == 12 {
                NaiveDate::from_ymd_opt(today.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(today.year(), today.month() + 1, 1)
            }
            .unwrap_or(first);
            (first, next)
        }
    };
    (local_midnight(tz, start), local_midnight(tz, next))
}

fn local_midnight(tz: Tz, day: NaiveDate) -> i64 {
    let midnight = day.and_hms_opt(0, 0, 0).unwrap_or_default();
    // a gap at midnight: the day starts at the first local minute that exists
    (0..=180)
        .find_map(|m| {
            tz.from_local_datetime(&(midnight + Duration::minutes(m)))
                .earliest()
        })
        .map_or(0, |t| t.timestamp_millis())
}

/// One recorded crossing of a threshold, and what became of its actions.
#[derive(Clone, Debug, PartialEq)]
pub struct Crossing {
    /// The webhook id: the same on every attempt, after any restart.
    pub id: String,
    /// The budget's namespace.
    pub namespace: String,
    /// The budget's name.
    pub budget: String,
    /// The subject ('' for a budget over the total).
    pub subject: String,
    /// The period's start (ms).
    pub period_start_ms: i64,
    /// The threshold as written (`80%`, `5000`).
    pub threshold: String,
    /// 0 for the first crossing in the period; +1 after each re-arm.
    pub seq: u32,
    /// Usage when it was crossed.
    pub usage: f64,
    /// When it was recorded (ms).
    pub crossed_ms: i64,
    /// The webhook body, fixed at recording so every attempt sends the same.
    pub body: String,
    /// When the receiver accepted it (2xx), if it did.
    pub delivered_ms: Option<i64>,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Whether delivery gave up (the budget's `Failed` condition).
    pub failed: bool,
    /// Whether the threshold was re-armed (no longer crossed) after this.
    pub rearmed: bool,
}

impl Crossing {
    /// The deterministic id of a crossing.
    pub fn id_of(
        namespace: &str,
        budget: &str,
        subject: &str,
        period_start_ms: i64,
        threshold: &str,
        seq: u32,
    ) -> String {
        let key =
            format!("{namespace}\0{budget}\0{subject}\0{period_start_ms}\0{threshold}\0{seq}");
        format!("tb_{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()))
    }
}

/// Durable crossing records: what makes "once per (budget, subject, period,
/// threshold)" survive restarts.
pub trait BudgetLedger: Send + Sync + std::fmt::Debug {
    /// The newest record of each (subject, threshold) of a budget's period.
    fn latest_crossings(
        &self,
        namespace: &str,
        budget: &str,
        period_start_ms: i64,
    ) -> Result<Vec<Crossing>>;

    /// Stores a new crossing, or a new state of one (by id).
    fn put_crossing(&self, crossing: &Crossing) -> Result<()>;

    /// Crossings whose webhook neither succeeded nor gave up, oldest first.
    fn undelivered_crossings(&self) -> Result<Vec<Crossing>>;
}

/// What one evaluation decides for one (subject, threshold).
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Crossed and not recorded (or re-armed since): record crossing `seq`, then act.
    Cross {
        /// The subject.
        subject: String,
        /// The threshold label.
        threshold: String,
        /// Its sequence number in the period.
        seq: u32,
        /// Usage now.
        usage: f64,
    },
    /// Recorded but no longer crossed: re-arm it.
    Rearm(Crossing),
}

/// The decisions for `usage` (per subject; '' for the total) against thresholds
/// `(label, at)` and the period's `latest` records.
pub fn decide(
    usage: &[(String, f64)],
    thresholds: &[(String, f64)],
    latest: &[Crossing],
) -> Vec<Decision> {
    let mut out = Vec::new();
    for (subject, value) in usage {
        for (label, at) in thresholds {
            let last = latest
                .iter()
                .filter(|c| &c.subject == subject && &c.threshold == label)
                .max_by_key(|c| c.seq);
            let crossed = *value >= *at;
            match (crossed, last) {
                (true, None) => out.push(Decision::Cross {
                    subject: subject.clone(),
                    threshold: label.clone(),
                    seq: 0,
                    usage: *value,
                }),
                (true, Some(c)) if c.rearmed => out.push(Decision::Cross {
                    subject: subject.clone(),
                    threshold: label.clone(),
                    seq: c.seq + 1,
                    usage: *value,
                }),
                (false, Some(c)) if !c.rearmed => out.push(Decision::Rearm(c.clone())),
                _ => {}
            }
        }
    }
    // subjects no longer in the answer (none: usage does not fall) keep their records
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis()
    }

    #[test]
    fn periods_start_at_local_midnight() {
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        // 23:59 and 00:00 Kolkata (UTC+05:30) on 1-2 Dec 2026
        let (s, e) = period_bounds(Calendar::Day, kolkata, ms("2026-12-01T18:29:59.999Z"));
        assert_eq!(
            (s, e),
            (ms("2026-11-30T18:30:00Z"), ms("2026-12-01T18:30:00Z"))
        );
        let (s, _) = period_bounds(Calendar::Day, kolkata, ms("2026-12-01T18:30:00Z"));
        assert_eq!(s, ms("2026-12-01T18:30:00Z"));
        let (s, e) = period_bounds(Calendar::Month, kolkata, ms("2026-12-15T00:00:00Z"));
        assert_eq!(
            (s, e),
            (ms("2026-11-30T18:30:00Z"), ms("2026-12-31T18:30:00Z"))
        );
        // Wednesday 2 Dec 2026: the week began Monday 30 Nov
        let (s, e) = period_bounds(Calendar::Week, Tz::UTC, ms("2026-12-02T12:00:00Z"));
        assert_eq!(
            (s, e),
            (ms("2026-11-30T00:00:00Z"), ms("2026-12-07T00:00:00Z"))
        );
    }

    #[test]
    fn a_dst_day_in_new_york_is_23_or_25_hours() {
        let ny: Tz = "America/New_York".parse().unwrap();
        let (s, e) = period_bounds(Calendar::Day, ny, ms("2026-03-08T12:00:00Z"));
        assert_eq!(
            (s, e),
            (ms("2026-03-08T05:00:00Z"), ms("2026-03-09T04:00:00Z"))
        );
        assert_eq!(e - s, 23 * 3_600_000);
        let (s, e) = period_bounds(Calendar::Day, ny, ms("2026-11-01T12:00:00Z"));
        assert_eq!(e - s, 25 * 3_600_000, "{s} {e}");
        // a zone whose midnight does not exist on its DST day starts at 01:00
        let havana: Tz = "America/Havana".parse().unwrap();
        let (s, _) = period_bounds(Calendar::Day, havana, ms("2026-03-08T12:00:00Z"));
        assert_eq!(
            s,
            ms("2026-03-08T05:00:00Z"),
            "Havana's 8 March starts at 01:00 CDT"
        );
    }

    fn record(subject: &str, threshold: &str, seq: u32, rearmed: bool) -> Crossing {
        Crossing {
            id: Crossing::id_of("ns", "b", subject, 0, threshold, seq),
            namespace: "ns".into(),
            budget: "b".into(),
            subject: subject.into(),
            period_start_ms: 0,
            threshold: threshold.into(),
            seq,
            usage: 0.0,
            crossed_ms: 0,
            body: String::new(),
            delivered_ms: None,
            attempts: 0,
            failed: false,
            rearmed,
        }
    }

    #[test]
    fn each_threshold_fires_once_and_rearms_when_no_longer_crossed() {
        let t = vec![("80%".to_string(), 80.0), ("100%".to_string(), 100.0)];
        let usage = vec![("acme".to_string(), 85.0), ("globex".to_string(), 10.0)];
        let d = decide(&usage, &t, &[]);
        assert_eq!(
            d,
            vec![Decision::Cross {
                subject: "acme".into(),
                threshold: "80%".into(),
                seq: 0,
                usage: 85.0
            }]
        );
        // recorded: nothing more
        assert!(decide(&usage, &t, &[record("acme", "80%", 0, false)]).is_empty());
        // the limit was raised to 200: 80% is 160, no longer crossed → re-arm
        let raised = vec![("80%".to_string(), 160.0), ("100%".to_string(), 200.0)];
        let d = decide(&usage, &raised, &[record("acme", "80%", 0, false)]);
        assert_eq!(d, vec![Decision::Rearm(record("acme", "80%", 0, false))]);
        // crossed again after the re-arm: a new crossing, seq 1, a new id
        let more = vec![("acme".to_string(), 170.0)];
        let d = decide(&more, &raised, &[record("acme", "80%", 0, true)]);
        assert!(matches!(&d[..], [Decision::Cross { seq: 1, .. }]), "{d:?}");
        assert_ne!(
            Crossing::id_of("ns", "b", "acme", 0, "80%", 0),
            Crossing::id_of("ns", "b", "acme", 0, "80%", 1)
        );
    }
}
