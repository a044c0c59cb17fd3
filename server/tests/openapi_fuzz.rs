//! The OpenAPI document is exact: schemathesis 4.32.5 (`make tools` installs it), run
//! from the served `/api/v1/openapi.json` with every check and a fixed seed, finds no
//! failure against the loopback default (no tokens) nor against a server with API
//! tokens and portal keys. The one exception it is given is explained in
//! `tests/schemathesis/schemathesis.toml`.
mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// schemathesis's `st`, from `make tools`; `None` (the test skips, or fails under CI)
/// when it is not installed.
fn schemathesis() -> Option<PathBuf> {
    let tools = std::env::var("TALLY_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/tally-tools")
        });
    let st = tools.join("st-venv/bin/st");
    if st.exists() {
        return Some(st);
    }
    let why = format!(
        "schemathesis is not installed at {} (run `make tools`)",
        st.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("skipped: {why}");
    None
}

/// Runs `st` against `server` (at most 5 minutes); panics with its report on any failure.
fn fuzz(st: &PathBuf, server: &Server, headers: &[String], what: &str) {
    let config = repo().join("server/tests/schemathesis/schemathesis.toml");
    let work = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(st);
    cmd.arg("--config-file")
        .arg(&config)
        .args(["run", &server.url("/api/v1/openapi.json")])
        .args(["--checks", "all", "--seed", "1", "--max-examples", "40"])
        .args(["--request-timeout", "30"])
        .current_dir(work.path())
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for h in headers {
        cmd.args(["-H", h]);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("schemathesis starts");
    let limit = Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: schemathesis ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = report
        .lines()
        .rev()
        .find(|l| l.contains("generated"))
        .unwrap_or("")
        .trim()
        .to_string();
    eprintln!(
        "{what}: {summary} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        status.success() && !report.contains("FAILURES"),
        "{what}: schemathesis found failures:\n{report}"
    );
    assert!(
        summary.contains("passed"),
        "{what}: no test case ran:\n{report}"
    );
}

#[test]
fn schemathesis_finds_no_failure_without_tokens() {
    let Some(st) = schemathesis() else { return };
    let server = Server::quickstart();
    fuzz(&st, &server, &[], "loopback default");
}

#[test]
fn schemathesis_finds_no_failure_with_tokens_and_portal_keys() {
    let Some(st) = schemathesis() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (tokens, keys) = (dir.path().join("tokens.yaml"), dir.path().join("keys.yaml"));
    let token = "fuzz-token-0123456789abcdef";
    std::fs::write(
        &tokens,
        format!("tokens:\n- {{name: fuzz, token: {token}, namespaces: ['*']}}\n"),
    )
    .unwrap();
    std::fs::write(
        &keys,
        "keys:\n- {id: k1, secret: 'fuzz-portal-secret-0123456789abcdef'}\n",
    )
    .unwrap();
    let quickstart = repo().join("examples/quickstart");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&quickstart).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        files.push((name, std::fs::read_to_string(&path).unwrap()));
    }
    let manifests: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let server = Server::start(
        &manifests,
        &[
            "--tokens-file",
            tokens.to_str().unwrap(),
            "--portal-keys-file",
            keys.to_str().unwrap(),
        ],
    );
    fuzz(
        &st,
        &server,
        &[format!("Authorization: Bearer {token}")],
        "with tokens",
    );
}
