//! The command line, and where the server and the token come from.
use std::path::PathBuf;

use chrono::{DateTime, Duration, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// kubectl tally: usage of tally meters (https://…/tally's README, "kubectl tally").
#[derive(Parser, Debug)]
#[command(name = "kubectl tally", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Where the server is, and the token.
    #[command(flatten)]
    pub connection: Connection,
    /// The namespace of the meters (default: the token's first namespace).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// How to print the answer.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl Cli {
    /// The namespace asked for with `-n`.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Usage of a meter per window, subject and group-by value.
    Usage(UsageArgs),
    /// The subjects with the most usage of a meter.
    Top(TopArgs),
    /// Whether every source feeding a meter has delivered a range, and who is behind.
    Completeness(CompletenessArgs),
    /// The meters this token can read.
    Meters,
    /// The UsageBudgets of the cluster (kubeconfig), with usage / limit this period.
    Budgets,
}

/// `usage`.
#[derive(Args, Debug)]
pub struct UsageArgs {
    /// The meter (its slug, or the Meter's name).
    pub meter: String,
    /// Only this subject (repeatable).
    #[arg(long = "subject")]
    pub subjects: Vec<String>,
    /// Group by a groupBy of the meter, or `subject` (repeatable).
    #[arg(long = "group-by")]
    pub group_by: Vec<String>,
    /// One row per window: MINUTE, HOUR, DAY or MONTH (default: one row for the range).
    #[arg(long, value_parser = ["MINUTE", "HOUR", "DAY", "MONTH"], ignore_case = true)]
    pub window: Option<String>,
    /// The IANA time zone windows align to and times print in (default UTC).
    #[arg(long)]
    pub tz: Option<String>,
    #[command(flatten)]
    pub range: Range,
}

/// `top`.
#[derive(Args, Debug)]
pub struct TopArgs {
    /// The meter (its slug, or the Meter's name).
    pub meter: String,
    /// How many subjects.
    #[arg(long, default_value_t = 10)]
    pub limit: usize,
    #[command(flatten)]
    pub range: Range,
}

/// `completeness`.
#[derive(Args, Debug)]
pub struct CompletenessArgs {
    /// The meter (its slug, or the Meter's name).
    pub meter: String,
    #[command(flatten)]
    pub range: Range,
}

/// The time range of a query.
#[derive(Args, Debug)]
pub struct Range {
    /// Start (RFC 3339, inclusive).
    #[arg(long, conflicts_with = "last")]
    pub from: Option<String>,
    /// End (RFC 3339, exclusive; default now).
    #[arg(long, conflicts_with = "last")]
    pub to: Option<String>,
    /// The last DURATION up to now: e.g. 30m, 12h, 7d, 4w.
    #[arg(long)]
    pub last: Option<String>,
}

impl Range {
    /// The query parameters of this range and the other options.
    pub fn params(
        &self,
        window: Option<&str>,
        tz: Option<&str>,
        subjects: &[String],
        group_by: &[String],
    ) -> Result<Vec<(String, String)>, String> {
        let mut p = Vec::new();
        if let Some(last) = &self.last {
            let d = parse_duration(last)?;
            let now = Utc::now();
            p.push(("from".into(), rfc3339(now - d)));
            p.push(("to".into(), rfc3339(now)));
        }
        for (name, value) in [("from", &self.from), ("to", &self.to)] {
            if let Some(v) = value {
                DateTime::parse_from_rfc3339(v).map_err(|e| {
                    format!("--{name} {v:?}: not an RFC 3339 time like 2026-11-01T00:00:00Z ({e})")
                })?;
                p.push((name.into(), v.clone()));
            }
        }
        if let Some(w) = window {
            p.push(("windowSize".into(), w.to_ascii_uppercase()));
        }
        if let Some(tz) = tz {
            p.push(("windowTimeZone".into(), tz.to_string()));
        }
        p.extend(subjects.iter().map(|s| ("subject".into(), s.clone())));
        p.extend(group_by.iter().map(|g| ("groupBy".into(), g.clone())));
        Ok(p)
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `30m`, `12h`, `7d`, `4w` (one number and one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("--last {s:?}: give a number and a unit, like 30m, 12h, 7d or 4w");
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num.parse().map_err(|_| bad())?;
    if n <= 0 {
        return Err(bad());
    }
    match unit {
        "m" => Ok(Duration::minutes(n)),
        "h" => Ok(Duration::hours(n)),
        "d" => Ok(Duration::days(n)),
        "w" => Ok(Duration::weeks(n)),
        _ => Err(bad()),
    }
}

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// The server's JSON answer.
    Json,
    /// The server's CSV answer (`usage` only; `top` and `meters` print CSV themselves).
    Csv,
}

/// Where the server is.
#[derive(Args, Debug)]
pub struct Connection {
    /// tally's API (default: TALLY_SERVER, else the kubeconfig context's `tally.dev`
    /// extension).
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// A file holding the API token (default: TALLY_TOKEN, else the extension's
    /// `tokenFile`).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
}

/// The server and token in force.
#[derive(Debug)]
pub struct Target {
    pub server: String,
    pub token: Option<String>,
}

/// `{server, tokenFile}` of the current kubeconfig context's `tally.dev` extension.
fn kubeconfig_extension() -> (Option<String>, Option<PathBuf>) {
    let Ok(config) = kube::config::Kubeconfig::read() else {
        return (None, None);
    };
    let current = config.current_context.clone().unwrap_or_default();
    let ext = config
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.extensions.as_ref())
        .and_then(|list| list.iter().find(|e| e.name == "tally.dev"))
        .map(|e| e.extension.clone());
    let Some(ext) = ext else {
        return (None, None);
    };
    (
        ext["server"].as_str().map(String::from),
        ext["tokenFile"].as_str().map(PathBuf::from),
    )
}

impl Target {
    /// From the flags, the environment and the kubeconfig, in that order.
    pub fn resolve(c: &Connection) -> Result<Target, String> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (ext_server, ext_token) = if c.server.is_some() && c.token_file.is_some() {
            (None, None)
        } else {
            kubeconfig_extension()
        };
        let server = c
            .server
            .clone()
            .or_else(|| env("TALLY_SERVER"))
            .or(ext_server)
            .ok_or(
                "no tally server: pass --server http://HOST:PORT, set TALLY_SERVER, or add a `tally.dev` extension ({server, tokenFile}) to your kubeconfig context; for a cluster, `kubectl port-forward -n tally svc/tally-server 8080` and --server http://localhost:8080",
            )?;
        if !server.starts_with("http://") && !server.starts_with("https://") {
            return Err(format!(
                "--server {server:?}: give a URL like http://localhost:8080"
            ));
        }
        let token_file = c.token_file.clone();
        let token = match token_file {
            Some(path) => Some(read_token(&path, "--token-file")?),
            None => match env("TALLY_TOKEN") {
                Some(t) => Some(t.trim().to_string()),
                None => match ext_token {
                    Some(path) => Some(read_token(&path, "the kubeconfig's tokenFile")?),
                    None => None,
                },
            },
        };
        Ok(Target { server, token })
    }
}

fn read_token(path: &PathBuf, what: &str) -> Result<String, String> {
    let t = std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(format!("{what} {} is empty", path.display()));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_one_number_and_one_unit() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::minutes(30));
        assert_eq!(parse_duration("7d").unwrap(), Duration::days(7));
        assert_eq!(parse_duration("4w").unwrap(), Duration::weeks(4));
        for bad in ["", "d", "7", "7y", "-1d", "0h", "1.5h"] {
            assert!(parse_duration(bad).unwrap_err().contains("--last"), "{bad}");
        }
    }
}
