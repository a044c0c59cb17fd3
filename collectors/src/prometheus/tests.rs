use std::collections::BTreeMap;

use serde_json::Value;
use tally_crds::CollectorSpec;

use super::*;

const NOW: i64 = 1_767_225_600_000;

fn collector(yaml: &str, checkpoints: &BTreeMap<String, String>) -> PrometheusScrape {
    let spec: CollectorSpec =
        serde_yaml::from_str(&format!("eventType: gpu\nprometheus:\n{yaml}")).unwrap();
    PrometheusScrape::new(
        Origin::new("team-a", "dcgm", &spec),
        spec.prometheus.clone().unwrap(),
        checkpoints,
        NOW / 1000,
    )
    .unwrap()
}

fn target(url: &str) -> Target {
    Target {
        url: url.into(),
        pod: None,
    }
}

fn no_pods(_: &str, _: &str) -> Option<String> {
    None
}

fn values(out: &Output) -> Vec<(String, f64)> {
    out.events
        .iter()
        .map(|e| {
            let d = e.data.as_ref().unwrap();
            (e.subject.clone(), d["value"].as_f64().unwrap())
        })
        .collect()
}

const COUNTERS: &str = "  targets: [http://vllm:8000/metrics]\n  subjectLabel: tenant\n  metrics:\n  - {name: vllm_generation_tokens_total, kind: counter}\n";

fn tokens(a: f64, b: f64) -> String {
    format!(
        "# HELP vllm_generation_tokens_total Generated tokens.\n# TYPE vllm_generation_tokens_total counter\nvllm_generation_tokens_total{{tenant=\"acme\",model=\"llama\"}} {a}\nvllm_generation_tokens_total{{tenant=\"globex\",model=\"llama\"}} {b}\nother_metric 5\n"
    )
}

#[test]
fn counters_become_reset_aware_deltas_after_a_baseline() {
    let mut c = collector(COUNTERS, &BTreeMap::new());
    let t = target("http://vllm:8000/metrics");
    let first = c.process(&t, &tokens(100.0, 50.0), NOW, &no_pods).unwrap();
    assert!(first.events.is_empty(), "the first scrape is a baseline");
    assert!(first.checkpoints.contains_key("t/http://vllm:8000/metrics"));
    let second = c
        .process(&t, &tokens(130.0, 50.0), NOW + 15_000, &no_pods)
        .unwrap();
    assert_eq!(values(&second), vec![("acme".into(), 30.0)]);
    // globex's process restarted: 7 is below 50, so 7 new tokens.
    let third = c
        .process(&t, &tokens(131.0, 7.0), NOW + 30_000, &no_pods)
        .unwrap();
    let mut v = values(&third);
    v.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(v, vec![("acme".into(), 1.0), ("globex".into(), 7.0)]);
    let d = third.events[0].data.as_ref().unwrap();
    assert_eq!(d["model"], "llama");
    assert_eq!(d["metric"], "vllm_generation_tokens_total");
}

#[test]
fn a_restart_with_a_checkpoint_loses_and_repeats_nothing() {
    let mut state = BTreeMap::new();
    let mut c = collector(COUNTERS, &state);
    let t = target("http://vllm:8000/metrics");
    for (i, (a, b)) in [(100.0, 50.0), (130.0, 60.0)].iter().enumerate() {
        let out = c
            .process(&t, &tokens(*a, *b), NOW + i as i64 * 15_000, &no_pods)
            .unwrap();
        for (k, v) in out.checkpoints {
            state.insert(k, v.unwrap());
        }
    }
    drop(c);
    let mut again = collector(COUNTERS, &state);
    let out = again
        .process(&t, &tokens(135.0, 61.0), NOW + 45_000, &no_pods)
        .unwrap();
    let total: f64 = values(&out).iter().map(|v| v.1).sum();
    assert_eq!(
        total, 6.0,
        "only what happened after the last shipped scrape"
    );
}

#[test]
fn a_new_series_of_a_known_target_counts_from_zero() {
    let mut c = collector(COUNTERS, &BTreeMap::new());
    let t = target("http://vllm:8000/metrics");
    c.process(
        &t,
        "vllm_generation_tokens_total{tenant=\"acme\"} 10\n",
        NOW,
        &no_pods,
    )
    .unwrap();
    let out = c
        .process(
            &t,
            "vllm_generation_tokens_total{tenant=\"acme\"} 10\nvllm_generation_tokens_total{tenant=\"new\"} 4\n",
            NOW + 1000,
            &no_pods,
        )
        .unwrap();
    assert_eq!(values(&out), vec![("new".into(), 4.0)]);
}

#[test]
fn gauges_are_samples_and_dcgm_pods_resolve_to_their_subject() {
    let mut c = collector(
        "  targets: [http://dcgm:9400/metrics]\n  metrics:\n  - {nameRegex: 'DCGM_FI_DEV_GPU_UTIL|DCGM_FI_DEV_FB_USED', matchLabels: {gpu: '0'}, kind: gauge}\n",
        &BTreeMap::new(),
    );
    let body = "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\nDCGM_FI_DEV_GPU_UTIL{gpu=\"0\",UUID=\"GPU-1\",pod=\"train-7f9c\",namespace=\"team-a\"} 87\nDCGM_FI_DEV_GPU_UTIL{gpu=\"1\",UUID=\"GPU-2\",pod=\"x\",namespace=\"team-a\"} 10\nDCGM_FI_DEV_GPU_UTIL{gpu=\"0\",pod=\"unknown\",namespace=\"team-b\"} 5\n";
    let lookup = |ns: &str, pod: &str| {
        (ns == "team-a" && pod == "train-7f9c").then(|| "customer-42".to_string())
    };
    let out = c
        .process(&target("http://dcgm:9400/metrics"), body, NOW, &lookup)
        .unwrap();
    assert_eq!(
        values(&out),
        vec![("customer-42".into(), 87.0), ("team-a".into(), 5.0)]
    );
    // Gauges need no baseline, and a second identical scrape emits again.
    let again = c
        .process(
            &target("http://dcgm:9400/metrics"),
            body,
            NOW + 1000,
            &lookup,
        )
        .unwrap();
    assert_eq!(again.events.len(), 2);
    assert_ne!(again.events[0].id, out.events[0].id);
}

#[test]
fn ids_are_deterministic() {
    let run = || {
        let mut c = collector(COUNTERS, &BTreeMap::new());
        let t = target("http://vllm:8000/metrics");
        c.process(&t, &tokens(1.0, 1.0), NOW, &no_pods).unwrap();
        c.process(&t, &tokens(2.0, 2.0), NOW + 1, &no_pods)
            .unwrap()
            .events
    };
    // ids and sources are stored: see crate::assert_pinned
    crate::assert_pinned(
        "prometheus",
        &run(),
        &[
            "tally/team-a/dcgm e8967e2c6e1acc90ccc5a8f88ed16062",
            "tally/team-a/dcgm 1786c95a8a539431a382992ed5fa8995",
        ],
    );
    assert_eq!(run(), run());
}

#[test]
fn a_bad_regex_names_the_field() {
    let spec: CollectorSpec = serde_yaml::from_str(
        "eventType: x\nprometheus:\n  targets: [http://a]\n  metrics: [{nameRegex: '(', kind: gauge}]\n",
    )
    .unwrap();
    let err = PrometheusScrape::new(
        Origin::new("a", "b", &spec),
        spec.prometheus.clone().unwrap(),
        &BTreeMap::new(),
        0,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("spec.prometheus.metrics[0].nameRegex"),
        "{err}"
    );
}

#[test]
fn pod_targets_are_the_running_selected_pods() {
    let c = collector(
        "  pods: {port: 9400, selector: {matchLabels: {app: dcgm}}}\n  metrics: [{name: a, kind: gauge}]\n",
        &BTreeMap::new(),
    );
    let pod = |name: &str, app: &str, phase: &str| -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "team-a", "labels": {"app": app}},
                "status": {"phase": phase, "podIP": "10.0.0.7"}
            }))
            .unwrap(),
        )
    };
    let t = c.targets(&[
        pod("a", "dcgm", "Running"),
        pod("b", "web", "Running"),
        pod("c", "dcgm", "Pending"),
    ]);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].url, "http://10.0.0.7:9400/metrics");
    let _: Value = Value::Null;
}

const INTEGRAL: &str = "  targets: [http://dcgm:9400/metrics]\n  intervalSecs: 15\n  subjectLabel: customer\n  metrics:\n  - {name: DCGM_FI_PROF_GR_ENGINE_ACTIVE, kind: gaugeIntegral, windowSecs: 60}\n";

fn busy(v: f64) -> String {
    format!(
        "# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge\nDCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu=\"0\",customer=\"acme\"}} {v}\n"
    )
}

/// The integral's state is checkpointed with the events: a collector restarted from
/// the checkpoints sends the same windows, with the same ids, as one that ran on.
#[test]
fn gauge_integrals_resume_from_their_checkpoint() {
    let t = target("http://dcgm:9400/metrics");
    let scrapes = [
        (0, 0.5),
        (15_000, 1.0),
        (30_000, 0.25),
        (45_000, 0.75),
        (60_000, 0.1),
        (75_000, 0.2),
    ];
    let mut straight = collector(INTEGRAL, &BTreeMap::new());
    let mut all = Vec::new();
    for (dt, v) in scrapes {
        all.extend(
            straight
                .process(&t, &busy(v), NOW + dt, &no_pods)
                .unwrap()
                .events,
        );
    }
    let mut state = BTreeMap::new();
    let mut resumed = Vec::new();
    for (dt, v) in scrapes {
        // a fresh collector for every scrape, from the checkpoints so far
        let mut c = collector(INTEGRAL, &state);
        let out = c.process(&t, &busy(v), NOW + dt, &no_pods).unwrap();
        for (k, v) in out.checkpoints {
            match v {
                Some(v) => state.insert(k, v),
                None => state.remove(&k),
            };
        }
        resumed.extend(out.events);
    }
    assert_eq!(all, resumed);
    assert_eq!(
        values(&Output {
            events: all.clone(),
            ..Default::default()
        }),
        [("acme".to_string(), 15.0 * (0.5 + 1.0 + 0.25 + 0.75))]
    );
    let d = all[0].data.as_ref().unwrap();
    assert_eq!(d["sampled_seconds"], 60.0);
    assert_eq!(d["window_seconds"], 60);
    assert_eq!(d["metric"], "DCGM_FI_PROF_GR_ENGINE_ACTIVE");
    // the series is gone: its open window is sent once it ended
    let mut c = collector(INTEGRAL, &state);
    assert!(
        c.process(&t, "", NOW + 90_000, &no_pods)
            .unwrap()
            .events
            .is_empty()
    );
    let out = c.process(&t, "", NOW + 120_000, &no_pods).unwrap();
    assert_eq!(values(&out), [("acme".to_string(), 15.0 * 0.1)]);
    assert_eq!(
        out.checkpoints.get("i/http://dcgm:9400/metrics"),
        Some(&None)
    );
}
