//! `logs`: usage parsed from container logs (CRI format) or plain files.
//!
//! Files are identified by a **fingerprint**, a hash of their first line (at most 256
//! bytes), not by path: kubelet rotation renames `0.log` to `0.log.<timestamp>` and
//! starts a new `0.log`, and the renamed file keeps its fingerprint and its read
//! position. A file not yet holding a full first line is not read yet. A file shorter
//! than its checkpointed offset was truncated: reading restarts at 0 under a new
//! generation, so new lines get new ids. The checkpoint `f/<fingerprint>` = (offset,
//! generation) always points at the start of a logical line and is committed with the
//! events read before it; an event's id hashes (fingerprint, generation, offset), so a
//! re-read after a crash deduplicates.
//!
//! What cannot be known: a file truncated and refilled past its old offset between two
//! polls with the same first line looks unchanged (its new lines up to the old offset
//! are skipped); a rotated file compressed (`.gz`) before the agent finished it is not
//! read further. The kubelet keeps the newest rotated file uncompressed, so this needs
//! the agent to be two rotations behind.
//!
//! Lines are parsed as JSON objects or by a regex's named groups; lines that do not
//! parse, or lack the `when` path, are skipped and counted in [`LogTailer::skipped`].
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use serde_json_path::JsonPath;
use tally_crds::collector::{LogFormat, LogParserKind, LogsSource};

use crate::pods::{pod_key, selects, subject_of};
use crate::{Origin, Output, Result, compile_path, config_error, event_id, select_one, time_ms_of};

pub mod cri;
#[cfg(test)]
mod tests;

/// Bytes of a file's start that make its fingerprint (up to the first newline).
const FINGERPRINT_BYTES: usize = 256;
/// Most bytes read from one file per poll (bounds memory and batch size).
const MAX_READ_BYTES: u64 = 4 << 20;
/// A file not seen for this long is forgotten (its checkpoint dropped).
const FORGET_AFTER_MS: i64 = 3_600_000;

/// A file to read, and the pod it belongs to.
#[derive(Debug, Clone)]
pub struct LogFile {
    /// The file.
    pub path: PathBuf,
    /// Its pod, for container logs.
    pub pod: Option<Arc<Pod>>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
struct Position {
    offset: u64,
    generation: u32,
    #[serde(skip)]
    seen_ms: i64,
}

#[derive(Debug)]
enum Parser {
    Json,
    Regex(Regex),
}

#[derive(Debug)]
struct Mapping {
    when: Option<JsonPath>,
    subject: Option<JsonPath>,
    time: Option<JsonPath>,
    data: Vec<(String, JsonPath)>,
}

/// The log collector of one Collector.
#[derive(Debug)]
pub struct LogTailer {
    origin: Origin,
    cfg: LogsSource,
    parser: Parser,
    mapping: Mapping,
    positions: HashMap<String, Position>,
    skipped: u64,
}

/// A logical line read from a file.
struct Record {
    offset: u64,
    time: Option<String>,
    message: String,
}

impl LogTailer {
    /// A tailer resuming from its checkpoints; fails naming a regex or JSONPath that
    /// does not compile.
    pub fn new(
        origin: Origin,
        cfg: LogsSource,
        checkpoints: &BTreeMap<String, String>,
    ) -> Result<LogTailer> {
        let parser = match cfg.parser.kind {
            LogParserKind::Json => Parser::Json,
            LogParserKind::Regex => Parser::Regex(
                Regex::new(cfg.parser.regex.as_deref().unwrap_or_default()).map_err(|e| {
                    config_error(
                        "spec.logs.parser.regex",
                        format!("not a valid regular expression: {e}"),
                    )
                })?,
            ),
        };
        let f = |name: &str, p: &str| compile_path(&format!("spec.logs.mapping.{name}"), p);
        let m = &cfg.mapping;
        let mapping = Mapping {
            when: m.when.as_deref().map(|p| f("when", p)).transpose()?,
            subject: m.subject.as_deref().map(|p| f("subject", p)).transpose()?,
            time: m.time.as_deref().map(|p| f("time", p)).transpose()?,
            data: m
                .data
                .iter()
                .map(|(k, p)| Ok((k.clone(), f(&format!("data.{k}"), p)?)))
                .collect::<Result<_>>()?,
        };
        let positions = checkpoints
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.strip_prefix("f/")?.to_string(),
                    serde_json::from_str(v).ok()?,
                ))
            })
            .collect();
        Ok(LogTailer {
            origin,
            cfg,
            parser,
            mapping,
            positions,
            skipped: 0,
        })
    }

    /// Seconds between polls.
    pub fn poll_secs(&self) -> u32 {
        self.cfg.poll_secs
    }

    /// Lines skipped so far (did not parse, or lacked the `when` path).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The files to read: the selected pods' container logs under the pod log root,
    /// or the configured globs.
    pub fn files(&self, pods: &[Arc<Pod>]) -> Vec<LogFile> {
        let mut out = Vec::new();
        if let Some(lp) = &self.cfg.pods {
            let sel = lp.pod_selector();
            for pod in pods
                .iter()
                .filter(|p| selects(&sel, &self.origin.namespace, p))
            {
                let (ns, name, uid) = pod_key(pod);
                let dir = Path::new(&self.cfg.pod_log_root).join(format!("{ns}_{name}_{uid}"));
                let Ok(containers) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for c in containers.flatten() {
                    let cname = c.file_name().to_string_lossy().to_string();
                    if !lp.containers.is_empty() && !lp.containers.contains(&cname) {
                        continue;
                    }
                    let Ok(files) = std::fs::read_dir(c.path()) else {
                        continue;
                    };
                    for f in files.flatten() {
                        let fname = f.file_name().to_string_lossy().to_string();
                        if is_container_log(&fname) {
                            out.push(LogFile {
                                path: f.path(),
                                pod: Some(Arc::clone(pod)),
                            });
                        }
                    }
                }
            }
        }
        for pattern in &self.cfg.paths {
            for path in glob::glob(pattern).into_iter().flatten().flatten() {
                out.push(LogFile { path, pod: None });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }

    /// Reads what is new in `files` at `now_ms`.
    pub fn poll(&mut self, files: &[LogFile], now_ms: i64) -> Output {
        let mut out = Output::default();
        for file in files {
            if let Err(e) = self.read_file(file, now_ms, &mut out) {
                tracing::debug!(path = %file.path.display(), error = %e, "Log file not readable this time");
            }
        }
        self.positions.retain(|fp, pos| {
            if pos.seen_ms == 0 {
                // Restored from a checkpoint: the forgetting clock starts now.
                pos.seen_ms = now_ms;
            }
            let keep = now_ms - pos.seen_ms < FORGET_AFTER_MS;
            if !keep {
                out.checkpoints.insert(format!("f/{fp}"), None);
            }
            keep
        });
        out
    }

    fn read_file(&mut self, file: &LogFile, now_ms: i64, out: &mut Output) -> std::io::Result<()> {
        let mut f = std::fs::File::open(&file.path)?;
        let len = f.metadata()?.len();
        let mut head = vec![0; FINGERPRINT_BYTES];
        let n = read_up_to(&mut f, &mut head)?;
        head.truncate(n);
        let first_line = match head.iter().position(|b| *b == b'\n') {
            Some(i) => &head[..=i],
            None if n == FINGERPRINT_BYTES => &head[..],
            None => return Ok(()), // no full first line yet
        };
        let fp = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(first_line));
        let mut pos = self.positions.get(&fp).copied().unwrap_or_default();
        pos.seen_ms = now_ms;
        if len < pos.offset {
            pos = Position {
                offset: 0,
                generation: pos.generation + 1,
                seen_ms: now_ms,
            };
        }
        let before = pos;
        if len > pos.offset {
            f.seek(SeekFrom::Start(pos.offset))?;
            let mut buf = Vec::new();
            (&mut f)
                .take(MAX_READ_BYTES.min(len - pos.offset))
                .read_to_end(&mut buf)?;
            let (records, consumed) = self.split_records(&buf, pos.offset);
            let generation = pos.generation.to_string();
            for r in records {
                if let Some(e) = self.record_event(file, &fp, &generation, r, now_ms) {
                    out.events.push(e);
                }
            }
            pos.offset += consumed;
        }
        if pos.offset != before.offset
            || pos.generation != before.generation
            || !self.positions.contains_key(&fp)
        {
            out.checkpoints.insert(
                format!("f/{fp}"),
                Some(serde_json::to_string(&pos).expect("positions serialize")),
            );
        }
        self.positions.insert(fp, pos);
        Ok(())
    }

    /// Splits `buf` (read from `base`) into complete logical lines; returns them and
    /// how many bytes they span (a trailing incomplete line or `P` run is left).
    fn split_records(&mut self, buf: &[u8], base: u64) -> (Vec<Record>, u64) {
        let cri = self.cfg.effective_format() == LogFormat::Cri;
        let mut records = Vec::new();
        let mut consumed = 0usize;
        let mut pending: Option<(usize, String)> = None;
        let mut start = 0usize;
        while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
            let line_end = start + nl;
            let line = String::from_utf8_lossy(&buf[start..line_end]);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if !cri {
                records.push(Record {
                    offset: base + start as u64,
                    time: None,
                    message: line.to_string(),
                });
                consumed = line_end + 1;
            } else {
                match cri::parse(line) {
                    None => {
                        self.skipped += 1;
                        pending = None;
                        consumed = line_end + 1;
                    }
                    Some(c) => {
                        let (first, mut msg) = pending.take().unwrap_or((start, String::new()));
                        msg.push_str(c.message);
                        if c.last {
                            records.push(Record {
                                offset: base + first as u64,
                                time: Some(c.time.to_string()),
                                message: msg,
                            });
                            consumed = line_end + 1;
                        } else {
                            pending = Some((first, msg));
                        }
                    }
                }
            }
            start = line_end + 1;
        }
        // A logical line longer than one read: give up waiting for its end.
        if let Some((first, msg)) = pending
            && first == 0
            && buf.len() as u64 >= MAX_READ_BYTES
        {
            records.push(Record {
                offset: base,
                time: None,
                message: msg,
            });
            consumed = start;
        }
        (records, consumed as u64)
    }

    fn record_event(
        &mut self,
        file: &LogFile,
        fp: &str,
        generation: &str,
        r: Record,
        now_ms: i64,
    ) -> Option<tally_crds::event::CloudEvent> {
        let parsed = match &self.parser {
            Parser::Json => serde_json::from_str::<Value>(&r.message)
                .ok()
                .filter(Value::is_object),
            Parser::Regex(re) => re.captures(&r.message).map(|caps| {
                let obj: Map<String, Value> = re
                    .capture_names()
                    .flatten()
                    .filter_map(|n| {
                        Some((
                            n.to_string(),
                            Value::String(caps.name(n)?.as_str().to_string()),
                        ))
                    })
                    .collect();
                Value::Object(obj)
            }),
        };
        let Some(parsed) = parsed else {
            self.skipped += 1;
            return None;
        };
        let m = &self.mapping;
        if let Some(w) = &m.when
            && select_one(w, &parsed).is_none_or(Value::is_null)
        {
            self.skipped += 1;
            return None;
        }
        let subject = m
            .subject
            .as_ref()
            .and_then(|p| select_one(p, &parsed))
            .and_then(tally_crds::canonical_string)
            .or_else(|| {
                let label = self
                    .cfg
                    .pods
                    .as_ref()
                    .and_then(|p| p.subject_label.as_deref());
                file.pod.as_ref().map(|p| subject_of(p, label))
            })
            .unwrap_or_else(|| self.origin.namespace.clone());
        let time_ms = m
            .time
            .as_ref()
            .and_then(|p| select_one(p, &parsed))
            .and_then(time_ms_of)
            .or_else(|| {
                r.time
                    .as_deref()
                    .and_then(|t| tally_crds::event::parse_time_ms(t).ok())
            })
            .unwrap_or(now_ms);
        let data = if m.data.is_empty() {
            match parsed {
                Value::Object(o) => o,
                _ => Map::new(),
            }
        } else {
            m.data
                .iter()
                .filter_map(|(k, p)| Some((k.clone(), select_one(p, &parsed)?.clone())))
                .collect()
        };
        let offset = r.offset.to_string();
        Some(
            self.origin
                .event(event_id(&[fp, generation, &offset]), subject, time_ms, data),
        )
    }
}

/// `0.log`, `1.log`, `0.log.20260101-000000` — not compressed or temporary rotations.
fn is_container_log(name: &str) -> bool {
    let Some((_, rest)) = name.split_once(".log") else {
        return false;
    };
    !(rest.ends_with(".gz") || rest.ends_with(".tmp")) && (rest.is_empty() || rest.starts_with('.'))
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
