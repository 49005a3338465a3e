//! A message every two seconds on a named channel: the classic "event
//! controller" demo, where a handler runs on its own thread for as long as
//! its stream lives and every send is flushed at once.
//!
//! Each connection gets `event: demo` with `data: "Message n°1"`, then n°2
//! two seconds later, and so on. The data is JSON (a string here), as every
//! [`Stream::send`](ssed::Stream::send) writes it.
//!
//! Run it:
//!
//! ```text
//! cargo run --example messages
//! ```
//!
//! Watch it with `curl -N http://127.0.0.1:8080/events`, or open
//! <http://127.0.0.1:8080/> in a browser, whose page subscribes with an
//! `EventSource`. Set `SSED_LISTEN` to listen elsewhere (port `0` picks a
//! free one; the first line printed says which).

use std::error::Error;
use std::io::Write as _;
use std::time::Duration;

/// Where the example listens unless `SSED_LISTEN` says otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// The browser side: an `EventSource` that lists each `demo` event.
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>ssed: messages</title>
<h1>Messages</h1>
<ul id="log"></ul>
<script>
  const log = document.getElementById("log");
  const source = new EventSource("/events");
  source.addEventListener("demo", (e) => {
    const li = document.createElement("li");
    li.textContent = JSON.parse(e.data);
    log.append(li);
  });
</script>
"#;

fn main() -> Result<(), Box<dyn Error>> {
    let listen = std::env::var("SSED_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned());
    let server = ssed::Server::builder()
        .listen(listen)
        .get("/", |_req| ssed::Response::html(PAGE))
        .route("/events", |_req, stream| {
            for i in 1.. {
                stream.send("demo", &format!("Message n°{i}"))?;
                // Ends early, with an error `?` passes on, when the client
                // leaves or the server stops.
                stream.sleep(Duration::from_secs(2))?;
            }
            Ok(())
        })
        .build()?;

    // Port 0 picks a free port: say which one was bound.
    println!("listening on http://{}", server.local_addr());
    std::io::stdout().flush()?;

    server.run()?;
    Ok(())
}
