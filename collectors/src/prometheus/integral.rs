//! `gaugeIntegral`: a gauge integrated over time, per aligned window.
//!
//! The rule: a sample's value holds from its time until the next sample of the series
//! (a step function, as a gauge is read), so the integral over `[t₀, t₁)` is `v₀ ×
//! (t₁ − t₀)`, split at window edges. Two samples further apart than the gap limit
//! (1.5 × `intervalSecs` + `timeoutMs`: one scrape missed) are a gap: nothing is
//! counted between them, nothing is interpolated, and the window says how much of it
//! was sampled (`sampled_seconds`). A window is sent once a sample at or after its end
//! arrived, or, when the series stopped being exposed, once the window has ended; the
//! value after a series' last sample is unknown and not counted.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The integration state of one series (checkpointed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Integral {
    /// Metric name.
    pub metric: String,
    /// Data of the series' events (labels, and the scraped pod's namespace/name).
    pub data: BTreeMap<String, String>,
    /// Subject of the series' events.
    pub subject: String,
    /// Window length, ms.
    pub window_ms: i64,
    /// Last sample: time (ms) and value.
    pub t_ms: i64,
    /// Last sample's value.
    pub v: f64,
    /// Start of the window being summed (ms).
    pub open_ms: i64,
    /// Its integral so far, value × seconds.
    pub acc: f64,
    /// Its sampled time so far, ms.
    pub covered_ms: i64,
}

/// A finished window of one series.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// Window start, ms.
    pub start_ms: i64,
    /// Value × seconds.
    pub integral: f64,
    /// Sampled seconds of the window (less than its length around a gap).
    pub sampled_secs: f64,
}

impl Integral {
    /// A series first sampled at `t_ms` with value `v`.
    pub fn start(
        metric: &str,
        data: BTreeMap<String, String>,
        subject: String,
        window_ms: i64,
        t_ms: i64,
        v: f64,
    ) -> Integral {
        Integral {
            metric: metric.to_string(),
            data,
            subject,
            window_ms,
            t_ms,
            v,
            open_ms: t_ms.div_euclid(window_ms) * window_ms,
            acc: 0.0,
            covered_ms: 0,
        }
    }

    fn close(&mut self, out: &mut Vec<Window>, next_open: i64) {
        if self.covered_ms > 0 {
            out.push(Window {
                start_ms: self.open_ms,
                integral: self.acc,
                sampled_secs: self.covered_ms as f64 / 1000.0,
            });
        }
        self.open_ms = next_open;
        self.acc = 0.0;
        self.covered_ms = 0;
    }

    /// Takes the next sample; returns the windows it completes. A sample not after the
    /// last one (the same scrape seen again) changes nothing.
    pub fn add(&mut self, t_ms: i64, v: f64, max_gap_ms: i64) -> Vec<Window> {
        let mut out = Vec::new();
        if t_ms <= self.t_ms {
            return out;
        }
        if t_ms - self.t_ms <= max_gap_ms {
            let mut a = self.t_ms;
            while a < t_ms {
                let end = self.open_ms + self.window_ms;
                let b = t_ms.min(end);
                self.acc += self.v * (b - a) as f64 / 1000.0;
                self.covered_ms += b - a;
                a = b;
                if a >= end {
                    self.close(&mut out, end);
                }
            }
        }
        let open = t_ms.div_euclid(self.window_ms) * self.window_ms;
        if open > self.open_ms {
            self.close(&mut out, open);
        }
        self.t_ms = t_ms;
        self.v = v;
        out
    }

    /// The series is no longer exposed: its open window, once ended at `now_ms`.
    pub fn flush(&mut self, now_ms: i64) -> Option<Vec<Window>> {
        if now_ms < self.open_ms + self.window_ms {
            return None;
        }
        let mut out = Vec::new();
        self.close(&mut out, self.open_ms + self.window_ms);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(t: i64, v: f64) -> Integral {
        Integral::start("g", BTreeMap::new(), "s".into(), 60_000, t, v)
    }

    #[test]
    fn samples_hold_until_the_next_and_split_at_window_edges() {
        let mut s = series(50_000, 2.0);
        // 50–70 s at 2: 10 s in window 0, 10 s in window 60
        let w = s.add(70_000, 4.0, 20_000);
        assert_eq!(
            w,
            [Window {
                start_ms: 0,
                integral: 20.0,
                sampled_secs: 10.0
            }]
        );
        // 70–85 at 4, 85–120 at 1 (35 s apart: within a 40 s gap limit)
        assert!(s.add(85_000, 1.0, 40_000).is_empty());
        let w = s.add(120_000, 3.0, 40_000);
        assert_eq!(w[0].start_ms, 60_000);
        assert!((w[0].integral - (10.0 * 2.0 + 15.0 * 4.0 + 35.0 * 1.0)).abs() < 1e-12);
        assert_eq!(w[0].sampled_secs, 60.0);
    }

    #[test]
    fn a_gap_counts_nothing_and_is_not_interpolated() {
        let mut s = series(0, 5.0);
        assert!(s.add(10_000, 5.0, 15_000).is_empty());
        // 10 → 40 s is a gap (limit 15 s): window 0 has 10 s sampled
        assert!(s.add(40_000, 7.0, 15_000).is_empty());
        let w = s.add(50_000, 1.0, 15_000);
        assert!(w.is_empty());
        let w = s.add(61_000, 1.0, 15_000);
        assert_eq!(
            w,
            [Window {
                start_ms: 0,
                integral: 5.0 * 10.0 + 7.0 * 10.0 + 1.0 * 10.0,
                sampled_secs: 30.0
            }]
        );
        // a gap across whole windows leaves them out
        let w = s.add(250_000, 1.0, 15_000);
        assert_eq!(
            w,
            [Window {
                start_ms: 60_000,
                integral: 1.0,
                sampled_secs: 1.0
            }]
        );
        assert_eq!(s.open_ms, 240_000);
        // the same sample again changes nothing
        assert!(s.add(250_000, 9.0, 15_000).is_empty());
        assert_eq!(s.v, 1.0);
        // flushed only once its window ended
        s.add(255_000, 1.0, 15_000);
        assert!(s.flush(299_999).is_none());
        assert_eq!(
            s.flush(300_000).unwrap(),
            [Window {
                start_ms: 240_000,
                integral: 5.0,
                sampled_secs: 5.0
            }]
        );
    }
}
