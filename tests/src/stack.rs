//! tally's cluster deployment as processes: `tally-operator` replicas, `tally-server
//! sink` and `tally-server --kubernetes` (ingest to Kafka, queries from ClickHouse,
//! meters from the API), against a Kubernetes API (the kit's control plane or
//! `TALLY_KUBECONFIG`'s) with real
//! Kafka and ClickHouse. Every process stops (SIGKILL by PID) when the [`Stack`] drops.
use std::path::Path;

use crate::{Proc, bin, start_operator};

/// Where the pipeline's data goes; the operator creates the topic and the database.
#[derive(Clone, Copy, Debug)]
pub struct Pipeline<'a> {
    /// Kafka bootstrap brokers.
    pub brokers: &'a str,
    /// ClickHouse HTTP URL.
    pub clickhouse: &'a str,
    /// A database of this test's own.
    pub database: &'a str,
    /// A topic of this test's own.
    pub topic: &'a str,
}

/// The running processes.
#[derive(Debug)]
pub struct Stack {
    /// The query and ingest API, `127.0.0.1:port`.
    pub server: String,
    /// Each operator replica and its metrics address; identities `op-0`, `op-1`, ….
    pub operators: Vec<(Proc, String)>,
    /// `tally-server sink`.
    pub sink: Proc,
    /// `tally-server --kubernetes`.
    pub server_proc: Proc,
}

impl Stack {
    /// Starts `replicas` operators (with `operator_args` besides the pipeline's, on
    /// `operator_kubeconfig`), the sink and the server (on `kubeconfig`), all logging
    /// into `dir`, and waits until the server listens.
    pub fn start(
        dir: &Path,
        (kubeconfig, operator_kubeconfig): (&Path, &Path),
        p: &Pipeline,
        replicas: usize,
        operator_args: &[&str],
    ) -> Stack {
        let kc = kubeconfig.to_str().expect("UTF-8 path");
        let common = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = [
                "--kafka",
                p.brokers,
                "--clickhouse",
                p.clickhouse,
                "--clickhouse-database",
                p.database,
                "--topic",
                p.topic,
                "--cutover-margin-secs",
                "1",
                "--cutover-grace-secs",
                "2",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            v.extend(extra.iter().map(|s| s.to_string()));
            v
        };
        let operators = (0..replicas)
            .map(|i| {
                let identity = format!("op-{i}");
                let mut extra = operator_args.to_vec();
                extra.extend(["--identity", identity.as_str()]);
                let args = common(&extra);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                start_operator(
                    bin("tally-operator"),
                    operator_kubeconfig,
                    "tally-system",
                    &args,
                    dir.join(format!("operator-{i}.log")),
                )
            })
            .collect();
        // The operator creates the topic; the sink and server wait for it by retrying their start.
        let sink_args = common(&[
            "sink",
            "--group",
            &format!("{}-sink", p.topic),
            "--metrics-listen",
            "127.0.0.1:0",
            "--batch-ms",
            "200",
        ]);
        let sink_args: Vec<&str> = sink_args.iter().map(String::as_str).collect();
        let sink = Proc::start(
            bin("tally-server"),
            &sink_args,
            &[("RUST_LOG", "info")],
            dir.join("sink.log"),
        );
        let server_args = common(&["--kubernetes", "--listen", "127.0.0.1:0"]);
        let server_args: Vec<&str> = server_args.iter().map(String::as_str).collect();
        let mut server = Proc::start(
            bin("tally-server"),
            &server_args,
            &[("KUBECONFIG", kc), ("RUST_LOG", "info")],
            dir.join("server.log"),
        );
        let addr = server.announced("the API", 0);
        Stack {
            server: addr,
            operators,
            sink,
            server_proc: server,
        }
    }
}
