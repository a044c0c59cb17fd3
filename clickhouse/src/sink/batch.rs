//! One batch's messages: what was read from Kafka, decoded into rows or dead letters.
use tally_crds::{Envelope, Message};
use tally_meter::store::DeadLetter;

use super::dedup::identity_key;
use crate::watermarks::{self, GapRow, WatermarkRow};
use crate::{DeadLetterRow, EventRow};

/// Whether a payload names a `"watermark"` key (a cheap test before a second parse).
fn memchr_watermark(payload: &[u8]) -> bool {
    payload.windows(11).any(|w| w == b"\"watermark\"")
}

#[derive(Clone, Debug)]
pub(super) struct Msg {
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) payload: Vec<u8>,
}

/// A decoded message: its row and identity hashes.
pub(super) struct Decoded {
    pub(super) row: EventRow,
    pub(super) h64: u64,
    pub(super) h128: u128,
}

/// A decoded message: an event, or a source's watermark.
// events are nearly every message: boxing them would allocate once per event
#[allow(clippy::large_enum_variant)]
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
