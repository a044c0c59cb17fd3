//! Evaluating [`UsageBudget`]s: usage of the current period from the store, thresholds
//! crossed once per (budget, subject, period, threshold), signed webhooks.
//!
//! One evaluation of a budget ([`Evaluator::evaluate`]):
//! 1. the period containing the clock's now (`tally_meter::budget::period_bounds`);
//! 2. the meter's usage over it from the store (per subject with `perSubject`), by
//!    event time, so a late event counts in the period of its `time`;
//! 3. the decisions against the period's records (`tally_meter::budget::decide`); a
//!    new crossing is **recorded first**, with its webhook body, and acted on after;
//!    a threshold no longer crossed (the limit was raised) is re-armed;
//! 4. the status: usage, percent, the top subjects, conditions.
//!
//! [`Evaluator::deliver`] sends every recorded, undelivered crossing (also those of
//! before a restart) with the same `webhook-id` and body each time, backing off 1, 2,
//! 4 … 60 s between attempts; after [`MAX_ATTEMPTS`] it gives up and the crossing is
//! `failed` (the budget's `Failed` condition, reason `WebhookGaveUp`). A crossing whose receiver
//! answered 2xx is never sent again: the one window for a repeat is a crash between the
//! receiver's 2xx and the record of it (receivers deduplicate on `webhook-id`).
//!
//! One evaluator runs at a time per store (the standalone server owns its SQLite file;
//! in a cluster, the operator's Lease holder), so records are never raced.
pub mod webhook;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::json;
use tally_crds::budget::{SubjectUsage, Threshold, UsageBudgetSpec, UsageBudgetStatus};
use tally_crds::{Aggregation, UsageBudget};
use tally_meter::budget::{BudgetLedger, Crossing, Decision, decide, period_bounds};
use tally_meter::query::QuerySpec;
use tally_meter::store::{Store, StoredMeter};

pub use webhook::{WebhookTarget, url_allowed};

/// Attempts before a webhook is given up (about 7 minutes of backoff).
pub const MAX_ATTEMPTS: u32 = 12;
/// How long after a calendar period ends its late events still cross thresholds.
pub const LATE_GRACE_MS: i64 = 3_600_000;
/// Subjects kept in a per-subject budget's status.
pub const TOP_SUBJECTS: usize = 10;

/// A budget to evaluate.
#[derive(Clone, Debug)]
pub struct Budget {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// What it says.
    pub spec: UsageBudgetSpec,
}

impl Budget {
    /// From the custom resource.
    pub fn of(b: &UsageBudget) -> Budget {
        Budget {
            namespace: b
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: b.metadata.name.clone().unwrap_or_default(),
            spec: b.spec.clone(),
        }
    }

    fn thresholds(&self) -> Vec<(String, f64)> {
        let list = if self.spec.thresholds.is_empty() {
            vec![Threshold {
                percent: Some(100.0),
                value: None,
            }]
        } else {
            self.spec.thresholds.clone()
        };
        list.iter()
            .map(|t| (t.label(), t.at(self.spec.limit)))
            .collect()
    }
}

/// Where budgets' webhooks go: a Secret's `url` and `secret`.
pub trait Secrets: Send + Sync {
    /// The target of Secret `name` in `namespace`, or why there is none.
    fn webhook(&self, namespace: &str, name: &str) -> Result<WebhookTarget, String>;
}

/// What one evaluation found.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The budget's new status.
    pub status: UsageBudgetStatus,
    /// Crossings recorded by this evaluation (for Events and logs).
    pub crossed: Vec<Crossing>,
    /// Whether usage (the total, or any subject's) is at or over the limit.
    pub exceeded: bool,
}

/// Counters of the evaluator, for `/metrics`.
#[derive(Debug, Default)]
pub struct BudgetCounts {
    /// Thresholds crossed (recorded).
    pub crossings: std::sync::atomic::AtomicU64,
    /// Webhook attempts answered 2xx.
    pub delivered: std::sync::atomic::AtomicU64,
    /// Webhook attempts that failed.
    pub attempts_failed: std::sync::atomic::AtomicU64,
    /// Crossings given up after [`MAX_ATTEMPTS`].
    pub given_up: std::sync::atomic::AtomicU64,
}

/// Evaluates budgets against a store and delivers their webhooks.
pub struct Evaluator {
    store: Arc<dyn Store>,
    ledger: Arc<dyn BudgetLedger>,
    http: reqwest::Client,
    /// Not before this (ms) is crossing `id` tried again.
    next_attempt: Mutex<HashMap<String, i64>>,
    /// What happened.
    pub counts: Arc<BudgetCounts>,
}

impl std::fmt::Debug for Evaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator").finish_non_exhaustive()
    }
}

fn condition(kind: &str, ok: bool, reason: &str, message: String, now: DateTime<Utc>) -> Condition {
    Condition {
        type_: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        last_transition_time: Time(
            k8s_openapi::jiff::Timestamp::from_millisecond(now.timestamp_millis())
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        ),
        observed_generation: None,
    }
}

/// `1234567.5` as `1,234,567.5`.
fn grouped(v: f64) -> String {
    let s = tally_crds::canonical_f64(v);
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

impl Evaluator {
    /// An evaluator over `store`, keeping its records in `ledger`.
    pub fn new(store: Arc<dyn Store>, ledger: Arc<dyn BudgetLedger>) -> Evaluator {
        Evaluator {
            store,
            ledger,
            http: reqwest::Client::new(),
            next_attempt: Mutex::new(HashMap::new()),
            counts: Arc::default(),
        }
    }

    /// Evaluates `budget` at `now_ms`; `meter` is its meter as the catalog serves it
    /// (`None`: not found).
    pub async fn evaluate(
        &self,
        budget: &Budget,
        meter: Option<StoredMeter>,
        now_ms: i64,
    ) -> Outcome {
        let now = DateTime::<Utc>::from_timestamp_millis(now_ms).unwrap_or_default();
        let not_ready = |reason: &str, message: String| Outcome {
            status: UsageBudgetStatus {
                conditions: vec![condition("Ready", false, reason, message, now)],
                ..Default::default()
            },
            crossed: Vec::new(),
            exceeded: false,
        };
        let Some(meter) = meter else {
            return not_ready(
                "MeterNotFound",
                format!(
                    "namespace {} has no meter {:?} (its slug or its Meter name)",
                    budget.namespace, budget.spec.meter
                ),
            );
        };
        let agg = meter.meter.aggregation();
        if !matches!(agg, Aggregation::Sum | Aggregation::Count) {
            return not_ready(
                "MeterNotSummable",
                format!(
                    "meter {} is {}: a budget reads SUM or COUNT meters, whose usage only grows within a period",
                    meter.meter.slug,
                    agg.as_str()
                ),
            );
        }
        let zone = budget.spec.period.time_zone.as_deref().unwrap_or("UTC");
        let Ok(tz) = zone.parse::<Tz>() else {
            return not_ready(
                "InvalidTimeZone",
                format!("period.timeZone {zone:?} is not an IANA zone (e.g. UTC, Asia/Kolkata)"),
            );
        };
        // the ledger's period key: the calendar period's start; 0 for a rolling window,
        // whose thresholds re-arm when usage falls back below them
        let (key, start, end) = match (
            &budget.spec.period.calendar,
            budget.spec.period.rolling_ms(),
        ) {
            (Some(calendar), _) => {
                let (s, e) = period_bounds(*calendar, tz, now_ms);
                (s, s, e)
            }
            (None, Some(len)) => (0, now_ms - len, now_ms),
            (None, None) => {
                return not_ready(
                    "InvalidPeriod",
                    "give period.calendar (DAY, WEEK, MONTH) or period.rolling (e.g. 90m, 24h, 7d)"
                        .into(),
                );
            }
        };
        let (usage, mut crossed, mut failed) = match self
            .settle(budget, &meter, (tz, zone), (key, start, end), now)
            .await
        {
            Ok(v) => v,
            Err((reason, message)) => return not_ready(reason, message),
        };
        // a late event counts in the period of its time: the previous calendar period
        // is still settled for LATE_GRACE after it ended
        if let Some(calendar) = budget.spec.period.calendar
            && now_ms - start < LATE_GRACE_MS
        {
            let (ps, pe) = period_bounds(calendar, tz, start - 1);
            match self
                .settle(budget, &meter, (tz, zone), (ps, ps, pe), now)
                .await
            {
                Ok((_, mut late, late_failed)) => {
                    crossed.append(&mut late);
                    failed |= late_failed;
                }
                Err((reason, message)) => return not_ready(reason, message),
            }
        }
        let limit = budget.spec.limit;
        let mut by_usage = usage.clone();
        by_usage.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let top = by_usage.first().map_or(0.0, |(_, v)| *v);
        let over = by_usage.iter().filter(|(_, v)| *v >= limit).count() as u64;
        let exceeded = over > 0;
        let percent = format!("{:.1}%", top / limit * 100.0);
        let mut conditions = vec![
            condition(
                "Ready",
                true,
                "Evaluated",
                format!("usage from {} to {}", render(start, tz), render(end, tz)),
                now,
            ),
            condition(
                "Exceeded",
                exceeded,
                if exceeded { "OverLimit" } else { "UnderLimit" },
                format!("{} of {}", grouped(top), grouped(limit)),
                now,
            ),
        ];
        if failed {
            conditions.push(condition(
                "Failed",
                true,
                "WebhookGaveUp",
                format!("a webhook was not accepted after {MAX_ATTEMPTS} attempts; see the evaluator's log"),
                now,
            ));
        }
        let status = UsageBudgetStatus {
            observed_generation: None,
            period_start: DateTime::from_timestamp_millis(start),
            period_end: DateTime::from_timestamp_millis(end),
            usage: Some(top),
            percent: Some(percent),
            display: Some(format!("{} / {}", grouped(top), grouped(limit))),
            top_subjects: if budget.spec.per_subject {
                by_usage
                    .iter()
                    .take(TOP_SUBJECTS)
                    .map(|(s, v)| SubjectUsage {
                        subject: s.clone(),
                        usage: *v,
                    })
                    .collect()
            } else {
                Vec::new()
            },
            subjects_over_limit: budget.spec.per_subject.then_some(over),
            conditions,
        };
        Outcome {
            status,
            crossed,
            exceeded,
        }
    }

    /// Usage in `[start, end)` and the decisions against the records of period `key`:
    /// new crossings recorded (returned), re-arms written; and whether a crossing of
    /// the period gave up its webhook.
    #[allow(clippy::too_many_arguments)]
    async fn settle(
        &self,
        budget: &Budget,
        meter: &StoredMeter,
        (tz, zone): (Tz, &str),
        (key, start, end): (i64, i64, i64),
        now: DateTime<Utc>,
    ) -> Result<(Vec<(String, f64)>, Vec<Crossing>, bool), (&'static str, String)> {
        let now_ms = now.timestamp_millis();
        let usage = match self.usage(budget, meter, start, end).await {
            Ok(u) => u,
            Err(e) => return Err(("QueryFailed", format!("reading usage failed: {e}"))),
        };
        let thresholds = budget.thresholds();
        let (ns, name) = (budget.namespace.clone(), budget.name.clone());
        let latest = match self
            .ledger(move |l| l.latest_crossings(&ns, &name, key))
            .await
        {
            Ok(l) => l,
            Err(e) => return Err(("LedgerFailed", format!("reading crossings failed: {e}"))),
        };
        let mut crossed = Vec::new();
        let mut failed = latest.iter().any(|c| c.failed && !c.rearmed);
        for d in decide(&usage, &thresholds, &latest) {
            match d {
                Decision::Cross {
                    subject,
                    threshold,
                    seq,
                    usage,
                } => {
                    let at = thresholds
                        .iter()
                        .find(|(l, _)| *l == threshold)
                        .map_or(budget.spec.limit, |(_, v)| *v);
                    let id = Crossing::id_of(
                        &budget.namespace,
                        &budget.name,
                        &subject,
                        key,
                        &threshold,
                        seq,
                    );
                    let body = budget.spec.webhook.as_ref().map_or(String::new(), |_| {
                        json!({
                            "type": "budget.threshold.crossed",
                            "timestamp": now.to_rfc3339_opts(SecondsFormat::Millis, true),
                            "data": {
                                "namespace": budget.namespace,
                                "budget": budget.name,
                                "meter": meter.meter.slug,
                                "subject": if subject.is_empty() { None } else { Some(&subject) },
                                "period": {
                                    "start": render(start, tz),
                                    "end": render(end, tz),
                                    "timeZone": zone,
                                    "rolling": budget.spec.period.rolling,
                                },
                                "usage": usage,
                                "limit": budget.spec.limit,
                                "threshold": threshold,
                                "thresholdValue": at,
                            }
                        })
                        .to_string()
                    });
                    let c = Crossing {
                        id,
                        namespace: budget.namespace.clone(),
                        budget: budget.name.clone(),
                        subject,
                        period_start_ms: key,
                        threshold,
                        seq,
                        usage,
                        crossed_ms: now_ms,
                        body,
                        delivered_ms: None,
                        attempts: 0,
                        failed: false,
                        rearmed: false,
                    };
                    let put = c.clone();
                    if let Err(e) = self.ledger(move |l| l.put_crossing(&put)).await {
                        return Err(("LedgerFailed", format!("recording a crossing failed: {e}")));
                    }
                    self.counts
                        .crossings
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(namespace = %c.namespace, budget = %c.budget, subject = %c.subject, threshold = %c.threshold, usage = c.usage, id = %c.id, "Budget threshold crossed");
                    if std::env::var("TALLY_BUDGET_FAILPOINT").as_deref() == Ok("after-record") {
                        tracing::error!("fail point after-record: aborting");
                        std::process::abort();
                    }
                    crossed.push(c);
                }
                Decision::Rearm(mut c) => {
                    c.rearmed = true;
                    failed &= !c.failed;
                    let put = c.clone();
                    if let Err(e) = self.ledger(move |l| l.put_crossing(&put)).await {
                        return Err(("LedgerFailed", format!("re-arming a threshold failed: {e}")));
                    }
                    tracing::info!(namespace = %c.namespace, budget = %c.budget, subject = %c.subject, threshold = %c.threshold, "Budget threshold re-armed (no longer crossed)");
                }
            }
        }
        Ok((usage, crossed, failed))
    }

    /// Runs a (blocking) ledger call off the async threads.
    async fn ledger<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn BudgetLedger) -> tally_meter::Result<T> + Send + 'static,
    ) -> tally_meter::Result<T> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || f(ledger.as_ref()))
            .await
            .map_err(|e| tally_meter::Error::Unavailable(format!("the ledger task failed: {e}")))?
    }

    /// `(subject, usage)` in `[start, end)`: per subject, or `("", total)`.
    async fn usage(
        &self,
        budget: &Budget,
        meter: &StoredMeter,
        start: i64,
        end: i64,
    ) -> tally_meter::Result<Vec<(String, f64)>> {
        let spec = QuerySpec {
            from_ms: Some(start),
            to_ms: end,
            window_size: None,
            tz: Tz::UTC,
            subjects: budget.spec.subject.iter().cloned().collect(),
            group_by: if budget.spec.per_subject {
                vec!["subject".into()]
            } else {
                Vec::new()
            },
            filter_group_by: budget.spec.filter_group_by.clone(),
        };
        let (store, meter, per_subject) =
            (self.store.clone(), meter.clone(), budget.spec.per_subject);
        let answer = tokio::task::spawn_blocking(move || {
            store.query(&meter, &spec, tally_meter::query::DEFAULT_MAX_ROWS)
        })
        .await
        .map_err(|e| tally_meter::Error::Unavailable(format!("the query task failed: {e}")))??;
        Ok(if per_subject {
            answer
                .rows
                .into_iter()
                .map(|r| (r.subject.unwrap_or_default(), r.value))
                .collect()
        } else {
            vec![(String::new(), answer.rows.iter().map(|r| r.value).sum())]
        })
    }

    /// Sends the recorded, undelivered crossings whose backoff has passed; `budgets`
    /// are the budgets in force (a crossing of a deleted budget, or of one without a
    /// webhook now, is given up). Backoff and `webhook-timestamp` follow the wall clock
    /// (the evaluation's clock may be a test's).
    pub async fn deliver(&self, budgets: &[Budget], secrets: &dyn Secrets) {
        let pending = match self.ledger(|l| l.undelivered_crossings()).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the crossings to deliver");
                return;
            }
        };
        for mut c in pending {
            let now_ms = Utc::now().timestamp_millis();
            let due = self
                .next_attempt
                .lock()
                .map(|m| m.get(&c.id).copied().unwrap_or(0))
                .unwrap_or(0);
            if due > now_ms {
                continue;
            }
            let target = budgets
                .iter()
                .find(|b| b.namespace == c.namespace && b.name == c.budget)
                .ok_or_else(|| "the budget was deleted".to_string())
                .and_then(|b| {
                    b.spec
                        .webhook
                        .as_ref()
                        .ok_or_else(|| "the budget has no webhook now".to_string())
                        .and_then(|w| secrets.webhook(&b.namespace, &w.secret_ref.name))
                });
            let result = match &target {
                Ok(t) => t.send(&self.http, &c.id, now_ms / 1000, &c.body).await,
                Err(e) => Err(e.clone()),
            };
            c.attempts += 1;
            match result {
                Ok(()) => {
                    c.delivered_ms = Some(now_ms);
                    self.counts
                        .delivered
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(id = %c.id, budget = %c.budget, subject = %c.subject, threshold = %c.threshold, attempts = c.attempts, "Budget webhook delivered");
                }
                Err(e) => {
                    self.counts
                        .attempts_failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let wait_s = 1i64 << (c.attempts - 1).min(6);
                    if c.attempts >= MAX_ATTEMPTS || target.is_err() {
                        c.failed = true;
                        self.counts
                            .given_up
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::error!(id = %c.id, budget = %c.budget, error = %e, attempts = c.attempts, "Budget webhook given up");
                    } else {
                        tracing::warn!(id = %c.id, budget = %c.budget, error = %e, attempts = c.attempts, retry_in_s = wait_s.min(60), "Budget webhook failed; retrying");
                    }
                    if let Ok(mut m) = self.next_attempt.lock() {
                        m.insert(c.id.clone(), now_ms + wait_s.min(60) * 1000);
                    }
                }
            }
            let put = c.clone();
            if let Err(e) = self.ledger(move |l| l.put_crossing(&put)).await {
                tracing::warn!(id = %c.id, error = %e, "Cannot record a webhook attempt");
            }
        }
    }
}

fn render(ms: i64, tz: Tz) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .with_timezone(&tz)
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}
