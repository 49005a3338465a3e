//! A plain run over time, for `--report`: once a second (and at the end)
//! the streams asked, held, refused and failed, the deliveries so far and,
//! with `--pid`, the server's RSS and threads; then the page of it, drawn
//! by [`super::html`] with the run's delivery latency among its facts.

use std::time::Duration;

use super::holder::Holder;
use super::html::{self, Chart, Doc, Series, Table};
use super::report::Report;
use super::server_proc;

/// One look at the run.
#[derive(Debug, Clone, Default)]
pub(super) struct Sample {
    /// Seconds since the run began.
    pub(super) t: f64,
    pub(super) asked: u64,
    pub(super) held: u64,
    pub(super) refused: u64,
    /// Failed, other statuses, dropped.
    pub(super) failed: u64,
    pub(super) deliveries: u64,
    pub(super) rss_kib: Option<u64>,
    pub(super) threads: Option<u64>,
}

/// The samples of a run.
#[derive(Debug, Default)]
pub(super) struct Timeline {
    pid: Option<u32>,
    pub(super) samples: Vec<Sample>,
}

impl Timeline {
    pub(super) fn new(pid: Option<u32>) -> Self {
        Timeline {
            pid,
            samples: Vec::new(),
        }
    }

    /// Records where `h` is at `t`.
    pub(super) fn sample(&mut self, t: Duration, h: &impl Holder) {
        let c = h.counts();
        let server = self.pid.and_then(server_proc::sample);
        self.samples.push(Sample {
            t: t.as_secs_f64(),
            asked: c.attempted,
            held: c.held,
            refused: c.refused,
            failed: c.failed + c.other + c.dropped,
            deliveries: h.events().1,
            rss_kib: server.and_then(|s| s.rss_kib),
            threads: server.and_then(|s| s.threads),
        });
    }
}

/// The `--report` page of a plain run.
pub(super) fn page(r: &Report, date: String) -> String {
    let samples = &r.timeline.samples;
    let col = |f: &dyn Fn(&Sample) -> Option<f64>| samples.iter().map(f).collect::<Vec<_>>();
    let c = &r.counts;
    let mut facts = vec![
        ("URL", r.url.clone()),
        ("Date", date),
        (
            "Streams",
            format!(
                "{} asked, {} held (peak {}), {} refused, {} other, {} failed, {} dropped",
                r.connections, c.held, c.peak_held, c.refused, c.other, c.failed, c.dropped
            ),
        ),
    ];
    if r.workers > 0 {
        facts.push(("Worker processes", r.workers.to_string()));
    }
    if let Some(t) = r.ramp_time {
        facts.push(("Time to open them all", format!("{:.2} s", t.as_secs_f64())));
    }
    if let Some(p) = &r.publish {
        let q = |x: f64| {
            p.latency
                .quantile(x)
                .map_or("-".to_owned(), |v| format!("{:.3} ms", v as f64 / 1e6))
        };
        facts.push((
            "Deliveries",
            format!(
                "{} of {} expected ({} events to {} streams)",
                p.deliveries,
                p.outcome.published * p.streams,
                p.outcome.published,
                p.streams
            ),
        ));
        facts.push((
            "Delivery latency",
            format!(
                "p50 {}, p90 {}, p99 {}, max {:.3} ms",
                q(0.5),
                q(0.9),
                q(0.99),
                p.latency.max as f64 / 1e6
            ),
        ));
    }
    facts.push(("Elapsed", format!("{:.2} s", r.elapsed.as_secs_f64())));
    if let Some(why) = r.stopped {
        facts.push(("Stopped", format!("early ({why})")));
    }
    let mut streams = html::asked_and_held(
        col(&|s| Some(s.asked as f64)),
        col(&|s| Some(s.held as f64)),
    );
    streams.push(Series {
        name: "refused",
        color: "#d1461f",
        dashed: false,
        values: col(&|s| Some(s.refused as f64)),
    });
    let mut charts = vec![Chart {
        id: "streams",
        heading: "Streams over time",
        unit: "streams",
        series: streams,
    }];
    if r.publish.is_some() {
        charts.push(Chart {
            id: "deliveries",
            heading: "Deliveries over time",
            unit: "events",
            series: vec![Series {
                name: "deliveries",
                color: "#2a9d3a",
                dashed: false,
                values: col(&|s| Some(s.deliveries as f64)),
            }],
        });
    }
    charts.extend(html::server_charts(
        ["Server memory (RSS) over time", "Server threads over time"],
        col(&|s| s.rss_kib.map(|k| k as f64 / 1024.0)),
        col(&|s| s.threads.map(|t| t as f64)),
    ));
    let dash = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    let rows = samples
        .iter()
        .map(|s| {
            (
                ("t", format!("{:.1}", s.t)),
                vec![
                    format!("{:.1}", s.t),
                    s.asked.to_string(),
                    s.held.to_string(),
                    s.refused.to_string(),
                    s.failed.to_string(),
                    s.deliveries.to_string(),
                    s.rss_kib
                        .map_or("-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0)),
                    dash(s.threads),
                ],
            )
        })
        .collect();
    let head = [
        "s",
        "asked",
        "held",
        "refused",
        "failed",
        "deliveries",
        "RSS MiB",
        "threads",
    ];
    html::render_doc(&Doc {
        title: "ssed loadtest",
        facts,
        partial: None,
        x_name: "s",
        xs: samples.iter().map(|s| s.t).collect(),
        charts,
        table: Table {
            heading: "Once a second".into(),
            head: head.iter().map(|h| (*h).to_owned()).collect(),
            rows,
        },
    })
}
