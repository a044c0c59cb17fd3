//! `podRuntime`: exact running time of pods on this node, per aligned window.
//!
//! The agent feeds every pod it sees on its node ([`PodRuntime::observe`],
//! [`PodRuntime::remove`]) and calls [`PodRuntime::tick`] about once a second. A window
//! `[a, b)` is closed at `b + settleSecs` (so a kubelet status update for a container
//! that ended near `b` has arrived) and then yields one event per pod that ran in it:
//! `duration_seconds` = seconds in the window during which at least one app container
//! ran (the union of their runs, see [`runs`]). Windows with zero running time are not
//! emitted; a pod shorter than a window still yields its window.
//!
//! Exactly once: the event id is a hash of (pod uid, window start, event type), and the
//! checkpoint `pod/<uid>` (first window not yet emitted, plus the runs seen so far) is
//! committed with the events. After a restart the agent resumes at that window, and
//! pods it had never seen are measured from their first run, from pod status. Pods
//! deleted while the agent was down are lost from the last checkpoint on (their
//! status is gone with them); the agent keeps a deleted pod until its last window
//! closed.
//!
//! Data: `pod`, `namespace`, `node`, `window_seconds`, `duration_seconds`, selected
//! labels (`label_<name>`), `data.tally.dev/<key>` annotations, the effective requests
//! and limits ([`resources`]), derived `cpu_request_core_seconds`,
//! `memory_request_gib_seconds`, `gpu_seconds`, and from cgroup v2 ([`cgroup`])
//! `cpu_usage_seconds` (CPU time between the samples taken at the window's two
//! boundaries; absent when the agent was not running at one of them),
//! `memory_current_bytes` and `memory_peak_bytes` at the window's end.
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tally_crds::collector::PodRuntimeSource;

use crate::pods::{annotation_data, data_key, selects, subject_of};
use crate::{Origin, Output, event_id};

pub mod cgroup;
pub mod resources;
pub mod runs;

use cgroup::CgroupSample;
use runs::Runs;

/// Most events one tick emits over all pods, so a long backlog (a new Collector over
/// long-running pods, or an agent that was down for hours) is spooled in bounded
/// batches; the rest follows on the next ticks.
const MAX_EVENTS_PER_TICK: usize = 500;

/// The durable state of one pod.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
struct Checkpoint {
    /// Start of the first window not yet emitted.
    until: i64,
    /// Runs seen: (container, start, end).
    runs: Vec<(String, i64, Option<i64>)>,
}

#[derive(Debug)]
struct Tracked {
    pod: Arc<Pod>,
    runs: Runs,
    /// Start of the first window not yet emitted (`None`: from the first run).
    until: Option<i64>,
    /// When the pod left the API (or this node).
    gone_at: Option<i64>,
    /// cgroup readings at window boundaries.
    samples: BTreeMap<i64, CgroupSample>,
}

/// The pod-runtime collector for one Collector on one node.
#[derive(Debug)]
pub struct PodRuntime {
    origin: Origin,
    cfg: PodRuntimeSource,
    node: String,
    pods: HashMap<String, Tracked>,
    /// Checkpoints loaded at start for pods not yet seen again.
    restored: HashMap<String, Checkpoint>,
    last_tick: Option<i64>,
}

impl PodRuntime {
    /// A collector resuming from its checkpoints (`pod/<uid>` → state).
    pub fn new(
        origin: Origin,
        cfg: PodRuntimeSource,
        node: &str,
        checkpoints: &BTreeMap<String, String>,
    ) -> PodRuntime {
        let restored = checkpoints
            .iter()
            .filter_map(|(k, v)| {
                let uid = k.strip_prefix("pod/")?;
                Some((uid.to_string(), serde_json::from_str(v).ok()?))
            })
            .collect();
        PodRuntime {
            origin,
            cfg,
            node: node.to_string(),
            pods: HashMap::new(),
            restored,
            last_tick: None,
        }
    }

    /// Whether this collector measures `pod` (selected, and bound to this node).
    pub fn wants(&self, pod: &Pod) -> bool {
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(self.node.as_str())
            && selects(&self.cfg.pods, &self.origin.namespace, pod)
    }

    /// Takes a pod's latest state (from a watch or list); shared, not copied.
    pub fn observe(&mut self, pod: &Arc<Pod>) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        if !self.wants(pod) {
            return;
        }
        let restored = self.restored.remove(&uid);
        let mut fresh = false;
        let t = self.pods.entry(uid).or_insert_with(|| {
            fresh = true;
            let (until, runs) = match restored {
                Some(c) => (
                    Some(c.until),
                    c.runs.into_iter().map(|(n, s, e)| ((n, s), e)).collect(),
                ),
                None => (None, Runs::new()),
            };
            Tracked {
                pod: Arc::clone(pod),
                runs,
                until,
                gone_at: None,
                samples: BTreeMap::new(),
            }
        });
        // Unchanged pods (same resourceVersion) need no work.
        let unchanged = pod.metadata.resource_version.is_some()
            && t.pod.metadata.resource_version == pod.metadata.resource_version;
        if fresh || !unchanged {
            t.pod = Arc::clone(pod);
            runs::observe(pod, &mut t.runs);
        }
    }

    /// The pod left the API (or this node) at `now`: open runs end there, and the pod
    /// is dropped once its last window has been emitted.
    pub fn remove(&mut self, uid: &str, now: i64) {
        if let Some(t) = self.pods.get_mut(uid)
            && t.gone_at.is_none()
        {
            runs::close_open(&mut t.runs, now);
            t.gone_at = Some(now);
        }
    }

    /// Marks every tracked pod that is not in `present` (uids) as gone at `now`.
    pub fn retain_present(&mut self, present: &std::collections::HashSet<String>, now: i64) {
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, t)| t.gone_at.is_none() && !present.contains(*uid))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.remove(&uid, now);
        }
    }

    /// The initial pod listing is complete: checkpoints of pods that no longer exist
    /// are dropped (their unshipped time is lost with their status).
    pub fn synced(&mut self) -> Output {
        let mut out = Output::default();
        for (uid, _) in self.restored.drain() {
            tracing::warn!(
                uid,
                "Pod deleted while the agent was down; its time since the last checkpoint is unknown"
            );
            out.checkpoints.insert(format!("pod/{uid}"), None);
        }
        out
    }

    fn window(&self) -> i64 {
        i64::from(self.cfg.window_secs.max(1))
    }

    /// Samples cgroups at window boundaries and emits every window that closed.
    pub fn tick(&mut self, now: i64) -> Output {
        let w = self.window();
        let boundary = now.div_euclid(w) * w;
        if self.cfg.cgroup.enabled && self.last_tick.is_some_and(|t| t < boundary) {
            let root = PathBuf::from(&self.cfg.cgroup.root);
            for (uid, t) in &mut self.pods {
                if t.gone_at.is_none() {
                    let qos = t.pod.status.as_ref().and_then(|s| s.qos_class.as_deref());
                    if let Some(s) = cgroup::read(&root, uid, qos) {
                        t.samples.insert(boundary, s);
                    }
                }
            }
        }
        self.last_tick = Some(now);

        let closed_end = (now - i64::from(self.cfg.settle_secs)).div_euclid(w) * w;
        let mut out = Output::default();
        let mut finished = Vec::new();
        for (uid, t) in &mut self.pods {
            let Some(first) = runs::first_start(&t.runs) else {
                if t.gone_at.is_some() {
                    finished.push(uid.clone());
                }
                continue;
            };
            let start = t.until.unwrap_or(first.div_euclid(w) * w);
            let open_until = t.gone_at.unwrap_or(i64::MAX);
            let mut a = start;
            while a < closed_end && out.events.len() < MAX_EVENTS_PER_TICK {
                let secs = runs::running_seconds(&t.runs, a, a + w, open_until);
                if secs > 0 {
                    out.events.push(window_event(
                        &self.origin,
                        &self.cfg,
                        &self.node,
                        uid,
                        t,
                        a,
                        w,
                        secs,
                    ));
                }
                a += w;
            }
            let end = a.max(start);
            if end > start || t.until.is_none() {
                t.until = Some(end);
                t.runs.retain(|_, e| e.is_none_or(|e| e > end));
                t.samples = t.samples.split_off(&(end - w));
                let done = t.gone_at.is_some_and(|g| end >= g);
                if done {
                    finished.push(uid.clone());
                } else {
                    let c = Checkpoint {
                        until: end,
                        runs: t
                            .runs
                            .iter()
                            .map(|((n, s), e)| (n.clone(), *s, *e))
                            .collect(),
                    };
                    out.checkpoints.insert(
                        format!("pod/{uid}"),
                        Some(serde_json::to_string(&c).expect("checkpoint serializes")),
                    );
                }
            }
        }
        for uid in finished {
            self.pods.remove(&uid);
            out.checkpoints.insert(format!("pod/{uid}"), None);
        }
        out
    }

    /// Number of pods being tracked.
    pub fn tracked(&self) -> usize {
        self.pods.len()
    }
}

#[allow(clippy::too_many_arguments)]
fn window_event(
    origin: &Origin,
    cfg: &PodRuntimeSource,
    node: &str,
    uid: &str,
    t: &Tracked,
    start: i64,
    w: i64,
    secs: i64,
) -> tally_crds::event::CloudEvent {
    let pod = &t.pod;
    let mut data = Map::new();
    annotation_data(pod, &mut data);
    for l in &cfg.labels {
        if let Some(v) = pod.metadata.labels.as_ref().and_then(|ls| ls.get(l)) {
            data.insert(format!("label_{}", data_key(l)), Value::String(v.clone()));
        }
    }
    data.insert(
        "pod".into(),
        json!(pod.metadata.name.clone().unwrap_or_default()),
    );
    data.insert(
        "namespace".into(),
        json!(
            pod.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into())
        ),
    );
    data.insert("node".into(), json!(node));
    data.insert("window_seconds".into(), json!(w));
    data.insert("duration_seconds".into(), json!(secs));
    if let Some(spec) = &pod.spec {
        let r = resources::effective(spec);
        let dur = secs as f64;
        for (k, v) in &r.requests {
            match k.as_str() {
                "cpu" => {
                    data.insert("cpu_request_cores".into(), json!(v));
                    data.insert("cpu_request_core_seconds".into(), json!(v * dur));
                }
                "memory" => {
                    data.insert("memory_request_bytes".into(), json!(v));
                    data.insert(
                        "memory_request_gib_seconds".into(),
                        json!(v / 1024f64.powi(3) * dur),
                    );
                }
                other => {
                    data.insert(format!("request_{}", data_key(other)), json!(v));
                }
            }
        }
        for (k, v) in &r.limits {
            let key = match k.as_str() {
                "cpu" => "cpu_limit_cores".to_string(),
                "memory" => "memory_limit_bytes".to_string(),
                other => format!("limit_{}", data_key(other)),
            };
            data.insert(key, json!(v));
        }
        let gpus = r.gpus();
        if gpus > 0.0 {
            data.insert("gpus".into(), json!(gpus));
        }
        data.insert("gpu_seconds".into(), json!(gpus * dur));
    }
    if let Some(end) = t.samples.get(&(start + w)) {
        if let Some(begin) = t.samples.get(&start) {
            let usec = end.usage_usec.saturating_sub(begin.usage_usec);
            data.insert("cpu_usage_seconds".into(), json!(usec as f64 / 1e6));
        }
        data.insert("memory_current_bytes".into(), json!(end.memory_current));
        if let Some(p) = end.memory_peak {
            data.insert("memory_peak_bytes".into(), json!(p));
        }
    }
    let start_s = start.to_string();
    origin.event(
        event_id(&[uid, &start_s, &origin.event_type]),
        subject_of(pod, cfg.subject_label.as_deref()),
        start * 1000,
        data,
    )
}

#[cfg(test)]
mod tests;
