//! `kubectl tally`: a meter's usage and its top subjects from the terminal.
//!
//! kubectl runs any `kubectl-<name>` on the PATH as `kubectl <name>`. This one reads
//! tally's HTTP API (the OpenMeter-compatible query route), so it works against the
//! standalone server and a cluster alike:
//!
//! - `kubectl tally usage METER` — values per window, subject and group-by value;
//! - `kubectl tally top METER` — the subjects with the most usage;
//! - `kubectl tally completeness METER` — whether every source has delivered the range,
//!   and which node or collector is behind, over which interval;
//! - `kubectl tally meters` — the meters it can read;
//! - `kubectl tally budgets` — the cluster's UsageBudgets (through the kubeconfig, not
//!   the tally API), with usage / limit this period.
//!
//! The server is `--server URL`, else `TALLY_SERVER`, else the `tally.dev` extension
//! of the current kubeconfig context (`{server, tokenFile}`); the token is
//! `--token-file`, else `TALLY_TOKEN`, else the extension's `tokenFile`.
//!
//! Exit codes: 0 done; 1 the server refused (its problem is printed); 2 the command
//! line is wrong; 3 the server cannot be reached.
mod args;
mod render;

use std::process::ExitCode;

use clap::Parser;
use serde_json::Value;

use args::{Cli, Command, Output, Target};

/// A failure, with the exit code it ends the process with.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<String, Failure> {
    if let Command::Budgets = cli.command {
        return budgets(cli.namespace(), cli.output).await;
    }
    let target = Target::resolve(&cli.connection).map_err(Failure::usage)?;
    let api = Api::new(target)?;
    match &cli.command {
        Command::Budgets => unreachable!("answered above"),
        Command::Meters => {
            let meters = api
                .get_json(&api.path(cli.namespace(), "/meters"), &[])
                .await?;
            Ok(render::meters(&meters, cli.output))
        }
        Command::Usage(q) => {
            let slug = api.slug(cli.namespace(), &q.meter).await?;
            let params = q
                .range
                .params(
                    q.window.as_deref(),
                    q.tz.as_deref(),
                    &q.subjects,
                    &q.group_by,
                )
                .map_err(Failure::usage)?;
            let path = api.path(cli.namespace(), &format!("/meters/{slug}/query"));
            match cli.output {
                Output::Csv => {
                    let mut csv = api.get_text(&path, &params, "text/csv").await?;
                    if !csv.ends_with('\n') {
                        csv.push('\n');
                    }
                    Ok(csv)
                }
                Output::Json => Ok(render::json(&api.get_json(&path, &params).await?)),
                Output::Table => {
                    let answer = api.get_json(&path, &params).await?;
                    Ok(render::usage(&answer, &q.group_by))
                }
            }
        }
        Command::Completeness(q) => {
            let slug = api.slug(cli.namespace(), &q.meter).await?;
            let params = q
                .range
                .params(None, None, &[], &[])
                .map_err(Failure::usage)?;
            let path = api.path(cli.namespace(), &format!("/meters/{slug}/completeness"));
            let answer = api.get_json(&path, &params).await?;
            Ok(render::completeness(&answer, cli.output))
        }
        Command::Top(q) => {
            let slug = api.slug(cli.namespace(), &q.meter).await?;
            let params = q
                .range
                .params(None, None, &[], &["subject".to_string()])
                .map_err(Failure::usage)?;
            let path = api.path(cli.namespace(), &format!("/meters/{slug}/query"));
            let answer = api.get_json(&path, &params).await?;
            Ok(render::top(&answer, q.limit, cli.output))
        }
    }
}

/// `kubectl tally budgets`: the UsageBudgets of the kubeconfig's cluster.
async fn budgets(namespace: Option<&str>, output: Output) -> Result<String, Failure> {
    use kube::api::{Api, ListParams};
    let client = kube::Client::try_default().await.map_err(|e| Failure {
        code: 3,
        message: format!("cannot reach the cluster of your kubeconfig: {e}"),
    })?;
    let api: Api<tally_crds::UsageBudget> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let list = api.list(&ListParams::default()).await.map_err(|e| Failure {
        code: 1,
        message: format!(
            "cannot list UsageBudgets: {e} (is tally's CRD installed, and may you list usagebudgets.tally.dev?)"
        ),
    })?;
    Ok(render::budgets(&list.items, output))
}

/// The tally API at one server.
struct Api {
    http: reqwest::Client,
    target: Target,
}

impl Api {
    fn new(target: Target) -> Result<Api, Failure> {
        if target.server.starts_with("https://") {
            return Err(Failure::usage(format!(
                "--server {}: this build speaks plain HTTP; reach the server through `kubectl port-forward -n tally svc/tally-server 8080` and use --server http://localhost:8080",
                target.server
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| Failure::usage(format!("cannot make an HTTP client: {e}")))?;
        Ok(Api { http, target })
    }

    /// `/api/v1[/namespaces/{ns}]{rest}`.
    fn path(&self, namespace: Option<&str>, rest: &str) -> String {
        match namespace {
            Some(ns) => format!("/api/v1/namespaces/{ns}{rest}"),
            None => format!("/api/v1{rest}"),
        }
    }

    async fn send(
        &self,
        path: &str,
        params: &[(String, String)],
        accept: &str,
    ) -> Result<String, Failure> {
        let mut url = format!("{}{path}", self.target.server.trim_end_matches('/'));
        if !params.is_empty() {
            let query = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(params)
                .finish();
            url = format!("{url}?{query}");
        }
        let mut req = self.http.get(&url).header("accept", accept);
        if let Some(token) = &self.target.token {
            req = req.bearer_auth(token);
        }
        let res = req.send().await.map_err(|e| Failure {
            code: 3,
            message: format!(
                "cannot reach tally at {}: {e}. Is the server running (for a cluster: `kubectl port-forward -n tally svc/tally-server 8080`)? Point at it with --server or TALLY_SERVER",
                self.target.server
            ),
        })?;
        let status = res.status();
        let body = res.text().await.map_err(|e| Failure {
            code: 3,
            message: format!("the answer from {url} broke off: {e}"),
        })?;
        if status.is_success() {
            return Ok(body);
        }
        let detail = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|p| p["detail"].as_str().map(String::from))
            .unwrap_or(body);
        let hint = match status.as_u16() {
            401 => " (give a token: --token-file FILE or TALLY_TOKEN)",
            403 => " (ask for a token granted this namespace, or pick another with -n)",
            _ => "",
        };
        Err(Failure {
            code: 1,
            message: format!("the server answered {}: {detail}{hint}", status.as_u16()),
        })
    }

    async fn get_json(&self, path: &str, params: &[(String, String)]) -> Result<Value, Failure> {
        let text = self.send(path, params, "application/json").await?;
        serde_json::from_str(&text).map_err(|e| Failure {
            code: 1,
            message: format!("the server's answer is not JSON: {e}"),
        })
    }

    async fn get_text(
        &self,
        path: &str,
        params: &[(String, String)],
        accept: &str,
    ) -> Result<String, Failure> {
        self.send(path, params, accept).await
    }

    /// The slug of `meter`, given as a slug or as the Meter's name.
    async fn slug(&self, namespace: Option<&str>, meter: &str) -> Result<String, Failure> {
        let meters = self.get_json(&self.path(namespace, "/meters"), &[]).await?;
        let list = meters.as_array().cloned().unwrap_or_default();
        if let Some(m) = list.iter().find(|m| m["slug"] == meter || m["id"] == meter) {
            return Ok(m["slug"].as_str().unwrap_or(meter).to_string());
        }
        let known: Vec<&str> = list.iter().filter_map(|m| m["slug"].as_str()).collect();
        Err(Failure {
            code: 1,
            message: format!(
                "no meter {meter:?} here; the meters are: {} (kubectl tally meters lists them)",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        })
    }
}
