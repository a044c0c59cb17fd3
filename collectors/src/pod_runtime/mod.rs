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

pub mod accelerators;
pub mod cgroup;
pub mod dra;
pub mod resources;
pub mod runs;

use accelerators::{NodeInfo, Sharing, Use};
use cgroup::CgroupSample;
use dra::ClaimDevices;
use runs::Runs;

/// Most events one tick emits over all pods, so a long backlog (a new Collector over
/// long-running pods, or an agent that was down for hours) is spooled in bounded
/// batches; the rest follows on the next ticks.
const MAX_EVENTS_PER_TICK: usize = 500;

/// How long a pod whose last window was emitted is remembered, so that the agent's
/// cache of recently deleted pods (kept 5 minutes) does not start it over.
const REMEMBER_ENDED_SECS: i64 = 900;

/// The durable state of one pod.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
struct Checkpoint {
    /// Start of the first window not yet emitted.
    until: i64,
    /// Runs seen: (container, start, end).
    runs: Vec<(String, i64, Option<i64>)>,
    /// The pod's DRA claims, once resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claims: Option<Vec<ClaimDevices>>,
    /// `namespace/name`, to name the pod in a gap (absent in older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
}

/// The checkpoint key of the last time (Unix s) the collector was watching pods.
const WATCHED_KEY: &str = "watched";

/// How often `watched` is checkpointed (a restart's gap starts at most this early).
const WATCHED_EVERY_SECS: i64 = 10;

/// How long after a window ends its events wait for the pod's DRA claims to be
/// resolved before they are sent with the claims' share unknown.
const CLAIM_WAIT_SECS: i64 = 120;

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
    /// DRA claims: `Some` once resolved (empty for a pod without claims).
    claims: Option<Vec<ClaimDevices>>,
    /// Why the claims are not resolved (last attempt).
    claim_error: Option<String>,
}

/// Whether a pod names DRA claims.
fn has_claims(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.resource_claims.as_ref())
        .is_some_and(|c| !c.is_empty())
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
    /// This node's labels and annotations (accelerator sharing).
    node_info: NodeInfo,
    /// Other vendors' whole-device resources.
    whole_devices: Vec<String>,
    /// Pods whose last window was emitted, and when: their deleted objects, still in
    /// the agent's cache, are not measured again.
    ended: HashMap<String, i64>,
    /// Windows emitted with an accelerator whose share is unknown (not billed).
    unknown_shares: u64,
    /// Runs and claims of ended pods that held DRA claims, kept as long as `ended`
    /// so a pod sharing a claim with them is still split right.
    ended_claims: HashMap<String, (Vec<String>, Runs)>,
    /// The last `watched` checkpoint: loaded at start (when the previous process last
    /// watched pods), then written every [`WATCHED_EVERY_SECS`].
    watched: Option<i64>,
    /// Whether `watched` was loaded and not yet turned into the restart's gap.
    restarted: bool,
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
        let watched = checkpoints
            .get(WATCHED_KEY)
            .and_then(|v| v.parse::<i64>().ok());
        PodRuntime {
            watched,
            restarted: watched.is_some(),
            origin,
            whole_devices: accelerators::whole_devices(&cfg.whole_device_resources),
            cfg,
            node: node.to_string(),
            pods: HashMap::new(),
            restored,
            last_tick: None,
            node_info: NodeInfo::default(),
            ended: HashMap::new(),
            unknown_shares: 0,
            ended_claims: HashMap::new(),
        }
    }

    /// Whether this collector measures `pod` (selected, and bound to this node).
    pub fn wants(&self, pod: &Pod) -> bool {
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(self.node.as_str())
            && selects(&self.cfg.pods, &self.origin.namespace, pod)
    }

    /// Takes this node's labels and annotations (read from its Node object), which
    /// say how its accelerators are shared ([`accelerators`]).
    pub fn set_node(&mut self, info: NodeInfo) {
        if info != self.node_info {
            if info.known && !info.labels.keys().any(|k| k.starts_with("nvidia.com/")) {
                tracing::info!(
                    node = %self.node,
                    "Node has no GPU Feature Discovery labels: NVIDIA GPUs are counted as exclusive whole devices"
                );
            }
            self.node_info = info;
        }
    }

    /// Windows emitted so far with an accelerator whose share is unknown (reported in
    /// the event's `gpu_unknown`, not billed).
    pub fn unknown_shares(&self) -> u64 {
        self.unknown_shares
    }

    /// Pods whose DRA claims are to be resolved now (running, claims not yet
    /// resolved): (uid, namespace, pod). The agent reads the claims and its node's
    /// ResourceSlices and answers with [`PodRuntime::claims_resolved`].
    pub fn unresolved_claims(&self) -> Vec<(String, Arc<Pod>)> {
        self.pods
            .iter()
            .filter(|(_, t)| t.claims.is_none() && t.gone_at.is_none() && !t.runs.is_empty())
            .map(|(uid, t)| (uid.clone(), Arc::clone(&t.pod)))
            .collect()
    }

    /// The claims of pod `uid`, resolved (or why they are not, to retry).
    pub fn claims_resolved(&mut self, uid: &str, claims: Result<Vec<ClaimDevices>, String>) {
        if let Some(t) = self.pods.get_mut(uid) {
            match claims {
                Ok(c) => {
                    t.claims = Some(c);
                    t.claim_error = None;
                }
                Err(e) => t.claim_error = Some(e),
            }
        }
    }

    /// Takes a pod's latest state (from a watch or list, or the last state of a
    /// deleted pod); shared, not copied.
    pub fn observe(&mut self, pod: &Arc<Pod>) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        if !self.wants(pod) || self.ended.contains_key(&uid) {
            return;
        }
        let restored = self.restored.remove(&uid);
        let mut fresh = false;
        let t = self.pods.entry(uid).or_insert_with(|| {
            fresh = true;
            let (until, runs, claims) = match restored {
                Some(c) => (
                    Some(c.until),
                    c.runs.into_iter().map(|(n, s, e)| ((n, s), e)).collect(),
                    c.claims,
                ),
                None => (None, Runs::new(), None),
            };
            Tracked {
                pod: Arc::clone(pod),
                runs,
                until,
                gone_at: None,
                samples: BTreeMap::new(),
                claims: claims.or_else(|| (!has_claims(pod)).then(Vec::new)),
                claim_error: None,
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

    /// The initial pod listing is complete (at `now`, Unix s): checkpoints of pods
    /// that no longer exist are dropped (their unshipped time is lost with their
    /// status). If a previous process ran, the time since it last watched pods is a
    /// **gap**: a pod created and deleted meanwhile was never seen. The gap names the
    /// pods known to be affected (those deleted while no one watched).
    ///
    /// `watching_since`: since when this process's pod cache has watched (Unix s). A
    /// collector restarted within a process that kept watching (a configuration
    /// reload) has no gap.
    pub fn synced(&mut self, now: i64, watching_since: Option<i64>) -> Output {
        let mut out = Output::default();
        let mut lost = Vec::new();
        let mut from = self
            .watched
            .filter(|w| self.restarted && watching_since.is_none_or(|s| s > *w));
        for (uid, c) in self.restored.drain() {
            tracing::warn!(
                uid,
                "Pod deleted while the agent was down; its time since the last checkpoint is unknown"
            );
            out.checkpoints.insert(format!("pod/{uid}"), None);
            lost.push(c.pod.unwrap_or_else(|| format!("uid {uid}")));
            from = Some(from.map_or(c.until, |f| f.min(c.until)));
        }
        lost.sort();
        if let Some(from) = from.filter(|f| *f < now) {
            out.add_gaps(vec![tally_crds::Gap {
                from: from * 1000,
                to: now * 1000,
                reason: format!(
                    "no agent watched the pods of node {} in this interval (restarted or down): pods created and deleted meanwhile were not measured{}",
                    self.node,
                    if lost.is_empty() {
                        String::new()
                    } else {
                        "; the pods named were deleted meanwhile and their time after their last checkpoint is unknown".into()
                    }
                ),
                pods: lost,
            }]);
        }
        self.restarted = false;
        out
    }

    /// The pod watch may have missed pods in these intervals (Unix ms: it failed and
    /// had to list again): each is reported as a gap.
    pub fn blind(&self, intervals: &[(i64, i64)]) -> Output {
        let mut out = Output::default();
        out.add_gaps(
            intervals
                .iter()
                .map(|&(from, to)| tally_crds::Gap {
                    from,
                    to,
                    reason: format!(
                        "the watch of node {}'s pods failed and had to list them again: pods created and deleted in this interval were not measured",
                        self.node
                    ),
                    pods: Vec::new(),
                })
                .collect(),
        );
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
        // Runs of every pod holding a DRA claim, by claim uid, to split shared claims.
        let mut claim_runs: HashMap<String, Vec<(String, Runs, i64)>> = HashMap::new();
        for (uid, t) in &self.pods {
            for c in t.claims.iter().flatten() {
                claim_runs.entry(c.uid.clone()).or_default().push((
                    uid.clone(),
                    t.runs.clone(),
                    t.gone_at.unwrap_or(i64::MAX),
                ));
            }
        }
        for (uid, (claims, runs)) in &self.ended_claims {
            for c in claims {
                claim_runs.entry(c.clone()).or_default().push((
                    uid.clone(),
                    runs.clone(),
                    i64::MAX,
                ));
            }
        }
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
                // A running pod's claims are resolved within seconds; wait for them.
                if t.claims.is_none() && t.gone_at.is_none() && now - (a + w) < CLAIM_WAIT_SECS {
                    break;
                }
                let secs = runs::running_seconds(&t.runs, a, a + w, open_until);
                if secs > 0 {
                    let claim_uses = claim_uses(uid, t, &claim_runs, a, a + w, open_until);
                    let events = window_events(
                        &self.origin,
                        &self.cfg,
                        &Site {
                            node: &self.node,
                            info: &self.node_info,
                            whole: &self.whole_devices,
                        },
                        uid,
                        t,
                        a,
                        w,
                        secs,
                        claim_uses,
                    );
                    self.unknown_shares += events
                        .iter()
                        .filter(|e| {
                            e.data
                                .as_ref()
                                .is_some_and(|d| d.get("gpu_unknown").is_some())
                        })
                        .count() as u64;
                    out.events.extend(events);
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
                        claims: t.claims.clone(),
                        pod: Some(format!(
                            "{}/{}",
                            t.pod.metadata.namespace.as_deref().unwrap_or_default(),
                            t.pod.metadata.name.as_deref().unwrap_or_default()
                        )),
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
        self.ended.retain(|_, at| now - *at < REMEMBER_ENDED_SECS);
        let ended = &self.ended;
        self.ended_claims.retain(|uid, _| ended.contains_key(uid));
        for uid in finished {
            if let Some(t) = self.pods.get(&uid)
                && let Some(claims) = t.claims.as_ref().filter(|c| !c.is_empty())
            {
                let uids = claims.iter().map(|c| c.uid.clone()).collect();
                self.ended_claims
                    .insert(uid.clone(), (uids, t.runs.clone()));
            }
            self.pods.remove(&uid);
            out.checkpoints.insert(format!("pod/{uid}"), None);
            self.ended.insert(uid, now);
        }
        // Complete up to the first window not yet emitted, of any pod: windows before
        // `closed_end` are all out unless a pod's are still waiting.
        let pending = self
            .pods
            .values()
            .filter_map(|t| {
                Some(
                    t.until
                        .unwrap_or(runs::first_start(&t.runs)?.div_euclid(w) * w),
                )
            })
            .min();
        let until = pending.map_or(closed_end, |p| p.min(closed_end));
        out.watermark = Some(crate::Mark {
            until_ms: until * 1000,
            gaps: Vec::new(),
        });
        if self.watched.is_none_or(|t| now - t >= WATCHED_EVERY_SECS) {
            self.watched = Some(now);
            out.checkpoints
                .insert(WATCHED_KEY.into(), Some(now.to_string()));
        }
        out
    }

    /// The settle time (seconds): how long pod updates may take to arrive.
    pub fn settle_secs(&self) -> u32 {
        self.cfg.settle_secs
    }

    /// Number of pods being tracked.
    pub fn tracked(&self) -> usize {
        self.pods.len()
    }
}

/// Where a pod runs: the node, what its Node says, the whole-device resources.
struct Site<'a> {
    node: &'a str,
    info: &'a NodeInfo,
    whole: &'a [String],
}

/// The accelerator fields of one [`Use`] over `dur` seconds.
fn accelerator_data(data: &mut Map<String, Value>, u: &Use, dur: f64) {
    let dur = u.seconds.unwrap_or(dur);
    if let Some(n) = u.sharers {
        data.insert("gpu_claim_pods".into(), json!(n));
        data.insert("gpu_claim_seconds".into(), json!(dur));
    }
    data.insert("gpu_resource".into(), json!(u.resource));
    data.insert("gpu_sharing".into(), json!(u.sharing.as_str()));
    data.insert(
        "gpu_product".into(),
        json!(u.product.as_deref().unwrap_or("unknown")),
    );
    if let Some(p) = &u.profile {
        data.insert("gpu_profile".into(), json!(p));
    }
    data.insert("gpu_devices".into(), json!(u.devices));
    if let Some(r) = u.replicas {
        data.insert("gpu_replicas".into(), json!(r));
    }
    if !u.labels_known {
        data.insert("gpu_labels".into(), json!("absent"));
    }
    match (u.gpus, &u.unknown) {
        (Some(g), _) => {
            data.insert("gpus".into(), json!(g));
            data.insert("gpu_seconds".into(), json!(g * dur));
        }
        (None, why) => {
            data.remove("gpu_seconds");
            data.insert(
                "gpu_unknown".into(),
                json!(why.as_deref().unwrap_or("the share is unknown")),
            );
        }
    }
    if let Some(m) = u.memory_mib {
        data.insert("gpu_memory_mib".into(), json!(m));
        data.insert("gpu_memory_gib_seconds".into(), json!(m / 1024.0 * dur));
    }
}

/// The events of one pod and window: the pod's event (id of pod, window and type),
/// carrying its first accelerator, and one more per further kind of accelerator
/// (id of pod, window, type and resource) with the pod's identity and that
/// accelerator only, no running time or requests, so SUMs over `duration_seconds`
/// or requests count the pod once.
#[allow(clippy::too_many_arguments)]
fn window_events(
    origin: &Origin,
    cfg: &PodRuntimeSource,
    site: &Site<'_>,
    uid: &str,
    t: &Tracked,
    start: i64,
    w: i64,
    secs: i64,
    claim_uses: Vec<Use>,
) -> Vec<tally_crds::event::CloudEvent> {
    let pod = &t.pod;
    let node = site.node;
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
    // The identity every event of this pod and window shares.
    let identity = data.clone();
    data.insert("duration_seconds".into(), json!(secs));
    let mut uses = Vec::new();
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
        data.insert("gpu_seconds".into(), json!(0.0));
        uses = accelerators::uses(&r, site.info, site.whole);
        uses.extend(claim_uses);
        if let Some(first) = uses.first() {
            accelerator_data(&mut data, first, dur);
        }
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
    let subject = subject_of(pod, cfg.subject_label.as_deref());
    let mut events = vec![origin.event(
        event_id(&[uid, &start_s, &origin.event_type]),
        subject.clone(),
        start * 1000,
        data,
    )];
    for u in uses.iter().skip(1) {
        let mut data = identity.clone();
        accelerator_data(&mut data, u, secs as f64);
        events.push(origin.event(
            event_id(&[uid, &start_s, &origin.event_type, &u.resource]),
            subject.clone(),
            start * 1000,
            data,
        ));
    }
    events
}

#[cfg(test)]
mod tests;

/// The DRA claims of pod `uid` in window `[a, b)` as accelerator uses: each claim's
/// devices, billed for the pod's part of the time when the claim is shared
/// ([`dra::shared_seconds`]). Unresolved claims of a pod already gone are reported
/// unknown.
fn claim_uses(
    uid: &str,
    t: &Tracked,
    claim_runs: &HashMap<String, Vec<(String, Runs, i64)>>,
    a: i64,
    b: i64,
    open_until: i64,
) -> Vec<Use> {
    let base = |resource: String| Use {
        resource,
        sharing: Sharing::Dra,
        product: None,
        profile: None,
        devices: 0.0,
        replicas: None,
        gpus: None,
        memory_mib: None,
        unknown: None,
        labels_known: true,
        seconds: None,
        sharers: None,
    };
    let Some(claims) = &t.claims else {
        let mut u = base("resource.k8s.io/claims".into());
        u.unknown = Some(format!(
            "the pod's DRA claims were not resolved while it ran: {}",
            t.claim_error.as_deref().unwrap_or("no attempt succeeded")
        ));
        return if has_claims(&t.pod) {
            vec![u]
        } else {
            Vec::new()
        };
    };
    let own = runs::running_spans(&t.runs, a, b, open_until);
    claims
        .iter()
        .filter(|c| !c.devices.is_empty())
        .map(|c| {
            let mut u = base(format!("resource.k8s.io/claim/{}", c.claim));
            u.devices = c.devices.len() as f64;
            u.gpus = c.gpus();
            u.unknown = c.devices.iter().find_map(|d| d.unknown.clone());
            u.memory_mib = c.memory_mib();
            u.product = c.devices.first().and_then(|d| d.product.clone());
            let mut profiles: Vec<&str> = c
                .devices
                .iter()
                .filter_map(|d| d.profile.as_deref())
                .collect();
            profiles.dedup();
            if profiles.len() == 1 {
                u.profile = Some(profiles[0].to_string());
            }
            if c.sharers.len() > 1 {
                let known = claim_runs.get(&c.uid);
                let others: Vec<Vec<(i64, i64)>> = known
                    .into_iter()
                    .flatten()
                    .filter(|(other, _, _)| other != uid)
                    .map(|(_, r, open)| runs::running_spans(r, a, b, *open))
                    .collect();
                let seen: std::collections::HashSet<&str> = known
                    .into_iter()
                    .flatten()
                    .map(|(u, _, _)| u.as_str())
                    .collect();
                let unseen = c
                    .sharers
                    .iter()
                    .filter(|s| !seen.contains(s.as_str()))
                    .count();
                u.seconds = Some(dra::shared_seconds(&own, &others, unseen));
                u.sharers = Some(c.sharers.len());
            }
            u
        })
        .collect()
}
