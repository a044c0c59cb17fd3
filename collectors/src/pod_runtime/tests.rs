use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use tally_crds::CollectorSpec;
use tally_crds::collector::PodRuntimeSource;

use super::resources::{effective, parse_quantity};
use super::*;

/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600;

fn fixture(name: &str) -> std::sync::Arc<Pod> {
    let path = format!(
        "{}/tests/fixtures/pods/{name}.json",
        std::env::var("CARGO_MANIFEST_DIR").unwrap()
    );
    std::sync::Arc::new(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
}

fn collector(cfg: &str, checkpoints: &BTreeMap<String, String>) -> PodRuntime {
    let spec: CollectorSpec =
        serde_yaml::from_str(&format!("eventType: pod-runtime\npodRuntime: {cfg}\n")).unwrap();
    let source: PodRuntimeSource = spec.pod_runtime.clone().unwrap();
    PodRuntime::new(
        Origin::new("team-a", "gpu", &spec),
        source,
        "gpu-node-1",
        checkpoints,
    )
}

fn durations(out: &Output) -> Vec<(i64, i64)> {
    out.events
        .iter()
        .map(|e| {
            let t = tally_crds::event::parse_time_ms(&e.time).unwrap() / 1000 - T0;
            let d = e.data.as_ref().unwrap()["duration_seconds"]
                .as_i64()
                .unwrap();
            (t, d)
        })
        .collect()
}

fn applied(state: &mut BTreeMap<String, String>, out: &Output) {
    for (k, v) in &out.checkpoints {
        match v {
            Some(v) => state.insert(k.clone(), v.clone()),
            None => state.remove(k),
        };
    }
}

#[test]
fn quantities_parse_like_kubernetes() {
    assert_eq!(parse_quantity("500m"), Some(0.5));
    assert_eq!(parse_quantity("1Gi"), Some(1073741824.0));
    assert_eq!(parse_quantity("2"), Some(2.0));
    assert_eq!(parse_quantity("1.5"), Some(1.5));
    assert_eq!(parse_quantity("128974848"), Some(128974848.0));
    assert_eq!(parse_quantity("129e6"), Some(129e6));
    assert_eq!(parse_quantity("1E"), Some(1e18));
    assert_eq!(parse_quantity("64Mi"), Some(67108864.0));
    assert!((parse_quantity("100u").unwrap() - 100e-6).abs() < 1e-15);
    assert_eq!(parse_quantity("1k"), Some(1000.0));
    assert_eq!(parse_quantity("12Qi"), None);
    assert_eq!(parse_quantity(""), None);
}

#[test]
fn effective_requests_follow_the_scheduler() {
    let r = effective(fixture("train-running").spec.as_ref().unwrap());
    // The init container (2 CPUs, alone: it comes before the sidecar) beats the
    // app containers + sidecar (0.8); plus 0.25 overhead.
    assert!((r.requests["cpu"] - 2.25).abs() < 1e-9, "{r:?}");
    // Memory: 1Gi + 128Mi + 64Mi sidecar beats the init's 256Mi.
    assert_eq!(
        r.requests["memory"],
        (1024.0 + 128.0 + 64.0) * 1024.0 * 1024.0
    );
    assert_eq!(r.gpus(), 2.0);
    assert_eq!(r.limits["memory"], 2.0 * 1024f64.powi(3));
}

#[test]
fn running_time_is_exact_across_restarts_init_and_sidecars() {
    let mut state = BTreeMap::new();
    let mut c = collector("{}", &state);
    c.observe(&fixture("train-running"));
    let first = c.tick(T0 + 200);
    applied(&mut state, &first);
    // main ran 00:10–01:30 then from 01:35; logger 00:12–00:50; init and sidecar do
    // not count as app time.
    assert_eq!(durations(&first), vec![(0, 50), (60, 55), (120, 60)]);
    c.observe(&fixture("train-finished"));
    let second = c.tick(T0 + 320);
    assert_eq!(durations(&second), vec![(180, 60), (240, 3)]);
    let total: i64 = durations(&first)
        .iter()
        .chain(&durations(&second))
        .map(|d| d.1)
        .sum();
    assert_eq!(total, (90 - 10) + (243 - 95));

    let e = &first.events[2];
    assert_eq!(e.subject, "customer-42");
    assert_eq!(e.source, "tally/team-a/gpu");
    let d = e.data.as_ref().unwrap();
    assert_eq!(d["plan"], "pro");
    assert_eq!(d["gpu_seconds"], 120.0);
    assert_eq!(d["cpu_request_core_seconds"], 2.25 * 60.0);
    assert_eq!(d["memory_request_gib_seconds"], 1216.0 / 1024.0 * 60.0);
    assert_eq!(d["node"], "gpu-node-1");
    assert_eq!(d["pod"], "train-7f9c");
}

#[test]
fn a_window_is_closed_only_after_the_settle_time() {
    let mut c = collector("{settleSecs: 30}", &BTreeMap::new());
    c.observe(&fixture("train-running"));
    // 00:01:29: window [0,60) ended 29 s ago, not yet settled.
    assert!(c.tick(T0 + 89).events.is_empty());
    assert_eq!(durations(&c.tick(T0 + 90)), vec![(0, 50)]);
    // Nothing new until the next window settles; and no checkpoint writes at rest.
    assert!(c.tick(T0 + 100).is_empty());
}

#[test]
fn a_three_second_pod_is_counted() {
    let mut c = collector("{subjectLabel: team}", &BTreeMap::new());
    c.observe(&fixture("three-seconds"));
    let out = c.tick(T0 + 700);
    assert_eq!(durations(&out), vec![(600, 3)]);
    assert_eq!(out.events[0].subject, "search");
}

#[test]
fn a_pod_that_ended_while_the_agent_was_down_resumes_after_its_checkpoint() {
    let pod = fixture("ended-while-down");
    let uid = pod.metadata.uid.clone().unwrap();
    // Before going down the agent had shipped [0,60) and seen the container running.
    let checkpoint = serde_json::json!({"until": T0 + 60, "runs": [["c", T0 + 30, null]]});
    let state = BTreeMap::from([(format!("pod/{uid}"), checkpoint.to_string())]);
    let mut c = collector("{}", &state);
    c.observe(&pod);
    let out = c.tick(T0 + 400);
    assert_eq!(durations(&out), vec![(60, 60), (120, 45)]);
    let e = &out.events[0];
    assert_eq!(e.subject, "customer-7");
    let d = e.data.as_ref().unwrap();
    assert_eq!(d["gpu_seconds"], 60.0);
    assert_eq!(d["request_example_com_fpga"], 3.0);
}

#[test]
fn restarting_from_checkpoints_neither_loses_nor_repeats() {
    let mut state = BTreeMap::new();
    let mut a = collector("{}", &state);
    a.observe(&fixture("train-running"));
    let first = a.tick(T0 + 200);
    applied(&mut state, &first);
    drop(a);
    let mut b = collector("{}", &state);
    b.observe(&fixture("train-finished"));
    applied(&mut state, &b.synced());
    let second = b.tick(T0 + 320);
    assert_eq!(durations(&second), vec![(180, 60), (240, 3)]);
    applied(&mut state, &second);
    // The pod is finished and its last window emitted; once deleted, its checkpoint goes.
    b.remove(
        fixture("train-finished").metadata.uid.as_deref().unwrap(),
        T0 + 330,
    );
    let last = b.tick(T0 + 400);
    assert!(last.events.is_empty());
    applied(&mut state, &last);
    assert!(state.is_empty(), "{state:?}");
}

#[test]
fn ids_are_deterministic_and_differ_per_window() {
    let run = || {
        let mut c = collector("{}", &BTreeMap::new());
        c.observe(&fixture("train-running"));
        c.tick(T0 + 200).events
    };
    // ids and sources are stored: see crate::assert_pinned
    crate::assert_pinned(
        "podRuntime",
        &run(),
        &[
            "tally/team-a/gpu 63615fd08248551985857b0b8ae12c3e",
            "tally/team-a/gpu 134dd5f75506d48666e8235ebdaa8f46",
            "tally/team-a/gpu a9328b877d0618891fe4ecc7216f4657",
        ],
    );
    let ids = || run().into_iter().map(|e| e.id).collect::<Vec<_>>();
    let (x, y) = (ids(), ids());
    assert_eq!(x, y);
    assert_eq!(x.len(), 3);
    assert!(x[0] != x[1] && x[1] != x[2]);
}

#[test]
fn pods_of_other_nodes_namespaces_or_labels_are_ignored() {
    let mut c = collector(
        "{pods: {selector: {matchLabels: {app: serve}}}}",
        &BTreeMap::new(),
    );
    c.observe(&fixture("train-running"));
    assert_eq!(c.tracked(), 0);
    let mut other = (*fixture("train-running")).clone();
    other.spec.as_mut().unwrap().node_name = Some("node-2".into());
    let other = std::sync::Arc::new(other);
    let mut c = collector("{}", &BTreeMap::new());
    c.observe(&other);
    assert_eq!(c.tracked(), 0);
}

#[test]
fn a_deleted_checkpointed_pod_is_forgotten_after_sync() {
    let state = BTreeMap::from([(
        "pod/gone".to_string(),
        r#"{"until":0,"runs":[]}"#.to_string(),
    )]);
    let mut c = collector("{}", &state);
    let out = c.synced();
    assert_eq!(out.checkpoints.get("pod/gone"), Some(&None));
}

fn write_cgroup(dir: &std::path::Path, usage_usec: u64, current: u64, peak: Option<u64>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("cpu.stat"),
        format!("usage_usec {usage_usec}\nuser_usec 1\nsystem_usec 2\nnr_periods 0\n"),
    )
    .unwrap();
    std::fs::write(dir.join("memory.current"), format!("{current}\n")).unwrap();
    if let Some(p) = peak {
        std::fs::write(dir.join("memory.peak"), format!("{p}\n")).unwrap();
    }
}

#[test]
fn cgroups_are_found_in_both_driver_layouts() {
    let root = tempfile::tempdir().unwrap();
    let uid = "0f8e4c3a-2b1d-4e5f-9a8b-7c6d5e4f3a2b";
    let systemd = root.path().join(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f8e4c3a_2b1d_4e5f_9a8b_7c6d5e4f3a2b.slice",
    );
    write_cgroup(&systemd, 5_000_000, 1024, Some(4096));
    let s = cgroup::read(root.path(), uid, Some("Burstable")).unwrap();
    assert_eq!(
        (s.usage_usec, s.memory_current, s.memory_peak),
        (5_000_000, 1024, Some(4096))
    );

    let other = tempfile::tempdir().unwrap();
    write_cgroup(
        &other.path().join(format!("kubepods/besteffort/pod{uid}")),
        7,
        8,
        None,
    );
    let s = cgroup::read(other.path(), uid, Some("BestEffort")).unwrap();
    assert_eq!(
        (s.usage_usec, s.memory_current, s.memory_peak),
        (7, 8, None)
    );
    write_cgroup(&other.path().join("kubepods/podabc"), 9, 9, None);
    assert_eq!(
        cgroup::read(other.path(), "abc", Some("Guaranteed"))
            .unwrap()
            .usage_usec,
        9
    );
    assert!(cgroup::read(other.path(), "missing", None).is_none());
}

#[test]
fn cpu_usage_is_the_delta_between_window_boundaries() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f8e4c3a_2b1d_4e5f_9a8b_7c6d5e4f3a2b.slice",
    );
    let cfg = format!("{{cgroup: {{root: '{}'}}}}", root.path().display());
    let mut c = collector(&cfg, &BTreeMap::new());
    c.observe(&fixture("train-running"));
    write_cgroup(&dir, 1_000_000, 100, Some(300));
    c.tick(T0 + 119);
    c.tick(T0 + 120); // boundary 120 sampled
    write_cgroup(&dir, 31_500_000, 200, Some(500));
    let mut out = c.tick(T0 + 180); // boundary 180 sampled
    out.extend(c.tick(T0 + 200));
    let e = out
        .events
        .iter()
        .find(|e| e.time.ends_with("00:02:00.000Z"))
        .unwrap();
    let d: &Value = e.data.as_ref().unwrap();
    assert_eq!(d["cpu_usage_seconds"], 30.5);
    assert_eq!(d["memory_current_bytes"], 200);
    assert_eq!(d["memory_peak_bytes"], 500);
    // The window before had no sample at its start: no usage claimed.
    let before = out
        .events
        .iter()
        .find(|e| e.time.ends_with("00:01:00.000Z"))
        .unwrap();
    assert!(
        before
            .data
            .as_ref()
            .unwrap()
            .get("cpu_usage_seconds")
            .is_none()
    );
}

#[test]
fn a_long_backlog_is_emitted_in_bounded_ticks_without_loss() {
    let mut c = collector("{}", &BTreeMap::new());
    let mut pods = Vec::new();
    for i in 0..3 {
        let mut p = (*fixture("three-seconds")).clone();
        p.metadata.uid = Some(format!("uid-{i}"));
        p.metadata.name = Some(format!("p{i}"));
        let cs = &mut p
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0];
        cs.state = Some(
            serde_json::from_value(
                serde_json::json!({"running": {"startedAt": "2026-01-01T00:00:00Z"}}),
            )
            .unwrap(),
        );
        pods.push(std::sync::Arc::new(p));
    }
    for p in &pods {
        c.observe(p);
    }
    // Ten hours of running: 600 windows per pod, 1800 events in all.
    let now = T0 + 36_000 + 15;
    let mut total = 0;
    let mut ticks = 0;
    loop {
        let out = c.tick(now);
        assert!(out.events.len() <= MAX_EVENTS_PER_TICK);
        ticks += 1;
        if out.events.is_empty() {
            break;
        }
        total += out
            .events
            .iter()
            .map(|e| {
                e.data.as_ref().unwrap()["duration_seconds"]
                    .as_i64()
                    .unwrap()
            })
            .sum::<i64>();
    }
    assert_eq!(total, 3 * 36_000);
    assert!(ticks >= 4, "{ticks}");
}

#[test]
fn a_restored_pod_with_the_same_resource_version_is_still_read() {
    let mut pod = (*fixture("ended-while-down")).clone();
    pod.metadata.resource_version = Some("7".into());
    let pod = std::sync::Arc::new(pod);
    let uid = pod.metadata.uid.clone().unwrap();
    let state = BTreeMap::from([(
        format!("pod/{uid}"),
        format!(r#"{{"until":{},"runs":[]}}"#, T0 + 60),
    )]);
    let mut c = collector("{}", &state);
    c.observe(&pod);
    c.observe(&pod);
    assert_eq!(durations(&c.tick(T0 + 400)), vec![(60, 60), (120, 45)]);
}
