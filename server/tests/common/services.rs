//! Kafka (tansu) and ClickHouse for integration tests: the shared instances `make
//! services` starts, private ClickHouse instances for tests that kill it, and the sink
//! binary as a child process.
#![allow(dead_code)]
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{free_port, repo};

/// Where the shared services are.
#[derive(Clone, Debug)]
pub struct Services {
    pub kafka: String,
    /// ClickHouse 18.16 (`TALLY_TEST_CLICKHOUSE`, default :8123).
    pub clickhouse: String,
    /// ClickHouse 26.9 (`TALLY_TEST_CLICKHOUSE_26`, default :8124).
    pub clickhouse26: String,
}

fn reachable_tcp(addr: &str) -> bool {
    addr.parse()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok())
        .is_some()
}

fn clickhouse_ping(url: &str) -> bool {
    http_get(url, "/ping").is_some_and(|body| body.contains("Ok."))
}

/// The body of a successful `GET <path>` (already URL-encoded) over plain HTTP/1.0, or
/// `None` (no reqwest: the kit's waits are synchronous).
fn http_get(url: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let host = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.lines()
        .next()?
        .contains(" 200 ")
        .then(|| body.to_string())
}

/// The shared services, or `None` after printing why the test is skipped. Under `CI`
/// a missing service fails the test instead: CI never passes by skipping.
pub fn services(test: &str) -> Option<Services> {
    let kafka = std::env::var("TALLY_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let clickhouse =
        std::env::var("TALLY_TEST_CLICKHOUSE").unwrap_or_else(|_| "http://127.0.0.1:8123".into());
    let clickhouse26 = std::env::var("TALLY_TEST_CLICKHOUSE_26")
        .unwrap_or_else(|_| "http://127.0.0.1:8124".into());
    let mut missing = Vec::new();
    if !reachable_tcp(&kafka) {
        missing.push(format!("Kafka at {kafka}"));
    }
    if !clickhouse_ping(&clickhouse) {
        missing.push(format!("ClickHouse 18.16 at {clickhouse}"));
    }
    if !clickhouse_ping(&clickhouse26) {
        missing.push(format!("ClickHouse 26.9 at {clickhouse26}"));
    }
    if missing.is_empty() {
        return Some(Services {
            kafka,
            clickhouse,
            clickhouse26,
        });
    }
    let why = format!(
        "{test}: {} not reachable (start them with `make services`)",
        missing.join(" and ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI must not skip");
    }
    eprintln!("SKIPPED {why}");
    None
}

/// A name unique to this test process and call, usable as a database or topic name.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// Runs SQL over ClickHouse's HTTP interface and returns the body (TabSeparated).
pub async fn ch(url: &str, sql: &str) -> String {
    let res = super::client()
        .post(url)
        .body(sql.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("ClickHouse at {url}: {e}"));
    let status = res.status();
    let text = res.text().await.unwrap();
    assert!(status.is_success(), "{sql}\n→ {status}: {text}");
    text
}

/// Waits up to 30 s until the count `sql` answers 0; panics saying `what` did not happen.
pub async fn until_zero(url: &str, what: &str, sql: String) {
    super::eventually_within(Duration::from_secs(30), what, async || {
        ch(url, &sql).await.trim() == "0"
    })
    .await
}

/// A private ClickHouse server (for tests that kill it), stopped by PID on drop.
pub struct PrivateClickHouse {
    child: Option<Child>,
    pub url: String,
    dir: tempfile::TempDir,
    http: u16,
    tcp: u16,
    v26: bool,
}

/// The Python that runs ClickHouse 26.9 (`scripts/services.sh install` makes it).
fn chdb_python() -> PathBuf {
    let tools = std::env::var_os("TALLY_TOOLS").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/tally-tools"),
        PathBuf::from,
    );
    tools.join("chdb-venv/bin/python")
}

impl PrivateClickHouse {
    /// ClickHouse 26.9 (`scripts/clickhouse26.py`) on its own data dir and ports.
    pub fn start26() -> PrivateClickHouse {
        PrivateClickHouse::launch(true)
    }

    /// ClickHouse 18.16 (Debian's clickhouse-server).
    pub fn start() -> PrivateClickHouse {
        PrivateClickHouse::launch(false)
    }

    /// ClickHouse 18.16 on `http`/`tcp` with `extra` as `config.d/extra.xml` (e.g. a
    /// cluster's replication settings).
    pub fn launch_with(http: u16, tcp: u16, extra: &str) -> PrivateClickHouse {
        PrivateClickHouse::launch_on(false, http, tcp, extra)
    }

    fn launch(v26: bool) -> PrivateClickHouse {
        PrivateClickHouse::launch_on(v26, free_port(), free_port(), "")
    }

    fn launch_on(v26: bool, http: u16, tcp: u16, extra: &str) -> PrivateClickHouse {
        let dir = tempfile::tempdir().unwrap();
        if !extra.is_empty() {
            std::fs::create_dir_all(dir.path().join("config.d")).unwrap();
            std::fs::write(dir.path().join("config.d/extra.xml"), extra).unwrap();
        }
        if !v26 {
            let ok = Command::new(repo().join("scripts/services.sh"))
                .args(["clickhouse-config"])
                .arg(dir.path())
                .args([http.to_string(), tcp.to_string()])
                .status()
                .unwrap();
            assert!(ok.success(), "writing a ClickHouse config failed");
        }
        let mut ch = PrivateClickHouse {
            child: None,
            url: format!("http://127.0.0.1:{http}"),
            dir,
            http,
            tcp,
            v26,
        };
        ch.spawn();
        ch
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("stdout.log")).unwrap();
        let mut cmd = if self.v26 {
            let mut c = Command::new(chdb_python());
            c.arg(repo().join("scripts/clickhouse26.py"))
                .arg(self.dir.path().join("data26"))
                .args([self.http.to_string(), self.tcp.to_string()]);
            c
        } else {
            let mut c = Command::new("/usr/sbin/clickhouse-server");
            c.arg(format!(
                "--config-file={}",
                self.dir.path().join("config.xml").display()
            ));
            c
        };
        let child = cmd
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("clickhouse-server starts");
        self.child = Some(child);
        let url = self.url.clone();
        super::wait_for(
            Duration::from_secs(60),
            &format!("answering on {url} (private ClickHouse)"),
            || clickhouse_ping(&url),
        );
    }

    /// Waits until this server has a ZooKeeper session (it answers a query of
    /// `system.zookeeper`). ClickHouse 18.16's DDL worker dereferences a null session
    /// when its first ZooKeeper connection fails (a segfault seen here about once in
    /// ten cluster starts, `DDLWorker::run` → `zkutil::ZooKeeper::createImpl`); a server
    /// that died so is started again, on the same data, before the test begins.
    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    fn until_zookeeper_session(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self.exited() {
                eprintln!(
                    "ClickHouse at {} died at start (18.16's DDL worker without a ZooKeeper session); starting it again",
                    self.url
                );
                self.spawn();
            }
            if http_get(
                &self.url,
                "/?query=SELECT%20count()%20FROM%20system.zookeeper%20WHERE%20path%20%3D%20'%2F'",
            )
            .is_some_and(|body| body.trim().parse::<u64>().is_ok())
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ClickHouse at {} has no ZooKeeper session after 60 s",
                self.url
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL; returns once the process is gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same data.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `tally-server sink` as a child process.
pub struct SinkProcess {
    child: Option<Child>,
    args: Vec<String>,
    /// Where the current start's output begins in `log`.
    log_start: usize,
    env: Vec<(String, String)>,
    pub log: PathBuf,
    starts: u32,
    _dir: tempfile::TempDir,
}

impl SinkProcess {
    pub fn start(
        kafka: &str,
        clickhouse: &str,
        database: &str,
        topic: &str,
        extra: &[&str],
    ) -> SinkProcess {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = vec![
            "sink",
            "--kafka",
            kafka,
            "--clickhouse",
            clickhouse,
            "--clickhouse-database",
            database,
            "--topic",
            topic,
            "--group",
            database,
            "--cutover-grace-secs",
            "1",
            "--max-retry-secs",
            "120",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        // port 0: the sink announces the port it got (SinkProcess::metrics_url)
        args.extend(["--metrics-listen".to_string(), "127.0.0.1:0".to_string()]);
        if !extra.contains(&"--batch-ms") {
            args.extend(["--batch-ms".to_string(), "200".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = SinkProcess {
            child: None,
            log_start: 0,
            args,
            env: Vec::new(),
            log: dir.path().join("sink.log"),
            starts: 0,
            _dir: dir,
        };
        s.spawn();
        s
    }

    /// Restarts it with these extra environment variables (e.g. a fail point).
    pub fn restart_with(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    /// The current start's Prometheus endpoint, as it announced it.
    pub fn metrics_url(&mut self) -> String {
        let (log, from) = (self.log.clone(), self.log_start);
        let addr = tally_tests::announced(&log, "sink metrics", from, || !self.exited());
        format!("http://{addr}/metrics")
    }

    fn spawn(&mut self) {
        self.starts += 1;
        self.log_start = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tally-server"))
            .args(&self.args)
            .env(
                "RUST_LOG",
                format!(
                    "{},tally_runtime=info",
                    std::env::var("TALLY_TEST_LOG").unwrap_or_else(|_| "warn".into())
                ),
            )
            // after the default, so a test's own RUST_LOG wins
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("tally-server sink starts");
        self.child = Some(child);
    }

    /// Whether the process has exited (e.g. at a fail point).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// SIGTERM (the sink finishes its batch and leaves the consumer group), then wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The jars ZooKeeper 3.8 runs from (Debian's `zookeeper` package), or `None`.
fn zookeeper_classpath() -> Option<String> {
    let java = std::path::Path::new("/usr/share/java");
    let jars = [
        "zookeeper.jar",
        "zookeeper-jute.jar",
        "netty-all.jar",
        "slf4j-api.jar",
        "slf4j-simple.jar",
        "commons-cli.jar",
        "commons-io.jar",
        "metrics-core.jar",
        "snappy-java.jar",
    ];
    let paths: Vec<PathBuf> = jars.iter().map(|j| java.join(j)).collect();
    paths.iter().all(|p| p.exists()).then(|| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    })
}

/// Whether a replicated cluster can run here (ZooKeeper's jars, Java, clickhouse-server),
/// or `false` after printing why the test is skipped (under `CI` it fails instead).
pub fn cluster_available(test: &str) -> bool {
    let mut missing = Vec::new();
    if zookeeper_classpath().is_none() {
        missing.push("ZooKeeper (Debian's zookeeper package)");
    }
    if Command::new("java").arg("-version").output().is_err() {
        missing.push("java");
    }
    if !std::path::Path::new("/usr/sbin/clickhouse-server").exists() {
        missing.push("clickhouse-server 18.16");
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{test}: {} not installed (`make services` installs them)",
        missing.join(", ")
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI must not skip");
    }
    eprintln!("SKIPPED {why}");
    false
}

/// A ZooKeeper 3.8 server on loopback, on its own data dir; stopped by PID on drop.
pub struct ZooKeeper {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl ZooKeeper {
    pub fn start() -> ZooKeeper {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(
            dir.path().join("zoo.cfg"),
            format!(
                "tickTime=2000\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=ruok\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut zk = ZooKeeper {
            child: None,
            port,
            dir,
        };
        zk.spawn();
        zk
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("zookeeper.log"))
            .unwrap();
        let child = Command::new("java")
            .args(["-Xmx256m", "-cp"])
            .arg(format!(
                "{}:/etc/zookeeper/conf",
                zookeeper_classpath().expect("checked by cluster_available")
            ))
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(self.dir.path().join("zoo.cfg"))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("java starts ZooKeeper");
        self.child = Some(child);
        let port = self.port;
        super::wait_for(
            Duration::from_secs(60),
            &format!("ZooKeeper answering imok on 127.0.0.1:{port}"),
            || zookeeper_ok(port),
        );
    }

    /// SIGKILL, then start again on the same data.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn zookeeper_ok(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"ruok").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("imok")
}

/// A replicated, sharded ClickHouse 18.16 cluster named `c1` on loopback: `shards` ×
/// `replicas` servers, each with its own config, data dir, ports, `{shard}`/`{replica}`
/// macros, `interserver_http_host` 127.0.0.1, and the ZooKeeper at `zk_port`.
pub struct ClickHouseCluster {
    /// `servers[shard][replica]`, each a private server.
    pub servers: Vec<Vec<PrivateClickHouse>>,
}

impl Drop for ClickHouseCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("ClickHouse cluster logs:\n{}", self.logs());
        }
    }
}

impl ClickHouseCluster {
    pub fn start(shards: usize, replicas: usize, zk_port: u16) -> ClickHouseCluster {
        let ports: Vec<Vec<(u16, u16, u16)>> = (0..shards)
            .map(|_| {
                (0..replicas)
                    .map(|_| (free_port(), free_port(), free_port()))
                    .collect()
            })
            .collect();
        let remote: String = ports
            .iter()
            .map(|shard| {
                let reps: String = shard
                    .iter()
                    .map(|(_, tcp, _)| {
                        format!("<replica><host>127.0.0.1</host><port>{tcp}</port></replica>")
                    })
                    .collect();
                format!("<shard><internal_replication>true</internal_replication>{reps}</shard>")
            })
            .collect();
        let servers = ports
            .iter()
            .enumerate()
            .map(|(s, shard)| {
                shard
                    .iter()
                    .enumerate()
                    .map(|(r, &(http, tcp, inter))| {
                        let extra = format!(
                            "<yandex>\n  <interserver_http_port>{inter}</interserver_http_port>\n  \
                             <interserver_http_host>127.0.0.1</interserver_http_host>\n  \
                             <zookeeper><node><host>127.0.0.1</host><port>{zk_port}</port></node></zookeeper>\n  \
                             <macros><shard>{:02}</shard><replica>r{}</replica></macros>\n  \
                             <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>\n  \
                             <remote_servers><c1>{remote}</c1></remote_servers>\n</yandex>\n",
                            s + 1,
                            r + 1
                        );
                        PrivateClickHouse::launch_with(http, tcp, &extra)
                    })
                    .collect()
            })
            .collect();
        let mut cluster = ClickHouseCluster { servers };
        // every server has a ZooKeeper session and is still alive 2 s later (see
        // `until_zookeeper_session`: 18.16 can crash just after start)
        loop {
            for server in cluster.servers.iter_mut().flatten() {
                server.until_zookeeper_session();
            }
            std::thread::sleep(Duration::from_secs(2));
            if cluster.servers.iter_mut().flatten().all(|s| !s.exited()) {
                return cluster;
            }
        }
    }

    /// The end of each server's error log and output (for a failing test's message).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for s in self.servers.iter().flatten() {
            for f in ["log/error.log", "stdout.log"] {
                let text = std::fs::read_to_string(s.dir.path().join(f)).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                out.push_str(&format!("--- {} {f}:\n{tail}\n", s.url));
            }
        }
        out
    }

    /// Every replica's URL, shard by shard (the sink's `--clickhouse-replica-urls`).
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .flatten()
            .map(|s| s.url.clone())
            .collect()
    }
}
