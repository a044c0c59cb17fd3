//! Shared by the benchmarks: sizes from the environment, the event they send, latency
//! percentiles, and concurrent HTTP posting.
#![allow(dead_code)]
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

/// `name` from the environment, or `default`.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Event `i`: an LLM usage event of one of 1,000 customers.
pub fn event_json(i: usize) -> serde_json::Value {
    let model = ["gpt-4o", "llama-3-70b", "claude"][i % 3];
    json!({"specversion": "1.0", "id": format!("evt-{i}"), "source": "bench", "type": "llm_usage",
           "subject": format!("customer-{}", i % 1000), "time": format!("2024-05-01T{:02}:{:02}:{:02}.{:03}Z", (i / 3_600_000) % 24, (i / 60_000) % 60, (i / 1000) % 60, i % 1000),
           "data": {"model": model, "tokens": (i % 977) as f64, "direction": "input"}})
}

/// The `p` percentile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs `f` `n` times; returns the sorted durations and the last result.
pub fn timed<T>(n: usize, mut f: impl FnMut() -> T) -> (Vec<Duration>, T) {
    let mut times = Vec::with_capacity(n);
    let mut last = None;
    for _ in 0..n.max(1) {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
    }
    times.sort();
    (times, last.expect("ran at least once"))
}

/// JSON bodies of `per` events each, covering events `0..n`.
pub fn bodies(n: usize, per: usize) -> Arc<Vec<String>> {
    Arc::new(
        (0..n / per)
            .map(|b| {
                serde_json::to_string(&(b * per..(b + 1) * per).map(event_json).collect::<Vec<_>>())
                    .unwrap()
            })
            .collect(),
    )
}

/// POSTs every body to `url` from `clients` concurrent clients, re-sending on 503;
/// returns the wall time.
pub async fn post_all(url: String, bodies: Arc<Vec<String>>, clients: usize) -> Duration {
    post_all_as(url, bodies, clients, None).await
}

/// [`post_all`], sending `token` as a bearer token when given.
pub async fn post_all_as(
    url: String,
    bodies: Arc<Vec<String>>,
    clients: usize,
    token: Option<&'static str>,
) -> Duration {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (bodies, next, url) = (bodies.clone(), next.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                loop {
                    let mut req = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone());
                    if let Some(t) = token {
                        req = req.bearer_auth(t);
                    }
                    let res = req.send().await.unwrap();
                    if res.status() == 204 {
                        break;
                    }
                    assert_eq!(res.status(), 503, "unexpected status");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}
