//! Reading Kafka on a thread of its own, so the next batch is collected (and decoded:
//! [`super::batch::decode_ahead`]) while this one is applied.
//!
//! The fetch thread only polls the consumer and hands messages over (a bounded
//! channel, at most one batch ahead). Everything that decides (routing, seeking, the
//! sink log, repairs, applying) stays on the sink's thread, which holds
//! [`RebalanceLog::working`] while it does. Rebalance callbacks run on the fetch thread
//! inside `poll` and take that lock first, so **a partition changes hands only between
//! two of the sink's steps**, never while a batch of it is being written: the new owner
//! cannot start on a partition this sink is still writing. After a rebalance, messages
//! of partitions no longer assigned may still wait in the channel; the sink drops them
//! (`owned` in [`super::Sink`]), and a partition assigned again is re-read from its sink
//! log, as before.
//!
//! On one server the fetch thread also looks up, a chunk of messages at a time, which
//! of their identities `event_ids` holds, before handing them over: the batch's dedup
//! look-up is then made while the previous batch is still written. What it found is
//! advice the batch takes only while it still holds ([`super::dedup::Looked::valid`]);
//! a failed look-up leaves the batch to look up itself.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientContext, TopicPartitionList};

use super::batch::{Msg, decode_ahead};
use super::dedup::look_ahead;
use super::stats::SinkStats;
use crate::Ch;

/// The consumer's context: the rebalances not yet seen by the sink's thread, and the
/// lock that keeps a rebalance from overlapping a step of it.
#[derive(Default)]
pub(super) struct RebalanceLog {
    rebalanced: Mutex<Vec<(bool, Vec<i32>)>>,
    working: Mutex<()>,
    /// Rebalances so far (a look-up made ahead is void after one: [`super::dedup::Looked`]).
    count: AtomicU64,
}

impl ClientContext for RebalanceLog {}

impl RebalanceLog {
    fn record(&self, assigned: bool, tpl: &TopicPartitionList) {
        let _working = self.working();
        self.count.fetch_add(1, Ordering::SeqCst);
        let parts = tpl.elements().iter().map(|e| e.partition()).collect();
        self.rebalanced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((assigned, parts));
    }

    /// Held by the sink's thread while it works on partitions; rebalances wait for it.
    pub(super) fn working(&self) -> MutexGuard<'_, ()> {
        self.working.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Voids the look-ups made ahead so far, as a rebalance does: after a repair
    /// deleted identities a look-up may have found (`repair.rs`).
    pub(super) fn void_look_aheads(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// How many rebalances (and voidings: [`Self::void_look_aheads`]) there have been.
    pub(super) fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// The rebalances since the last call: (assigned, partitions), in order.
    pub(super) fn take(&self) -> Vec<(bool, Vec<i32>)> {
        std::mem::take(&mut *self.rebalanced.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl ConsumerContext for RebalanceLog {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.record(false, tpl);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.record(true, tpl);
        }
    }
}

/// Dedup look-ups made on the fetch thread, ahead of the batch (one server only: on a
/// cluster each partition's identities live on its shard, and the sink's thread looks
/// them up there).
pub(super) struct LookAhead {
    /// A client of its own: a pooled connection is driven by the runtime that opened it,
    /// and the fetch thread's runtime runs only while it looks up.
    pub(super) ch: Ch,
    /// The sink's finished batches (stored identities in `event_ids` and in memory).
    pub(super) finished: Arc<AtomicU64>,
    pub(super) window_secs: i64,
    pub(super) stats: Arc<SinkStats>,
}

/// What the fetch thread hands over, in the order it was read.
pub(super) enum Fetched {
    Msg(Msg),
    /// The partition's end was reached: nothing more of it for now (Kafka's partition
    /// EOF), so a batch need not wait for more of it ([`super::Sink`]).
    CaughtUp(i32),
    /// A consumer error, to log.
    Error(String),
}

/// The fetch thread; stops (and is joined) on drop.
pub(super) struct Fetcher {
    pub(super) rx: Receiver<Fetched>,
    quit: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Fetcher {
    /// Polls `consumer` on a new thread, keeping at most `ahead` messages waiting, their
    /// identities looked up ahead when `look` is given.
    pub(super) fn spawn(
        consumer: Arc<BaseConsumer<RebalanceLog>>,
        ahead: usize,
        look: Option<LookAhead>,
    ) -> Fetcher {
        let (tx, rx) = std::sync::mpsc::sync_channel(ahead.max(1));
        let quit = Arc::new(AtomicBool::new(false));
        let thread = {
            let quit = quit.clone();
            std::thread::Builder::new()
                .name("tally-sink-fetch".into())
                .spawn(move || fetch(&consumer, &tx, &quit, look.as_ref(), ahead))
                .expect("spawning the fetch thread")
        };
        Fetcher {
            rx,
            quit,
            thread: Some(thread),
        }
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How many messages one look-up ahead covers at most.
const LOOK_AHEAD_ROWS: usize = 10_000;

fn fetch(
    consumer: &BaseConsumer<RebalanceLog>,
    tx: &SyncSender<Fetched>,
    quit: &AtomicBool,
    look: Option<&LookAhead>,
    ahead: usize,
) {
    let rt = match look.map(|_| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }) {
        Some(Ok(rt)) => Some(rt),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "No runtime for dedup look-ups ahead; the sink looks up each batch itself");
            None
        }
        None => None,
    };
    let chunk = ahead.clamp(1, LOOK_AHEAD_ROWS);
    let mut read: Vec<Msg> = Vec::new();
    while !quit.load(Ordering::SeqCst) {
        // the first message of a chunk is waited for; the chunk ends when it is full or
        // the stream pauses (a look-up per message would cost more than it saves)
        let wait = if read.is_empty() {
            Duration::from_millis(100)
        } else {
            Duration::from_millis(10)
        };
        let (error, caught_up) = match consumer.poll(wait) {
            Some(Ok(m)) => {
                read.push(Msg::read(
                    m.partition(),
                    m.offset(),
                    m.payload().unwrap_or_default().to_vec(),
                    consumer.context().count(),
                ));
                if read.len() < chunk {
                    continue;
                }
                (None, None)
            }
            Some(Err(KafkaError::PartitionEOF(p))) => (None, Some(p)),
            Some(Err(e)) => (Some(e.to_string()), None),
            None if read.is_empty() => continue,
            None => (None, None),
        };
        if !read.is_empty() {
            // decoded here, so decoding overlaps the batch being applied
            decode_ahead(&read);
            if let (Some(look), Some(rt)) = (look, &rt) {
                look_up(rt, look, &read);
            }
        }
        let items = read.drain(..).map(Fetched::Msg);
        let items = items.chain(error.map(Fetched::Error));
        for item in items.chain(caught_up.map(Fetched::CaughtUp)) {
            if !send(tx, quit, item) {
                return;
            }
        }
    }
}

/// Looks up `msgs`' identities ahead (best effort: on failure the sink's thread looks
/// them up with its batch, retrying as it does).
fn look_up(rt: &tokio::runtime::Runtime, look: &LookAhead, msgs: &[Msg]) {
    // read before the look-up is sent: those batches' identities are in `event_ids`
    let finished = look.finished.load(Ordering::SeqCst);
    // a minute early: the sink compares `ingested` with its batch's own window
    let window_start = chrono::Utc::now().timestamp() - look.window_secs - 60;
    let looked = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            look_ahead(&look.ch, msgs, window_start, finished),
        )
        .await
    });
    match looked {
        Ok(Ok(())) => {
            look.stats.lookups.inc();
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "A dedup look-up ahead failed; the batch looks up itself")
        }
        Err(_) => {
            tracing::debug!("A dedup look-up ahead took over 10 s; the batch looks up itself")
        }
    }
}

/// Hands `item` to the sink's thread, waiting while the channel is full (polling stops
/// meanwhile; heartbeats go on in librdkafka's own threads); false when the fetch ends.
fn send(tx: &SyncSender<Fetched>, quit: &AtomicBool, item: Fetched) -> bool {
    let mut item = Some(item);
    while let Some(i) = item.take() {
        match tx.try_send(i) {
            Ok(()) => {}
            Err(TrySendError::Full(i)) => {
                if quit.load(Ordering::SeqCst) {
                    return false;
                }
                item = Some(i);
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(TrySendError::Disconnected(_)) => return false,
        }
    }
    true
}
