//! The one meter catalog: which meters the API serves, from manifests in a folder
//! (standalone, [`manifests`]) or from the cluster's Ready Meters ([`kubernetes`]).
//!
//! Either source hands its meters to [`sync_and_publish`]: the store makes itself
//! maintain exactly them (backfilling new ones), then the API serves them. Meters are
//! published only after the store has them, so a query never sees a meter its store
//! cannot answer yet.
pub mod kubernetes;
pub mod manifests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tally_meter::engine::CompiledMeter;
use tally_meter::store::{Store, StoredMeter};

use crate::api::AppState;

/// The meters the API serves, by namespace and slug.
#[derive(Debug, Default)]
pub struct Catalog {
    meters: HashMap<String, BTreeMap<String, StoredMeter>>,
}

impl Catalog {
    /// A catalog of stored meters.
    pub fn new(meters: Vec<StoredMeter>) -> Catalog {
        let mut by_ns: HashMap<String, BTreeMap<String, StoredMeter>> = HashMap::new();
        for m in meters {
            by_ns
                .entry(m.meter.namespace.clone())
                .or_default()
                .insert(m.meter.slug.clone(), m);
        }
        Catalog { meters: by_ns }
    }

    pub(crate) fn get(&self, ns: &str, slug: &str) -> Option<&StoredMeter> {
        self.meters.get(ns)?.get(slug)
    }

    pub(crate) fn list(&self, ns: &str) -> Vec<&StoredMeter> {
        self.meters
            .get(ns)
            .map(|m| m.values().collect())
            .unwrap_or_default()
    }
}

/// Syncs `meters` into the store on a blocking thread (a sync may backfill), then
/// publishes them to the API. Returns how many are served and the rollups no meter
/// uses any more (the caller drops them, or leaves that to the operator).
pub async fn sync_and_publish(
    store: &Arc<dyn Store>,
    state: &AppState,
    meters: Vec<Arc<CompiledMeter>>,
) -> tally_meter::Result<(usize, Vec<i64>)> {
    let store = store.clone();
    let synced = tokio::task::spawn_blocking(move || store.sync_meters(meters))
        .await
        .map_err(|e| {
            tally_meter::Error::Unavailable(format!("the meter sync task failed: {e}"))
        })??;
    let n = synced.meters.len();
    state.publish(Catalog::new(synced.meters));
    Ok((n, synced.stale))
}
