//! The sink's own evaluation of the meters over a batch: the rollup rows each meter's
//! SELECT ([`crate::rollup::RollupSql::select`]) would produce from the batch's new
//! rows, computed in one pass over the rows for all of an event type's meters and sent
//! as ready aggregate states, one insert per rollup table.
//!
//! It reads the same flattened columns the SQL reads ([`crate::Flat`]), with the same
//! rules: a path is found by its canonical key (missing reads as kind 0, like null), an
//! event with a per-meter validation error is left out, the fifteen-minute rows merge
//! the minute rows. `fold_matches_the_sql` in the conformance tests holds the two to
//! the same states on ClickHouse 18.16 and 26.9; repair and backfill still use the SQL.
//!
//! # The states on the wire
//! `RowBinary` of the rollup columns, the aggregate states in ClickHouse's own
//! serialization, which is stable because parts store it (a part written by one
//! version is read by the next): `count` a VarUInt; `sum(Float64)` the Float64; `min`
//! and `max` a has-value byte and the value; `argMax(Float64, Tuple(…))` the result
//! then the key, each with a has-value byte; `max(Tuple(…))` a has-value byte and the
//! tuple (Int64s little-endian, the String length-prefixed); `groupUniqArray(String)`
//! a VarUInt count and the strings. The `clickhouse` crate writes no aggregate states,
//! so this module encodes them (about sixty lines).
use std::collections::HashSet;

use tally_crds::{Aggregation, FilterOperator};
use tally_meter::engine::CompiledMeter;
use tally_meter::engine::path::{Segment, SingularPath};

use crate::EventRow;
use crate::rollup::Grain;

/// A path's canonical key, as pieces: literal text, or `[n + i]` where n is the length
/// of the array whose key is everything before (a negative index).
#[derive(Clone, Debug)]
enum Piece {
    Text(String),
    FromEnd(i64),
}

#[derive(Clone, Debug)]
struct Key(Vec<Piece>);

impl Key {
    /// The pieces of [`crate::rollup::key_expr`].
    fn of(path: &SingularPath) -> Key {
        let mut pieces = Vec::new();
        let mut literal = String::from("$");
        for seg in path.segments() {
            match seg {
                Segment::Index(i) if *i < 0 => {
                    pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    pieces.push(Piece::FromEnd(*i));
                }
                seg => literal.push_str(&seg.key()),
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Key(pieces)
    }

    /// The 0-based position of this key in `row`'s flattened paths, or `None`
    /// (`indexOf` = 0).
    fn position(&self, row: &EventRow) -> Option<usize> {
        match self.0.as_slice() {
            [Piece::Text(k)] => row.data_paths.iter().position(|p| p == k),
            pieces => {
                let mut key = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(t) => key.push_str(t),
                        Piece::FromEnd(i) => {
                            // toInt64(data_nums[indexOf(data_paths, key)]) + i
                            let n = row
                                .data_paths
                                .iter()
                                .position(|p| *p == key)
                                .map_or(0, |at| row.data_nums[at] as i64);
                            key.push_str(&format!("[{}]", n.saturating_add(*i)));
                        }
                    }
                }
                row.data_paths.iter().position(|p| *p == key)
            }
        }
    }
}

/// What one path reads as in one row: kind, string, number, number ok.
#[derive(Clone, Copy)]
struct Node<'a> {
    kind: u8,
    text: &'a str,
    num: f64,
    num_ok: bool,
}

impl<'a> Node<'a> {
    fn at(row: &'a EventRow, key: &Key) -> Node<'a> {
        match key.position(row) {
            Some(i) => Node {
                kind: row.data_kinds[i],
                text: &row.data_strs[i],
                num: row.data_nums[i],
                num_ok: row.data_num_ok[i] == 1,
            },
            None => Node {
                kind: 0,
                text: "",
                num: 0.0,
                num_ok: false,
            },
        }
    }

    fn scalar(&self) -> bool {
        matches!(self.kind, 1..=3)
    }
}

#[derive(Debug)]
struct Filter {
    key: Key,
    op: FilterOperator,
    values: HashSet<String>,
    number: Option<f64>,
}

impl Filter {
    fn keeps(&self, n: Node<'_>) -> bool {
        let listed = || n.scalar() && self.values.contains(n.text);
        let cmp = |f: fn(f64, f64) -> bool| match self.number {
            Some(x) => n.num_ok && f(n.num, x),
            None => false,
        };
        match self.op {
            FilterOperator::Exists => n.kind != 0,
            FilterOperator::Eq | FilterOperator::In => listed(),
            FilterOperator::Ne | FilterOperator::NotIn => !listed(),
            FilterOperator::Gt => cmp(|a, b| a > b),
            FilterOperator::Gte => cmp(|a, b| a >= b),
            FilterOperator::Lt => cmp(|a, b| a < b),
            FilterOperator::Lte => cmp(|a, b| a <= b),
        }
    }
}

/// One meter, ready to fold rows.
#[derive(Debug)]
pub struct MeterFold {
    /// The minute rollup table (`rollup_<hash>`).
    pub table: String,
    namespace: String,
    ty: String,
    from_ms: Option<i64>,
    filters: Vec<Filter>,
    groups: Vec<Key>,
    value: Option<Key>,
    aggregation: Aggregation,
}

/// The `LATEST` order: (time_ms, ingested_ms, kafka_offset, id).
type Order<'a> = (i64, i64, i64, &'a str);

/// One rollup row's states.
#[derive(Default)]
struct State<'a> {
    cnt: u64,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
    latest: Option<(f64, Order<'a>)>,
    uniq: HashSet<&'a str>,
}

impl<'a> State<'a> {
    fn add(&mut self, v: Option<Value<'a>>, order: Order<'a>) {
        self.cnt += 1;
        match v {
            Some(Value::Num(x)) => {
                self.sum += x;
                self.min = Some(self.min.map_or(x, |m| m.min(x)));
                self.max = Some(self.max.map_or(x, |m| m.max(x)));
                if self.latest.is_none_or(|(_, o)| order > o) {
                    self.latest = Some((x, order));
                }
            }
            Some(Value::Text(t)) => {
                self.uniq.insert(t);
            }
            None => {}
        }
    }

    fn merge(&mut self, other: &State<'a>) {
        self.cnt += other.cnt;
        self.sum += other.sum;
        if let Some(x) = other.min {
            self.min = Some(self.min.map_or(x, |m| m.min(x)));
        }
        if let Some(x) = other.max {
            self.max = Some(self.max.map_or(x, |m| m.max(x)));
        }
        if let Some((x, o)) = other.latest
            && self.latest.is_none_or(|(_, mine)| o > mine)
        {
            self.latest = Some((x, o));
        }
        self.uniq.extend(other.uniq.iter().copied());
    }
}

#[derive(Clone, Copy)]
enum Value<'a> {
    Num(f64),
    Text(&'a str),
}

/// A rollup row's key: subject, group values, null-group bits, bucket start.
type RowKey<'a> = (&'a str, Vec<&'a str>, u64, u32);

/// The rows of one rollup being folded: keys and states by index, found by a hash of
/// the key without building one per event.
#[derive(Default)]
struct Rollup<'a> {
    index: hashbrown::HashTable<usize>,
    keys: Vec<RowKey<'a>>,
    states: Vec<State<'a>>,
}

fn key_hash(subject: &str, groups: &[&str], gnull: u64, bucket: u32) -> u64 {
    use xxhash_rust::xxh3::xxh3_64;
    let mut h = xxh3_64(subject.as_bytes()) ^ (gnull.rotate_left(17) ^ bucket as u64);
    for g in groups {
        h = h.rotate_left(23).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ xxh3_64(g.as_bytes());
    }
    h.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

impl<'a> Rollup<'a> {
    /// The state of the row with this key, new if there is none yet.
    fn state(
        &mut self,
        subject: &'a str,
        groups: &[&'a str],
        gnull: u64,
        bucket: u32,
    ) -> &mut State<'a> {
        let h = key_hash(subject, groups, gnull, bucket);
        let keys = &self.keys;
        let found = self.index.find(h, |&i| {
            let (s, g, n, b) = &keys[i];
            *s == subject && *n == gnull && *b == bucket && g.as_slice() == groups
        });
        let i = match found {
            Some(&i) => i,
            None => {
                let i = self.keys.len();
                self.keys.push((subject, groups.to_vec(), gnull, bucket));
                self.states.push(State::default());
                let keys = &self.keys;
                self.index.insert_unique(h, i, |&j| {
                    let (s, g, n, b) = &keys[j];
                    key_hash(s, g, *n, *b)
                });
                i
            }
        };
        &mut self.states[i]
    }
}

impl<'a> Rollup<'a> {
    /// Merges `other`'s rows into these.
    fn absorb(&mut self, other: Rollup<'a>) {
        for ((subject, groups, gnull, bucket), state) in other.keys.into_iter().zip(other.states) {
            self.state(subject, &groups, gnull, bucket).merge(&state);
        }
    }
}

/// Rows folded per block: a block's rows stay in the cache while every meter reads
/// them (a batch's rows are tens of megabytes; a pass per meter over all of them
/// would read each from memory once per meter).
const BLOCK_ROWS: usize = 256;

/// [`MeterFold::fold`] of every meter of `meters` over `rows`, the rows split among
/// `threads` threads (each folds every meter over its share, a block of rows at a
/// time), their rows merged, then each meter's encoded: in `meters`' order.
pub fn fold_many(meters: &[&MeterFold], rows: &[EventRow], threads: usize) -> Vec<[Folded; 2]> {
    if meters.is_empty() {
        return Vec::new();
    }
    let per = rows.len().div_ceil(threads.max(1)).max(1);
    let mut partials: Vec<Vec<Rollup<'_>>> = std::thread::scope(|scope| {
        let parts: Vec<_> = rows
            .chunks(per)
            .map(|share| {
                scope.spawn(move || {
                    let mut rollups: Vec<Rollup<'_>> =
                        meters.iter().map(|_| Rollup::default()).collect();
                    let mut groups = Vec::new();
                    for block in share.chunks(BLOCK_ROWS) {
                        for (m, rollup) in meters.iter().zip(&mut rollups) {
                            for row in block {
                                m.add(row, rollup, &mut groups);
                            }
                        }
                    }
                    rollups
                })
            })
            .collect();
        parts
            .into_iter()
            .map(|p| p.join().expect("folding does not panic"))
            .collect()
    });
    // per meter: the first share's rows absorb the others'
    let mut merged: Vec<Rollup<'_>> = match partials.is_empty() {
        true => meters.iter().map(|_| Rollup::default()).collect(),
        false => partials.remove(0),
    };
    for share in partials {
        for (into, rollup) in merged.iter_mut().zip(share) {
            into.absorb(rollup);
        }
    }
    let per = meters.len().div_ceil(threads.max(1)).max(1);
    let mut pairs: Vec<(&MeterFold, Rollup<'_>)> = meters.iter().copied().zip(merged).collect();
    std::thread::scope(|scope| {
        let mut parts = Vec::new();
        while !pairs.is_empty() {
            let chunk: Vec<_> = pairs.drain(..per.min(pairs.len())).collect();
            parts.push(scope.spawn(move || {
                chunk
                    .into_iter()
                    .map(|(m, rollup)| m.finish(rollup))
                    .collect::<Vec<_>>()
            }));
        }
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("encoding does not panic"))
            .collect()
    })
}

/// The rows of one rollup table, encoded.
#[derive(Debug)]
pub struct Folded {
    /// Table (of tally's database).
    pub table: String,
    /// The column list of the insert.
    pub columns: String,
    /// `RowBinary` rows.
    pub body: Vec<u8>,
    /// How many rows.
    pub rows: usize,
}

impl MeterFold {
    /// The fold of `meter`.
    pub fn new(meter: &CompiledMeter) -> MeterFold {
        MeterFold {
            table: crate::rollup::RollupSql::new(meter).table,
            namespace: meter.namespace.clone(),
            ty: meter.spec.event_type.clone(),
            from_ms: meter.event_from_ms(),
            filters: meter
                .filters()
                .map(|(path, op, values, number)| Filter {
                    key: Key::of(path),
                    op,
                    values: values.iter().cloned().collect(),
                    number,
                })
                .collect(),
            groups: meter.group_paths().map(|(_, p)| Key::of(p)).collect(),
            value: match meter.aggregation() {
                Aggregation::Count => None,
                _ => meter.value_path().map(Key::of),
            },
            aggregation: meter.aggregation(),
        }
    }

    /// The minute and quarter rollup rows of `rows` (all taken as inserted at or after
    /// the meter's cutover, `origin = 0`).
    pub fn fold(&self, rows: &[EventRow]) -> [Folded; 2] {
        let mut minutes = Rollup::default();
        let mut groups = Vec::with_capacity(self.groups.len());
        for row in rows {
            self.add(row, &mut minutes, &mut groups);
        }
        self.finish(minutes)
    }

    /// Adds `row` to this meter's minute rows, if the meter takes it. `groups` is a
    /// buffer for the row's group values (a key is copied only when new).
    fn add<'a>(&self, row: &'a EventRow, minutes: &mut Rollup<'a>, groups: &mut Vec<&'a str>) {
        if row.namespace != self.namespace || row.ty != self.ty {
            return;
        }
        if self.from_ms.is_some_and(|from| row.time_ms < from) {
            return;
        }
        if !self.filters.iter().all(|f| f.keeps(Node::at(row, &f.key))) {
            return;
        }
        groups.clear();
        let mut gnull = 0u64;
        for (i, key) in self.groups.iter().enumerate() {
            let n = Node::at(row, key);
            if matches!(n.kind, 4 | 5) {
                return;
            }
            groups.push(if n.scalar() { n.text } else { "" });
            if n.kind == 0 {
                gnull |= 1 << i;
            }
        }
        let value = match (&self.value, self.aggregation) {
            (None, _) => None,
            (Some(key), Aggregation::UniqueCount) => {
                let n = Node::at(row, key);
                if !n.scalar() {
                    return;
                }
                Some(Value::Text(n.text))
            }
            (Some(key), _) => {
                let n = Node::at(row, key);
                if !n.num_ok {
                    return;
                }
                Some(Value::Num(n.num))
            }
        };
        let order = (
            row.time_ms,
            row.ingested_ms,
            row.kafka_offset,
            row.id.as_str(),
        );
        minutes
            .state(&row.subject, groups, gnull, row.time / 60 * 60)
            .add(value, order);
    }

    /// The encoded minute and quarter rows of the folded minute rows.
    fn finish(&self, minutes: Rollup<'_>) -> [Folded; 2] {
        let mut quarters = Rollup::default();
        for ((subject, groups, gnull, minute), state) in minutes.keys.iter().zip(&minutes.states) {
            quarters
                .state(subject, groups, *gnull, minute / 900 * 900)
                .merge(state);
        }
        [
            self.encode(Grain::Minute, &minutes),
            self.encode(Grain::Quarter, &quarters),
        ]
    }

    fn encode(&self, grain: Grain, rows: &Rollup<'_>) -> Folded {
        let mut cols = vec!["subject".to_string()];
        cols.extend((0..self.groups.len()).map(|i| format!("g{i}")));
        cols.extend(["gnull", "minute", "origin", "cnt"].map(String::from));
        cols.extend(
            match self.aggregation {
                Aggregation::Count => &[][..],
                Aggregation::Sum | Aggregation::Avg => &["sum"],
                Aggregation::Min => &["min"],
                Aggregation::Max => &["max"],
                Aggregation::Latest => &["latest", "latest_key"],
                Aggregation::UniqueCount => &["uniq"],
            }
            .iter()
            .map(|c| c.to_string()),
        );
        let mut b = Vec::with_capacity(rows.keys.len() * 64);
        for ((subject, groups, gnull, bucket), s) in rows.keys.iter().zip(&rows.states) {
            string(&mut b, subject);
            for g in groups {
                string(&mut b, g);
            }
            b.extend_from_slice(&gnull.to_le_bytes());
            b.extend_from_slice(&bucket.to_le_bytes());
            b.push(0); // origin: the sink's rows, like a view's
            varuint(&mut b, s.cnt);
            match self.aggregation {
                Aggregation::Count => {}
                Aggregation::Sum | Aggregation::Avg => b.extend_from_slice(&s.sum.to_le_bytes()),
                Aggregation::Min => optional_f64(&mut b, s.min),
                Aggregation::Max => optional_f64(&mut b, s.max),
                Aggregation::Latest => {
                    optional_f64(&mut b, s.latest.map(|(v, _)| v));
                    optional_order(&mut b, s.latest.map(|(_, o)| o));
                    optional_order(&mut b, s.latest.map(|(_, o)| o));
                }
                Aggregation::UniqueCount => {
                    varuint(&mut b, s.uniq.len() as u64);
                    for v in &s.uniq {
                        string(&mut b, v);
                    }
                }
            }
        }
        Folded {
            table: grain.table(&self.table),
            columns: cols.join(", "),
            body: b,
            rows: rows.keys.len(),
        }
    }
}

fn varuint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

fn string(b: &mut Vec<u8>, s: &str) {
    varuint(b, s.len() as u64);
    b.extend_from_slice(s.as_bytes());
}

fn optional_f64(b: &mut Vec<u8>, v: Option<f64>) {
    match v {
        Some(x) => {
            b.push(1);
            b.extend_from_slice(&x.to_le_bytes());
        }
        None => b.push(0),
    }
}

fn optional_order(b: &mut Vec<u8>, o: Option<Order<'_>>) {
    match o {
        Some((time, ingested, offset, id)) => {
            b.push(1);
            for n in [time, ingested, offset] {
                b.extend_from_slice(&n.to_le_bytes());
            }
            string(b, id);
        }
        None => b.push(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varuints_are_leb128() {
        let enc = |v| {
            let mut b = Vec::new();
            varuint(&mut b, v);
            b
        };
        assert_eq!(enc(0), [0]);
        assert_eq!(enc(127), [127]);
        assert_eq!(enc(128), [0x80, 1]);
        assert_eq!(enc(300), [0xac, 2]);
    }

    #[test]
    fn a_negative_index_is_resolved_with_the_array_length() {
        let row = row_of(serde_json::json!({"a": [{"b": 1}, {"b": 7}]}));
        let key = Key::of(&SingularPath::parse("$.a[-1].b").unwrap());
        let n = Node::at(&row, &key);
        assert_eq!((n.kind, n.num), (2, 7.0));
        let missing = Node::at(&row, &Key::of(&SingularPath::parse("$.a[-3].b").unwrap()));
        assert_eq!(missing.kind, 0);
    }

    fn meter(yaml: &str) -> MeterFold {
        let m: tally_crds::Meter = serde_json::from_value(serde_json::json!({
            "apiVersion": "tally.dev/v1alpha1", "kind": "Meter",
            "metadata": {"name": "m"},
            "spec": serde_json::from_str::<serde_json::Value>(yaml).unwrap(),
        }))
        .unwrap();
        MeterFold::new(&CompiledMeter::compile(&m).unwrap())
    }

    #[test]
    fn folding_meters_together_over_threads_gives_each_meter_s_own_fold() {
        let meters = [
            meter(
                r#"{"eventType": "t", "aggregation": "SUM", "valueProperty": "$.n", "groupBy": {"g": "$.g"}}"#,
            ),
            meter(
                r#"{"eventType": "t", "aggregation": "COUNT", "filter": [{"property": "$.n", "operator": "gte", "values": ["3"]}]}"#,
            ),
            meter(
                r#"{"eventType": "t", "aggregation": "MIN", "valueProperty": "$.n", "groupBy": {"g": "$.g"}}"#,
            ),
            meter(r#"{"eventType": "other", "aggregation": "MAX", "valueProperty": "$.n"}"#),
        ];
        let rows: Vec<EventRow> = (0..2_000)
            .map(|i| EventRow {
                subject: format!("s{}", i % 11),
                time: 1_700_000_000 + i * 7,
                ..row_of(serde_json::json!({"n": i % 7, "g": format!("g{}", i % 3)}))
            })
            .collect();
        let refs: Vec<&MeterFold> = meters.iter().collect();
        for threads in [1, 3] {
            let together = fold_many(&refs, &rows, threads);
            assert_eq!(together.len(), meters.len());
            for (m, folded) in meters.iter().zip(together) {
                let alone = m.fold(&rows);
                for (a, b) in alone.iter().zip(&folded) {
                    assert_eq!(
                        (&a.table, &a.columns, a.rows),
                        (&b.table, &b.columns, b.rows)
                    );
                    assert!(a.body == b.body, "{} over {threads} threads", a.table);
                }
            }
        }
        assert!(meters[0].fold(&rows)[0].rows > 0, "the test folds rows");
    }

    /// A row of [`test_row`] with `data` flattened.
    fn row_of(data: serde_json::Value) -> EventRow {
        let flat = crate::Flat::of(data.as_object().unwrap());
        EventRow {
            data_paths: flat.paths,
            data_kinds: flat.kinds,
            data_strs: flat.strs,
            data_nums: flat.nums,
            data_num_ok: flat.num_ok,
            ..test_row()
        }
    }

    fn test_row() -> EventRow {
        EventRow {
            namespace: "default".into(),
            ty: "t".into(),
            subject: "s".into(),
            time: 0,
            time_ms: 0,
            source: String::new(),
            id: String::new(),
            ingested_ms: 0,
            inserted_at: 0,
            kafka_partition: 0,
            kafka_offset: 0,
            datacontenttype: String::new(),
            dataschema: String::new(),
            extensions: String::new(),
            data: String::new(),
            data_paths: Vec::new(),
            data_kinds: Vec::new(),
            data_strs: Vec::new(),
            data_nums: Vec::new(),
            data_num_ok: Vec::new(),
        }
    }
}
