//! Reading Kafka on a thread of its own, so the next batch is collected (and decoded:
//! [`Msg::read`]) while this one is applied.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{ClientContext, TopicPartitionList};

use super::batch::Msg;

/// The consumer's context: the rebalances not yet seen by the sink's thread, and the
/// lock that keeps a rebalance from overlapping a step of it.
#[derive(Default)]
pub(super) struct RebalanceLog {
    rebalanced: Mutex<Vec<(bool, Vec<i32>)>>,
    working: Mutex<()>,
}

impl ClientContext for RebalanceLog {}

impl RebalanceLog {
    fn record(&self, assigned: bool, tpl: &TopicPartitionList) {
        let _working = self.working();
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

/// The fetch thread; stops (and is joined) on drop.
pub(super) struct Fetcher {
    pub(super) rx: Receiver<Result<Msg, String>>,
    quit: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Fetcher {
    /// Polls `consumer` on a new thread, keeping at most `ahead` messages waiting.
    pub(super) fn spawn(consumer: Arc<BaseConsumer<RebalanceLog>>, ahead: usize) -> Fetcher {
        let (tx, rx) = std::sync::mpsc::sync_channel(ahead.max(1));
        let quit = Arc::new(AtomicBool::new(false));
        let thread = {
            let quit = quit.clone();
            std::thread::Builder::new()
                .name("tally-sink-fetch".into())
                .spawn(move || fetch(&consumer, &tx, &quit))
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

fn fetch(
    consumer: &BaseConsumer<RebalanceLog>,
    tx: &SyncSender<Result<Msg, String>>,
    quit: &AtomicBool,
) {
    while !quit.load(Ordering::SeqCst) {
        let item = match consumer.poll(Duration::from_millis(100)) {
            None => continue,
            // decoded here, so decoding overlaps the batch being applied
            Some(Ok(m)) => Ok(Msg::read(
                m.partition(),
                m.offset(),
                m.payload().unwrap_or_default().to_vec(),
            )),
            Some(Err(e)) => Err(e.to_string()),
        };
        let mut item = Some(item);
        // a full channel waits for the sink (polling stops meanwhile; heartbeats go on
        // in librdkafka's own threads), checking for the end now and then
        while let Some(i) = item.take() {
            match tx.try_send(i) {
                Ok(()) => {}
                Err(TrySendError::Full(i)) => {
                    if quit.load(Ordering::SeqCst) {
                        return;
                    }
                    item = Some(i);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}
