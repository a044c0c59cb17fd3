//! The `openai` preset: the organization usage API for completions
//! (`GET /v1/organization/usage/completions`), grouped by project, API key and model.
//!
//! A response page is `{"data": [bucket], "has_more", "next_page"}`; a bucket is
//! `{"start_time", "end_time", "results": [result]}` and a result carries the token
//! counts (`input_tokens`, `output_tokens`, `input_cached_tokens`, audio tokens,
//! `num_model_requests`) with the group's `project_id`, `api_key_id`, `model` and
//! `batch`. One event per closed bucket and result; its id hashes the bucket start and
//! the group, so a re-poll deduplicates.
use serde_json::{Map, Value, json};
use tally_crds::collector::OpenAiSubject;
use tally_crds::event::CloudEvent;

use super::{HttpPoller, MAX_PAGES, get_json};
use crate::{Error, Result, event_id};

/// Token and request counts copied from a result into the event's data.
const COUNTS: [&str; 6] = [
    "input_tokens",
    "output_tokens",
    "input_cached_tokens",
    "input_audio_tokens",
    "output_audio_tokens",
    "num_model_requests",
];

/// Group fields copied from a result.
const GROUPS: [&str; 4] = ["project_id", "api_key_id", "model", "batch"];

pub(super) async fn fetch(
    poller: &HttpPoller,
    client: &reqwest::Client,
    headers: &[(String, String)],
    start: i64,
    end: i64,
) -> Result<Vec<CloudEvent>> {
    let bucket = i64::from(poller.cfg.bucket_secs);
    let (width, limit) = match bucket {
        60 => ("1m", 1440),
        3600 => ("1h", 168),
        _ => ("1d", 31),
    };
    let base = poller
        .cfg
        .url
        .clone()
        .unwrap_or_else(|| "https://api.openai.com".into());
    let subject_by = poller.cfg.openai.clone().unwrap_or_default().subject;
    let mut events = Vec::new();
    let mut page: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut url = reqwest::Url::parse(&format!(
            "{}/v1/organization/usage/completions",
            base.trim_end_matches('/')
        ))
        .map_err(|e| Error::Fetch {
            url: base.clone(),
            message: format!("not a valid URL: {e}"),
        })?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("start_time", &start.to_string())
                .append_pair("end_time", &end.to_string())
                .append_pair("bucket_width", width)
                .append_pair("limit", &limit.to_string());
            for g in ["project_id", "api_key_id", "model"] {
                q.append_pair("group_by", g);
            }
            if let Some(p) = &page {
                q.append_pair("page", p);
            }
        }
        let body = get_json(client, url.as_str(), headers, poller.timeout()).await?;
        let bad = |message: &str| Error::Parse {
            url: url.to_string(),
            message: message.to_string(),
        };
        let buckets = body["data"]
            .as_array()
            .ok_or_else(|| bad("no data array"))?;
        for b in buckets {
            let (Some(bs), Some(be)) = (b["start_time"].as_i64(), b["end_time"].as_i64()) else {
                return Err(bad("a bucket without start_time/end_time"));
            };
            if be > end {
                continue; // still open at the time of the request
            }
            for r in b["results"].as_array().into_iter().flatten() {
                events.push(result_event(poller, subject_by, bs, be, r));
            }
        }
        page = body["next_page"].as_str().map(str::to_string);
        if !body["has_more"].as_bool().unwrap_or(false) || page.is_none() {
            return Ok(events);
        }
    }
    Err(Error::Parse {
        url: base,
        message: format!("still paging after {MAX_PAGES} pages"),
    })
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn result_event(
    poller: &HttpPoller,
    subject_by: OpenAiSubject,
    start: i64,
    end: i64,
    r: &Value,
) -> CloudEvent {
    let mut data = Map::new();
    for k in COUNTS {
        data.insert(k.into(), json!(r[k].as_f64().unwrap_or(0.0)));
    }
    for k in GROUPS {
        if !r[k].is_null() {
            data.insert(k.into(), r[k].clone());
        }
    }
    data.insert("bucket_seconds".into(), json!(end - start));
    let group: Vec<String> = GROUPS.iter().map(|k| text(&r[*k])).collect();
    let start_s = start.to_string();
    let mut parts = vec!["openai-completions", start_s.as_str()];
    parts.extend(group.iter().map(String::as_str));
    let subject_field = match subject_by {
        OpenAiSubject::Project => "project_id",
        OpenAiSubject::ApiKey => "api_key_id",
    };
    let subject = Some(text(&r[subject_field]))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unassigned".into());
    poller
        .origin
        .event(event_id(&parts), subject, start * 1000, data)
}
