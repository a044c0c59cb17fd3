//! Singular JSONPaths: member names and array indexes only (RFC 9535 "singular
//! queries"), e.g. `$.usage.input`, `$['a b'][0]`, `$.items[-1]`.
//!
//! Syntax is checked by `serde_json_path` (the RFC 9535 parser); it does not expose its
//! parsed segments, so the singular subset is parsed here into [`Segment`]s, which are
//! also what the ClickHouse flattening of `data` will be keyed by. Evaluation walks the
//! segments directly (no allocation), and a test checks it agrees with
//! `serde_json_path` on every path it accepts.
use std::fmt;

use serde_json::Value;

/// One step of a singular path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// An object member.
    Name(String),
    /// An array element; negative counts from the end.
    Index(i64),
}

/// A compiled singular JSONPath.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SingularPath {
    source: String,
    segments: Vec<Segment>,
}

impl SingularPath {
    /// Compiles `path`; the error says what is wrong and how to write it.
    pub fn parse(path: &str) -> Result<SingularPath, String> {
        if !path.starts_with('$') {
            return Err(format!("{path:?} must start with '$' (e.g. $.tokens)"));
        }
        serde_json_path::JsonPath::parse(path)
            .map_err(|e| format!("{path:?} is not a valid JSONPath: {e}"))?;
        let segments = parse_singular(path).ok_or_else(|| {
            format!(
                "{path:?} is not a singular JSONPath: use member names and array indexes only (e.g. $.usage.input or $.items[0]), no wildcards, slices, filters or '..'"
            )
        })?;
        Ok(SingularPath {
            source: path.to_string(),
            segments,
        })
    }

    /// The segments, root first.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Whether any segment is a negative (from the end) array index.
    pub fn has_negative_index(&self) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Index(i) if *i < 0))
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The value at this path, if any.
    pub fn get<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        self.segments.iter().try_fold(root, step)
    }

    /// Like [`get`](Self::get), starting from an object (the event's `data`).
    pub fn get_in<'v>(&self, data: &'v serde_json::Map<String, Value>) -> Option<&'v Value> {
        let (first, rest) = self.segments.split_first()?;
        let Segment::Name(n) = first else { return None };
        rest.iter().try_fold(data.get(n)?, step)
    }
}

impl Segment {
    /// This segment's part of a canonical key: `['name']` (with `\\` and `'` escaped by a
    /// backslash) or `[index]`. Keys of equal paths are equal, whatever quoting the
    /// paths were written with; the ClickHouse flattening of `data` is keyed by them.
    pub fn key(&self) -> String {
        match self {
            Segment::Name(n) => format!("['{}']", n.replace('\\', "\\\\").replace('\'', "\\'")),
            Segment::Index(i) => format!("[{i}]"),
        }
    }
}

/// One segment applied to a value: a member of an object or an element of an array.
fn step<'v>(cur: &'v Value, seg: &Segment) -> Option<&'v Value> {
    match (seg, cur) {
        (Segment::Name(n), Value::Object(map)) => map.get(n),
        (Segment::Index(i), Value::Array(list)) => {
            let idx = if *i < 0 { list.len() as i64 + i } else { *i };
            usize::try_from(idx).ok().and_then(|idx| list.get(idx))
        }
        _ => None,
    }
}

impl fmt::Display for SingularPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Parses the singular subset of RFC 9535: `$` followed by `.name`, `['name']`,
/// `["name"]` or `[int]` segments. `None` for anything else (the caller has already
/// checked the path is valid JSONPath, so `None` means "not singular").
fn parse_singular(path: &str) -> Option<Vec<Segment>> {
    let chars: Vec<char> = path.chars().collect();
    let mut i = 1; // after '$'
    let mut out = Vec::new();
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && matches!(chars[*i], ' ' | '\t' | '\n' | '\r') {
            *i += 1;
        }
    };
    while i < chars.len() {
        match chars[i] {
            '.' => {
                i += 1;
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || (chars[i] as u32) >= 0x80)
                {
                    i += 1;
                }
                if i == start {
                    return None; // `..` or `.*`
                }
                out.push(Segment::Name(chars[start..i].iter().collect()));
            }
            '[' => {
                i += 1;
                skip_ws(&mut i);
                let c = *chars.get(i)?;
                if c == '\'' || c == '"' {
                    let quote = c;
                    i += 1;
                    let mut name = String::new();
                    loop {
                        let c = *chars.get(i)?;
                        i += 1;
                        if c == quote {
                            break;
                        }
                        if c != '\\' {
                            name.push(c);
                            continue;
                        }
                        let e = *chars.get(i)?;
                        i += 1;
                        match e {
                            'b' => name.push('\u{8}'),
                            'f' => name.push('\u{c}'),
                            'n' => name.push('\n'),
                            'r' => name.push('\r'),
                            't' => name.push('\t'),
                            'u' => {
                                let hex: String = chars.get(i..i + 4)?.iter().collect();
                                i += 4;
                                let mut code = u32::from_str_radix(&hex, 16).ok()?;
                                if (0xD800..0xDC00).contains(&code) {
                                    // surrogate pair: \uD83D\uDE00
                                    if chars.get(i) != Some(&'\\') || chars.get(i + 1) != Some(&'u')
                                    {
                                        return None;
                                    }
                                    let low: String = chars.get(i + 2..i + 6)?.iter().collect();
                                    i += 6;
                                    let low = u32::from_str_radix(&low, 16).ok()?;
                                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                                }
                                name.push(char::from_u32(code)?);
                            }
                            other => name.push(other), // \\ \/ \' \"
                        }
                    }
                    out.push(Segment::Name(name));
                } else {
                    let start = i;
                    if chars.get(i) == Some(&'-') {
                        i += 1;
                    }
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                    let text: String = chars[start..i].iter().collect();
                    out.push(Segment::Index(text.parse().ok()?));
                }
                skip_ws(&mut i);
                if chars.get(i) != Some(&']') {
                    return None; // `,` (several selectors), `:` (slice), ...
                }
                i += 1;
            }
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn singular_paths_compile_into_segments() {
        let p = SingularPath::parse("$.usage['input tokens'][0][-1].x").unwrap();
        assert_eq!(
            p.segments(),
            &[
                Segment::Name("usage".into()),
                Segment::Name("input tokens".into()),
                Segment::Index(0),
                Segment::Index(-1),
                Segment::Name("x".into())
            ]
        );
        assert_eq!(
            SingularPath::parse(r#"$["a\"b\u00e9"]"#)
                .unwrap()
                .segments(),
            &[Segment::Name("a\"bé".into())]
        );
    }

    #[test]
    fn non_singular_and_invalid_paths_are_rejected_with_a_reason() {
        for bad in [
            "$.*",
            "$..a",
            "$.a[*]",
            "$.a[0,1]",
            "$.a[1:2]",
            "$.a[?@.b]",
            "$['a','b']",
        ] {
            let e = SingularPath::parse(bad).unwrap_err();
            assert!(e.contains("not a singular"), "{bad}: {e}");
        }
        for bad in ["tokens", "$.", "$[", "$.a[01]", "$['a]"] {
            assert!(SingularPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn evaluation_agrees_with_serde_json_path() {
        let doc =
            json!({"a": {"b": [1, {"c": "x"}, [true]], "d e": null, "é": 2}, "n": [10, 20, 30]});
        for p in [
            "$.a",
            "$.a.b",
            "$.a.b[0]",
            "$.a.b[1].c",
            "$.a.b[-1][0]",
            "$.a.b[-4]",
            "$.a.b[9]",
            "$['a']['d e']",
            "$.a.é",
            "$.n[-1]",
            "$.missing",
            "$.a.b.c",
            "$.n.x",
            "$",
        ] {
            let ours = SingularPath::parse(p).unwrap();
            let theirs = serde_json_path::JsonPath::parse(p).unwrap();
            assert_eq!(
                ours.get(&doc),
                theirs.query(&doc).at_most_one().unwrap(),
                "{p}"
            );
        }
    }
}
