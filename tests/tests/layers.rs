//! The workspace's dependency direction (ARCHITECTURE.md, "Crates and layers"), checked
//! on what cargo would link: `cargo tree -e normal` for each crate built alone, as
//! `cargo build -p <crate>` (and the Dockerfile) would build it.
//!
//! A failure names the crate, the dependency it must not link and the path that
//! brings it in, so the fix (a feature, a moved module) is visible.
use std::collections::BTreeMap;
use std::process::Command;

/// One crate's normal dependency tree: each package with the packages that depend
/// on it (names only; versions do not matter here).
#[derive(Debug)]
struct Tree {
    root: String,
    parents: BTreeMap<String, Vec<String>>,
}

impl Tree {
    fn of(package: &str, extra: &[&str]) -> Tree {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(["tree", "-p", package, "-e", "normal", "--prefix", "depth"])
            .args(["--format", "{p}"])
            .args(extra)
            .current_dir(tally_tests::repo())
            .output()
            .expect("cargo tree runs");
        assert!(
            out.status.success(),
            "cargo tree -p {package} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut parents: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut stack: Vec<String> = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let digits = line.chars().take_while(char::is_ascii_digit).count();
            let Ok(depth) = line[..digits].parse::<usize>() else {
                continue;
            };
            let name = line[digits..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            stack.truncate(depth);
            if let Some(parent) = stack.last() {
                let p = parents.entry(name.clone()).or_default();
                if !p.contains(parent) {
                    p.push(parent.clone());
                }
            } else {
                parents.entry(name.clone()).or_default();
            }
            stack.push(name);
        }
        Tree {
            root: package.to_string(),
            parents,
        }
    }

    fn links(&self, name: &str) -> bool {
        self.parents.contains_key(name)
    }

    /// One chain from the root to `name`, for the failure message.
    fn path_to(&self, name: &str) -> String {
        let mut chain = vec![name.to_string()];
        let mut at = name.to_string();
        while at != self.root {
            let Some(parent) = self.parents.get(&at).and_then(|p| p.first()) else {
                break;
            };
            chain.push(parent.clone());
            at = parent.clone();
        }
        chain.reverse();
        chain.join(" → ")
    }

    /// Every dependency in `banned` this crate links, with how.
    fn violations(&self, banned: &[&str]) -> Vec<String> {
        banned
            .iter()
            .filter(|b| self.links(b))
            .map(|b| format!("{} links {b}: {}", self.root, self.path_to(b)))
            .collect()
    }

    /// The tally crates this crate depends on directly.
    fn tally_deps(&self) -> Vec<String> {
        let mut deps: Vec<String> = self
            .parents
            .iter()
            .filter(|(name, parents)| name.starts_with("tally-") && parents.contains(&self.root))
            .map(|(name, _)| name.clone())
            .collect();
        deps.sort();
        deps
    }
}

fn assert_none(violations: Vec<String>) {
    assert!(
        violations.is_empty(),
        "the dependency direction of ARCHITECTURE.md is broken:\n  {}",
        violations.join("\n  ")
    );
}

#[test]
fn the_semantics_crate_links_no_runtime_database_or_kafka() {
    let t = Tree::of("tally-meter", &[]);
    assert_none(t.violations(&[
        "tokio",
        "rusqlite",
        "clickhouse",
        "rdkafka",
        "hyper",
        "reqwest",
        "axum",
        "kube-client",
    ]));
}

#[test]
fn the_operator_links_neither_sqlite_nor_the_http_api() {
    let t = Tree::of("tally-operator", &[]);
    assert_none(t.violations(&["rusqlite", "tally-embedded", "tally-server", "utoipa"]));
}

#[test]
fn the_agent_links_sqlite_only_for_its_spool_and_no_store() {
    // The Dockerfile builds the agent with its default features.
    let t = Tree::of("tally-agent", &[]);
    assert_none(t.violations(&[
        "tally-meter",
        "tally-embedded",
        "tally-clickhouse",
        "tally-server",
        "clickhouse",
        "utoipa",
    ]));
    let users = t.parents.get("rusqlite").cloned().unwrap_or_default();
    assert_eq!(
        users,
        vec!["tally-agent".to_string()],
        "only the agent's spool may use rusqlite: {}",
        t.path_to("rusqlite")
    );
}

#[test]
fn the_budget_evaluator_links_no_store_of_its_own() {
    let t = Tree::of("tally-budgets", &[]);
    assert_none(t.violations(&["rusqlite", "clickhouse", "rdkafka", "axum", "kube-client"]));
}

#[test]
fn the_kubectl_plugin_is_a_client_of_the_api_only() {
    let t = Tree::of("tally-kubectl", &[]);
    assert_none(t.violations(&[
        "rusqlite",
        "clickhouse",
        "rdkafka",
        "axum",
        "utoipa",
        "tally-server",
    ]));
}

#[test]
fn tally_crates_depend_only_downwards() {
    // Each crate and the tally crates it may depend on (ARCHITECTURE.md's layers).
    let allowed: &[(&str, &[&str])] = &[
        ("tally-crds", &[]),
        ("tally-meter", &["tally-crds"]),
        ("tally-kafka", &["tally-crds"]),
        ("tally-embedded", &["tally-crds", "tally-meter"]),
        (
            "tally-clickhouse",
            &["tally-crds", "tally-kafka", "tally-meter"],
        ),
        ("tally-collectors", &["tally-crds"]),
        ("tally-budgets", &["tally-crds", "tally-meter"]),
        ("tally-runtime", &[]),
        (
            "tally-server",
            &[
                "tally-budgets",
                "tally-clickhouse",
                "tally-crds",
                "tally-embedded",
                "tally-kafka",
                "tally-meter",
                "tally-runtime",
            ],
        ),
        (
            "tally-operator",
            &[
                "tally-budgets",
                "tally-clickhouse",
                "tally-crds",
                "tally-kafka",
                "tally-meter",
                "tally-runtime",
            ],
        ),
        (
            "tally-agent",
            &[
                "tally-collectors",
                "tally-crds",
                "tally-kafka",
                "tally-runtime",
            ],
        ),
        // a client of the HTTP API (and of the Kubernetes API for budgets)
        ("tally-kubectl", &["tally-crds"]),
    ];
    let mut wrong = Vec::new();
    for (package, may) in allowed {
        let t = Tree::of(package, &[]);
        for dep in t.tally_deps() {
            if !may.contains(&dep.as_str()) {
                wrong.push(format!("{package} depends on {dep}"));
            }
        }
    }
    assert_none(wrong);
}
