//! `kubectl tally` against the real server: where the server and token come from (flag,
//! environment, kubeconfig extension), namespaces, output formats, and errors that say
//! what to do with their exit codes (1 refused, 2 command line, 3 unreachable). The
//! README walkthrough (`readme.rs`) replays its tables.
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::{Value, json};

const METERS: &str = "apiVersion: tally.dev/v1alpha1
kind: Meter
metadata: {name: gpu-seconds, namespace: ml}
spec: {eventType: gpu, aggregation: SUM, valueProperty: $.seconds, groupBy: {model: $.model}}
";

const TOKEN: &str = "kubectl-tally-token-0123456789";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn kubectl_tally(args: &[&str], env: &[(&str, &str)], kubeconfig: &Path) -> Run {
    let mut cmd = Command::new(tally_tests::bin("kubectl-tally"));
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("TALLY_SERVER")
        .env_remove("TALLY_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn kubectl_tally_finds_the_server_and_says_what_to_do_when_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("tokens:\n- {{name: ml, token: {TOKEN}, namespaces: [ml]}}\n"),
    )
    .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let s = Server::start(
        &[("m.yaml", METERS)],
        &["--tokens-file", tokens.to_str().unwrap()],
    );
    let events: Vec<Value> = [
        ("g1", "acme", 1_250_000.5, "a100"),
        ("g2", "acme", 30.0, "h100"),
        ("g3", "globex", 2_000_000.0, "a100"),
    ]
    .iter()
    .map(|(id, subject, seconds, model)| {
        json!({"specversion": "1.0", "id": id, "source": "k8s", "type": "gpu", "subject": subject,
               "time": "2026-11-02T08:00:00Z", "data": {"seconds": seconds, "model": model}})
    })
    .collect();
    let res = client()
        .post(s.url("/api/v1/namespaces/ml/events"))
        .bearer_auth(TOKEN)
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let server = format!("http://{}", s.addr);
    let none = dir.path().join("no-kubeconfig");
    let range = [
        "--from",
        "2026-11-01T00:00:00Z",
        "--to",
        "2026-11-03T00:00:00Z",
    ];

    // flag and token file; -n picks the namespace; the Meter's name works as well
    let mut args = vec!["usage", "gpu-seconds", "-n", "ml", "--server", &server];
    args.extend([
        "--token-file",
        token_file.to_str().unwrap(),
        "--group-by",
        "subject",
    ]);
    args.extend(range);
    let r = kubectl_tally(&args, &[], &none);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "SUBJECT         VALUE\nacme      1,250,030.5\nglobex      2,000,000\n"
    );

    // the environment
    let mut args = vec!["top", "gpu_seconds", "-n", "ml"];
    args.extend(range);
    let r = kubectl_tally(
        &args,
        &[("TALLY_SERVER", &server), ("TALLY_TOKEN", TOKEN)],
        &none,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "RANK   SUBJECT         VALUE   SHARE\n   1   globex      2,000,000   61.5%\n   2   acme      1,250,030.5   38.5%\n"
    );

    // the current kubeconfig context's tally.dev extension; the token's first
    // namespace without -n; CSV and JSON
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: prod\nclusters: [{{name: prod, cluster: {{server: 'https://127.0.0.1:1'}}}}]\nusers: [{{name: me, user: {{}}}}]\ncontexts:\n- name: prod\n  context:\n    cluster: prod\n    user: me\n    extensions:\n    - name: tally.dev\n      extension: {{server: '{server}', tokenFile: '{}'}}\n",
            token_file.display()
        ),
    )
    .unwrap();
    let mut args = vec!["usage", "gpu_seconds", "--group-by", "model", "-o", "csv"];
    args.extend(range);
    let r = kubectl_tally(&args, &[], &kubeconfig);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "window_start,window_end,subject,model,value\n2026-11-01T00:00:00Z,2026-11-03T00:00:00Z,,a100,3250000.5\n2026-11-01T00:00:00Z,2026-11-03T00:00:00Z,,h100,30\n"
    );
    let r = kubectl_tally(&["meters", "-o", "json"], &[], &kubeconfig);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let meters: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(meters[0]["slug"], "gpu_seconds", "{meters}");

    // errors: what is wrong, what to do, and the exit code
    // (arguments, environment, exit code, what stderr says)
    type Case<'a> = (Vec<&'a str>, &'a [(&'a str, &'a str)], i32, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["usage", "gpu_seconds"], &[], 2, "no tally server"),
        (
            vec!["usage", "gpu_seconds", "--server", &server],
            &[],
            1,
            "--token-file",
        ),
        (
            vec!["usage", "gpu_seconds", "--server", &server, "-n", "other"],
            &[("TALLY_TOKEN", TOKEN)],
            1,
            "granted",
        ),
        (
            vec!["usage", "cpu_seconds", "--server", &server],
            &[("TALLY_TOKEN", TOKEN)],
            1,
            "gpu_seconds",
        ),
        (
            vec![
                "usage",
                "gpu_seconds",
                "--server",
                &server,
                "--group-by",
                "colour",
            ],
            &[("TALLY_TOKEN", TOKEN)],
            1,
            "use subject or one of: model",
        ),
        (
            vec!["usage", "gpu_seconds", "--server", "http://127.0.0.1:9"],
            &[],
            3,
            "port-forward",
        ),
        (
            vec!["usage", "gpu_seconds", "--server", &server, "--last", "7y"],
            &[("TALLY_TOKEN", TOKEN)],
            2,
            "like 30m",
        ),
        (
            vec![
                "usage",
                "gpu_seconds",
                "--server",
                &server,
                "--from",
                "monday",
            ],
            &[("TALLY_TOKEN", TOKEN)],
            2,
            "RFC 3339",
        ),
    ];
    for (args, env, code, says) in cases {
        let r = kubectl_tally(&args, env, &none);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
    }
}
