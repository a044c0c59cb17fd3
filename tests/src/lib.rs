//! tally's test kit: locating the workspace's binaries and running them as real
//! processes bound to 127.0.0.1, stopped by PID.
//!
//! Binaries come from a build step, not `CARGO_BIN_EXE_*` (which only sees one
//! package's binaries): [`bin`] runs `cargo build` for the workspace's binaries once
//! per test process (a no-op when `make test` already built them) and returns the path.
//!
//! [`kube`] starts the real Kubernetes control plane tests run against (or connects to
//! `TALLY_KUBECONFIG`'s) and plays the scheduler and kubelets.
#![forbid(unsafe_code)]

pub mod kube;
pub mod stack;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo test");
    Path::new(&dir).join("..")
}

fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(repo())
        .output()
        .expect("cargo metadata runs");
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    PathBuf::from(meta["target_directory"].as_str().expect("target_directory"))
}

/// Path of a workspace binary (`tally-server`, `tally-agent`), debug build, built if
/// needed.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    built(&BUILT, false).join(name)
}

/// Path of a workspace binary, release build (for benchmarks), built if needed.
pub fn release_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    built(&BUILT, true).join(name)
}

fn built(once: &OnceLock<PathBuf>, release: bool) -> &Path {
    once.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "--workspace", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        let ok = cmd
            .current_dir(repo())
            .status()
            .expect("cargo build runs")
            .success();
        assert!(ok, "building the workspace's binaries failed");
        target_dir().join(if release { "release" } else { "debug" })
    })
}

/// Polls `probe` every `every` until it returns `Some`, failing the test after `limit`
/// with what it waited for (the async twin of [`wait_for`]).
pub async fn eventually<T>(
    limit: Duration,
    every: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

/// The address a tally binary announced for `what` in `log` after byte `from`: the line
/// `<what> listening on addr=HOST:PORT` that tally-runtime logs once it has bound
/// (so a binary started on port 0 is found, and it is our process that listens, not
/// whatever else holds a port). Waits up to 60 s (a server may wait for Kafka's topic
/// first), failing early when `alive` says the
/// process exited. The binary must log `tally_runtime=info`.
pub fn announced(log: &Path, what: &str, from: usize, mut alive: impl FnMut() -> bool) -> String {
    let needle = format!("{what} listening on addr=");
    let start = Instant::now();
    loop {
        let text = std::fs::read(log).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
        if let Some(at) = text.find(&needle) {
            let rest = &text[at + needle.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '\u{1b}')
                .unwrap_or(rest.len());
            return rest[..end].to_string();
        }
        assert!(
            alive(),
            "the process exited before announcing {what}:\n{}",
            text.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} was not announced within 60 s in {}:\n{}",
            log.display(),
            text.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The log filter for a tally binary under test: warnings, plus the admin server's
/// announcement [`announced`] reads.
pub const TEST_LOG: &str = "warn,tally_runtime=info";

/// Starts `tally-operator` (`program`) against `kubeconfig`, its Lease in `namespace`,
/// serving `/metrics` on a port of its choosing (port 0), logging to `log`; returns the
/// process and the metrics address it announced.
pub fn start_operator(
    program: PathBuf,
    kubeconfig: &Path,
    namespace: &str,
    args: &[&str],
    log: PathBuf,
) -> (Proc, String) {
    let mut all = vec!["--metrics-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let envs = [
        ("KUBECONFIG", kubeconfig.to_str().expect("UTF-8 path")),
        ("POD_NAMESPACE", namespace),
        ("RUST_LOG", "info"),
    ];
    let mut proc = Proc::start(program, &all, &envs, log);
    let metrics = proc.announced("operator metrics", 0);
    (proc, metrics)
}

/// Says, on the test process's own stderr (not the harness's captured output, so a
/// passing test's skip shows in the log), that a part of a test is skipped and why;
/// under `CI` it fails the test instead: CI never passes by skipping.
pub fn skip(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI must not skip");
    }
    say(&format!("SKIPPED {why}"));
}

/// Writes a line to the process's stderr past the test harness's capture (for facts
/// a passing run's log should show, like the control plane's version).
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `ready` every 50 ms until it is true; panics naming `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process of ours, with its output in a log file; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `program args…`, appending its output to `log`.
    pub fn start(program: PathBuf, args: &[&str], envs: &[(&str, &str)], log: PathBuf) -> Proc {
        let mut p = Proc {
            program,
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log,
            child: None,
        };
        p.spawn();
        p
    }

    /// Starts it again (after [`Proc::kill9`] or [`Proc::terminate`]).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", self.program.display()));
        self.child = Some(child);
    }

    /// The PID of the running process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        signal(c.id(), libc::SIGTERM);
        c.wait().is_ok_and(|s| s.success())
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Bytes in the log so far (where the next start's output begins).
    pub fn log_len(&self) -> usize {
        std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize)
    }

    /// Whether the process is running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The address it announced for `what` after log byte `from` ([`announced`]).
    pub fn announced(&mut self, what: &str, from: usize) -> String {
        let log = self.log.clone();
        announced(&log, what, from, || self.running())
    }

    /// Replaces argument `old` by `new` for the next starts (e.g. port 0 by the port
    /// it got, so a restart listens where clients already send).
    pub fn replace_arg(&mut self, old: &str, new: &str) {
        for a in &mut self.args {
            if a == old {
                *a = new.to_string();
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn signal(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Resident memory of a process in bytes (`/proc/<pid>/status` VmRSS).
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Anonymous and file-backed resident memory of a process in bytes (`RssAnon`,
/// `RssFile`): heap and stacks versus the binary's mapped code.
pub fn rss_split_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("RssAnon:"), field("RssFile:"))
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
pub fn cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the ')'.
    let total = ticks(11) + ticks(12);
    Duration::from_millis(total * 10) // USER_HZ is 100 on Linux
}

/// A standalone `tally-server` (embedded store) on a free 127.0.0.1 port, its data and
/// log in a folder of the test's; it can be killed and started again on the same port
/// and data.
#[derive(Debug)]
pub struct Standalone {
    /// `127.0.0.1:port`.
    pub addr: String,
    proc: Proc,
}

impl Standalone {
    /// Starts a server over `manifests`, keeping its data and log in `dir`, and waits
    /// until it listens.
    pub fn start(dir: &Path, manifests: &Path) -> Standalone {
        Standalone::start_with(dir, manifests, &[])
    }

    /// [`Standalone::start`] with more arguments.
    pub fn start_with(dir: &Path, manifests: &Path, extra: &[&str]) -> Standalone {
        let data = dir.join("data");
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().expect("UTF-8 path"),
            "--manifests",
            manifests.to_str().expect("UTF-8 path"),
        ];
        args.extend_from_slice(extra);
        let mut proc = Proc::start(
            bin("tally-server"),
            &args,
            &[("RUST_LOG", TEST_LOG)],
            dir.join("server.log"),
        );
        let addr = proc.announced("the API", 0);
        // restarts listen where the agents already send
        proc.replace_arg("127.0.0.1:0", &addr);
        Standalone { addr, proc }
    }

    /// Starts a server whose only manifest is `meter` (written to `dir/manifests`).
    pub fn with_meter(dir: &Path, meter: &str) -> Standalone {
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        std::fs::write(manifests.join("meter.yaml"), meter).unwrap();
        Standalone::start(dir, &manifests)
    }

    /// SIGKILL (an ingest outage).
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts it again on the same port and data, and waits until it listens.
    pub fn restart(&mut self) {
        let from = self.proc.log_len();
        self.proc.spawn();
        let addr = self.proc.announced("the API", from);
        assert_eq!(addr, self.addr, "the restarted server listens where it did");
    }
}

/// Usage per subject of meter `slug` in `namespace`, over all time
/// (`…/query?groupBy=subject`); `None` while the server does not answer.
pub async fn subject_totals(
    client: &reqwest::Client,
    addr: &str,
    namespace: &str,
    slug: &str,
) -> Option<std::collections::BTreeMap<String, u64>> {
    group_totals(client, addr, (namespace, slug), "subject")
        .await
        .ok()
}

/// Totals by `dim` (a groupBy key, or `subject`) of meter `slug` in `namespace`, over
/// all time; `Err` with the HTTP status and body when the server does not answer.
pub async fn group_totals(
    http: &reqwest::Client,
    server: &str,
    (namespace, slug): (&str, &str),
    dim: &str,
) -> Result<std::collections::BTreeMap<String, u64>, String> {
    let url =
        format!("http://{server}/api/v1/namespaces/{namespace}/meters/{slug}/query?groupBy={dim}");
    let r = http.get(url).send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!(
            "{} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let body: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
    Ok(body["data"]
        .as_array()
        .ok_or_else(|| format!("no data in {body}"))?
        .iter()
        .map(|row| {
            let key = row["groupBy"][dim]
                .as_str()
                .or(row[dim].as_str())
                .unwrap_or_default()
                .to_string();
            (key, row["value"].as_f64().unwrap_or_default() as u64)
        })
        .collect())
}

/// Polls `subject_totals` every 300 ms until it equals `expected` or `limit` passes;
/// returns the last answer for the caller to assert on.
pub async fn await_subject_totals(
    client: &reqwest::Client,
    addr: &str,
    (namespace, slug): (&str, &str),
    expected: &std::collections::BTreeMap<String, u64>,
    limit: Duration,
) -> Option<std::collections::BTreeMap<String, u64>> {
    let deadline = Instant::now() + limit;
    loop {
        let got = subject_totals(client, addr, namespace, slug).await;
        if got.as_ref() == Some(expected) || Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The Kafka broker of `make services` (or `TALLY_TEST_KAFKA`), or `None` after
/// printing why the test is skipped. Under `CI` a missing broker fails the test
/// instead: CI never passes by skipping.
pub fn kafka(test: &str) -> Option<String> {
    let addr = std::env::var("TALLY_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let up = addr
        .parse()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok())
        .is_some();
    if up {
        return Some(addr);
    }
    let why = format!("{test}: Kafka at {addr} not reachable (start it with `make services`)");
    skip(&why);
    None
}

/// A test's temporary folder, kept (not deleted) when `TALLY_KEEP_LOGS` is set, so
/// the logs of a failed run can be read.
#[derive(Debug)]
pub struct KeptDir(pub Option<tempfile::TempDir>);

impl KeptDir {
    /// The folder.
    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Drop for KeptDir {
    fn drop(&mut self) {
        if std::env::var_os("TALLY_KEEP_LOGS").is_some()
            && let Some(d) = self.0.take()
        {
            let _ = d.keep();
        }
    }
}

/// The ClickHouse of `make services` (or `TALLY_TEST_CLICKHOUSE`), as an HTTP URL, or
/// `None` after printing why the test is skipped (under `CI`, a failure instead).
pub fn clickhouse(test: &str) -> Option<String> {
    let url =
        std::env::var("TALLY_TEST_CLICKHOUSE").unwrap_or_else(|_| "http://127.0.0.1:8123".into());
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    let up = host
        .parse()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok())
        .is_some();
    if up {
        return Some(url);
    }
    let why = format!("{test}: ClickHouse at {url} not reachable (start it with `make services`)");
    skip(&why);
    None
}

/// Runs `sql` on ClickHouse at `url` and returns the trimmed text answer.
pub async fn ch_query(client: &reqwest::Client, url: &str, sql: &str) -> String {
    let r = client
        .post(url)
        .body(sql.to_string())
        .send()
        .await
        .expect("ClickHouse answers");
    let ok = r.status().is_success();
    let text = r.text().await.unwrap_or_default();
    assert!(ok, "ClickHouse refused {sql}: {text}");
    text.trim().to_string()
}

/// Subjects of [`write_usage_lines`].
pub const USERS: [&str; 3] = ["acme", "globex", "initech"];

/// Appends JSON usage lines `from..to` (`{"n", "user", "tokens"}`) to `file`, a few at a
/// time, adding each line's tokens to `expected[user]`.
pub fn write_usage_lines(
    file: &Path,
    from: u64,
    to: u64,
    expected: &mut std::collections::BTreeMap<String, u64>,
) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .unwrap();
    for i in from..to {
        let user = USERS[(i % 3) as usize];
        let tokens = i % 97 + 1;
        writeln!(
            f,
            "{{\"n\": {i}, \"user\": \"{user}\", \"tokens\": {tokens}}}"
        )
        .unwrap();
        *expected.entry(user.to_string()).or_default() += tokens;
        if i % 25 == 0 {
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An agent configuration with one `logs` collector (namespace `team-a`, name
/// `app-logs`, event type `llm-tokens`) reading `<logs>/*.log*` as JSON lines, subject
/// `$.user`, data `tokens`; `sink` is the YAML of the sink block.
pub fn log_agent_config(sink: &str, spool: &Path, metrics: &str, logs: &Path) -> String {
    format!(
        "sink:\n  {sink}\nspool: {{path: '{}'}}\nmetricsListen: '{metrics}'\ncollectors:\n- namespace: team-a\n  name: app-logs\n  spec:\n    eventType: llm-tokens\n    logs:\n      paths: ['{}/*.log*']\n      parser: {{kind: json}}\n      mapping: {{subject: $.user, data: {{tokens: $.tokens}}}}\n",
        spool.display(),
        logs.display()
    )
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

/// RFC 3339 (UTC, seconds) of Unix seconds, as Kubernetes writes times; the civil date
/// comes from Howard Hinnant's days-from-civil inverse, so the kit needs no chrono.
pub fn rfc3339(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86400), t.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }
}
