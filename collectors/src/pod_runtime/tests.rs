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
    assert_eq!(r.requests["nvidia.com/gpu"], 2.0);
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
    // Nothing new until the next window settles; and no pod checkpoint writes at rest
    // (the `watched` time is written every 10 s). Complete up to the open window.
    let rest = c.tick(T0 + 100);
    assert!(rest.events.is_empty());
    assert!(rest.checkpoints.keys().all(|k| k == "watched"), "{rest:?}");
    assert_eq!(rest.watermark.unwrap().until_ms, (T0 + 60) * 1000);
}

#[test]
fn the_watermark_waits_for_every_pods_pending_windows() {
    // a pod with DRA claims not yet resolved holds its windows (up to 120 s), and the
    // watermark with them
    let mut c = collector("{}", &BTreeMap::new());
    let mut pod = (*fixture("train-running")).clone();
    pod.spec.as_mut().unwrap().resource_claims = Some(vec![
        serde_json::from_value(serde_json::json!({"name": "gpu", "resourceClaimName": "c"}))
            .unwrap(),
    ]);
    c.observe(&std::sync::Arc::new(pod));
    let out = c.tick(T0 + 130);
    assert!(out.events.is_empty());
    assert_eq!(out.watermark.unwrap().until_ms, T0 * 1000);
}

#[test]
fn a_restart_is_a_gap_naming_the_pods_deleted_meanwhile() {
    let mut state = BTreeMap::new();
    let mut a = collector("{}", &state);
    a.observe(&fixture("train-running"));
    applied(&mut state, &a.tick(T0 + 200));
    assert_eq!(state.get("watched"), Some(&(T0 + 200).to_string()));
    drop(a);
    // the pod was deleted while no agent ran; the next one starts at T0 + 500
    let mut b = collector("{}", &state);
    let out = b.synced(T0 + 500, Some(T0 + 499));
    let gaps = out.watermark.unwrap().gaps;
    assert_eq!(gaps.len(), 1);
    // from the pod's first unsent window (before the last `watched`) to the restart
    assert_eq!(
        (gaps[0].from, gaps[0].to),
        ((T0 + 180) * 1000, (T0 + 500) * 1000)
    );
    assert_eq!(gaps[0].pods, vec!["team-a/train-7f9c".to_string()]);
    assert!(gaps[0].reason.contains("gpu-node-1"), "{}", gaps[0].reason);
    // a first start (no `watched`) has no gap
    let mut fresh = collector("{}", &BTreeMap::new());
    assert_eq!(fresh.synced(T0 + 500, Some(T0 + 499)).watermark, None);
    // nor a collector restarted by a reload in a process that kept watching
    let mut reloaded = collector("{}", &state);
    reloaded.observe(&fixture("train-running"));
    assert_eq!(reloaded.synced(T0 + 500, Some(T0 + 100)).watermark, None);
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
    applied(&mut state, &b.synced(0, None));
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
    assert!(state.keys().all(|k| k == "watched"), "{state:?}");
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
    let out = c.synced(0, None);
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

fn node_fixture(name: &str) -> accelerators::NodeInfo {
    let path = format!(
        "{}/tests/fixtures/nodes/{name}.json",
        std::env::var("CARGO_MANIFEST_DIR").unwrap()
    );
    let node: k8s_openapi::api::core::v1::Node =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    accelerators::NodeInfo::of(&node)
}

/// A pod on `node` running `[start, end)` whose one container requests `requests`.
fn gpu_pod(uid: &str, node: &str, requests: Value, start: i64, end: i64) -> std::sync::Arc<Pod> {
    let t = |s: i64| {
        chrono::DateTime::from_timestamp(s, 0)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    std::sync::Arc::new(
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": uid, "namespace": "team-a", "uid": uid, "resourceVersion": "1",
                         "annotations": {"tally.dev/subject": "acme"}},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x",
                     "resources": {"requests": requests.clone(), "limits": requests}}]},
            "status": {"containerStatuses": [{"name": "main", "image": "x", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "startedAt": t(start), "finishedAt": t(end)}}}]}
        }))
        .unwrap(),
    )
}

/// Every sharing mode, on nodes labelled as GFD and HAMi label them: the share of a
/// GPU each unit is worth, computed here from the rule (not from the code's tables).
#[test]
fn accelerator_shares_follow_each_sharing_mode() {
    use accelerators::{Sharing, uses};
    let whole = accelerators::whole_devices(&[]);
    let q = |pairs: &[(&str, &str)]| -> resources::Resources {
        let spec: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "c", "resources": {
                "requests": pairs.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect::<serde_json::Map<_, _>>()}}]
        }))
        .unwrap();
        effective(&spec)
    };
    // (node, requests, resource, sharing, GPUs, memory MiB, product)
    type Case<'a> = (
        &'a str,
        Vec<(&'a str, &'a str)>,
        &'a str,
        Sharing,
        Option<f64>,
        Option<f64>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "mig-mixed-a100",
            vec![("nvidia.com/mig-1g.5gb", "2")],
            "nvidia.com/mig-1g.5gb",
            Sharing::Mig,
            Some(2.0 / 7.0),
            Some(2.0 * 4864.0),
            "NVIDIA-A100-SXM4-40GB",
        ),
        (
            "mig-mixed-a100",
            vec![("nvidia.com/mig-2g.10gb", "1")],
            "nvidia.com/mig-2g.10gb",
            Sharing::Mig,
            Some(2.0 / 7.0),
            Some(9856.0),
            "NVIDIA-A100-SXM4-40GB",
        ),
        // a MIG device shared by 2 replicas
        (
            "mig-mixed-a100",
            vec![("nvidia.com/mig-3g.20gb", "1")],
            "nvidia.com/mig-3g.20gb",
            Sharing::Mig,
            Some(3.0 / 7.0 / 2.0),
            Some(19968.0 / 2.0),
            "NVIDIA-A100-SXM4-40GB",
        ),
        (
            "mig-mixed-a30",
            vec![("nvidia.com/mig-1g.6gb", "3")],
            "nvidia.com/mig-1g.6gb",
            Sharing::Mig,
            Some(3.0 / 4.0),
            Some(3.0 * 5952.0),
            "NVIDIA-A30",
        ),
        (
            "mig-single-h100",
            vec![("nvidia.com/gpu", "2")],
            "nvidia.com/gpu",
            Sharing::Mig,
            Some(2.0 / 7.0),
            Some(2.0 * 9984.0),
            "NVIDIA-H100-80GB-HBM3",
        ),
        (
            "time-slicing-t4",
            vec![("nvidia.com/gpu", "1")],
            "nvidia.com/gpu",
            Sharing::TimeSlicing,
            Some(1.0 / 4.0),
            Some(15360.0 / 4.0),
            "Tesla-T4",
        ),
        (
            "mps-l4",
            vec![("nvidia.com/gpu", "2")],
            "nvidia.com/gpu",
            Sharing::Mps,
            Some(2.0 / 3.0),
            Some(2.0 * 23034.0 / 3.0),
            "NVIDIA-L4",
        ),
        (
            "renamed-shared-a10g",
            vec![("nvidia.com/gpu.shared", "1")],
            "nvidia.com/gpu.shared",
            Sharing::TimeSlicing,
            Some(1.0 / 5.0),
            Some(23028.0 / 5.0),
            "NVIDIA-A10G",
        ),
        (
            "hami-a100",
            vec![
                ("nvidia.com/gpu", "2"),
                ("nvidia.com/gpucores", "30"),
                ("nvidia.com/gpumem", "4000"),
            ],
            "nvidia.com/gpu",
            Sharing::Hami,
            Some(2.0 * 0.30),
            Some(2.0 * 4000.0),
            "NVIDIA-A100-PCIE-40GB",
        ),
        // HAMi without gpucores: the whole GPU
        (
            "hami-a100",
            vec![("nvidia.com/gpu", "1")],
            "nvidia.com/gpu",
            Sharing::Hami,
            Some(1.0),
            None,
            "NVIDIA-A100-PCIE-40GB",
        ),
        (
            "no-gfd",
            vec![("nvidia.com/gpu", "3")],
            "nvidia.com/gpu",
            Sharing::Exclusive,
            Some(3.0),
            None,
            "unknown",
        ),
        (
            "no-gfd",
            vec![("amd.com/gpu", "2"), ("gpu.intel.com/millicores", "500")],
            "amd.com/gpu",
            Sharing::Exclusive,
            Some(2.0),
            None,
            "unknown",
        ),
        // unknown parent product: reported, not billed
        (
            "mig-unknown-product",
            vec![("nvidia.com/mig-1g.24gb", "1")],
            "nvidia.com/mig-1g.24gb",
            Sharing::Mig,
            None,
            Some(24064.0),
            "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition",
        ),
    ];
    for (node, requests, resource, sharing, gpus, memory, product) in cases {
        let info = node_fixture(node);
        let got = uses(&q(&requests), &info, &whole);
        assert_eq!(got.len(), 1, "{node} {requests:?}: {got:?}");
        let u = &got[0];
        let what = format!("{node} {requests:?}: {u:?}");
        assert_eq!(u.resource, resource, "{what}");
        assert_eq!(u.sharing, sharing, "{what}");
        assert_eq!(u.product.as_deref().unwrap_or("unknown"), product, "{what}");
        match (u.gpus, gpus) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-12, "{what}"),
            (None, None) => assert!(
                u.unknown.as_deref().is_some_and(|w| w.contains("1g.24gb")),
                "{what}"
            ),
            _ => panic!("{what}: expected {gpus:?}"),
        }
        match (u.memory_mib, memory) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-9, "{what}"),
            (None, None) => {}
            _ => panic!("{what}: expected memory {memory:?}"),
        }
        // GFD labels matter to NVIDIA resources only
        let nvidia = resource.starts_with("nvidia.com/");
        assert_eq!(u.labels_known, node != "no-gfd" || !nvidia, "{what}");
    }
    // Profiles that do not parse are reported too.
    let info = node_fixture("mig-mixed-a100");
    let got = uses(&q(&[("nvidia.com/mig-big", "1")]), &info, &whole);
    assert!(got[0].gpus.is_none() && got[0].unknown.is_some(), "{got:?}");
    // compute-instance profiles bill their compute slices
    let got = uses(&q(&[("nvidia.com/mig-1c.3g.20gb", "1")]), &info, &whole);
    assert!((got[0].gpus.unwrap() - 1.0 / 7.0).abs() < 1e-12, "{got:?}");
    assert_eq!(accelerators::mig_slices("NVIDIA-H200"), Some(7));
    assert_eq!(accelerators::mig_slices("NVIDIA-B200"), Some(7));
    assert_eq!(accelerators::mig_slices("Tesla-T4"), None);
}

/// GPU-seconds of each kind over windows whose running times are not multiples of 7
/// or of the replica counts, within 1e-9 of the hand computation; a pod with two MIG
/// profiles yields a second event (own id) carrying only the second accelerator.
#[test]
fn gpu_seconds_are_weighted_per_window_and_kind() {
    let state = BTreeMap::new();
    let mut c = collector("{settleSecs: 0}", &state);
    c.set_node(node_fixture("mig-mixed-a100"));
    // 01:13–02:06 in the windows [60,120) and [120,180): 47 s and 6 s
    c.observe(&gpu_pod(
        "p1",
        "gpu-node-1",
        serde_json::json!({"nvidia.com/mig-3g.20gb": "1", "nvidia.com/mig-1g.5gb": "2", "cpu": "1"}),
        T0 + 73,
        T0 + 126,
    ));
    let out = c.tick(T0 + 400);
    let rows: Vec<(i64, String, f64, Option<i64>)> = out
        .events
        .iter()
        .map(|e| {
            let d = e.data.as_ref().unwrap();
            (
                tally_crds::event::parse_time_ms(&e.time).unwrap() / 1000 - T0,
                d["gpu_resource"].as_str().unwrap().to_string(),
                d["gpu_seconds"].as_f64().unwrap(),
                d.get("duration_seconds").and_then(Value::as_i64),
            )
        })
        .collect();
    let want = [
        (60, "nvidia.com/mig-1g.5gb", 47.0 * 2.0 / 7.0, Some(47)),
        (60, "nvidia.com/mig-3g.20gb", 47.0 * 3.0 / 7.0 / 2.0, None),
        (120, "nvidia.com/mig-1g.5gb", 6.0 * 2.0 / 7.0, Some(6)),
        (120, "nvidia.com/mig-3g.20gb", 6.0 * 3.0 / 7.0 / 2.0, None),
    ];
    assert_eq!(rows.len(), want.len(), "{rows:?}");
    for (got, want) in rows.iter().zip(want) {
        assert_eq!(
            (got.0, got.1.as_str(), got.3),
            (want.0, want.1, want.3),
            "{rows:?}"
        );
        assert!((got.2 - want.2).abs() < 1e-9, "{rows:?}");
    }
    let d = out.events[0].data.as_ref().unwrap();
    assert_eq!(d["gpu_sharing"], "mig");
    assert_eq!(d["gpu_profile"], "1g.5gb");
    assert_eq!(d["gpu_product"], "NVIDIA-A100-SXM4-40GB");
    assert!(
        (d["gpu_memory_gib_seconds"].as_f64().unwrap() - 2.0 * 4864.0 / 1024.0 * 47.0).abs() < 1e-9
    );
    // the extra kind's event has its own id; the pod's event keeps the old id rule
    assert_ne!(out.events[0].id, out.events[1].id);
    assert_eq!(
        out.events[0].id,
        crate::event_id(&["p1", &(T0 + 60).to_string(), "pod-runtime"])
    );
    assert!(
        out.events[1]
            .data
            .as_ref()
            .unwrap()
            .get("cpu_request_cores")
            .is_none()
    );
}

/// A pod whose share is unknown is reported (event field + counter), never billed.
#[test]
fn an_unknown_share_is_reported_not_billed() {
    let state = BTreeMap::new();
    let mut c = collector("{settleSecs: 0}", &state);
    c.set_node(node_fixture("mig-unknown-product"));
    c.observe(&gpu_pod(
        "p2",
        "gpu-node-1",
        serde_json::json!({"nvidia.com/mig-1g.24gb": "1"}),
        T0 + 5,
        T0 + 50,
    ));
    let out = c.tick(T0 + 400);
    let d = out.events[0].data.as_ref().unwrap();
    assert!(d.get("gpu_seconds").is_none(), "{d:?}");
    assert!(
        d["gpu_unknown"]
            .as_str()
            .unwrap()
            .contains("not in tally's table"),
        "{d:?}"
    );
    assert_eq!(c.unknown_shares(), 1);
}

/// A pod the agent only ever saw deleted (created, finished and deleted between two
/// looks) is measured from its last state, once: seeing its deleted object again does
/// not start it over.
#[test]
fn a_pod_seen_only_deleted_counts_once() {
    let mut state = BTreeMap::new();
    let mut c = collector("{settleSecs: 0}", &state);
    let p = gpu_pod(
        "short",
        "gpu-node-1",
        serde_json::json!({"nvidia.com/gpu": "1"}),
        T0 + 61,
        T0 + 63,
    );
    c.observe(&p);
    c.retain_present(&Default::default(), T0 + 64);
    let out = c.tick(T0 + 200);
    applied(&mut state, &out);
    assert_eq!(durations(&out), vec![(60, 2)]);
    c.observe(&p);
    c.retain_present(&Default::default(), T0 + 201);
    assert!(c.tick(T0 + 300).events.is_empty());
    assert_eq!(c.tracked(), 0);
}

fn dra_fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = format!(
        "{}/tests/fixtures/dra/{name}.json",
        std::env::var("CARGO_MANIFEST_DIR").unwrap()
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A pod using ResourceClaim `claim` (by name) through pod claim `gpu`.
fn claim_pod(uid: &str, claim: &str, start: i64, end: i64) -> std::sync::Arc<Pod> {
    let mut p: Value = serde_json::to_value(&*gpu_pod(
        uid,
        "gpu-node-1",
        serde_json::json!({}),
        start,
        end,
    ))
    .unwrap();
    p["spec"]["resourceClaims"] = serde_json::json!([{"name": "gpu", "resourceClaimName": claim}]);
    p["spec"]["containers"][0]["resources"] = serde_json::json!({"claims": [{"name": "gpu"}]});
    std::sync::Arc::new(serde_json::from_value(p).unwrap())
}

/// DRA, from objects shaped as NVIDIA's DRA driver publishes them: a whole GPU claimed
/// by two pods is split per second among the pods running (13 s alone + 30 s halved
/// for one, 30 s halved + 9 s alone for the other); a MIG device (3g.20gb on an A100)
/// is 3/7 of a GPU. The windows wait while a running pod's claims are unresolved.
#[test]
fn dra_claims_are_priced_from_resource_slices_and_shared_claims_split() {
    use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
    let slice: ResourceSlice = dra_fixture("resourceslice");
    let reserve = |name: &str, uid: &str, pods: &[&str]| {
        let mut c: Value = dra_fixture(name);
        c["metadata"]["uid"] = Value::from(uid);
        c["status"]["reservedFor"] = pods
            .iter()
            .map(|p| serde_json::json!({"resource": "pods", "name": p, "uid": p}))
            .collect();
        serde_json::from_value::<ResourceClaim>(c).unwrap()
    };
    let shared = reserve("claim-shared-gpu", "claim-1", &["pa", "pb"]);
    let mig = reserve("claim-mig", "claim-2", &["pc"]);
    let state = BTreeMap::new();
    let mut c = collector("{settleSecs: 0}", &state);
    c.observe(&claim_pod("pa", "shared-gpu", T0 + 67, T0 + 110));
    c.observe(&claim_pod("pb", "shared-gpu", T0 + 80, T0 + 119));
    c.observe(&claim_pod("pc", "mig-3g", T0 + 61, T0 + 98));
    // not resolved yet: nothing is sent
    assert!(c.tick(T0 + 130).events.is_empty());
    let mut wanted: Vec<String> = c.unresolved_claims().into_iter().map(|(u, _)| u).collect();
    wanted.sort();
    assert_eq!(wanted, ["pa", "pb", "pc"]);
    for (uid, claim) in [("pa", &shared), ("pb", &shared), ("pc", &mig)] {
        c.claims_resolved(
            uid,
            dra::resolve(claim, std::slice::from_ref(&slice)).map(|d| vec![d]),
        );
    }
    let out = c.tick(T0 + 131);
    let mut got: Vec<(String, f64, String)> = out
        .events
        .iter()
        .map(|e| {
            let d = e.data.as_ref().unwrap();
            (
                d["pod"].as_str().unwrap().to_string(),
                d["gpu_seconds"].as_f64().unwrap(),
                d["gpu_sharing"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let want = [
        ("pa", 13.0 + 15.0),
        ("pb", 15.0 + 9.0),
        ("pc", 37.0 * 3.0 / 7.0),
    ];
    assert_eq!(got.len(), 3, "{got:?}");
    for ((pod, secs, sharing), (wpod, wsecs)) in got.iter().zip(want) {
        assert_eq!(pod, wpod);
        assert_eq!(sharing, "dra");
        assert!((secs - wsecs).abs() < 1e-9, "{got:?}");
    }
    let pc = out
        .events
        .iter()
        .find(|e| e.data.as_ref().unwrap()["pod"] == "pc")
        .unwrap();
    let d = pc.data.as_ref().unwrap();
    assert_eq!(d["gpu_profile"], "3g.20gb");
    assert_eq!(d["gpu_product"], "NVIDIA A100-SXM4-40GB");
    assert_eq!(d["gpu_resource"], "resource.k8s.io/claim/mig-3g");
    assert!((d["gpu_memory_gib_seconds"].as_f64().unwrap() - 19968.0 / 1024.0 * 37.0).abs() < 1e-9);
    let pa = out
        .events
        .iter()
        .find(|e| e.data.as_ref().unwrap()["pod"] == "pa")
        .unwrap();
    assert_eq!(pa.data.as_ref().unwrap()["gpu_claim_pods"], 2);
    // A claim not yet allocated says so.
    let mut unallocated: Value = dra_fixture("claim-mig");
    unallocated.as_object_mut().unwrap().remove("status");
    let e = dra::resolve(&serde_json::from_value(unallocated).unwrap(), &[slice]).unwrap_err();
    assert!(e.contains("not allocated"), "{e}");
}

/// The README's "Billing GPUs" example is what the collector produces.
#[test]
fn the_readme_gpu_event_is_what_the_collector_sends() {
    let readme = std::fs::read_to_string(format!(
        "{}/../README.md",
        std::env::var("CARGO_MANIFEST_DIR").unwrap()
    ))
    .unwrap();
    let block = readme
        .split("<!-- gpu-event -->\n```json\n")
        .nth(1)
        .and_then(|r| r.split("```\n<!-- /gpu-event -->").next())
        .expect("README has the gpu-event block");
    let state = BTreeMap::new();
    let mut c = collector("{settleSecs: 0}", &state);
    c.set_node(node_fixture("mig-mixed-a100"));
    c.observe(&gpu_pod(
        "train-7",
        "gpu-node-1",
        serde_json::json!({"nvidia.com/mig-3g.20gb": "1", "cpu": "4", "memory": "16Gi"}),
        T0 + 73,
        T0 + 120,
    ));
    let out = c.tick(T0 + 200);
    assert_eq!(out.events.len(), 1);
    let got = serde_json::to_value(&out.events[0]).unwrap();
    let shown: Value = serde_json::from_str(block).unwrap_or_else(|e| {
        panic!(
            "README's gpu-event block is not JSON ({e}); the collector sends:\n{}",
            serde_json::to_string_pretty(&got).unwrap()
        )
    });
    assert_eq!(
        shown,
        got,
        "README's gpu-event differs; the collector sends:\n{}",
        serde_json::to_string_pretty(&got).unwrap()
    );
}
