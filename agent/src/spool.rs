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
//! Watermarks ([`tally_crds::watermark`]) are kept with the output that carried them,
//! behind every event spooled by then, and become due only once those were delivered:
//! a watermark never overtakes an event it vouches for.
//!
//! Bounded: when the undelivered events reach `maxBytes`, [`Spool::commit`] refuses
//! with [`Full`] and the collector waits without advancing anything. `synchronous =
//! NORMAL` survives a killed process; on power loss the last transactions may roll
//! back, events and checkpoints together, which only means re-deriving them.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use tally_collectors::Output;
use tally_crds::Watermark;

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

/// A watermark whose events were all delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct DueWatermark {
    /// Its spool rows.
    pub ids: Vec<i64>,
    /// The collector's key.
    pub collector: String,
    /// Its namespace.
    pub namespace: String,
    /// What to send.
    pub mark: Watermark,
}

/// The spool.
#[derive(Debug)]
pub struct Spool {
    conn: Mutex<Connection>,
    max_bytes: u64,
    state: Mutex<Totals>,
    /// The latest watermark kept per collector (once known), so an output that only
    /// repeats it costs no transaction.
    marks: Mutex<std::collections::HashMap<String, i64>>,
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
                 PRIMARY KEY (collector, key)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS watermarks (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 collector TEXT NOT NULL,
                 namespace TEXT NOT NULL,
                 after_seq INTEGER NOT NULL,
                 until_ms INTEGER NOT NULL,
                 body BLOB NOT NULL,
                 sent INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX IF NOT EXISTS watermarks_by_collector ON watermarks (collector, id);",
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
            marks: Mutex::default(),
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
        self.commit_marked(collector, namespace, out, None)
    }

    /// [`Spool::commit`], also keeping the output's watermark (when it moved forward
    /// or names gaps) as `source` filled in, behind every event spooled so far: it is
    /// due once those were delivered ([`Spool::due_watermarks`]).
    pub fn commit_marked(
        &self,
        collector: &str,
        namespace: &str,
        out: &Output,
        source: Option<&Watermark>,
    ) -> Result<Result<(), Full>> {
        if out.is_empty() {
            return Ok(Ok(()));
        }
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let repeats = out.events.is_empty()
            && out.checkpoints.is_empty()
            && out.watermark.as_ref().is_none_or(|m| {
                m.gaps.is_empty() && marks.get(collector).is_some_and(|l| m.until_ms <= *l)
            });
        if repeats {
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
        let mark = source.zip(out.watermark.as_ref()).map(|(s, m)| Watermark {
            until: m.until_ms,
            gaps: m.gaps.clone(),
            ..s.clone()
        });
        Self::write(&mut conn, collector, namespace, &bodies, out, mark.as_ref())
            .step("commit events and checkpoints")?;
        if let Some(m) = &mark {
            let last = marks.entry(collector.to_string()).or_insert(m.until);
            *last = (*last).max(m.until);
        }
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
        mark: Option<&Watermark>,
    ) -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        if let Some(m) = mark {
            let last: Option<i64> = tx
                .query_row(
                    "SELECT until_ms FROM watermarks WHERE collector = ?1 ORDER BY id DESC LIMIT 1",
                    [collector],
                    |r| r.get(0),
                )
                .optional()?;
            let until = last.map_or(m.until, |l| l.max(m.until));
            if !m.gaps.is_empty() || last.is_none_or(|l| m.until > l) {
                // behind this output's events too: inserted first, below
                let body = serde_json::to_vec(&Watermark { until, ..m.clone() })
                    .expect("a watermark serializes");
                tx.execute(
                    "INSERT INTO watermarks (collector, namespace, after_seq, until_ms, body)
                     VALUES (?1, ?2, -1, ?3, ?4)",
                    params![collector, namespace, until, body],
                )?;
            }
        }
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
        // the new watermark waits for every event spooled until now
        tx.execute(
            "UPDATE watermarks SET after_seq = (SELECT coalesce(max(seq), 0) FROM events)
             WHERE after_seq = -1",
            [],
        )?;
        tx.commit()
    }

    /// Watermarks whose events were all delivered, one per collector (the latest, with
    /// the gaps of every earlier one not yet sent), with the rows they stand for.
    pub fn due_watermarks(&self) -> Result<Vec<DueWatermark>> {
        let conn = self.conn();
        let read = || -> rusqlite::Result<Vec<DueWatermark>> {
            let oldest: Option<i64> =
                conn.query_row("SELECT min(seq) FROM events", [], |r| r.get(0))?;
            let mut stmt = conn.prepare_cached(
                "SELECT id, collector, namespace, body FROM watermarks
                 WHERE sent = 0 AND after_seq < ?1 ORDER BY collector, id",
            )?;
            let rows = stmt
                .query_map([oldest.unwrap_or(i64::MAX)], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut due: Vec<DueWatermark> = Vec::new();
            for (id, collector, namespace, body) in rows {
                let Ok(mark) = serde_json::from_slice::<Watermark>(&body) else {
                    continue;
                };
                match due.last_mut() {
                    Some(d) if d.collector == collector => {
                        d.ids.push(id);
                        let mut gaps = std::mem::take(&mut d.mark.gaps);
                        gaps.extend(mark.gaps.iter().cloned());
                        d.mark = Watermark { gaps, ..mark };
                    }
                    _ => due.push(DueWatermark {
                        ids: vec![id],
                        collector,
                        namespace,
                        mark,
                    }),
                }
            }
            Ok(due)
        };
        read().step("read due watermarks")
    }

    /// Marks watermark rows sent; keeps each collector's latest row (how far it got)
    /// and deletes the other sent ones.
    pub fn watermarks_sent(&self, ids: &[i64]) -> Result<()> {
        let mut conn = self.conn();
        let write = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut upd = tx.prepare_cached("UPDATE watermarks SET sent = 1 WHERE id = ?1")?;
                for id in ids {
                    upd.execute([id])?;
                }
            }
            tx.execute(
                "DELETE FROM watermarks WHERE sent = 1
                 AND id NOT IN (SELECT max(id) FROM watermarks GROUP BY collector)",
                [],
            )?;
            tx.commit()
        };
        write(&mut conn).step("record sent watermarks")
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
        // one lock at a time: `commit` takes the totals before the connection
        drop(conn);
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

    fn source() -> Watermark {
        Watermark {
            collector: "pods".into(),
            node: "n1".into(),
            source: "tally/ns/pods".into(),
            types: vec!["t".into()],
            until: 0,
            gaps: Vec::new(),
            partitions: 0,
        }
    }

    fn marked(n: usize, until: i64, gaps: Vec<tally_crds::Gap>) -> Output {
        let mut o = out(n, None);
        o.checkpoints.clear();
        o.watermark = Some(tally_collectors::Mark {
            until_ms: until,
            gaps,
        });
        o
    }

    #[test]
    fn a_watermark_is_due_only_once_the_events_before_it_were_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let gap = tally_crds::Gap {
            from: 1,
            to: 2,
            reason: "restart".into(),
            pods: vec![],
        };
        spool
            .commit_marked(
                "ns/pods",
                "ns",
                &marked(2, 100, vec![gap.clone()]),
                Some(&source()),
            )
            .unwrap()
            .unwrap();
        spool
            .commit_marked("ns/pods", "ns", &marked(1, 200, vec![]), Some(&source()))
            .unwrap()
            .unwrap();
        // not moving forward: not kept
        spool
            .commit_marked("ns/pods", "ns", &marked(0, 150, vec![]), Some(&source()))
            .unwrap()
            .unwrap();
        assert!(spool.due_watermarks().unwrap().is_empty());
        let first = spool.peek(2).unwrap();
        spool.ack(&first).unwrap();
        // the events before the first are out; the second still waits for one
        let due = spool.due_watermarks().unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].mark.until, due[0].mark.gaps.len()), (100, 1));
        spool.ack(&spool.peek(10).unwrap()).unwrap();
        let due = spool.due_watermarks().unwrap();
        // the latest, carrying the first one's gap
        assert_eq!(
            (due[0].mark.until, due[0].mark.gaps.clone()),
            (200, vec![gap])
        );
        assert_eq!(due[0].mark.node, "n1");
        spool.watermarks_sent(&due[0].ids).unwrap();
        assert!(spool.due_watermarks().unwrap().is_empty());
        // after a reopen, a watermark not past the last sent one is not kept again
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool
            .commit_marked("ns/pods", "ns", &marked(0, 200, vec![]), Some(&source()))
            .unwrap()
            .unwrap();
        assert!(spool.due_watermarks().unwrap().is_empty());
    }
}
