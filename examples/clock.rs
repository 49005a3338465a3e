//! A clock that sends ten ticks, then a terminating message.
//!
//! Each stream first sets the client's reconnection time to ten seconds
//! (`retry: 10000`), then sends the server's time on the `time` channel
//! once a second, ten times, then `data: [DONE]` with
//! [`Stream::done`](ssed::Stream::done), which ends the response cleanly.
//! An `EventSource` would reconnect after a clean end (here after the ten
//! seconds of `retry`) and the clock would start over; the page below
//! closes its `EventSource` when it sees `[DONE]` instead.
//!
//! Run it:
//!
//! ```text
//! cargo run --example clock
//! ```
//!
//! Watch it with `curl -N http://127.0.0.1:8080/events`, or open
//! <http://127.0.0.1:8080/> in a browser. Set `SSED_LISTEN` to listen
//! elsewhere, and `CLOCK_INTERVAL_MS` to tick faster or slower than every
//! 1000 ms.

use std::error::Error;
use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Where the example listens unless `SSED_LISTEN` says otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// How many ticks a stream gets before `[DONE]`.
const TICKS: u32 = 10;
/// The reconnection time sent first.
const RETRY: Duration = Duration::from_secs(10);

/// The browser side: shows the time and stops at `[DONE]`.
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>ssed: clock</title>
<h1 id="time">--:--:--</h1>
<p id="status">ticking…</p>
<script>
  const source = new EventSource("/events");
  source.addEventListener("time", (e) => {
    const t = JSON.parse(e.data);
    document.getElementById("time").textContent = `${t.utc} UTC`;
    document.getElementById("status").textContent = `tick ${t.tick} of 10`;
  });
  source.onmessage = (e) => {
    if (e.data === "[DONE]") {
      source.close(); // or the browser reconnects after `retry` and starts over
      document.getElementById("status").textContent = "done";
    }
  };
</script>
"#;

/// One tick of the clock.
#[derive(Debug, Serialize)]
struct Tick {
    /// 1 to 10.
    tick: u32,
    /// Seconds since the Unix epoch.
    unix: u64,
    /// The time of day, `HH:MM:SS` (UTC).
    utc: String,
}

impl Tick {
    fn now(tick: u32) -> Tick {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let day = unix % 86_400;
        Tick {
            tick,
            unix,
            utc: format!("{:02}:{:02}:{:02}", day / 3600, day / 60 % 60, day % 60),
        }
    }
}

/// The interval between ticks: `CLOCK_INTERVAL_MS`, or one second.
fn interval() -> Result<Duration, Box<dyn Error>> {
    match std::env::var("CLOCK_INTERVAL_MS") {
        Ok(ms) => {
            let ms = ms
                .parse()
                .map_err(|e| format!("CLOCK_INTERVAL_MS={ms:?}: {e}"))?;
            Ok(Duration::from_millis(ms))
        }
        Err(_) => Ok(Duration::from_secs(1)),
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let listen = std::env::var("SSED_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned());
    let interval = interval()?;
    let server = ssed::Server::builder()
        .listen(listen)
        .get("/", |_req| ssed::Response::html(PAGE))
        .route("/events", move |_req, stream| {
            stream.retry(RETRY)?;
            for tick in 1..=TICKS {
                if tick > 1 {
                    stream.sleep(interval)?;
                }
                stream.send("time", &Tick::now(tick))?;
            }
            stream.done()
        })
        .build()?;

    println!("listening on http://{}", server.local_addr());
    std::io::stdout().flush()?;

    server.run()?;
    Ok(())
}
