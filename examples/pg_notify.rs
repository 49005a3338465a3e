//! Rows inserted into a PostgreSQL table, streamed to the browser as they
//! land: a trigger calls `pg_notify('user_updates', row_to_json(NEW)::text)`
//! on every `INSERT`, and a [`Listener`] publishes each notification into a
//! [`Hub`] topic that every `/events` stream follows.
//!
//! One listener thread holds one database connection however many streams
//! are open; the events get hub ids, so a client that reconnects with
//! `Last-Event-ID` gets the rows it missed (of the last 100). If the
//! database goes away, the listener reconnects with backoff and the streams
//! stay open.
//!
//! At start the example creates, if missing, the table `ssed_users` and the
//! trigger `ssed_users_notify` in the database of `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1/test`).
//!
//! Run it:
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/test cargo run --example pg_notify
//! ```
//!
//! Watch it with `curl -N http://127.0.0.1:8080/events`, or open
//! <http://127.0.0.1:8080/> in a browser, then insert a row:
//!
//! ```text
//! psql postgres://postgres@127.0.0.1/test -c "insert into ssed_users (name) values ('Ada')"
//! ```
//!
//! and the stream shows `data: {"id":1,"name":"Ada","created_at":"…"}`
//! (a `NOTIFY` payload holds at most 8000 bytes: send a key and let the
//! client fetch a large row). Set `SSED_LISTEN` to listen elsewhere (port
//! `0` picks a free one; the first line printed says which).

use std::error::Error;
use std::io::Write as _;
use std::time::Duration;

use ssed::postgres::Listener;
use ssed::{Hub, Response};

/// Where the example listens unless `SSED_LISTEN` says otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The database unless `DATABASE_URL` says otherwise.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1/test";
/// The channel the trigger notifies, and the topic streams follow.
const CHANNEL: &str = "user_updates";

/// The table and the trigger, created once. The advisory lock keeps two
/// copies started at once from racing on `CREATE`.
const SETUP: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(727374);
CREATE TABLE IF NOT EXISTS ssed_users (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION ssed_users_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('user_updates', row_to_json(NEW)::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS ssed_users_notify ON ssed_users;
CREATE TRIGGER ssed_users_notify AFTER INSERT ON ssed_users
    FOR EACH ROW EXECUTE FUNCTION ssed_users_notify();
COMMIT;
";

/// The browser side: lists each inserted row.
const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>ssed: pg_notify</title>
<h1>New users</h1>
<p>Insert a row: <code>insert into ssed_users (name) values ('Ada')</code></p>
<ul id="log"></ul>
<script>
  const log = document.getElementById("log");
  const source = new EventSource("/events");
  source.onmessage = (e) => {
    const row = JSON.parse(e.data);
    const li = document.createElement("li");
    li.textContent = `#${row.id} ${row.name} (${row.created_at})`;
    log.append(li);
  };
</script>
"#;

fn main() -> Result<(), Box<dyn Error>> {
    let listen = std::env::var("SSED_LISTEN").unwrap_or_else(|_| DEFAULT_LISTEN.to_owned());
    let database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());

    // The table and trigger need the database once, now; the listener
    // below copes with it coming and going later. This is the app's own
    // database client (the `postgres` crate, a dev-dependency of ssed's
    // examples and tests); the listener has one of its own inside.
    let mut client = postgres::Client::connect(&database_url, postgres::NoTls)
        .map_err(|e| format!("cannot connect to DATABASE_URL: {}", ssed::Report(&e)))?;
    client
        .batch_execute(SETUP)
        .map_err(|e| format!("cannot create the table and trigger: {}", ssed::Report(&e)))?;
    drop(client);

    let hub = Hub::new(100);
    let server = ssed::Server::builder()
        .listen(listen)
        // A comment every 15 s keeps idle streams (and proxies) alive.
        .heartbeat(Duration::from_secs(15))
        .get("/", |_req| Response::html(PAGE))
        .route("/events", {
            let hub = hub.clone();
            move |_req, stream| {
                // Replays what a reconnecting client missed, then follows.
                let sub = match hub.subscribe(&[CHANNEL], stream.last_event_id()) {
                    Ok(sub) => sub,
                    Err(e) => return stream.respond(Response::text(500, e.to_string())),
                };
                stream.open()?; // the head now, not at the first row
                stream.follow(sub)
            }
        })
        .build()?;

    // One thread and one connection for the whole server; it stops with
    // the server's shutdown or when dropped at the end of `main`.
    let listener = Listener::start(
        hub,
        &database_url,
        vec![(CHANNEL.to_owned(), CHANNEL.to_owned())],
        server.shutdown_handle(),
    );

    // Port 0 picks a free port: say which one was bound.
    println!("listening on http://{}", server.local_addr());
    std::io::stdout().flush()?;

    server.run()?;
    listener.stop();
    Ok(())
}
