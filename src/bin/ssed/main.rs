//! `ssed`: arguments -> config -> logger -> signals -> run -> exit code.
//!
//! `ssed loadtest` is a client, not the daemon: it lives in [`loadtest`],
//! here in the binary, and takes from the library only
//! `ssed::raise_fd_limit` and the config file's duration syntax
//! (`ssed::daemon::config::parse_duration`).

mod loadtest;
mod logger;

use std::path::PathBuf;
use std::process::ExitCode;

use ssed::daemon::{self, Config, ConfigError};

const USAGE: &str = "\
ssed - a Server-Sent Events server for small machines

USAGE:
    ssed [--config FILE] [--listen ADDR]
    ssed loadtest --url URL --connections N [...]   (see 'ssed loadtest --help')

OPTIONS:
    -c, --config FILE   read settings from a TOML file (see config.example.toml)
    -l, --listen ADDR   address to listen on, overriding the file (default 127.0.0.1:8080)
    -h, --help          print this help
    -V, --version       print the version

ENVIRONMENT:
    SSED_PUBLISH_TOKEN     publish token (overrides [auth] publish_token)
    SSED_SUBSCRIBE_TOKEN   subscribe token (overrides [auth] subscribe_token)
    SSED_ADMIN_TOKEN       operators' token (overrides [auth] admin_token)
    RUST_LOG               log filter (default: info)

HTTP:
    GET  /                   demo page
    GET  /events/{topic}     subscribe (SSE); /events?topic=a&topic=b for several
    POST /publish/{topic}    publish the body; ?event=NAME sets the event name
    POST /keys/{key}         push into a mailbox; GET /keys/{key} consumes it (SSE)
    POST /tickets            single-use stream ticket (with subscribe_token)
    GET  /healthz, /metrics
    GET  /streams            the open streams (JSON); DELETE /streams/{id},
                             /streams?subject=S or ?topic=T ends them (admin_token)
";

/// Exit status for bad arguments or configuration.
const EXIT_USAGE: u8 = 2;

struct Args {
    config: Option<PathBuf>,
    listen: Option<String>,
}

enum Parsed {
    Run(Args),
    Exit(ExitCode),
}

fn parse_args() -> Result<Parsed, lexopt::Error> {
    use lexopt::prelude::*;
    let mut args = Args {
        config: None,
        listen: None,
    };
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next()? {
        match arg {
            Short('c') | Long("config") => args.config = Some(parser.value()?.into()),
            Short('l') | Long("listen") => {
                args.listen = Some(parser.value()?.string()?);
            }
            Short('h') | Long("help") => {
                print!("{USAGE}");
                return Ok(Parsed::Exit(ExitCode::SUCCESS));
            }
            Short('V') | Long("version") => {
                println!("ssed {}", env!("CARGO_PKG_VERSION"));
                return Ok(Parsed::Exit(ExitCode::SUCCESS));
            }
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(Parsed::Run(args))
}

fn main() -> ExitCode {
    logger::init("info");
    let mut argv = std::env::args_os().skip(1);
    if argv.next().is_some_and(|a| a == "loadtest") {
        return loadtest::main(argv.collect());
    }
    let args = match parse_args() {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Exit(code)) => return code,
        Err(e) => {
            eprintln!("ssed: {e}\nTry 'ssed --help'.");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ssed: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", ssed::Report(&*e));
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: &Args) -> Result<Config, ConfigError> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    config.apply_env();
    config.check(args.config.as_deref())?;
    if let Some(listen) = &args.listen {
        config.set_listen(listen)?;
    }
    Ok(config)
}

fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let shutdown = ssed::ShutdownHandle::new();
    let tls = config.tls.clone();
    let acme = config.acme.is_some();
    let daemon = daemon::build(config, shutdown.clone())?;
    let cap = daemon.server.capacity();
    // The cgroup's figures, when it has a memory limit, say why "memory
    // allows" is what it is inside a container.
    let cgroup = match (cap.cgroup_memory_limit, cap.cgroup_memory_used) {
        (Some(limit), Some(used)) => format!(
            "; cgroup memory limit {} MiB, {} MiB in use",
            limit >> 20,
            used >> 20
        ),
        _ => String::new(),
    };
    log::info!(
        "stream cap {} (set by {}): descriptor limit {} allows {}, memory maps allow {}, memory allows {}, threads allow {}{cgroup}",
        cap.max_streams,
        cap.limited_by,
        cap.fd_limit,
        cap.by_fds,
        shown(cap.by_maps),
        shown(cap.by_memory),
        shown(cap.by_threads),
    );
    // ACME's certificates are reloaded by the renewal thread that writes
    // them (and on SIGHUP); files given as cert/key are watched.
    if let (Some(certs), false) = (&tls, acme) {
        daemon::reload::watch(certs.clone(), shutdown.clone())?;
    }
    handle_signals(shutdown.clone(), tls)?;
    let redirect = match daemon.redirect {
        Some(server) => {
            log::info!(
                "redirecting http://{} to https, and answering ACME http-01 challenges there",
                server.local_addr()
            );
            let (stop, shutdown) = (server.shutdown_handle(), shutdown.clone());
            let thread = std::thread::Builder::new()
                .name("ssed-redirect".into())
                .spawn(move || {
                    if let Err(e) = server.run() {
                        log::error!("the redirect listener stopped: {}", ssed::Report(&e));
                        shutdown.shutdown();
                    }
                })?;
            Some((stop, thread))
        }
        None => None,
    };
    let served = daemon.server.run();
    if let Some((stop, thread)) = redirect {
        stop.shutdown();
        let _ = thread.join();
    }
    served?;
    Ok(())
}

/// SIGINT and SIGTERM shut down; SIGHUP re-reads the TLS certificate and
/// key (and is otherwise ignored, so a closed terminal does not stop the
/// daemon). On a thread of their own.
fn handle_signals(
    shutdown: ssed::ShutdownHandle,
    tls: Option<ssed::tls::Certificates>,
) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("ssed-signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    match &tls {
                        Some(certs) => daemon::reload::reload(certs),
                        None => log::info!("SIGHUP: nothing to reload"),
                    }
                    continue;
                }
                log::info!("signal received: shutting down");
                shutdown.shutdown();
            }
        })?;
    Ok(())
}

fn shown(v: Option<u64>) -> String {
    v.map_or_else(|| "?".to_owned(), |v| v.to_string())
}
