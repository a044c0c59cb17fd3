//! Overload is answered, not queued without bound: 64 clients send as fast as they can
//! for 30 s; the server answers 503 problems when it cannot keep up, keeps its RSS under
//! 512 MiB, and every acknowledged event is counted after the run.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const METER: &str = "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: calls}\nspec: {eventType: call, aggregation: COUNT}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_for_thirty_seconds_get_answers_and_lose_nothing() {
    // a small queue and budget so a 2-core machine reaches overload quickly
    let s = Server::start(
        &[("m.yaml", METER)],
        &["--ingest-queue", "8", "--ingest-budget-bytes", "1048576"],
    );
    let acked = Arc::new(AtomicU64::new(0));
    let overloaded = Arc::new(AtomicU64::new(0));
    let max_rss = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = s.url("/api/v1/events");
    let mut tasks = Vec::new();
    for client_id in 0..64u64 {
        let (acked, overloaded, url) = (acked.clone(), overloaded.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let batch: Vec<_> = (0..100)
                    .map(|i| json!({"specversion": "1.0", "id": format!("{client_id}-{seq}-{i}"), "source": "load", "type": "call", "subject": format!("s{}", i % 10), "time": "2024-06-01T12:00:00Z"}))
                    .collect();
                let res = c.post(&url).header("content-type", "application/json").body(json!(batch).to_string()).send().await.expect("the server answers");
                match res.status().as_u16() {
                    204 => {
                        acked.fetch_add(100, Ordering::Relaxed);
                        seq += 1;
                    }
                    503 => {
                        assert_eq!(res.headers()["content-type"], "application/problem+json");
                        assert!(res.headers().contains_key("retry-after"));
                        overloaded.fetch_add(1, Ordering::Relaxed);
                        // retry the same batch (same ids), as a client should
                    }
                    other => panic!("unexpected status {other}: {}", res.text().await.unwrap_or_default()),
                }
            }
        }));
    }
    let pid_rss = {
        let max_rss = max_rss.clone();
        let s_pid = s.pid();
        tokio::spawn(async move {
            while Instant::now() < deadline {
                max_rss.fetch_max(rss_of(s_pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    pid_rss.await.unwrap();
    let acked = acked.load(Ordering::Relaxed);
    let rss = max_rss.load(Ordering::Relaxed);
    println!(
        "acknowledged {acked} events, {} requests answered 503, max RSS {} MiB",
        overloaded.load(Ordering::Relaxed),
        rss >> 20
    );
    assert!(acked > 0, "some requests must succeed");
    assert!(rss < 512 << 20, "RSS {} MiB exceeds 512 MiB", rss >> 20);
    let (_, body) = get_json(
        &client(),
        &s.url("/api/v1/meters/calls/query?from=2024-06-01T00:00:00Z&to=2024-06-02T00:00:00Z"),
    )
    .await;
    assert_eq!(
        body["data"][0]["value"],
        json!(acked),
        "every acknowledged event is counted, once"
    );
}
