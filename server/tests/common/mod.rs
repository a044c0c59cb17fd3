//! Runs the real `tally-server` binary on 127.0.0.1 with a private data folder and
//! stops it by PID.
#![allow(dead_code)]
pub mod services;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Server {
    child: Option<Child>,
    pub addr: String,
    pub data: PathBuf,
    pub manifests: PathBuf,
    extra: Vec<String>,
    /// Environment of the next start.
    pub env: Vec<(String, String)>,
    starts: u32,
    _tmp: Option<tempfile::TempDir>,
}

/// The repository root, read at run time so a test binary reused from another
/// checkout still reads this checkout's files.
pub fn repo() -> PathBuf {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo test");
    Path::new(&dir).join("..")
}

pub use tally_tests::free_port;

impl Server {
    /// A server over a fresh folder whose manifests dir holds `manifests` (file name, YAML).
    pub fn start(manifests: &[(&str, &str)], extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let mdir = tmp.path().join("manifests");
        std::fs::create_dir_all(&mdir).unwrap();
        for (name, text) in manifests {
            std::fs::write(mdir.join(name), text).unwrap();
        }
        Server::launch(tmp, mdir, extra)
    }

    /// A server over the repository's quickstart manifests.
    pub fn quickstart() -> Server {
        let mdir = repo().join("examples/quickstart");
        Server::launch(tempfile::tempdir().unwrap(), mdir, &[])
    }

    /// Starts a server whose data lives in `tmp` and which reads `manifests`.
    fn launch(tmp: tempfile::TempDir, manifests: PathBuf, extra: &[&str]) -> Server {
        let mut s = Server {
            child: None,
            addr: String::new(),
            data: tmp.path().join("data"),
            manifests,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            starts: 0,
            _tmp: Some(tmp),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        // port 0: the server picks a free port and announces it
        self.starts += 1;
        let log_path = self.data.with_extension(format!("{}.log", self.starts));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tally-server"))
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(&self.data)
            .arg("--manifests")
            .arg(&self.manifests)
            .args(["--reload-interval-ms", "100"])
            .args(&self.extra)
            .env("RUST_LOG", tally_tests::TEST_LOG)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("tally-server starts");
        let mut child = Some(child);
        self.addr = tally_tests::announced(&log_path, "the API", 0, || {
            child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_none())
        });
        self.child = child;
    }

    /// A server like [`Server::start`] with `env` set for its first start.
    pub fn start_with_env(
        manifests: &[(&str, &str)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let mdir = tmp.path().join("manifests");
        std::fs::create_dir_all(&mdir).unwrap();
        for (name, text) in manifests {
            std::fs::write(mdir.join(name), text).unwrap();
        }
        let mut s = Server {
            child: None,
            addr: String::new(),
            data: tmp.path().join("data"),
            manifests: mdir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            starts: 0,
            _tmp: Some(tmp),
        };
        s.spawn();
        s
    }

    /// Waits up to `limit` for the process to exit by itself; whether it did.
    pub fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && c.try_wait().ok().flatten().is_some()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Starts it again (after it exited) on the same data, with the current `env`.
    pub fn respawn(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    /// The log of its latest start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension(format!("{}.log", self.starts)))
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGKILL, then start again on the same data.
    pub fn kill9_and_restart(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
        self.spawn();
    }

    /// Graceful stop (SIGTERM), then start again.
    pub fn restart(&mut self) {
        let mut c = self.child.take().unwrap();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().unwrap();
        self.spawn();
    }

    /// Resident set size of the server process in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.pid())
    }
}

/// Resident set size of a process in bytes (0 when it cannot be read).
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

pub async fn post_events(
    c: &reqwest::Client,
    s: &Server,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let res = c
        .post(s.url("/api/v1/events"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

pub async fn get_text(c: &reqwest::Client, url: &str) -> String {
    c.get(url).send().await.unwrap().text().await.unwrap()
}

/// The value of one sample of the server's `/metrics` (e.g.
/// `tally_reloads_total{what="meters",outcome="rejected"}`), 0 when absent.
pub async fn metric(c: &reqwest::Client, s: &Server, sample: &str) -> f64 {
    let text = get_text(c, &s.url("/metrics")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

pub async fn get_json(c: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let res = c.get(url).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(serde_json::Value::Null))
}

pub fn event(
    id: &str,
    ty: &str,
    subject: &str,
    time: &str,
    data: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({"specversion": "1.0", "id": id, "source": "test", "type": ty, "subject": subject, "time": time, "data": data})
}

/// Waits until `f` returns true (for manifest reloads), up to 10 s.
/// Waits (up to 10 s) until `f` returns true: the kit's one poller.
pub async fn eventually(mut f: impl AsyncFnMut() -> bool) {
    eventually_within(Duration::from_secs(10), "the condition", async || f().await).await
}

/// Waits until `f` returns true, up to `limit`; fails saying `what` did not happen.
pub async fn eventually_within(limit: Duration, what: &str, mut f: impl AsyncFnMut() -> bool) {
    tally_tests::eventually(limit, Duration::from_millis(50), what, async || {
        f().await.then_some(())
    })
    .await
}

pub use tally_tests::wait_for;
