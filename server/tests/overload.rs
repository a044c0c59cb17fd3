//! Overload is answered, not queued without bound: 64 clients send as fast as they can
//! for 30 s; the server answers 503 problems when it cannot keep up, keeps its RSS under
//! 512 MiB, and every acknowledged event is counted after the run.
//!
//! Refusals are made certain, not left to the machine's speed: for the first 5 s one
//! slow client holds the whole ingest budget (its request declares a body of exactly
//! the budget and sends it slowly), so every other request in that time must be
//! answered 503.
mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const METER: &str = "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: calls}\nspec: {eventType: call, aggregation: COUNT}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_for_thirty_seconds_get_answers_and_lose_nothing() {
    // a small queue and budget
    let s = Server::start(
        &[("m.yaml", METER)],
        &["--ingest-queue", "8", "--ingest-budget-bytes", "1048576"],
    );
    let acked = Arc::new(AtomicU64::new(0));
    let overloaded = Arc::new(AtomicU64::new(0));
    let max_rss = Arc::new(AtomicU64::new(0));
    // the slow client: holds the 1 MiB budget until `held` has passed
    const BUDGET: usize = 1 << 20;
    let held = Duration::from_secs(5);
    let addr = s.addr.clone();
    // before the slow client starts, so the budget is surely held until hold_started + held
    let hold_started = Instant::now();
    let slow = std::thread::spawn(move || {
        let event = json!({"specversion": "1.0", "id": "slow-1", "source": "load", "type": "call", "subject": "s0", "time": "2024-06-01T12:00:00Z"}).to_string();
        let mut body = format!("[{event}");
        body.push_str(&" ".repeat(BUDGET - body.len() - 1));
        body.push(']');
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        let head = format!(
            "POST /api/v1/events HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {BUDGET}\r\nconnection: close\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(&body.as_bytes()[..16]).unwrap();
        std::thread::sleep(held);
        conn.write_all(&body.as_bytes()[16..]).unwrap();
        let mut answer = String::new();
        let _ = conn.read_to_string(&mut answer);
        answer
    });
    let refused_while_held = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = s.url("/api/v1/events");
    let mut tasks = Vec::new();
    // let the slow client's request reach the server first
    tokio::time::sleep(Duration::from_millis(300)).await;
    for client_id in 0..64u64 {
        let (acked, overloaded, url) = (acked.clone(), overloaded.clone(), url.clone());
        let refused_while_held = refused_while_held.clone();
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
                        assert!(
                            hold_started.elapsed() >= held,
                            "a request was accepted while the slow client held the whole ingest budget"
                        );
                        acked.fetch_add(100, Ordering::Relaxed);
                        seq += 1;
                    }
                    503 => {
                        assert_eq!(res.headers()["content-type"], "application/problem+json");
                        assert!(res.headers().contains_key("retry-after"));
                        overloaded.fetch_add(1, Ordering::Relaxed);
                        if hold_started.elapsed() < held {
                            refused_while_held.fetch_add(1, Ordering::Relaxed);
                        }
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
    let slow_answer = slow.join().unwrap();
    assert!(
        slow_answer.starts_with("HTTP/1.1 204"),
        "the slow client's request is stored once its body is complete: {slow_answer}"
    );
    let acked = acked.load(Ordering::Relaxed) + 1;
    let rss = max_rss.load(Ordering::Relaxed);
    let overloaded = overloaded.load(Ordering::Relaxed);
    let refused_while_held = refused_while_held.load(Ordering::Relaxed);
    println!(
        "acknowledged {acked} events, {overloaded} requests answered 503 ({refused_while_held} while the budget was held), max RSS {} MiB",
        rss >> 20
    );
    assert!(acked > 1, "some requests must succeed");
    assert!(
        refused_while_held >= 64,
        "every client's request is refused while the budget is held; refused {refused_while_held}"
    );
    let counted = metric(&client(), &s, "tally_requests_overloaded_total").await;
    assert_eq!(
        counted, overloaded as f64,
        "the server counts each 503 it answers"
    );
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
