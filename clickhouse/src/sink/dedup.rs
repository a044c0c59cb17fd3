//! Dedup by (namespace, source, id): within the batch, against recent identities in
//! memory, and against `event_ids` in ClickHouse for the rest.
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tally_meter::Result;

use super::Sink;
use super::batch::{Decoded, Item, Msg, Prepared, decode_ahead};
use crate::{Ch, EventRow};

#[derive(Clone, Debug, Serialize, Deserialize, clickhouse::Row)]
struct IdRow {
    h: u64,
    namespace: String,
    source: String,
    id: String,
    ingested: u32,
    /// Where the event was read (a repair leaves out its own batch's: see the module
    /// docs of [`super`]).
    kafka_partition: i32,
    kafka_offset: i64,
}

/// The identity key of an event: namespace, source and id, NUL-separated. Hash hits
/// from ClickHouse are confirmed on the full strings; the in-memory set relies on the
/// 128-bit hash (a collision among 10^12 identities has a probability near 10^-15).
pub(super) fn identity_key(ns: &str, source: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + source.len() + id.len() + 2);
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k.extend_from_slice(source.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn hash64(ns: &str, source: &str, id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&identity_key(ns, source, id))
}

pub(super) fn hash128(ns: &str, source: &str, id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(&identity_key(ns, source, id))
}

/// Recent identities, bounded; oldest forgotten first. Each is tagged with the number of
/// the batch that stored it (batches count from 1 in this process), so a look-up made
/// ahead knows whether memory still covers what it could not see
/// ([`Looked::valid`]).
#[derive(Debug)]
pub(super) struct RecentIds {
    /// hashbrown's default hasher (foldhash): std's SipHash was a visible part of a
    /// batch's time, for keys that are hashes already
    pub(super) set: hashbrown::HashSet<u128>,
    order: VecDeque<(u128, i64, u64)>,
    capacity: usize,
    /// The newest batch some of whose identities were forgotten for want of room.
    evicted: u64,
}

impl RecentIds {
    pub(super) fn new(bytes: usize) -> RecentIds {
        // a set entry (16 B + hash table overhead) plus a queue entry (32 B): ~72 B
        RecentIds {
            set: hashbrown::HashSet::new(),
            order: VecDeque::new(),
            capacity: (bytes / 72).max(1),
            evicted: 0,
        }
    }

    /// Remembers identity `h`, stored at `at` (ClickHouse seconds) by batch `batch`.
    pub(super) fn insert(&mut self, h: u128, at: i64, batch: u64) {
        if self.set.insert(h) {
            self.order.push_back((h, at, batch));
            while self.order.len() > self.capacity {
                if let Some((old, _, b)) = self.order.pop_front() {
                    self.set.remove(&old);
                    self.evicted = self.evicted.max(b);
                }
            }
        }
    }

    /// Forgets identities stored before `before` (outside the dedup window: they are
    /// no duplicates' originals any more, here or in `event_ids`).
    pub(super) fn expire(&mut self, before: i64) {
        while self.order.front().is_some_and(|(_, at, _)| *at < before) {
            if let Some((old, _, _)) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// What a look-up made ahead of the batch, on the fetch thread, found of one identity
/// ([`look_ahead`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Looked {
    /// The batches finished before the look-up was sent: their identities were in
    /// `event_ids` for it to see.
    pub(super) finished: u64,
    /// The consumer's rebalances counted when the message was read.
    pub(super) rebalances: u64,
    /// When the identity was stored (`ingested`), if it was.
    pub(super) stored: Option<u32>,
}

impl Looked {
    /// Whether the look-up, with this sink's memory, still answers for a batch now: no
    /// rebalance since the message was read (another sink may have stored identities of
    /// a partition that was away meanwhile), and memory still holds every identity
    /// stored by a batch the look-up could not see.
    pub(super) fn valid(&self, recent: &RecentIds, rebalances: u64) -> bool {
        self.rebalances == rebalances && recent.evicted <= self.finished
    }
}

/// The identities among `hashes` (xxh3-64 of the identity key) stored in `event_ids`
/// since `window_start`: (namespace, source, id, ingested). Hash hits are to be
/// confirmed on the strings by the caller.
pub(super) async fn stored_identities(
    ch: &Ch,
    hashes: &[u64],
    window_start: i64,
    own: &[(i32, i64, i64)],
) -> Result<Vec<(String, String, String, u32)>> {
    // a repaired batch's identities were stored by its own earlier attempt, maybe
    // without its events: they are no originals of its events
    let not_own = if own.is_empty() {
        String::new()
    } else {
        format!(" AND NOT ({})", super::repair::in_ranges(own))
    };
    let mut found = Vec::new();
    // one array literal parses ~6x faster than an IN list of the same numbers and is one
    // syntax-tree node (ClickHouse caps a query at 50,000)
    for chunk in hashes.chunks(100_000) {
        let list = chunk
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(",");
        found.extend(
            ch.fetch::<(String, String, String, u32)>(
                "look up stored identities",
                &format!(
                    "SELECT namespace, source, id, toUInt32(max(ingested)) FROM {}.event_ids \
                     WHERE h IN (SELECT arrayJoin([{list}])) AND ingested >= toDateTime({}){not_own} \
                     GROUP BY namespace, source, id",
                    ch.db(),
                    window_start.max(0)
                ),
            )
            .await?,
        );
    }
    Ok(found)
}

/// Identities found stored, by hash.
struct Found(HashMap<u64, Vec<(String, String, String, u32)>>);

impl Found {
    fn new(rows: Vec<(String, String, String, u32)>) -> Found {
        let mut by_hash: HashMap<u64, Vec<_>> = HashMap::new();
        for r in rows {
            by_hash.entry(hash64(&r.0, &r.1, &r.2)).or_default().push(r);
        }
        Found(by_hash)
    }

    /// When `d`'s identity was stored, if it was (the hash confirmed on the strings).
    fn stored(&self, d: &Decoded) -> Option<u32> {
        let r = &d.row;
        self.0.get(&d.h64)?.iter().find_map(|(ns, source, id, at)| {
            (*ns == r.namespace && *source == r.source && *id == r.id).then_some(*at)
        })
    }
}

/// Looks up, ahead of their batch, the identities of the events among `msgs` (read from
/// Kafka, decoded) stored since `window_start`; each event's decoding is given what was
/// found ([`Looked`]). `finished` is the count of the sink's finished batches, read
/// before the look-up is sent.
pub(super) async fn look_ahead(
    ch: &Ch,
    msgs: &[Msg],
    window_start: i64,
    finished: u64,
) -> Result<()> {
    let mut hashes = Vec::new();
    for m in msgs {
        m.with_event(|d| hashes.push(d.h64));
    }
    if hashes.is_empty() {
        return Ok(());
    }
    hashes.sort_unstable();
    hashes.dedup();
    let found = Found::new(stored_identities(ch, &hashes, window_start, &[]).await?);
    for m in msgs {
        m.with_event(|d| {
            d.looked = Some(Looked {
                finished,
                rebalances: m.rebalances,
                stored: found.stored(d),
            });
        });
    }
    Ok(())
}

impl Sink {
    pub(super) async fn insert_ids(&self, rows: &[EventRow], s: i64) -> Result<()> {
        let ids: Vec<IdRow> = rows
            .iter()
            .map(|r| IdRow {
                h: hash64(&r.namespace, &r.source, &r.id),
                namespace: r.namespace.clone(),
                source: r.source.clone(),
                id: r.id.clone(),
                ingested: s as u32,
                kafka_partition: r.kafka_partition,
                kafka_offset: r.kafka_offset,
            })
            .collect();
        self.ch.insert::<IdRow>("event_ids", &ids).await
    }

    /// Decodes and deduplicates `msgs` (in offset order). Messages at `present`
    /// (partition, offset) are already in `events`: they count as seen and are returned
    /// in `present`, not in `rows`. `own`: the (partition, first, last offset) ranges of
    /// the batch being repaired, whose stored identities are its own (none for a new
    /// batch).
    pub(super) fn prepare(
        &mut self,
        msgs: &[Msg],
        s: i64,
        present: &HashSet<(i32, i64)>,
        own: &[(i32, i64, i64)],
    ) -> Result<Prepared> {
        let now = chrono::Utc::now().timestamp();
        let window_start = s - self.cfg.dedup_window.as_secs() as i64;
        self.recent.expire(window_start);
        let t0 = Instant::now();
        // decoded on the fetch thread as a rule; what was not is decoded now
        decode_ahead(msgs);
        let decoded_in = t0.elapsed();
        // identities that need a ClickHouse look-up: not present, not in memory, not
        // looked up ahead (or no longer validly: Looked::valid)
        let rebalances = self.rebalances();
        let mut ask: HashSet<u64> = HashSet::new();
        let mut ahead = 0usize;
        for m in msgs {
            m.with_event(|d| {
                if present.contains(&(d.row.kafka_partition, d.row.kafka_offset))
                    || self.recent.set.contains(&d.h128)
                {
                    return;
                }
                match d.looked {
                    Some(l) if l.valid(&self.recent, rebalances) => ahead += 1,
                    _ => {
                        ask.insert(d.h64);
                    }
                }
            });
        }
        let mut found = Found(HashMap::new());
        if !ask.is_empty() {
            let hashes: Vec<u64> = ask.into_iter().collect();
            self.stats.lookups.inc();
            found = Found::new(self.rt.block_on(stored_identities(
                &self.ch,
                &hashes,
                window_start,
                own,
            ))?);
        }
        tracing::debug!(?decoded_in, looked_up = ?t0.elapsed(), ahead, "Decoded and looked up");
        // one pass in offset order, each row moved once into what it becomes
        let mut seen = hashbrown::HashSet::<u128>::with_capacity(msgs.len());
        let mut hashes = Vec::with_capacity(msgs.len());
        let (mut rows, mut kept_present, mut dead, mut duplicates) =
            (Vec::with_capacity(msgs.len()), Vec::new(), Vec::new(), 0u64);
        let (mut marks, mut gaps) = (Vec::new(), Vec::new());
        for m in msgs {
            let d = match m.decoded(s, now) {
                Ok(Item::Event(d)) => d,
                Ok(Item::Mark(mark, g)) => {
                    marks.push(mark);
                    gaps.extend(g);
                    continue;
                }
                Err(letter) => {
                    dead.push(letter);
                    continue;
                }
            };
            if present.contains(&(d.row.kafka_partition, d.row.kafka_offset)) {
                seen.insert(d.h128);
                hashes.push(d.h128);
                kept_present.push(d.row);
                continue;
            }
            let stored = match d.looked {
                Some(l) if l.valid(&self.recent, rebalances) => l.stored,
                _ => found.stored(&d),
            };
            if seen.contains(&d.h128)
                || self.recent.set.contains(&d.h128)
                || stored.is_some_and(|at| i64::from(at) >= window_start)
            {
                duplicates += 1;
                continue;
            }
            seen.insert(d.h128);
            hashes.push(d.h128);
            rows.push(d.row);
        }
        Ok(Prepared {
            rows,
            present: kept_present,
            hashes,
            dead,
            duplicates,
            marks,
            gaps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn looked(finished: u64, rebalances: u64) -> Looked {
        Looked {
            finished,
            rebalances,
            stored: None,
        }
    }

    #[test]
    fn a_look_up_ahead_holds_while_memory_keeps_the_batches_it_could_not_see() {
        // room for 4 identities (72 B each)
        let mut recent = RecentIds::new(4 * 72);
        for h in 0..4u128 {
            recent.insert(h, 100, 1 + (h as u64) / 2); // batches 1 and 2
        }
        // sent after batch 1 finished: batch 2 is in memory
        assert!(looked(1, 0).valid(&recent, 0));
        // batch 3 pushes out two identities of batch 1
        recent.insert(10, 101, 3);
        recent.insert(11, 101, 3);
        assert!(recent.evicted == 1 && !recent.set.contains(&0));
        assert!(looked(1, 0).valid(&recent, 0), "batch 1 was visible to it");
        assert!(
            !looked(0, 0).valid(&recent, 0),
            "batch 1 is neither seen nor kept"
        );
        // batch 4 pushes out identities of batch 2
        recent.insert(12, 102, 4);
        recent.insert(13, 102, 4);
        assert_eq!(recent.evicted, 2);
        assert!(!looked(1, 0).valid(&recent, 0));
        assert!(looked(2, 0).valid(&recent, 0));
    }

    #[test]
    fn a_look_up_ahead_is_void_after_a_rebalance() {
        let recent = RecentIds::new(1 << 20);
        assert!(looked(0, 3).valid(&recent, 3));
        assert!(!looked(0, 3).valid(&recent, 4));
    }

    #[test]
    fn expiry_by_time_does_not_void_look_ups() {
        let mut recent = RecentIds::new(1 << 20);
        recent.insert(1, 100, 1);
        recent.insert(2, 200, 2);
        recent.expire(150);
        assert!(!recent.set.contains(&1) && recent.set.contains(&2));
        assert!(looked(0, 0).valid(&recent, 0));
    }
}
