//! Windows aligned to a size in an IANA time zone.
//!
//! - `MINUTE` windows are UTC minutes (every zone's offset has been a whole number of
//!   minutes since 1972), so one-minute rollups map into exactly one window of any size
//!   in any zone.
//! - `HOUR` windows start at each local hour; when clocks fall back, the repeated local
//!   hour is two windows with different offsets (`01:00-04:00` and `01:00-05:00` in New
//!   York). A window is one hour long. (Zones whose DST shift is not a whole hour,
//!   e.g. Australia/Lord_Howe, get one window that straddles the shift.)
//! - `DAY` and `MONTH` windows start at local midnight of the day / the first of the
//!   month; a day is 23 or 25 hours across DST changes. Where midnight does not exist
//!   (a DST gap at 00:00), the window starts at the first existing local minute; where it
//!   exists twice, at the first.
use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike};
use chrono_tz::Tz;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;

/// Window sizes of the query API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WindowSize {
    /// One minute.
    Minute,
    /// One local hour.
    Hour,
    /// One local day.
    Day,
    /// One local calendar month.
    Month,
}

impl WindowSize {
    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            WindowSize::Minute => "MINUTE",
            WindowSize::Hour => "HOUR",
            WindowSize::Day => "DAY",
            WindowSize::Month => "MONTH",
        }
    }
}

impl fmt::Display for WindowSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WindowSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "MINUTE" => Ok(WindowSize::Minute),
            "HOUR" => Ok(WindowSize::Hour),
            "DAY" => Ok(WindowSize::Day),
            "MONTH" => Ok(WindowSize::Month),
            other => Err(format!(
                "must be one of MINUTE, HOUR, DAY, MONTH, got {other:?}"
            )),
        }
    }
}

/// The window `[start, end)` (ms since the epoch) of `size` in `tz` containing `ms`.
pub fn window_of(ms: i64, size: WindowSize, tz: Tz) -> (i64, i64) {
    match size {
        WindowSize::Minute => {
            let start = ms.div_euclid(MINUTE_MS) * MINUTE_MS;
            (start, start + MINUTE_MS)
        }
        WindowSize::Hour => {
            let local = local_of(ms, tz);
            let floor = local
                .with_minute(0)
                .and_then(|l| l.with_second(0))
                .and_then(|l| l.with_nanosecond(0))
                .unwrap_or(local);
            let start = match tz.from_local_datetime(&floor) {
                LocalResult::Single(t) => t.timestamp_millis(),
                // the repeated hour: the occurrence this instant belongs to
                LocalResult::Ambiguous(a, b) => {
                    if b.timestamp_millis() <= ms {
                        b.timestamp_millis()
                    } else {
                        a.timestamp_millis()
                    }
                }
                LocalResult::None => first_existing_after(floor, tz),
            };
            (start, start + HOUR_MS)
        }
        WindowSize::Day | WindowSize::Month => {
            let date = local_of(ms, tz).date();
            let (first, next) = if size == WindowSize::Day {
                (date, date + Duration::days(1))
            } else {
                let first = NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap_or(date);
                let next = if date.month() == 12 {
                    NaiveDate::from_ymd_opt(date.year() + 1, 1, 1)
                } else {
                    NaiveDate::from_ymd_opt(date.year(), date.month() + 1, 1)
                }
                .unwrap_or(first);
                (first, next)
            };
            (
                start_of_local(first.and_hms_opt(0, 0, 0).unwrap_or_default(), tz),
                start_of_local(next.and_hms_opt(0, 0, 0).unwrap_or_default(), tz),
            )
        }
    }
}

/// Renders `ms` in RFC 3339 with `tz`'s offset at that instant (`Z` for UTC).
pub fn render(ms: i64, tz: Tz) -> String {
    let t = tz
        .timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(|| tz.timestamp_millis_opt(0).unwrap());
    let secs = if ms % 1000 == 0 {
        chrono::SecondsFormat::Secs
    } else {
        chrono::SecondsFormat::Millis
    };
    t.to_rfc3339_opts(secs, true)
}

fn local_of(ms: i64, tz: Tz) -> NaiveDateTime {
    tz.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.naive_local())
        .unwrap_or_default()
}

fn start_of_local(local: NaiveDateTime, tz: Tz) -> i64 {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.timestamp_millis(),
        LocalResult::Ambiguous(a, _) => a.timestamp_millis(),
        LocalResult::None => first_existing_after(local, tz),
    }
}

/// The first instant whose local time is after `local`, which falls in a DST gap.
fn first_existing_after(local: NaiveDateTime, tz: Tz) -> i64 {
    let mut probe = local;
    for _ in 0..(4 * 60) {
        probe += Duration::minutes(1);
        if let Some(t) = tz.from_local_datetime(&probe).earliest() {
            return t.timestamp_millis();
        }
    }
    // No zone has a gap this long; fall back to reading the local time as UTC.
    local.and_utc().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_crds::event::parse_time_ms;

    fn w(t: &str, size: WindowSize, tz: &str) -> (String, String) {
        let tz: Tz = tz.parse().unwrap();
        let (s, e) = window_of(parse_time_ms(t).unwrap(), size, tz);
        (render(s, tz), render(e, tz))
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_string(), b.to_string())
    }

    #[test]
    fn utc_windows() {
        assert_eq!(
            w("2024-03-10T10:17:45.5Z", WindowSize::Minute, "UTC"),
            pair("2024-03-10T10:17:00Z", "2024-03-10T10:18:00Z")
        );
        assert_eq!(
            w("2024-03-10T10:17:45Z", WindowSize::Hour, "UTC"),
            pair("2024-03-10T10:00:00Z", "2024-03-10T11:00:00Z")
        );
        assert_eq!(
            w("2024-02-29T23:59:59.999Z", WindowSize::Day, "UTC"),
            pair("2024-02-29T00:00:00Z", "2024-03-01T00:00:00Z")
        );
        assert_eq!(
            w("2024-12-31T12:00:00Z", WindowSize::Month, "UTC"),
            pair("2024-12-01T00:00:00Z", "2025-01-01T00:00:00Z")
        );
    }

    #[test]
    fn new_york_fall_back_repeats_the_hour_as_two_windows() {
        let ny = "America/New_York";
        assert_eq!(
            w("2024-11-03T05:30:00Z", WindowSize::Hour, ny),
            pair("2024-11-03T01:00:00-04:00", "2024-11-03T01:00:00-05:00")
        );
        assert_eq!(
            w("2024-11-03T06:30:00Z", WindowSize::Hour, ny),
            pair("2024-11-03T01:00:00-05:00", "2024-11-03T02:00:00-05:00")
        );
        // the day is 25 hours long
        assert_eq!(
            w("2024-11-03T12:00:00Z", WindowSize::Day, ny),
            pair("2024-11-03T00:00:00-04:00", "2024-11-04T00:00:00-05:00")
        );
    }

    #[test]
    fn new_york_spring_forward_skips_an_hour() {
        let ny = "America/New_York";
        assert_eq!(
            w("2024-03-10T06:59:00Z", WindowSize::Hour, ny),
            pair("2024-03-10T01:00:00-05:00", "2024-03-10T03:00:00-04:00")
        );
        assert_eq!(
            w("2024-03-10T07:00:00Z", WindowSize::Hour, ny),
            pair("2024-03-10T03:00:00-04:00", "2024-03-10T04:00:00-04:00")
        );
        assert_eq!(
            w("2024-03-10T12:00:00Z", WindowSize::Day, ny),
            pair("2024-03-10T00:00:00-05:00", "2024-03-11T00:00:00-04:00")
        );
        assert_eq!(
            w("2024-03-31T12:00:00Z", WindowSize::Month, ny),
            pair("2024-03-01T00:00:00-05:00", "2024-04-01T00:00:00-04:00")
        );
    }

    #[test]
    fn kolkata_half_hour_offset() {
        let k = "Asia/Kolkata";
        assert_eq!(
            w("2024-01-01T00:29:00Z", WindowSize::Hour, k),
            pair("2024-01-01T05:00:00+05:30", "2024-01-01T06:00:00+05:30")
        );
        assert_eq!(
            w("2024-01-01T18:29:00Z", WindowSize::Day, k),
            pair("2024-01-01T00:00:00+05:30", "2024-01-02T00:00:00+05:30")
        );
        assert_eq!(
            w("2024-01-01T18:30:00Z", WindowSize::Day, k),
            pair("2024-01-02T00:00:00+05:30", "2024-01-03T00:00:00+05:30")
        );
    }

    #[test]
    fn a_day_starting_in_a_dst_gap_starts_at_the_first_existing_minute() {
        // Santiago sprang forward at local midnight on 2022-09-11: 00:00 -> 01:00.
        assert_eq!(
            w("2022-09-11T12:00:00Z", WindowSize::Day, "America/Santiago"),
            pair("2022-09-11T01:00:00-03:00", "2022-09-12T00:00:00-03:00")
        );
    }
}
