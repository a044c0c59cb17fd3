//! Running intervals of a pod's app containers, from pod status.
//!
//! Kubernetes reports, per container, the current `state` (running since `startedAt`,
//! or terminated with `startedAt`/`finishedAt`) and the `lastState` (the previous
//! termination only). Every observation is merged into a map keyed by (container,
//! start), so runs seen over time accumulate. What cannot be known: a container that
//! restarted twice or more between two observations the agent made (e.g. while it was
//! down) loses all but its last previous run, because the status keeps only one. Times
//! are whole seconds, the precision Kubernetes reports.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ContainerState, Pod};

/// (container name, start second) → end second (`None` while running).
pub type Runs = BTreeMap<(String, i64), Option<i64>>;

fn merge_state(name: &str, state: Option<&ContainerState>, runs: &mut Runs) {
    let Some(state) = state else { return };
    if let Some(r) = &state.running
        && let Some(t) = &r.started_at
    {
        runs.entry((name.to_string(), t.0.as_second()))
            .or_insert(None);
    }
    if let Some(t) = &state.terminated
        && let (Some(s), Some(f)) = (&t.started_at, &t.finished_at)
    {
        let (s, f) = (s.0.as_second(), f.0.as_second());
        runs.insert((name.to_string(), s), Some(f.max(s)));
    }
}

/// Merges what `pod`'s status says about its app containers into `runs`.
pub fn observe(pod: &Pod, runs: &mut Runs) {
    for cs in pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
    {
        merge_state(&cs.name, cs.state.as_ref(), runs);
        merge_state(&cs.name, cs.last_state.as_ref(), runs);
    }
}

/// Ends every open run at `at` (the pod is gone and no later status will come).
pub fn close_open(runs: &mut Runs, at: i64) {
    for ((_, start), end) in runs.iter_mut() {
        if end.is_none() {
            *end = Some(at.max(*start));
        }
    }
}

/// Seconds within `[from, to)` during which at least one app container ran; open runs
/// count as running up to `open_until`.
pub fn running_seconds(runs: &Runs, from: i64, to: i64, open_until: i64) -> i64 {
    running_spans(runs, from, to, open_until)
        .iter()
        .map(|(s, e)| e - s)
        .sum()
}

/// The union of the runs within `[from, to)`, as disjoint sorted spans.
pub fn running_spans(runs: &Runs, from: i64, to: i64, open_until: i64) -> Vec<(i64, i64)> {
    let mut spans: Vec<(i64, i64)> = runs
        .iter()
        .map(|((_, s), e)| ((*s).max(from), e.unwrap_or(open_until).min(to)))
        .filter(|(s, e)| s < e)
        .collect();
    spans.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::new();
    for (s, e) in spans {
        match out.last_mut() {
            Some((_, ce)) if s <= *ce => *ce = (*ce).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The earliest start among the runs.
pub fn first_start(runs: &Runs) -> Option<i64> {
    runs.keys().map(|(_, s)| *s).min()
}
