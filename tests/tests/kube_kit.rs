//! The in-memory API server's own semantics, through a plain `kube::Client`: what the
//! operator and agent rely on must behave as on a real API server.
use std::collections::BTreeMap;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;
use tally_crds::Meter;
use tally_tests::kube::KubeKit;

async fn client(kit: &KubeKit) -> Client {
    let kc = kube::config::Kubeconfig::read_from(&kit.kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    Client::try_from(cfg).unwrap()
}

fn kit() -> (tempfile::TempDir, KubeKit) {
    let dir = tempfile::tempdir().unwrap();
    let kit = KubeKit::start_with(dir.path(), Duration::from_millis(200));
    (dir, kit)
}

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()},
        "data": {"k": "v"},
    }))
    .unwrap()
}

fn api_error(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn install_meter_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Meter::crd())
        .await
        .unwrap();
}

fn meter(name: &str, spec: serde_json::Value) -> Meter {
    serde_json::from_value(json!({
        "apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

#[tokio::test]
async fn crd_makes_its_kind_servable_and_schema_and_cel_reject_invalid_meters() {
    let (_d, kit) = kit();
    let client = client(&kit).await;
    let meters: Api<Meter> = Api::namespaced(client.clone(), "acme");
    let before = meters.list(&ListParams::default()).await.unwrap_err();
    assert_eq!(api_error(before).code, 404, "no CRD, no kind");
    install_meter_crd(&client).await;

    let good = meter(
        "tokens",
        json!({"eventType": "llm", "aggregation": "SUM", "valueProperty": "$.tokens", "groupBy": {"model": "$.model"}}),
    );
    let created = meters.create(&PostParams::default(), &good).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());

    // CEL: valueProperty is forbidden for COUNT.
    let bad = meter(
        "count",
        json!({"eventType": "llm", "aggregation": "COUNT", "valueProperty": "$.x"}),
    );
    let e = api_error(
        meters
            .create(&PostParams::default(), &bad)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message.contains("valueProperty is forbidden for COUNT"),
        "{}",
        e.message
    );

    // Schema: enum, pattern and required fields, each naming the field.
    let mut raw = json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Meter", "metadata": {"name": "raw"},
        "spec": {"eventType": "llm", "aggregation": "TOTAL", "slug": "Not A Slug", "valueProperty": "$.v"}});
    let dynamic = Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        "acme",
        &kube::api::ApiResource::erase::<Meter>(&()),
    );
    let e = api_error(
        dynamic
            .create(
                &PostParams::default(),
                &serde_json::from_value(raw.clone()).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert!(
        e.message
            .contains("spec.aggregation: Unsupported value: \"TOTAL\""),
        "{}",
        e.message
    );
    assert!(e.message.contains("spec.slug"), "{}", e.message);
    raw["spec"] = json!({"aggregation": "COUNT"});
    let e = api_error(
        dynamic
            .create(
                &PostParams::default(),
                &serde_json::from_value(raw).unwrap(),
            )
            .await
            .unwrap_err(),
    );
    assert!(
        e.message.contains("spec.eventType: Required value"),
        "{}",
        e.message
    );

    // CEL with oldSelf: eventType is immutable, groupBy is not.
    let patch = Patch::Merge(json!({"spec": {"eventType": "other"}}));
    let e = api_error(
        meters
            .patch("tokens", &PatchParams::default(), &patch)
            .await
            .unwrap_err(),
    );
    assert!(
        e.message.contains("eventType is immutable"),
        "{}",
        e.message
    );
    let patch =
        Patch::Merge(json!({"spec": {"groupBy": {"model": "$.model", "region": "$.region"}}}));
    let changed = meters
        .patch("tokens", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert_eq!(changed.metadata.generation, Some(2));

    // Deleting the CRD deletes its objects and stops serving the kind.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("meters.tally.dev", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(api_error(meters.get("tokens").await.unwrap_err()).code, 404);
}

#[tokio::test]
async fn stale_resource_versions_conflict_and_status_is_a_subresource() {
    let (_d, kit) = kit();
    let client = client(&kit).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "tally");
    let lease: Lease = serde_json::from_value(
        json!({"metadata": {"name": "op"}, "spec": {"holderIdentity": "a"}}),
    )
    .unwrap();
    let first = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut mine = first.clone();
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    leases
        .replace("op", &PostParams::default(), &mine)
        .await
        .unwrap();
    // The same old resourceVersion again: someone else won.
    mine.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let e = api_error(
        leases
            .replace("op", &PostParams::default(), &mine)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    let e = api_error(
        leases
            .create(&PostParams::default(), &lease)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));

    install_meter_crd(&client).await;
    let meters: Api<Meter> = Api::namespaced(client.clone(), "acme");
    let m = meter("calls", json!({"eventType": "api", "aggregation": "COUNT"}));
    meters.create(&PostParams::default(), &m).await.unwrap();
    // A main-resource write cannot set status; /status cannot change the spec.
    let with_status = Patch::Merge(json!({"status": {"slug": "x"}}));
    let after = meters
        .patch("calls", &PatchParams::default(), &with_status)
        .await
        .unwrap();
    assert!(after.status.is_none());
    let status = Patch::Merge(
        json!({"spec": {"description": "ignored"}, "status": {"slug": "calls", "observedGeneration": 1}}),
    );
    let after = meters
        .patch_status("calls", &PatchParams::default(), &status)
        .await
        .unwrap();
    assert_eq!(after.status.unwrap().slug.as_deref(), Some("calls"));
    assert_eq!(after.spec.description, None);
    assert_eq!(
        after.metadata.generation,
        Some(1),
        "status writes do not bump generation"
    );
    // A JSON patch with a failing test op changes nothing.
    let p: json_patch::Patch = serde_json::from_value(json!([{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}, {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}])).unwrap();
    let e = api_error(
        meters
            .patch("calls", &PatchParams::default(), &Patch::<()>::Json(p))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert!(meters.get("calls").await.unwrap().metadata.labels.is_none());
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version_sends_bookmarks_and_answers_410_after_compaction() {
    let (_d, kit) = kit();
    let client = client(&kit).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "w");
    let a = cms
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap();
    let from = a.resource_version().unwrap();
    cms.create(&PostParams::default(), &cm("b", &[]))
        .await
        .unwrap();
    cms.delete("a", &DeleteParams::default()).await.unwrap();

    let wp = WatchParams::default().timeout(2);
    let stream = cms.watch(&wp, &from).await.unwrap();
    let events: Vec<_> = stream.take(3).try_collect().await.unwrap();
    let names: Vec<String> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
            WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
            WatchEvent::Bookmark(_) => "BOOKMARK".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        names,
        ["ADDED b", "DELETED a", "BOOKMARK"],
        "resume from {from}, then a bookmark"
    );

    kit.compact();
    let mut stream = cms.watch(&wp, &from).await.unwrap().boxed();
    match stream.next().await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }

    // kube-runtime's watcher recovers from 410 by listing again.
    let events = kube::runtime::watcher(cms.clone(), kube::runtime::watcher::Config::default());
    let mut store = kube::runtime::reflector::store::Writer::<ConfigMap>::default();
    let reader = store.as_reader();
    let task = tokio::spawn(events.for_each(move |e| {
        if let Ok(e) = e {
            store.apply_watcher_event(&e);
        }
        futures::future::ready(())
    }));
    reader.wait_until_ready().await.unwrap();
    cms.create(&PostParams::default(), &cm("c", &[]))
        .await
        .unwrap();
    tallies(|| reader.state().len() == 2, "the reflector sees b and c").await;
    task.abort();
}

async fn tallies(mut ok: impl FnMut() -> bool, what: &str) {
    for _ in 0..100 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out: {what}");
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists_and_watches() {
    let (_d, kit) = kit();
    let client = client(&kit).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "s");
    cms.create(
        &PostParams::default(),
        &cm("web", &[("app", "web"), ("tier", "front")]),
    )
    .await
    .unwrap();
    cms.create(&PostParams::default(), &cm("db", &[("app", "db")]))
        .await
        .unwrap();
    let names = |l: kube::core::ObjectList<ConfigMap>| {
        l.items.iter().map(|c| c.name_any()).collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
        ),
        ["web"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("app in (web,db),!tier"))
                .await
                .unwrap()
        ),
        ["db"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().fields("metadata.name!=web"))
                .await
                .unwrap()
        ),
        ["db"]
    );
    let page = cms.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(names(page.clone()), ["db"]);
    let rest = cms
        .list(
            &ListParams::default()
                .limit(1)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(names(rest), ["web"]);

    let pods: Api<Pod> = Api::namespaced(client.clone(), "s");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}})).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let on = |n: &str| ListParams::default().fields(&format!("spec.nodeName={n}"));
    assert_eq!(pods.list(&on("n1")).await.unwrap().items.len(), 1);
    assert_eq!(pods.list(&on("n2")).await.unwrap().items.len(), 0);

    // A watch sees an object leave its selector as DELETED.
    let rv = kit.resource_version().to_string();
    let stream = cms
        .watch(&WatchParams::default().labels("app=web").timeout(2), &rv)
        .await
        .unwrap();
    cms.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "api"}}})),
    )
    .await
    .unwrap();
    cms.patch(
        "db",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"x": "y"}})),
    )
    .await
    .unwrap();
    let first = stream.boxed().next().await.unwrap().unwrap();
    assert!(
        matches!(first, WatchEvent::Deleted(ref o) if o.name_any() == "web"),
        "{first:?}"
    );
}

#[tokio::test]
async fn finalizers_hold_deletion_and_owner_references_collect_garbage() {
    let (_d, kit) = kit();
    let client = client(&kit).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "f");
    let mut held = cm("held", &[]);
    held.metadata.finalizers = Some(vec!["tally.dev/cleanup".into()]);
    cms.create(&PostParams::default(), &held).await.unwrap();
    cms.delete("held", &DeleteParams::default()).await.unwrap();
    let marked = cms.get("held").await.unwrap();
    assert!(
        marked.metadata.deletion_timestamp.is_some(),
        "a finalizer keeps it, marked"
    );
    let add = Patch::Merge(json!({"metadata": {"finalizers": ["tally.dev/cleanup", "other"]}}));
    let e = api_error(
        cms.patch("held", &PatchParams::default(), &add)
            .await
            .unwrap_err(),
    );
    assert!(e.message.contains("no new finalizers"), "{}", e.message);
    let clear = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    cms.patch("held", &PatchParams::default(), &clear)
        .await
        .unwrap();
    assert_eq!(
        api_error(cms.get("held").await.unwrap_err()).code,
        404,
        "gone with its last finalizer"
    );

    let owner = cms
        .create(&PostParams::default(), &cm("owner", &[]))
        .await
        .unwrap();
    let mut child = cm("child", &[]);
    child.metadata.owner_references = Some(vec![serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap(), "controller": true,
    })).unwrap()]);
    cms.create(&PostParams::default(), &child).await.unwrap();
    let mut kept = child.clone();
    kept.metadata.name = Some("orphan-child".into());
    cms.create(&PostParams::default(), &kept).await.unwrap();
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        api_error(cms.get("child").await.unwrap_err()).code,
        404,
        "garbage-collected"
    );
    assert_eq!(
        api_error(cms.get("orphan-child").await.unwrap_err()).code,
        404
    );

    let owner = cms
        .create(&PostParams::default(), &cm("owner3", &[]))
        .await
        .unwrap();
    let mut child = cm("child3", &[]);
    child.metadata.owner_references =
        Some(vec![serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner3", "uid": owner.uid().unwrap(),
    })).unwrap()]);
    cms.create(&PostParams::default(), &child).await.unwrap();
    cms.delete("owner3", &DeleteParams::orphan()).await.unwrap();
    let left = cms.get("child3").await.unwrap();
    assert_eq!(
        left.metadata.owner_references.unwrap_or_default().len(),
        0,
        "orphaned, not deleted"
    );
}

#[tokio::test]
async fn server_side_apply_tracks_field_managers_and_reports_conflicts() {
    let (_d, kit) = kit();
    let client = client(&kit).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ssa");
    let apply = |data: serde_json::Value| {
        Patch::Apply(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "shared"}, "data": data}),
        )
    };
    cms.patch(
        "shared",
        &PatchParams::apply("alice"),
        &apply(json!({"x": "1", "y": "1"})),
    )
    .await
    .unwrap();
    cms.patch(
        "shared",
        &PatchParams::apply("bob"),
        &apply(json!({"z": "1"})),
    )
    .await
    .unwrap();
    // Bob may not change Alice's field ...
    let e = api_error(
        cms.patch(
            "shared",
            &PatchParams::apply("bob"),
            &apply(json!({"x": "2", "z": "1"})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 409);
    assert!(
        e.message.contains("conflict with \"alice\"") && e.message.contains("data.x"),
        "{}",
        e.message
    );
    // ... unless he forces it, which takes the field from her.
    cms.patch(
        "shared",
        &PatchParams::apply("bob").force(),
        &apply(json!({"x": "2", "z": "1"})),
    )
    .await
    .unwrap();
    let owners = kit.managers("", "v1", "configmaps", "ssa", "shared");
    let set = |m: &str| owners[m].iter().cloned().collect::<Vec<_>>();
    assert_eq!(set("alice"), ["data/y"]);
    assert_eq!(set("bob"), ["data/x", "data/z"]);
    // A field a manager stops applying is removed when nobody else owns it.
    cms.patch("shared", &PatchParams::apply("alice"), &apply(json!({})))
        .await
        .unwrap();
    let data = cms.get("shared").await.unwrap().data.unwrap();
    assert_eq!(
        data,
        BTreeMap::from([
            ("x".to_string(), "2".to_string()),
            ("z".to_string(), "1".to_string())
        ])
    );
    // Applying the same value is shared ownership, not a conflict.
    cms.patch(
        "shared",
        &PatchParams::apply("carol"),
        &apply(json!({"z": "1"})),
    )
    .await
    .unwrap();
    // A map applied empty, then filled by the same manager, keeps its new entries.
    for data in [json!({}), json!({"k": "v"})] {
        cms.patch("filled", &PatchParams::apply("dave"), &Patch::Apply(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "filled"}, "data": data}),
        ))
        .await
        .unwrap();
    }
    let data = cms.get("filled").await.unwrap().data.unwrap_or_default();
    assert_eq!(data, BTreeMap::from([("k".to_string(), "v".to_string())]));
}

#[tokio::test]
async fn kubectl_get_meters_prints_the_printer_columns() {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        let why = "kubectl_get_meters: kubectl is not installed";
        assert!(std::env::var_os("CI").is_none(), "{why}; CI must not skip");
        eprintln!("SKIPPED {why}");
        return;
    }
    let (_d, kit) = kit();
    let client = client(&kit).await;
    install_meter_crd(&client).await;
    let meters: Api<Meter> = Api::namespaced(client.clone(), "acme");
    let m = meter(
        "llm-tokens",
        json!({"eventType": "llm", "aggregation": "SUM", "valueProperty": "$.tokens"}),
    );
    meters.create(&PostParams::default(), &m).await.unwrap();
    let status = json!({"status": {"slug": "llm_tokens", "conditions": [
        {"type": "Ready", "status": "True", "reason": "Provisioned", "message": "queries read rollup r1", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "storage": {"store": "clickhouse", "rollupTable": "rollup_1", "backfilled": true, "backfill": "complete"}}});
    meters
        .patch_status("llm-tokens", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
    let kc = kit.kubeconfig.clone();
    let kubectl = move |wide: bool| {
        let mut cmd = std::process::Command::new("kubectl");
        cmd.args([
            "--kubeconfig",
            kc.to_str().unwrap(),
            "get",
            "meters",
            "-n",
            "acme",
        ]);
        if wide {
            cmd.args(["-o", "wide"]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = tokio::task::spawn_blocking(move || (kubectl(false), kubectl(true)))
        .await
        .unwrap();
    eprintln!("{}\n{}", out.0, out.1);
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    let lines: Vec<&str> = out.0.lines().collect();
    assert_eq!(
        words(lines[0]),
        [
            "NAME",
            "SLUG",
            "EVENT",
            "TYPE",
            "AGGREGATION",
            "READY",
            "STATUS",
            "AGE"
        ],
        "{}",
        out.0
    );
    assert_eq!(
        words(lines[1])[..6],
        [
            "llm-tokens",
            "llm_tokens",
            "llm",
            "SUM",
            "True",
            "Provisioned"
        ],
        "{}",
        out.0
    );
    assert!(
        out.1.contains("BACKFILL") && out.1.contains("complete") && out.1.contains("rollup_1"),
        "{}",
        out.1
    );
}

/// Every example manifest is accepted as `kubectl apply` would be (schema + CEL), and a
/// Collector with two sources is refused by its CEL rule.
#[tokio::test]
async fn the_example_manifests_pass_the_crds_schema_and_cel_rules() {
    use tally_crds::Collector;
    let (_d, kit) = kit();
    let client = client(&kit).await;
    install_meter_crd(&client).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &Collector::crd())
        .await
        .unwrap();
    let repo = tally_tests::repo();
    let mut applied = 0;
    for dir in ["examples/quickstart", "examples/collectors"] {
        for entry in std::fs::read_dir(repo.join(dir)).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
                if v.is_null() {
                    continue;
                }
                let mut obj: kube::api::DynamicObject = serde_json::from_value(v.clone()).unwrap();
                let ns = obj
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                obj.metadata.namespace = Some(ns.clone());
                let ar = if v["kind"] == "Meter" {
                    kube::api::ApiResource::erase::<Meter>(&())
                } else {
                    kube::api::ApiResource::erase::<Collector>(&())
                };
                let api =
                    Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), &ns, &ar);
                api.create(&PostParams::default(), &obj)
                    .await
                    .unwrap_or_else(|e| panic!("{dir}: {} refused: {e}", obj.name_any()));
                applied += 1;
            }
        }
    }
    assert!(applied >= 7, "{applied} manifests applied");
    let two: Collector = serde_json::from_value(json!({"apiVersion": "tally.dev/v1alpha1", "kind": "Collector",
        "metadata": {"name": "two", "namespace": "default"},
        "spec": {"eventType": "x", "podRuntime": {}, "prometheus": {"targets": ["http://127.0.0.1:9400/metrics"], "metrics": [{"name": "up", "kind": "gauge"}]}}}))
    .unwrap();
    let collectors: Api<Collector> = Api::namespaced(client.clone(), "default");
    let e = api_error(
        collectors
            .create(&PostParams::default(), &two)
            .await
            .unwrap_err(),
    );
    assert!(
        e.message.contains("set exactly one source"),
        "{}",
        e.message
    );
}
