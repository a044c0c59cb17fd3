//! The disk spool: where events wait until the sink has them, and where collectors'
//! checkpoints live.
//!
//! One SQLite file (WAL). A collector's [`Output`] — its events and its checkpoint
//! changes — is committed in **one transaction**, so after any crash the spool holds
//! either both or neither; the collector resumes from the checkpoint and re-derives
//! what was not committed, with the same ids. The shipper reads events in commit
//! order and deletes them only after the sink acknowledged them; a crash between the
//! two re-sends them, and dedup absorbs the repeat.
//!
//! Bounded: when the undelivered events reach `maxBytes`, [`Spool::commit`] refuses
//! with [`Full`] and the collector waits without advancing anything. `synchronous =
//! NORMAL` survives a killed process; on power loss the last transactions may roll
//! back, events and checkpoints together, which only means re-deriving them.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};
use tally_collectors::Output;

use crate::error::{Error, Result, SpoolStep};

/// The spool is at its byte limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// An event waiting for delivery.
#[derive(Debug, Clone)]
pub struct Spooled {
    /// Position in the spool.
    pub seq: i64,
    /// Namespace the event belongs to.
    pub namespace: String,
    /// The CloudEvent, JSON.
    pub body: Vec<u8>,
}

/// The spool.
#[derive(Debug)]
pub struct Spool {
    conn: Mutex<Connection>,
    max_bytes: u64,
    state: Mutex<Totals>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    bytes: u64,
    events: u64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool> {
        std::fs::create_dir_all(dir).map_err(|source| Error::SpoolDir {
            path: dir.display().to_string(),
            source,
        })?;
        Self::open_db(dir, max_bytes).step("open the database")
    }

    fn open_db(dir: &Path, max_bytes: u64) -> rusqlite::Result<Spool> {
        let conn = Connection::open(dir.join("spool.sqlite"))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA cache_size = -512;
             CREATE TABLE IF NOT EXISTS events (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 namespace TEXT NOT NULL,
                 body BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS checkpoints (
                 collector TEXT NOT NULL,
                 key TEXT NOT NULL,
                 value TEXT NOT NULL,
                 PRIMARY KEY (collector, key)) WITHOUT ROWID;",
        )?;
        let (bytes, events): (i64, i64) = conn.query_row(
            "SELECT coalesce(sum(length(body)), 0), count(*) FROM events",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Spool {
            conn: Mutex::new(conn),
            max_bytes,
            state: Mutex::new(Totals {
                bytes: bytes as u64,
                events: events as u64,
            }),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The checkpoints of `collector`.
    pub fn checkpoints(&self, collector: &str) -> Result<BTreeMap<String, String>> {
        let conn = self.conn();
        let read = || -> rusqlite::Result<BTreeMap<String, String>> {
            let mut stmt =
                conn.prepare("SELECT key, value FROM checkpoints WHERE collector = ?1")?;
            stmt.query_map([collector], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        };
        read().step("read checkpoints")
    }

    /// Commits a collector's output atomically. `Ok(Err(Full))` when the events do not
    /// fit: nothing was written, try again after the shipper made room.
    pub fn commit(
        &self,
        collector: &str,
        namespace: &str,
        out: &Output,
    ) -> Result<Result<(), Full>> {
        if out.is_empty() {
            return Ok(Ok(()));
        }
        let bodies: Vec<Vec<u8>> = out
            .events
            .iter()
            .map(|e| serde_json::to_vec(e).expect("CloudEvents serialize"))
            .collect();
        let size: u64 = bodies.iter().map(|b| b.len() as u64).sum();
        let mut totals = self.totals();
        if size > 0 && totals.bytes + size > self.max_bytes {
            return Ok(Err(Full));
        }
        let mut conn = self.conn();
        Self::write(&mut conn, collector, namespace, &bodies, out)
            .step("commit events and checkpoints")?;
        totals.bytes += size;
        totals.events += bodies.len() as u64;
        Ok(Ok(()))
    }

    fn write(
        conn: &mut Connection,
        collector: &str,
        namespace: &str,
        bodies: &[Vec<u8>],
        out: &Output,
    ) -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        {
            let mut ins =
                tx.prepare_cached("INSERT INTO events (namespace, body) VALUES (?1, ?2)")?;
            for b in bodies {
                ins.execute(params![namespace, b])?;
            }
            let mut put = tx.prepare_cached(
                "INSERT INTO checkpoints (collector, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (collector, key) DO UPDATE SET value = excluded.value",
            )?;
            let mut del =
                tx.prepare_cached("DELETE FROM checkpoints WHERE collector = ?1 AND key = ?2")?;
            for (k, v) in &out.checkpoints {
                match v {
                    Some(v) => put.execute(params![collector, k, v])?,
                    None => del.execute(params![collector, k])?,
                };
            }
        }
        tx.commit()
    }

    /// The oldest `limit` undelivered events.
    pub fn peek(&self, limit: usize) -> Result<Vec<Spooled>> {
        let conn = self.conn();
        let read = || -> rusqlite::Result<Vec<Spooled>> {
            let mut stmt = conn
                .prepare_cached("SELECT seq, namespace, body FROM events ORDER BY seq LIMIT ?1")?;
            stmt.query_map([limit as i64], |r| {
                Ok(Spooled {
                    seq: r.get(0)?,
                    namespace: r.get(1)?,
                    body: r.get(2)?,
                })
            })?
            .collect()
        };
        read().step("read events")
    }

    /// Deletes delivered (or permanently rejected) events.
    pub fn ack(&self, done: &[Spooled]) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let delete = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut del = tx.prepare_cached("DELETE FROM events WHERE seq = ?1")?;
                for s in done {
                    del.execute([s.seq])?;
                }
            }
            tx.commit()
        };
        delete(&mut conn).step("delete delivered events")?;
        let mut totals = self.totals();
        totals.bytes = totals
            .bytes
            .saturating_sub(done.iter().map(|s| s.body.len() as u64).sum());
        totals.events = totals.events.saturating_sub(done.len() as u64);
        Ok(())
    }

    /// Bytes of undelivered events.
    pub fn bytes(&self) -> u64 {
        self.totals().bytes
    }

    /// Number of undelivered events.
    pub fn len(&self) -> u64 {
        self.totals().events
    }

    /// Whether nothing waits for delivery.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_crds::event::CloudEvent;

    fn out(n: usize, cp: Option<&str>) -> Output {
        let mut o = Output::default();
        for i in 0..n {
            o.events.push(CloudEvent {
                specversion: "1.0".into(),
                id: format!("e{i}"),
                source: "s".into(),
                ty: "t".into(),
                subject: "x".into(),
                time: "2026-01-01T00:00:00Z".into(),
                datacontenttype: None,
                dataschema: None,
                data: None,
                extensions: Default::default(),
            });
        }
        o.checkpoints.insert("k".into(), cp.map(str::to_string));
        o
    }

    #[test]
    fn events_and_checkpoints_commit_together_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool
            .commit("c", "ns", &out(3, Some("v1")))
            .unwrap()
            .unwrap();
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.len(), 3);
        assert_eq!(spool.checkpoints("c").unwrap()["k"], "v1");
        let batch = spool.peek(2).unwrap();
        assert_eq!(batch.len(), 2);
        spool.ack(&batch).unwrap();
        assert_eq!(spool.len(), 1);
        spool.commit("c", "ns", &out(0, None)).unwrap().unwrap();
        assert!(spool.checkpoints("c").unwrap().is_empty());
    }

    #[test]
    fn a_full_spool_refuses_without_writing_anything() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 400).unwrap();
        spool
            .commit("c", "ns", &out(2, Some("v1")))
            .unwrap()
            .unwrap();
        assert_eq!(
            spool.commit("c", "ns", &out(5, Some("v2"))).unwrap(),
            Err(Full)
        );
        assert_eq!(
            spool.checkpoints("c").unwrap()["k"],
            "v1",
            "the checkpoint did not move"
        );
        assert_eq!(spool.len(), 2);
        let all = spool.peek(10).unwrap();
        spool.ack(&all).unwrap();
        assert_eq!(spool.bytes(), 0);
        spool
            .commit("c", "ns", &out(2, Some("v2")))
            .unwrap()
            .unwrap();
    }
}
