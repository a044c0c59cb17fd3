//! tally on a replicated, sharded ClickHouse cluster (`--clickhouse-cluster NAME`, a
//! `<remote_servers>` entry with `internal_replication` true, ZooKeeper, `{shard}` and
//! `{replica}` macros and a `distributed_ddl` path on every server).
//!
//! # Layout
//! - Every table of [`crate`] exists on every server, created `ON CLUSTER`. The data
//!   tables (`events`, `event_ids`, `sink_log`, `dead_letters`, each rollup) use the
//!   Replicated engine of the same family with one copy per shard
//!   (`/clickhouse/tables/{shard}/tally/<database>/<table>`); `events_feed` is `Null` and
//!   the meters' views are local to each server, as on one server.
//! - `meters` and `partition_shards` are small and the same everywhere: one Replicated
//!   copy on every server (`/clickhouse/tables/all/tally/<database>/<table>`).
//! - Queries read `<table>_all`, a `Distributed` table over every shard; it reads one
//!   healthy replica of each shard and merges the rollup states, so the answers are those
//!   of one server holding everything.
//!
//! # Where a row lives
//! **The shard is a function of the Kafka partition**: the sink maps a partition to
//! shard `partition mod shards` the first time it sees it and records that in
//! `partition_shards`; afterwards the record, not the formula, decides. A partition's
//! rows, its `sink_log` and its `event_ids` all live on that one shard, and a subject's
//! events all live in one partition (the Kafka key is namespace/subject), so the
//! single-server argument of [`crate::sink`] holds per shard, unchanged: the sink reads
//! and writes one replica of the shard (the first one `system.clusters` lists, its
//! "writer"), dedup looks up that shard's `event_ids`, repair re-derives that shard's
//! rollup rows from that shard's `events`.
//!
//! **Adding a shard** leaves every recorded partition where it is (the record wins), so
//! nothing moves and nothing is counted twice; the new shard receives the partitions the
//! sink has never seen, so to use it, add Kafka partitions. That re-maps keys to
//! partitions for new events (Kafka's own rule), so a subject's later events may land on
//! another shard: its answers stay exact (the Distributed read merges both shards), but
//! dedup of an event re-sent across that change sees only its new shard. Removing a shard
//! that holds partitions is refused at the sink's start, with the partition named.
//!
//! # Exactly once with replicas
//! - **Every insert carries `insert_deduplicate = 0`.** A Replicated table (a view's
//!   target too) silently drops a block byte-identical to one of its last 100, which
//!   would lose a rollup block that happens to equal an earlier one (two minutes of the
//!   same usage) and the rows a repair re-derives identically after deleting them. tally
//!   never relies on block dedup: the begin/done log and repair decide what is applied.
//! - **The sink reads its own writes**: everything it reads to decide (the partition's
//!   last `sink_log` row, rows already in `events`, `event_ids`) comes from the replica
//!   it wrote to. A replica never gets parts of this shard from anyone but that writer
//!   (replication only copies them), so its state is at least as new as the sink's last
//!   acknowledged insert. While the writer is down the sink waits and retries (a
//!   transient failure, with its usual limit); events wait in Kafka and queries are
//!   answered by the other replicas.
//! - **A repair's deletion** is an `ALTER … DELETE` on the writer, replicated through
//!   ZooKeeper; it applies to the parts numbered before it, never to the rows re-derived
//!   after it, on every replica, whenever that replica runs it. The sink waits for it on
//!   the writer; another replica may count those minutes twice for the moment until it
//!   has applied the deletion too.
//! - **With ZooKeeper gone** Replicated tables are read-only: inserts fail as transient
//!   and are retried; the batch's `begin` without `done` is repaired as on one server.
//! - **Clocks**: each batch's `S` is the writer's clock and a new meter's cutover the
//!   clock of the server the operator talks to, so the cutover argument of
//!   [`crate::provision`] needs the servers' clocks within the cutover margin (5 s by
//!   default; NTP keeps them within milliseconds).
//! - **The meters a batch feeds** (and those a repair re-derives) are read from the
//!   writer's copy of `meters`, which ZooKeeper replicates from the server the
//!   operator wrote to. Provisioning waits until every writer shows a new record before
//!   its cutover (else it chooses a later one), so a writer's copy never lacks a meter
//!   its batches must feed ([`crate::provision`]).
//! - **Provisioning reads the writers too**: the cutover's wait reads each shard's
//!   `sink_log` on its writer, and the backfill runs shard by shard on the writer (its
//!   `events` into its rollup), so it sees every batch the sink finished; a replica
//!   that has not fetched the newest parts yet would miss them. A meter created while
//!   a shard's writer is down waits for it (the provisioning step fails and is retried).
//!   Deletions (a backfill's retry, an upgrade's old view rows) run on each writer too.
//!
//! Untested in cluster mode, so not used there: lightweight deletes, insert dedup
//! tokens, `DateTime64`. The cluster test runs on ClickHouse 18.16.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tally_meter::{Error, Result};

use crate::{Ch, lit};

/// The settings every request of a cluster installation carries (see the module docs).
pub(crate) fn replicated_settings(client: clickhouse::Client) -> clickhouse::Client {
    client.with_setting("insert_deduplicate", "0")
}

impl Ch {
    /// The cluster this installation's tables are spread over, if any.
    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    /// ` ON CLUSTER <name>` on a cluster, else nothing.
    pub fn on_cluster(&self) -> String {
        self.cluster
            .as_ref()
            .map_or(String::new(), |c| format!(" ON CLUSTER {c}"))
    }

    /// The engine of a data table: `kind(args)` on one server; on a cluster its
    /// Replicated variant, one copy per shard.
    pub fn engine(&self, table: &str, kind: &str, args: &str) -> String {
        self.replicated(table, kind, args, "{shard}", "{replica}")
    }

    /// The engine of a small table that is the same on every server: on a cluster, one
    /// Replicated copy per server.
    pub fn shared_engine(&self, table: &str, kind: &str, args: &str) -> String {
        self.replicated(table, kind, args, "all", "{shard}-{replica}")
    }

    fn replicated(&self, table: &str, kind: &str, args: &str, group: &str, name: &str) -> String {
        match self.cluster {
            None if args.is_empty() => kind.to_string(),
            None => format!("{kind}({args})"),
            Some(_) => {
                let path = lit(&format!(
                    "/clickhouse/tables/{group}/tally/{}/{table}",
                    self.database
                ));
                let extra = if args.is_empty() {
                    String::new()
                } else {
                    format!(", {args}")
                };
                format!("Replicated{kind}({path}, {}{extra})", lit(name))
            }
        }
    }

    /// The table a query reads: `<db>.<table>`, or on a cluster `<db>.<table>_all`, the
    /// Distributed table over every shard.
    pub fn read(&self, table: &str) -> String {
        match self.cluster {
            None => format!("{}.{table}", self.database),
            Some(_) => format!("{}.{table}_all", self.database),
        }
    }

    /// On a cluster, creates `<table>_all` over `<table>` of every shard (rows inserted
    /// into it go to a random shard). Nothing on one server.
    pub async fn create_distributed(&self, table: &str) -> Result<()> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        let db = &self.database;
        self.exec(
            "create a Distributed table",
            &format!(
                "CREATE TABLE IF NOT EXISTS {db}.{table}_all ON CLUSTER {cluster} AS {db}.{table} \
                 ENGINE = Distributed({cluster}, {db}, {table}, rand())"
            ),
        )
        .await
    }

    /// A connection to one replica at `url`, for reading and writing its shard's own
    /// tables: same database and credentials, the cluster's insert settings, no `ON
    /// CLUSTER` and no Distributed reads.
    pub fn replica(&self, url: &str) -> Ch {
        let mut client = self.client.clone().with_url(url);
        if self.cluster.is_some() {
            client = replicated_settings(client);
        }
        Ch {
            client,
            database: self.database.clone(),
            url: url.to_string(),
            cluster: None,
            replica_urls: Vec::new(),
        }
    }

    /// The connections everything that decides reads and writes through: on a cluster,
    /// each shard's writer (its first replica), so reads see every acknowledged write
    /// (see the module docs); on one server, the server.
    pub async fn writers(&self) -> Result<Vec<Ch>> {
        let Some(cluster) = &self.cluster else {
            return Ok(vec![self.clone()]);
        };
        let topology = Topology::discover(self, cluster, &self.replica_urls).await?;
        Ok(topology
            .shards
            .iter()
            .map(|replicas| self.replica(&replicas[0]))
            .collect())
    }

    /// Whether every table in `names` exists here.
    pub(crate) async fn all_exist(&self, names: &[&str]) -> Result<bool> {
        let list = names.iter().map(|n| lit(n)).collect::<Vec<_>>().join(", ");
        let n: Vec<u64> = self
            .fetch(
                "list tally's tables",
                &format!(
                    "SELECT count() FROM system.tables WHERE database = {} AND name IN ({list})",
                    lit(&self.database)
                ),
            )
            .await?;
        Ok(n.first().copied().unwrap_or_default() == names.len() as u64)
    }
}

/// The shards of a cluster, each as the HTTP URLs of its replicas, writer first.
#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    /// Per shard (in `shard_num` order), the replicas' URLs (in `replica_num` order).
    pub shards: Vec<Vec<String>>,
}

impl Topology {
    /// Reads `cluster` from `system.clusters` of the server `ch` talks to. Replica URLs
    /// are `urls` when given (one per replica, in `system.clusters` order: shard by
    /// shard), else `http://<host_name>:<port of ch's URL>`.
    pub async fn discover(ch: &Ch, cluster: &str, urls: &[String]) -> Result<Topology> {
        #[derive(Deserialize, clickhouse::Row)]
        struct Replica {
            shard_num: u32,
            host_name: String,
        }
        let rows: Vec<Replica> = ch
            .fetch(
                "read the cluster's shards",
                &format!(
                    "SELECT shard_num, host_name FROM system.clusters WHERE cluster = {} ORDER BY shard_num, replica_num",
                    lit(cluster)
                ),
            )
            .await?;
        if rows.is_empty() {
            return Err(Error::Unavailable(format!(
                "ClickHouse at {} knows no cluster {cluster:?} (system.clusters); name one of its <remote_servers> with --clickhouse-cluster",
                ch.url()
            )));
        }
        if !urls.is_empty() && urls.len() != rows.len() {
            return Err(Error::Unavailable(format!(
                "--clickhouse-replica-urls names {} URLs but cluster {cluster:?} has {} replicas; list one per replica, shard by shard, in system.clusters order",
                urls.len(),
                rows.len()
            )));
        }
        let port = url_port(ch.url());
        let mut shards: Vec<Vec<String>> = Vec::new();
        let mut last = None;
        for (i, r) in rows.iter().enumerate() {
            if last != Some(r.shard_num) {
                shards.push(Vec::new());
                last = Some(r.shard_num);
            }
            let url = match urls.get(i) {
                Some(u) => u.clone(),
                None => format!("http://{}:{port}", r.host_name),
            };
            shards.last_mut().expect("pushed above").push(url);
        }
        Ok(Topology { shards })
    }
}

/// The port of an HTTP(S) URL (8123 when it names none).
fn url_port(url: &str) -> u16 {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let host = rest.split('/').next().unwrap_or(rest);
    host.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(if url.starts_with("https") { 8443 } else { 8123 })
}

#[derive(Clone, Debug, Serialize, Deserialize, clickhouse::Row)]
struct ShardRow {
    topic: String,
    kafka_partition: i32,
    shard: u32,
    version: u64,
}

/// Which shard each Kafka partition's rows live on (`partition_shards`).
#[derive(Debug, Default)]
pub struct PartitionShards {
    known: HashMap<i32, usize>,
}

impl PartitionShards {
    /// The shard of partition `p` of `topic` among `shards`: the recorded one, or, the
    /// first time, `p mod shards`, recorded before any row of `p` is written.
    pub async fn shard_of(&mut self, ch: &Ch, topic: &str, p: i32, shards: usize) -> Result<usize> {
        if let Some(&s) = self.known.get(&p) {
            return Ok(s);
        }
        let rows: Vec<u32> = ch
            .fetch(
                "read the partition's shard",
                &format!(
                    "SELECT shard FROM {}.partition_shards FINAL WHERE topic = {} AND kafka_partition = {p}",
                    ch.db(),
                    lit(topic)
                ),
            )
            .await?;
        let shard = match rows.first() {
            Some(&s) => s as usize,
            None => {
                let s = p.rem_euclid(shards as i32) as u32;
                let version = chrono::Utc::now().timestamp_micros() as u64;
                ch.insert::<ShardRow>(
                    "partition_shards",
                    &[ShardRow {
                        topic: topic.to_string(),
                        kafka_partition: p,
                        shard: s,
                        version,
                    }],
                )
                .await?;
                tracing::info!(
                    partition = p,
                    shard = s + 1,
                    "Kafka partition mapped to a shard"
                );
                s as usize
            }
        };
        if shard >= shards {
            return Err(Error::Unavailable(format!(
                "Kafka partition {p} of {topic:?} is stored on shard {} but the cluster now has {shards}; \
                 put the shard back in <remote_servers> (a partition's rows, sink log and dedup identities stay on their shard)",
                shard + 1
            )));
        }
        self.known.insert(p, shard);
        Ok(shard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(cluster: Option<&str>) -> Ch {
        Ch::new(&crate::ChConfig {
            url: "http://127.0.0.1:8123".into(),
            database: "tally".into(),
            user: String::new(),
            password: String::new(),
            cluster: cluster.map(String::from),
            replica_urls: Vec::new(),
        })
        .unwrap()
    }

    #[test]
    fn engines_are_replicated_only_on_a_cluster() {
        assert_eq!(
            ch(None).engine("meters", "ReplacingMergeTree", "version"),
            "ReplacingMergeTree(version)"
        );
        assert_eq!(ch(None).engine("events", "MergeTree", ""), "MergeTree");
        assert_eq!(
            ch(Some("c1")).engine("events", "MergeTree", ""),
            "ReplicatedMergeTree('/clickhouse/tables/{shard}/tally/tally/events', '{replica}')"
        );
        assert_eq!(
            ch(Some("c1")).shared_engine("meters", "ReplacingMergeTree", "version"),
            "ReplicatedReplacingMergeTree('/clickhouse/tables/all/tally/tally/meters', '{shard}-{replica}', version)"
        );
        assert_eq!(ch(Some("c1")).read("events"), "tally.events_all");
        assert_eq!(ch(None).read("events"), "tally.events");
        assert_eq!(ch(Some("c1")).on_cluster(), " ON CLUSTER c1");
        assert!(
            ch(Some("c1"))
                .replica("http://127.0.0.1:8124")
                .cluster()
                .is_none()
        );
    }

    #[test]
    fn a_cluster_name_is_checked() {
        let e = Ch::new(&crate::ChConfig {
            url: "http://127.0.0.1:8123".into(),
            database: "tally".into(),
            user: String::new(),
            password: String::new(),
            cluster: Some("c1; DROP".into()),
            replica_urls: Vec::new(),
        })
        .unwrap_err();
        assert!(e.to_string().contains("remote_servers"), "{e}");
    }

    #[test]
    fn replica_urls_default_to_the_port_of_the_given_url() {
        assert_eq!(url_port("http://ch-0:8125"), 8125);
        assert_eq!(url_port("http://ch-0"), 8123);
        assert_eq!(url_port("https://ch-0/x"), 8443);
    }
}
