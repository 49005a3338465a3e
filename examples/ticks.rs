//! A ticker with event ids that resumes where the client left off.
//!
//! Every tick is an event with an id (`id: 7`, `event: tick`). A browser
//! remembers the last id it saw and, when it reconnects, sends it back in
//! the `Last-Event-ID` header; the handler reads it with
//! [`Stream::last_event_id`](ssed::Stream::last_event_id) and continues
//! from the next number, so no tick is lost or repeated.
//!
//! To show that, each stream sets the reconnection time to two seconds
//! (`retry: 2000`) and ends after ten ticks: the page below reconnects,
//! and the count goes on. The ids here are just a counter: a real app would
//! use ids that point into its own history.
//!
//! Run it:
//!
//! ```text
//! cargo run --example ticks
//! ```
//!
//! Watch it with `curl -N http://127.0.0.1:8080/events`; play the
//! reconnecting client with
//! `curl -N -H 'Last-Event-ID: 41' http://127.0.0.1:8080/events` (the
//! first tick is 42), or open <http://127.0.0.1:8080/> in a browser. Set
//! `SSED_LISTEN` to listen elsewhere.

use std::error::Error;
use std::io::Write as _;
use std::time::Duration;

use ssed::Event;

/// Where the example listens unless `SSED_LISTEN` says otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The reconnection time the client is told to use.
const RETRY: Duration = Duration::from_secs(2);
/// Ticks per stream before it ends and the client reconnects.
const TICKS_PER_STREAM: u64 = 10;

/// The browser side: lists ticks and marks each reconnect.
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>ssed: ticks</title>
<h1>Ticks</h1>
<p>Each stream ends after ten ticks; the browser reconnects with
<code>Last-Event-ID</code> and the count goes on.</p>
<ol id="log"></ol>
<script>
  const log = document.getElementById("log");
  const add = (text) => {
    const li = document.createElement("li");
    li.textContent = text;
    log.append(li);
  };
  const source = new EventSource("/events");
  source.addEventListener("tick", (e) => add(`${e.data} (id ${e.lastEventId})`));
  source.onerror = () => add("stream ended; reconnecting…");
</script>
"#;

fn main() -> Result<(), Box<dyn Error>> {
    let listen = std::env::var("SSED_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned());
    let server = ssed::Server::builder()
        .listen(listen)
        .get("/", |_req| ssed::Response::html(PAGE))
        .route("/events", |_req, stream| {
            // An id this handler did not hand out (not a number) restarts
            // the count.
            let first = stream
                .last_event_id()
                .and_then(|id| id.parse::<u64>().ok())
                .map_or(1, |last| last.saturating_add(1));
            stream.retry(RETRY)?;
            for n in first..first.saturating_add(TICKS_PER_STREAM) {
                if n > first {
                    stream.sleep(Duration::from_secs(1))?;
                }
                let tick = Event::new()
                    .id(n.to_string())
                    .event("tick")
                    .data(format!("tick {n}"));
                stream.send_event(&tick)?;
            }
            // Returning ends the response cleanly; the client reconnects
            // after `retry` with `Last-Event-ID` set to the last tick.
            Ok(())
        })
        .build()?;

    println!("listening on http://{}", server.local_addr());
    std::io::stdout().flush()?;

    server.run()?;
    Ok(())
}
