//! The kubelet's CRI log line format: `<RFC 3339 time> <stdout|stderr> <P|F> <message>`.
//! `P` marks a partial piece of a long line (the runtime splits lines at 16 KiB), `F`
//! the final piece; a logical line is its `P` pieces followed by one `F`.

/// One parsed CRI line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriLine<'a> {
    /// The timestamp text.
    pub time: &'a str,
    /// `stdout` or `stderr`.
    pub stream: &'a str,
    /// Whether this is the last piece of a logical line.
    pub last: bool,
    /// The message (piece).
    pub message: &'a str,
}

/// Parses one line (without its newline); `None` when it is not CRI format.
pub fn parse(line: &str) -> Option<CriLine<'_>> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    let message = parts.next().unwrap_or("");
    if !matches!(stream, "stdout" | "stderr") {
        return None;
    }
    // The tag may carry more flags after `:` in future runtimes; the first is P/F.
    let last = match tag.split(':').next()? {
        "F" => true,
        "P" => false,
        _ => return None,
    };
    Some(CriLine {
        time,
        stream,
        last,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_partial_lines_parse() {
        let l = parse("2026-01-01T00:00:01.123456789Z stdout F {\"tokens\": 5}").unwrap();
        assert_eq!(l.message, "{\"tokens\": 5}");
        assert!(l.last);
        let p = parse("2026-01-01T00:00:01Z stderr P part one ").unwrap();
        assert_eq!(
            (p.stream, p.last, p.message),
            ("stderr", false, "part one ")
        );
        assert_eq!(parse("2026-01-01T00:00:01Z stdout F").unwrap().message, "");
        assert!(parse("not a cri line").is_none());
        assert!(parse("2026-01-01T00:00:01Z stdout X m").is_none());
    }
}
