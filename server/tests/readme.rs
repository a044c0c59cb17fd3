//! Replays the README walkthrough (its `$ curl` and `$ kubectl tally` commands, between the `walkthrough`
//! markers) against a fresh quickstart server and compares the output the README shows.
mod common;

use std::process::Command;

#[test]
fn readme_walkthrough_output_is_real() {
    let root = common::repo();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme
        .find("<!-- walkthrough -->")
        .expect("README has a walkthrough marker");
    let end = readme
        .find("<!-- /walkthrough -->")
        .expect("README has a walkthrough end marker");
    let mut steps: Vec<(String, String)> = Vec::new();
    let mut in_block = false;
    for line in readme[start..end].lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(cmd) = line.strip_prefix("$ ") {
            steps.push((cmd.to_string(), String::new()));
        } else if let Some((_, out)) = steps.last_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(steps.len() >= 5, "the walkthrough has its commands");
    if Command::new("curl").arg("--version").output().is_err() {
        panic!(
            "curl is needed to replay the README walkthrough; install it (apt-get install curl)"
        );
    }
    let server = common::Server::quickstart();
    // `kubectl tally` is the plugin binary kubectl would run from the PATH
    let kubectl_tally = tally_tests::bin("kubectl-tally");
    for (cmd, expected) in steps {
        let cmd_here = cmd
            .replace("localhost:8080", &server.addr)
            .replace("kubectl tally ", &format!("{} ", kubectl_tally.display()));
        let out = Command::new("sh")
            .arg("-c")
            .arg(&cmd_here)
            .current_dir(&root)
            .env("KUBECONFIG", root.join("no-kubeconfig-here"))
            .env_remove("TALLY_SERVER")
            .env_remove("TALLY_TOKEN")
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            got.trim(),
            expected.trim(),
            "README output differs for:\n$ {cmd}"
        );
    }
}
