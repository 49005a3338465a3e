//! Hub fan-out to sleeping subscribers: a waker sends the frames itself
//! (one non-blocking send) and leaves the stream's thread asleep. The stream
//! must behave exactly as if its thread had written: heartbeats and the
//! execution budget count from those sends, frames keep their order under
//! concurrent publishers, and a client that stops reading still ends with a
//! write timeout (or as slow), never with lost or reordered frames.

mod support;

use std::thread;
use std::time::{Duration, Instant};

use ssed::hub::MemoryHistory;
use ssed::{EndReason, Event, Hub, HubConfig, Server, StreamError};
use support::{Client, field, start, wait_until};

/// A server whose `/t/{topic}` follows `hub`.
fn server(
    hub: &Hub,
    configure: impl FnOnce(ssed::ServerBuilder) -> ssed::ServerBuilder,
) -> ssed::RunningServer {
    let h = hub.clone();
    start(
        configure(Server::builder()).route("/t/{topic}", move |req, stream| {
            let topic = req.param("topic").unwrap_or_default();
            let sub = h.subscribe(&[topic], None).map_err(StreamError::other)?;
            stream.follow(sub)
        }),
    )
}

/// Opens `/t/{topic}` and waits until the hub counts the subscriber.
fn subscribe(server: &ssed::RunningServer, hub: &Hub, topic: &str, n: usize) -> Client {
    let mut c = Client::new(server.local_addr());
    let head = c.get_stream(&format!("/t/{topic}"), &[]);
    assert_eq!(head.status, 200);
    assert!(wait_until(Duration::from_secs(5), || hub
        .subscribers(topic)
        >= n));
    // Let the stream's thread reach its park, so the next event takes the
    // waker's path.
    thread::sleep(Duration::from_millis(50));
    c
}

#[test]
fn sends_by_wakers_postpone_heartbeats_and_renew_the_budget() {
    let hub = Hub::new(10);
    let srv = server(&hub, |b| {
        b.heartbeat(Duration::from_millis(600))
            .max_execution_time(Duration::from_millis(900))
    });
    let mut c = subscribe(&srv, &hub, "beat", 1);
    // An event every 200 ms for 2.4 s: longer than the budget and four
    // heartbeat intervals, yet each send renews both.
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_millis(2400) {
        hub.publish("beat", Event::new().data(sent.to_string()))
            .unwrap();
        sent += 1;
        thread::sleep(Duration::from_millis(200));
    }
    let mut got = 0;
    while got < sent {
        let f = c.next_frame().expect("the stream is still open");
        assert!(!f.starts_with(':'), "no heartbeat while events flow: {f:?}");
        if !field(&f, "data").is_empty() {
            assert_eq!(field(&f, "data"), [got.to_string().as_str()]);
            got += 1;
        }
    }
    // Silence: a heartbeat after 600 ms, then the budget... also renewed by
    // heartbeats, so the stream stays. Only heartbeats arrive.
    let f = c.next_frame().expect("a heartbeat");
    assert!(f.starts_with(':'), "{f:?}");
    assert_eq!(srv.stats().snapshot().disconnects(EndReason::Budget), 0);
}

#[test]
fn without_heartbeats_the_budget_ends_a_stream_once_events_stop() {
    let hub = Hub::new(10);
    let srv = server(&hub, |b| b.max_execution_time(Duration::from_millis(700)));
    let mut c = subscribe(&srv, &hub, "budget", 1);
    for i in 0..8 {
        hub.publish("budget", Event::new().data(i.to_string()))
            .unwrap();
        thread::sleep(Duration::from_millis(250));
    }
    let frames = c.until_end(100);
    let data: Vec<String> = frames
        .iter()
        .map(|f| field(f, "data").concat())
        .filter(|d| !d.is_empty())
        .collect();
    assert_eq!(data, (0..8).map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(wait_until(Duration::from_secs(2), || srv
        .stats()
        .snapshot()
        .disconnects(EndReason::Budget)
        == 1));
}

#[test]
fn concurrent_publishers_keep_every_subscribers_order() {
    // Queues that hold every event of the test: on a loaded machine a
    // subscriber may fall far behind, and being dropped as slow (correct
    // behaviour, tested elsewhere) is not what this test is about.
    let mut config = HubConfig::default();
    config.queue = 2048;
    let hub = Hub::with_history(Box::new(MemoryHistory::new(10)), config);
    let srv = server(&hub, |b| b);
    let mut clients: Vec<Client> = (1..=20)
        .map(|n| subscribe(&srv, &hub, "order", n))
        .collect();
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let hub = hub.clone();
            thread::spawn(move || {
                for i in 0..250 {
                    hub.publish("order", Event::new().data(format!("{p}-{i}")))
                        .unwrap();
                    if i % 50 == 0 {
                        thread::sleep(Duration::from_millis(2)); // let some sleep
                    }
                }
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    for c in &mut clients {
        let mut last_id = String::new();
        let mut next = [0usize; 4];
        let mut got = 0;
        while got < 1000 {
            let f = c.next_frame().expect("every event arrives");
            let id = field(&f, "id").concat();
            assert!(id_after(&id, &last_id), "{id} after {last_id}");
            last_id = id;
            let data = field(&f, "data").concat();
            let (p, i) = data.split_once('-').unwrap();
            let p: usize = p.parse().unwrap();
            assert_eq!(
                i.parse::<usize>().unwrap(),
                next[p],
                "publisher {p}'s order"
            );
            next[p] += 1;
            got += 1;
        }
    }
}

fn id_after(id: &str, last: &str) -> bool {
    let key = |s: &str| -> (u64, u64) {
        let (a, b) = s.split_once('-').unwrap_or(("0", "0"));
        (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
    };
    last.is_empty() || key(id) > key(last)
}

#[test]
fn a_client_that_stops_reading_ends_with_a_write_timeout_after_all_it_read() {
    let hub = Hub::new(10);
    let srv = server(&hub, |b| b.write_timeout(Duration::from_millis(500)));
    let c = subscribe(&srv, &hub, "stall", 1);
    // Never read: kernel buffers fill, the waker's send comes up short,
    // the thread finishes the frame with its write timeout and gives up.
    let ended = support::publish_until_stalled(&hub, &srv, "stall");
    assert_eq!(ended, 1, "the stalled stream ends");
    assert!(wait_until(Duration::from_secs(2), || hub
        .subscribers("stall")
        == 0));
    assert!(wait_until(Duration::from_secs(2), || srv
        .stats()
        .snapshot()
        .streams_open
        == 0));
    drop(c);
}

#[test]
fn shutdown_reaches_a_stream_whose_events_went_out_by_wakers() {
    let hub = Hub::new(10);
    let srv = server(&hub, |b| b.heartbeat(Duration::ZERO));
    let mut c = subscribe(&srv, &hub, "bye", 1);
    for i in 0..5 {
        hub.publish("bye", Event::new().data(i.to_string()))
            .unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    for i in 0..5 {
        let f = c.frame_matching(10, |f| !field(f, "data").is_empty());
        assert_eq!(field(&f, "data"), [i.to_string().as_str()]);
    }
    let started = Instant::now();
    srv.stop().unwrap();
    let rest = c.until_end(10);
    assert!(rest.iter().any(|f| f.contains("shutting down")), "{rest:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}
