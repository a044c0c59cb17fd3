use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde_json::{Value, json};
use tally_crds::CollectorSpec;

use super::*;

const NOW: i64 = 1_767_225_600_000;

fn tailer(yaml: &str, checkpoints: &BTreeMap<String, String>) -> LogTailer {
    let spec: CollectorSpec =
        serde_yaml::from_str(&format!("eventType: tokens\nlogs:\n{yaml}")).unwrap();
    spec.validate().unwrap();
    LogTailer::new(
        Origin::new("team-a", "llm-logs", &spec),
        spec.logs.clone().unwrap(),
        checkpoints,
    )
    .unwrap()
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn apply(state: &mut BTreeMap<String, String>, out: &Output) {
    for (k, v) in &out.checkpoints {
        match v {
            Some(v) => state.insert(k.clone(), v.clone()),
            None => state.remove(k),
        };
    }
}

fn tokens(out: &Output) -> Vec<i64> {
    out.events
        .iter()
        .map(|e| e.data.as_ref().unwrap()["tokens"].as_i64().unwrap())
        .collect()
}

const POD: &str = r#"{"metadata": {"name": "chat-0", "namespace": "team-a", "uid": "11111111-2222-3333-4444-555555555555",
  "annotations": {"tally.dev/subject": "customer-9"}}, "spec": {"nodeName": "n1", "containers": [{"name": "app"}]}}"#;

fn pod_setup() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let root = tempfile::tempdir().unwrap();
    let dir = root
        .path()
        .join("team-a_chat-0_11111111-2222-3333-4444-555555555555/app");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = format!(
        "  pods: {{}}\n  podLogRoot: '{}'\n  parser: {{kind: json}}\n  mapping: {{when: '$.tokens', data: {{tokens: '$.tokens', model: '$.model'}}}}\n",
        root.path().display()
    );
    (root, dir, cfg)
}

fn files(t: &LogTailer) -> Vec<LogFile> {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_str(POD).unwrap();
    t.files(&[std::sync::Arc::new(pod)])
}

#[test]
fn cri_partial_lines_are_merged_and_mapped() {
    let (_root, dir, cfg) = pod_setup();
    let log = dir.join("0.log");
    append(
        &log,
        "2026-01-01T00:00:01.5Z stdout F {\"tokens\": 5, \"model\": \"m1\"}\n",
    );
    append(&log, "2026-01-01T00:00:02Z stdout P {\"tokens\": \n");
    append(&log, "2026-01-01T00:00:02Z stdout P 12, \"model\"\n");
    append(&log, "2026-01-01T00:00:03Z stdout F : \"m2\"}\n");
    append(
        &log,
        "2026-01-01T00:00:04Z stderr F plain text, not usage\n",
    );
    append(&log, "2026-01-01T00:00:05Z stdout F {\"other\": 1}\n");
    let mut t = tailer(&cfg, &BTreeMap::new());
    let out = t.poll(&files(&t), NOW);
    assert_eq!(tokens(&out), vec![5, 12]);
    let e = &out.events[1];
    assert_eq!(e.subject, "customer-9");
    assert_eq!(e.time, "2026-01-01T00:00:03.000Z");
    assert_eq!(e.data.as_ref().unwrap()["model"], "m2");
    assert_eq!(out.events[0].time, "2026-01-01T00:00:01.500Z");
    assert_eq!(t.skipped(), 2);
}

#[test]
fn an_unfinished_line_or_partial_run_waits_for_its_end() {
    let (_root, dir, cfg) = pod_setup();
    let log = dir.join("0.log");
    append(
        &log,
        "2026-01-01T00:00:01Z stdout F {\"tokens\": 1}\n2026-01-01T00:00:02Z stdout P {\"tokens\":\n2026-01-01T00:00:02Z stdout F  2",
    );
    let mut t = tailer(&cfg, &BTreeMap::new());
    let out = t.poll(&files(&t), NOW);
    assert_eq!(tokens(&out), vec![1]);
    // The checkpoint stops before the P piece: its line has not ended yet.
    let pos: Value =
        serde_json::from_str(out.checkpoints.values().next().unwrap().as_ref().unwrap()).unwrap();
    assert_eq!(pos["offset"], 44);
    append(&log, "}\n");
    let out = t.poll(&files(&t), NOW + 1000);
    assert_eq!(tokens(&out), vec![2]);
    assert!(t.poll(&files(&t), NOW + 2000).events.is_empty());
}

#[test]
fn a_restart_from_the_checkpoint_loses_and_repeats_nothing() {
    let (_root, dir, cfg) = pod_setup();
    let log = dir.join("0.log");
    for i in 1..=3 {
        append(
            &log,
            &format!("2026-01-01T00:00:0{i}Z stdout F {{\"tokens\": {i}}}\n"),
        );
    }
    let mut state = BTreeMap::new();
    let mut t = tailer(&cfg, &state);
    let first = t.poll(&files(&t), NOW);
    apply(&mut state, &first);
    // More lines, then the agent dies before committing what it read: the next agent
    // re-reads them with the same ids.
    append(&log, "2026-01-01T00:00:04Z stdout F {\"tokens\": 4}\n");
    let lost = t.poll(&files(&t), NOW + 1000);
    drop(t);
    let mut again = tailer(&cfg, &state);
    let redo = again.poll(&files(&again), NOW + 2000);
    assert_eq!(tokens(&redo), vec![4]);
    assert_eq!(redo.events[0].id, lost.events[0].id);
    apply(&mut state, &redo);
    let mut third = tailer(&cfg, &state);
    assert!(third.poll(&files(&third), NOW + 3000).events.is_empty());
    let all: Vec<i64> = tokens(&first).into_iter().chain(tokens(&redo)).collect();
    assert_eq!(all, vec![1, 2, 3, 4]);
    let events: Vec<_> = first.events.into_iter().chain(redo.events).collect();
    // ids and sources are stored: see crate::assert_pinned
    crate::assert_pinned(
        "logs",
        &events,
        &[
            "tally/team-a/llm-logs e272e7aded3d0978d64afe86d1a51b89",
            "tally/team-a/llm-logs cc419a5c6e04e264b222402c51bb3ca0",
            "tally/team-a/llm-logs 45777074610cf291461b813bef280bc6",
            "tally/team-a/llm-logs 103751d801a949fdcee198568d0a9093",
        ],
    );
}

#[test]
fn rotation_finishes_the_old_file_and_starts_the_new_one() {
    let (_root, dir, cfg) = pod_setup();
    let log = dir.join("0.log");
    append(&log, "2026-01-01T00:00:01Z stdout F {\"tokens\": 1}\n");
    let mut t = tailer(&cfg, &BTreeMap::new());
    let a = t.poll(&files(&t), NOW);
    append(&log, "2026-01-01T00:00:02Z stdout F {\"tokens\": 2}\n");
    std::fs::rename(&log, dir.join("0.log.20260101-000002")).unwrap();
    append(&log, "2026-01-01T00:00:03Z stdout F {\"tokens\": 3}\n");
    std::fs::write(dir.join("0.log.20251231-000000.gz"), b"compressed").unwrap();
    let b = t.poll(&files(&t), NOW + 1000);
    let mut got: Vec<i64> = tokens(&a).into_iter().chain(tokens(&b)).collect();
    got.sort();
    assert_eq!(got, vec![1, 2, 3]);
}

#[test]
fn truncation_restarts_under_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("usage.log");
    append(&log, "tokens=10 user=acme\ntokens=20 user=globex\n");
    let cfg = format!(
        "  paths: ['{}/*.log']\n  parser: {{kind: regex, regex: '^tokens=(?P<tokens>\\d+) user=(?P<user>\\S+)$'}}\n  mapping: {{subject: '$.user'}}\n",
        dir.path().display()
    );
    let mut t = tailer(&cfg, &BTreeMap::new());
    let a = t.poll(&t.files(&[]), NOW);
    let subjects: Vec<&str> = a.events.iter().map(|e| e.subject.as_str()).collect();
    assert_eq!(subjects, vec!["acme", "globex"]);
    assert_eq!(a.events[0].data.as_ref().unwrap()["tokens"], json!("10"));
    assert_eq!(
        a.events[0].time, "2026-01-01T00:00:00.000Z",
        "plain lines without a time take the read time"
    );
    // copytruncate: same first line, shorter file.
    std::fs::write(&log, "tokens=10 user=acme\n").unwrap();
    let b = t.poll(&t.files(&[]), NOW + 1000);
    assert_eq!(b.events.len(), 1);
    assert_ne!(
        b.events[0].id, a.events[0].id,
        "a new generation gives new ids"
    );
}

#[test]
fn a_file_without_a_full_first_line_is_not_read_yet() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("a.log");
    append(&log, "{\"tokens\": 1");
    let cfg = format!(
        "  paths: ['{}/*.log']\n  parser: {{kind: json}}\n  mapping: {{}}\n",
        dir.path().display()
    );
    let mut t = tailer(&cfg, &BTreeMap::new());
    assert!(t.poll(&t.files(&[]), NOW).is_empty());
    append(&log, "}\n");
    let out = t.poll(&t.files(&[]), NOW);
    assert_eq!(out.events[0].data.as_ref().unwrap()["tokens"], json!(1));
    assert_eq!(out.events[0].subject, "team-a");
    let _: Value = json!(null);
}

#[test]
fn container_log_names() {
    assert!(is_container_log("0.log"));
    assert!(is_container_log("3.log.20260101-000000"));
    assert!(!is_container_log("0.log.20260101-000000.gz"));
    assert!(!is_container_log("0.log.20260101-000000.tmp"));
    assert!(!is_container_log("notes.txt"));
}
