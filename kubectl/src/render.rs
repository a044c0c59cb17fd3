//! Tables (aligned like `kubectl get`: text left, numbers right, three spaces apart),
//! JSON and CSV.
use serde_json::{Value, json};

use crate::args::Output;

/// A number with its integer digits grouped by thousands: `1234567.5` → `1,234,567.5`.
pub fn grouped(v: &Value) -> String {
    let text = match v {
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => f.to_string(),
            _ => n.to_string(),
        },
        other => return other.to_string(),
    };
    if text.contains(['e', 'E', 'i', 'N']) {
        return text; // exponent, inf, NaN: as is
    }
    let (sign, rest) = match text.strip_prefix('-') {
        Some(r) => ("-", r),
        None => ("", text.as_str()),
    };
    let (int, frac) = match rest.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (rest, None),
    };
    let mut out = String::with_capacity(text.len() + int.len() / 3);
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

/// Columns: a header and rows of cells; `numeric[i]` right-aligns column `i`.
fn table(header: &[String], rows: &[Vec<String>], numeric: &[bool]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i] - c.chars().count();
            let last = i + 1 == cells.len();
            if numeric[i] {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                if !last {
                    s.push_str(&" ".repeat(pad));
                }
            }
            if !last {
                s.push_str("   ");
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header);
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

fn csv_line(cells: &[String]) -> String {
    let quoted: Vec<String> = cells
        .iter()
        .map(|c| {
            if c.contains([',', '"', '\n']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.clone()
            }
        })
        .collect();
    format!("{}\n", quoted.join(","))
}

/// Pretty JSON.
pub fn json(v: &Value) -> String {
    format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
}

fn rows(answer: &Value) -> Vec<Value> {
    answer["data"].as_array().cloned().unwrap_or_default()
}

fn empty(answer: &Value) -> String {
    format!(
        "No usage from {} to {}.\n",
        answer["from"].as_str().unwrap_or("the first event"),
        answer["to"].as_str().unwrap_or("now")
    )
}

/// `usage` as a table.
pub fn usage(answer: &Value, group_by: &[String]) -> String {
    let data = rows(answer);
    if data.is_empty() {
        return empty(answer);
    }
    let windows = answer.get("windowSize").is_some_and(|w| w.is_string());
    let subjects = data.iter().any(|r| r["subject"].is_string());
    let groups: Vec<&String> = group_by.iter().filter(|g| *g != "subject").collect();
    let mut header = Vec::new();
    let mut numeric = Vec::new();
    if windows {
        header.push("WINDOW START".to_string());
        numeric.push(false);
    }
    if subjects {
        header.push("SUBJECT".to_string());
        numeric.push(false);
    }
    for g in &groups {
        header.push(g.to_uppercase());
        numeric.push(false);
    }
    header.push("VALUE".to_string());
    numeric.push(true);
    let cells: Vec<Vec<String>> = data
        .iter()
        .map(|r| {
            let mut c = Vec::new();
            if windows {
                c.push(r["windowStart"].as_str().unwrap_or_default().to_string());
            }
            if subjects {
                c.push(r["subject"].as_str().unwrap_or_default().to_string());
            }
            for g in &groups {
                c.push(match &r["groupBy"][g.as_str()] {
                    Value::String(s) => s.clone(),
                    _ => "<none>".to_string(),
                });
            }
            c.push(grouped(&r["value"]));
            c
        })
        .collect();
    table(&header, &cells, &numeric)
}

/// `top`: subjects by usage, most first (ties by subject), with their share.
pub fn top(answer: &Value, limit: usize, output: Output) -> String {
    let mut data: Vec<(String, f64, Value)> = rows(answer)
        .into_iter()
        .map(|r| {
            (
                r["subject"].as_str().unwrap_or_default().to_string(),
                r["value"].as_f64().unwrap_or(0.0),
                r["value"].clone(),
            )
        })
        .collect();
    let total: f64 = data.iter().map(|(_, v, _)| v).sum();
    data.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    data.truncate(limit);
    let share = |v: f64| {
        if total == 0.0 {
            "-".to_string()
        } else {
            format!("{:.1}%", v / total * 100.0)
        }
    };
    match output {
        Output::Json => json(&Value::Array(
            data.iter()
                .enumerate()
                .map(|(i, (s, v, raw))| {
                    json!({"rank": i + 1, "subject": s, "value": raw, "share": if total == 0.0 { 0.0 } else { v / total }})
                })
                .collect(),
        )),
        Output::Csv => {
            let mut out = csv_line(&["rank", "subject", "value", "share"].map(String::from));
            for (i, (s, v, raw)) in data.iter().enumerate() {
                out.push_str(&csv_line(&[
                    (i + 1).to_string(),
                    s.clone(),
                    raw.to_string(),
                    share(*v),
                ]));
            }
            out
        }
        Output::Table if data.is_empty() => empty(answer),
        Output::Table => {
            let header = ["RANK", "SUBJECT", "VALUE", "SHARE"].map(String::from);
            let cells: Vec<Vec<String>> = data
                .iter()
                .enumerate()
                .map(|(i, (s, v, raw))| vec![(i + 1).to_string(), s.clone(), grouped(raw), share(*v)])
                .collect();
            table(&header, &cells, &[true, false, true, true])
        }
    }
}

/// `budgets`.
pub fn budgets(list: &[tally_crds::UsageBudget], output: Output) -> String {
    let header = [
        "NAMESPACE",
        "NAME",
        "METER",
        "PERIOD",
        "USAGE",
        "PERCENT",
        "EXCEEDED",
        "READY",
    ]
    .map(String::from);
    let row = |b: &tally_crds::UsageBudget| {
        let status = b.status.clone().unwrap_or_default();
        let cond = |t: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == t)
                .map_or("-".to_string(), |c| c.status.clone())
        };
        let p = &b.spec.period;
        let period = match (&p.calendar, &p.rolling) {
            (Some(c), _) => format!(
                "{} {}",
                serde_json::to_value(c)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
                p.time_zone.as_deref().unwrap_or("UTC")
            ),
            (None, Some(r)) => format!("rolling {r}"),
            (None, None) => "-".into(),
        };
        vec![
            b.metadata.namespace.clone().unwrap_or_default(),
            b.metadata.name.clone().unwrap_or_default(),
            b.spec.meter.clone(),
            period,
            status.display.clone().unwrap_or_else(|| "-".into()),
            status.percent.clone().unwrap_or_else(|| "-".into()),
            cond("Exceeded"),
            cond("Ready"),
        ]
    };
    match output {
        Output::Json => json(&serde_json::to_value(list).unwrap_or_default()),
        Output::Csv => {
            let mut out = csv_line(&header.clone().map(|h| h.to_lowercase()));
            for b in list {
                out.push_str(&csv_line(&row(b)));
            }
            out
        }
        Output::Table if list.is_empty() => "No UsageBudgets found.\n".to_string(),
        Output::Table => {
            let cells: Vec<Vec<String>> = list.iter().map(row).collect();
            table(
                &header,
                &cells,
                &[false, false, false, false, true, true, false, false],
            )
        }
    }
}

/// `completeness`: the overall answer, then one row per source and interval missing.
pub fn completeness(answer: &Value, output: Output) -> String {
    let header = [
        "COLLECTOR",
        "NODE",
        "STATUS",
        "COMPLETE UP TO",
        "MISSING",
        "WHY",
    ]
    .map(String::from);
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let mut rows = Vec::new();
    for s in answer["sources"].as_array().into_iter().flatten() {
        let base = [
            text(&s["collector"]),
            text(&s["node"]),
            text(&s["status"]),
            text(&s["watermark"]),
        ];
        let missing = s["missing"].as_array().cloned().unwrap_or_default();
        if missing.is_empty() {
            rows.push(
                base.iter()
                    .cloned()
                    .chain(["-".into(), "-".into()])
                    .collect::<Vec<_>>(),
            );
        }
        for m in missing {
            let mut why = text(&m["reason"]);
            if let Some(pods) = m["pods"].as_array().filter(|p| !p.is_empty()) {
                let names: Vec<String> = pods.iter().map(text).collect();
                why.push_str(&format!(" (pods: {})", names.join(", ")));
            }
            rows.push(
                base.iter()
                    .cloned()
                    .chain([format!("{} – {}", text(&m["from"]), text(&m["to"])), why])
                    .collect(),
            );
        }
    }
    for u in answer["unknown"].as_array().into_iter().flatten() {
        rows.push(vec![
            "-".into(),
            "-".into(),
            "unknown".into(),
            "-".into(),
            "-".into(),
            format!("{}: {}", text(&u["source"]), text(&u["reason"])),
        ]);
    }
    match output {
        Output::Json => json(answer),
        Output::Csv => {
            let mut out = csv_line(&header.clone().map(|h| h.to_lowercase()));
            for r in &rows {
                out.push_str(&csv_line(r));
            }
            out
        }
        Output::Table => {
            let mut out = format!("{}\n", text(&answer["status"]).to_uppercase());
            if !rows.is_empty() {
                out.push_str(&table(&header, &rows, &[false; 6]));
            }
            out
        }
    }
}

/// `meters`.
pub fn meters(list: &Value, output: Output) -> String {
    let items = list.as_array().cloned().unwrap_or_default();
    let row = |m: &Value| {
        let groups: Vec<&str> = m["groupBy"]
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        vec![
            m["slug"].as_str().unwrap_or_default().to_string(),
            m["aggregation"].as_str().unwrap_or_default().to_string(),
            m["eventType"].as_str().unwrap_or_default().to_string(),
            m["valueProperty"].as_str().unwrap_or("-").to_string(),
            if groups.is_empty() {
                "-".to_string()
            } else {
                groups.join(",")
            },
        ]
    };
    let header = [
        "SLUG",
        "AGGREGATION",
        "EVENT TYPE",
        "VALUE PROPERTY",
        "GROUP BY",
    ]
    .map(String::from);
    match output {
        Output::Json => json(list),
        Output::Csv => {
            let mut out = csv_line(&header.clone().map(|h| h.to_lowercase().replace(' ', "_")));
            for m in &items {
                out.push_str(&csv_line(&row(m)));
            }
            out
        }
        Output::Table if items.is_empty() => "No meters in this namespace.\n".to_string(),
        Output::Table => {
            let cells: Vec<Vec<String>> = items.iter().map(row).collect();
            table(&header, &cells, &[false; 5])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completeness_names_who_is_behind_and_since_when() {
        let answer = json!({"status": "incomplete", "sources": [
            {"collector": "gpus", "node": "n7", "status": "behind", "watermark": "T1",
             "missing": [{"from": "T1", "to": "T2", "reason": "down", "pods": ["a/p"]}]},
            {"collector": "gpus", "node": "n1", "status": "complete", "watermark": "T3"}],
            "unknown": [{"source": "app", "reason": "no watermarks"}]});
        let out = completeness(&answer, Output::Table);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "INCOMPLETE");
        assert!(
            lines[2].contains("n7")
                && lines[2].contains("T1 – T2")
                && lines[2].contains("down (pods: a/p)"),
            "{out}"
        );
        assert!(
            lines[3].contains("n1") && lines[3].contains("complete"),
            "{out}"
        );
        assert!(lines[4].contains("app: no watermarks"), "{out}");
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        for (v, s) in [
            (json!(0), "0"),
            (json!(999), "999"),
            (json!(1000), "1,000"),
            (json!(1234567), "1,234,567"),
            (json!(-1234567), "-1,234,567"),
            (json!(1234567.25), "1,234,567.25"),
            (json!(38.5), "38.5"),
            (json!(0.125), "0.125"),
        ] {
            assert_eq!(grouped(&v), s);
        }
    }

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let t = table(
            &["NAME".into(), "VALUE".into()],
            &[
                vec!["a".into(), "1,000".into()],
                vec!["long-name".into(), "5".into()],
            ],
            &[false, true],
        );
        assert_eq!(
            t,
            "NAME        VALUE\na           1,000\nlong-name       5\n"
        );
    }
}
