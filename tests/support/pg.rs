//! PostgreSQL for the listener's tests: the machine's server (trust auth,
//! reached with the `postgres` crate, an independent client) and
//! [`FakePg`], a scripted server on `127.0.0.1:0` that speaks the server
//! side of the startup and of each password method, checking what the
//! client sends with its own code (SCRAM proofs with ring, MD5 answers
//! given by the test), then answers `LISTEN`, sends notifications, sends
//! whatever bytes a test wants, or forwards to the real server.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::{digest, hmac, pbkdf2};

/// The machine's PostgreSQL.
pub const DATABASE: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A connection to the test database, or `None` after printing why it is
/// not there (outside CI: under `CI=true` the test fails instead).
pub fn database(test: &str) -> Option<postgres::Client> {
    let url = format!("{DATABASE}?connect_timeout=5&application_name=ssed-test-setup");
    match postgres::Client::connect(&url, postgres::NoTls) {
        Ok(db) => Some(db),
        Err(e) => {
            let reason = format!(
                "PostgreSQL at {DATABASE} is not usable: {}",
                ssed::Report(&e)
            );
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: {reason} (CI=true: the PostgreSQL tests must run)");
            }
            eprintln!("skipping {test}: {reason}");
            None
        }
    }
}

/// SCRAM-SHA-256 keys as a server stores them: `StoredKey` and
/// `ServerKey` (RFC 5802), computed here with ring.
pub fn scram_keys(password: &[u8], salt: &[u8], iterations: u32) -> ([u8; 32], [u8; 32]) {
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations.try_into().expect("iterations > 0"),
        salt,
        password,
        &mut salted,
    );
    let salted = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&salted, b"Client Key");
    let stored = digest::digest(&digest::SHA256, client_key.as_ref());
    let server = hmac::sign(&salted, b"Server Key");
    (
        stored.as_ref().try_into().expect("32 bytes"),
        server.as_ref().try_into().expect("32 bytes"),
    )
}

/// How the fake asks for a password, and what it accepts.
#[derive(Clone)]
pub enum Auth {
    /// `AuthenticationOk` at once.
    Trust,
    /// `password`: these exact bytes.
    Cleartext(Vec<u8>),
    /// `md5` with this salt: this exact answer (`md5…`).
    Md5 { salt: [u8; 4], answer: String },
    /// SCRAM-SHA-256 with these stored keys (a role's verifier).
    Scram {
        salt: Vec<u8>,
        iterations: u32,
        stored_key: [u8; 32],
        server_key: [u8; 32],
        /// Sends a wrong server signature after a right proof.
        forge: bool,
    },
    /// An authentication request of this code (7: GSSAPI).
    Request(u32),
    /// Reads the startup message and says nothing.
    Silent,
}

/// What the fake does once the client is in.
#[derive(Clone)]
pub enum After {
    /// Ready, then answers every query (`LISTEN` or a ping) as a server
    /// would; notifications come from [`FakePg::notify`].
    Script,
    /// Sends these bytes instead of the rest of the handshake, then waits.
    Raw(Vec<u8>),
    /// Logs in to this server as the same role (which trusts it) and
    /// forwards both ways, after swallowing its `AuthenticationOk`.
    Proxy(SocketAddr),
}

/// What the fake saw.
#[derive(Default)]
struct Seen {
    /// The startup parameters of every connection.
    startups: Vec<HashMap<String, String>>,
    /// Every query, in order.
    queries: Vec<String>,
    /// Why each failed login failed.
    refusals: Vec<String>,
    /// The write halves of the scripted connections, to notify on.
    writers: Vec<Arc<Mutex<TcpStream>>>,
}

/// A scripted PostgreSQL server; dropping it stops accepting.
pub struct FakePg {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakePg {
    /// On `127.0.0.1:0`.
    pub fn start(auth: Auth, after: After) -> FakePg {
        FakePg::start_on("127.0.0.1:0", auth, after).expect("bind 127.0.0.1:0")
    }

    /// On `bind` (`[::1]:0` say); `None` where it cannot bind.
    pub fn start_on(bind: &str, auth: Auth, after: After) -> Option<FakePg> {
        let listener = TcpListener::bind(bind).ok()?;
        let addr = listener.local_addr().ok()?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (Arc::clone(&seen), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (seen, auth, after) = (Arc::clone(&seen2), auth.clone(), after.clone());
                thread::spawn(move || {
                    // A client that goes away ends its thread; that is all.
                    let _ = serve(conn, &seen, &auth, &after);
                });
            }
        });
        Some(FakePg { addr, seen, stop })
    }

    /// How many connections sent a startup message.
    pub fn connections(&self) -> usize {
        lock(&self.seen).startups.len()
    }

    /// The startup parameters of connection `i`.
    pub fn startup(&self, i: usize) -> HashMap<String, String> {
        lock(&self.seen).startups[i].clone()
    }

    /// Every query received, in order.
    pub fn queries(&self) -> Vec<String> {
        lock(&self.seen).queries.clone()
    }

    /// Why each refused login was refused.
    pub fn refusals(&self) -> Vec<String> {
        lock(&self.seen).refusals.clone()
    }

    /// Sends `NOTIFY channel, payload` to every scripted connection.
    pub fn notify(&self, channel: &str, payload: &str) {
        let mut body = 4242i32.to_be_bytes().to_vec();
        body.extend_from_slice(&cstring(channel));
        body.extend_from_slice(&cstring(payload));
        self.send_raw(&message(b'A', &body));
    }

    /// Sends `bytes` as they are to every scripted connection.
    pub fn send_raw(&self, bytes: &[u8]) {
        let writers = lock(&self.seen).writers.clone();
        for w in writers {
            let _ = lock(&w).write_all(bytes); // one may have gone
        }
    }

    /// Ends every scripted connection as `pg_terminate_backend` does:
    /// `FATAL 57P01`, then close.
    pub fn terminate_all(&self) {
        let writers = std::mem::take(&mut lock(&self.seen).writers);
        let fatal = error_response(
            "FATAL",
            "57P01",
            "terminating connection due to administrator command",
        );
        for w in writers {
            let w = lock(&w);
            let _ = (&*w).write_all(&fatal);
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for FakePg {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
        self.terminate_all();
    }
}

/// A backend message.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstring(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// An `ErrorResponse`.
pub fn error_response(severity: &str, code: &str, text: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (kind, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', text),
    ] {
        body.push(kind);
        body.extend_from_slice(&cstring(value));
    }
    body.push(0);
    message(b'E', &body)
}

fn auth_request(code: u32, extra: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(extra);
    message(b'R', &body)
}

fn read_exact_vec(conn: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    conn.read_exact(&mut buf)?;
    Ok(buf)
}

/// A frontend message: its type and body.
fn read_message(conn: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let head = read_exact_vec(conn, 5)?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let body = read_exact_vec(conn, usize::try_from(len - 4).expect("a sane length"))?;
    Ok((head[0], body))
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// One connection, start to end.
fn serve(mut conn: TcpStream, seen: &Mutex<Seen>, auth: &Auth, after: &After) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    // The startup message (after an SSLRequest, if the client sends one).
    let startup = loop {
        let len = read_exact_vec(&mut conn, 4)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        let body = read_exact_vec(&mut conn, usize::try_from(len - 4).expect("a sane length"))?;
        if body[..4] == 80877103i32.to_be_bytes() {
            conn.write_all(b"N")?;
            continue;
        }
        let mut raw = len.to_be_bytes().to_vec();
        raw.extend_from_slice(&body);
        break raw;
    };
    let mut params = HashMap::new();
    let mut fields = startup[8..].split(|&b| b == 0);
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        if k.is_empty() {
            break;
        }
        params.insert(
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        );
    }
    let user = params.get("user").cloned().unwrap_or_default();
    lock(seen).startups.push(params);

    if let Err(why) = authenticate(&mut conn, auth)? {
        lock(seen).refusals.push(why);
        conn.write_all(&error_response(
            "FATAL",
            "28P01",
            &format!("password authentication failed for user \"{user}\""),
        ))?;
        return Ok(());
    }

    match after {
        After::Raw(bytes) => {
            conn.write_all(bytes)?;
            let _ = conn.read(&mut [0u8; 64]); // until the client closes
            Ok(())
        }
        After::Proxy(upstream) => proxy(conn, *upstream, &startup),
        After::Script => script(conn, seen),
    }
}

/// The password exchange; `Ok(Err(why))` for a client that got it wrong.
fn authenticate(conn: &mut TcpStream, auth: &Auth) -> io::Result<Result<(), String>> {
    match auth {
        Auth::Trust => {}
        Auth::Silent => {
            let _ = conn.read(&mut [0u8; 64]); // until the client closes
            return Err(invalid("silent".into()));
        }
        Auth::Request(code) => {
            conn.write_all(&auth_request(*code, &[]))?;
            let _ = conn.read(&mut [0u8; 64]);
            return Err(invalid("unsupported".into()));
        }
        Auth::Cleartext(want) => {
            conn.write_all(&auth_request(3, &[]))?;
            let (tag, body) = read_message(conn)?;
            if tag != b'p' || body.strip_suffix(b"\0") != Some(want.as_slice()) {
                return Ok(Err(format!("wrong password {body:?}")));
            }
        }
        Auth::Md5 { salt, answer } => {
            conn.write_all(&auth_request(5, salt))?;
            let (tag, body) = read_message(conn)?;
            if tag != b'p' || body.strip_suffix(b"\0") != Some(answer.as_bytes()) {
                return Ok(Err(format!(
                    "wrong md5 answer {:?}",
                    String::from_utf8_lossy(&body)
                )));
            }
        }
        Auth::Scram {
            salt,
            iterations,
            stored_key,
            server_key,
            forge,
        } => {
            conn.write_all(&auth_request(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"))?;
            let (tag, body) = read_message(conn)?;
            let mut parts = body.splitn(2, |&b| b == 0);
            let mechanism = parts.next().unwrap_or_default();
            let rest = parts.next().unwrap_or_default();
            if tag != b'p' || mechanism != b"SCRAM-SHA-256" || rest.len() < 4 {
                return Ok(Err("no SCRAM-SHA-256 initial response".into()));
            }
            let client_first = String::from_utf8_lossy(&rest[4..]).into_owned();
            let Some(bare) = client_first.strip_prefix("n,,") else {
                return Ok(Err(format!("bad GS2 header in {client_first:?}")));
            };
            let Some(client_nonce) = bare.split(',').find_map(|a| a.strip_prefix("r=")) else {
                return Ok(Err(format!("no nonce in {client_first:?}")));
            };
            let server_first = format!(
                "r={client_nonce}FakeServerNonce,s={},i={iterations}",
                STANDARD.encode(salt)
            );
            conn.write_all(&auth_request(11, server_first.as_bytes()))?;

            let (tag, body) = read_message(conn)?;
            let client_final = String::from_utf8_lossy(&body).into_owned();
            let Some((without_proof, proof)) = client_final.rsplit_once(",p=") else {
                return Ok(Err(format!("no proof in {client_final:?}")));
            };
            if tag != b'p' || without_proof != format!("c=biws,r={client_nonce}FakeServerNonce") {
                return Ok(Err(format!("bad client-final {client_final:?}")));
            }
            let auth_message = format!("{bare},{server_first},{without_proof}");
            let signature = hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, stored_key),
                auth_message.as_bytes(),
            );
            let proof = STANDARD.decode(proof).unwrap_or_default();
            let client_key: Vec<u8> = proof
                .iter()
                .zip(signature.as_ref())
                .map(|(p, s)| p ^ s)
                .collect();
            if digest::digest(&digest::SHA256, &client_key).as_ref() != stored_key {
                return Ok(Err("wrong SCRAM proof".into()));
            }
            let mut server_signature = hmac::sign(
                &hmac::Key::new(hmac::HMAC_SHA256, server_key),
                auth_message.as_bytes(),
            )
            .as_ref()
            .to_vec();
            if *forge {
                server_signature[0] ^= 1;
            }
            let server_final = format!("v={}", STANDARD.encode(server_signature));
            conn.write_all(&auth_request(12, server_final.as_bytes()))?;
        }
    }
    conn.write_all(&auth_request(0, &[]))?;
    Ok(Ok(()))
}

/// Ready, then answers queries until the client leaves.
fn script(mut conn: TcpStream, seen: &Mutex<Seen>) -> io::Result<()> {
    let writer = Arc::new(Mutex::new(conn.try_clone()?));
    let mut hello = Vec::new();
    for (k, v) in [
        ("server_version", "15.0 (fake)"),
        ("client_encoding", "UTF8"),
    ] {
        let mut body = cstring(k);
        body.extend_from_slice(&cstring(v));
        hello.extend_from_slice(&message(b'S', &body));
    }
    let mut key = 4242i32.to_be_bytes().to_vec();
    key.extend_from_slice(&7i32.to_be_bytes());
    hello.extend_from_slice(&message(b'K', &key));
    hello.extend_from_slice(&message(b'Z', b"I"));
    lock(&writer).write_all(&hello)?;
    lock(seen).writers.push(Arc::clone(&writer));
    conn.set_read_timeout(None)?;
    loop {
        let (tag, body) = read_message(&mut conn)?;
        match tag {
            b'Q' => {
                let sql =
                    String::from_utf8_lossy(body.strip_suffix(b"\0").unwrap_or(&body)).into_owned();
                let mut answer = Vec::new();
                if sql.is_empty() {
                    answer.extend_from_slice(&message(b'I', b""));
                } else if sql == "SHOW transaction_read_only" {
                    answer.extend_from_slice(&message(b'T', b"\0\x01transaction_read_only\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0"));
                    answer.extend_from_slice(&message(b'D', b"\0\x01\0\0\0\x03off"));
                    answer.extend_from_slice(&message(b'C', b"SHOW\0"));
                } else {
                    for _ in sql.matches("LISTEN ") {
                        answer.extend_from_slice(&message(b'C', b"LISTEN\0"));
                    }
                }
                answer.extend_from_slice(&message(b'Z', b"I"));
                lock(seen).queries.push(sql);
                lock(&writer).write_all(&answer)?;
            }
            b'X' => return Ok(()),
            other => return Err(invalid(format!("unexpected message {other}"))),
        }
    }
}

/// Logs in upstream with the client's startup message and pipes.
fn proxy(client: TcpStream, upstream: SocketAddr, startup: &[u8]) -> io::Result<()> {
    let mut up = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    up.write_all(startup)?;
    let (tag, body) = read_message(&mut up)?;
    if tag != b'R' || body != [0, 0, 0, 0] {
        return Err(invalid(format!(
            "upstream did not trust the role: {tag} {body:?}"
        )));
    }
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        thread::spawn(move || {
            let _ = from.set_read_timeout(None);
            let mut buf = [0u8; 8192];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Both);
        })
    };
    let a = pipe(client.try_clone()?, up.try_clone()?);
    let b = pipe(up, client);
    let _ = (a.join(), b.join());
    Ok(())
}
