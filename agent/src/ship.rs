//! Delivery: the shipper moves spooled events to the sink and deletes them once the
//! sink acknowledged them.
//!
//! Sinks: the ingest API of `tally-server` (batches per namespace, bearer token read
//! from a file on every request so a rotated Secret is picked up, `Retry-After`
//! honoured on 429/503, a 413 halves the batch) or Kafka through `tally-kafka`'s
//! producer (`kafka` feature). Transient failures are retried with exponential backoff
//! (capped at 30 s) for as long as it takes: the spool holds the events meanwhile.
//! Events the sink refuses as invalid can never be delivered; they are logged at
//! ERROR with the reason, counted, and dropped so they cannot block the rest.
//!
//! Watermarks are sent once every event spooled before them was delivered (to Kafka:
//! a copy on every partition, behind those events; to the ingest API: `POST
//! .../watermarks`, answered after the store has the events).
use std::sync::Arc;
use std::time::Duration;

use tally_crds::Watermark;
use tally_crds::collector::{Delivery, IngestSink};
use tokio::sync::{Notify, watch};

use crate::metrics::Metrics;
use crate::spool::{Spool, Spooled};

/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why a send did not deliver everything.
#[derive(Debug)]
pub enum SendError {
    /// Nothing was accepted; retry (after the given delay, if the sink said).
    Retry {
        /// The sink's requested delay.
        after: Option<Duration>,
        /// What happened.
        reason: String,
    },
    /// The batch is too large for the sink; send fewer at once.
    TooLarge,
    /// Nothing was accepted because these events (by index) are invalid.
    Rejected(Vec<(usize, String)>),
}

/// Where events go.
pub enum Sink {
    /// The ingest API.
    Ingest {
        /// HTTP client.
        client: reqwest::Client,
        /// The configuration.
        cfg: IngestSink,
    },
    /// Kafka.
    #[cfg(feature = "kafka")]
    Kafka {
        /// The shared producer.
        producer: Arc<tally_kafka::Producer>,
    },
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Ingest { cfg, .. } => write!(f, "Sink::Ingest({})", cfg.url),
            #[cfg(feature = "kafka")]
            Sink::Kafka { producer } => write!(f, "Sink::Kafka({producer:?})"),
        }
    }
}

impl Sink {
    /// The sink a configuration names.
    pub fn new(cfg: &Delivery) -> crate::Result<Sink> {
        if let Some(i) = &cfg.ingest {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_millis(u64::from(i.timeout_ms)))
                .build()
                .map_err(|e| crate::Error::Config {
                    path: "sink.ingest".into(),
                    message: e.to_string(),
                })?;
            return Ok(Sink::Ingest {
                client,
                cfg: i.clone(),
            });
        }
        match &cfg.kafka {
            #[cfg(feature = "kafka")]
            Some(k) => {
                let mut kc = tally_kafka::KafkaConfig::new(&k.brokers);
                kc.topic = k.topic.clone();
                kc.message_timeout_ms = u64::from(k.timeout_ms);
                let producer = tally_kafka::Producer::new(&kc)
                    .map_err(|e| crate::Error::Kafka(e.to_string()))?;
                Ok(Sink::Kafka {
                    producer: Arc::new(producer),
                })
            }
            #[cfg(not(feature = "kafka"))]
            Some(_) => Err(crate::Error::Kafka(
                "this tally-agent was built without the kafka feature".into(),
            )),
            None => Err(crate::Error::Config {
                path: "sink".into(),
                message: "set exactly one of ingest and kafka".into(),
            }),
        }
    }

    /// Most events per send.
    pub fn batch_events(cfg: &Delivery) -> usize {
        cfg.ingest
            .as_ref()
            .map(|i| i.batch_events)
            .or(cfg.kafka.as_ref().map(|k| k.batch_events))
            .unwrap_or(500)
            .max(1) as usize
    }

    /// Sends one namespace's events; all or nothing.
    pub async fn send(&self, namespace: &str, events: &[Spooled]) -> Result<(), SendError> {
        match self {
            Sink::Ingest { client, cfg } => send_ingest(client, cfg, namespace, events).await,
            #[cfg(feature = "kafka")]
            Sink::Kafka { producer } => send_kafka(producer, namespace, events).await,
        }
    }
}

impl Sink {
    /// Sends one namespace's due watermarks (after their events were delivered).
    pub async fn send_watermarks(
        &self,
        namespace: &str,
        marks: &[Watermark],
    ) -> Result<(), String> {
        match self {
            Sink::Ingest { client, cfg } => {
                let url = format!(
                    "{}/api/v1/namespaces/{namespace}/watermarks",
                    cfg.url.trim_end_matches('/')
                );
                let body = serde_json::to_vec(marks).expect("watermarks serialize");
                let req = authorized(
                    client
                        .post(&url)
                        .header("Content-Type", "application/json")
                        .body(body),
                    cfg,
                )?;
                let resp = req.send().await.map_err(|e| format!("POST {url}: {e}"))?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let text = resp.text().await.unwrap_or_default();
                Err(format!("{url} answered {status}: {text}"))
            }
            #[cfg(feature = "kafka")]
            Sink::Kafka { producer } => producer
                .send_watermarks(namespace, marks)
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

/// Sends every due watermark ([`Spool::due_watermarks`]); one that fails stays due
/// and is sent with the next (a later one carries its gaps too).
async fn deliver_watermarks(spool: &Spool, sink: &Sink, metrics: &Metrics) -> crate::Result<()> {
    for due in spool.due_watermarks()? {
        match sink
            .send_watermarks(&due.namespace, std::slice::from_ref(&due.mark))
            .await
        {
            Ok(()) => {
                spool.watermarks_sent(&due.ids)?;
                metrics
                    .watermark_ms
                    .get_or_create(&Metrics::label(&due.collector))
                    .set(due.mark.until);
            }
            Err(reason) => {
                metrics.send_failures.inc();
                tracing::warn!(collector = %due.collector, %reason, "Sending a watermark failed; it stays due and is retried");
            }
        }
    }
    Ok(())
}

/// `req` with the bearer token of `cfg.token_file`, read now (a rotated Secret is
/// picked up).
fn authorized(
    req: reqwest::RequestBuilder,
    cfg: &IngestSink,
) -> Result<reqwest::RequestBuilder, String> {
    match &cfg.token_file {
        None => Ok(req),
        Some(file) => {
            let token = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read the token file {file}: {e}"))?;
            Ok(req.bearer_auth(token.trim()))
        }
    }
}

async fn send_ingest(
    client: &reqwest::Client,
    cfg: &IngestSink,
    namespace: &str,
    events: &[Spooled],
) -> Result<(), SendError> {
    let retry = |reason: String| SendError::Retry {
        after: None,
        reason,
    };
    let mut body = Vec::with_capacity(events.iter().map(|e| e.body.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&e.body);
    }
    body.push(b']');
    let url = format!(
        "{}/api/v1/namespaces/{namespace}/events",
        cfg.url.trim_end_matches('/')
    );
    let req = authorized(
        client
            .post(&url)
            .header("Content-Type", "application/cloudevents-batch+json")
            .body(body),
        cfg,
    )
    .map_err(retry)?;
    let resp = req
        .send()
        .await
        .map_err(|e| retry(format!("POST {url}: {e}")))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = resp.text().await.unwrap_or_default();
    match status.as_u16() {
        413 => Err(SendError::TooLarge),
        400 | 422 => {
            let problem: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let mut bad: Vec<(usize, String)> = problem["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let i = e["index"].as_u64()? as usize;
                    let field = e["field"].as_str().unwrap_or("event");
                    Some((
                        i,
                        format!("{field}: {}", e["message"].as_str().unwrap_or_default()),
                    ))
                })
                .filter(|(i, _)| *i < events.len())
                .collect();
            if bad.is_empty() {
                // No per-event detail: the whole batch is refused as sent.
                bad = (0..events.len()).map(|i| (i, text.clone())).collect();
            }
            Err(SendError::Rejected(bad))
        }
        429 | 503 => Err(SendError::Retry {
            after,
            reason: format!("{url} answered {status}: {text}"),
        }),
        _ => Err(retry(format!("{url} answered {status}: {text}"))),
    }
}

#[cfg(feature = "kafka")]
async fn send_kafka(
    producer: &tally_kafka::Producer,
    namespace: &str,
    events: &[Spooled],
) -> Result<(), SendError> {
    let now = chrono::Utc::now().timestamp_millis();
    let mut envelopes = Vec::with_capacity(events.len());
    let mut bad = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let parsed = serde_json::from_slice::<serde_json::Value>(&e.body)
            .map_err(|err| vec![err.to_string()])
            .and_then(|v| {
                tally_crds::UsageEvent::from_json(&v, now).map_err(|errs| {
                    errs.iter()
                        .map(|x| format!("{}: {}", x.field, x.message))
                        .collect()
                })
            });
        match parsed {
            Ok(ev) => envelopes.push(tally_crds::Envelope::new(namespace, &ev, now)),
            Err(reasons) => bad.push((i, reasons.join("; "))),
        }
    }
    if !bad.is_empty() {
        return Err(SendError::Rejected(bad));
    }
    producer
        .send_envelopes(&envelopes)
        .await
        .map_err(|e| SendError::Retry {
            after: None,
            reason: e.to_string(),
        })
}

/// Moves events from the spool to the sink until `stop` turns true and (then) the
/// spool is empty or `drain` has passed.
pub async fn run(
    spool: Arc<Spool>,
    sink: Sink,
    batch_events: usize,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) -> crate::Result<()> {
    let mut backoff = Duration::from_millis(200);
    let mut limit = batch_events;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        metrics.spool_bytes.set(spool.bytes() as i64);
        metrics.spool_events.set(spool.len() as i64);
        if *stop.borrow() && drain_deadline.is_none() {
            drain_deadline = Some(tokio::time::Instant::now() + drain);
        }
        if drain_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Ok(());
        }
        let batch = spool.peek(limit)?;
        if batch.is_empty() {
            deliver_watermarks(&spool, &sink, &metrics).await?;
            if drain_deadline.is_some() {
                return Ok(());
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        // The first run of one namespace, in spool order.
        let ns = batch[0].namespace.clone();
        let run: Vec<Spooled> = batch
            .into_iter()
            .take_while(|s| s.namespace == ns)
            .collect();
        let wait = match sink.send(&ns, &run).await {
            Ok(()) => {
                spool.ack(&run)?;
                metrics.events_sent.inc_by(run.len() as u64);
                deliver_watermarks(&spool, &sink, &metrics).await?;
                backoff = Duration::from_millis(200);
                limit = batch_events;
                None
            }
            Err(SendError::Rejected(bad)) => {
                let rejected: Vec<Spooled> = bad.iter().map(|(i, _)| run[*i].clone()).collect();
                for (i, reason) in &bad {
                    tracing::error!(namespace = %ns, event = %String::from_utf8_lossy(&run[*i].body), %reason, "Sink refused an invalid event; dropping it");
                }
                spool.ack(&rejected)?;
                metrics.events_rejected.inc_by(rejected.len() as u64);
                None
            }
            Err(SendError::TooLarge) => {
                limit = (run.len() / 2).max(1);
                None
            }
            Err(SendError::Retry { after, reason }) => {
                metrics.send_failures.inc();
                tracing::warn!(namespace = %ns, events = run.len(), %reason, "Delivery failed; the events stay spooled and will be retried");
                let wait = after.unwrap_or(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                Some(wait)
            }
        };
        if let Some(wait) = wait {
            let until = match drain_deadline {
                Some(d) => d.min(tokio::time::Instant::now() + wait),
                None => tokio::time::Instant::now() + wait,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = stop.changed(), if drain_deadline.is_none() => {}
            }
        }
    }
}
