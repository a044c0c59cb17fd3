//! What to do when a step fails: retry, split the batch, or stop.
//!
//! ClickHouse names every failure with a numeric code (`Code: 60` in the text of both
//! 18.16, `Code: 60, e.displayText() = DB::Exception: …`, and 26.9,
//! `Code: 60. DB::Exception: … (UNKNOWN_TABLE) (version 26.9…)`). The sink reads the
//! code and classifies it with [`CODES`]:
//! - [`Class::Transient`]: the server is busy, read-only for a while, out of memory or
//!   merging a backlog of parts, or the network failed. Retried with exponential
//!   backoff; after `max_retry` the process exits so its supervisor restarts it (the
//!   batch is repaired at the next start).
//! - [`Class::Data`]: ClickHouse refused a value of some row (a view on the events
//!   feed could not parse it, a type mismatch). Retrying cannot help: the batch is split
//!   to find the rows, which become dead letters (see `split.rs`).
//! - [`Class::Config`]: tally's database, a table or a column is missing, or the user
//!   may not do this. Retrying cannot help either: the sink stops at once with the fix.
//!
//! Errors without a code (connection refused, timeouts, a reset stream) are transient;
//! a code missing from the table is treated as transient too, so an unknown failure
//! is retried and logged rather than data being dead-lettered by guess.
use std::time::Duration;

/// How a failure is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Retry the step with backoff.
    Transient,
    /// Some rows are refused: split the batch and dead-letter them.
    Data,
    /// Stop: the set-up is wrong; the message says what to fix.
    Config,
}

/// One known code: its number, ClickHouse's name for it, its class, and for
/// configuration errors what the operator should do.
#[derive(Clone, Copy, Debug)]
pub struct Code {
    /// The number after `Code:`.
    pub code: u32,
    /// ClickHouse's name (`UNKNOWN_TABLE`).
    pub name: &'static str,
    /// How the sink handles it.
    pub class: Class,
    /// For [`Class::Config`]: the fix, in one sentence.
    pub fix: &'static str,
}

const fn code(code: u32, name: &'static str, class: Class, fix: &'static str) -> Code {
    Code {
        code,
        name,
        class,
        fix,
    }
}

use Class::{Config, Data, Transient};

/// The codes the sink knows. Numbers and names are the same in ClickHouse 18.16 and
/// 26.9 except where noted; 18.16 reports failed logins as 192/193, 26.9 as 516.
pub const CODES: &[Code] = &[
    // the server is busy or degraded for a while
    code(159, "TIMEOUT_EXCEEDED", Transient, ""),
    code(164, "READONLY", Transient, ""),
    code(202, "TOO_MANY_SIMULTANEOUS_QUERIES", Transient, ""),
    code(203, "NO_FREE_CONNECTION", Transient, ""),
    code(209, "SOCKET_TIMEOUT", Transient, ""),
    code(225, "NO_ZOOKEEPER", Transient, ""),
    code(210, "NETWORK_ERROR", Transient, ""),
    code(241, "MEMORY_LIMIT_EXCEEDED", Transient, ""),
    code(242, "TABLE_IS_READ_ONLY", Transient, ""),
    code(252, "TOO_MANY_PARTS", Transient, ""),
    code(285, "TOO_FEW_LIVE_REPLICAS", Transient, ""),
    code(319, "UNKNOWN_STATUS_OF_INSERT", Transient, ""),
    code(394, "QUERY_WAS_CANCELLED", Transient, ""),
    code(425, "SYSTEM_ERROR", Transient, ""),
    code(439, "CANNOT_SCHEDULE_TASK", Transient, ""), // 26.9
    code(999, "KEEPER_EXCEPTION", Transient, ""),
    // a value of some row is refused
    code(6, "CANNOT_PARSE_TEXT", Data, ""),
    code(27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED", Data, ""),
    code(38, "CANNOT_PARSE_DATE", Data, ""),
    code(41, "CANNOT_PARSE_DATETIME", Data, ""),
    code(53, "TYPE_MISMATCH", Data, ""),
    code(69, "ARGUMENT_OUT_OF_BOUND", Data, ""),
    code(70, "CANNOT_CONVERT_TYPE", Data, ""),
    code(72, "CANNOT_PARSE_NUMBER", Data, ""),
    code(117, "INCORRECT_DATA", Data, ""),
    code(131, "TOO_LARGE_STRING_SIZE", Data, ""),
    code(321, "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE", Data, ""),
    code(395, "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO", Data, ""),
    code(407, "DECIMAL_OVERFLOW", Data, ""),
    code(469, "VIOLATED_CONSTRAINT", Data, ""), // 26.9 (18.16 has no constraints)
    // the set-up is wrong
    code(
        16,
        "NO_SUCH_COLUMN_IN_TABLE",
        Config,
        "a tally table lacks a column: run the operator (or tally-server --provision) of this tally version so it migrates the schema",
    ),
    code(
        60,
        "UNKNOWN_TABLE",
        Config,
        "tally's tables are missing: check --clickhouse-database, and let the operator (or tally-server --provision) create them",
    ),
    code(
        81,
        "UNKNOWN_DATABASE",
        Config,
        "the database does not exist: check --clickhouse-database, and let the operator (or tally-server --provision) create it",
    ),
    code(
        192,
        "UNKNOWN_USER",
        Config,
        "ClickHouse does not know this user: check --clickhouse-user (TALLY_CLICKHOUSE_USER)",
    ),
    code(
        193,
        "WRONG_PASSWORD",
        Config,
        "ClickHouse refused the password: check --clickhouse-password (TALLY_CLICKHOUSE_PASSWORD)",
    ),
    code(
        497,
        "ACCESS_DENIED",
        Config,
        "the ClickHouse user may not write tally's tables: grant it INSERT and SELECT on the database",
    ),
    code(
        516,
        "AUTHENTICATION_FAILED",
        Config,
        "ClickHouse refused the login: check --clickhouse-user and --clickhouse-password",
    ),
];

/// The code in a ClickHouse error text (`Code: 60.` or `Code: 60,`), if any.
pub fn code_of(text: &str) -> Option<u32> {
    let at = text.find("Code: ")? + "Code: ".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The table entry of an error text, if its code is known.
pub fn known(text: &str) -> Option<&'static Code> {
    let c = code_of(text)?;
    CODES.iter().find(|k| k.code == c)
}

/// How to handle an error whose text (with its sources) is `text`.
pub fn classify(text: &str) -> Class {
    known(text).map_or(Class::Transient, |k| k.class)
}

/// The text of an error and every source below it, so a code wrapped by the client
/// (`bad response: Code: …`) is found.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Exponential backoff: 100 ms doubling to at most 5 s.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// The next delay.
    pub fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Error texts as the two versions print them (18.16 captured from the test
    // server; 26.9 in its documented format).
    const V18_UNKNOWN_TABLE: &str = "bad response: Code: 60, e.displayText() = DB::Exception: Table tally.nope doesn't exist., e.what() = DB::Exception";
    const V26_UNKNOWN_TABLE: &str = "bad response: Code: 60. DB::Exception: Table tally.nope does not exist. (UNKNOWN_TABLE) (version 26.9.1.1)";
    const V18_PARSE: &str = "Code: 6, e.displayText() = DB::Exception: Cannot parse string 'abc' as UInt32: syntax error at begin of string.: while pushing to view probe.v, e.what() = DB::Exception";
    const V26_MEMORY: &str = "Code: 241. DB::Exception: Memory limit (total) exceeded: would use 9.31 GiB. (MEMORY_LIMIT_EXCEEDED) (version 26.9.1.1)";
    const V18_PARTS: &str = "Code: 252, e.displayText() = DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts., e.what() = DB::Exception";

    #[test]
    fn codes_are_read_from_both_versions_formats() {
        assert_eq!(code_of(V18_UNKNOWN_TABLE), Some(60));
        assert_eq!(code_of(V26_UNKNOWN_TABLE), Some(60));
        assert_eq!(code_of(V18_PARSE), Some(6));
        assert_eq!(code_of(V26_MEMORY), Some(241));
        assert_eq!(code_of("network error: connection refused"), None);
        assert_eq!(code_of("Code: x"), None);
    }

    #[test]
    fn the_issue_s_transient_cases_are_retried() {
        for (text, name) in [
            (V26_MEMORY, "MEMORY_LIMIT_EXCEEDED"),
            (V18_PARTS, "TOO_MANY_PARTS"),
            (
                "Code: 242, e.displayText() = DB::Exception: Table is in readonly mode",
                "TABLE_IS_READ_ONLY",
            ),
        ] {
            assert_eq!(classify(text), Class::Transient, "{text}");
            assert_eq!(known(text).unwrap().name, name);
        }
        assert_eq!(
            classify("network error: connection refused"),
            Class::Transient
        );
        assert_eq!(
            classify("Code: 12345. DB::Exception: new in a later version"),
            Class::Transient
        );
    }

    #[test]
    fn refused_values_split_and_a_wrong_setup_stops_with_the_fix() {
        assert_eq!(classify(V18_PARSE), Class::Data);
        assert_eq!(classify(V18_UNKNOWN_TABLE), Class::Config);
        assert_eq!(classify(V26_UNKNOWN_TABLE), Class::Config);
        assert!(
            known(V26_UNKNOWN_TABLE)
                .unwrap()
                .fix
                .contains("--clickhouse-database")
        );
        assert_eq!(
            classify("Code: 516. DB::Exception: default: Authentication failed"),
            Class::Config
        );
        assert_eq!(
            classify("Code: 193, e.displayText() = DB::Exception: Wrong password for user default"),
            Class::Config
        );
    }

    #[test]
    fn the_table_has_one_entry_per_code_and_every_config_entry_a_fix() {
        let mut seen = std::collections::HashSet::new();
        for c in CODES {
            assert!(seen.insert(c.code), "code {} listed twice", c.code);
            assert_eq!(c.class == Class::Config, !c.fix.is_empty(), "{}", c.name);
        }
    }

    #[test]
    fn backoff_doubles_to_five_seconds() {
        let mut b = Backoff::default();
        let d: Vec<u64> = (0..8).map(|_| b.delay().as_millis() as u64).collect();
        assert_eq!(d, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
