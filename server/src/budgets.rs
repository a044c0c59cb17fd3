//! UsageBudgets of the `--manifests` folder, evaluated by the standalone server (its
//! embedded store keeps the crossing records, so this server is the one evaluator of
//! its data): every `--budget-interval-ms`, each budget's usage this period, each
//! threshold crossed once, its webhook signed and retried ([`tally_budgets`]).
//!
//! A budget's `webhook.secretRef.name` is read as a mounted Secret would be:
//! `<--budget-secrets-dir>/<namespace>/<name>/url` and `…/secret`. `enforce` needs the
//! Kubernetes API (the operator); here it is reported and ignored.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Deserialize;
use tally_budgets::{Budget, Evaluator, Secrets, WebhookTarget};
use tally_crds::UsageBudget;
use tally_meter::budget::BudgetLedger;
use tally_meter::store::{Store, StoredMeter};

use crate::api::AppState;
use crate::catalog::manifests::manifest_files;

/// The evaluator's settings.
#[derive(Clone, Debug)]
pub struct BudgetConfig {
    /// The manifests folder.
    pub dir: PathBuf,
    /// How often budgets are evaluated.
    pub interval: Duration,
    /// Where webhook Secrets are (`<ns>/<name>/{url,secret}`).
    pub secrets_dir: Option<PathBuf>,
    /// Webhooks may go to any URL (else https or in-cluster Services only).
    pub any_url: bool,
    /// Tests: read "now" (Unix ms) from this file instead of the clock.
    pub clock_file: Option<PathBuf>,
}

struct FileSecrets {
    dir: Option<PathBuf>,
    any_url: bool,
}

impl Secrets for FileSecrets {
    fn webhook(&self, namespace: &str, name: &str) -> Result<WebhookTarget, String> {
        let Some(dir) = &self.dir else {
            return Err(format!(
                "secret {namespace}/{name}: start the server with --budget-secrets-dir DIR holding DIR/{namespace}/{name}/url and …/secret"
            ));
        };
        let read = |key: &str| {
            let path = dir.join(namespace).join(name).join(key);
            std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "secret {namespace}/{name}: cannot read {}: {e}",
                    path.display()
                )
            })
        };
        WebhookTarget::new(&read("url")?, &read("secret")?, self.any_url)
            .map_err(|e| format!("secret {namespace}/{name}: {e}"))
    }
}

/// The UsageBudgets below `dir`; invalid ones are logged (with file and field) and
/// skipped.
pub fn load(dir: &Path) -> Vec<Budget> {
    let mut out = Vec::new();
    for path in manifest_files(dir) {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let Ok(value) = serde_yaml::Value::deserialize(doc) else {
                break; // the Meter loader reports the syntax error
            };
            if value.get("kind").and_then(|k| k.as_str()) != Some("UsageBudget") {
                continue;
            }
            let at = format!("{} document {}", path.display(), i + 1);
            let b: UsageBudget = match serde_yaml::from_value(value) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(at, error = %e, "Invalid UsageBudget; skipped");
                    continue;
                }
            };
            if let Err(e) = check(&b) {
                tracing::error!(at, error = %e, "Invalid UsageBudget; skipped");
                continue;
            }
            if b.spec.enforce.is_some() {
                tracing::warn!(
                    at,
                    "UsageBudget enforce needs the operator (a ResourceQuota in Kubernetes); the standalone server only reports and calls webhooks"
                );
            }
            out.push(Budget::of(&b));
        }
    }
    out
}

/// What the CRD's CEL rules check, for budgets that do not pass the API server.
fn check(b: &UsageBudget) -> Result<(), String> {
    let s = &b.spec;
    if b.metadata.name.as_deref().unwrap_or_default().is_empty() {
        return Err("metadata.name: required".into());
    }
    if !s.limit.is_finite() || s.limit <= 0.0 {
        return Err("spec.limit: must be positive".into());
    }
    if s.per_subject && s.enforce.is_some() {
        return Err("spec.enforce: a namespace-wide ResourceQuota cannot be per subject".into());
    }
    if s.period.calendar.is_some() == s.period.rolling.is_some() {
        return Err(
            "spec.period: give calendar (DAY, WEEK, MONTH) or rolling (e.g. 24h), not both".into(),
        );
    }
    if s.period.rolling.is_some() && s.period.rolling_ms().is_none() {
        return Err("spec.period.rolling: minutes, hours or days, like 90m, 24h or 7d".into());
    }
    if s.thresholds.len() > 16 {
        return Err("spec.thresholds: at most 16".into());
    }
    for (i, t) in s.thresholds.iter().enumerate() {
        if t.percent.is_some() == t.value.is_some() {
            return Err(format!(
                "spec.thresholds[{i}]: give either percent or value"
            ));
        }
    }
    Ok(())
}

fn meter_of(state: &AppState, namespace: &str, meter: &str) -> Option<StoredMeter> {
    let catalog = state.catalog();
    catalog.get(namespace, meter).cloned().or_else(|| {
        catalog
            .list(namespace)
            .into_iter()
            .find(|m| m.meter.name == meter)
            .cloned()
    })
}

fn now_ms(clock: &Option<PathBuf>) -> i64 {
    clock
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis())
}

/// Evaluates the folder's budgets until the process ends.
pub fn spawn(
    state: AppState,
    store: Arc<dyn Store>,
    ledger: Arc<dyn BudgetLedger>,
    cfg: BudgetConfig,
) {
    let evaluator = Evaluator::new(store, ledger);
    let secrets = FileSecrets {
        dir: cfg.secrets_dir.clone(),
        any_url: cfg.any_url,
    };
    tokio::spawn(async move {
        let mut reported = [0u64; 4];
        loop {
            tokio::time::sleep(cfg.interval).await;
            let budgets = load(&cfg.dir);
            let now = now_ms(&cfg.clock_file);
            for b in &budgets {
                let out = evaluator
                    .evaluate(b, meter_of(&state, &b.namespace, &b.spec.meter), now)
                    .await;
                if let Some(c) = out
                    .status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Ready" && c.status == "False")
                {
                    tracing::warn!(namespace = %b.namespace, budget = %b.name, reason = %c.reason, "{}", c.message);
                }
            }
            evaluator.deliver(&budgets, &secrets).await;
            let counts = &evaluator.counts;
            let m = state.metrics();
            let now_counts = [
                counts.crossings.load(Ordering::Relaxed),
                counts.delivered.load(Ordering::Relaxed),
                counts.attempts_failed.load(Ordering::Relaxed),
                counts.given_up.load(Ordering::Relaxed),
            ];
            for (i, counter) in [
                &m.budget_crossings,
                &m.budget_webhooks_delivered,
                &m.budget_webhook_failures,
                &m.budget_webhooks_given_up,
            ]
            .into_iter()
            .enumerate()
            {
                counter.inc_by(now_counts[i] - reported[i]);
            }
            reported = now_counts;
        }
    });
}
