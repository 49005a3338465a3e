//! What the benchmarks that run the real daemon share: a temporary
//! directory, the `ssed` binary as a child process killed by PID when
//! dropped (its address read from its log), a process's CPU time, and a
//! throwaway CA with a server certificate for HTTPS.
//! Included with `mod common;`; not every benchmark uses every item.
#![allow(dead_code)]

use std::error::Error;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The daemon cargo built for the benchmark.
pub const BIN: &str = env!("CARGO_BIN_EXE_ssed");
/// Names another `ssed` binary to run as the server (the static build, a
/// release from elsewhere); the load tester is still [`BIN`].
pub const SERVER_ENV: &str = "SSED_BENCH_SERVER";

/// The daemon under test: `$SSED_BENCH_SERVER`, or else [`BIN`].
pub fn server_bin() -> std::ffi::OsString {
    std::env::var_os(SERVER_ENV).unwrap_or_else(|| BIN.into())
}
/// How long the daemon may take to log its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new directory whose name says which benchmark (`what`) made it.
    pub fn new(what: &str) -> Result<TempDir, Box<dyn Error>> {
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let dir =
            std::env::temp_dir().join(format!("ssed-bench-{}-{stamp}-{what}", std::process::id()));
        fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0); // best effort: it is a temp dir
    }
}

/// A child process killed by PID and reaped when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill(); // it may have exited already
        let _ = self.0.wait(); // reap it either way
    }
}

/// A running `ssed`, killed by PID and reaped when dropped.
pub struct Server {
    child: Guard,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `ssed --config CONFIG --listen 127.0.0.1:0` and waits for the
    /// address in its log. The log keeps being drained (so the server never
    /// blocks on a full pipe), and its warnings and errors are shown.
    pub fn start(config: &Path) -> Result<Server, Box<dyn Error>> {
        let bin = server_bin();
        let child = Guard(
            Command::new(&bin)
                .arg("--config")
                .arg(config)
                .args(["--listen", "127.0.0.1:0"])
                .env("RUST_LOG", "info")
                .env_remove("SSED_PUBLISH_TOKEN")
                .env_remove("SSED_SUBSCRIBE_TOKEN")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start the server {}: {e}", bin.to_string_lossy()))?,
        );
        // From here on the guard kills it, even if no address shows up.
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let stderr = server.child.0.stderr.take().ok_or("no stderr pipe")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if let Some(rest) = line.split("listening on ").nth(1)
                    && let Some(addr) = rest.split(" (").next()
                    && let Ok(addr) = addr.parse::<SocketAddr>()
                {
                    let _ = tx.send(addr); // the benchmark may have given up
                } else if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("  server: {line}");
                }
            }
        });
        server.addr = rx
            .recv_timeout(STARTUP_TIMEOUT)
            .map_err(|_| "the server did not log its address in time")?;
        Ok(server)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

/// utime + stime of `pid`, in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of proc(5), counted from the state (field 3).
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// What the benchmarks' `openssl req` reads: the extensions of a CA and of
/// a server certificate for `localhost` and `127.0.0.1`.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign
[server]
subjectAltName = DNS:localhost,IP:127.0.0.1
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
";

/// A throwaway PKI in a benchmark's directory: `ca.pem`, the CA a client
/// is to trust, and the server's `server.pem` (issued by it, for
/// `127.0.0.1` and `localhost`, valid two days) and `server.key`, both
/// keys P-256. Made with the `openssl` command, 3.0 or later (`req -x509
/// -CA`).
pub struct Pki {
    /// The CA's certificate (PEM).
    pub ca: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

impl Pki {
    /// Makes the CA and the server's certificate in `dir`.
    pub fn new(dir: &Path) -> Result<Pki, Box<dyn Error>> {
        let cnf = dir.join("openssl.cnf");
        fs::write(&cnf, OPENSSL_CNF)?;
        let pki = Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        let ca_key = dir.join("ca.key");
        let issuer = Some((pki.ca.as_path(), ca_key.as_path()));
        openssl_req(&cnf, "ca", "/CN=ssed bench CA", (&ca_key, &pki.ca), None)?;
        openssl_req(
            &cnf,
            "server",
            "/CN=localhost",
            (&pki.key, &pki.cert),
            issuer,
        )?;
        Ok(pki)
    }
}

/// `openssl req -x509` making a new P-256 key and its certificate (`made`:
/// the key's file, the certificate's) with the extensions of `section` of
/// `cnf`: self-signed, or issued by `issuer` (its certificate and key).
fn openssl_req(
    cnf: &Path,
    section: &str,
    subject: &str,
    made: (&Path, &Path),
    issuer: Option<(&Path, &Path)>,
) -> Result<(), String> {
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-config"]).arg(cnf);
    cmd.args(["-extensions", section, "-subj", subject, "-days", "2"]);
    cmd.args([
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-noenc",
    ]);
    cmd.arg("-keyout").arg(made.0).arg("-out").arg(made.1);
    if let Some((cert, key)) = issuer {
        cmd.arg("-CA").arg(cert).arg("-CAkey").arg(key);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("the openssl command (apt-get install openssl): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!("openssl req ({section}): {}", err.trim()))
    }
}
