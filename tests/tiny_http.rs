//! The tiny_http adapter over real sockets: a tiny_http server on
//! `127.0.0.1:0` hands each request to `ssed::tiny_http::stream` on a
//! thread of its own, and a raw client reads what arrives.
#![cfg(feature = "tiny-http")]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ssed::tiny_http::{Served, StreamOptions};
use ssed::{EndReason, Request, ShutdownHandle, Stats, Stream, StreamError};
use support::{Client, READ_TIMEOUT, field, request, wait_until};

type Handler = dyn Fn(&Request, &mut Stream) -> Result<(), StreamError> + Send + Sync;

/// A tiny_http app that streams every request through the adapter.
///
/// Dropping it triggers its shutdown handle (which ends every stream),
/// stops tiny_http's request loop and joins every thread it started.
struct App {
    server: Arc<tiny_http::Server>,
    addr: SocketAddr,
    shutdown: ShutdownHandle,
    stats: Stats,
    served: Receiver<Served>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

impl App {
    fn start(
        options: StreamOptions,
        handler: impl Fn(&Request, &mut Stream) -> Result<(), StreamError> + Send + Sync + 'static,
    ) -> App {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("tiny_http binds"));
        let addr = server.server_addr().to_ip().expect("an IP listener");
        let shutdown = ShutdownHandle::new();
        let stats = Stats::new();
        let options = options
            .shutdown_handle(shutdown.clone())
            .stats(stats.clone());
        let handler: Arc<Handler> = Arc::new(handler);
        let (tx, served) = mpsc::channel();
        let threads = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let server = Arc::clone(&server);
            let threads = Arc::clone(&threads);
            std::thread::spawn(move || {
                for request in server.incoming_requests() {
                    let (options, handler, tx) =
                        (options.clone(), Arc::clone(&handler), tx.clone());
                    let thread = std::thread::spawn(move || {
                        let served = ssed::tiny_http::stream(request, &options, |req, stream| {
                            handler(req, stream)
                        });
                        let _ = tx.send(served); // the test may be over
                    });
                    threads.lock().expect("thread list").push(thread);
                }
            })
        };
        App {
            server,
            addr,
            shutdown,
            stats,
            served,
            threads,
            accept: Some(accept),
        }
    }

    fn client(&self) -> Client {
        Client::new(self.addr)
    }

    /// How the next stream was served.
    fn served(&self) -> Served {
        self.served
            .recv_timeout(READ_TIMEOUT)
            .expect("a stream finished in time")
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        self.server.unblock();
        if let Some(accept) = self.accept.take() {
            let _ = accept.join(); // a failed test already reported why
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// A handler that sends `n` named events, 10 ms apart, then `[DONE]`.
fn messages(n: u32) -> impl Fn(&Request, &mut Stream) -> Result<(), StreamError> + Send + Sync {
    move |_req, stream| {
        for i in 1..=n {
            if i > 1 {
                stream.sleep(Duration::from_millis(10))?;
            }
            stream.send("demo", &format!("Message n°{i}"))?;
        }
        stream.done()
    }
}

#[test]
fn frames_arrive_chunked_and_the_response_ends() {
    let app = App::start(StreamOptions::new(), messages(3));
    let mut c = app.client();
    let head = c.get_stream("/m", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.version, "HTTP/1.1");
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(head.header("cache-control"), Some("no-cache"));
    assert_eq!(head.header("x-accel-buffering"), Some("no"));
    assert!(head.is_chunked());
    let frames = c.until_end(10);
    assert!(c.ended, "terminating chunk");
    assert_eq!(frames.len(), 4, "{frames:?}");
    for (i, frame) in frames[..3].iter().enumerate() {
        assert_eq!(field(frame, "event"), ["demo"]);
        assert_eq!(field(frame, "data"), [format!("\"Message n°{}\"", i + 1)]);
    }
    assert_eq!(field(&frames[3], "data"), ["[DONE]"]);
    assert_eq!(app.served(), Served::Finished);

    // The response was complete, so tiny_http reads the next request from
    // the same connection.
    let mut again = Client::from_conn(c.conn.try_clone().expect("clone the connection"));
    assert_eq!(again.get_stream("/m", &[]).status, 200);
    assert_eq!(again.until_end(10).len(), 4);
    assert_eq!(app.served(), Served::Finished);

    let snap = app.stats.snapshot();
    assert_eq!(snap.streams_total, 2);
    assert!(wait_until(READ_TIMEOUT, || app
        .stats
        .snapshot()
        .streams_open
        == 0));
    assert!(snap.frames_sent >= 8, "{snap:?}");
}

#[test]
fn accept_without_event_stream_gets_406() {
    let ran = Arc::new(AtomicBool::new(false));
    let app = {
        let ran = Arc::clone(&ran);
        App::start(StreamOptions::new(), move |_req, stream| {
            ran.store(true, Ordering::SeqCst);
            stream.done()
        })
    };
    for accept in ["application/json", "text/html", "text/event-stream;q=0"] {
        let raw = format!("GET /e HTTP/1.1\r\nHost: t\r\nAccept: {accept}\r\n\r\n");
        let (head, body) = request(app.addr, &raw);
        assert_eq!(head.status, 406, "{accept}");
        assert!(
            head.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain"))
        );
        assert!(body.contains("text/event-stream"), "{body}");
        assert_eq!(app.served(), Served::Refused(406));
    }
    assert!(!ran.load(Ordering::SeqCst), "the handler never ran");

    let (head, _) = request(
        app.addr,
        "POST /e HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(head.status, 405);
    assert_eq!(head.header("allow"), Some("GET"));
    assert_eq!(app.served(), Served::Refused(405));

    // No Accept at all, or a wildcard, is fine.
    for accept in ["", "Accept: */*\r\n", "Accept: text/*\r\n"] {
        let mut c = app.client();
        c.send(format!("GET /e HTTP/1.1\r\nHost: t\r\n{accept}\r\n").as_bytes());
        assert_eq!(c.head().status, 200, "{accept:?}");
        assert_eq!(app.served(), Served::Finished);
    }
}

#[test]
fn last_event_id_from_header_or_query() {
    let app = App::start(StreamOptions::new(), |req, stream| {
        let seen = serde_json::json!({
            "stream": stream.last_event_id(),
            "request": req.last_event_id(),
            "path": req.path(),
            "x": req.query("x"),
            "loopback": req.peer_addr().ip().is_loopback(),
        });
        stream.send("seen", &seen)?;
        stream.done()
    });
    let cases: [(&str, &[&str], Option<&str>); 4] = [
        ("/e", &["Last-Event-ID: 41"], Some("41")),
        ("/e?lastEventId=7&x=a+b", &[], Some("7")),
        ("/e?lastEventId=7", &["Last-Event-ID: 41-2"], Some("41-2")),
        ("/e", &[], None),
    ];
    for (path, headers, want) in cases {
        let mut c = app.client();
        assert_eq!(c.get_stream(path, headers).status, 200);
        let frame = c.next_frame().expect("a frame");
        let seen: serde_json::Value = serde_json::from_str(field(&frame, "data")[0]).expect("JSON");
        assert_eq!(seen["stream"].as_str(), want, "{path} {headers:?}");
        assert_eq!(seen["request"].as_str(), want);
        assert_eq!(seen["path"], "/e");
        assert_eq!(seen["loopback"], true);
        if path.contains("x=") {
            assert_eq!(seen["x"], "a b");
        }
        assert_eq!(app.served(), Served::Finished);
    }
}

#[test]
fn budget_ends_a_quiet_stream() {
    let options = StreamOptions::new().max_execution_time(Duration::from_millis(200));
    let app = App::start(options, |_req, stream| {
        stream.send("first", &1)?;
        stream.sleep(Duration::from_secs(30))?; // the budget runs out first
        stream.send("never", &2)
    });
    let mut c = app.client();
    assert_eq!(c.get_stream("/e", &[]).status, 200);
    let start = Instant::now();
    let frames = c.until_end(5);
    // The adapter cannot close tiny_http's connection: it ends the body.
    assert!(c.ended);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(app.served(), Served::Ended(EndReason::Budget));
    assert_eq!(app.stats.snapshot().disconnects(EndReason::Budget), 1);
}

#[test]
fn budget_before_anything_was_sent_gives_an_empty_stream() {
    let options = StreamOptions::new().max_execution_time(Duration::from_millis(100));
    let app = App::start(options, |_req, stream| {
        stream.sleep(Duration::from_secs(30))
    });
    let mut c = app.client();
    let head = c.get_stream("/e", &[]);
    assert_eq!(head.status, 200);
    assert!(c.until_end(5).is_empty());
    assert!(c.ended);
    assert_eq!(app.served(), Served::Ended(EndReason::Budget));
}

#[test]
fn heartbeats_keep_a_quiet_stream_alive() {
    let options = StreamOptions::new()
        .max_execution_time(Duration::from_millis(150))
        .heartbeat(Duration::from_millis(40));
    let app = App::start(options, |_req, stream| {
        // Longer than the budget: the heartbeats restart it.
        stream.sleep(Duration::from_millis(500))?;
        stream.send("late", &"still here")
    });
    let mut c = app.client();
    assert_eq!(c.get_stream("/e", &[]).status, 200);
    let frames = c.until_end(100);
    let (beats, events): (Vec<_>, Vec<_>) =
        frames.iter().partition(|f| f.starts_with(": keep-alive"));
    assert!(beats.len() >= 5, "{frames:?}");
    assert_eq!(events.len(), 1, "{frames:?}");
    assert_eq!(field(events[0], "event"), ["late"]);
    assert_eq!(app.served(), Served::Finished);
}

#[test]
fn shutdown_ends_open_streams_and_refuses_new_ones() {
    let app = App::start(StreamOptions::new(), |_req, stream| {
        stream.send("first", &1)?;
        stream.sleep(Duration::from_secs(30))
    });
    let mut c = app.client();
    assert_eq!(c.get_stream("/e", &[]).status, 200);
    assert_eq!(field(&c.next_frame().expect("first"), "event"), ["first"]);

    let start = Instant::now();
    app.shutdown.shutdown();
    let frames = c.until_end(5);
    assert!(c.ended);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(frames, [": server shutting down\n\n"]);
    assert_eq!(app.served(), Served::Ended(EndReason::Shutdown));

    let (head, _) = request(
        app.addr,
        "GET /e HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
    );
    assert_eq!(head.status, 503);
    assert_eq!(head.header("retry-after"), Some("1"));
    assert_eq!(app.served(), Served::Refused(503));
}

#[test]
fn handler_failures_end_only_their_stream() {
    let app = App::start(StreamOptions::new(), |req, stream| match req.path() {
        "/panic-early" => panic!("before the head"),
        "/panic-late" => {
            stream.send("first", &1)?;
            panic!("after the head")
        }
        "/error" => {
            stream.send("first", &1)?;
            Err(StreamError::other("the app failed"))
        }
        _ => stream.done(),
    });

    let mut c = app.client();
    c.send(b"GET /panic-early HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n");
    let (head, body) = c.response();
    assert_eq!(head.status, 500);
    assert!(body.contains("stream handler failed"), "{body}");
    assert_eq!(app.served(), Served::Failed);

    for path in ["/panic-late", "/error"] {
        let mut c = app.client();
        assert_eq!(c.get_stream(path, &[]).status, 200);
        let frames = c.until_end(5);
        assert!(c.ended, "{path}: the body ends rather than hangs");
        assert_eq!(frames.len(), 1, "{path}: {frames:?}");
        assert_eq!(app.served(), Served::Failed);
    }
    assert_eq!(app.stats.snapshot().handler_panics, 2);

    // Other streams are unaffected.
    let mut c = app.client();
    assert_eq!(c.get_stream("/ok", &[]).status, 200);
    assert_eq!(c.until_end(5).len(), 1);
    assert_eq!(app.served(), Served::Finished);
}

#[test]
fn a_client_that_leaves_ends_the_handler() {
    let app = App::start(StreamOptions::new(), |_req, stream| {
        for i in 0..10_000 {
            stream.send("n", &i)?;
            stream.sleep(Duration::from_millis(5))?;
        }
        Ok(())
    });
    let mut c = app.client();
    assert_eq!(c.get_stream("/e", &[]).status, 200);
    assert!(c.next_frame().is_some());
    drop(c);
    assert_eq!(app.served(), Served::Ended(EndReason::Client));
    assert_eq!(app.stats.snapshot().disconnects(EndReason::Client), 1);
}

#[test]
fn http10_streams_are_close_delimited() {
    let app = App::start(StreamOptions::new(), messages(2));
    let mut c = app.client();
    c.send(b"GET /e HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n");
    let head = c.head();
    assert_eq!(head.status, 200);
    assert_eq!(head.version, "HTTP/1.0");
    assert!(!head.is_chunked());
    assert_eq!(head.header("connection"), Some("close"));
    let frames = c.until_end(5);
    assert!(c.ended, "tiny_http closes an HTTP/1.0 connection");
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(app.served(), Served::Finished);
}
