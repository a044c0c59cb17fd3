//! Meters from the Kubernetes API (`tally-server --kubernetes`): in a cluster the
//! operator provisions rollups and the server serves exactly the meters whose status
//! says `Ready=True`, each from the rollup its status names (`status.storage.rollupTable`)
//! with the definition recorded for that rollup in ClickHouse. So while a changed
//! `groupBy` is being backfilled the previous rollup keeps answering, and the swap
//! happens when the operator writes the new table into the status: no gap.
//!
//! The meter list is a kube-runtime reflector (watch, with relist on 410); the served
//! catalog is recomputed after changes (debounced) and every [`RECHECK`].
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tally_crds::Meter;

use crate::api::AppState;
use tally_clickhouse::Ch;
use tally_clickhouse::provision::read_meters;
use tally_meter::engine::CompiledMeter;
use tally_meter::store::Store;

/// How often the catalog is recomputed without a change (records may change).
pub const RECHECK: Duration = Duration::from_secs(30);

/// `(namespace, name) → rollup table` of the meters whose `Ready` condition is `True`.
pub fn ready_rollups(meters: &[Arc<DeserializeGuard<Meter>>]) -> HashMap<(String, String), String> {
    meters
        .iter()
        .filter_map(|g| g.0.as_ref().ok())
        .filter(|m| m.metadata.deletion_timestamp.is_none())
        .filter_map(|m| {
            let status = m.status.as_ref()?;
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let storage = status.storage.as_ref().filter(|s| s.backfilled)?;
            let table = storage.rollup_table.clone()?;
            ready.then(|| {
                (
                    (
                        m.effective_namespace().to_string(),
                        m.metadata.name.clone().unwrap_or_default(),
                    ),
                    table,
                )
            })
        })
        .collect()
}

async fn recompute(
    ch: &Ch,
    store: &Arc<dyn Store>,
    state: &AppState,
    meters: &[Arc<DeserializeGuard<Meter>>],
) -> tally_meter::Result<usize> {
    let wanted = ready_rollups(meters);
    let records: HashMap<String, _> = read_meters(ch)
        .await?
        .into_iter()
        .filter(|r| r.backfilled == 1)
        .map(|r| (r.rollup.clone(), r))
        .collect();
    let mut compiled: Vec<Arc<CompiledMeter>> = Vec::new();
    for ((ns, name), table) in wanted {
        match records.get(&table).and_then(|r| r.compile()) {
            Some(mut m) => {
                // Identical definitions share a rollup; serve each meter under its own name.
                if m.namespace == ns {
                    m.name = name;
                    compiled.push(Arc::new(m));
                }
            }
            None => {
                tracing::warn!(meter = %format!("{ns}/{name}"), rollup = %table, "A Ready meter's rollup is not recorded in ClickHouse; not served")
            }
        }
    }
    compiled.sort_by(|a, b| (&a.namespace, &a.slug).cmp(&(&b.namespace, &b.slug)));
    // Rollups are the operator's: stale ones are its to drop.
    let (n, _stale) = super::sync_and_publish(store, state, compiled).await?;
    Ok(n)
}

/// Serves the Ready meters of the cluster until the process ends.
pub async fn serve_meters(client: kube::Client, ch: Ch, store: Arc<dyn Store>, state: AppState) {
    let api: Api<DeserializeGuard<Meter>> = Api::all(client);
    let (reader, writer) = reflector::store();
    let (tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
    let events = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .for_each(move |e| {
            if let Err(e) = &e {
                tracing::warn!(error = %e, "Meter watch failed; retrying");
            }
            let _ = tx.try_send(());
            futures::future::ready(())
        });
    tokio::spawn(events);
    if reader.wait_until_ready().await.is_err() {
        tracing::error!("The Meter watch ended before its first list");
        return;
    }
    let mut served: Option<usize> = None;
    loop {
        // Debounce: a burst of status changes is one recompute.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while changed.try_recv().is_ok() {}
        match recompute(&ch, &store, &state, &reader.state()).await {
            Ok(n) => {
                if served != Some(n) {
                    tracing::info!(meters = n, "Serving the Ready meters of the cluster");
                }
                served = Some(n);
            }
            Err(e) => {
                tracing::error!(error = %e, "Failed to refresh the served meters; the previous ones stay")
            }
        }
        let _ = tokio::time::timeout(RECHECK, changed.recv()).await;
    }
}
