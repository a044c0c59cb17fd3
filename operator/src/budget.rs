//! UsageBudgets in a cluster: the leader evaluates every budget each
//! `--budget-interval-secs` ([`tally_budgets::Evaluator`] on the ClickHouse store, whose
//! `budget_crossings` table is the ledger), writes its status, publishes an Event per
//! crossing, applies or removes its ResourceQuota, and delivers webhooks.
//!
//! Why the leader: the ledger's "record, then act" needs one evaluator at a time, and
//! the operator already holds a Lease for that (a replica that loses it stops this loop
//! with its controllers).
//!
//! Enforcement: while a budget with `enforce.resourceQuota` is exceeded, a ResourceQuota
//! `tally-budget-<name>` in its namespace, owned by the budget (deleted with it), holds
//! `enforce.resourceQuota.hard`. The apiserver then refuses new pods that request those
//! resources; running pods keep running, and a Deployment shows the refusal in its
//! ReplicaSet's events (`exceeded quota`). When the period ends or the limit is raised
//! past the usage, the quota is deleted.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ResourceQuota, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tally_budgets::{Budget, Evaluator, Secrets, WebhookTarget};
use tally_clickhouse::Ch;
use tally_clickhouse::provision::{CutoverConfig, read_meters};
use tally_clickhouse::rollup::rollup_id;
use tally_clickhouse::store::ClickHouseStore;
use tally_crds::{Meter, UsageBudget};
use tally_meter::store::StoredMeter;

const FIELD_MANAGER: &str = "tally-operator-budgets";
/// The label that lets a namespace's budget webhooks go to any URL.
pub const ANY_URL_LABEL: &str = "tally.dev/webhook-any-url";

/// Secrets fetched for one round of deliveries.
struct Fetched(HashMap<(String, String), Result<WebhookTarget, String>>);

impl Secrets for Fetched {
    fn webhook(&self, namespace: &str, name: &str) -> Result<WebhookTarget, String> {
        self.0
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_else(|| Err(format!("secret {namespace}/{name} was not read")))
    }
}

/// The quota's name for a budget.
pub fn quota_name(budget: &str) -> String {
    format!("tally-budget-{budget}")
}

/// Ready meters by `(namespace, slug)` and `(namespace, name)`, as the server serves
/// them (from the rollup each status names).
async fn ready_meters(client: &kube::Client, ch: &Ch) -> HashMap<(String, String), StoredMeter> {
    let Ok(list) = Api::<Meter>::all(client.clone())
        .list(&ListParams::default())
        .await
    else {
        return HashMap::new();
    };
    let Ok(records) = read_meters(ch).await else {
        return HashMap::new();
    };
    let records: HashMap<String, _> = records
        .into_iter()
        .filter(|r| r.backfilled == 1)
        .map(|r| (r.rollup.clone(), r))
        .collect();
    let mut out = HashMap::new();
    for m in list {
        let Some(storage) = m.status.as_ref().and_then(|s| s.storage.as_ref()) else {
            continue;
        };
        let Some(compiled) = storage
            .rollup_table
            .as_ref()
            .and_then(|t| records.get(t))
            .and_then(|r| r.compile())
        else {
            continue;
        };
        let stored = StoredMeter {
            rollup_id: rollup_id(&compiled),
            meter: Arc::new(compiled),
        };
        let ns = m.effective_namespace().to_string();
        out.insert((ns.clone(), m.effective_slug()), stored.clone());
        out.insert((ns, m.name_any()), stored);
    }
    out
}

async fn fetch_secrets(client: &kube::Client, budgets: &[Budget]) -> Fetched {
    let mut out = HashMap::new();
    for b in budgets {
        let Some(w) = &b.spec.webhook else { continue };
        let key = (b.namespace.clone(), w.secret_ref.name.clone());
        if out.contains_key(&key) {
            continue;
        }
        let any_url = Api::<Namespace>::all(client.clone())
            .get_opt(&b.namespace)
            .await
            .ok()
            .flatten()
            .is_some_and(|n| n.labels().get(ANY_URL_LABEL).map(String::as_str) == Some("true"));
        let secret = Api::<Secret>::namespaced(client.clone(), &b.namespace)
            .get_opt(&w.secret_ref.name)
            .await;
        let target = match secret {
            Ok(Some(s)) => {
                let data = s.data.unwrap_or_default();
                let get = |k: &str| {
                    data.get(k)
                        .map(|v| String::from_utf8_lossy(&v.0).to_string())
                        .ok_or_else(|| {
                            format!("secret {}/{}: no key {k}", b.namespace, w.secret_ref.name)
                        })
                };
                get("url").and_then(|url| {
                    get("secret").and_then(|secret| {
                        WebhookTarget::new(&url, &secret, any_url).map_err(|e| {
                            format!("secret {}/{}: {e}", b.namespace, w.secret_ref.name)
                        })
                    })
                })
            }
            Ok(None) => Err(format!(
                "secret {}/{} does not exist",
                b.namespace, w.secret_ref.name
            )),
            Err(e) => Err(format!("secret {}/{}: {e}", b.namespace, w.secret_ref.name)),
        };
        out.insert(key, target);
    }
    Fetched(out)
}

async fn enforce(client: &kube::Client, b: &UsageBudget, exceeded: bool) -> Result<(), String> {
    let ns = b.namespace().unwrap_or_else(|| "default".into());
    let api: Api<ResourceQuota> = Api::namespaced(client.clone(), &ns);
    let name = quota_name(&b.name_any());
    match (&b.spec.enforce, exceeded) {
        (Some(e), true) => {
            let owner = json!({"apiVersion": "tally.dev/v1alpha1", "kind": "UsageBudget", "name": b.name_any(), "uid": b.uid().unwrap_or_default(), "controller": true, "blockOwnerDeletion": true});
            let hard: BTreeMap<&String, &String> = e.resource_quota.hard.iter().collect();
            let quota = json!({
                "apiVersion": "v1", "kind": "ResourceQuota",
                "metadata": {"name": name, "namespace": ns, "ownerReferences": [owner],
                             "labels": {"app.kubernetes.io/managed-by": "tally-operator", "tally.dev/budget": b.name_any()}},
                "spec": {"hard": hard}
            });
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&quota),
            )
            .await
            .map(drop)
            .map_err(|e| format!("applying ResourceQuota {ns}/{name}: {e}"))
        }
        _ => match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(budget = %format!("{ns}/{}", b.name_any()), quota = %name, "Budget no longer exceeded: ResourceQuota removed");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(format!("deleting ResourceQuota {ns}/{name}: {e}")),
        },
    }
}

/// Evaluates the cluster's budgets every `interval` until dropped.
pub async fn run(
    client: kube::Client,
    ch: Ch,
    cutover: CutoverConfig,
    recorder: Recorder,
    interval: Duration,
    metrics: Arc<crate::metrics::Metrics>,
) {
    use std::sync::atomic::Ordering;
    let mut reported = [0u64; 4];
    let store = Arc::new(ClickHouseStore::new(ch.clone(), None, false, cutover));
    let evaluator = Evaluator::new(store.clone(), store);
    let api: Api<UsageBudget> = Api::all(client.clone());
    loop {
        tokio::time::sleep(interval).await;
        let list = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::debug!(error = %e, "Cannot list UsageBudgets (is the CRD installed?)");
                continue;
            }
        };
        if list.is_empty() {
            continue;
        }
        let meters = ready_meters(&client, &ch).await;
        let now = chrono::Utc::now().timestamp_millis();
        let budgets: Vec<Budget> = list.iter().map(Budget::of).collect();
        let mut exceeded = 0i64;
        for (cr, b) in list.iter().zip(&budgets) {
            let meter = meters
                .get(&(b.namespace.clone(), b.spec.meter.clone()))
                .cloned();
            let mut out = evaluator.evaluate(b, meter, now).await;
            exceeded += out.exceeded as i64;
            for c in &out.crossed {
                let who = if c.subject.is_empty() {
                    "usage".to_string()
                } else {
                    format!("subject {}", c.subject)
                };
                let ev = Event {
                    type_: EventType::Warning,
                    reason: "ThresholdCrossed".into(),
                    note: Some(format!(
                        "{who} crossed {} of budget {} ({} of limit {})",
                        c.threshold,
                        b.name,
                        tally_crds::canonical_f64(c.usage),
                        tally_crds::canonical_f64(b.spec.limit)
                    )),
                    action: "Evaluate".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&ev, &cr.object_ref(&())).await {
                    tracing::warn!(error = %e, "Failed to publish a budget Event");
                }
            }
            let ready = out
                .status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready
                && cr.spec.enforce.is_some()
                && let Err(e) = enforce(&client, cr, out.exceeded).await
            {
                tracing::warn!(budget = %format!("{}/{}", b.namespace, b.name), error = %e, "Budget enforcement failed");
                out.status.conditions.push(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                        type_: "Enforced".into(),
                        status: "False".into(),
                        reason: "QuotaFailed".into(),
                        message: e,
                        last_transition_time: out.status.conditions[0].last_transition_time.clone(),
                        observed_generation: None,
                    },
                );
            }
            // keep transition times of unchanged conditions, so the status is quiet
            let previous = cr.status.clone().unwrap_or_default();
            for c in &mut out.status.conditions {
                if let Some(p) = previous
                    .conditions
                    .iter()
                    .find(|p| p.type_ == c.type_ && p.status == c.status && p.reason == c.reason)
                {
                    c.last_transition_time = p.last_transition_time.clone();
                }
            }
            out.status.observed_generation = cr.metadata.generation;
            if cr.status.as_ref() != Some(&out.status) {
                let patch = json!({"apiVersion": "tally.dev/v1alpha1", "kind": "UsageBudget", "status": out.status});
                let ns_api: Api<UsageBudget> = Api::namespaced(client.clone(), &b.namespace);
                if let Err(e) = ns_api
                    .patch_status(
                        &b.name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await
                {
                    tracing::warn!(budget = %format!("{}/{}", b.namespace, b.name), error = %e, "Cannot write a budget's status");
                }
            }
        }
        let secrets = fetch_secrets(&client, &budgets).await;
        evaluator.deliver(&budgets, &secrets).await;
        metrics.budgets_exceeded.set(exceeded);
        let c = &evaluator.counts;
        let now_counts = [
            c.crossings.load(Ordering::Relaxed),
            c.delivered.load(Ordering::Relaxed),
            c.attempts_failed.load(Ordering::Relaxed),
            c.given_up.load(Ordering::Relaxed),
        ];
        for (i, counter) in [
            &metrics.budget_crossings,
            &metrics.budget_webhooks_delivered,
            &metrics.budget_webhook_failures,
            &metrics.budget_webhooks_given_up,
        ]
        .into_iter()
        .enumerate()
        {
            counter.inc_by(now_counts[i] - reported[i]);
        }
        reported = now_counts;
    }
}
