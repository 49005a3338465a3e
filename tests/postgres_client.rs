#![cfg(feature = "postgres")]
//! ssed's own PostgreSQL client, under the listener, over real sockets:
//!
//! - against [`FakePg`], a scripted server that checks the client's side of
//!   each password method with code of its own (SCRAM proofs with ring,
//!   MD5 answers that PostgreSQL's `md5()` and Python's hashlib gave), and
//!   plays the broken or hostile server too (oversized messages, a forged
//!   SCRAM signature, silence, methods this client does not do);
//! - against the machine's PostgreSQL (127.0.0.1:5432 and the Unix socket
//!   in /var/run/postgresql, trust auth): both forms of connection string,
//!   the default user, `pg_terminate_backend`, and SCRAM and MD5 checked
//!   against the verifiers PostgreSQL itself stored for a role (pg_hba.conf
//!   trusts every local connection, so the fake server asks for the
//!   password with the real verifier and then forwards to the server).
//!
//! The fake-server tests need no database. The others print why and pass
//! without one, except under `CI=true`, where they fail.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ssed::postgres::Listener;
use ssed::{Hub, ShutdownHandle};
use support::pg::{After, Auth, FakePg, database, error_response, scram_keys};
use support::{encode, field, wait_until};

/// The longest any test waits for one thing to happen.
const DEADLINE: Duration = Duration::from_secs(5);
/// The machine's PostgreSQL socket.
const SOCKET_DIR: &str = "/var/run/postgresql";

/// A name no other test (or earlier run) uses.
fn unique(what: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "ssed_c_{what}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A listener from `url` forwarding `channel` to topic `t`, its hub and a
/// subscription to `t`.
fn start(url: &str, channel: &str) -> (Listener, ssed::Subscription) {
    let hub = Hub::new(100);
    let sub = hub.subscribe(&["t"], None).expect("subscribe");
    let listener = Listener::start(
        hub,
        url,
        vec![(channel.to_owned(), "t".to_owned())],
        ShutdownHandle::new(),
    );
    (listener, sub)
}

fn connects(listener: &Listener) -> bool {
    wait_until(DEADLINE, || listener.state().connected)
}

/// The error the listener reports once it has one.
fn first_error(listener: &Listener) -> String {
    assert!(
        wait_until(DEADLINE, || listener.state().last_error.is_some()),
        "no error: {:?}",
        listener.state()
    );
    listener.state().last_error.unwrap_or_default()
}

/// The error a listener on `url` (channel `c`) stops at first; the
/// listener stopped.
fn error_of(url: &str) -> String {
    let (listener, _sub) = start(url, "c");
    let error = first_error(&listener);
    listener.stop();
    error
}

/// The data of the next event of `sub`, lines joined with `\n`.
fn next_data(sub: &ssed::Subscription) -> String {
    let frame = sub.next_timeout(DEADLINE).expect("an event");
    let text = String::from_utf8_lossy(frame.as_bytes()).into_owned();
    field(&text, "data").join("\n")
}

fn scram(password: &str, forge: bool) -> Auth {
    let salt = b"0123456789abcdef".to_vec();
    let (stored_key, server_key) = scram_keys(password.as_bytes(), &salt, 4096);
    Auth::Scram {
        salt,
        iterations: 4096,
        stored_key,
        server_key,
        forge,
    }
}

// ---------------------------------------------------------------------------
// Against the scripted server
// ---------------------------------------------------------------------------

#[test]
fn scram_sha_256_is_checked_both_ways() {
    let password = "correct horse: battery/staple @ 100% ✓";
    let fake = FakePg::start(scram(password, false), After::Script);
    let url = format!(
        "postgresql://app:{}@127.0.0.1:{}/appdb",
        encode(password),
        fake.addr.port()
    );
    let (listener, sub) = start(&url, "News \"Feed\"");
    assert!(
        connects(&listener),
        "{:?}, refused: {:?}",
        listener.state(),
        fake.refusals()
    );
    assert!(fake.refusals().is_empty());
    let startup = fake.startup(0);
    assert_eq!(startup["user"], "app");
    assert_eq!(startup["database"], "appdb");
    assert_eq!(startup["application_name"], "ssed", "the default");
    assert_eq!(startup["client_encoding"], "UTF8");
    assert_eq!(fake.queries(), [r#"LISTEN "News ""Feed""";"#]);
    assert_eq!(
        listener.target(),
        format!("postgres://app@127.0.0.1:{}/appdb", fake.addr.port())
    );

    fake.notify("News \"Feed\"", "hello\nwörld");
    assert_eq!(next_data(&sub), "hello\nwörld");
    fake.notify("another channel", "not forwarded");
    fake.notify("News \"Feed\"", "");
    fake.notify("News \"Feed\"", "third");
    assert_eq!(next_data(&sub), "", "an empty payload is an event");
    assert_eq!(next_data(&sub), "third");
    // Counted just after the publish the subscriber may already have seen.
    assert!(wait_until(DEADLINE, || listener.state().notifications == 3));
    listener.stop();
}

#[test]
fn a_wrong_password_reports_the_server_s_message_and_retries() {
    let fake = FakePg::start(scram("right", false), After::Script);
    let url = format!("postgres://app:wr0ngpass@127.0.0.1:{}/db", fake.addr.port());
    let (listener, _sub) = start(&url, "c");
    let error = first_error(&listener);
    assert!(
        error.contains("cannot connect: FATAL: password authentication failed for user \"app\"")
            && error.contains("28P01"),
        "{error}"
    );
    assert!(!error.contains("wr0ngpass"), "{error}");
    assert_eq!(fake.refusals()[0], "wrong SCRAM proof");
    assert!(
        wait_until(DEADLINE, || fake.connections() >= 3),
        "retried with backoff"
    );
    assert!(!listener.state().connected);
    listener.stop();
}

#[test]
fn a_server_that_does_not_know_the_password_is_refused() {
    // The proof is right; the server's signature is not.
    let fake = FakePg::start(scram("pw", true), After::Script);
    let url = format!("postgres://app:pw@127.0.0.1:{}/db", fake.addr.port());
    let error = error_of(&url);
    assert!(error.contains("SCRAM signature is wrong"), "{error}");
    assert!(fake.refusals().is_empty(), "{:?}", fake.refusals());
    assert!(fake.queries().is_empty(), "no LISTEN sent to it");
}

#[test]
fn md5_in_key_value_form() {
    // SELECT 'md5' || md5(md5('secret' || 'alice') || 'salt'), which
    // Python's hashlib agrees with.
    let answer = "md5986e2194384c07f4fd1df4b1351b3e68".to_owned();
    let fake = FakePg::start(
        Auth::Md5 {
            salt: *b"salt",
            answer,
        },
        After::Script,
    );
    let port = fake.addr.port();
    let (listener, sub) = start(
        &format!(
            "host=127.0.0.1 port={port} user=alice password=secret dbname=test \
             application_name='kv test' connect_timeout=3"
        ),
        "c",
    );
    assert!(connects(&listener), "{:?}", fake.refusals());
    assert_eq!(fake.startup(0)["application_name"], "kv test");
    assert_eq!(
        listener.target(),
        format!("postgres://alice@127.0.0.1:{port}/test")
    );
    fake.notify("c", "via md5");
    assert_eq!(next_data(&sub), "via md5");
    listener.stop();

    let error = error_of(&format!(
        "host=127.0.0.1 port={port} user=alice password=Secret"
    ));
    assert!(error.contains("password authentication failed"), "{error}");
}

#[test]
fn a_percent_encoded_password_arrives_exactly() {
    let password = "p@ss:w/o rd%é?&=#";
    let fake = FakePg::start(Auth::Cleartext(password.as_bytes().to_vec()), After::Script);
    let port = fake.addr.port();
    let url = format!("postgres://u:{}@127.0.0.1:{port}/db", encode(password));
    let (listener, _sub) = start(&url, "c");
    assert!(connects(&listener), "{:?}", fake.refusals());
    listener.stop();

    // Asked for a password the string does not have.
    let error = error_of(&format!("postgres://u@127.0.0.1:{port}/db"));
    assert!(error.contains("the connection string has none"), "{error}");
}

#[test]
fn without_a_user_the_os_user_logs_in() {
    let fake = FakePg::start(Auth::Trust, After::Script);
    let (listener, _sub) = start(&format!("postgres://127.0.0.1:{}", fake.addr.port()), "c");
    assert!(connects(&listener));
    let whoami = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("id -un");
    let whoami = String::from_utf8_lossy(&whoami.stdout).trim().to_owned();
    assert_eq!(fake.startup(0)["user"], whoami);
    assert!(
        !fake.startup(0).contains_key("database"),
        "the server's default"
    );
    listener.stop();
}

#[test]
fn oversized_or_malformed_messages_end_the_connection_not_the_memory() {
    // A 2 GiB message announced during the handshake, none of it sent:
    // refused from its header (waiting for it would time out instead).
    let mut huge = vec![b'K'];
    huge.extend_from_slice(&0x7fff_fff0i32.to_be_bytes());
    let fake = FakePg::start(Auth::Trust, After::Raw(huge));
    let error = error_of(&format!("postgres://u@127.0.0.1:{}", fake.addr.port()));
    assert!(
        error.contains("message 'K' of 2147483628 bytes, more than the 1048576"),
        "{error}"
    );

    // A length shorter than itself.
    let fake = FakePg::start(Auth::Trust, After::Raw(b"Z\0\0\0\x02".to_vec()));
    let error = error_of(&format!("postgres://u@127.0.0.1:{}", fake.addr.port()));
    assert!(
        error.contains("message 'Z' gives its length as 2"),
        "{error}"
    );

    // A 1 GiB notification while listening: the connection is dropped and
    // made again.
    let fake = FakePg::start(Auth::Trust, After::Script);
    let (listener, sub) = start(&format!("postgres://u@127.0.0.1:{}", fake.addr.port()), "c");
    assert!(connects(&listener));
    let mut huge = vec![b'A'];
    huge.extend_from_slice(&0x4000_0000i32.to_be_bytes());
    fake.send_raw(&huge);
    assert!(
        wait_until(DEADLINE, || listener.state().reconnects == 1
            && listener.state().connected),
        "{:?}",
        listener.state()
    );
    let error = listener.state().last_error.unwrap_or_default();
    assert!(error.contains("more than the 1048576"), "{error}");
    fake.notify("c", "after");
    assert_eq!(next_data(&sub), "after");
    listener.stop();
}

#[test]
fn methods_this_client_does_not_do_are_named() {
    let fake = FakePg::start(Auth::Request(7), After::Script);
    let error = error_of(&format!("postgres://u@127.0.0.1:{}", fake.addr.port()));
    assert!(error.contains("asks for GSSAPI (request 7)"), "{error}");

    // A server error during the handshake (no such database, say).
    let refusal = error_response("FATAL", "3D000", "database \"nope\" does not exist");
    let fake = FakePg::start(Auth::Trust, After::Raw(refusal));
    let error = error_of(&format!("postgres://u@127.0.0.1:{}", fake.addr.port()));
    assert!(
        error.contains("FATAL: database \"nope\" does not exist (SQLSTATE 3D000)"),
        "{error}"
    );
}

#[test]
fn stop_interrupts_a_handshake_the_server_never_answers() {
    let fake = FakePg::start(Auth::Silent, After::Script);
    let (listener, _sub) = start(&format!("postgres://u@127.0.0.1:{}", fake.addr.port()), "c");
    assert!(wait_until(DEADLINE, || fake.connections() == 1));
    let started = Instant::now();
    listener.stop();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "stopped in {:?}",
        started.elapsed()
    );
}

#[test]
fn several_hosts_are_tried_in_turn() {
    let fake = FakePg::start(Auth::Trust, After::Script);
    let port = fake.addr.port();
    // Port 1 refuses; the second host answers.
    let url = format!("postgres://u@127.0.0.1:1,127.0.0.1:{port}/db");
    let (listener, _sub) = start(&url, "c");
    assert!(connects(&listener), "{:?}", listener.state());
    assert_eq!(listener.target(), url);
    listener.stop();

    let (listener, _sub) = start(
        &format!("host=127.0.0.1,localhost port=1,{port} user=u"),
        "c",
    );
    assert!(connects(&listener), "{:?}", listener.state());
    listener.stop();

    // With every host down, the error names the last address tried.
    let error = error_of("postgres://u:s3cret@127.0.0.1:1,127.0.0.1:2/db");
    assert!(
        error.starts_with("cannot connect: 127.0.0.1:2: "),
        "{error}"
    );
    assert_eq!(error.matches("refused").count(), 1, "said once: {error}");
    assert!(!error.contains("s3cret"), "{error}");
}

#[test]
fn ipv6_in_brackets_and_host_names() {
    let fake = FakePg::start(Auth::Trust, After::Script);
    // `localhost` may resolve to ::1 first, where nothing listens: the
    // next address is tried.
    let (listener, _sub) = start(
        &format!("postgres://u@localhost:{}/db", fake.addr.port()),
        "c",
    );
    assert!(connects(&listener), "{:?}", listener.state());
    listener.stop();

    let Some(fake6) = FakePg::start_on("[::1]:0", Auth::Trust, After::Script) else {
        eprintln!("skipping the IPv6 part: cannot bind [::1]:0 here");
        return;
    };
    let url = format!("postgres://u@[::1]:{}/db", fake6.addr.port());
    let (listener, _sub) = start(&url, "c");
    assert!(connects(&listener), "{:?}", listener.state());
    assert_eq!(listener.target(), url);
    listener.stop();
}

#[test]
fn a_terminated_connection_is_made_again_and_listens_again() {
    let fake = FakePg::start(Auth::Trust, After::Script);
    let (listener, sub) = start(&format!("postgres://u@127.0.0.1:{}", fake.addr.port()), "c");
    assert!(connects(&listener));
    fake.terminate_all();
    assert!(
        wait_until(DEADLINE, || {
            let s = listener.state();
            s.connected && s.reconnects == 1
        }),
        "{:?}",
        listener.state()
    );
    let error = listener.state().last_error.unwrap_or_default();
    assert!(
        error.contains(
            "FATAL: terminating connection due to administrator command (SQLSTATE 57P01)"
        ),
        "{error}"
    );
    assert_eq!(fake.queries(), [r#"LISTEN "c";"#, r#"LISTEN "c";"#]);
    fake.notify("c", "again");
    assert_eq!(next_data(&sub), "again");
    listener.stop();
}

#[test]
fn target_session_attrs_asks_the_server() {
    let fake = FakePg::start(Auth::Trust, After::Script);
    let port = fake.addr.port();
    let (listener, _sub) = start(
        &format!("postgres://u@127.0.0.1:{port}/db?target_session_attrs=read-write"),
        "c",
    );
    assert!(connects(&listener), "{:?}", listener.state());
    assert_eq!(fake.queries()[0], "SHOW transaction_read_only");
    listener.stop();

    // The fake takes writes.
    let error = error_of(&format!(
        "postgres://u@127.0.0.1:{port}/db?target_session_attrs=read-only"
    ));
    assert!(error.contains("the server takes writes"), "{error}");
}

#[test]
fn strings_that_cannot_work_leave_an_idle_listener_that_says_why() {
    let table = [
        (
            "postgres://u:s3cret@h/db?sslmode=require",
            "sslmode=require needs TLS",
        ),
        ("postgres://u:s3cret@/db", "no host"),
        (
            "host=h password=s3cret port=x",
            "invalid value for option `port`",
        ),
        (
            "postgres://u:s3cret@h/db?unknown=1",
            "unknown option `unknown`",
        ),
        ("host=h password='s3cret", "unterminated quoted value"),
    ];
    for (url, want) in table {
        let (listener, _sub) = start(url, "c");
        let state = listener.state();
        assert!(!state.connected);
        let error = state.last_error.unwrap_or_default();
        assert!(
            error.starts_with("invalid connection string: "),
            "{url}: {error}"
        );
        assert!(error.contains(want), "{url}: {error}");
        assert!(!error.contains("s3cret"), "{url}: {error}");
        assert_eq!(listener.target(), "<invalid connection string>");
        listener.stop();
    }
}

// ---------------------------------------------------------------------------
// Against the machine's PostgreSQL
// ---------------------------------------------------------------------------

/// `SELECT pg_notify(channel, payload)`.
fn notify(db: &mut postgres::Client, channel: &str, payload: &str) {
    db.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .expect("pg_notify");
}

/// The sessions of `application_name`: user name and whether over TCP.
fn sessions(db: &mut postgres::Client, application_name: &str) -> Vec<(String, bool)> {
    db.query(
        "SELECT usename::text, client_addr IS NOT NULL FROM pg_stat_activity \
         WHERE application_name = $1",
        &[&application_name],
    )
    .expect("pg_stat_activity")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn terminate(db: &mut postgres::Client, application_name: &str) -> i64 {
    db.query_one(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1",
        &[&application_name],
    )
    .expect("pg_terminate_backend")
    .get(0)
}

#[test]
fn a_unix_socket_in_either_form_and_after_pg_terminate_backend() {
    let test = "a_unix_socket_in_either_form_and_after_pg_terminate_backend";
    let Some(mut db) = database(test) else {
        return;
    };
    if !Path::new(SOCKET_DIR).join(".s.PGSQL.5432").exists() {
        let reason = format!("no PostgreSQL socket in {SOCKET_DIR}");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: {reason} (CI=true: the PostgreSQL tests must run)");
        }
        eprintln!("skipping {test}: {reason}");
        return;
    }
    let channel = unique("unix");
    let url =
        format!("postgres://postgres@%2Fvar%2Frun%2Fpostgresql/test?application_name={channel}");
    let (listener, sub) = start(&url, &channel);
    assert!(connects(&listener), "{:?}", listener.state());
    assert_eq!(
        listener.target(),
        "postgres://postgres@/var/run/postgresql:5432/test"
    );
    assert_eq!(
        sessions(&mut db, &channel),
        [("postgres".to_owned(), false)]
    );
    notify(&mut db, &channel, "over the socket");
    assert_eq!(next_data(&sub), "over the socket");

    assert_eq!(terminate(&mut db, &channel), 1);
    assert!(
        wait_until(DEADLINE, || {
            let s = listener.state();
            s.connected && s.reconnects == 1
        }),
        "{:?}",
        listener.state()
    );
    let error = listener.state().last_error.unwrap_or_default();
    assert!(
        error.contains("terminating connection") && error.contains("57P01"),
        "{error}"
    );
    notify(&mut db, &channel, "listening again");
    assert_eq!(next_data(&sub), "listening again");
    listener.stop();

    let app = unique("unix_kv");
    let (listener, sub) = start(
        &format!("host={SOCKET_DIR} user=postgres dbname=test application_name={app}"),
        &app,
    );
    assert!(connects(&listener), "{:?}", listener.state());
    assert_eq!(sessions(&mut db, &app), [("postgres".to_owned(), false)]);
    notify(&mut db, &app, "key=value");
    assert_eq!(next_data(&sub), "key=value");
    listener.stop();
}

#[test]
fn key_value_over_tcp_and_the_default_user() {
    let Some(mut db) = database("key_value_over_tcp_and_the_default_user") else {
        return;
    };
    let app = unique("kv");
    let (listener, sub) = start(
        &format!(
            "host=127.0.0.1 port=5432 user=postgres dbname=test application_name={app} \
             sslmode=prefer keepalives_idle=60 tcp_user_timeout=5"
        ),
        &app,
    );
    assert!(connects(&listener), "{:?}", listener.state());
    assert_eq!(sessions(&mut db, &app), [("postgres".to_owned(), true)]);
    notify(&mut db, &app, "tcp");
    assert_eq!(next_data(&sub), "tcp");
    listener.stop();

    // No user: the process's own (`root` on the test machines, a role the
    // server has).
    let app = unique("os_user");
    let whoami = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("id -un");
    let whoami = String::from_utf8_lossy(&whoami.stdout).trim().to_owned();
    let (listener, _sub) = start(
        &format!("postgresql://127.0.0.1/test?application_name={app}"),
        &app,
    );
    if connects(&listener) {
        assert_eq!(sessions(&mut db, &app), [(whoami, true)]);
    } else {
        // Without such a role, the server says so.
        let error = listener.state().last_error.unwrap_or_default();
        assert!(
            error.contains(&format!("role \"{whoami}\" does not exist")),
            "{error}"
        );
    }
    listener.stop();
}

/// Drops a role created by a test, even when it fails.
struct Role(String);

impl Drop for Role {
    fn drop(&mut self) {
        if let Some(mut db) = database("dropping a test role") {
            let _ = db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                &[&self.0],
            );
            let _ = db.batch_execute(&format!("DROP ROLE IF EXISTS {}", self.0));
        }
    }
}

/// A role with `password`, stored the way `encryption` says; its verifier
/// as PostgreSQL keeps it.
fn role(db: &mut postgres::Client, encryption: &str, password: &str) -> (Role, String) {
    let name = unique(encryption.split('-').next().unwrap_or("role"));
    assert!(!password.contains('\''));
    db.batch_execute(&format!(
        "SET password_encryption = '{encryption}'; \
         CREATE ROLE {name} LOGIN PASSWORD '{password}'; \
         RESET password_encryption"
    ))
    .expect("create the role");
    let verifier: String = db
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&name],
        )
        .expect("the role's verifier")
        .get(0);
    (Role(name), verifier)
}

#[test]
fn scram_against_the_verifier_postgresql_stored() {
    let Some(mut db) = database("scram_against_the_verifier_postgresql_stored") else {
        return;
    };
    // Not ASCII: a ✓ (which SASLprep leaves as it is) and spaces.
    let password = "s3cr3t ✓ with spaces & symbols";
    let (role, verifier) = role(&mut db, "scram-sha-256", password);
    // SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>
    let (head, keys) = verifier
        .strip_prefix("SCRAM-SHA-256$")
        .and_then(|v| v.split_once('$'))
        .expect("a SCRAM verifier");
    let (iterations, salt) = head.split_once(':').expect("iterations:salt");
    let (stored, server) = keys.split_once(':').expect("stored:server");
    let key = |b64: &str| -> [u8; 32] {
        STANDARD
            .decode(b64)
            .expect("base64")
            .try_into()
            .expect("32 bytes")
    };
    let fake = FakePg::start(
        Auth::Scram {
            salt: STANDARD.decode(salt).expect("base64 salt"),
            iterations: iterations.parse().expect("iterations"),
            stored_key: key(stored),
            server_key: key(server),
            forge: false,
        },
        After::Proxy("127.0.0.1:5432".parse().expect("address")),
    );
    let url = format!(
        "postgres://{}:{}@127.0.0.1:{}/test?application_name={}",
        role.0,
        encode(password),
        fake.addr.port(),
        role.0
    );
    let (listener, sub) = start(&url, &role.0);
    assert!(
        connects(&listener),
        "{:?}, refused: {:?}",
        listener.state(),
        fake.refusals()
    );
    assert_eq!(sessions(&mut db, &role.0), [(role.0.clone(), true)]);
    notify(&mut db, &role.0, "scram");
    assert_eq!(next_data(&sub), "scram");
    listener.stop();

    let wrong = url.replace(&encode(password), "s3cr3t");
    let (listener, _sub) = start(&wrong, &role.0);
    let error = first_error(&listener);
    assert!(
        error.contains(&format!(
            "password authentication failed for user \"{}\"",
            role.0
        )),
        "{error}"
    );
    listener.stop();
}

#[test]
fn md5_against_the_hash_postgresql_stored() {
    let Some(mut db) = database("md5_against_the_hash_postgresql_stored") else {
        return;
    };
    let (role, verifier) = role(&mut db, "md5", "md5 password");
    let hash = verifier.strip_prefix("md5").expect("an md5 verifier");
    let salt = [0xde, 0xad, 0xbe, 0xef];
    // The answer to expect, from PostgreSQL's own md5().
    let answer: String = db
        .query_one(
            "SELECT 'md5' || md5(convert_to($1, 'UTF8') || $2)",
            &[&hash, &&salt[..]],
        )
        .expect("md5")
        .get(0);
    let fake = FakePg::start(
        Auth::Md5 { salt, answer },
        After::Proxy("127.0.0.1:5432".parse().expect("address")),
    );
    let (listener, sub) = start(
        &format!(
            "host=127.0.0.1 port={} user={} password='md5 password' dbname=test \
             application_name={}",
            fake.addr.port(),
            role.0,
            role.0
        ),
        &role.0,
    );
    assert!(
        connects(&listener),
        "{:?}, refused: {:?}",
        listener.state(),
        fake.refusals()
    );
    notify(&mut db, &role.0, "md5");
    assert_eq!(next_data(&sub), "md5");
    listener.stop();
}
