//! The meters a batch feeds, and writing their rollup rows ([`crate::fold`]).
//!
//! A meter with cutover `T` takes the rows of every batch begun at `S >= T` (the rows
//! with `inserted_at >= T`, as its view did). The sink reads the meters from the
//! server it writes to, with that server's clock `R` read first: every record visible
//! then is in the list, and provisioning makes a record visible on every writer before
//! its `T` ([`crate::provision`]), so a record missing from the list has `T > R`. The
//! list therefore serves every batch with `S <= R`, and is read again for a later `S`
//! (at most once per second of ClickHouse's clock, whatever the batch rate).
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tally_meter::Result;

use crate::fold::{Folded, MeterFold};
use crate::provision::{read_meters, rollup_tables};
use crate::{Ch, EventRow};

/// One writer's meters, as read at its clock `at`.
struct Known {
    at: i64,
    /// (cutover, fold) of each live meter.
    meters: Vec<(i64, Arc<MeterFold>)>,
    /// The rollup tables that exist (a meter being dropped may have lost them).
    tables: HashSet<String>,
}

/// The meters of each writer the sink talks to, kept while they are valid.
#[derive(Default)]
pub(super) struct Meters {
    known: HashMap<String, Known>,
    /// Compiled folds by (rollup, definition), so a re-read compiles nothing new.
    folds: HashMap<(String, String), Arc<MeterFold>>,
}

impl Meters {
    /// The meters that take a batch begun at `s` on `ch`, and the rollup tables that
    /// exist there (a table missing is skipped: [`fold_all`]).
    pub(super) async fn of_batch(
        &mut self,
        ch: &Ch,
        s: i64,
    ) -> Result<(Vec<Arc<MeterFold>>, HashSet<String>)> {
        let fresh = self.known.get(ch.url()).is_some_and(|k| s <= k.at);
        if !fresh {
            let known = self.read(ch).await?;
            self.known.insert(ch.url().to_string(), known);
        }
        let known = &self.known[ch.url()];
        let meters = known
            .meters
            .iter()
            .filter(|(cutover, _)| *cutover <= s)
            .map(|(_, fold)| fold.clone())
            .collect();
        Ok((meters, known.tables.clone()))
    }

    /// Forgets what was read (after a failed batch: a meter may have been dropped).
    pub(super) fn forget(&mut self) {
        self.known.clear();
    }

    async fn read(&mut self, ch: &Ch) -> Result<Known> {
        let at = ch.now().await?;
        let records = read_meters(ch).await?;
        let tables = rollup_tables(ch).await?;
        let mut meters = Vec::with_capacity(records.len());
        for rec in records {
            let key = (rec.rollup.clone(), rec.definition.clone());
            let fold = match self.folds.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let Some(meter) = rec.compile() else {
                        tracing::error!(rollup = %rec.rollup, "A provisioned meter no longer compiles; the sink does not feed its rollup");
                        continue;
                    };
                    let fold = Arc::new(MeterFold::new(&meter));
                    self.folds.insert(key, fold.clone());
                    fold
                }
            };
            if !crate::rollup::Grain::ALL
                .iter()
                .all(|g| tables.contains(&g.table(&fold.table)))
            {
                tracing::warn!(rollup = %fold.table, "A provisioned meter's rollup table is missing (it is being dropped, or provisioned again); batches do not feed it until it exists");
            }
            meters.push((rec.cutover as i64, fold));
        }
        Ok(Known { at, meters, tables })
    }
}

/// Folds `rows` for every meter of `meters`, spread over the cores: the rollup rows to
/// insert into each of their tables that exists (a missing one is provisioned again
/// from a new cutover, or its meter is being dropped).
pub(super) fn fold_all(
    meters: &[Arc<MeterFold>],
    tables: &HashSet<String>,
    rows: &[EventRow],
) -> Vec<Folded> {
    if meters.is_empty() || rows.is_empty() {
        return Vec::new();
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let meters: Vec<&MeterFold> = meters.iter().map(|m| m.as_ref()).collect();
    crate::fold::fold_many(&meters, rows, threads)
        .into_iter()
        .flatten()
        .filter(|f| f.rows > 0 && tables.contains(&f.table))
        .collect()
}

/// Inserts the folded rows, a few tables at a time.
pub(super) async fn insert_all(ch: &Ch, folded: &[Folded]) -> Result<()> {
    use futures::stream::{self, TryStreamExt};
    stream::iter(folded.iter().map(Ok))
        .try_for_each_concurrent(4, |f| ch.insert_row_binary(&f.table, &f.columns, &f.body))
        .await
}
