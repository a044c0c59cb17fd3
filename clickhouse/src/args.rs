//! The ClickHouse and cutover flags every binary that talks to ClickHouse flattens
//! (`tally-server`, its `sink`, `tally-operator`), so they are spelled, defaulted and
//! read from the environment the same way everywhere.
use crate::ChConfig;
use crate::provision::CutoverConfig;

/// Where ClickHouse is.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ChArgs {
    /// ClickHouse HTTP URL (e.g. http://127.0.0.1:8123). tally-server: queries read
    /// ClickHouse (without it, the embedded store); tally-operator: default
    /// http://127.0.0.1:8123.
    #[arg(long = "clickhouse", env = "TALLY_CLICKHOUSE", global = true)]
    pub url: Option<String>,
    /// ClickHouse database.
    #[arg(
        long = "clickhouse-database",
        env = "TALLY_CLICKHOUSE_DATABASE",
        default_value = "tally",
        global = true
    )]
    pub database: String,
    /// ClickHouse user.
    #[arg(
        long = "clickhouse-user",
        env = "TALLY_CLICKHOUSE_USER",
        default_value = "",
        global = true
    )]
    pub user: String,
    /// ClickHouse password (prefer the environment variable).
    #[arg(
        long = "clickhouse-password",
        env = "TALLY_CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true,
        global = true
    )]
    pub password: String,
    /// The ClickHouse cluster (a `<remote_servers>` name, with ZooKeeper) to spread
    /// tally's tables over: Replicated tables created ON CLUSTER, one shard per Kafka
    /// partition, queries through Distributed tables. Unset: one server.
    #[arg(
        long = "clickhouse-cluster",
        env = "TALLY_CLICKHOUSE_CLUSTER",
        global = true
    )]
    pub cluster: Option<String>,
    /// With --clickhouse-cluster: the HTTP URL of every replica, comma-separated, shard
    /// by shard in `system.clusters` order. Default: http://<host_name>:<the port of
    /// --clickhouse> for each replica the cluster lists. The sink and provisioning
    /// read and write each shard through its first replica.
    #[arg(
        long = "clickhouse-replica-urls",
        env = "TALLY_CLICKHOUSE_REPLICA_URLS",
        value_delimiter = ',',
        global = true
    )]
    pub replica_urls: Vec<String>,
}

impl ChArgs {
    /// The connection settings for `url`.
    pub fn config(&self, url: &str) -> ChConfig {
        ChConfig {
            url: url.to_string(),
            database: self.database.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            cluster: self.cluster.clone().filter(|c| !c.is_empty()),
            replica_urls: self.replica_urls.clone(),
        }
    }
}

/// The cutover between a new rollup's backfill and its view (see [`crate::provision`]).
#[derive(clap::Args, Debug, Clone)]
pub struct CutoverArgs {
    /// How far ahead a new rollup's cutover is set, seconds.
    #[arg(
        long = "cutover-margin-secs",
        env = "TALLY_CUTOVER_MARGIN_SECS",
        default_value_t = 5,
        global = true
    )]
    pub margin_secs: i64,
    /// The sink's bound between reading ClickHouse's clock and logging a batch, seconds.
    #[arg(
        long = "cutover-grace-secs",
        env = "TALLY_CUTOVER_GRACE_SECS",
        default_value_t = 5,
        global = true
    )]
    pub grace_secs: i64,
}

impl CutoverArgs {
    /// The provisioning settings.
    pub fn config(&self) -> CutoverConfig {
        CutoverConfig {
            margin_secs: self.margin_secs,
            grace_secs: self.grace_secs,
            ..CutoverConfig::default()
        }
    }
}
