//! Every Collector in examples/ and the example agent configuration read and validate.
use std::path::Path;

use serde::Deserialize;

fn root() -> std::path::PathBuf {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo test");
    Path::new(&dir).join("..")
}

#[test]
fn example_collectors_and_agent_config_are_valid() {
    let mut seen = 0;
    for entry in std::fs::read_dir(root().join("examples/collectors")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if value["kind"] == "Collector" {
                let c: tally_crds::Collector = serde_yaml::from_value(value).unwrap();
                c.spec
                    .validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
    }
    assert!(seen >= 3, "{seen} collectors");
    let text = std::fs::read_to_string(root().join("examples/agent/agent.yaml")).unwrap();
    let cfg: tally_crds::collector::AgentConfig = serde_yaml::from_str(&text).unwrap();
    cfg.validate().unwrap();
}
