//! Finding the rows ClickHouse refuses: when an insert fails with a data error
//! ([`retry::Class::Data`]: a view on the events feed cannot parse a value, a type
//! mismatch), the rows are inserted again in halves, and halves of the halves that
//! fail, until each refused row is alone. Those become dead letters; the others are
//! stored. This runs inside the batch's `begin`/`done` (from repair), so a crash
//! part-way repairs the batch again and splits it the same way.
use tally_meter::Result;

use super::failpoint::failpoint;
use super::retry::{self, Class};

/// The outcome of [`isolate`]: rows inserted, and rows refused with ClickHouse's reason.
#[derive(Debug, PartialEq)]
pub(super) struct Isolated<T> {
    pub(super) inserted: Vec<T>,
    pub(super) refused: Vec<(T, String)>,
}

/// Inserts `rows` with `insert`, splitting on data errors until every refused row is
/// found. Inserted rows keep their order. Any other error stops and is returned (the
/// caller retries the whole batch; an insert that succeeded is repeated then, which
/// repair tolerates).
pub(super) fn isolate<T>(
    rows: Vec<T>,
    mut insert: impl FnMut(&[T]) -> Result<()>,
) -> Result<Isolated<T>> {
    let mut out = Isolated {
        inserted: Vec::with_capacity(rows.len()),
        refused: Vec::new(),
    };
    // depth-first, first half first, so inserted rows stay in order
    let mut todo = vec![rows];
    while let Some(mut chunk) = todo.pop() {
        if chunk.is_empty() {
            continue;
        }
        match insert(&chunk) {
            Ok(()) => out.inserted.append(&mut chunk),
            Err(e) if retry::classify(&retry::chain(&e)) == Class::Data => {
                if chunk.len() == 1 {
                    let row = chunk.pop().expect("one row");
                    out.refused.push((row, e.to_string()));
                    failpoint("mid-split");
                } else {
                    let second = chunk.split_off(chunk.len() / 2);
                    todo.push(second);
                    todo.push(chunk);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_meter::Error;

    fn refusing<'a>(
        bad: &'static [u32],
        calls: &'a mut usize,
    ) -> impl FnMut(&[u32]) -> Result<()> + 'a {
        move |chunk| {
            *calls += 1;
            match chunk.iter().find(|v| bad.contains(v)) {
                Some(v) => Err(Error::ClickHouse {
                    step: "insert into t.events_feed".into(),
                    source: format!("bad response: Code: 6, e.displayText() = DB::Exception: Cannot parse string '{v}' as UInt32").into(),
                }),
                None => Ok(()),
            }
        }
    }

    #[test]
    fn refused_rows_are_found_and_the_rest_inserted_in_order() {
        let mut calls = 0;
        let out = isolate((0..100).collect(), refusing(&[7, 8, 63], &mut calls)).unwrap();
        let expected: Vec<u32> = (0..100).filter(|v| ![7, 8, 63].contains(v)).collect();
        assert_eq!(out.inserted, expected);
        let refused: Vec<u32> = out.refused.iter().map(|(v, _)| *v).collect();
        assert_eq!(refused, [7, 8, 63]);
        assert!(
            out.refused[0].1.contains("Cannot parse string '7'"),
            "{}",
            out.refused[0].1
        );
        // three bad rows among 100: about 3·2·log2(100) inserts, not 100
        assert!(calls <= 40, "{calls} inserts");
    }

    #[test]
    fn a_clean_batch_is_one_insert() {
        let mut calls = 0;
        let out = isolate((0..1000).collect(), refusing(&[], &mut calls)).unwrap();
        assert_eq!((out.inserted.len(), out.refused.len(), calls), (1000, 0, 1));
    }

    #[test]
    fn a_transient_error_is_returned_not_split() {
        let mut calls = 0;
        let err = isolate(vec![1u32, 2, 3], |_| {
            calls += 1;
            Err(Error::ClickHouse {
                step: "insert".into(),
                source: "Code: 241. DB::Exception: Memory limit (total) exceeded (MEMORY_LIMIT_EXCEEDED)".into(),
            })
        })
        .unwrap_err();
        assert!(err.to_string().contains("Memory limit"));
        assert_eq!(calls, 1);
    }
}
