//! The Meter controller: validates what the schema cannot, provisions the meter's
//! ClickHouse rollup with an exact backfill (through `tally_clickhouse`'s provisioning),
//! and tells the truth in the status.
//!
//! # States (the `Ready` condition's reason)
//! - `InvalidSpec`: a JSONPath is not singular or does not compile; the message names
//!   the field. Nothing is provisioned; an older rollup stays until the Meter is fixed or
//!   deleted.
//! - `SlugConflict`: an older Meter in the namespace serves the slug.
//! - `StorageUnavailable`: ClickHouse cannot be reached (the message names it) and the
//!   meter was never served. A served meter stays Ready (its queries answer 503, not
//!   404) with `Degraded=True` for the same reason. A new leader changes nothing until
//!   it has reached ClickHouse once.
//! - `Backfilling`: the rollup and its view exist; the events stored before the
//!   cutover are backfilled once the sink has passed it (see
//!   `tally_clickhouse::provision`). Not ready: queries would be incomplete.
//! - `Rebuilding`: a changed `groupBy` means a new rollup; the old one keeps serving
//!   (ready) until the new one is backfilled, then the status swaps `rollupTable`, and
//!   the old table is dropped after the drain period. The query API follows the status,
//!   so answers have no gap.
//! - `Provisioned`: ready.
//!
//! A finalizer drops the meter's views and rollups on delete (raw events stay), except
//! a rollup another Meter still uses (identical definitions share one).
//!
//! The status is written by server-side apply (field manager [`FIELD_MANAGER`]) only
//! when it differs from the stored one, and Kubernetes Events are published when the
//! `Ready` reason changes, so a meter at rest causes no writes.
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tally_clickhouse::Ch;
use tally_clickhouse::provision::{self, CutoverConfig};
use tally_clickhouse::rollup::{self, RollupSql, id_of_table};
use tally_crds::{Meter, MeterStatus, MeterStorage};
use tally_meter::engine::CompiledMeter;

use self::decide::{Facts, Next, Prepared, RollupStorage as _};
use crate::metrics::Metrics;
use crate::pipeline::Health;
use crate::status::{self, Verdict};
use crate::{Error, Result};

/// The finalizer guarding a meter's ClickHouse objects.
pub const FINALIZER: &str = "tally.dev/rollup";
/// The field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "tally-operator";
const CONTROLLER: &str = "meter";

/// What a reconcile needs.
pub struct Context {
    /// The API.
    pub client: Client,
    /// ClickHouse.
    pub ch: Ch,
    /// Cutover timing of new rollups.
    pub cutover: CutoverConfig,
    /// The pipeline's health.
    pub health: Arc<Health>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Kubernetes Events.
    pub recorder: Recorder,
    /// Every Meter (slug conflicts, shared rollups).
    pub store: Store<DeserializeGuard<Meter>>,
    /// How long a replaced rollup is kept before it is dropped.
    pub drain: Duration,
    /// How often a ready meter is checked again (reads only).
    pub resync: Duration,
    /// Consecutive failures per meter, for the backoff.
    pub failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("ch", &self.ch)
            .finish_non_exhaustive()
    }
}

fn key(m: &Meter) -> String {
    format!("{}/{}", m.effective_namespace(), m.name_any())
}

/// Reconciles one Meter (the controller's entry point).
pub async fn reconcile(obj: Arc<DeserializeGuard<Meter>>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let meter = match &obj.0 {
        Ok(m) => m.clone(),
        Err(invalid) => {
            // One malformed object must not wedge the controller: log it and move on.
            tracing::warn!(name = %obj.name_any(), namespace = ?obj.namespace(), error = %invalid, "Skipping a Meter that does not deserialize");
            ctx.metrics.failure(CONTROLLER, "malformed");
            return Ok(Action::await_change());
        }
    };
    let api: Api<Meter> = Api::namespaced(ctx.client.clone(), meter.effective_namespace());
    let name = key(&meter);
    let action = finalizer(&api, FINALIZER, Arc::new(meter), |event| async {
        match event {
            Finalizer::Apply(m) => apply(&m, &ctx).await,
            Finalizer::Cleanup(m) => cleanup(&m, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(name.clone(), Box::new(e)))?;
    ctx.failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&name);
    Ok(action)
}

/// The wait after `failures` consecutive failures: 1 s doubling to 5 min (both
/// controllers use it).
pub(crate) fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(8)).min(Duration::from_secs(300))
}

/// Requeues a failed meter with exponential backoff ([`backoff`]).
pub fn error_policy(obj: Arc<DeserializeGuard<Meter>>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failure(CONTROLLER, err.category());
    let name = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let n = failures.entry(name.clone()).or_default();
    *n += 1;
    let wait = backoff(*n);
    let mut chain = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        chain.push_str(": ");
        chain.push_str(&c.to_string());
        cause = c.source();
    }
    tracing::warn!(meter = %name, error = %chain, retry_in_s = wait.as_secs(), "Meter reconcile failed");
    Action::requeue(wait)
}

/// The Meter in `meter`'s namespace that owns its slug: the oldest (then by name).
fn slug_owner(store: &Store<DeserializeGuard<Meter>>, meter: &Meter) -> Option<String> {
    let slug = meter.effective_slug();
    store
        .state()
        .iter()
        .filter_map(|g| g.0.as_ref().ok())
        .filter(|m| m.effective_namespace() == meter.effective_namespace())
        .filter(|m| m.metadata.deletion_timestamp.is_none() && m.effective_slug() == slug)
        .min_by_key(|m| {
            (
                m.metadata.creation_timestamp.clone().map(|t| t.0),
                m.name_any(),
            )
        })
        .map(|m| m.name_any())
}

/// Rollup tables named in a status.
fn tables_of(status: Option<&MeterStatus>) -> Vec<String> {
    let Some(s) = status.and_then(|s| s.storage.as_ref()) else {
        return Vec::new();
    };
    [
        &s.rollup_table,
        &s.pending_rollup_table,
        &s.retiring_rollup_table,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect()
}

/// Rollup tables other Meters use.
fn used_by_others(store: &Store<DeserializeGuard<Meter>>, meter: &Meter) -> BTreeSet<String> {
    store
        .state()
        .iter()
        .filter_map(|g| g.0.as_ref().ok())
        .filter(|m| m.metadata.uid != meter.metadata.uid)
        .flat_map(|m| tables_of(m.status.as_ref()))
        .collect()
}

/// ClickHouse behind the decision's storage seam.
struct ClickHouseRollups<'a> {
    ch: &'a Ch,
    cutover: &'a CutoverConfig,
}

impl decide::RollupStorage for ClickHouseRollups<'_> {
    async fn prepare(&self, m: &CompiledMeter) -> tally_meter::Result<provision::MeterRecord> {
        provision::prepare(self.ch, m, self.cutover).await
    }

    async fn cutover_passed(&self, cutover: i64) -> tally_meter::Result<Option<String>> {
        provision::cutover_passed(self.ch, cutover, self.cutover).await
    }

    async fn backfill(
        &self,
        m: &CompiledMeter,
        rec: provision::MeterRecord,
    ) -> tally_meter::Result<()> {
        provision::backfill(self.ch, m, rec).await
    }

    async fn drop_rollups(&self, ids: &[i64]) -> tally_meter::Result<()> {
        provision::drop_rollups(self.ch, ids).await
    }
}

/// Runs the decision ([`decide::decide`]), asking storage what it needs, until it is a
/// status to write.
async fn apply(meter: &Meter, ctx: &Context) -> Result<Action> {
    let storage = ClickHouseRollups {
        ch: &ctx.ch,
        cutover: &ctx.cutover,
    };
    let compiled = CompiledMeter::compile(meter);
    let spec_errors = match &compiled {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect(),
    };
    let mut facts = Facts {
        spec_errors,
        namespace: meter.effective_namespace().to_string(),
        slug: meter.effective_slug(),
        slug_owner: slug_owner(&ctx.store, meter).filter(|o| *o != meter.name_any()),
        health_checked: ctx.health.checked(),
        clickhouse_problem: ctx.health.clickhouse(),
        kafka_problem: ctx.health.kafka(),
        storage: meter.status.as_ref().and_then(|s| s.storage.clone()),
        wanted: compiled
            .as_ref()
            .map(|c| RollupSql::new(c).table)
            .unwrap_or_default(),
        used_elsewhere: used_by_others(&ctx.store, meter),
        prepared: None,
        cutover_wait: None,
        backfilled_now: false,
        retiring_dropped: false,
        now: Utc::now(),
        drain: ctx.drain,
        resync: ctx.resync,
    };
    let fail = |e| Error::ProvisionRollup(key(meter), e);
    let mut record = None;
    loop {
        // decide asks storage only for a meter that compiled
        let compiled = || compiled.as_ref().expect("the spec compiled");
        match decide::decide(&facts) {
            Next::Report {
                verdict,
                storage,
                requeue,
            } => {
                write_status(meter, ctx, &verdict, storage.map(|s| *s)).await?;
                return Ok(requeue.map_or_else(Action::await_change, Action::requeue));
            }
            Next::Wait(d) => return Ok(Action::requeue(d)),
            Next::Prepare => {
                let rec = storage.prepare(compiled()).await.map_err(fail)?;
                facts.prepared = Some(Prepared {
                    backfilled: rec.backfilled != 0,
                    cutover: rec.cutover as i64,
                });
                record = Some(rec);
            }
            Next::CheckCutover(cutover) => {
                facts.cutover_wait = Some(storage.cutover_passed(cutover).await.map_err(fail)?);
            }
            Next::Backfill => {
                let rec = record.clone().expect("prepared before the backfill");
                storage.backfill(compiled(), rec).await.map_err(fail)?;
                facts.backfilled_now = true;
            }
            Next::DropRetiring(id) => {
                let old = rollup::table_name(id);
                storage
                    .drop_rollups(&[id])
                    .await
                    .map_err(|e| Error::DropRollup(old.clone(), e))?;
                tracing::info!(meter = %key(meter), rollup = %old, "Dropped the replaced rollup after its drain period");
                facts.retiring_dropped = true;
            }
        }
        facts.now = Utc::now();
    }
}

/// Writes the status if it changed; publishes an Event when the `Ready` reason changed.
async fn write_status(
    meter: &Meter,
    ctx: &Context,
    verdict: &Verdict,
    storage: Option<MeterStorage>,
) -> Result<()> {
    let previous = meter.status.clone().unwrap_or_default();
    let desired = status::desired(
        &previous,
        meter.metadata.generation,
        &meter.effective_slug(),
        verdict,
        storage,
        k8s_openapi::jiff::Timestamp::now(),
    );
    if meter.status.as_ref() == Some(&desired) {
        return Ok(());
    }
    let api: Api<Meter> = Api::namespaced(ctx.client.clone(), meter.effective_namespace());
    let patch = json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Meter", "status": desired});
    api.patch_status(
        &meter.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|e| Error::ApplyStatus(key(meter), e))?;
    let degraded_before = status::find(meter.status.as_ref(), "Degraded")
        .filter(|c| c.status == "True")
        .map(|c| c.reason.clone());
    if let Some((reason, message)) = &verdict.degraded
        && degraded_before.as_deref() != Some(*reason)
    {
        tracing::warn!(meter = %key(meter), reason, message = %message, "Meter degraded");
        publish(meter, ctx, EventType::Warning, reason, message).await;
    }
    let before = status::find(meter.status.as_ref(), "Ready").map(|c| c.reason.clone());
    if before.as_deref() != Some(verdict.reason) {
        tracing::info!(meter = %key(meter), ready = verdict.ready, reason = verdict.reason, message = %verdict.message, "Meter status changed");
        publish(
            meter,
            ctx,
            if verdict.ready {
                EventType::Normal
            } else {
                EventType::Warning
            },
            verdict.reason,
            &verdict.message,
        )
        .await;
    }
    Ok(())
}

/// Publishes a Kubernetes Event about `meter` (best effort: a failure is logged).
async fn publish(meter: &Meter, ctx: &Context, type_: EventType, reason: &str, note: &str) {
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &meter.object_ref(&())).await {
        tracing::warn!(meter = %key(meter), error = %e, "Failed to publish a Kubernetes Event");
    }
}

/// Drops the meter's views and rollups (raw events stay), except those another Meter uses.
async fn cleanup(meter: &Meter, ctx: &Context) -> Result<Action> {
    let (ns, name) = (meter.effective_namespace(), meter.name_any());
    let mut tables: BTreeSet<String> = tables_of(meter.status.as_ref()).into_iter().collect();
    let records = provision::read_meters(&ctx.ch)
        .await
        .map_err(|e| Error::DropRollup(key(meter), e))?;
    tables.extend(
        records
            .into_iter()
            .filter(|r| r.namespace == ns && r.name == name)
            .map(|r| r.rollup),
    );
    let others = used_by_others(&ctx.store, meter);
    let ids: Vec<i64> = tables
        .iter()
        .filter(|t| !others.contains(*t))
        .filter_map(|t| id_of_table(t))
        .collect();
    provision::drop_rollups(&ctx.ch, &ids)
        .await
        .map_err(|e| Error::DropRollup(key(meter), e))?;
    tracing::info!(meter = %key(meter), rollups = ids.len(), "Dropped the meter's views and rollups; raw events stay");
    publish(
        meter,
        ctx,
        EventType::Normal,
        "RollupDropped",
        &format!(
            "dropped {} rollup(s) of the deleted meter; raw events stay",
            ids.len()
        ),
    )
    .await;
    Ok(Action::await_change())
}

mod decide;
#[cfg(test)]
mod tests;
