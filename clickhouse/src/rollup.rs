//! A meter as ClickHouse SQL: its rollup table, the SELECT that turns raw rows into
//! minute states (used by the materialized view, by backfill and by the sink's repair),
//! and the merge expressions queries read states back with.
//!
//! The SELECT evaluates the engine's semantics ([`tally_meter::engine`]) on the flattened
//! `data` columns ([`super::Flat`]): a path is looked up by its canonical key with
//! `indexOf(data_paths, key)`; index 0 (missing) reads as kind 0, like null. An event
//! with a per-meter validation error (a non-numeric value, an object as group-by value,
//! …) is left out by the WHERE clause, as the engine leaves it out. The conformance tests
//! hold this SQL to the same hand-computed answers as the embedded store.
use tally_crds::{Aggregation, FilterOperator};

use super::{Ch, lit};
use tally_meter::engine::CompiledMeter;
use tally_meter::engine::path::{Segment, SingularPath};

/// Where a rollup row came from: the view (rows inserted at or after the cutover), or
/// the backfill (rows inserted before it). Part of the key, so repair and backfill can
/// each re-derive their own rows without touching the other's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Derivation {
    /// The materialized view (and the sink's repair, which re-derives view rows).
    View = 0,
    /// The backfill.
    Backfill = 1,
}

/// The time granularity of a rollup table. Every meter has both: one-minute rows answer
/// any window exactly; fifteen-minute rows (every modern zone offset is a multiple of
/// 15 minutes) answer the whole quarters inside a query up to 15 times faster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// One minute: table `rollup_<hash>`.
    Minute,
    /// Fifteen minutes: table `rollup_<hash>_q`.
    Quarter,
}

impl Grain {
    /// Both grains.
    pub const ALL: [Grain; 2] = [Grain::Minute, Grain::Quarter];

    /// Seconds per row.
    pub fn seconds(self) -> i64 {
        match self {
            Grain::Minute => 60,
            Grain::Quarter => 900,
        }
    }

    fn bucket(self) -> &'static str {
        match self {
            Grain::Minute => "toStartOfMinute(time)",
            Grain::Quarter => "toStartOfFifteenMinutes(time)",
        }
    }

    /// The table of this grain for the minute table `base`.
    pub fn table(self, base: &str) -> String {
        match self {
            Grain::Minute => base.to_string(),
            Grain::Quarter => format!("{base}_q"),
        }
    }
}

/// The SQL of one meter.
#[derive(Clone, Debug)]
pub struct RollupSql<'a> {
    meter: &'a CompiledMeter,
    /// `rollup_<hash>`.
    pub table: String,
}

/// The store's rollup id of a meter definition: a hash of namespace and everything that
/// shapes the rollup (a changed groupBy gets a new table).
pub fn rollup_id(meter: &CompiledMeter) -> i64 {
    let def = format!("{}\0{}", meter.namespace, meter.rollup_definition());
    xxhash_rust::xxh3::xxh3_64(def.as_bytes()) as i64
}

/// The rollup id of a table name (`rollup_<hex>`).
pub fn id_of_table(table: &str) -> Option<i64> {
    let hex = table.strip_prefix("rollup_")?;
    u64::from_str_radix(hex, 16).ok().map(|id| id as i64)
}

/// The table name of a rollup id.
pub fn table_name(id: i64) -> String {
    format!("rollup_{:016x}", id as u64)
}

/// The materialized view's name for a rollup table.
pub fn view_name(table: &str) -> String {
    format!("{table}_mv")
}

/// The canonical key of a path as a SQL string expression. Negative indexes count from
/// the end, so they are resolved with the array's length, which the flattening stores in
/// `data_nums` of the array's own entry.
pub fn key_expr(path: &SingularPath) -> String {
    let mut literal = String::from("$");
    let mut expr: Option<String> = None;
    for seg in path.segments() {
        match seg {
            Segment::Index(i) if *i < 0 => {
                let prefix = match expr.take() {
                    Some(e) => format!("concat({e}, {})", lit(&literal)),
                    None => lit(&literal),
                };
                expr = Some(format!(
                    "concat({prefix}, '[', toString(toInt64(data_nums[indexOf(data_paths, {prefix})]) + ({i})), ']')"
                ));
                literal.clear();
            }
            seg => literal.push_str(&seg.key()),
        }
    }
    match expr {
        None => lit(&literal),
        Some(e) if literal.is_empty() => e,
        Some(e) => format!("concat({e}, {})", lit(&literal)),
    }
}

impl<'a> RollupSql<'a> {
    /// The SQL of `meter`.
    pub fn new(meter: &'a CompiledMeter) -> RollupSql<'a> {
        RollupSql {
            meter,
            table: table_name(rollup_id(meter)),
        }
    }

    fn groups(&self) -> Vec<String> {
        (0..self.meter.group_count())
            .map(|i| format!("g{i}"))
            .collect()
    }

    /// `(column, type, state expression over the SELECT's aliases)` of the states this
    /// meter's aggregation needs; `cnt` is always there.
    fn states(&self) -> Vec<(&'static str, &'static str, &'static str)> {
        let mut s = vec![("cnt", "AggregateFunction(count)", "countState()")];
        match self.meter.aggregation() {
            Aggregation::Count => {}
            Aggregation::Sum | Aggregation::Avg => {
                s.push(("sum", "AggregateFunction(sum, Float64)", "sumState(v)"))
            }
            Aggregation::Min => s.push(("min", "AggregateFunction(min, Float64)", "minState(v)")),
            Aggregation::Max => s.push(("max", "AggregateFunction(max, Float64)", "maxState(v)")),
            Aggregation::Latest => {
                s.push((
                    "latest",
                    "AggregateFunction(argMax, Float64, Tuple(Int64, Int64, Int64, String))",
                    "argMaxState(v, tuple(time_ms, ingested_ms, kafka_offset, id))",
                ));
                s.push((
                    "latest_key",
                    "AggregateFunction(max, Tuple(Int64, Int64, Int64, String))",
                    "maxState(tuple(time_ms, ingested_ms, kafka_offset, id))",
                ));
            }
            Aggregation::UniqueCount => s.push((
                "uniq",
                "AggregateFunction(groupUniqArray, String)",
                "groupUniqArrayState(v)",
            )),
        }
        s
    }

    fn key_columns(&self) -> String {
        let mut cols = vec!["subject".to_string()];
        cols.extend(self.groups());
        cols.extend(["gnull", "minute", "origin"].map(String::from));
        cols.join(", ")
    }

    /// `CREATE TABLE IF NOT EXISTS` of the rollup of `grain` (Replicated and `ON
    /// CLUSTER` when `ch` is a cluster's).
    pub fn create_table(&self, ch: &Ch, grain: Grain) -> String {
        let (db, table) = (ch.db(), grain.table(&self.table));
        let mut cols = vec!["subject String".to_string()];
        cols.extend(self.groups().into_iter().map(|g| format!("{g} String")));
        cols.push("gnull UInt64".into());
        cols.push("minute DateTime('UTC')".into());
        cols.push("origin UInt8".into());
        cols.extend(self.states().iter().map(|(c, t, _)| format!("{c} {t}")));
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{table}{} ({}) ENGINE = {} \
             PARTITION BY toYYYYMM(minute) ORDER BY ({})",
            ch.on_cluster(),
            cols.join(", "),
            ch.engine(&table, "AggregatingMergeTree", ""),
            self.key_columns()
        )
    }

    /// The SELECT producing states per `grain` from `src` (a table with the `events`
    /// columns) for rows matching `extra` (a SQL condition), tagged `origin`.
    pub fn select(&self, src: &str, origin: Derivation, extra: &str, grain: Grain) -> String {
        let m = self.meter;
        let mut with = Vec::new();
        let mut slot = |path: &SingularPath| {
            let n = with.len();
            with.push(format!("indexOf(data_paths, {}) AS p{n}", key_expr(path)));
            format!("p{n}")
        };
        let scalar = |p: &str| format!("data_kinds[{p}] IN (1, 2, 3)");
        let mut conds = vec![
            format!("namespace = {}", lit(&m.namespace)),
            format!("type = {}", lit(&m.spec.event_type)),
        ];
        if let Some(from) = m.event_from_ms() {
            conds.push(format!("time_ms >= {from}"));
        }
        for (path, op, values, number) in m.filters() {
            let p = slot(path);
            let list = values.iter().map(|v| lit(v)).collect::<Vec<_>>().join(", ");
            let eq = |neg: bool, set: &str| {
                let c = format!("({} AND data_strs[{p}] IN ({set}))", scalar(&p));
                if neg { format!("NOT {c}") } else { c }
            };
            let cmp = |sym: &str| match number {
                Some(x) => format!("(data_num_ok[{p}] = 1 AND data_nums[{p}] {sym} {x:?})"),
                None => "0".to_string(),
            };
            conds.push(match op {
                FilterOperator::Exists => format!("data_kinds[{p}] != 0"),
                FilterOperator::Eq | FilterOperator::In => eq(false, &list),
                FilterOperator::Ne | FilterOperator::NotIn => eq(true, &list),
                FilterOperator::Gt => cmp(">"),
                FilterOperator::Gte => cmp(">="),
                FilterOperator::Lt => cmp("<"),
                FilterOperator::Lte => cmp("<="),
            });
        }
        let mut cols = vec!["subject".to_string()];
        let mut nulls = Vec::new();
        for (i, (_, path)) in m.group_paths().enumerate() {
            let p = slot(path);
            conds.push(format!("data_kinds[{p}] NOT IN (4, 5)"));
            cols.push(format!("if({}, data_strs[{p}], '') AS g{i}", scalar(&p)));
            nulls.push(format!("bitShiftLeft(toUInt64(data_kinds[{p}] = 0), {i})"));
        }
        cols.push(if nulls.is_empty() {
            "toUInt64(0) AS gnull".into()
        } else {
            format!("{} AS gnull", nulls.join(" + "))
        });
        cols.push(format!("{} AS minute", grain.bucket()));
        cols.push(format!("toUInt8({}) AS origin", origin as u8));
        match (m.aggregation(), m.value_path()) {
            (Aggregation::Count, _) | (_, None) => {}
            (Aggregation::UniqueCount, Some(path)) => {
                let p = slot(path);
                conds.push(scalar(&p));
                cols.push(format!("data_strs[{p}] AS v"));
            }
            (_, Some(path)) => {
                let p = slot(path);
                conds.push(format!("data_num_ok[{p}] = 1"));
                cols.push(format!("data_nums[{p}] AS v"));
            }
        }
        let states: Vec<String> = self
            .states()
            .iter()
            .map(|(c, _, e)| format!("{e} AS {c}"))
            .collect();
        // `v` is an input of the states, not an output column of the rollup.
        let outputs: Vec<String> = cols
            .iter()
            .filter(|c| !c.ends_with(" AS v"))
            .cloned()
            .chain(states)
            .collect();
        let value = cols.iter().find(|c| c.ends_with(" AS v"));
        let with_clause = with.into_iter().chain(value.cloned()).collect::<Vec<_>>();
        format!(
            "{}SELECT {} FROM {src} WHERE {}{} GROUP BY {}",
            if with_clause.is_empty() {
                String::new()
            } else {
                format!("WITH {} ", with_clause.join(", "))
            },
            outputs.join(", "),
            conds.join(" AND "),
            if extra.is_empty() {
                String::new()
            } else {
                format!(" AND ({extra})")
            },
            self.key_columns()
        )
    }

    /// `CREATE MATERIALIZED VIEW` feeding the rollup of `grain` from `events_feed` for
    /// rows inserted at or after `cutover` (ClickHouse seconds).
    pub fn create_view(&self, ch: &Ch, cutover: i64, grain: Grain) -> String {
        let (db, table) = (ch.db(), grain.table(&self.table));
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{}{} TO {db}.{table} AS {}",
            view_name(&table),
            ch.on_cluster(),
            self.select(
                &format!("{db}.events_feed"),
                Derivation::View,
                &format!("inserted_at >= toDateTime({cutover})"),
                grain
            )
        )
    }

    /// The merge expressions of a bucket query, in [`BucketRow`] order after the key
    /// columns: cnt, sum, min, max, latest value/time/ingested/offset/id, uniq.
    pub fn merge_columns(&self) -> String {
        use Aggregation::{Avg, Latest, Max, Min, Sum, UniqueCount};
        // (aggregations that keep the state, merge expression, constant otherwise)
        let columns: [(&[Aggregation], &str, &str); 10] = [
            (&[], "countMerge(cnt)", ""),
            (&[Sum, Avg], "sumMerge(sum)", "toFloat64(0)"),
            (&[Min], "minMerge(min)", "toFloat64(0)"),
            (&[Max], "maxMerge(max)", "toFloat64(0)"),
            (&[Latest], "argMaxMerge(latest)", "toFloat64(0)"),
            (
                &[Latest],
                "tupleElement(maxMerge(latest_key), 1)",
                "toInt64(0)",
            ),
            (
                &[Latest],
                "tupleElement(maxMerge(latest_key), 2)",
                "toInt64(0)",
            ),
            (
                &[Latest],
                "tupleElement(maxMerge(latest_key), 3)",
                "toInt64(0)",
            ),
            (&[Latest], "tupleElement(maxMerge(latest_key), 4)", "''"),
            (
                &[UniqueCount],
                "groupUniqArrayMerge(uniq)",
                "emptyArrayString()",
            ),
        ];
        let agg = self.meter.aggregation();
        columns
            .iter()
            .map(|(keeps, merge, otherwise)| {
                if keeps.is_empty() || keeps.contains(&agg) {
                    *merge
                } else {
                    *otherwise
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One row of a bucket query: key, bucket start and merged states.
#[derive(Clone, Debug, serde::Deserialize, clickhouse::Row)]
pub struct BucketRow {
    /// Subject ('' when not grouped by subject).
    pub subject: String,
    /// Group values by the meter's group index ('' for groups not asked for).
    pub groups: Vec<String>,
    /// Bit i set: group i is null.
    pub gnull: u64,
    /// Bucket start, seconds.
    pub bucket: i64,
    /// Events.
    pub cnt: u64,
    /// Sum.
    pub sum: f64,
    /// Min.
    pub min: f64,
    /// Max.
    pub max: f64,
    /// LATEST value.
    pub latest_value: f64,
    /// LATEST time (ms).
    pub latest_time: i64,
    /// LATEST ingestion ms.
    pub latest_ingested: i64,
    /// LATEST Kafka offset.
    pub latest_offset: i64,
    /// LATEST id.
    pub latest_id: String,
    /// Distinct values.
    pub uniq: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_indexes_resolve_with_the_array_length() {
        let p = SingularPath::parse("$.a[-1].b").unwrap();
        let e = key_expr(&p);
        assert!(e.starts_with("concat(concat('$[\\'a\\']', '[', toString(toInt64(data_nums[indexOf(data_paths, '$[\\'a\\']')]) + (-1)), ']')"), "{e}");
        assert_eq!(
            key_expr(&SingularPath::parse("$.a[0]").unwrap()),
            "'$[\\'a\\'][0]'"
        );
    }
}
