//! One batch's messages: what was read from Kafka, decoded into rows or dead letters.
use tally_crds::Envelope;
use tally_meter::store::DeadLetter;

use super::dedup::identity_key;
use crate::{DeadLetterRow, EventRow};

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

/// Decodes one message into its row, or a dead letter saying why it cannot be stored.
pub(super) fn decode(m: &Msg, s: i64, now: i64) -> std::result::Result<Decoded, DeadLetter> {
    match Envelope::decode(&m.payload) {
        Ok((ns, ev, ingested)) => {
            let key = identity_key(&ns, &ev.source, &ev.id);
            Ok(Decoded {
                h64: xxhash_rust::xxh3::xxh3_64(&key),
                h128: xxhash_rust::xxh3::xxh3_128(&key),
                row: EventRow::new(&ns, &ev, ingested, s, m.partition, m.offset),
            })
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
}

/// The dead letters as `dead_letters` rows.
pub(super) fn dead_rows(dead: &[DeadLetter]) -> Vec<DeadLetterRow> {
    dead.iter().map(DeadLetterRow::from).collect()
}
