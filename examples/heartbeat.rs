//! A heartbeat from a polling callback: [`Stream::poll`](ssed::Stream::poll)
//! calls a function every five seconds and sends each value it returns.
//!
//! The callback reads the load average from `/proc/loadavg` and returns it
//! as `{"load1": …, "load5": …, "load15": …}` on the `load` channel; when
//! the file cannot be read it returns `None` and nothing is sent that round.
//! The first sample goes out at once, since `poll` calls the function before
//! it sleeps. A keep-alive comment every 15 seconds keeps a silent stream
//! open (on a system without `/proc/loadavg`, that is all you will see).
//!
//! Run it:
//!
//! ```text
//! cargo run --example heartbeat
//! ```
//!
//! Watch it with `curl -N http://127.0.0.1:8080/events`, or open
//! <http://127.0.0.1:8080/> in a browser. Set `SSED_LISTEN` to listen
//! elsewhere.

use std::error::Error;
use std::io::Write as _;
use std::time::Duration;

use serde::Serialize;

/// Where the example listens unless `SSED_LISTEN` says otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// How often the callback is polled.
const INTERVAL: Duration = Duration::from_secs(5);

/// The browser side: shows the latest sample.
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>ssed: heartbeat</title>
<h1>Load average</h1>
<p id="load">waiting for the first sample…</p>
<script>
  const out = document.getElementById("load");
  const source = new EventSource("/events");
  source.addEventListener("load", (e) => {
    const l = JSON.parse(e.data);
    out.textContent = `${l.load1} ${l.load5} ${l.load15} (at ${new Date().toLocaleTimeString()})`;
  });
</script>
"#;

/// One sample of `/proc/loadavg`.
#[derive(Debug, Serialize)]
struct Load {
    load1: f64,
    load5: f64,
    load15: f64,
}

/// Reads the load average; `None` when `/proc/loadavg` is missing or odd.
fn load_sample() -> Option<Load> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    Some(Load {
        load1: fields.next()?.ok()?,
        load5: fields.next()?.ok()?,
        load15: fields.next()?.ok()?,
    })
}

fn main() -> Result<(), Box<dyn Error>> {
    let listen = std::env::var("SSED_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned());
    let server = ssed::Server::builder()
        .listen(listen)
        .heartbeat(Duration::from_secs(15))
        .get("/", |_req| ssed::Response::html(PAGE))
        // `poll` only returns when the stream ends; its error says why.
        .route("/events", |_req, stream| {
            stream.poll("load", INTERVAL, load_sample)
        })
        .build()?;

    println!("listening on http://{}", server.local_addr());
    std::io::stdout().flush()?;

    server.run()?;
    Ok(())
}
