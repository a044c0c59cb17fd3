//! The usage event: a CloudEvents 1.0 event in JSON (structured mode).
//!
//! Validation works on the raw JSON so that every problem is reported with its field,
//! not only the first one serde would stop at. Rules:
//! - `specversion` is `"1.0"`; `id`, `source`, `type`, `subject` are non-empty strings;
//! - `time`, when present, is RFC 3339; it is kept to the millisecond (finer digits are
//!   truncated); when absent the receive time is used;
//! - `datacontenttype`, when present, is `application/json` (parameters such as
//!   `; charset=utf-8` are allowed); `data`, when present, is a JSON object;
//! - other attributes are CloudEvents extensions: lowercase ASCII letters and digits,
//!   at most 20 characters, with string, number or boolean values; they are kept.
//!
//! Length limits (in characters; `data` in bytes serialized) keep one event bounded;
//! see the `MAX_*` constants.
use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest `id`.
pub const MAX_ID_LEN: usize = 256;
/// Longest `source` (a URI-reference).
pub const MAX_SOURCE_LEN: usize = 512;
/// Longest `type`.
pub const MAX_TYPE_LEN: usize = 256;
/// Longest `subject` (the customer).
pub const MAX_SUBJECT_LEN: usize = 256;
/// Longest `time` string.
pub const MAX_TIME_LEN: usize = 64;
/// Longest `datacontenttype`.
pub const MAX_CONTENT_TYPE_LEN: usize = 128;
/// Longest `dataschema`.
pub const MAX_DATASCHEMA_LEN: usize = 1024;
/// Largest `data` object, serialized compactly.
pub const MAX_DATA_BYTES: usize = 64 * 1024;
/// Most extension attributes on one event.
pub const MAX_EXTENSIONS: usize = 32;
/// Longest extension attribute name (the CloudEvents spec's recommendation).
pub const MAX_EXTENSION_NAME_LEN: usize = 20;
/// Longest string value of an extension attribute.
pub const MAX_EXTENSION_VALUE_LEN: usize = 1024;

/// A problem with one field of one event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventError {
    /// The attribute, e.g. `subject` or `data`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The CloudEvents JSON wire shape, as the API returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    /// Always `1.0`.
    pub specversion: String,
    /// Identity within `source`.
    pub id: String,
    /// Producer of the event.
    pub source: String,
    /// Event type; meters select on it.
    #[serde(rename = "type")]
    pub ty: String,
    /// The customer the usage belongs to.
    pub subject: String,
    /// When the usage happened (RFC 3339, milliseconds, UTC).
    pub time: String,
    /// Media type of `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    /// Schema of `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    /// The usage payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Extension attributes.
    #[serde(flatten)]
    pub extensions: BTreeMap<String, Value>,
}

/// A validated usage event.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageEvent {
    /// Identity within `source`.
    pub id: String,
    /// Producer of the event.
    pub source: String,
    /// Event type.
    pub ty: String,
    /// The customer.
    pub subject: String,
    /// Event time, milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// Media type of `data`, if given.
    pub datacontenttype: Option<String>,
    /// Schema of `data`, if given.
    pub dataschema: Option<String>,
    /// The usage payload: always an object when present.
    pub data: Option<Map<String, Value>>,
    /// Extension attributes (scalars).
    pub extensions: BTreeMap<String, Value>,
}

impl UsageEvent {
    /// Validates one event in JSON; `received_ms` stands in for a missing `time`.
    /// Returns every problem found, each naming its field.
    pub fn from_json(value: &Value, received_ms: i64) -> Result<UsageEvent, Vec<EventError>> {
        let mut errors = Vec::new();
        let Some(obj) = value.as_object() else {
            return Err(vec![err(
                "",
                format!("an event must be a JSON object, got {}", kind(value)),
            )]);
        };
        match obj.get("specversion") {
            Some(Value::String(s)) if s == "1.0" => {}
            Some(Value::String(s)) => {
                errors.push(err("specversion", format!("must be \"1.0\", got {s:?}")))
            }
            Some(v) => errors.push(err(
                "specversion",
                format!("must be the string \"1.0\", got {}", kind(v)),
            )),
            None => errors.push(err("specversion", "is required and must be \"1.0\"")),
        }
        let id = required_string(obj, "id", MAX_ID_LEN, &mut errors);
        let source = required_string(obj, "source", MAX_SOURCE_LEN, &mut errors);
        let ty = required_string(obj, "type", MAX_TYPE_LEN, &mut errors);
        let subject = required_string(obj, "subject", MAX_SUBJECT_LEN, &mut errors);
        let time_ms = match obj.get("time") {
            None | Some(Value::Null) => Some(received_ms),
            Some(Value::String(s)) if s.chars().count() > MAX_TIME_LEN => {
                errors.push(err(
                    "time",
                    format!("must be at most {MAX_TIME_LEN} characters"),
                ));
                None
            }
            Some(Value::String(s)) => match parse_time_ms(s) {
                Ok(ms) => Some(ms),
                Err(e) => {
                    errors.push(err("time", e));
                    None
                }
            },
            Some(v) => {
                errors.push(err(
                    "time",
                    format!("must be an RFC 3339 string, got {}", kind(v)),
                ));
                None
            }
        };
        let datacontenttype =
            optional_string(obj, "datacontenttype", MAX_CONTENT_TYPE_LEN, &mut errors);
        if let Some(ct) = &datacontenttype {
            let media = ct.split(';').next().unwrap_or_default().trim();
            if !media.eq_ignore_ascii_case("application/json") {
                errors.push(err(
                    "datacontenttype",
                    format!("must be application/json when present, got {ct:?}"),
                ));
            }
        }
        let dataschema = optional_string(obj, "dataschema", MAX_DATASCHEMA_LEN, &mut errors);
        let data = match obj.get("data") {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => {
                let size = serde_json::to_vec(map)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
                if size > MAX_DATA_BYTES {
                    errors.push(err(
                        "data",
                        format!("is {size} bytes serialized; the limit is {MAX_DATA_BYTES}"),
                    ));
                }
                Some(map.clone())
            }
            Some(v) => {
                errors.push(err(
                    "data",
                    format!("must be a JSON object, got {}", kind(v)),
                ));
                None
            }
        };
        let mut extensions = BTreeMap::new();
        for (name, v) in obj {
            if KNOWN_ATTRIBUTES.contains(&name.as_str()) {
                continue;
            }
            if name.is_empty()
                || name.len() > MAX_EXTENSION_NAME_LEN
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                errors.push(err(name, format!(
                    "unknown attribute; extension attribute names are 1-{MAX_EXTENSION_NAME_LEN} lowercase letters or digits (did you mean one of {}?)",
                    KNOWN_ATTRIBUTES.join(", ")
                )));
                continue;
            }
            match v {
                Value::String(s) if s.chars().count() > MAX_EXTENSION_VALUE_LEN => {
                    errors.push(err(
                        name,
                        format!("must be at most {MAX_EXTENSION_VALUE_LEN} characters"),
                    ))
                }
                Value::String(_) | Value::Number(_) | Value::Bool(_) => {
                    extensions.insert(name.clone(), v.clone());
                }
                Value::Null => {}
                _ => errors.push(err(
                    name,
                    format!(
                        "extension attributes must be strings, numbers or booleans, got {}",
                        kind(v)
                    ),
                )),
            }
        }
        if extensions.len() > MAX_EXTENSIONS {
            errors.push(err(
                "",
                format!("at most {MAX_EXTENSIONS} extension attributes are allowed"),
            ));
        }
        match (errors.is_empty(), id, source, ty, subject, time_ms) {
            (true, Some(id), Some(source), Some(ty), Some(subject), Some(time_ms)) => {
                Ok(UsageEvent {
                    id,
                    source,
                    ty,
                    subject,
                    time_ms,
                    datacontenttype,
                    dataschema,
                    data,
                    extensions,
                })
            }
            _ => Err(errors),
        }
    }

    /// The event time as a UTC timestamp.
    pub fn time(&self) -> DateTime<Utc> {
        ms_to_datetime(self.time_ms)
    }

    /// The event in its CloudEvents JSON wire shape (time rendered with milliseconds).
    pub fn to_cloud_event(&self) -> CloudEvent {
        CloudEvent {
            specversion: "1.0".to_string(),
            id: self.id.clone(),
            source: self.source.clone(),
            ty: self.ty.clone(),
            subject: self.subject.clone(),
            time: format_ms(self.time_ms),
            datacontenttype: self.datacontenttype.clone(),
            dataschema: self.dataschema.clone(),
            data: self.data.clone().map(Value::Object),
            extensions: self.extensions.clone(),
        }
    }
}

const KNOWN_ATTRIBUTES: [&str; 9] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
];

/// Parses an RFC 3339 time into milliseconds since the epoch (sub-millisecond digits
/// are truncated toward the past).
pub fn parse_time_ms(s: &str) -> Result<i64, String> {
    let t = DateTime::parse_from_rfc3339(s).map_err(|e| {
        format!("must be an RFC 3339 time like 2024-01-02T03:04:05.678Z ({e}), got {s:?}")
    })?;
    Ok(t.timestamp_millis())
}

/// Renders milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_ms(ms: i64) -> String {
    ms_to_datetime(ms).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Milliseconds since the epoch as a UTC timestamp (saturating at chrono's range).
pub fn ms_to_datetime(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn required_string(
    obj: &Map<String, Value>,
    field: &str,
    max: usize,
    errors: &mut Vec<EventError>,
) -> Option<String> {
    match obj.get(field) {
        Some(Value::String(s)) if s.is_empty() => {
            errors.push(err(field, "must not be empty"));
            None
        }
        Some(Value::String(s)) if s.chars().count() > max => {
            errors.push(err(
                field,
                format!("is {} characters; the limit is {max}", s.chars().count()),
            ));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            errors.push(err(field, format!("must be a string, got {}", kind(v))));
            None
        }
        None => {
            errors.push(err(field, "is required"));
            None
        }
    }
}

fn optional_string(
    obj: &Map<String, Value>,
    field: &str,
    max: usize,
    errors: &mut Vec<EventError>,
) -> Option<String> {
    match obj.get(field) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() > max => {
            errors.push(err(
                field,
                format!("is {} characters; the limit is {max}", s.chars().count()),
            ));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            errors.push(err(field, format!("must be a string, got {}", kind(v))));
            None
        }
    }
}

fn err(field: &str, message: impl Into<String>) -> EventError {
    EventError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// A short name of a JSON value's type, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000_000;

    fn valid() -> Value {
        json!({"specversion": "1.0", "id": "e1", "source": "app", "type": "api_request",
               "subject": "acme", "time": "2024-01-02T03:04:05.678Z", "data": {"route": "/x"}})
    }

    fn with(field: &str, v: Value) -> Value {
        let mut e = valid();
        e[field] = v;
        e
    }

    fn without(field: &str) -> Value {
        let mut e = valid();
        e.as_object_mut().unwrap().remove(field);
        e
    }

    fn fields(r: Result<UsageEvent, Vec<EventError>>) -> Vec<String> {
        r.expect_err("should be invalid")
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn a_valid_event_keeps_milliseconds() {
        let e = UsageEvent::from_json(&valid(), NOW).unwrap();
        assert_eq!(e.time_ms, 1_704_164_645_678);
        assert_eq!(e.to_cloud_event().time, "2024-01-02T03:04:05.678Z");
    }

    #[test]
    fn a_missing_time_is_the_receive_time_and_offsets_are_normalized() {
        assert_eq!(
            UsageEvent::from_json(&without("time"), NOW)
                .unwrap()
                .time_ms,
            NOW
        );
        let e = UsageEvent::from_json(
            &with("time", json!("2024-01-02T08:34:05.678901+05:30")),
            NOW,
        )
        .unwrap();
        assert_eq!(e.time_ms, 1_704_164_645_678);
    }

    #[test]
    fn each_bad_field_is_named() {
        let long = |n: usize| json!("x".repeat(n));
        let cases: Vec<(Value, &str)> = vec![
            (with("specversion", json!("0.3")), "specversion"),
            (without("specversion"), "specversion"),
            (with("specversion", json!(1.0)), "specversion"),
            (without("id"), "id"),
            (with("id", json!("")), "id"),
            (with("id", json!(7)), "id"),
            (with("id", long(MAX_ID_LEN + 1)), "id"),
            (without("source"), "source"),
            (with("source", long(MAX_SOURCE_LEN + 1)), "source"),
            (without("type"), "type"),
            (with("type", json!("")), "type"),
            (without("subject"), "subject"),
            (with("subject", json!(null)), "subject"),
            (with("subject", long(MAX_SUBJECT_LEN + 1)), "subject"),
            (with("time", json!("yesterday")), "time"),
            (with("time", json!("2024-01-02 03:04:05")), "time"),
            (with("time", json!(1700000000)), "time"),
            (
                with("datacontenttype", json!("text/plain")),
                "datacontenttype",
            ),
            (with("data", json!([1, 2])), "data"),
            (with("data", json!("tokens=5")), "data"),
            (
                with("data", json!({"blob": "x".repeat(MAX_DATA_BYTES)})),
                "data",
            ),
            (with("Bad-Ext", json!("x")), "Bad-Ext"),
            (with("traceparent2", json!({"nested": 1})), "traceparent2"),
        ];
        for (event, field) in cases {
            assert_eq!(
                fields(UsageEvent::from_json(&event, NOW)),
                vec![field],
                "{event}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        let event = json!({"specversion": "2.0", "id": "", "type": 5, "time": "noon", "data": 3});
        assert_eq!(
            fields(UsageEvent::from_json(&event, NOW)),
            vec![
                "specversion",
                "id",
                "source",
                "type",
                "subject",
                "time",
                "data"
            ]
        );
    }

    #[test]
    fn json_content_type_with_parameters_and_extensions_are_accepted() {
        let mut e = with("datacontenttype", json!("application/json; charset=utf-8"));
        e["traceparent"] = json!("00-abc");
        let ev = UsageEvent::from_json(&e, NOW).unwrap();
        assert_eq!(ev.extensions.get("traceparent"), Some(&json!("00-abc")));
        assert_eq!(
            serde_json::to_value(ev.to_cloud_event()).unwrap()["traceparent"],
            json!("00-abc")
        );
    }

    #[test]
    fn a_non_object_is_one_error() {
        assert_eq!(fields(UsageEvent::from_json(&json!([1]), NOW)), vec![""]);
    }
}
