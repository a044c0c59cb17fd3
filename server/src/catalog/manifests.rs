//! Meter manifests read from a folder (standalone mode): the same multi-document YAML
//! files `kubectl apply` takes.
//!
//! Rules, applied on the first load and on every reload:
//! - every `*.yaml`/`*.yml` file below the folder is read in path order; documents of
//!   other kinds are skipped (a `Collector` belongs to the agent);
//! - an invalid Meter is reported with file, document, meter and field, and skipped; the
//!   others keep working;
//! - a slug is unique per namespace: a meter claiming a slug that another meter already
//!   serves is rejected (meters already served keep theirs);
//! - on reload, a changed immutable field (slug, eventType, aggregation, valueProperty,
//!   filter, eventFrom) is rejected and the old definition stays; a changed `groupBy` or
//!   `description` is applied (the store rebuilds the rollup); a removed meter stops
//!   being served (its raw events stay).
//!
//! Changes are noticed by polling file names, sizes and modification times (simple and
//! robust against editors' rename-on-save and ConfigMap symlink swaps).
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use tally_crds::Meter;

use tally_meter::engine::CompiledMeter;

/// A problem with one manifest document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    /// The file.
    pub file: String,
    /// 1-based document number within the file.
    pub document: usize,
    /// `namespace/name` when known.
    pub meter: Option<String>,
    /// The field, e.g. `spec.valueProperty`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (document {}", self.file, self.document)?;
        if let Some(m) = &self.meter {
            write!(f, ", meter {m}")?;
        }
        write!(f, "): ")?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

/// A parsed, compiled meter with where it came from.
#[derive(Clone, Debug)]
struct Candidate {
    file: String,
    document: usize,
    meter: CompiledMeter,
}

/// What a folder holds: file fingerprints to notice changes.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Fingerprints every manifest file below `dir`.
pub fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = Vec::new();
    for path in manifest_files(dir) {
        let meta = std::fs::metadata(&path).ok();
        out.push((
            path,
            meta.as_ref().map_or(0, |m| m.len()),
            meta.and_then(|m| m.modified().ok()),
        ));
    }
    out
}

/// Every `*.yaml`/`*.yml` file below `dir` (hidden ones skipped), in path order.
pub(crate) fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue; // hidden files, ConfigMap's ..data internals
            }
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Reads and validates every Meter below `dir`, applying the reload rules against
/// `previous` (the meters served now). Returns the meters to serve and the problems.
pub fn load(
    dir: &Path,
    previous: &[Arc<CompiledMeter>],
) -> (Vec<Arc<CompiledMeter>>, Vec<ManifestError>) {
    let mut errors = Vec::new();
    let mut candidates = Vec::new();
    let files = manifest_files(dir);
    if files.is_empty() {
        tracing::warn!(dir = %dir.display(), "No *.yaml manifests found");
    }
    for path in files {
        let file = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_file(&file, &text, &mut candidates, &mut errors),
            Err(e) => errors.push(ManifestError {
                file,
                document: 0,
                meter: None,
                field: String::new(),
                message: format!("cannot be read: {e}"),
            }),
        }
    }
    let (meters, mut more) = resolve(candidates, previous);
    errors.append(&mut more);
    (meters, errors)
}

/// Parses one file's documents.
fn parse_file(file: &str, text: &str, out: &mut Vec<Candidate>, errors: &mut Vec<ManifestError>) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let err = |field: &str, message: String, meter: Option<String>| ManifestError {
            file: file.to_string(),
            document,
            meter,
            field: field.to_string(),
            message,
        };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue, // empty document
            Ok(v) => v,
            Err(e) => {
                errors.push(err("", format!("is not valid YAML: {e}"), None));
                break; // the parser cannot continue past a syntax error
            }
        };
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let api_version = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        if kind != "Meter" {
            if kind.is_empty() {
                errors.push(err("kind", "is required (kind: Meter)".into(), None));
            } else {
                tracing::info!(
                    file,
                    document,
                    kind,
                    "Skipping a document that is not a Meter"
                );
            }
            continue;
        }
        if api_version != "tally.dev/v1alpha1" {
            errors.push(err(
                "apiVersion",
                format!("must be tally.dev/v1alpha1, got {api_version:?}"),
                None,
            ));
            continue;
        }
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(str::to_string);
        let ns = value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .unwrap_or("default")
            .to_string();
        let label = name.as_ref().map(|n| format!("{ns}/{n}"));
        let meter: Meter = match serde_yaml::from_value(value) {
            Ok(m) => m,
            Err(e) => {
                errors.push(err(
                    "",
                    format!("does not match the Meter schema: {e}"),
                    label,
                ));
                continue;
            }
        };
        match CompiledMeter::compile(&meter) {
            Ok(meter) => out.push(Candidate {
                file: file.to_string(),
                document,
                meter,
            }),
            Err(errs) => errors.extend(
                errs.into_iter()
                    .map(|e| err(&e.field, e.message, label.clone())),
            ),
        }
    }
}

fn resolve(
    candidates: Vec<Candidate>,
    previous: &[Arc<CompiledMeter>],
) -> (Vec<Arc<CompiledMeter>>, Vec<ManifestError>) {
    let prev: HashMap<(&str, &str), &Arc<CompiledMeter>> = previous
        .iter()
        .map(|m| ((m.namespace.as_str(), m.name.as_str()), m))
        .collect();
    // meters served now claim their slugs first
    let mut ordered: Vec<&Candidate> = candidates.iter().collect();
    ordered
        .sort_by_key(|c| !prev.contains_key(&(c.meter.namespace.as_str(), c.meter.name.as_str())));
    let mut names = HashSet::new();
    let mut slugs: HashMap<(String, String), String> = HashMap::new();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for c in ordered {
        let m = &c.meter;
        let label = format!("{}/{}", m.namespace, m.name);
        let err = |field: &str, message: String| ManifestError {
            file: c.file.clone(),
            document: c.document,
            meter: Some(label.clone()),
            field: field.into(),
            message,
        };
        if !names.insert((m.namespace.clone(), m.name.clone())) {
            errors.push(err(
                "metadata.name",
                "is defined twice in this namespace; this definition is ignored".into(),
            ));
            continue;
        }
        let mut chosen = Arc::new(m.clone());
        if let Some(old) = prev.get(&(m.namespace.as_str(), m.name.as_str())) {
            let (a, b) = (old.immutable_fields(), m.immutable_fields());
            let changed: Vec<&str> = a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(v))
                .map(|(k, _)| *k)
                .collect();
            if !changed.is_empty() {
                for field in changed {
                    errors.push(err(&format!("spec.{field}"), "is immutable; the previous definition stays in effect (create a new Meter to change it)".into()));
                }
                chosen = (*old).clone();
            } else if old.spec == m.spec {
                chosen = (*old).clone();
            }
        }
        let key = (chosen.namespace.clone(), chosen.slug.clone());
        if let Some(holder) = slugs.get(&key) {
            errors.push(err("spec.slug", format!("slug {:?} is already used by meter {holder} in namespace {}; set a different spec.slug", chosen.slug, chosen.namespace)));
            continue;
        }
        slugs.insert(key, chosen.name.clone());
        out.push(chosen);
    }
    (out, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    const TOKENS: &str = "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: llm-tokens}\nspec: {eventType: llm, aggregation: SUM, valueProperty: $.tokens, groupBy: {model: $.model}}\n";

    #[test]
    fn invalid_meters_are_reported_and_skipped_and_the_others_load() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &format!(
                "{TOKENS}---\napiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {{name: bad}}\nspec: {{eventType: x, aggregation: SUM}}\n---\nkind: Collector\napiVersion: tally.dev/v1alpha1\n---\napiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {{name: typo}}\nspec: {{eventType: x, aggregation: COUNT, groupby: {{}}}}\n"
            ),
        );
        write(
            dir.path(),
            "b.yml",
            "apiVersion: tally.dev/v1alpha1\nkind: Meter\nmetadata: {name: llm_tokens}\nspec: {eventType: y, aggregation: COUNT}\n",
        );
        let (meters, errors) = load(dir.path(), &[]);
        assert_eq!(
            meters.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["llm-tokens"]
        );
        let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert!(
            text[0].contains(
                "a.yaml (document 2, meter default/bad): spec.valueProperty: is required for SUM"
            ),
            "{text:?}"
        );
        assert!(
            text[1].contains("document 4") && text[1].contains("unknown field `groupby`"),
            "{text:?}"
        );
        assert!(
            text[2].contains("b.yml") && text[2].contains("already used by meter llm-tokens"),
            "{text:?}"
        );
        assert_eq!(errors.len(), 3);
    }

    #[test]
    fn reload_rejects_immutable_changes_and_applies_group_by_changes() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m.yaml", TOKENS);
        let (first, errors) = load(dir.path(), &[]);
        assert!(errors.is_empty());
        write(dir.path(), "m.yaml", &TOKENS.replace("SUM", "MAX"));
        let (second, errors) = load(dir.path(), &first);
        assert_eq!(second[0].spec.aggregation, tally_crds::Aggregation::Sum);
        assert_eq!(errors[0].field, "spec.aggregation");
        write(
            dir.path(),
            "m.yaml",
            &TOKENS.replace("{model: $.model}", "{model: $.model, region: $.region}"),
        );
        let (third, errors) = load(dir.path(), &first);
        assert!(errors.is_empty());
        assert_eq!(third[0].group_count(), 2);
        write(dir.path(), "m.yaml", "");
        assert!(load(dir.path(), &third).0.is_empty());
    }
}
