//! Errors of the data plane, shared by every store so the API maps them one way.
use crate::query::QueryError;

/// A backend's own error, kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of ingest, stores and queries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedded database failed.
    #[error("failed to {step} in the embedded store")]
    Sqlite {
        /// What was being done.
        step: &'static str,
        /// The cause (a `rusqlite::Error`).
        #[source]
        source: BoxError,
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
    #[error("failed to {step} in ClickHouse: {source}")]
    ClickHouse {
        /// What was being done.
        step: String,
        /// The cause (a `clickhouse::error::Error`).
        #[source]
        source: BoxError,
    },
    /// A service the request needs (Kafka, ClickHouse) is unreachable; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A query could not be answered as asked.
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
