//! `--report FILE.html`: a run as one self-contained page.
//!
//! No scripts, fonts or styles from elsewhere: the charts are inline SVG
//! drawn here (one polyline per series, a `<circle>` per value with its
//! figure as a `<title>` tooltip), scaled by their `viewBox` so the page
//! reads on a phone, followed by the figures as a plain table. Every piece
//! of text that comes from the command line goes through [`escape`].
//!
//! A [`Doc`] is any such page: facts, charts over one x axis, a table.
//! A `--find-limit` run is drawn per step ([`Page`], here); a plain run
//! over time (`super::timeline`).

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::Path;

/// What the page shows; built by [`super::find_limit`] from its report.
#[derive(Debug, Clone, Default)]
pub(super) struct Page {
    pub(super) url: String,
    /// When the run ended, said in UTC.
    pub(super) date: String,
    pub(super) limit: u64,
    pub(super) stopped_by: String,
    pub(super) max_p99_ms: f64,
    /// Set when the run ended on an error: the report is partial, and why.
    pub(super) partial: Option<String>,
    pub(super) steps: Vec<Row>,
}

/// One step of the search.
#[derive(Debug, Clone, Default)]
pub(super) struct Row {
    pub(super) streams: u64,
    pub(super) held: u64,
    pub(super) refused: u64,
    pub(super) failed: u64,
    pub(super) p50_ms: Option<f64>,
    pub(super) p99_ms: Option<f64>,
    pub(super) rss_kib: Option<u64>,
    pub(super) threads: Option<u64>,
}

/// The chart's coordinate space (the `viewBox`).
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 300.0;
/// The plot area inside it.
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 44.0;
/// Horizontal ticks on the value axis, besides 0.
const Y_TICKS: u32 = 5;
/// Most step numbers written under the x axis.
const X_LABELS: usize = 16;

/// One line of a chart: a value per x, `None` where there is none.
pub(super) struct Series<'a> {
    pub(super) name: &'a str,
    pub(super) color: &'a str,
    /// Drawn dashed, to show through a line drawn over it.
    pub(super) dashed: bool,
    pub(super) values: Vec<Option<f64>>,
}

/// One chart of a [`Doc`].
pub(super) struct Chart<'a> {
    /// The SVG's id is `chart-{id}`.
    pub(super) id: &'a str,
    pub(super) heading: &'a str,
    pub(super) unit: &'a str,
    pub(super) series: Vec<Series<'a>>,
}

/// A page: a title, facts (term, text), a warning when partial, charts
/// sharing one x axis, and a table with one row per x.
pub(super) struct Doc<'a> {
    pub(super) title: &'a str,
    pub(super) facts: Vec<(&'a str, String)>,
    pub(super) partial: Option<&'a str>,
    /// What x is, said under the axis and in tooltips ("step", "s").
    pub(super) x_name: &'a str,
    /// The x of each value, in increasing order.
    pub(super) xs: Vec<f64>,
    pub(super) charts: Vec<Chart<'a>>,
    pub(super) table: Table,
}

/// The figures under the charts: cells already written for people.
pub(super) struct Table {
    pub(super) heading: String,
    pub(super) head: Vec<String>,
    /// Each row's `data-` attribute (`data-streams="300"`, unescaped
    /// value) and cells.
    pub(super) rows: Vec<((&'static str, String), Vec<String>)>,
}

/// Text made safe to put in HTML, in elements and in quoted attributes.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The `--find-limit` page: one x per step.
pub(super) fn render(p: &Page) -> String {
    let col = |f: &dyn Fn(&Row) -> Option<f64>| p.steps.iter().map(f).collect::<Vec<_>>();
    let mut charts = vec![
        Chart {
            id: "streams",
            heading: "Streams per step",
            unit: "streams",
            series: asked_and_held(
                col(&|r| Some(r.streams as f64)),
                col(&|r| Some(r.held as f64)),
            ),
        },
        Chart {
            id: "latency",
            heading: "Delivery latency per step",
            unit: "ms",
            series: vec![
                Series {
                    name: "p50",
                    color: "#2a9d3a",
                    dashed: false,
                    values: col(&|r| r.p50_ms),
                },
                Series {
                    name: "p99",
                    color: "#d1461f",
                    dashed: false,
                    values: col(&|r| r.p99_ms),
                },
            ],
        },
    ];
    charts.extend(server_charts(
        ["Server memory (RSS) per step", "Server threads per step"],
        col(&|r| r.rss_kib.map(|k| k as f64 / 1024.0)),
        col(&|r| r.threads.map(|t| t as f64)),
    ));
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), num);
    let rows = p
        .steps
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                ("streams", r.streams.to_string()),
                vec![
                    (i + 1).to_string(),
                    r.streams.to_string(),
                    r.held.to_string(),
                    r.refused.to_string(),
                    r.failed.to_string(),
                    opt(r.p50_ms),
                    opt(r.p99_ms),
                    opt(r.rss_kib.map(|k| k as f64 / 1024.0)),
                    r.threads.map_or("-".to_owned(), |t| t.to_string()),
                ],
            )
        })
        .collect();
    let head = [
        "step", "streams", "held", "refused", "failed", "p50 ms", "p99 ms", "RSS MiB", "threads",
    ];
    render_doc(&Doc {
        title: "ssed loadtest --find-limit",
        facts: vec![
            ("URL", p.url.clone()),
            ("Date", p.date.clone()),
            (
                "Limit found",
                format!(
                    "{} streams held (p99 at most {} ms)",
                    p.limit,
                    num(p.max_p99_ms)
                ),
            ),
            ("Stopped by", p.stopped_by.clone()),
            ("Steps", p.steps.len().to_string()),
        ],
        partial: p.partial.as_deref(),
        x_name: "step",
        xs: (1..=p.steps.len()).map(|i| i as f64).collect(),
        charts,
        table: Table {
            heading: "Steps".into(),
            head: head.iter().map(|h| (*h).to_owned()).collect(),
            rows,
        },
    })
}

/// The streams asked (dashed) and held, the first lines of a streams chart.
pub(super) fn asked_and_held<'a>(
    asked: Vec<Option<f64>>,
    held: Vec<Option<f64>>,
) -> Vec<Series<'a>> {
    vec![
        Series {
            name: "asked",
            color: "#999",
            dashed: true,
            values: asked,
        },
        Series {
            name: "held",
            color: "#1f6fd1",
            dashed: false,
            values: held,
        },
    ]
}

/// The server's RSS and threads charts (`--pid`) under these headings,
/// each when it has a value.
pub(super) fn server_charts<'a>(
    [rss_heading, threads_heading]: [&'a str; 2],
    rss_mib: Vec<Option<f64>>,
    threads: Vec<Option<f64>>,
) -> Vec<Chart<'a>> {
    let mut charts = Vec::new();
    if rss_mib.iter().any(Option::is_some) {
        charts.push(Chart {
            id: "rss",
            heading: rss_heading,
            unit: "MiB",
            series: vec![Series {
                name: "RSS",
                color: "#7b3fc4",
                dashed: false,
                values: rss_mib,
            }],
        });
    }
    if threads.iter().any(Option::is_some) {
        charts.push(Chart {
            id: "threads",
            heading: threads_heading,
            unit: "threads",
            series: vec![Series {
                name: "threads",
                color: "#b8860b",
                dashed: false,
                values: threads,
            }],
        });
    }
    charts
}

/// The whole page.
pub(super) fn render_doc(d: &Doc<'_>) -> String {
    let mut out = String::with_capacity(16 * 1024 + d.xs.len() * 1024);
    out.push_str(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
    ));
    let _ = writeln!(out, "<title>{}</title>", escape(d.title));
    out.push_str(concat!(
        "<style>\n",
        "body{font-family:system-ui,sans-serif;max-width:760px;margin:0 auto;padding:8px;",
        "color:#222}\n",
        "svg{width:100%;height:auto;display:block;margin:8px 0 20px}\n",
        "table{border-collapse:collapse;width:100%;font-size:14px}\n",
        "th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:right}\n",
        ".partial{background:#fde8e8;border:1px solid #c33;padding:8px}\n",
        "dt{font-weight:bold}dd{margin:0 0 6px 0;overflow-wrap:anywhere}\n",
        ".wide{overflow-x:auto}\n",
        "</style>\n</head>\n<body>\n",
    ));
    let _ = writeln!(out, "<h1>{}</h1>", escape(d.title));
    if let Some(why) = d.partial {
        let _ = writeln!(
            out,
            "<p class=\"partial\"><strong>Partial report:</strong> the run ended on an \
             error: {}</p>",
            escape(why)
        );
    }
    out.push_str("<dl>\n");
    for (term, text) in &d.facts {
        let _ = writeln!(out, "<dt>{}</dt><dd>{}</dd>", escape(term), escape(text));
    }
    out.push_str("</dl>\n");
    for c in &d.charts {
        let _ = writeln!(out, "<h2>{}</h2>", escape(c.heading));
        out.push_str(&chart(c, d.x_name, &d.xs));
    }
    out.push_str(&table(&d.table));
    out.push_str("</body>\n</html>\n");
    out
}

/// The table, one `<tr data-…="…">` per row.
fn table(t: &Table) -> String {
    let mut out = format!(
        "<h2>{}</h2>\n<div class=\"wide\"><table>\n<thead><tr>",
        escape(&t.heading)
    );
    for h in &t.head {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for ((attr, key), cells) in &t.rows {
        let _ = write!(out, "<tr data-{attr}=\"{}\">", escape(key));
        for c in cells {
            let _ = write!(out, "<td>{}</td>", escape(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table></div>\n");
    out
}

/// A figure for people: at most three decimals, no trailing zeros.
fn num(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// An x for an axis label: at most one decimal.
fn num_short(v: f64) -> String {
    num((v * 10.0).round() / 10.0)
}

/// The smallest "round" number (1, 2 or 5 times a power of ten) at or
/// above `v / Y_TICKS`, times `Y_TICKS`: the top of the value axis.
fn axis_top(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let raw = v / f64::from(Y_TICKS);
    let pow = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * pow);
    step * f64::from(Y_TICKS)
}

/// Where `x` goes across, on an axis from `lo` to `hi`.
fn x_of(x: f64, lo: f64, hi: f64) -> f64 {
    let w = WIDTH - LEFT - RIGHT;
    if hi - lo <= 0.0 || !(x.is_finite()) {
        LEFT + w / 2.0
    } else {
        LEFT + w * ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    }
}

/// Where value `v` goes up, on an axis from 0 to `top`.
fn y_of(v: f64, top: f64) -> f64 {
    let h = HEIGHT - TOP - BOTTOM;
    let v = v.clamp(0.0, top);
    HEIGHT - BOTTOM - h * v / top
}

/// One chart: axes with labelled ticks, a legend, a polyline per series
/// (its `data-series` is the name; only the xs with a value) and a
/// circle with a `<title>` per value.
fn chart(c: &Chart<'_>, x_name: &str, xs: &[f64]) -> String {
    let (id, unit, series) = (c.id, c.unit, &c.series);
    let n = xs.len();
    let (lo, hi) = (
        xs.first().copied().unwrap_or(0.0),
        xs.last().copied().unwrap_or(0.0),
    );
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0f64, |a, &b| if b.is_finite() { a.max(b) } else { a });
    let top = axis_top(max);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg id=\"chart-{id}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" font-size=\"12\">"
    );
    // Axes.
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
    let _ = writeln!(
        out,
        "<g stroke=\"#444\"><line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\"/>\
         <line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{y1}\"/></g>"
    );
    // Value ticks, with grid lines.
    for t in 0..=Y_TICKS {
        let v = top * f64::from(t) / f64::from(Y_TICKS);
        let y = y_of(v, top);
        let _ = writeln!(
            out,
            "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{x1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            x0 - 6.0,
            y + 4.0,
            num(v)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"4\" y=\"{:.1}\" font-size=\"11\">{}</text>",
        TOP - 10.0,
        escape(unit)
    );
    // X ticks.
    let every = n.div_ceil(X_LABELS).max(1);
    for &v in xs.iter().step_by(every) {
        let x = x_of(v, lo, hi);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{y0}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#444\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            y0 + 5.0,
            y0 + 18.0,
            num_short(v)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        HEIGHT - 6.0,
        escape(x_name)
    );
    // Legend.
    for (k, s) in series.iter().enumerate() {
        let x = LEFT + 110.0 * k as f64;
        let _ = writeln!(
            out,
            "<g class=\"legend\"><rect x=\"{x:.1}\" y=\"8\" width=\"14\" height=\"10\" \
             fill=\"{}\"/><text x=\"{:.1}\" y=\"17\">{}</text></g>",
            s.color,
            x + 18.0,
            escape(s.name)
        );
    }
    // The series.
    for s in series {
        let points: Vec<(f64, f64, f64, f64)> = s
            .values
            .iter()
            .zip(xs)
            .filter_map(|(v, &at)| v.filter(|v| v.is_finite()).map(|v| (at, v)))
            .map(|(at, v)| (at, v, x_of(at, lo, hi), y_of(v, top)))
            .collect();
        let list: Vec<String> = points
            .iter()
            .map(|(_, _, x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let name = escape(s.name);
        let _ = writeln!(
            out,
            "<polyline data-series=\"{name}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{} \
             points=\"{}\"><title>{name}</title></polyline>",
            s.color,
            if s.dashed {
                " stroke-dasharray=\"6 4\""
            } else {
                ""
            },
            list.join(" ")
        );
        for (at, v, x, y) in &points {
            let _ = writeln!(
                out,
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{}\">\
                 <title>{} {}: {name} {} {}</title></circle>",
                s.color,
                escape(x_name),
                num_short(*at),
                num(*v),
                escape(unit)
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

/// Writes the `--report` page to `path`; false (after saying why) when it
/// cannot be written.
pub(super) fn write(path: &Path, page: &str) -> bool {
    match std::fs::write(path, page) {
        Ok(()) => {
            let _ = writeln!(io::stderr(), "report written to {}", path.display()); // best effort
            true
        }
        Err(e) => {
            let _ = writeln!(
                io::stderr(),
                "ssed loadtest: cannot write --report {}: {e}",
                path.display()
            ); // nothing else to do
            false
        }
    }
}

/// Now, said in UTC.
pub(super) fn now_utc() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc(now)
}

/// `t` (seconds since the Unix epoch) as `YYYY-MM-DD HH:MM:SS UTC`.
pub(super) fn utc(t: u64) -> String {
    let iso = ssed::daemon::iso8601(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t));
    // `YYYY-MM-DDTHH:MM:SS.mmmZ`: ASCII, fixed width.
    format!("{} {} UTC", &iso[..10], &iso[11..19])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(steps: Vec<Row>) -> Page {
        Page {
            url: "http://127.0.0.1:1/events/<b>&\"x\"".into(),
            date: utc(0),
            limit: 300,
            stopped_by: "the server's refusals (503) at 400 streams".into(),
            max_p99_ms: 250.0,
            partial: None,
            steps,
        }
    }

    fn rows() -> Vec<Row> {
        [100u64, 200, 400, 300, 350]
            .iter()
            .enumerate()
            .map(|(i, &n)| Row {
                streams: n,
                held: n.min(300),
                refused: n.saturating_sub(300),
                failed: 0,
                p50_ms: Some(0.5 + i as f64),
                p99_ms: Some(2.0 + 10.0 * i as f64),
                rss_kib: Some(4096 + 100 * n),
                threads: Some(4 + n),
            })
            .collect()
    }

    /// The `points` of every polyline, by `data-series`.
    fn polylines(html: &str) -> Vec<(String, Vec<(f64, f64)>)> {
        html.split("<polyline ")
            .skip(1)
            .map(|p| {
                let attr = |name: &str| {
                    let start = p.find(&format!("{name}=\"")).expect("attribute") + name.len() + 2;
                    let end = start + p[start..].find('"').expect("closing quote");
                    p[start..end].to_owned()
                };
                let points = attr("points")
                    .split_whitespace()
                    .map(|xy| {
                        let (x, y) = xy.split_once(',').expect("x,y");
                        (x.parse().expect("x"), y.parse().expect("y"))
                    })
                    .collect();
                (attr("data-series"), points)
            })
            .collect()
    }

    #[test]
    fn escaping() {
        assert_eq!(
            escape("<a href='x'>\"&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&quot;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(escape("plain/ü"), "plain/ü");
        let html = render(&page(rows()));
        assert!(html.contains("http://127.0.0.1:1/events/&lt;b&gt;&amp;&quot;x&quot;"));
        assert!(!html.contains("<b>"));
    }

    #[test]
    fn every_step_has_a_row() {
        let steps = rows();
        let html = render(&page(steps.clone()));
        let body = &html[html.find("<tbody>").expect("tbody")..];
        assert_eq!(body.matches("<tr ").count(), steps.len());
        let mut at = 0;
        for s in &steps {
            let row = format!("<tr data-streams=\"{}\">", s.streams);
            at += body[at..].find(&row).expect("the step's row, in order");
        }
        assert!(!html.contains("<script"));
        assert!(!html.contains("Partial report"));
    }

    #[test]
    fn one_point_per_step_per_series_inside_the_view_box() {
        let steps = rows();
        let html = render(&page(steps.clone()));
        let lines = polylines(&html);
        let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["asked", "held", "p50", "p99", "RSS", "threads"]);
        for (name, points) in &lines {
            assert_eq!(points.len(), steps.len(), "{name}");
            for &(x, y) in points {
                assert!((0.0..=WIDTH).contains(&x), "{name}: x {x}");
                assert!((0.0..=HEIGHT).contains(&y), "{name}: y {y}");
            }
            // Across in step order.
            assert!(points.windows(2).all(|w| w[0].0 < w[1].0), "{name}");
        }
        // One tooltip per value.
        assert_eq!(html.matches("<circle ").count(), 6 * steps.len());
    }

    #[test]
    fn missing_values_and_partial_runs() {
        let mut steps = rows();
        steps[2].p50_ms = None;
        steps[2].p99_ms = None;
        for s in &mut steps {
            s.rss_kib = None;
            s.threads = None;
        }
        let mut p = page(steps.clone());
        p.partial = Some("cannot poll <sockets>".into());
        let html = render(&p);
        assert!(html.contains("Partial report"));
        assert!(html.contains("cannot poll &lt;sockets&gt;"));
        let lines = polylines(&html);
        let count = |n: &str| lines.iter().find(|l| l.0 == n).map(|l| l.1.len());
        assert_eq!(count("held"), Some(steps.len()));
        assert_eq!(count("p99"), Some(steps.len() - 1));
        assert_eq!(count("RSS"), None);
        // No steps at all: still a page, with empty charts.
        let html = render(&page(Vec::new()));
        assert!(html.contains("<svg"));
        assert!(polylines(&html).iter().all(|(_, p)| p.is_empty()));
    }

    #[test]
    fn axes_and_dates() {
        assert_eq!(axis_top(0.0), 1.0);
        assert_eq!(axis_top(400.0), 500.0);
        assert_eq!(axis_top(3.2), 5.0);
        assert_eq!(axis_top(0.7), 1.0);
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(300.0), "300");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_709_251_199), "2024-02-29 23:59:59 UTC");
    }
}
