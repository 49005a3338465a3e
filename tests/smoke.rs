//! A first end-to-end check: a stream route over a real socket.

mod support;

use std::time::Duration;
use support::{Client, field, start};

#[test]
fn named_json_events_arrive_chunked() {
    let server = start(ssed::Server::builder().route("/m", |_req, stream| {
        for i in 1..=3 {
            stream.send("demo", &format!("Message n°{i}"))?;
            stream.sleep(Duration::from_millis(10))?;
        }
        Ok(())
    }));
    let mut c = Client::new(server.local_addr());
    let head = c.get_stream("/m", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert!(head.is_chunked());
    let frames = c.until_end(10);
    assert_eq!(frames.len(), 3);
    assert_eq!(field(&frames[0], "event"), ["demo"]);
    assert_eq!(field(&frames[2], "data"), ["\"Message n°3\""]);
    server.stop().expect("clean stop");
}
