//! Leader election of the cluster agent (`tally-agent --scope cluster --lease-name`,
//! kube-lease-manager) against the real control plane or `TALLY_KUBECONFIG`: two replicas, one
//! runs the cluster-scoped collectors; a SIGKILLed leader is replaced once its Lease
//! expires; a restarted replica waits as standby; a gracefully stopped leader releases
//! the Lease and the standby takes over at once.
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tally_tests::kube::Cluster;
use tally_tests::{KeptDir, Proc, bin, eventually, free_port};

const LEASE_SECS: u64 = 3;

fn config(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    // A cluster-scoped collector; its API is unreachable, which does not matter here.
    let text = format!(
        "sink:\n  ingest: {{url: 'http://127.0.0.1:{}'}}\nspool: {{path: '{}'}}\nmetricsListen: '127.0.0.1:{}'\ncollectors:\n- namespace: billing\n  name: openai\n  spec:\n    eventType: llm\n    httpApi: {{preset: openai, url: 'http://127.0.0.1:{}', headers: [{{name: Authorization, value: 'Bearer x'}}]}}\n",
        free_port(),
        dir.join(format!("spool-{name}")).display(),
        free_port(),
        free_port(),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn replica(dir: &std::path::Path, kubeconfig: &std::path::Path, name: &str) -> Proc {
    let config = config(dir, name);
    let secs = LEASE_SECS.to_string();
    Proc::start(
        bin("tally-agent"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--scope",
            "cluster",
            "--lease-name",
            "tally-cluster-agent",
            "--lease-secs",
            &secs,
        ],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("POD_NAMESPACE", "tally-system"),
            ("POD_NAME", name),
            ("RUST_LOG", "info"),
        ],
        dir.join(format!("{name}.log")),
    )
}

/// Runs the cluster-scoped collector (its last "Agent running" line says so).
fn runs_collectors(p: &Proc) -> bool {
    let plain = regex::Regex::new("\x1b\\[[0-9;]*m").unwrap();
    let log = plain.replace_all(&p.log(), "").into_owned();
    log.lines()
        .rfind(|l| l.contains("Agent running"))
        .is_some_and(|l| l.contains("collectors=1"))
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("tally-cluster-agent")
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cluster_agent_leads_and_a_standby_takes_over() {
    let dir = KeptDir(Some(tempfile::tempdir().unwrap()));
    let Some(cluster) = Cluster::connect("agent_lease").await else {
        return;
    };
    let client = cluster.client().await;
    cluster.namespaces(&client, &["tally-system"]).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "tally-system");
    let kc = cluster.kubeconfig.clone();
    let mut a = replica(dir.path(), &kc, "agent-a");
    let mut b = replica(dir.path(), &kc, "agent-b");
    let limit = Duration::from_secs(20);
    let every = Duration::from_millis(100);

    // Read together: the Lease's holder runs the collector and the other replica runs
    // nothing. (Read apart, a slow first renewal under load could move the Lease
    // between the two reads and blame the replica that had just lost it.)
    let first = eventually(
        limit,
        every,
        "one leader running the collector and a standby running nothing",
        async || {
            let h = holder(&leases).await?;
            let (l, s) = if h == "agent-a" { (&a, &b) } else { (&b, &a) };
            (runs_collectors(l) && !runs_collectors(s)).then_some(h)
        },
    )
    .await;
    let (leader, standby) = if first == "agent-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(
        !runs_collectors(standby),
        "the standby runs nothing:\n{}",
        standby.log()
    );

    // The leader crashes: the standby takes over once the Lease has expired.
    leader.kill9();
    let killed = Instant::now();
    let second = eventually(limit, every, "a new leader", async || {
        holder(&leases).await.filter(|h| *h != first)
    })
    .await;
    let took = killed.elapsed();
    eventually(
        limit,
        every,
        "the new leader to run the collector",
        async || runs_collectors(standby).then_some(()),
    )
    .await;
    eprintln!("{second} took over {took:?} after {first} was SIGKILLed (Lease {LEASE_SECS} s)");
    assert!(took <= Duration::from_secs(LEASE_SECS * 3), "took {took:?}");

    // The crashed replica comes back as standby: the Lease is held.
    leader.spawn();
    tokio::time::sleep(Duration::from_secs(LEASE_SECS + 1)).await;
    assert_eq!(holder(&leases).await.as_deref(), Some(second.as_str()));
    assert!(
        !runs_collectors(leader),
        "the restarted replica waits:\n{}",
        leader.log()
    );

    // A graceful stop releases the Lease: the standby takes over well before it expires.
    assert!(standby.terminate(), "graceful stop:\n{}", standby.log());
    let stopped = Instant::now();
    eventually(limit, every, "the restarted replica to lead", async || {
        (holder(&leases).await.as_deref() == Some(first.as_str())).then_some(())
    })
    .await;
    let handover = stopped.elapsed();
    eprintln!("{first} took over {handover:?} after {second} stopped gracefully");
    assert!(
        handover < Duration::from_secs(LEASE_SECS),
        "a released Lease is taken at once, not after it expires: {handover:?}"
    );
    eventually(limit, every, "it runs the collector", async || {
        runs_collectors(leader).then_some(())
    })
    .await;
}
