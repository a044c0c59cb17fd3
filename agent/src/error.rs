//! Errors of the agent.

/// Errors of `tally-agent`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read.
    #[error("failed to read the configuration {path}")]
    ReadConfig {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is not valid; the message names the field.
    #[error("invalid configuration {path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The spool's directory could not be created.
    #[error("failed to create the spool directory {path}")]
    SpoolDir {
        /// The directory.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The spool's database failed.
    #[error("failed to {step} in the spool")]
    Spool {
        /// What was being done.
        step: &'static str,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The Kubernetes API is needed but cannot be used.
    #[error(
        "failed to reach the Kubernetes API, which {needed_by} needs (run in a cluster or set KUBECONFIG)"
    )]
    Kube {
        /// Which collector needs it.
        needed_by: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The leader election could not be set up.
    #[error(
        "failed to join the leader election over Lease {lease}: {message} (the agent needs get/create/update on that Lease)"
    )]
    Lease {
        /// `namespace/name`.
        lease: String,
        /// The cause.
        message: String,
    },
    /// A collector's configuration cannot be used (a regex or JSONPath).
    #[error("failed to start collector {collector}")]
    Collector {
        /// `namespace/name`.
        collector: String,
        /// The cause.
        #[source]
        source: tally_collectors::Error,
    },
    /// The node name is needed but unknown.
    #[error(
        "{needed_by} measures this node, but the node name is unknown: set NODE_NAME (from the downward API) or --node-name"
    )]
    NodeName {
        /// Which collector needs it.
        needed_by: String,
    },
    /// The Kafka producer could not be created.
    #[error("failed to create the Kafka producer: {0}")]
    Kafka(String),
    /// The metrics listener could not bind.
    #[error("failed to listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the failed step to a spool error.
pub(crate) trait SpoolStep<T> {
    fn step(self, step: &'static str) -> Result<T>;
}

impl<T> SpoolStep<T> for rusqlite::Result<T> {
    fn step(self, step: &'static str) -> Result<T> {
        self.map_err(|source| Error::Spool { step, source })
    }
}
