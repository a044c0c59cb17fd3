//! Replays the README's agent walkthrough (between the `agent-walkthrough` markers):
//! the quickstart server plus `tally-agent --config examples/agent/agent.yaml`, then
//! the README's query, whose output must match what the README shows.
use std::process::Command;
use std::time::{Duration, Instant};

use tally_tests::{Proc, Standalone, bin, free_port, repo};

#[test]
fn readme_agent_walkthrough_output_is_real() {
    let root = repo();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme
        .find("<!-- agent-walkthrough -->")
        .expect("README has the agent walkthrough");
    let end = readme
        .find("<!-- /agent-walkthrough -->")
        .expect("and its end marker");
    let block = &readme[start..end];
    let cmd = block
        .lines()
        .find_map(|l| l.strip_prefix("$ curl"))
        .map(|c| format!("curl{c}"))
        .expect("a curl command");
    let expected: String = block
        .lines()
        .skip_while(|l| !l.starts_with("$ curl"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n");

    let tmp = tempfile::tempdir().unwrap();
    let server = Standalone::start(tmp.path(), &root.join("examples/quickstart"));
    let addr = &server.addr;
    // The example configuration, pointed at this server and at private paths.
    let example = std::fs::read_to_string(root.join("examples/agent/agent.yaml")).unwrap();
    let config = example
        .replace("http://127.0.0.1:8080", &format!("http://{addr}"))
        .replace(
            "./data/agent-spool",
            tmp.path().join("spool").to_str().unwrap(),
        )
        .replace("127.0.0.1:9465", &format!("127.0.0.1:{}", free_port()))
        .replace(
            "examples/agent/logs",
            root.join("examples/agent/logs").to_str().unwrap(),
        );
    let path = tmp.path().join("agent.yaml");
    std::fs::write(&path, config).unwrap();
    let agent = Proc::start(
        bin("tally-agent"),
        &["--config", path.to_str().unwrap()],
        &[],
        tmp.path().join("agent.log"),
    );

    let cmd_here = cmd.replace("localhost:8080", addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("sh")
            .arg("-c")
            .arg(&cmd_here)
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if got == expected.trim() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "README output differs for:\n$ {cmd}\ngot:\n{got}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
