//! One batch's messages: what was read from Kafka, decoded into rows or dead letters.
use std::sync::Mutex;

use tally_crds::{Envelope, Message};
use tally_meter::store::DeadLetter;

use super::dedup::{Looked, identity_key};
use crate::watermarks::{self, GapRow, WatermarkRow};
use crate::{DeadLetterRow, EventRow};

/// Whether a payload names a `"watermark"` key (a cheap test before a second parse).
fn memchr_watermark(payload: &[u8]) -> bool {
    payload.windows(11).any(|w| w == b"\"watermark\"")
}

/// A message as read from Kafka, and its decoding when the fetch thread made it ahead
/// of the batch ([`decode_ahead`]).
#[derive(Debug)]
pub(super) struct Msg {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) payload: Vec<u8>,
    /// The consumer's rebalances counted when it was read (0 when not read ahead).
    pub(super) rebalances: u64,
    decoded: Mutex<Option<Box<std::result::Result<Item, DeadLetter>>>>,
}

/// A copy carries no decoding and no look-up (a repair decodes and looks up again).
impl Clone for Msg {
    fn clone(&self) -> Msg {
        Msg::new(self.partition, self.offset, self.payload.clone())
    }
}

impl Msg {
    /// A message, to be decoded with its batch.
    pub(super) fn new(partition: i32, offset: i64, payload: Vec<u8>) -> Msg {
        Msg {
            partition,
            offset,
            payload,
            rebalances: 0,
            decoded: Mutex::new(None),
        }
    }

    /// A message read ahead of its batch, with the consumer's rebalance count then; to
    /// be decoded ahead ([`decode_ahead`]).
    pub(super) fn read(partition: i32, offset: i64, payload: Vec<u8>, rebalances: u64) -> Msg {
        let mut m = Msg::new(partition, offset, payload);
        m.rebalances = rebalances;
        m
    }

    /// Calls `f` with the event decoded ahead, if the message is one.
    pub(super) fn with_event(&self, f: impl FnOnce(&mut Decoded)) {
        let mut ahead = self.decoded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(item) = ahead.as_deref_mut()
            && let Ok(Item::Event(d)) = item
        {
            f(d);
        }
    }

    /// The message decoded for a batch begun at `s` (ClickHouse seconds) at `now`: the
    /// decoding made ahead if there is one (taken), else made now.
    pub(super) fn decoded(&self, s: i64, now: i64) -> std::result::Result<Item, DeadLetter> {
        let ahead = self
            .decoded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match ahead.map(|b| *b) {
            Some(Ok(Item::Event(mut d))) => {
                d.row.inserted_at = s.clamp(0, u32::MAX as i64) as u32;
                Ok(Item::Event(d))
            }
            Some(Err(mut dead)) => {
                dead.at = now as u32;
                Err(dead)
            }
            Some(mark) => mark,
            None => decode(self, s, now),
        }
    }
}

/// Decodes those of `msgs` not decoded yet, spread over the cores: on the fetch thread
/// while an earlier batch is applied, and for a batch, what was not (a repair's
/// copies). Decoding does not depend on the batch but for its `S` and the dead
/// letters' time, which [`Msg::decoded`] fills in.
pub(super) fn decode_ahead(msgs: &[Msg]) {
    let undecoded = |m: &Msg| {
        m.decoded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
    };
    if !msgs.iter().any(undecoded) {
        return;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = msgs.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for chunk in msgs.chunks(per) {
            scope.spawn(move || {
                for m in chunk {
                    let mut slot = m.decoded.lock().unwrap_or_else(|e| e.into_inner());
                    if slot.is_none() {
                        *slot = Some(Box::new(decode(m, 0, 0)));
                    }
                }
            });
        }
    });
}

/// A decoded message: its row and identity hashes.
#[derive(Debug)]
pub(super) struct Decoded {
    pub(super) row: EventRow,
    pub(super) h64: u64,
    pub(super) h128: u128,
    /// What a look-up ahead of the batch found ([`super::dedup::look_ahead`]).
    pub(super) looked: Option<Looked>,
}

/// A decoded message: an event, or a source's watermark.
// events are nearly every message: boxing them would allocate once per event
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Item {
    Event(Decoded),
    Mark(WatermarkRow, Vec<GapRow>),
}

/// Decodes one message into its row, or a dead letter saying why it cannot be stored.
/// Events are tried first (the common case is parsed once); a payload that is no
/// envelope may be a watermark.
pub(super) fn decode(m: &Msg, s: i64, now: i64) -> std::result::Result<Item, DeadLetter> {
    let decoded = Envelope::decode(&m.payload)
        .map(Message::from)
        .or_else(|reason| {
            if memchr_watermark(&m.payload) {
                Message::decode(&m.payload)
            } else {
                Err(reason)
            }
        });
    match decoded {
        Ok(Message::Event(ns, ev, ingested)) => {
            let key = identity_key(&ns, &ev.source, &ev.id);
            Ok(Item::Event(Decoded {
                h64: xxhash_rust::xxh3::xxh3_64(&key),
                h128: xxhash_rust::xxh3::xxh3_128(&key),
                row: EventRow::new(&ns, &ev, ingested, s, m.partition, m.offset),
                looked: None,
            }))
        }
        Ok(Message::Watermark(ns, mark)) => {
            let (row, gaps) = watermarks::rows(&ns, &mark, m.partition);
            Ok(Item::Mark(row, gaps))
        }
        Err(reason) => Err(DeadLetter {
            kafka_partition: m.partition,
            kafka_offset: m.offset,
            namespace: serde_json::from_slice::<serde_json::Value>(&m.payload)
                .ok()
                .and_then(|v| v.get("namespace")?.as_str().map(String::from))
                .filter(|n| tally_crds::envelope::is_namespace(n))
                .unwrap_or_default(),
            reason,
            payload: String::from_utf8_lossy(&m.payload).into_owned(),
            at: now as u32,
        }),
    }
}

/// A decoded batch, ready to write.
pub(super) struct Prepared {
    /// Rows to insert into `events`.
    pub(super) rows: Vec<EventRow>,
    /// Rows of the range already in `events` (repair only).
    pub(super) present: Vec<EventRow>,
    /// The identities of `rows` and `present` (their [`super::dedup::hash128`]), to
    /// remember once the batch is stored (a repair sets those it stored).
    pub(super) hashes: Vec<u128>,
    pub(super) dead: Vec<DeadLetter>,
    pub(super) duplicates: u64,
    /// Watermark records of the batch, and their gaps.
    pub(super) marks: Vec<WatermarkRow>,
    pub(super) gaps: Vec<GapRow>,
}

/// The dead letters as `dead_letters` rows.
pub(super) fn dead_rows(dead: &[DeadLetter]) -> Vec<DeadLetterRow> {
    dead.iter().map(DeadLetterRow::from).collect()
}
