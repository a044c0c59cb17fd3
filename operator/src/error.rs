//! The operator's errors, named after the step that failed.
use tally_meter::Error as PipelineError;

/// Errors of a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a Meter's status.
    #[error("failed to apply the status of {0}")]
    ApplyStatus(String, #[source] kube::Error),
    /// Adding or removing the finalizer (or the cleanup it guards).
    #[error("failed to run the finalizer of {0}")]
    Finalizer(
        String,
        #[source] Box<kube::runtime::finalizer::Error<Error>>,
    ),
    /// Creating or backfilling a rollup in ClickHouse.
    #[error("failed to provision the rollup of {0}")]
    ProvisionRollup(String, #[source] PipelineError),
    /// Dropping a rollup in ClickHouse.
    #[error("failed to drop rollup {0}")]
    DropRollup(String, #[source] PipelineError),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A static category for metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            Error::ApplyStatus(..) => "apply_status",
            Error::Finalizer(_, e) => match &**e {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.category(),
                _ => "finalizer",
            },
            Error::ProvisionRollup(..) => "clickhouse",
            Error::DropRollup(..) => "clickhouse",
        }
    }
}
