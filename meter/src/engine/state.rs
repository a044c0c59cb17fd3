//! Mergeable partial aggregation states.
//!
//! A [`State`] summarizes any set of events for one meter, subject, group and window.
//! States merge associatively and commutatively, so one-minute rollups re-window
//! exactly into hours, days and months, and partial-minute edges read from raw events
//! merge with full minutes from the rollup.
use std::collections::HashSet;

use tally_crds::Aggregation;

/// The value LATEST keeps: the event with the greatest (time, ingestion sequence, id).
#[derive(Clone, Debug, PartialEq)]
pub struct Latest {
    /// Event time in ms.
    pub time_ms: i64,
    /// Ingestion order (greater = ingested later): the embedded store's row sequence
    /// and 0; ClickHouse's (ingestion ms, Kafka offset).
    pub seq: (i64, i64),
    /// Event id (last tie-break).
    pub id: String,
    /// The value.
    pub value: f64,
}

impl Latest {
    fn key(&self) -> (i64, (i64, i64), &str) {
        (self.time_ms, self.seq, &self.id)
    }
}

/// Partial state of every aggregation (only the fields a meter's aggregation uses are
/// meaningful). The default is the empty state (`min` = +inf, `max` = -inf).
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// Number of events.
    pub count: u64,
    /// Sum of values.
    pub sum: f64,
    /// Smallest value (`+inf` when none).
    pub min: f64,
    /// Largest value (`-inf` when none).
    pub max: f64,
    /// LATEST's candidate.
    pub latest: Option<Latest>,
    /// UNIQUE_COUNT's distinct canonical strings.
    pub uniques: HashSet<String>,
}

/// One event's input to a state.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// COUNT: no value.
    None,
    /// SUM/AVG/MIN/MAX/LATEST.
    Number(f64),
    /// UNIQUE_COUNT: canonical string.
    Text(String),
}

impl Default for State {
    fn default() -> State {
        State {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            latest: None,
            uniques: HashSet::new(),
        }
    }
}

impl State {
    /// An empty state.
    pub fn new() -> State {
        State::default()
    }

    /// Adds one event.
    pub fn add(&mut self, input: &Input, time_ms: i64, seq: (i64, i64), id: &str) {
        self.count += 1;
        match input {
            Input::None => {}
            Input::Number(v) => {
                self.sum += v;
                self.min = self.min.min(*v);
                self.max = self.max.max(*v);
                let cand = Latest {
                    time_ms,
                    seq,
                    id: id.to_string(),
                    value: *v,
                };
                if self.latest.as_ref().is_none_or(|l| cand.key() > l.key()) {
                    self.latest = Some(cand);
                }
            }
            Input::Text(s) => {
                if !self.uniques.contains(s) {
                    self.uniques.insert(s.clone());
                }
            }
        }
    }

    /// Merges another state into this one.
    pub fn merge(&mut self, other: &State) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if let Some(o) = &other.latest
            && self.latest.as_ref().is_none_or(|l| o.key() > l.key())
        {
            self.latest = Some(o.clone());
        }
        for u in &other.uniques {
            if !self.uniques.contains(u) {
                self.uniques.insert(u.clone());
            }
        }
    }

    /// The final value for `aggregation`; `None` when the state holds no event.
    pub fn value(&self, aggregation: Aggregation) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        Some(match aggregation {
            Aggregation::Count => self.count as f64,
            Aggregation::Sum => self.sum,
            Aggregation::Avg => self.sum / self.count as f64,
            Aggregation::Min => self.min,
            Aggregation::Max => self.max,
            Aggregation::UniqueCount => self.uniques.len() as f64,
            Aggregation::Latest => self.latest.as_ref()?.value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_states_equal_one_state_over_all_events() {
        let events: Vec<(f64, i64)> = vec![(3.0, 10), (1.5, 30), (7.0, 20), (2.0, 30)];
        let mut whole = State::new();
        let (mut a, mut b) = (State::new(), State::new());
        for (i, (v, t)) in events.iter().enumerate() {
            let id = format!("e{i}");
            whole.add(&Input::Number(*v), *t, (i as i64, 0), &id);
            if i % 2 == 0 {
                a.add(&Input::Number(*v), *t, (i as i64, 0), &id)
            } else {
                b.add(&Input::Number(*v), *t, (i as i64, 0), &id)
            }
        }
        let mut merged = b.clone();
        merged.merge(&a);
        for agg in [
            Aggregation::Sum,
            Aggregation::Count,
            Aggregation::Avg,
            Aggregation::Min,
            Aggregation::Max,
            Aggregation::Latest,
        ] {
            assert_eq!(merged.value(agg), whole.value(agg), "{agg:?}");
        }
        // time 30 twice: the one ingested last (seq 3, value 2.0) wins
        assert_eq!(whole.value(Aggregation::Latest), Some(2.0));
        assert_eq!(whole.value(Aggregation::Avg), Some(13.5 / 4.0));
    }

    #[test]
    fn latest_ties_on_time_and_seq_go_to_the_greater_id() {
        let mut s = State::new();
        s.add(&Input::Number(1.0), 5, (1, 0), "b");
        s.add(&Input::Number(2.0), 5, (1, 0), "a");
        assert_eq!(s.value(Aggregation::Latest), Some(1.0));
    }

    #[test]
    fn unique_count_is_exact_across_merges() {
        let mut a = State::new();
        let mut b = State::new();
        for v in ["x", "y", "x"] {
            a.add(&Input::Text(v.into()), 0, (0, 0), "")
        }
        for v in ["y", "z"] {
            b.add(&Input::Text(v.into()), 0, (0, 0), "")
        }
        a.merge(&b);
        assert_eq!(a.value(Aggregation::UniqueCount), Some(3.0));
        assert_eq!(State::new().value(Aggregation::Sum), None);
        let mut s = State::default();
        s.add(&Input::Number(-3.0), 0, (0, 0), "");
        assert_eq!(
            (s.value(Aggregation::Min), s.value(Aggregation::Max)),
            (Some(-3.0), Some(-3.0))
        );
    }
}
