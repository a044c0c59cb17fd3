//! Writes tally's CRDs as YAML: `crdgen DIR...` writes one file per CRD into each DIR;
//! with no arguments it prints them to stdout.
use std::{env, fs, path::Path};

fn main() -> std::io::Result<()> {
    let dirs: Vec<String> = env::args().skip(1).collect();
    for (file, yaml) in tally_crds::render_crds() {
        if dirs.is_empty() {
            print!("---\n{yaml}");
        }
        for dir in &dirs {
            fs::create_dir_all(dir)?;
            let path = Path::new(dir).join(&file);
            fs::write(&path, &yaml)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
