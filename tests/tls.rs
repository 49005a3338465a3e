//! HTTPS on the listener, over real sockets: events reach a TLS
//! subscriber (written by the waker threads, as in plain text), streams end
//! on disconnect and write timeout as in plain text, and hostile
//! handshakes (plain HTTP, garbage, truncated, trickled, thousands left
//! idle) never take a thread, are cut at the `request_timeout` deadline,
//! and leave the server serving. The daemon's `[tls]` keys, its reload on
//! SIGHUP and file change, and `Secure` cookies are at the end.
#![cfg(feature = "tls")]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::ClientConnection;
use ssed::tls::Certificates;
use ssed::{EndReason, Event, Hub, Server, StreamError};
use support::tls::{Pki, TlsClient, https, localhost};
use support::{read_to_close, serial, still_open, thread_count, wait_until};

/// A TLS server whose `/t/{topic}` follows `hub`, and `/scheme` answers
/// the request's scheme.
fn server(
    pki: &Pki,
    hub: &Hub,
    configure: impl FnOnce(ssed::ServerBuilder) -> ssed::ServerBuilder,
) -> ssed::RunningServer {
    let (cert, key) = pki.issue("localhost");
    let certs = Certificates::from_pem_files(cert, key).expect("good files");
    let h = hub.clone();
    support::start(
        configure(Server::builder().tls(certs))
            .route("/t/{topic}", move |req, stream| {
                let topic = req.param("topic").unwrap_or_default();
                let sub = h.subscribe(&[topic], None).map_err(StreamError::other)?;
                stream.follow(sub)
            })
            .get("/scheme", |req| ssed::Response::text(200, req.scheme())),
    )
}

/// Opens `/t/{topic}` over TLS and waits until the hub counts it, and its
/// thread has parked.
fn subscribe(srv: &ssed::RunningServer, pki: &Pki, hub: &Hub, topic: &str) -> TlsClient {
    let mut c = TlsClient::connect(srv.local_addr(), &pki.client()).expect("handshake");
    c.send(&format!(
        "GET /t/{topic} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
    ));
    assert!(
        c.read_until("\r\n\r\n", Duration::from_secs(5)),
        "{}",
        c.text
    );
    assert!(c.text.starts_with("HTTP/1.1 200"), "{}", c.text);
    assert!(wait_until(Duration::from_secs(5), || hub
        .subscribers(topic)
        >= 1));
    thread::sleep(Duration::from_millis(50));
    c
}

fn pong(addr: SocketAddr, pki: &Pki) -> String {
    https(addr, &pki.client(), "GET", "/scheme", &[], "")
}

#[test]
fn events_and_heartbeats_reach_an_https_subscriber_sent_by_the_wakers() {
    let pki = Pki::new("tls-events");
    let hub = Hub::new(10);
    let srv = server(&pki, &hub, |b| b.heartbeat(Duration::from_millis(400)));
    let mut c = subscribe(&srv, &pki, &hub, "a");
    for i in 0..20 {
        hub.publish("a", Event::new().data(format!("n{i}")))
            .unwrap();
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        c.read_until("data: n19\n", Duration::from_secs(5)),
        "{}",
        c.text
    );
    let order: Vec<usize> = (0..20)
        .map(|i| c.text.find(&format!("data: n{i}\n")).expect("every event"))
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "in order: {}",
        c.text
    );
    // Silence: a heartbeat, sent for the sleeping thread too.
    assert!(
        c.read_until(": keep-alive", Duration::from_secs(3)),
        "{}",
        c.text
    );
    let s = srv.stats().snapshot();
    assert_eq!(s.thread_writes, 0, "the stream's thread never wrote: {s:?}");
    // Large frames (past what a waker sends) go out by the thread, in TLS.
    let big = "y".repeat(40 * 1024);
    hub.publish("a", Event::new().data(big.as_str())).unwrap();
    hub.publish("a", Event::new().data("after")).unwrap();
    assert!(c.read_until("data: after\n", Duration::from_secs(5)));
    assert!(c.text.contains(&big));
    assert!(pong(srv.local_addr(), &pki).contains("\r\n\r\nhttps"));
}

/// A client that offers `suite` alone.
fn client_for(pki: &Pki, suite: rustls::SupportedCipherSuite) -> Arc<rustls::ClientConfig> {
    #[allow(deprecated)]
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![suite];
    let version = match suite {
        rustls::SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        rustls::SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(support::tls::cert_der(&pki.ca()).into()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[test]
fn every_cipher_suite_carries_a_stream_written_by_wakers_and_by_its_thread() {
    use rustls::crypto::ring::cipher_suite as cs;
    let pki = Pki::new("tls-suites");
    let hub = Hub::new(10);
    let srv = server(&pki, &hub, |b| b.heartbeat(Duration::from_millis(300)));
    let big = "z".repeat(40 * 1024);
    for (i, suite) in [
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
    .into_iter()
    .enumerate()
    {
        let topic = format!("s{i}");
        let mut c = TlsClient::connect(srv.local_addr(), &client_for(&pki, suite)).unwrap();
        assert_eq!(c.tls.conn.negotiated_cipher_suite(), Some(suite));
        c.send(&format!(
            "GET /t/{topic} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
        ));
        assert!(
            c.read_until("\r\n\r\n", Duration::from_secs(5)),
            "{suite:?}"
        );
        assert!(wait_until(Duration::from_secs(5), || hub
            .subscribers(&topic)
            == 1));
        thread::sleep(Duration::from_millis(50));
        // Many records: a waker's, the thread's (a frame past what a
        // waker sends, in three records), a waker's again, a heartbeat.
        for n in 0..30 {
            hub.publish(&topic, Event::new().data(format!("e{n}")))
                .unwrap();
        }
        hub.publish(&topic, Event::new().data(big.as_str()))
            .unwrap();
        hub.publish(&topic, Event::new().data("last")).unwrap();
        assert!(
            c.read_until("data: last\n", Duration::from_secs(5)),
            "{suite:?}"
        );
        assert!(
            c.text.contains("data: e29\n") && c.text.contains(&big),
            "{suite:?}"
        );
        assert!(
            c.read_until(": keep-alive", Duration::from_secs(3)),
            "{suite:?}"
        );
    }
}

#[test]
fn records_a_waker_could_not_send_go_out_without_another_event() {
    let pki = Pki::new("tls-carry");
    let hub = Hub::new(10);
    // Small socket buffers at both ends: one event a waker sends does not
    // fit, its last records wait in the session, and the stream's thread
    // must send them by itself: no event comes after it.
    let srv = server(&pki, &hub, |b| b.send_buffer(4096));
    let fd = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .unwrap();
    rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 4096).unwrap();
    rustix::net::connect(&fd, &srv.local_addr()).unwrap();
    let tcp = TcpStream::from(fd);
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = ClientConnection::new(pki.client(), localhost()).unwrap();
    let mut c = TlsClient::over(tcp, conn).unwrap();
    c.send("GET /t/one HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n");
    assert!(c.read_until("\r\n\r\n", Duration::from_secs(5)));
    assert!(wait_until(Duration::from_secs(5), || hub
        .subscribers("one")
        == 1));
    thread::sleep(Duration::from_millis(100));
    let big = "c".repeat(15 * 1024);
    hub.publish("one", Event::new().data(big.as_str())).unwrap();
    thread::sleep(Duration::from_millis(300));
    assert!(
        c.read_until(&format!("data: {big}\n"), Duration::from_secs(3)),
        "the whole event arrives: {} bytes",
        c.text.len()
    );
    assert_eq!(srv.stats().snapshot().streams_open, 1);
}

#[test]
fn a_finished_tls_stream_ends_with_close_notify() {
    let pki = Pki::new("tls-close");
    let (cert, key) = pki.issue("localhost");
    let srv = support::start(
        Server::builder()
            .tls(Certificates::from_pem_files(cert, key).unwrap())
            .route("/once", |_req, stream| stream.send("only", &1)),
    );
    let mut c = TlsClient::connect(srv.local_addr(), &pki.client()).unwrap();
    c.send("GET /once HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n");
    let mut all = Vec::new();
    // rustls's client reads a clean end (close_notify) as Ok(0), a cut
    // one as an error.
    c.tls.read_to_end(&mut all).expect("a clean end");
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.contains("event: only") && text.ends_with("0\r\n\r\n"),
        "{text}"
    );
}

#[test]
fn a_request_over_tls_is_https() {
    let pki = Pki::new("tls-scheme");
    let srv = server(&pki, &Hub::new(1), |b| b);
    let answer = pong(srv.local_addr(), &pki);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\r\n\r\nhttps"), "{answer}");
}

#[test]
fn a_tls_stream_ends_when_its_client_leaves_or_stops_reading() {
    let pki = Pki::new("tls-ends");
    let hub = Hub::new(10);
    let srv = server(&pki, &hub, |b| b.write_timeout(Duration::from_millis(500)));
    // Leaves: seen at once by the acceptor's watch, no write needed.
    let c = subscribe(&srv, &pki, &hub, "gone");
    drop(c);
    assert!(wait_until(Duration::from_secs(3), || srv
        .stats()
        .snapshot()
        .streams_open
        == 0));
    assert!(wait_until(Duration::from_secs(2), || hub
        .subscribers("gone")
        == 0));
    assert_eq!(srv.stats().snapshot().disconnects(EndReason::Client), 1);
    // Stops reading: the waker's send comes up short, the thread finishes
    // the records within its write timeout and gives up.
    let stalled = subscribe(&srv, &pki, &hub, "stall");
    let ended = support::publish_until_stalled(&hub, &srv, "stall");
    assert_eq!(
        ended,
        1,
        "the stalled stream ends: {:?}",
        srv.stats().snapshot()
    );
    assert!(wait_until(Duration::from_secs(3), || srv
        .stats()
        .snapshot()
        .streams_open
        == 0));
    drop(stalled);
    assert!(pong(srv.local_addr(), &pki).contains("\r\n\r\nhttps"));
}

#[test]
fn keep_alive_and_pipelined_requests_over_tls_are_all_answered() {
    let pki = Pki::new("tls-keepalive");
    let srv = server(&pki, &Hub::new(1), |b| b);
    let mut c = TlsClient::connect(srv.local_addr(), &pki.client()).unwrap();
    let get = "GET /scheme HTTP/1.1\r\nHost: localhost\r\n\r\n";
    // One, then another after the thread handed the connection back.
    c.send(get);
    assert!(
        c.read_until("https\n", Duration::from_secs(5)),
        "{}",
        c.text
    );
    thread::sleep(Duration::from_millis(100));
    c.send(get);
    assert!(wait_until(Duration::from_secs(5), || {
        c.read_until("never", Duration::from_millis(50)); // reads what came
        c.text.matches("HTTP/1.1 200").count() == 2
    }));
    // A hundred in one write, 24 KiB, to a connection the accept loop
    // holds: what it does not read at once waits, decrypted, in the
    // session, where the poller cannot see it.
    thread::sleep(Duration::from_millis(100));
    let padded = format!(
        "GET /scheme HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(200)
    );
    c.send(&padded.repeat(100));
    assert!(
        wait_until(Duration::from_secs(5), || {
            c.read_until("never", Duration::from_millis(50));
            c.text.matches("HTTP/1.1 200").count() == 102
        }),
        "{} answers",
        c.text.matches("HTTP/1.1 200").count()
    );
}

#[test]
fn pipelined_requests_whose_answers_wait_on_the_client_are_all_answered() {
    // Each answer overflows the socket: the thread hands the connection
    // back with the rest of its answer and the bytes it had read, the
    // accept loop sends it, then goes on with those bytes, a partial
    // request, whose rest waits decrypted in the session, where the
    // poller cannot see it. 80 requests are 28 KiB: the last TLS record
    // holds more than the accept loop reads for one head, so some of it
    // is left in the session with nothing more on the socket (without
    // the loop looking there, this stalls).
    let pki = Pki::new("tls-pipelined");
    let (cert, key) = pki.issue("localhost");
    let body = "b".repeat(100 * 1024);
    let srv = support::start(
        Server::builder()
            .tls(Certificates::from_pem_files(cert, key).unwrap())
            .get("/big", move |_| ssed::Response::text(200, body.clone())),
    );
    let mut c = TlsClient::connect(srv.local_addr(), &pki.client()).unwrap();
    let req = format!(
        "GET /big HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(300)
    );
    c.send(&req.repeat(80));
    thread::sleep(Duration::from_millis(200));
    // Counts the answers' status lines as the 6 MB stream by, keeping only
    // a tail that may hold the start of the next one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut answers, mut tail) = (0, String::new());
    let mut chunk = [0u8; 64 * 1024];
    while answers < 80 && Instant::now() < deadline {
        let n = c.tls.read(&mut chunk).expect("the answers keep coming");
        assert!(n > 0, "closed after {answers} answers");
        tail.push_str(&String::from_utf8_lossy(&chunk[..n]));
        answers += tail.matches("HTTP/1.1 200").count();
        let keep = tail.len().saturating_sub(11);
        tail = tail.split_off(
            tail.rfind("HTTP/1.1 200")
                .map_or(keep, |i| (i + 12).max(keep)),
        );
    }
    assert_eq!(answers, 80);
}

#[test]
fn a_tls_hello_to_a_plain_port_is_refused_and_the_server_keeps_serving() {
    let pki = Pki::new("tls-hello-plain");
    let srv = support::start(Server::builder().get("/ping", |_| ssed::Response::text(200, "pong")));
    let (_, hello) = client_hello(&pki);
    let mut c = TcpStream::connect(srv.local_addr()).unwrap();
    c.write_all(&hello).unwrap();
    let got = read_to_close(&c, Instant::now() + Duration::from_secs(5)).expect("closed");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 400"));
    let (head, body) = support::request(
        srv.local_addr(),
        "GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((head.status, body.as_str()), (200, "pong\n"));
}

#[test]
fn plain_http_to_the_tls_port_is_told_to_use_https() {
    let pki = Pki::new("tls-plain");
    let srv = server(&pki, &Hub::new(1), |b| b);
    let mut c = TcpStream::connect(srv.local_addr()).unwrap();
    c.write_all(b"GET /scheme HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_to_close(&c, Instant::now() + Duration::from_secs(5)).expect("closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.0 400"), "{text}");
    assert!(text.contains("https://"), "{text}");
    assert!(pong(srv.local_addr(), &pki).contains("\r\n\r\nhttps"));
}

/// A real ClientHello, as a client's first flight.
fn client_hello(pki: &Pki) -> (ClientConnection, Vec<u8>) {
    let mut conn = ClientConnection::new(pki.client(), localhost()).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    (conn, hello)
}

#[test]
fn garbage_and_truncated_handshakes_are_closed_and_the_server_keeps_serving() {
    let pki = Pki::new("tls-garbage");
    let srv = server(&pki, &Hub::new(1), |b| {
        b.request_timeout(Duration::from_millis(800))
    });
    let addr = srv.local_addr();
    let (_, hello) = client_hello(&pki);
    // Garbage (a record too short for a hello, zeros, a record header
    // announcing more than a record may hold): refused as soon as it is
    // read, long before the deadline.
    let garbage: [&[u8]; 3] = [
        &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
        &[0x00; 64],
        &[0x16, 0x03, 0x03, 0xff, 0xff, 0xde, 0xad],
    ];
    for g in garbage {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(g).unwrap();
        let t = Instant::now();
        let _ = read_to_close(&c, Instant::now() + Duration::from_secs(3)).expect("closed");
        assert!(t.elapsed() < Duration::from_millis(600), "{g:?}: at once");
    }
    // Truncated: half a hello, then silence, cut at the deadline.
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(&hello[..hello.len() / 2]).unwrap();
    thread::sleep(Duration::from_millis(300));
    assert!(still_open(&half), "open before the deadline");
    let closed = read_to_close(&half, Instant::now() + Duration::from_secs(3));
    assert!(
        closed.is_some_and(|b| b.is_empty()),
        "cut, without an answer"
    );
    // Truncated and gone: nothing is left waiting.
    let mut gone = TcpStream::connect(addr).unwrap();
    gone.write_all(&hello[..10]).unwrap();
    drop(gone);
    assert!(wait_until(Duration::from_secs(3), || srv
        .stats()
        .snapshot()
        .pending
        == 0));
    assert!(pong(addr, &pki).contains("\r\n\r\nhttps"));
    assert!(srv.stats().snapshot().bad_requests >= 2);
}

#[test]
fn a_handshake_trickled_byte_by_byte_completes_within_the_deadline_and_not_past_it() {
    let pki = Pki::new("tls-trickle");
    let srv = server(&pki, &Hub::new(1), |b| {
        b.request_timeout(Duration::from_millis(1500))
    });
    let addr = srv.local_addr();
    // In time: one byte every 2 ms, then the rest of the handshake.
    let (conn, hello) = client_hello(&pki);
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for b in &hello {
        tcp.write_all(&[*b]).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    let mut c = TlsClient::over(tcp, conn).expect("the handshake completes");
    c.send("GET /scheme HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert!(c.closed_within(Duration::from_secs(5)));
    assert!(c.text.contains("\r\n\r\nhttps"), "{}", c.text);
    // Too slow: cut at the deadline, mid-hello.
    let (_, hello) = client_hello(&pki);
    let mut tcp = TcpStream::connect(addr).unwrap();
    let start = Instant::now();
    let mut cut = false;
    for b in &hello {
        if tcp.write_all(&[*b]).is_err() || !still_open(&tcp) {
            cut = true;
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(cut, "the slow hello was cut");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(3),
        "cut at the deadline: {took:?}"
    );
}

#[test]
fn two_thousand_idle_handshakes_take_no_thread_and_are_cut_at_the_deadline() {
    let _one_at_a_time = serial();
    let pki = Pki::new("tls-idle");
    let srv = server(&pki, &Hub::new(1), |b| {
        b.request_timeout(Duration::from_secs(2)).max_pending(4096)
    });
    let addr = srv.local_addr();
    let (_, hello) = client_hello(&pki);
    let before = thread_count();
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(2000);
    let mut peak = before;
    for i in 0..2000 {
        let mut c = TcpStream::connect(addr).expect("connect an idle client");
        if i % 2 == 1 {
            c.write_all(&hello[..hello.len() / 3])
                .expect("a third of a hello");
        }
        idle.push(c);
        if i % 100 == 0 {
            peak = peak.max(thread_count());
        }
    }
    // Served meanwhile.
    assert!(pong(addr, &pki).contains("\r\n\r\nhttps"));
    peak = peak.max(thread_count());
    assert!(
        peak <= before + 5,
        "threads: {before} before, {peak} at the peak"
    );
    assert!(
        opened.elapsed() < Duration::from_secs(2),
        "opened within the deadline"
    );
    assert!(srv.stats().snapshot().pending >= 1900);
    // The deadline cuts every one.
    assert!(wait_until(Duration::from_secs(5), || srv
        .stats()
        .snapshot()
        .pending
        == 0));
    let still = idle.iter().filter(|c| still_open(c)).count();
    assert_eq!(still, 0, "all cut");
    assert!(pong(addr, &pki).contains("\r\n\r\nhttps"));
}

#[test]
fn a_reloaded_certificate_goes_to_new_connections_and_open_streams_keep_flowing() {
    let pki = Pki::new("tls-reload-lib");
    let (one, one_key) = pki.issue("one");
    let (two, two_key) = pki.issue("two");
    let dir = pki.dir.path();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::copy(&one, &cert).unwrap();
    std::fs::copy(&one_key, &key).unwrap();
    let certs = Certificates::from_pem_files(&cert, &key).unwrap();
    let hub = Hub::new(10);
    let h = hub.clone();
    let srv = support::start(Server::builder().tls(certs.clone()).route(
        "/t/{topic}",
        move |req, stream| {
            let sub = h
                .subscribe(&[req.param("topic").unwrap_or_default()], None)
                .map_err(StreamError::other)?;
            stream.follow(sub)
        },
    ));
    // A configuration per connection: a resumed session would show the
    // certificate of the session it resumes.
    let mut old = TlsClient::connect(srv.local_addr(), &pki.client()).unwrap();
    assert_eq!(old.peer_cert(), support::tls::cert_der(&one));
    old.send("GET /t/r HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n");
    assert!(wait_until(Duration::from_secs(5), || hub.subscribers("r") == 1));
    assert!(!certs.reload_if_changed().unwrap(), "nothing changed yet");
    std::fs::copy(&two, &cert).unwrap();
    std::fs::copy(&two_key, &key).unwrap();
    assert!(certs.reload_if_changed().unwrap());
    let new = TlsClient::connect(srv.local_addr(), &pki.client()).unwrap();
    assert_eq!(new.peer_cert(), support::tls::cert_der(&two));
    hub.publish("r", Event::new().data("still here")).unwrap();
    assert!(
        old.read_until("data: still here", Duration::from_secs(5)),
        "{}",
        old.text
    );
    // A bad file: refused, the certificate in force stays.
    std::fs::write(&key, "not a key").unwrap();
    assert!(certs.reload().is_err());
    let after = TlsClient::connect(srv.local_addr(), &pki.client()).unwrap();
    assert_eq!(after.peer_cert(), support::tls::cert_der(&two));
}

#[test]
fn bad_files_are_refused_naming_the_file() {
    let pki = Pki::new("tls-bad-lib");
    let (a, a_key) = pki.issue("a");
    let (_, b_key) = pki.issue("b");
    let missing = pki.dir.path().join("missing.pem");
    let e = Certificates::from_pem_files(&missing, &a_key).unwrap_err();
    assert_eq!(e.which(), ssed::tls::Which::Cert);
    assert!(e.to_string().contains("missing.pem"), "{e}");
    let e = Certificates::from_pem_files(&a, &b_key).unwrap_err();
    assert_eq!(e.which(), ssed::tls::Which::Key);
    assert!(e.to_string().contains("is not the key"), "{e}");
    let e = Certificates::from_pem_files(&a_key, &a_key).unwrap_err();
    assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    let e = Certificates::from_pem_files(&a, &a).unwrap_err();
    assert!(e.to_string().contains("no PRIVATE KEY"), "{e}");
}

/// The `ssed` binary with `[tls]`.
#[cfg(feature = "daemon")]
mod daemon {
    use super::*;
    use support::TempDir;
    use support::process::{Ssed, assert_config_refused, spawn_config};

    fn tls_toml(cert: &std::path::Path, key: &std::path::Path, extra: &str) -> String {
        format!(
            "listen = \"127.0.0.1:0\"\nheartbeat = \"0\"\n{extra}\n[tls]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        )
    }

    #[test]
    fn bad_tls_keys_stop_the_start_naming_key_and_file() {
        let pki = Pki::new("tls-bad-config");
        let (a, a_key) = pki.issue("a");
        let (_, b_key) = pki.issue("b");
        let missing = pki.dir.path().join("nope.pem");
        assert_config_refused(&tls_toml(&missing, &a_key, ""), "tls.cert", "nope.pem");
        assert_config_refused(&tls_toml(&a, &b_key, ""), "tls.key", "is not the key");
        assert_config_refused(
            &format!("[tls]\nkey = {:?}\n", a_key.display().to_string()),
            "tls.cert",
            "missing",
        );
        assert_config_refused("[tls]\ncertificate = \"x\"\n", "tls.certificate", "unknown");
    }

    #[test]
    fn curl_receives_events_over_https_and_the_ticket_cookie_is_secure() {
        let pki = Pki::new("tls-curl");
        let (cert, key) = pki.issue("localhost");
        let dir = TempDir::new("tls-curl-config");
        let toml = tls_toml(
            &cert,
            &key,
            "[auth]\nsubscribe_token = \"s\"\npublish_token = \"p\"",
        );
        let (_ssed, addr) = spawn_config(&dir, &toml);
        let url = format!("https://localhost:{}/events/t?token=s", addr.port());
        let mut curl = std::process::Command::new("curl")
            .args(["-sSN", "--max-time", "4", "--cacert"])
            .arg(pki.ca())
            .args([
                "--resolve",
                &format!("localhost:{}:127.0.0.1", addr.port()),
                &url,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("curl (apt-get install curl)");
        let client = pki.client();
        let streams = || {
            let health = https(addr, &client, "GET", "/healthz", &[], "");
            health.contains("\"streams_open\":1")
        };
        assert!(
            wait_until(Duration::from_secs(5), streams),
            "curl's stream opened"
        );
        let published = https(
            addr,
            &client,
            "POST",
            "/publish/t",
            &["Authorization: Bearer p"],
            "over tls",
        );
        assert!(published.starts_with("HTTP/1.1 200"), "{published}");
        let mut out = String::new();
        curl.stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let _ = curl.wait();
        assert!(out.contains("data: over tls"), "curl got: {out:?}");

        let ticket = https(
            addr,
            &client,
            "POST",
            "/tickets",
            &["Authorization: Bearer s"],
            "",
        );
        let body = ticket.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        let t = v["ticket"].as_str().expect("a ticket");
        let mut c = TlsClient::connect(addr, &client).unwrap();
        c.send(&format!(
            "GET /events/x?ticket={t} HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
        ));
        assert!(c.read_until("\r\n\r\n", Duration::from_secs(5)));
        let cookie = c
            .text
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
            .unwrap_or_else(|| panic!("a cookie: {}", c.text));
        assert!(cookie.split(';').any(|a| a.trim() == "Secure"), "{cookie}");
    }

    fn sighup(ssed: &Ssed) {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(ssed.pid() as i32).unwrap(),
            rustix::process::Signal::HUP,
        )
        .unwrap();
    }

    fn count_logged(ssed: &Ssed, needle: &str) -> usize {
        ssed.stderr().lines().filter(|l| l.contains(needle)).count()
    }

    #[test]
    fn sighup_and_changed_files_reload_the_certificate_without_dropping_streams() {
        let pki = Pki::new("tls-reload");
        let (one, one_key) = pki.issue("one");
        let (two, two_key) = pki.issue("two");
        let dir = TempDir::new("tls-reload-config");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::copy(&one, &cert).unwrap();
        std::fs::copy(&one_key, &key).unwrap();
        let (ssed, addr) = spawn_config(&dir, &tls_toml(&cert, &key, ""));
        // A configuration per connection: a resumed session would show
        // the certificate of the session it resumes.
        let client = pki.client();
        let mut old = TlsClient::connect(addr, &pki.client()).unwrap();
        assert_eq!(old.peer_cert(), support::tls::cert_der(&one));
        old.send("GET /events/r HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n");
        assert!(
            old.read_until("retry:", Duration::from_secs(5)),
            "{}",
            old.text
        );

        // Swapped files and SIGHUP.
        std::fs::copy(&two, &cert).unwrap();
        std::fs::copy(&two_key, &key).unwrap();
        sighup(&ssed);
        assert!(wait_until(Duration::from_secs(5), || ssed
            .logged("TLS certificate reloaded")));
        let new = TlsClient::connect(addr, &pki.client()).unwrap();
        assert_eq!(new.peer_cert(), support::tls::cert_der(&two));
        let p = https(addr, &client, "POST", "/publish/r", &[], "flowing");
        assert!(p.starts_with("HTTP/1.1 200"), "{p}");
        assert!(
            old.read_until("data: flowing", Duration::from_secs(5)),
            "{}",
            old.text
        );

        // A bad file: logged, the certificate in force keeps serving.
        std::fs::write(&cert, "garbage").unwrap();
        sighup(&ssed);
        assert!(wait_until(Duration::from_secs(5), || ssed.logged("not reloaded")));
        let after = TlsClient::connect(addr, &pki.client()).unwrap();
        assert_eq!(after.peer_cert(), support::tls::cert_der(&two));

        // Changed files without a signal: picked up by the watch.
        let reloads = count_logged(&ssed, "TLS certificate reloaded");
        std::fs::copy(&one, &cert).unwrap();
        std::fs::copy(&one_key, &key).unwrap();
        assert!(wait_until(Duration::from_secs(8), || count_logged(
            &ssed,
            "TLS certificate reloaded"
        ) > reloads));
        let back = TlsClient::connect(addr, &pki.client()).unwrap();
        assert_eq!(back.peer_cert(), support::tls::cert_der(&one));
        assert!(
            !old.closed_within(Duration::from_millis(100)),
            "the old stream is open"
        );
        let p = https(addr, &client, "POST", "/publish/r", &[], "still flowing");
        assert!(p.starts_with("HTTP/1.1 200"), "{p}");
        assert!(old.read_until("data: still flowing", Duration::from_secs(5)));
    }
}
