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

    /// This catalog without the meters `keep` does not name (by namespace and slug), or
    /// `None` when it has none of those.
    fn without_other_than(&self, keep: &[Arc<CompiledMeter>]) -> Option<Catalog> {
        let kept = |m: &StoredMeter| {
            keep.iter()
                .any(|k| k.namespace == m.meter.namespace && k.slug == m.meter.slug)
        };
        let all: Vec<&StoredMeter> = self.meters.values().flat_map(|m| m.values()).collect();
        if all.iter().all(|m| kept(m)) {
            return None;
        }
        Some(Catalog::new(
            all.into_iter().filter(|m| kept(m)).cloned().collect(),
        ))
    }

    pub(crate) fn list(&self, ns: &str) -> Vec<&StoredMeter> {
        self.meters
            .get(ns)
            .map(|m| m.values().collect())
            .unwrap_or_default()
    }
}

/// Syncs `meters` into the store on a blocking thread (a sync may backfill), then
/// publishes them to the API. Meters that are gone stop being served first, before the
/// store drops their rollups, so no query meets a dropped table. Returns how many are
/// served and the rollups no meter uses any more (the caller drops them, or leaves that
/// to the operator).
pub async fn sync_and_publish(
    store: &Arc<dyn Store>,
    state: &AppState,
    meters: Vec<Arc<CompiledMeter>>,
) -> tally_meter::Result<(usize, Vec<i64>)> {
    if let Some(fewer) = state.catalog().without_other_than(&meters) {
        state.publish(fewer);
    }
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
