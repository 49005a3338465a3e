//! The report: everything measured, printed as the table or, with
//! `--json`, as one JSON object (latencies in milliseconds, times in
//! seconds).

use std::time::Duration;

use serde_json::{Value, json};

use super::histogram::Histogram;
use super::publisher::PublishOutcome;
use super::streams::Counts;
use super::timeline::Timeline;

/// Everything measured, ready to print.
#[derive(Debug)]
pub(super) struct Report {
    pub(super) url: String,
    pub(super) connections: u64,
    pub(super) ramp: f64,
    pub(super) duration: Duration,
    pub(super) counts: Counts,
    pub(super) ramp_time: Option<Duration>,
    pub(super) events_received: u64,
    pub(super) publish: Option<PublishReport>,
    pub(super) elapsed: Duration,
    pub(super) client_cpu: Option<Duration>,
    pub(super) client_peak_rss_kib: Option<u64>,
    /// Worker processes that held the streams; 0 for this process alone.
    pub(super) workers: u64,
    pub(super) stopped: Option<&'static str>,
    /// Once a second, for `--report`.
    pub(super) timeline: Timeline,
}

/// What the publisher did and what its events did.
#[derive(Debug)]
pub(super) struct PublishReport {
    pub(super) url: String,
    pub(super) events: u64,
    pub(super) rate: f64,
    pub(super) outcome: PublishOutcome,
    /// Streams held when publishing began.
    pub(super) streams: u64,
    pub(super) deliveries: u64,
    pub(super) first_publish_ns: u64,
    pub(super) last_delivery_ns: u64,
    pub(super) latency: Histogram,
}

impl PublishReport {
    fn expected(&self) -> u64 {
        self.outcome.published * self.streams
    }

    fn window(&self) -> Option<Duration> {
        (self.first_publish_ns > 0 && self.last_delivery_ns > self.first_publish_ns)
            .then(|| Duration::from_nanos(self.last_delivery_ns - self.first_publish_ns))
    }

    fn per_second(&self) -> Option<f64> {
        self.window()
            .map(|w| self.deliveries as f64 / w.as_secs_f64().max(1e-9))
    }
}

/// Nanoseconds as milliseconds, to the microsecond.
fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e6 * 1000.0).round() / 1000.0
}

/// A duration in seconds, to the millisecond.
fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

impl Report {
    pub(super) fn to_json(&self) -> Value {
        let c = &self.counts;
        let statuses: serde_json::Map<String, Value> = c
            .other_statuses
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let mut v = json!({
            "url": self.url,
            "connections": self.connections,
            "ramp_per_s": self.ramp,
            "duration_s": secs(self.duration),
            "held": c.held,
            "peak_held": c.peak_held,
            "accepted": c.accepted,
            "refused": c.refused,
            "other": c.other,
            "other_statuses": statuses,
            "failed": c.failed,
            "failures": c.failures,
            "dropped": c.dropped,
            "malformed": c.malformed,
            "ramp_s": self.ramp_time.map(secs),
            "events_received": self.events_received,
            "elapsed_s": secs(self.elapsed),
            "client_cpu_s": self.client_cpu.map(secs),
            "client_peak_rss_kib": self.client_peak_rss_kib,
            "workers": self.workers,
            "stopped": self.stopped,
            "publish_url": null,
            "latency_ms": null,
        });
        if let (Some(p), Some(obj)) = (&self.publish, v.as_object_mut()) {
            let h = &p.latency;
            let q = |x: f64| h.quantile(x).map(ms);
            let fields = json!({
                "publish_url": p.url,
                "events": p.events,
                "rate_per_s": p.rate,
                "published": p.outcome.published,
                "publish_errors": p.outcome.errors,
                "publish_error": p.outcome.first_error,
                "publish_s": secs(p.outcome.elapsed),
                "receivers_min": p.outcome.receivers_min,
                "receivers_max": p.outcome.receivers_max,
                "streams_publishing": p.streams,
                "expected_deliveries": p.expected(),
                "deliveries": p.deliveries,
                "deliveries_per_s": p.per_second().map(f64::round),
                "window_s": p.window().map(secs),
                "first_publish_unix_ns": p.first_publish_ns,
                "last_delivery_unix_ns": p.last_delivery_ns,
                "latency_ms": if h.count == 0 { Value::Null } else { json!({
                    "p50": q(0.50),
                    "p90": q(0.90),
                    "p99": q(0.99),
                    "max": ms(h.max),
                    "mean": h.mean().map(ms),
                })},
            });
            if let Value::Object(fields) = fields {
                obj.extend(fields);
            }
        }
        v
    }

    pub(super) fn table(&self) -> String {
        let c = &self.counts;
        let mut rows: Vec<(&str, String)> = vec![
            ("url", self.url.clone()),
            (
                "streams",
                format!(
                    "{} asked, {} held (peak {}), {} refused (503), {} other, {} failed, {} dropped",
                    self.connections, c.held, c.peak_held, c.refused, c.other, c.failed, c.dropped
                ),
            ),
        ];
        if !c.other_statuses.is_empty() {
            let list: Vec<String> = c
                .other_statuses
                .iter()
                .map(|(s, n)| format!("{n} x {s}"))
                .collect();
            rows.push(("other statuses", list.join(", ")));
        }
        for (reason, n) in &c.failures {
            rows.push(("failed", format!("{n} x {reason}")));
        }
        if c.malformed > 0 {
            rows.push((
                "malformed",
                format!("{} streams with broken framing", c.malformed),
            ));
        }
        let ramp = if self.ramp > 0.0 {
            format!("{}/s", self.ramp)
        } else {
            "unpaced".to_owned()
        };
        rows.push((
            "ramp-up",
            match self.ramp_time {
                Some(t) => format!("{:.2} s ({ramp})", t.as_secs_f64()),
                None => format!("not finished ({ramp})"),
            },
        ));
        rows.push(("events received", self.events_received.to_string()));
        if let Some(p) = &self.publish {
            let rate = if p.rate > 0.0 {
                format!("{}/s", p.rate)
            } else {
                "flat out".to_owned()
            };
            rows.push((
                "published",
                format!(
                    "{} of {} at {rate} in {:.2} s, {} errors",
                    p.outcome.published,
                    p.events,
                    p.outcome.elapsed.as_secs_f64(),
                    p.outcome.errors
                ),
            ));
            if let Some(e) = &p.outcome.first_error {
                rows.push(("publish error", e.clone()));
            }
            let expected = p.expected();
            let share = if expected > 0 {
                format!(" ({:.1}%)", p.deliveries as f64 * 100.0 / expected as f64)
            } else {
                String::new()
            };
            rows.push((
                "deliveries",
                format!(
                    "{} of {expected} expected{share} ({} streams x {} events)",
                    p.deliveries, p.streams, p.outcome.published
                ),
            ));
            if let (Some(rate), Some(w)) = (p.per_second(), p.window()) {
                rows.push((
                    "deliveries/s",
                    format!(
                        "{rate:.0} (first publish to last delivery: {:.3} s)",
                        w.as_secs_f64()
                    ),
                ));
            }
            let h = &p.latency;
            let q = |x: f64| {
                h.quantile(x)
                    .map_or("-".to_owned(), |v| format!("{:.3}", ms(v)))
            };
            rows.push((
                "latency ms",
                format!(
                    "p50 {}  p90 {}  p99 {}  max {:.3}",
                    q(0.50),
                    q(0.90),
                    q(0.99),
                    ms(h.max)
                ),
            ));
        }
        rows.push(("elapsed", format!("{:.2} s", self.elapsed.as_secs_f64())));
        if let Some(cpu) = self.client_cpu {
            rows.push(("client CPU", format!("{:.2} s", cpu.as_secs_f64())));
        }
        if let Some(kib) = self.client_peak_rss_kib {
            rows.push(("client peak RSS", format!("{kib} KiB")));
        }
        if self.workers > 0 {
            rows.push((
                "workers",
                format!(
                    "{} processes (the client's descriptor limit); CPU and RSS are their sums",
                    self.workers
                ),
            ));
        }
        if let Some(why) = self.stopped {
            rows.push(("stopped", format!("early ({why})")));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::from("ssed loadtest\n");
        for (k, v) in rows {
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        out
    }
}
