//! `prometheus`: counters and gauges from Prometheus text endpoints.
//!
//! Each scrape of a target is parsed with `prometheus-parse`; every sample that a
//! [`MetricRule`](tally_crds::collector::MetricRule) selects becomes at most one event:
//! - `counter`: the increase since the target's last sample of that series. A value
//!   below the last one is a reset (the process restarted) and counts from zero. The
//!   very first scrape of a target with no checkpoint is a baseline (nothing is known
//!   about what was counted before the agent looked), except for a pod target whose
//!   pod started after this collector did, and for a new series of a known target:
//!   those counters started at zero, so their whole value counts. Zero increases emit
//!   nothing.
//! - `gauge`: the sampled value.
//! - `gaugeIntegral`: value × seconds per aligned window and series ([`integral`] has
//!   the rule, gaps included); one event per series and window, `value` the integral,
//!   `sampled_seconds` how much of the window was sampled. DCGM's
//!   `DCGM_FI_PROF_GR_ENGINE_ACTIVE` (a ratio) so becomes busy-GPU-seconds and
//!   `DCGM_FI_DEV_FB_USED` (MiB) MiB-seconds, per pod through its `pod`/`namespace`
//!   labels. Its state is the checkpoint `i/<target url>`.
//!
//! The last values are the checkpoint `t/<target url>` and are committed with the
//! events, so a restart resumes from exactly what was shipped. Ids hash (target,
//! series, scrape time), so a re-sent scrape deduplicates.
//!
//! Subject: the `subjectLabel` label; else, when the series has `pod` and `namespace`
//! labels of a pod the agent knows (DCGM's `DCGM_FI_DEV_GPU_UTIL{pod,namespace}`), that
//! pod's subject; else the scraped pod's subject; else `defaultSubject`, else the
//! Collector's namespace. The series' other labels become data, with `metric` and
//! `value`.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use regex::Regex;
use serde_json::{Map, Value, json};
use tally_crds::collector::{MetricKind, PrometheusSource};

use crate::pods::{pod_key, selects, subject_of};
use crate::{Error, Origin, Output, Result, config_error, event_id};

pub mod integral;
#[cfg(test)]
mod tests;

use integral::Integral;

/// A target to scrape.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL.
    pub url: String,
    /// The pod serving it, for pod targets.
    pub pod: Option<Arc<Pod>>,
}

#[derive(Debug)]
struct Rule {
    name: Option<String>,
    regex: Option<Regex>,
    labels: BTreeMap<String, String>,
    kind: MetricKind,
    window_ms: i64,
}

impl Rule {
    fn matches(&self, metric: &str, labels: &HashMap<String, String>) -> bool {
        let name_ok = match (&self.name, &self.regex) {
            (Some(n), _) => n == metric,
            (None, Some(r)) => r.is_match(metric),
            (None, None) => false,
        };
        name_ok && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The Prometheus collector of one Collector.
#[derive(Debug)]
pub struct PrometheusScrape {
    origin: Origin,
    cfg: PrometheusSource,
    rules: Vec<Rule>,
    /// Last value per target and series.
    last: HashMap<String, HashMap<String, f64>>,
    /// When this collector started (Unix seconds): pods started later are counted from 0.
    started: i64,
    /// `gaugeIntegral` state per target and series.
    integrals: HashMap<String, BTreeMap<String, Integral>>,
    /// Gaps of `gaugeIntegral` series found since the last [`PrometheusScrape::mark`]:
    /// (target, from, to) in ms.
    gaps: std::collections::BTreeSet<(String, i64, i64)>,
}

impl PrometheusScrape {
    /// A collector resuming from its checkpoints; fails naming a regex that does not
    /// compile.
    pub fn new(
        origin: Origin,
        cfg: PrometheusSource,
        checkpoints: &BTreeMap<String, String>,
        now: i64,
    ) -> Result<PrometheusScrape> {
        let rules = cfg
            .metrics
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let regex = m
                    .name_regex
                    .as_deref()
                    .map(|r| {
                        Regex::new(&format!("^(?:{r})$")).map_err(|e| {
                            config_error(
                                format!("spec.prometheus.metrics[{i}].nameRegex"),
                                format!("not a valid regular expression: {e}"),
                            )
                        })
                    })
                    .transpose()?;
                Ok(Rule {
                    name: m.name.clone(),
                    regex,
                    labels: m.match_labels.clone(),
                    kind: m.kind,
                    window_ms: i64::from(m.window_secs.unwrap_or(60)) * 1000,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let last = checkpoints
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.strip_prefix("t/")?.to_string(),
                    serde_json::from_str(v).ok()?,
                ))
            })
            .collect();
        let integrals = checkpoints
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.strip_prefix("i/")?.to_string(),
                    serde_json::from_str(v).ok()?,
                ))
            })
            .collect();
        Ok(PrometheusScrape {
            origin,
            cfg,
            rules,
            last,
            started: now,
            integrals,
            gaps: Default::default(),
        })
    }

    /// The watermark after a round of scrapes taken at `now_ms`: every counter and
    /// gauge event of the round has time `now_ms` and later rounds' are later (a
    /// failed scrape's counter increase is sent with the next success: nothing is
    /// lost), and a `gaugeIntegral` window is complete once emitted, so the source is
    /// complete up to the earliest open window. An interval a gauge integral has no
    /// samples for is a gap.
    pub fn mark(&mut self, now_ms: i64) -> Output {
        let open = self
            .integrals
            .values()
            .flat_map(|series| series.values().map(|i| i.open_ms))
            .min();
        let gaps = std::mem::take(&mut self.gaps)
            .into_iter()
            .map(|(url, from, to)| tally_crds::Gap {
                from,
                to,
                reason: format!(
                    "no sample from {url} in this interval (a scrape failed or came late): gaugeIntegral counts nothing here"
                ),
                pods: Vec::new(),
            })
            .collect();
        Output {
            watermark: Some(crate::Mark {
                until_ms: open.map_or(now_ms, |o| o.min(now_ms)),
                gaps,
            }),
            ..Output::default()
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PrometheusSource {
        &self.cfg
    }

    /// Static targets plus the selected pods (running, with an IP) among `pods`.
    pub fn targets(&self, pods: &[Arc<Pod>]) -> Vec<Target> {
        let mut out: Vec<Target> = self
            .cfg
            .targets
            .iter()
            .map(|u| Target {
                url: u.clone(),
                pod: None,
            })
            .collect();
        if let Some(pt) = &self.cfg.pods {
            let sel = pt.pod_selector();
            for pod in pods {
                let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
                let running =
                    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                if let (Some(ip), true) = (ip, running)
                    && selects(&sel, &self.origin.namespace, pod)
                {
                    let host = if ip.contains(':') {
                        format!("[{ip}]")
                    } else {
                        ip.to_string()
                    };
                    out.push(Target {
                        url: format!("http://{host}:{}{}", pt.port, pt.path),
                        pod: Some(Arc::clone(pod)),
                    });
                }
            }
        }
        out
    }

    /// Fetches a target's exposition text.
    pub async fn fetch(&self, client: &reqwest::Client, url: &str) -> Result<String> {
        let fetch_err = |message: String| Error::Fetch {
            url: url.to_string(),
            message,
        };
        let resp = client
            .get(url)
            .header("Accept", "text/plain;version=0.0.4")
            .timeout(std::time::Duration::from_millis(u64::from(
                self.cfg.timeout_ms,
            )))
            .send()
            .await
            .map_err(|e| fetch_err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(fetch_err(format!("status {}", resp.status())));
        }
        resp.text().await.map_err(|e| fetch_err(e.to_string()))
    }

    /// Drops the checkpoints of pod targets that no longer exist; their series'
    /// integrals are sent up to their last sample.
    pub fn forget_targets_except(&mut self, live: &[Target]) -> Output {
        let mut out = Output::default();
        let static_urls: Vec<&String> = self.cfg.targets.iter().collect();
        let keep = |url: &String| static_urls.contains(&url) || live.iter().any(|t| &t.url == url);
        self.last.retain(|url, _| {
            let keep = keep(url);
            if !keep {
                out.checkpoints.insert(format!("t/{url}"), None);
            }
            keep
        });
        let gone: Vec<String> = self
            .integrals
            .keys()
            .filter(|u| !keep(u))
            .cloned()
            .collect();
        for url in gone {
            for (series, mut st) in self.integrals.remove(&url).unwrap_or_default() {
                let end = st.open_ms + st.window_ms;
                for w in st.flush(end).unwrap_or_default() {
                    out.events.push(self.integral_event(&url, &series, &st, &w));
                }
            }
            out.checkpoints.insert(format!("i/{url}"), None);
        }
        out
    }

    /// The gap limit of `gaugeIntegral`: 1.5 × the interval + the timeout, in ms.
    pub fn max_gap_ms(&self) -> i64 {
        i64::from(self.cfg.interval_secs) * 1500 + i64::from(self.cfg.timeout_ms)
    }

    fn integral_event(
        &self,
        url: &str,
        series: &str,
        st: &Integral,
        w: &integral::Window,
    ) -> tally_crds::CloudEvent {
        let mut data: Map<String, Value> = st
            .data
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        data.insert("metric".into(), json!(st.metric));
        data.insert("value".into(), json!(w.integral));
        data.insert("window_seconds".into(), json!(st.window_ms / 1000));
        data.insert("sampled_seconds".into(), json!(w.sampled_secs));
        let start = w.start_ms.to_string();
        self.origin.event(
            event_id(&[url, series, &start, "integral"]),
            st.subject.clone(),
            w.start_ms,
            data,
        )
    }

    /// Turns one scrape of `target` taken at `now_ms` into events. `pod_subject` finds
    /// the subject of a pod by (namespace, name), if the agent knows it.
    pub fn process(
        &mut self,
        target: &Target,
        body: &str,
        now_ms: i64,
        pod_subject: &dyn Fn(&str, &str) -> Option<String>,
    ) -> Result<Output> {
        let at = chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
        let scrape =
            prometheus_parse::Scrape::parse_at(body.lines().map(|l| Ok(l.to_string())), at)
                .map_err(|e| Error::Parse {
                    url: target.url.clone(),
                    message: e.to_string(),
                })?;
        let known_target = self.last.contains_key(&target.url);
        let fresh_pod = target.pod.as_ref().is_some_and(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .is_some_and(|t| t.0.as_second() >= self.started)
        });
        let count_from_zero = known_target || fresh_pod;
        let mut last = self.last.remove(&target.url).unwrap_or_default();
        let mut out = Output::default();
        let mut changed = !known_target;
        let now_s = now_ms.to_string();
        let mut integrals = self.integrals.remove(&target.url).unwrap_or_default();
        let had_integrals = !integrals.is_empty();
        let mut sampled: std::collections::HashSet<String> = Default::default();
        let max_gap = self.max_gap_ms();
        for sample in &scrape.samples {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => continue,
            };
            if !value.is_finite() {
                continue;
            }
            let labels: &HashMap<String, String> = &sample.labels;
            let Some(rule) = self
                .rules
                .iter()
                .find(|r| r.matches(&sample.metric, labels))
            else {
                continue;
            };
            let series = format!("{}{{{}}}", sample.metric, sample.labels);
            if rule.kind == MetricKind::GaugeIntegral {
                let data = series_data(labels, target);
                let subject = self.subject(labels, target, pod_subject);
                let t = sample.timestamp.timestamp_millis();
                sampled.insert(series.clone());
                match integrals.get_mut(&series) {
                    None => {
                        let st = Integral::start(
                            &sample.metric,
                            data,
                            subject,
                            rule.window_ms,
                            t,
                            value,
                        );
                        integrals.insert(series, st);
                    }
                    Some(st) => {
                        if t > st.t_ms && t - st.t_ms > max_gap {
                            self.gaps.insert((target.url.clone(), st.t_ms, t));
                        }
                        st.data = data;
                        st.subject = subject;
                        for w in st.add(t, value, max_gap) {
                            out.events
                                .push(self.integral_event(&target.url, &series, st, &w));
                        }
                    }
                }
                continue;
            }
            let emitted = match rule.kind {
                MetricKind::Gauge | MetricKind::GaugeIntegral => Some(value),
                MetricKind::Counter => {
                    let before = last.insert(series.clone(), value);
                    changed |= before != Some(value);
                    let delta = match before {
                        Some(b) if value >= b => value - b,
                        Some(_) => value,
                        None if count_from_zero => value,
                        None => 0.0,
                    };
                    (delta > 0.0).then_some(delta)
                }
            };
            let Some(v) = emitted else { continue };
            let mut data: Map<String, Value> = series_data(labels, target)
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            data.insert("metric".into(), json!(sample.metric));
            data.insert("value".into(), json!(v));
            let subject = self.subject(labels, target, pod_subject);
            out.events.push(self.origin.event(
                event_id(&[&target.url, &series, &now_s]),
                subject,
                now_ms,
                data,
            ));
        }
        // Series no longer exposed: their last window, once it ended.
        let ended: Vec<String> = integrals
            .keys()
            .filter(|k| !sampled.contains(*k))
            .cloned()
            .collect();
        for series in ended {
            if let Some(st) = integrals.get_mut(&series)
                && let Some(windows) = st.flush(now_ms)
            {
                for w in windows {
                    out.events
                        .push(self.integral_event(&target.url, &series, st, &w));
                }
                integrals.remove(&series);
            }
        }
        if !integrals.is_empty() || had_integrals {
            out.checkpoints.insert(
                format!("i/{}", target.url),
                (!integrals.is_empty())
                    .then(|| serde_json::to_string(&integrals).expect("numbers serialize")),
            );
        }
        if !integrals.is_empty() {
            self.integrals.insert(target.url.clone(), integrals);
        }
        if changed {
            out.checkpoints.insert(
                format!("t/{}", target.url),
                Some(serde_json::to_string(&last).expect("numbers serialize")),
            );
        }
        self.last.insert(target.url.clone(), last);
        Ok(out)
    }

    fn subject(
        &self,
        labels: &HashMap<String, String>,
        target: &Target,
        pod_subject: &dyn Fn(&str, &str) -> Option<String>,
    ) -> String {
        if let Some(s) = self.cfg.subject_label.as_ref().and_then(|l| labels.get(l)) {
            return s.clone();
        }
        if let (Some(ns), Some(pod)) = (labels.get("namespace"), labels.get("pod"))
            && let Some(s) = pod_subject(ns, pod)
        {
            return s;
        }
        if let Some(p) = &target.pod {
            return subject_of(p, None);
        }
        self.cfg
            .default_subject
            .clone()
            .unwrap_or_else(|| self.origin.namespace.clone())
    }
}

/// The data every event of a series carries: its labels, and for a pod target the
/// pod's namespace and name where the series does not name them.
fn series_data(labels: &HashMap<String, String>, target: &Target) -> BTreeMap<String, String> {
    let mut data: BTreeMap<String, String> =
        labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    if let Some(p) = &target.pod {
        let (ns, name, _) = pod_key(p);
        data.entry("namespace".into()).or_insert(ns);
        data.entry("pod".into()).or_insert(name);
    }
    data
}
