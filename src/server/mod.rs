//! [`Server`] and [`ServerBuilder`]: configuration, binding, the run loop
//! and shutdown.
//!
//! How the parts fit: the accept loop lives in `acceptor.rs` (one thread:
//! it owns every connection until its request is in, answers refusals
//! without a thread, and finishes answers a client is slow to take); what
//! waits there, and in what phase, is `pending.rs`; a connection's one
//! thread is `conn.rs` (a stream's handler, or one ordinary request);
//! `route.rs` maps a request to its handler; `limits/` derives the stream
//! cap from the machine (descriptors, maps, memory and its cgroup,
//! threads) and guards memory at admission.

pub(crate) mod acceptor;
pub(crate) mod conn;
pub(crate) mod limits;
pub(crate) mod pending;
pub(crate) mod route;

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use rustix::event::{EventfdFlags, epoll, eventfd};
use rustix::net::{AddressFamily, SocketType, ipproto, sockopt};

use crate::error::{Error, StreamError};
use crate::http::{IpNet, Request, Response, forwarded};
use crate::server::acceptor::Acceptor;
use crate::server::limits::clients::ClientStreams;
use crate::server::limits::{Capacity, MemoryGuard};
use crate::server::pending::Returned;
use crate::server::route::{Handler, Router};
use crate::shutdown::ShutdownHandle;
use crate::stats::Stats;
use crate::stream::registry::Registry;
use crate::stream::{Stream, StreamConfig, StreamOptions};

/// Smallest stack a connection thread gets: below it a handler panic can
/// overflow the stack while unwinding (measured: 16 KiB aborts with
/// `RUST_BACKTRACE=1`, 32 KiB unwinds cleanly).
pub const MIN_STACK_SIZE: usize = 32 * 1024;
/// Queue of connections the kernel completes before `accept`.
const LISTEN_BACKLOG: i32 = 4096;

/// What a stream past the cap gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Overload {
    /// `503 Service Unavailable` with `Retry-After`.
    Reject,
    /// For `EventSource` clients (`Accept: text/event-stream`): `200` with a
    /// `retry:` drawn at random from `min..=max`, then an immediate close,
    /// so reconnects spread out instead of giving up for good as a browser
    /// does after a `503`. Other clients get the `503`.
    Retry {
        /// Shortest reconnection time handed out.
        min: Duration,
        /// Longest reconnection time handed out.
        max: Duration,
    },
}

/// The settings the server runs with (resolved from the builder).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub max_connections: usize,
    pub max_requests: usize,
    pub max_pending: usize,
    pub request_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub write_timeout: Duration,
    pub max_body: usize,
    pub stack_size: usize,
    pub send_buffer: usize,
    pub grace: Duration,
    pub overload: Overload,
    pub retry_after: Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub stream: StreamConfig,
}

/// State shared by the acceptor and every connection thread.
pub(crate) struct Shared {
    pub config: Config,
    pub router: Router,
    pub stats: Stats,
    pub shutdown: ShutdownHandle,
    pub registry: Arc<Registry>,
    /// Streams each client holds, against `max_streams_per_client`.
    pub clients: Arc<ClientStreams>,
    /// Stream requests whose handler counts their client itself.
    pub named_later: Option<NamedLater>,
    pub returned: Sender<Returned>,
    /// Refuses new streams while memory headroom is low (the cap is
    /// computed once, memory use keeps moving).
    pub memory: MemoryGuard,
    /// What TLS connections are served with; `None`: plain text.
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Shared {
    /// Sets on `req` the client and scheme its trusted proxy names, if
    /// `peer` is one (see [`ServerBuilder::trusted_proxies`]). Every
    /// request of a connection, the first and those after it on a
    /// kept-alive connection alike.
    ///
    /// A request that came over TLS is `https` whatever a proxy says.
    pub(crate) fn resolve_origin(&self, req: &mut Request, peer: SocketAddr, tls: bool) {
        let trusted = &self.config.trusted_proxies;
        if !trusted.is_empty() {
            req.set_origin(forwarded::origin(peer.ip(), req.headers(), trusted));
        }
        if tls {
            req.set_https();
        }
    }
}

/// Builds a [`Server`]; every setter takes and returns the builder.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// let server = ssed::Server::builder()
///     .listen("127.0.0.1:0")
///     .max_connections(100)
///     .route("/ticks", |_req, stream| {
///         stream.send("tick", &1)?;
///         stream.sleep(Duration::from_secs(1))
///     })
///     .build()?;
/// let running = server.spawn()?;
/// running.stop();
/// # Ok::<(), ssed::Error>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct ServerBuilder {
    listen: String,
    max_connections: Option<usize>,
    max_requests: usize,
    max_pending: usize,
    request_timeout: Duration,
    keep_alive_timeout: Duration,
    write_timeout: Duration,
    max_body: usize,
    stack_size: usize,
    send_buffer: usize,
    grace: Duration,
    overload: Overload,
    retry_after: Duration,
    max_streams_per_client: usize,
    trusted_proxies: Vec<IpNet>,
    raise_fd_limit: bool,
    memory_reserve: u64,
    stream: StreamOptions,
    router: Router,
    route_error: Option<Error>,
    named_later: Option<NamedLater>,
    #[cfg(feature = "tls")]
    tls: Option<crate::wire::certs::Certificates>,
}

/// Tells which stream requests their handler counts against
/// `max_streams_per_client` by a name of its own, instead of the acceptor
/// by address (see [`ServerBuilder::client_named_by_handler`]).
pub(crate) type NamedLater = Arc<dyn Fn(&Request) -> bool + Send + Sync>;

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .field("routes", &self.router)
            .finish_non_exhaustive()
    }
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            listen: "127.0.0.1:8080".into(),
            max_connections: None,
            max_requests: 64,
            max_pending: 4096,
            request_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_body: 64 * 1024,
            stack_size: 64 * 1024,
            send_buffer: 64 * 1024,
            grace: Duration::from_secs(5),
            overload: Overload::Reject,
            retry_after: Duration::from_secs(5),
            max_streams_per_client: 0,
            trusted_proxies: Vec::new(),
            raise_fd_limit: true,
            memory_reserve: 0,
            stream: StreamOptions::new(),
            router: Router::default(),
            route_error: None,
            named_later: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl ServerBuilder {
    /// The address to listen on, `host:port`; port `0` picks a free one
    /// (see [`Server::local_addr`]). Default `127.0.0.1:8080`.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = addr.into();
        self
    }

    /// The most streams open at once; past it a new stream gets `503` (or
    /// the [`Overload`] answer) before any thread is spent on it. Default:
    /// derived from this machine's limits ([`Capacity::detect_with`]),
    /// a memory cgroup's included.
    ///
    /// Either way, a new stream also gets that answer while memory
    /// headroom (what the memory cgroup's limit leaves, or the machine's
    /// `MemAvailable`) is below a sixteenth of the limit, kept within 4 to
    /// 64 MiB: usage can grow after the cap was set.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n.max(1));
        self
    }

    /// The most ordinary (non-stream) requests handled at once, each on a
    /// thread of its own; past it, `503`. A request counts from when its
    /// body is in: one still arriving waits in the acceptor, without a
    /// thread. Default 64.
    pub fn max_requests(mut self, n: usize) -> Self {
        self.max_requests = n.max(1);
        self
    }

    /// The most connections waiting without a thread (each holds only a
    /// descriptor and its buffers): for a request head or an ordinary
    /// request's body, between keep-alive requests, or for the client to
    /// take the rest of a response. When full, the one nearest its deadline
    /// is cut. Default 4096.
    pub fn max_pending(mut self, n: usize) -> Self {
        self.max_pending = n.max(1);
        self
    }

    /// Every stream setting at once (budget, heartbeats, the shutdown
    /// handle, the counters), replacing what the setters for them set.
    /// Default: [`StreamOptions::new`].
    pub fn stream_options(mut self, options: StreamOptions) -> Self {
        self.stream = options;
        self
    }

    /// A stream's execution-time budget: see
    /// [`StreamOptions::max_execution_time`]. Default 30 s.
    pub fn max_execution_time(mut self, d: Duration) -> Self {
        self.stream = self.stream.max_execution_time(d);
        self
    }

    /// Time allowed to receive a request head and body, counted from the
    /// connection's first moment (a deadline, not a per-read timeout).
    /// Default 10 s.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = d.max(Duration::from_millis(1));
        self
    }

    /// How long a keep-alive connection may stay idle between requests.
    /// Default 5 s.
    pub fn keep_alive_timeout(mut self, d: Duration) -> Self {
        self.keep_alive_timeout = d.max(Duration::from_millis(1));
        self
    }

    /// Time one write may block before the client is dropped as not
    /// reading ([`EndReason::WriteTimeout`](crate::EndReason::WriteTimeout)).
    /// An ordinary response's thread never blocks: what the client does not
    /// take at once is sent by the acceptor, which allows it this long.
    /// Default 10 s.
    pub fn write_timeout(mut self, d: Duration) -> Self {
        self.write_timeout = d.max(Duration::from_millis(1));
        self
    }

    /// Largest request body accepted; past it, `413`. Default 64 KiB.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Stack size of each connection thread; raised to
    /// [`MIN_STACK_SIZE`] if smaller. Default 64 KiB.
    pub fn stack_size(mut self, bytes: usize) -> Self {
        self.stack_size = bytes;
        self
    }

    /// `SO_SNDBUF` of every connection (set when it is accepted), bounding
    /// what a client that stops reading, a stream's or one pipelining
    /// ordinary requests, pins in the kernel; `0` keeps the kernel's
    /// default. Default 64 KiB.
    pub fn send_buffer(mut self, bytes: usize) -> Self {
        self.send_buffer = bytes;
        self
    }

    /// Keep-alive frames on a silent stream: see
    /// [`StreamOptions::heartbeat`]. Default off.
    pub fn heartbeat(mut self, d: Duration) -> Self {
        self.stream = self.stream.heartbeat(d);
        self
    }

    /// Heartbeats as `event: ping`: see [`StreamOptions::heartbeat_event`].
    /// Default false.
    pub fn heartbeat_event(mut self, on: bool) -> Self {
        self.stream = self.stream.heartbeat_event(on);
        self
    }

    /// How long [`Server::run`] waits for streams to close after shutdown
    /// before cutting their sockets. Default 5 s.
    pub fn grace_period(mut self, d: Duration) -> Self {
        self.grace = d;
        self
    }

    /// What a stream past the cap gets. Default [`Overload::Reject`].
    pub fn overload(mut self, overload: Overload) -> Self {
        self.overload = overload;
        self
    }

    /// The `Retry-After` of a `503` at the cap (whole seconds, at least 1).
    /// Default 5 s.
    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = d;
        self
    }

    /// Streams one client may hold at once; past it a new stream gets
    /// `429 Too Many Requests` + `Retry-After` (no thread is started). A
    /// client is its address ([`Request::client_ip`]; an IPv6 client is
    /// its /64). Default 0: no limit but the cap.
    pub fn max_streams_per_client(mut self, n: usize) -> Self {
        self.max_streams_per_client = n;
        self
    }

    /// Streams for whose requests `f` says true are not counted against
    /// [`max_streams_per_client`](ServerBuilder::max_streams_per_client)
    /// by their address when they open: their handler names the client
    /// once it has authenticated it (the daemon: a JWT's subject) and
    /// counts it then. `f` runs in the accept loop: keep it cheap. Crate
    /// internal for now: the handler's side is the daemon's.
    #[cfg_attr(not(feature = "daemon"), allow(dead_code))]
    pub(crate) fn client_named_by_handler(
        mut self,
        f: impl Fn(&Request) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.named_later = Some(Arc::new(f));
        self
    }

    /// Peers whose `Forwarded`, `X-Forwarded-For` and `X-Forwarded-Proto`
    /// headers are believed for the client's address and scheme
    /// ([`Request::client_ip`], [`Request::scheme`]): the reverse proxies
    /// in front of this server. From any other peer those headers change
    /// nothing. Default: none.
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = ssed::Server::builder()
    ///     .trusted_proxies(["127.0.0.1".parse()?, "10.0.0.0/8".parse()?]);
    /// # Ok::<(), ssed::IpNetError>(())
    /// ```
    pub fn trusted_proxies(mut self, proxies: impl IntoIterator<Item = IpNet>) -> Self {
        self.trusted_proxies = proxies.into_iter().collect();
        self
    }

    /// Serves HTTPS only, with `certs` (feature `tls`): the TLS handshake
    /// is read like a request head, without a thread and within
    /// [`request_timeout`](ServerBuilder::request_timeout); a client that
    /// sends plain HTTP gets a `400` saying so. Reloading `certs`
    /// ([`Certificates::reload`](crate::tls::Certificates::reload)) serves
    /// the new certificate to new connections; open ones keep theirs.
    /// Default: plain text.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, certs: crate::wire::certs::Certificates) -> Self {
        self.tls = Some(certs);
        self
    }

    /// Whether [`build`](ServerBuilder::build) raises the soft descriptor
    /// limit to the hard one (see [`raise_fd_limit`](crate::raise_fd_limit)).
    /// Default true.
    pub fn raise_fd_limit(mut self, on: bool) -> Self {
        self.raise_fd_limit = on;
        self
    }

    /// Memory kept out of the streams' share when the cap is derived from
    /// memory, in bytes: memory this program needs for something else, for
    /// instance a hub's budget for retained events (see
    /// [`memory_info`](crate::memory_info) to size it). The memory term
    /// then allows three quarters of what is left after it at
    /// [`Capacity::MEMORY_PER_STREAM`] each (see [`Capacity::detect_with`]).
    /// No effect with [`max_connections`](ServerBuilder::max_connections).
    /// Default 0.
    pub fn memory_reserve(mut self, bytes: u64) -> Self {
        self.memory_reserve = bytes;
        self
    }

    /// Counters to update (clone the handle first to read it elsewhere):
    /// see [`StreamOptions::stats`]. Default: fresh counters, see
    /// [`Server::stats`].
    pub fn stats(mut self, stats: Stats) -> Self {
        self.stream = self.stream.stats(stats);
        self
    }

    /// A shutdown handle to obey (one created elsewhere, for instance by a
    /// signal handler): see [`StreamOptions::shutdown_handle`]. Default: a
    /// fresh one, see [`Server::shutdown_handle`].
    pub fn shutdown_handle(mut self, handle: ShutdownHandle) -> Self {
        self.stream = self.stream.shutdown_handle(handle);
        self
    }

    /// Adds a stream route for `GET pattern`. The handler runs on the
    /// connection's own thread for as long as the stream lives.
    ///
    /// A pattern is an exact path whose segments may be `{name}`
    /// parameters (`/events/{topic}`), read with [`Request::param`].
    pub fn route<F>(self, pattern: &str, handler: F) -> Self
    where
        F: Fn(&Request, &mut Stream) -> Result<(), StreamError> + Send + Sync + 'static,
    {
        self.add("GET", pattern, Handler::Stream(Arc::new(handler)))
    }

    /// Adds an ordinary `GET` route (also answers `HEAD`).
    pub fn get<F>(self, pattern: &str, handler: F) -> Self
    where
        F: Fn(&Request) -> Response + Send + Sync + 'static,
    {
        self.handle("GET", pattern, handler)
    }

    /// Adds an ordinary `POST` route; the body is read (up to
    /// [`max_body`](ServerBuilder::max_body)) before the handler runs.
    pub fn post<F>(self, pattern: &str, handler: F) -> Self
    where
        F: Fn(&Request) -> Response + Send + Sync + 'static,
    {
        self.handle("POST", pattern, handler)
    }

    /// Adds an ordinary route for any method.
    pub fn handle<F>(self, method: &str, pattern: &str, handler: F) -> Self
    where
        F: Fn(&Request) -> Response + Send + Sync + 'static,
    {
        self.add(method, pattern, Handler::Plain(Arc::new(handler)))
    }

    /// Answers requests whose path no route has, whatever their method,
    /// with `handler` (a redirect, a custom 404) instead of ssed's plain
    /// `404`. A `HEAD` request gets the answer's head alone.
    pub fn fallback<F>(mut self, handler: F) -> Self
    where
        F: Fn(&Request) -> Response + Send + Sync + 'static,
    {
        self.router.fallback(Handler::Plain(Arc::new(handler)));
        self
    }

    fn add(mut self, method: &str, pattern: &str, handler: Handler) -> Self {
        if let Err(e) = self.router.add(method, pattern, handler) {
            self.route_error.get_or_insert(e);
        }
        self
    }

    /// Binds the listening socket and prepares the server.
    ///
    /// # Errors
    ///
    /// [`Error::Route`] for an invalid route pattern, [`Error::Address`]
    /// for an address that does not resolve, [`Error::Bind`] when the
    /// address cannot be bound, [`Error::Io`] when the poller cannot be set
    /// up.
    pub fn build(self) -> Result<Server, Error> {
        if let Some(e) = self.route_error {
            return Err(e);
        }
        if self.raise_fd_limit {
            match limits::raise_fd_limit() {
                Ok(n) => log::debug!("descriptor limit: {n}"),
                Err(e) => log::warn!("cannot raise the descriptor limit: {e}"),
            }
        }
        let mut capacity = Capacity::detect_with(self.max_pending, self.memory_reserve);
        if let Some(n) = self.max_connections {
            capacity.max_streams = n;
            capacity.limited_by = "configured";
        }
        #[cfg(feature = "tls")]
        let tls =
            match &self.tls {
                Some(certs) => Some(certs.server_config().map_err(|e| {
                    Error::Io(std::io::Error::other(format!("TLS setup failed: {e}")))
                })?),
                None => None,
            };
        let addr = resolve(&self.listen)?;
        let listener = bind(addr)?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(std::io::Error::from)?;
        let waker = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(std::io::Error::from)?;
        acceptor::register_waker(&epoll, &waker)?;
        if !self.stream.shutdown.set_wake(waker) {
            return Err(Error::Io(std::io::Error::other(
                "this shutdown handle already belongs to another server",
            )));
        }
        let stack_size = if self.stack_size < MIN_STACK_SIZE {
            log::warn!(
                "stack size {} is below the {MIN_STACK_SIZE}-byte floor; using the floor",
                self.stack_size
            );
            MIN_STACK_SIZE
        } else {
            self.stack_size
        };
        let config = Config {
            max_connections: capacity.max_streams,
            max_requests: self.max_requests,
            max_pending: self.max_pending,
            request_timeout: self.request_timeout,
            keep_alive_timeout: self.keep_alive_timeout,
            write_timeout: self.write_timeout,
            max_body: self.max_body,
            stack_size,
            send_buffer: self.send_buffer,
            grace: self.grace,
            overload: self.overload,
            retry_after: self.retry_after,
            trusted_proxies: self.trusted_proxies,
            stream: self.stream.stream_config(self.write_timeout),
        };
        self.stream
            .stats
            .counters()
            .streams_max
            .store(capacity.max_streams as u64, Relaxed);
        let (returned_tx, returned_rx) = crossbeam_channel::unbounded();
        // The acceptor's poller also hears a stream's connection die.
        let registry = Registry::default();
        registry.watch_with(epoll.try_clone()?);
        let shared = Arc::new(Shared {
            config,
            router: self.router,
            stats: self.stream.stats,
            shutdown: self.stream.shutdown,
            registry: Arc::new(registry),
            clients: Arc::new(ClientStreams::new(self.max_streams_per_client)),
            named_later: self.named_later,
            returned: returned_tx,
            memory: MemoryGuard::detect(),
            #[cfg(feature = "tls")]
            tls,
        });
        Ok(Server {
            acceptor: Acceptor::new(Arc::clone(&shared), listener, epoll, returned_rx),
            shared,
            local_addr,
            capacity,
        })
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    shared: Arc<Shared>,
    acceptor: Acceptor,
    local_addr: SocketAddr,
    capacity: Capacity,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A builder with every default.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// The address actually bound (useful with port `0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops this server from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shared.shutdown.clone()
    }

    /// The server's counters.
    pub fn stats(&self) -> Stats {
        self.shared.stats.clone()
    }

    /// The stream cap in force and the resource that sets it.
    pub fn capacity(&self) -> &Capacity {
        &self.capacity
    }

    /// The routes and settings, for `crate::fuzzing` to serve requests
    /// without the accept loop, and the daemon to count the streams
    /// whose client only its handler knows.
    #[cfg(any(feature = "fuzzing", feature = "daemon"))]
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Runs the accept loop on this thread until shutdown, then waits for
    /// the streams to close (each gets a last frame), cutting any still
    /// open after the grace period.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the poller cannot watch the listening socket.
    pub fn run(self) -> Result<(), Error> {
        let Server {
            shared,
            acceptor,
            local_addr,
            capacity,
        } = self;
        log::info!(
            "listening on {local_addr} (cap {} streams, set by {}; descriptor limit {})",
            capacity.max_streams,
            capacity.limited_by,
            capacity.fd_limit
        );
        let result = acceptor.run();
        drain(&shared);
        result.map_err(Error::Io)
    }

    /// Runs the server on a background thread and returns a handle to stop
    /// it and wait for it.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the thread cannot be started.
    pub fn spawn(self) -> Result<RunningServer, Error> {
        let addr = self.local_addr;
        let shutdown = self.shutdown_handle();
        let stats = self.stats();
        let thread = std::thread::Builder::new()
            .name("ssed-accept".into())
            .spawn(move || self.run())?;
        Ok(RunningServer {
            addr,
            shutdown,
            stats,
            thread: Some(thread),
        })
    }
}

/// Waits for every connection thread to finish, up to the grace period,
/// then cuts the sockets of those still open.
fn drain(shared: &Shared) {
    let counters = shared.stats.counters();
    let busy = || counters.streams_open.load(Relaxed) + counters.requests_active.load(Relaxed);
    // Counted before the wake-up: woken streams start closing at once.
    let open = busy();
    shared.registry.wake_all();
    let start = Instant::now();
    if open > 0 {
        log::info!("shutting down: waiting for {open} connections to close");
    }
    while busy() > 0 && start.elapsed() < shared.config.grace {
        std::thread::sleep(Duration::from_millis(10));
    }
    if busy() > 0 {
        let cut = shared.registry.shutdown_all();
        log::warn!("grace period over: cut {cut} stream sockets");
        let cut_at = Instant::now();
        while busy() > 0 && cut_at.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let left = busy();
        if left > 0 {
            log::warn!(
                "{left} handlers still running after shutdown (busy without a blocking call)"
            );
        }
    }
    log::info!("stopped");
}

/// A server running on a background thread (see [`Server::spawn`]).
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    shutdown: ShutdownHandle,
    stats: Stats,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

impl RunningServer {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// The server's counters.
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// Shuts the server down and waits for [`Server::run`] to return.
    pub fn stop(mut self) -> Result<(), Error> {
        self.shutdown.shutdown();
        self.join()
    }

    fn join(&mut self) -> Result<(), Error> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(Error::Io(std::io::Error::other("server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        let _ = self.join(); // nothing to report from a drop
    }
}

fn resolve(listen: &str) -> Result<SocketAddr, Error> {
    let bad = |source| Error::Address {
        addr: listen.to_owned(),
        source,
    };
    listen
        .to_socket_addrs()
        .map_err(bad)?
        .next()
        .ok_or_else(|| bad(std::io::Error::other("resolves to no address")))
}

/// Binds with a deep backlog: a reconnect storm of thousands of clients
/// must queue in the kernel rather than be refused.
fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let err = |e: rustix::io::Errno| Error::Bind {
        addr,
        source: e.into(),
    };
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let socket = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
        Some(ipproto::TCP),
    )
    .map_err(err)?;
    sockopt::set_socket_reuseaddr(&socket, true).map_err(err)?;
    rustix::net::bind(&socket, &addr).map_err(err)?;
    rustix::net::listen(&socket, LISTEN_BACKLOG).map_err(err)?;
    Ok(TcpListener::from(socket))
}
