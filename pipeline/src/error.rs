//! Errors of the data plane.
#[cfg(feature = "server")]
use crate::query::QueryError;

/// Errors of `tally-pipeline`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedded database failed.
    #[cfg(feature = "server")]
    #[error("failed to {step} in the embedded store")]
    Sqlite {
        /// What was being done.
        step: &'static str,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The store's ingest queue is full; the client should retry later.
    #[error("failed to queue events: the ingest queue is full")]
    Overloaded,
    /// A write transaction failed; nothing of it was stored.
    #[error("failed to store events: {0}")]
    WriteFailed(String),
    /// The store's writer is gone (shutting down or crashed).
    #[error("failed to reach the store writer: it has stopped")]
    WriterGone,
    /// ClickHouse failed or could not be reached.
    #[cfg(feature = "server")]
    #[error("failed to {step} in ClickHouse: {source}")]
    ClickHouse {
        /// What was being done.
        step: String,
        /// The cause.
        #[source]
        source: clickhouse::error::Error,
    },
    /// A service the request needs (Kafka, ClickHouse) is unreachable; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A query could not be answered as asked.
    #[cfg(feature = "server")]
    #[error(transparent)]
    Query(#[from] QueryError),
    /// Reading a file failed.
    #[error("failed to read {path}")]
    ReadFile {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the failed step to a rusqlite error.
#[cfg(feature = "server")]
pub(crate) trait SqliteStep<T> {
    fn step(self, step: &'static str) -> Result<T>;
}

#[cfg(feature = "server")]
impl<T> SqliteStep<T> for rusqlite::Result<T> {
    fn step(self, step: &'static str) -> Result<T> {
        self.map_err(|source| Error::Sqlite { step, source })
    }
}
