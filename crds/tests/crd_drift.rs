//! The committed CRD YAML must equal what the Rust types generate.
use std::{fs, path::Path};

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    // Read at run time: a test binary reused from another checkout must still
    // compare this checkout's files.
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo test");
    let root = Path::new(&root);
    // The chart installs the same CRDs from its own crds/ folder.
    for dir in [root.to_path_buf(), root.join("../charts/tally/crds")] {
        for (file, yaml) in tally_crds::render_crds() {
            let path = dir.join(&file);
            let committed = fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!("{} is missing ({e}): run `make generate`", path.display())
            });
            assert!(
                committed == yaml,
                "{} differs from the Rust types in crds/src: run `make generate` and commit the result",
                path.display()
            );
        }
    }
}
