//! `httpApi`: usage polled from cloud and vendor usage APIs.
//!
//! Each poll asks for the time range from the checkpoint (`until`, the end of the last
//! delivered range) to the last bucket boundary that lies `delaySecs` in the past, so
//! only closed buckets are requested: a bucket still filling would be frozen at a
//! partial value by dedup. At most [`MAX_BUCKETS_PER_POLL`] buckets are asked for at
//! once; a caller that is behind polls again right away. Without a checkpoint (first
//! start, or a new leader elsewhere) the range starts `lookbackSecs` ago; the overlap
//! with what a previous leader shipped deduplicates, because ids are stable across
//! polls: the generic mapping reads them from the item, the `openai` preset hashes
//! (bucket start, project, API key, model, batch).
//!
//! Its watermark is the end of the last range fetched: the buckets before it were
//! closed (as `delaySecs` says the API closes them) and fetched whole.
//!
//! Header values are read from the agent's environment or mounted files at request
//! time, so Secrets never appear in the configuration.
use std::collections::BTreeMap;

use serde_json::{Map, Value};
use serde_json_path::JsonPath;
use tally_crds::collector::{HttpApiSource, HttpHeader, HttpPreset};

use crate::{Error, Origin, Output, Result, compile_path, select_one, time_ms_of};

mod openai;
#[cfg(test)]
mod tests;

/// Most buckets one poll requests.
pub const MAX_BUCKETS_PER_POLL: i64 = 1440;

/// Most pages one poll follows (a guard against an API that never stops paging).
const MAX_PAGES: usize = 1000;

#[derive(Debug)]
struct Mapping {
    items: JsonPath,
    id: JsonPath,
    subject: JsonPath,
    time: JsonPath,
    value: Option<JsonPath>,
    data: Vec<(String, JsonPath)>,
    next_cursor: Option<JsonPath>,
    cursor_param: String,
}

/// The HTTP API collector of one Collector.
#[derive(Debug)]
pub struct HttpPoller {
    origin: Origin,
    cfg: HttpApiSource,
    mapping: Option<Mapping>,
    until: Option<i64>,
}

/// What one poll did.
#[derive(Debug, Default)]
pub struct Poll {
    /// Events and the new checkpoint.
    pub output: Output,
    /// Whether the poll reached the newest closed bucket (else poll again soon).
    pub caught_up: bool,
}

impl HttpPoller {
    /// A poller resuming from its checkpoint (`until`); fails naming a JSONPath that
    /// does not compile.
    pub fn new(
        origin: Origin,
        cfg: HttpApiSource,
        checkpoints: &BTreeMap<String, String>,
    ) -> Result<HttpPoller> {
        let mapping = match &cfg.mapping {
            None => None,
            Some(m) => {
                let f =
                    |name: &str, p: &str| compile_path(&format!("spec.httpApi.mapping.{name}"), p);
                Some(Mapping {
                    items: f("items", &m.items)?,
                    id: f("id", &m.id)?,
                    subject: f("subject", &m.subject)?,
                    time: f("time", &m.time)?,
                    value: m.value.as_deref().map(|p| f("value", p)).transpose()?,
                    data: m
                        .data
                        .iter()
                        .map(|(k, p)| Ok((k.clone(), f(&format!("data.{k}"), p)?)))
                        .collect::<Result<_>>()?,
                    next_cursor: m
                        .next_cursor
                        .as_deref()
                        .map(|p| f("nextCursor", p))
                        .transpose()?,
                    cursor_param: m.cursor_param.clone(),
                })
            }
        };
        let until = checkpoints.get("until").and_then(|v| v.parse().ok());
        Ok(HttpPoller {
            origin,
            cfg,
            mapping,
            until,
        })
    }

    /// Seconds between polls.
    pub fn interval_secs(&self) -> u32 {
        self.cfg.interval_secs
    }

    /// The range the next poll asks for at `now` (Unix seconds), if any bucket closed.
    pub fn next_range(&self, now: i64) -> Option<(i64, i64)> {
        let b = i64::from(self.cfg.bucket_secs.max(1));
        let closed = (now - i64::from(self.cfg.delay_secs)).div_euclid(b) * b;
        let start = self
            .until
            .unwrap_or_else(|| (closed - i64::from(self.cfg.lookback_secs)).div_euclid(b) * b);
        let end = closed.min(start + MAX_BUCKETS_PER_POLL * b);
        (start < end).then_some((start, end))
    }

    /// Polls the API for the next closed range.
    pub async fn poll(&mut self, client: &reqwest::Client, now: i64) -> Result<Poll> {
        let Some((start, end)) = self.next_range(now) else {
            return Ok(Poll {
                caught_up: true,
                ..Poll::default()
            });
        };
        let headers = self.headers()?;
        let events = match self.cfg.preset {
            Some(HttpPreset::Openai) => openai::fetch(self, client, &headers, start, end).await?,
            None => self.fetch_generic(client, &headers, start, end).await?,
        };
        self.until = Some(end);
        let mut output = Output {
            events,
            ..Output::default()
        };
        output
            .checkpoints
            .insert("until".into(), Some(end.to_string()));
        // every bucket before `end` is closed (`delaySecs`) and was fetched whole
        output.watermark = Some(crate::Mark {
            until_ms: end * 1000,
            gaps: Vec::new(),
        });
        Ok(Poll {
            output,
            caught_up: self.next_range(now).is_none(),
        })
    }

    fn headers(&self) -> Result<Vec<(String, String)>> {
        self.cfg.headers.iter().map(header_value).collect()
    }

    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(u64::from(self.cfg.timeout_ms))
    }

    async fn fetch_generic(
        &self,
        client: &reqwest::Client,
        headers: &[(String, String)],
        start: i64,
        end: i64,
    ) -> Result<Vec<tally_crds::event::CloudEvent>> {
        let m = self
            .mapping
            .as_ref()
            .expect("validated: generic sources have a mapping");
        let base = fill_placeholders(self.cfg.url.as_deref().unwrap_or_default(), start, end);
        let mut events = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut url = reqwest::Url::parse(&base).map_err(|e| Error::Fetch {
                url: base.clone(),
                message: format!("not a valid URL: {e}"),
            })?;
            if let Some(c) = &cursor {
                url.query_pairs_mut().append_pair(&m.cursor_param, c);
            }
            let page = get_json(client, url.as_str(), headers, self.timeout()).await?;
            for item in m.items.query(&page).all() {
                events.push(self.map_item(m, item, url.as_str())?);
            }
            cursor = m
                .next_cursor
                .as_ref()
                .and_then(|p| select_one(p, &page))
                .and_then(tally_crds::canonical_string)
                .filter(|c| !c.is_empty());
            if cursor.is_none() {
                return Ok(events);
            }
        }
        Err(Error::Parse {
            url: base,
            message: format!("still paging after {MAX_PAGES} pages"),
        })
    }

    fn map_item(
        &self,
        m: &Mapping,
        item: &Value,
        url: &str,
    ) -> Result<tally_crds::event::CloudEvent> {
        let bad = |what: &str| Error::Parse {
            url: url.to_string(),
            message: format!("an item has no usable {what}: {}", truncate(item)),
        };
        let id = select_one(&m.id, item)
            .and_then(tally_crds::canonical_string)
            .ok_or_else(|| bad("id"))?;
        let subject = select_one(&m.subject, item)
            .and_then(tally_crds::canonical_string)
            .ok_or_else(|| bad("subject"))?;
        let time_ms = select_one(&m.time, item)
            .and_then(time_ms_of)
            .ok_or_else(|| bad("time"))?;
        let mut data = Map::new();
        if let Some(p) = &m.value {
            data.insert(
                "value".into(),
                select_one(p, item).cloned().ok_or_else(|| bad("value"))?,
            );
        }
        for (k, p) in &m.data {
            if let Some(v) = select_one(p, item) {
                data.insert(k.clone(), v.clone());
            }
        }
        Ok(self.origin.event(id, subject, time_ms, data))
    }
}

fn truncate(v: &Value) -> String {
    clip(&v.to_string(), 200)
}

/// At most `n` bytes of `s` (cut at a character boundary), marked when cut.
fn clip(s: &str, n: usize) -> String {
    match s
        .char_indices()
        .map(|(i, _)| i)
        .take_while(|i| *i <= n)
        .last()
    {
        Some(end) if s.len() > n => format!("{}…", &s[..end]),
        _ => s.to_string(),
    }
}

/// Replaces `{start}`, `{end}`, `{start_rfc3339}`, `{end_rfc3339}`.
pub fn fill_placeholders(url: &str, start: i64, end: i64) -> String {
    let rfc = |s: i64| tally_crds::event::format_ms(s * 1000);
    url.replace("{start_rfc3339}", &rfc(start))
        .replace("{end_rfc3339}", &rfc(end))
        .replace("{start}", &start.to_string())
        .replace("{end}", &end.to_string())
}

/// Reads a header's value from its environment variable, file or literal.
pub fn header_value(h: &HttpHeader) -> Result<(String, String)> {
    let secret = |message: String| Error::Secret {
        header: h.name.clone(),
        message,
    };
    let value = if let Some(var) = &h.value_from_env {
        std::env::var(var).map_err(|_| secret(format!("environment variable {var} is not set")))?
    } else if let Some(r) = &h.value_from_secret {
        return Err(secret(format!(
            "valueFromSecret (Secret {}, key {}) is resolved by the operator when it renders a Collector; in a hand-written agent configuration use valueFromFile or valueFromEnv",
            r.name, r.key
        )));
    } else if let Some(file) = &h.value_from_file {
        std::fs::read_to_string(file)
            .map_err(|e| secret(format!("cannot read {file}: {e}")))?
            .trim_end_matches(['\n', '\r'])
            .to_string()
    } else {
        h.value.clone().unwrap_or_default()
    };
    Ok((h.name.clone(), format!("{}{value}", h.prefix)))
}

async fn get_json(
    client: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
    timeout: std::time::Duration,
) -> Result<Value> {
    let fetch_err = |message: String| Error::Fetch {
        url: url.to_string(),
        message,
    };
    let mut req = client.get(url).timeout(timeout);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.map_err(|e| fetch_err(e.to_string()))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| fetch_err(e.to_string()))?;
    if !status.is_success() {
        return Err(fetch_err(format!("status {status}: {}", clip(&body, 300))));
    }
    serde_json::from_str(&body).map_err(|e| Error::Parse {
        url: url.to_string(),
        message: format!("not JSON: {e}"),
    })
}
