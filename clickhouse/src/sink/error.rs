//! Why the sink stopped, named after the step that failed.
use super::retry::{self, Code};

/// A sink that stopped with an error. Every variant names the step; a configuration
/// error also says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// ClickHouse says the set-up is wrong; retrying cannot help.
    #[error("failed to {step}: ClickHouse answered {name} (code {code}); {fix}")]
    Config {
        /// The step.
        step: String,
        /// ClickHouse's error code.
        code: u32,
        /// ClickHouse's name for it.
        name: &'static str,
        /// What to do.
        fix: &'static str,
        /// The error.
        #[source]
        source: tally_meter::Error,
    },
    /// ClickHouse refused data the sink writes itself (not an event's value): a bug
    /// in tally or a schema it does not know, so retrying cannot help.
    #[error(
        "failed to {step}: ClickHouse refused a value tally wrote itself; the batch is repaired at the next start (report this with the log)"
    )]
    Refused {
        /// The step.
        step: String,
        /// The error.
        #[source]
        source: tally_meter::Error,
    },
    /// A transient failure lasted longer than `max_retry`; the supervisor restarts the
    /// sink, which repairs the batch.
    #[error("gave up after {secs} s: failed to {step}")]
    GaveUp {
        /// The step.
        step: String,
        /// How long it was retried.
        secs: u64,
        /// The last error.
        #[source]
        source: tally_meter::Error,
    },
    /// Asked to stop while a step kept failing.
    #[error("stopped while failing to {step}; the batch is repaired at the next start")]
    Stopped {
        /// The step.
        step: String,
        /// The last error.
        #[source]
        source: tally_meter::Error,
    },
    /// A setting is invalid before anything is asked of ClickHouse (e.g. the database
    /// name); the cause names it.
    #[error("failed to {step}; fix the setting the cause names")]
    Invalid {
        /// The step.
        step: String,
        /// The error.
        #[source]
        source: tally_meter::Error,
    },
    /// The Kafka consumer could not be created, subscribed or moved.
    #[error("failed to {step} (Kafka)")]
    Kafka {
        /// The step.
        step: &'static str,
        /// The cause.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The sink's own runtime could not start.
    #[error("failed to start the sink's runtime")]
    Runtime(#[source] std::io::Error),
}

impl SinkError {
    /// `source` back when it is transient (retry it), else the error to stop with.
    pub(super) fn unless_transient(
        step: &str,
        source: tally_meter::Error,
    ) -> Result<tally_meter::Error, SinkError> {
        let text = retry::chain(&source);
        match (retry::classify(&text), retry::known(&text)) {
            (
                retry::Class::Config,
                Some(&Code {
                    code, name, fix, ..
                }),
            ) => Err(SinkError::Config {
                step: step.to_string(),
                code,
                name,
                fix,
                source,
            }),
            (retry::Class::Data, _) => Err(SinkError::Refused {
                step: step.to_string(),
                source,
            }),
            _ => Ok(source),
        }
    }
}

/// `Result` with [`SinkError`].
pub type SinkResult<T> = std::result::Result<T, SinkError>;

/// Attaches the Kafka step to an rdkafka error.
pub(super) fn kafka(step: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> SinkError {
    move |source| SinkError::Kafka { step, source }
}
