//! `ssed`: the daemon.
//!
//! Until the hub lands, the binary serves the `messages` demo: a page at `/`
//! that subscribes to `/messages`, which sends a message on channel `demo`
//! every 2 seconds.

use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "\
ssed - a blocking, thread-per-connection Server-Sent Events server

USAGE:
    ssed [--listen ADDR]

OPTIONS:
    --listen ADDR   address to listen on (default 127.0.0.1:8080)
    -h, --help      print this help
    -V, --version   print the version

ENVIRONMENT:
    RUST_LOG        log filter (default: info)
";

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>ssed demo</title>
<style>body{font:16px system-ui,sans-serif;margin:2em}#state{color:#666}li{font-family:monospace}</style>
<h1>ssed</h1>
<p id="state">connecting…</p>
<ul id="log"></ul>
<script>
const log = document.getElementById("log"), state = document.getElementById("state");
const es = new EventSource("/messages");
es.onopen = () => state.textContent = "connected";
es.onerror = () => state.textContent = "reconnecting…";
es.addEventListener("demo", e => {
  const li = document.createElement("li");
  li.textContent = JSON.parse(e.data);
  log.prepend(li);
});
</script>
"#;

struct Args {
    listen: String,
}

enum Cli {
    Run(Args),
    Exit(ExitCode),
}

fn parse_args() -> Cli {
    let mut args = Args {
        listen: "127.0.0.1:8080".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Cli::Exit(ExitCode::SUCCESS);
            }
            "-V" | "--version" => {
                println!("ssed {}", env!("CARGO_PKG_VERSION"));
                return Cli::Exit(ExitCode::SUCCESS);
            }
            "--listen" => match it.next() {
                Some(addr) => args.listen = addr,
                None => {
                    eprintln!("ssed: --listen needs an address, e.g. --listen 127.0.0.1:8080");
                    return Cli::Exit(ExitCode::from(2));
                }
            },
            other => {
                if let Some(addr) = other.strip_prefix("--listen=") {
                    args.listen = addr.to_owned();
                } else {
                    eprintln!("ssed: unknown argument {other:?}\n\n{USAGE}");
                    return Cli::Exit(ExitCode::from(2));
                }
            }
        }
    }
    Cli::Run(args)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = match parse_args() {
        Cli::Run(args) => args,
        Cli::Exit(code) => return code,
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let server = ssed::Server::builder()
        .listen(args.listen)
        .get("/", |_| ssed::Response::html(PAGE))
        .route("/messages", |_req, stream| {
            for i in 1u64.. {
                stream.send("demo", &format!("Message n°{i}"))?;
                stream.sleep(Duration::from_secs(2))?;
            }
            Ok(())
        })
        .build()?;
    let shutdown = server.shutdown_handle();
    ctrlc::set_handler(move || {
        log::info!("signal received: shutting down");
        shutdown.shutdown();
    })?;
    server.run()?;
    Ok(())
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
