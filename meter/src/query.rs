//! Query parameters and the store-independent re-windowing of partial states.
//!
//! A query `[from, to)` is answered from full one-minute rollup rows for
//! `[ceil_minute(from), floor_minute(to))` and from raw events for the sub-minute edges,
//! so any precision is exact. Each minute (or event) maps to exactly one window of the
//! requested size and zone ([`crate::engine::window`]); states merge per
//! (window, subject if grouped, requested group-by values).
use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{Offset, TimeZone};
use chrono_tz::Tz;
use serde::Serialize;

use crate::engine::CompiledMeter;
use crate::engine::state::{Input, State};
use crate::engine::window::{WindowSize, window_of};

/// Default cap on the rows one query may return.
pub const DEFAULT_MAX_ROWS: usize = 100_000;

/// A parsed query.
#[derive(Clone, Debug, PartialEq)]
pub struct QuerySpec {
    /// Inclusive start (ms); `None` = the meter's first event.
    pub from_ms: Option<i64>,
    /// Exclusive end (ms).
    pub to_ms: i64,
    /// Window size; `None` = one row per group for the whole range.
    pub window_size: Option<WindowSize>,
    /// Zone windows align to and times render in.
    pub tz: Tz,
    /// Only these subjects (empty = all).
    pub subjects: Vec<String>,
    /// Requested group-by names (may include `subject`).
    pub group_by: Vec<String>,
    /// Group-by name → accepted values.
    pub filter_group_by: BTreeMap<String, Vec<String>>,
}

impl QuerySpec {
    /// Parses OpenMeter query parameters against a meter, with `to` defaulting to
    /// `now_ms`; each error names its parameter.
    pub fn parse(
        meter: &CompiledMeter,
        query: &str,
        now_ms: i64,
    ) -> Result<QuerySpec, BadParameter> {
        let mut spec = QuerySpec {
            from_ms: None,
            to_ms: now_ms,
            window_size: None,
            tz: Tz::UTC,
            subjects: vec![],
            group_by: vec![],
            filter_group_by: BTreeMap::new(),
        };
        let known = || {
            meter
                .group_names()
                .map(str::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let time =
                |v: &str| tally_crds::event::parse_time_ms(v).map_err(|e| BadParameter::new(&k, e));
            match k.as_ref() {
            "from" => spec.from_ms = Some(time(&v)?),
            "to" => spec.to_ms = time(&v)?,
            "windowSize" => spec.window_size = Some(v.parse::<WindowSize>().map_err(|e| BadParameter::new("windowSize", e))?),
            "windowTimeZone" => {
                spec.tz = v.parse::<Tz>().map_err(|_| BadParameter::new("windowTimeZone", format!("{v:?} is not an IANA time zone name (e.g. UTC, America/New_York, Asia/Kolkata)")))?
            }
            "subject" => {
                let max = tally_crds::event::MAX_SUBJECT_LEN;
                if v.is_empty() || v.chars().count() > max {
                    return Err(BadParameter::new(
                        "subject",
                        format!("must be 1-{max} characters, as events name subjects"),
                    ));
                }
                spec.subjects.push(v.to_string())
            }
            "groupBy" => {
                if v != "subject" && meter.group_index(&v).is_none() {
                    return Err(BadParameter::new("groupBy", format!("{v:?} is not a groupBy of meter {}; use subject or one of: {}", meter.slug, known())));
                }
                if !spec.group_by.iter().any(|g| *g == v) {
                    spec.group_by.push(v.to_string());
                }
            }
            key if key.starts_with("filterGroupBy[") && key.ends_with(']') => {
                let name = &key["filterGroupBy[".len()..key.len() - 1];
                if meter.group_index(name).is_none() {
                    return Err(BadParameter::new(key, format!("{name:?} is not a groupBy of meter {}; use one of: {}", meter.slug, known())));
                }
                spec.filter_group_by.entry(name.to_string()).or_default().push(v.to_string());
            }
            other => {
                return Err(BadParameter::new(other, "unknown parameter; this route takes from, to, windowSize, windowTimeZone, subject, groupBy and filterGroupBy[name]"));
            }
        }
        }
        if let Some(from) = spec.from_ms
            && from >= spec.to_ms
        {
            return Err(BadParameter::new("from", "must be before to"));
        }
        Ok(spec)
    }

    /// Whether rows carry a subject: grouped by `subject`, or filtered by subjects.
    pub fn groups_by_subject(&self) -> bool {
        self.group_by.iter().any(|g| g == "subject") || !self.subjects.is_empty()
    }
}

/// A query parameter that is wrong, and why.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("query parameter {parameter}: {detail}")]
pub struct BadParameter {
    /// The parameter, as the client spelled it.
    pub parameter: String,
    /// What is wrong and what is accepted.
    pub detail: String,
}

impl BadParameter {
    fn new(parameter: &str, detail: impl ToString) -> BadParameter {
        BadParameter {
            parameter: parameter.to_string(),
            detail: detail.to_string(),
        }
    }
}

/// One row of a query answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueryRow {
    /// Window start (ms).
    pub window_start_ms: i64,
    /// Window end (ms).
    pub window_end_ms: i64,
    /// The subject, when grouped by subject.
    pub subject: Option<String>,
    /// Requested group-by values (null when the event lacked the property).
    pub group_by: BTreeMap<String, Option<String>>,
    /// The aggregated value.
    pub value: f64,
}

/// A query's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryAnswer {
    /// Effective start (ms); `None` when the meter has no events.
    pub from_ms: Option<i64>,
    /// End (ms).
    pub to_ms: i64,
    /// Rows ordered by window start, subject, group values.
    pub rows: Vec<QueryRow>,
}

/// Errors specific to answering a query.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QueryError {
    /// More rows than allowed.
    #[error(
        "the query would return more than {limit} rows; narrow the time range, use a larger windowSize, or group by fewer properties"
    )]
    TooManyRows {
        /// The limit.
        limit: usize,
    },
}

type RowKey = (i64, i64, Option<String>, Vec<Option<String>>);

/// Merges partial states into query rows.
#[derive(Debug)]
pub struct Combiner<'a> {
    meter: &'a CompiledMeter,
    spec: &'a QuerySpec,
    from_ms: i64,
    /// For each requested group-by (except subject): index into the meter's groups.
    selected: Vec<(String, usize)>,
    /// Group index → accepted values.
    filters: Vec<(usize, HashSet<String>)>,
    subjects: HashSet<&'a str>,
    by_subject: bool,
    rows: HashMap<RowKey, State>,
    window: (i64, i64),
    max_rows: usize,
}

impl<'a> Combiner<'a> {
    /// A combiner for `spec` over `[from_ms, spec.to_ms)`. Group-by names must have been
    /// checked against the meter.
    pub fn new(
        meter: &'a CompiledMeter,
        spec: &'a QuerySpec,
        from_ms: i64,
        max_rows: usize,
    ) -> Self {
        let selected = spec
            .group_by
            .iter()
            .filter(|g| *g != "subject")
            .filter_map(|g| meter.group_index(g).map(|i| (g.clone(), i)))
            .collect();
        let filters = spec
            .filter_group_by
            .iter()
            .filter_map(|(k, v)| {
                meter
                    .group_index(k)
                    .map(|i| (i, v.iter().cloned().collect()))
            })
            .collect();
        Combiner {
            meter,
            spec,
            from_ms,
            selected,
            filters,
            subjects: spec.subjects.iter().map(String::as_str).collect(),
            by_subject: spec.groups_by_subject(),
            rows: HashMap::new(),
            window: (i64::MIN, i64::MIN),
            max_rows,
        }
    }

    fn key(&mut self, subject: &str, groups: &[Option<String>], t: i64) -> Option<RowKey> {
        if !self.subjects.is_empty() && !self.subjects.contains(subject) {
            return None;
        }
        for (i, accepted) in &self.filters {
            match groups.get(*i).and_then(|g| g.as_ref()) {
                Some(v) if accepted.contains(v) => {}
                _ => return None,
            }
        }
        let (ws, we) = match self.spec.window_size {
            None => (self.from_ms, self.spec.to_ms),
            Some(size) => {
                if !(self.window.0 <= t && t < self.window.1) {
                    self.window = window_of(t, size, self.spec.tz);
                }
                self.window
            }
        };
        let vals = self
            .selected
            .iter()
            .map(|(_, i)| groups.get(*i).cloned().flatten())
            .collect();
        Some((ws, we, self.by_subject.then(|| subject.to_string()), vals))
    }

    /// Adds a rollup state of the minute starting at `minute_ms`.
    pub fn add_state(
        &mut self,
        subject: &str,
        groups: &[Option<String>],
        minute_ms: i64,
        state: &State,
    ) -> Result<(), QueryError> {
        if let Some(key) = self.key(subject, groups, minute_ms) {
            self.entry(key)?.merge(state);
        }
        Ok(())
    }

    /// Adds one raw event's contribution.
    pub fn add_event(
        &mut self,
        subject: &str,
        groups: &[Option<String>],
        input: &Input,
        time_ms: i64,
        seq: (i64, i64),
        id: &str,
    ) -> Result<(), QueryError> {
        if let Some(key) = self.key(subject, groups, time_ms) {
            self.entry(key)?.add(input, time_ms, seq, id);
        }
        Ok(())
    }

    /// Adds one distinct value of a UNIQUE_COUNT rollup minute.
    pub fn add_unique(
        &mut self,
        subject: &str,
        groups: &[Option<String>],
        minute_ms: i64,
        value: &str,
    ) -> Result<(), QueryError> {
        if let Some(key) = self.key(subject, groups, minute_ms) {
            let state = self.entry(key)?;
            state.count += 1;
            if !state.uniques.contains(value) {
                state.uniques.insert(value.to_string());
            }
        }
        Ok(())
    }

    fn entry(&mut self, key: RowKey) -> Result<&mut State, QueryError> {
        let len = self.rows.len();
        match self.rows.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => Ok(o.into_mut()),
            std::collections::hash_map::Entry::Vacant(v) => {
                if len >= self.max_rows {
                    return Err(QueryError::TooManyRows {
                        limit: self.max_rows,
                    });
                }
                Ok(v.insert(State::new()))
            }
        }
    }

    /// The rows, sorted by window, subject and group values.
    pub fn finish(self) -> Vec<QueryRow> {
        let agg = self.meter.aggregation();
        let mut rows: Vec<QueryRow> = self
            .rows
            .into_iter()
            .filter_map(|((ws, we, subject, vals), state)| {
                let value = state.value(agg)?;
                let group_by = self
                    .selected
                    .iter()
                    .map(|(n, _)| n.clone())
                    .zip(vals)
                    .collect();
                Some(QueryRow {
                    window_start_ms: ws,
                    window_end_ms: we,
                    subject,
                    group_by,
                    value,
                })
            })
            .collect();
        rows.sort_by(|a, b| {
            (a.window_start_ms, &a.subject, &a.group_by).cmp(&(
                b.window_start_ms,
                &b.subject,
                &b.group_by,
            ))
        });
        rows
    }
}

/// Pieces of `[from_s, to_s)` (seconds) in which `tz` keeps one UTC offset:
/// `(start, end, offset seconds east of UTC)`.
pub fn constant_offset_pieces(from_s: i64, to_s: i64, tz: Tz) -> Vec<(i64, i64, i64)> {
    let offset = |t: i64| -> i64 {
        tz.offset_from_utc_datetime(
            &chrono::DateTime::from_timestamp(t, 0)
                .unwrap_or_default()
                .naive_utc(),
        )
        .fix()
        .local_minus_utc() as i64
    };
    let mut out = Vec::new();
    let (mut start, mut off, mut t) = (from_s, offset(from_s), from_s);
    while t < to_s {
        let next = (t + 3600).min(to_s);
        let probe = if next < to_s { next } else { to_s - 1 };
        if probe > t && offset(probe) != off {
            // the first second in (t, probe] with another offset
            let (mut lo, mut hi) = (t, probe);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if offset(mid) == off {
                    lo = mid
                } else {
                    hi = mid
                }
            }
            out.push((start, hi, off));
            (start, off, t) = (hi, offset(hi), hi);
            continue;
        }
        t = next;
    }
    if start < to_s {
        out.push((start, to_s, off));
    }
    out
}

/// One read of a rollup tier, planned by [`plan_rollup_reads`]: whole minutes
/// `[from_s, to_s)` (seconds) in which the query's zone keeps `offset_s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollupRead {
    /// From the 15-minute tier (else the minute tier).
    pub quarter: bool,
    /// Start, a whole minute (a whole quarter hour when `quarter`).
    pub from_s: i64,
    /// End, likewise.
    pub to_s: i64,
    /// The zone's offset east of UTC in this read (0 without windows).
    pub offset_s: i64,
}

/// Plans the rollup reads of the whole minutes `[from_s, to_s)` of a query: cut where
/// the zone's offset changes (windowed queries), whole quarter hours from the
/// 15-minute tier wherever each quarter lies inside one window (no MINUTE windows, the
/// offset a multiple of 15 minutes, as every modern zone's is; `quarters` false when
/// there is no such tier), the rest from the minute tier. Empty reads are left out.
pub fn plan_rollup_reads(
    from_s: i64,
    to_s: i64,
    spec: &QuerySpec,
    quarters: bool,
) -> Vec<RollupRead> {
    let pieces = if spec.window_size.is_none() {
        vec![(from_s, to_s, 0)]
    } else {
        constant_offset_pieces(from_s, to_s, spec.tz)
    };
    let quarters = quarters && !matches!(spec.window_size, Some(WindowSize::Minute));
    let mut reads = Vec::new();
    let mut read = |quarter, from_s, to_s, offset_s| {
        if from_s < to_s {
            reads.push(RollupRead {
                quarter,
                from_s,
                to_s,
                offset_s,
            });
        }
    };
    for (a, b, off) in pieces {
        let (qa, qb) = ((a + 899).div_euclid(900) * 900, b.div_euclid(900) * 900);
        if quarters && off % 900 == 0 && qa < qb {
            read(false, a, qa, off);
            read(true, qa, qb, off);
            read(false, qb, b, off);
        } else {
            read(false, a, b, off);
        }
    }
    reads
}

/// Splits `[from, to)` into the sub-minute head, whole minutes, and the sub-minute tail:
/// `(head, minutes, tail)`, each a half-open ms range (possibly empty).
pub fn split_minutes(from: i64, to: i64) -> ((i64, i64), (i64, i64), (i64, i64)) {
    let first = from.div_euclid(60_000) * 60_000
        + if from.rem_euclid(60_000) == 0 {
            0
        } else {
            60_000
        };
    let last = to.div_euclid(60_000) * 60_000;
    if first >= last {
        return ((from, to), (first, first), (to, to));
    }
    ((from, first), (first, last), (last, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_into_edges_and_whole_minutes() {
        assert_eq!(
            split_minutes(0, 180_000),
            ((0, 0), (0, 180_000), (180_000, 180_000))
        );
        assert_eq!(
            split_minutes(30_000, 150_000),
            ((30_000, 60_000), (60_000, 120_000), (120_000, 150_000))
        );
        assert_eq!(
            split_minutes(10_000, 50_000),
            ((10_000, 50_000), (60_000, 60_000), (50_000, 50_000))
        );
        assert_eq!(
            split_minutes(-30_000, 60_000),
            ((-30_000, 0), (0, 60_000), (60_000, 60_000))
        );
    }
    #[test]
    fn offsets_split_where_the_zone_changes() {
        let ny: Tz = "America/New_York".parse().unwrap();
        // 2024-11-03 04:00Z .. 08:00Z: EDT until 06:00Z, then EST
        let p = constant_offset_pieces(1_730_606_400, 1_730_620_800, ny);
        assert_eq!(
            p,
            vec![
                (1_730_606_400, 1_730_613_600, -4 * 3600),
                (1_730_613_600, 1_730_620_800, -5 * 3600)
            ]
        );
        assert_eq!(constant_offset_pieces(0, 7200, Tz::UTC), vec![(0, 7200, 0)]);
    }

    #[test]
    fn quarters_are_read_where_every_quarter_lies_in_one_window() {
        let spec = |window_size, tz: &str| QuerySpec {
            from_ms: None,
            to_ms: 0,
            window_size,
            tz: tz.parse().unwrap(),
            subjects: vec![],
            group_by: vec![],
            filter_group_by: BTreeMap::new(),
        };
        let r = |quarter, from_s, to_s, offset_s| RollupRead {
            quarter,
            from_s,
            to_s,
            offset_s,
        };
        let whole = spec(None, "UTC");
        // minute edges around whole quarters
        assert_eq!(
            plan_rollup_reads(60, 3720, &whole, true),
            vec![
                r(false, 60, 900, 0),
                r(true, 900, 3600, 0),
                r(false, 3600, 3720, 0)
            ]
        );
        // aligned: one read; without a quarter tier, minutes
        assert_eq!(
            plan_rollup_reads(0, 3600, &whole, true),
            vec![r(true, 0, 3600, 0)]
        );
        assert_eq!(
            plan_rollup_reads(0, 3600, &whole, false),
            vec![r(false, 0, 3600, 0)]
        );
        // MINUTE windows read minutes; Kathmandu's +05:45 days align to quarters
        assert_eq!(
            plan_rollup_reads(0, 3600, &spec(Some(WindowSize::Minute), "UTC"), true),
            vec![r(false, 0, 3600, 0)]
        );
        assert_eq!(
            plan_rollup_reads(
                1_730_592_000,
                1_730_595_600,
                &spec(Some(WindowSize::Day), "Asia/Kathmandu"),
                true
            ),
            vec![r(true, 1_730_592_000, 1_730_595_600, 20_700)]
        );
        // a quarter-less range in New York's fall-back hour: two pieces, each a quarter
        // read with its own offset
        assert_eq!(
            plan_rollup_reads(
                1_730_610_000,
                1_730_617_200,
                &spec(Some(WindowSize::Hour), "America/New_York"),
                true
            ),
            vec![
                r(true, 1_730_610_000, 1_730_613_600, -4 * 3600),
                r(true, 1_730_613_600, 1_730_617_200, -5 * 3600)
            ]
        );
    }
}
