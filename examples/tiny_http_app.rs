//! ssed's [`Stream`](ssed::Stream) on a tiny_http server: for apps that
//! already serve HTTP with tiny_http and want an event stream on one route.
//!
//! The app owns the server and its request loop; `/events` hands its
//! request to [`ssed::tiny_http::stream`] on a thread of its own, which runs
//! a handler with the same signature as an ssed route. Here the handler is
//! a ticker with event ids that resumes from `Last-Event-ID`, so a browser
//! that reconnects continues where it was. Read the module docs of
//! `ssed::tiny_http` for what this mode lacks compared with ssed's own
//! server (two threads per stream, no cap, no write timeout).
//!
//! Run it (the adapter is behind the `tiny-http` feature):
//!
//! ```text
//! cargo run --example tiny_http_app --features tiny-http
//! ```
//!
//! Watch it with `curl -N http://127.0.0.1:8080/events` (add
//! `-H 'Last-Event-ID: 41'` to resume after tick 41), or open
//! <http://127.0.0.1:8080/> in a browser. Set `SSED_LISTEN` to listen
//! elsewhere.

use std::error::Error;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use ssed::tiny_http::{Served, StreamOptions};
use ssed::{Event, Request, Stream, StreamError};

/// Where the example listens unless `SSED_LISTEN` says otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// The browser side: lists ticks as they come.
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>ssed on tiny_http</title>
<h1>Ticks over tiny_http</h1>
<ol id="log"></ol>
<script>
  const log = document.getElementById("log");
  const source = new EventSource("/events");
  source.addEventListener("tick", (e) => {
    const li = document.createElement("li");
    li.textContent = `${e.data} (id ${e.lastEventId})`;
    log.append(li);
  });
</script>
"#;

/// A tick a second, numbered from the client's last id on.
///
/// The same function could be given to `ssed::Server::builder().route`.
fn ticks(_req: &Request, stream: &mut Stream) -> Result<(), StreamError> {
    let first = stream
        .last_event_id()
        .and_then(|id| id.parse::<u64>().ok())
        .map_or(1, |last| last.saturating_add(1));
    stream.retry(Duration::from_secs(2))?;
    for n in first.. {
        if n > first {
            stream.sleep(Duration::from_secs(1))?;
        }
        let tick = Event::new()
            .id(n.to_string())
            .event("tick")
            .data(format!("tick {n}"));
        stream.send_event(&tick)?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let listen = std::env::var("SSED_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned());
    let server = tiny_http::Server::http(listen.as_str())?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or("tiny_http is not listening on an IP address")?;
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;

    // Shared by every stream thread. A heartbeat finds clients that left
    // a quiet stream (tiny_http gives no other way to notice them).
    let options = Arc::new(StreamOptions::new().heartbeat(Duration::from_secs(15)));

    for request in server.incoming_requests() {
        let url = request.url();
        let path = url
            .split_once('?')
            .map_or(url, |(path, _query)| path)
            .to_owned();
        match path.as_str() {
            "/events" => {
                let options = Arc::clone(&options);
                // A stream holds its thread for as long as it lives. If the
                // thread cannot start, the request is dropped with it and
                // tiny_http answers `500`.
                let spawned =
                    std::thread::Builder::new()
                        .name("sse-stream".into())
                        .spawn(move || {
                            // Otherwise it finished, ended (the client left, the
                            // budget ran out) or was refused (`406`).
                            if ssed::tiny_http::stream(request, &options, ticks) == Served::Failed {
                                eprintln!("stream handler failed");
                            }
                        });
                if let Err(e) = spawned {
                    eprintln!("cannot start a stream thread: {e}");
                }
            }
            "/" => {
                let html =
                    tiny_http::Header::from_bytes("Content-Type", "text/html; charset=utf-8")
                        .map_err(|()| "bad header")?;
                let response = tiny_http::Response::from_string(PAGE).with_header(html);
                if let Err(e) = request.respond(response) {
                    eprintln!("cannot answer /: {e}"); // the client left
                }
            }
            _ => {
                let response =
                    tiny_http::Response::from_string("not found\n").with_status_code(404);
                if let Err(e) = request.respond(response) {
                    eprintln!("cannot answer {path}: {e}");
                }
            }
        }
    }
    Ok(())
}
