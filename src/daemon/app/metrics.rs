//! `GET /healthz` (JSON) and `GET /metrics` (Prometheus text).

use std::fmt::Write as _;

use serde_json::json;

use super::App;
use std::sync::atomic::Ordering::Relaxed;

use crate::bridge::postgres::{Listener, ListenerState};
use crate::daemon::acme::served_validity;
use crate::server::limits::process_usage;
use crate::{EndReason, Response};

impl App {
    pub(super) fn healthz(&self) -> Response {
        let s = self.stats.snapshot();
        let limited_by = self.capacity.get().map_or("unknown", |c| c.limited_by);
        let mut body = json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "streams_open": s.streams_open,
            "max_connections": s.streams_max,
            "limited_by": limited_by,
            "uptime_seconds": self.started.elapsed().as_secs(),
        });
        let usage = self.hub.usage();
        body["retained_bytes"] = json!(usage.history_bytes + usage.mailbox_bytes);
        body["max_retained_bytes"] = json!(usage.max_retained_bytes);
        // A database that is down degrades one source of events, not the
        // server: `status` stays "ok". Errors stay in the log, since this
        // page needs no token.
        if let Some(redis) = self.hub.redis_state() {
            // Without Redis a node can neither publish nor replay.
            if !redis.connected {
                body["status"] = json!("degraded");
            }
            body["redis"] = json!({
                "connected": redis.connected,
                "reconnects": redis.reconnects,
                "errors": redis.errors,
            });
        }
        let listeners = self.postgres();
        if !listeners.is_empty() {
            body["postgres"] = listeners
                .iter()
                .map(|l| {
                    let st = l.state();
                    json!({
                        "connected": st.connected,
                        "reconnects": st.reconnects,
                        "notifications": st.notifications,
                    })
                })
                .collect();
        }
        Response::json(200, &body).with_header("Cache-Control", "no-store")
    }

    fn postgres(&self) -> &[Listener] {
        self.postgres.get().map_or(&[], Vec::as_slice)
    }

    pub(super) fn metrics(&self) -> Response {
        let s = self.stats.snapshot();
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        metric(
            "ssed_connections_open",
            "gauge",
            "Streams open now.",
            s.streams_open,
        );
        metric(
            "ssed_connections_max",
            "gauge",
            "The stream cap.",
            s.streams_max,
        );
        metric(
            "ssed_stream_thread_writes_total",
            "counter",
            "Writes by streams' own threads; idle streams' sends go out from waker threads.",
            s.thread_writes,
        );
        metric(
            "ssed_connections_rejected_total",
            "counter",
            "Streams and requests refused at a cap.",
            s.rejected_total,
        );
        metric(
            "ssed_events_published_total",
            "counter",
            "Events published.",
            self.hub.published(),
        );
        metric(
            "ssed_frames_sent_total",
            "counter",
            "Event-stream frames written.",
            s.frames_sent,
        );
        metric(
            "ssed_bytes_sent_total",
            "counter",
            "Bytes written on event streams.",
            s.bytes_sent,
        );
        let usage = self.hub.usage();
        metric(
            "ssed_retained_bytes",
            "gauge",
            "Memory held by retained events and waiting mailbox messages, in bytes.",
            usage.history_bytes + usage.mailbox_bytes,
        );
        metric(
            "ssed_retained_bytes_max",
            "gauge",
            "The retained budget (max_retained_bytes), in bytes.",
            usage.max_retained_bytes,
        );
        metric(
            "ssed_retained_evictions_total",
            "counter",
            "Retained events dropped, oldest first, to keep within max_retained_bytes.",
            usage.events_evicted,
        );
        metric(
            "ssed_retained_refusals_total",
            "counter",
            "Mailbox pushes refused (507) because mailboxes held the whole budget.",
            usage.pushes_refused,
        );
        metric(
            "ssed_requests_total",
            "counter",
            "Ordinary requests handled.",
            s.requests_total,
        );
        metric(
            "ssed_request_timeouts_total",
            "counter",
            "Connections cut for not sending their request head or body within request_timeout.",
            s.head_timeouts,
        );
        metric(
            "ssed_request_bodies_cut_total",
            "counter",
            "Connections cut while sending a body, to keep the bodies still arriving within their bound.",
            s.bodies_evicted,
        );
        metric(
            "ssed_pending_connections",
            "gauge",
            "Connections waiting for their request head.",
            s.pending,
        );
        metric(
            "ssed_handler_panics_total",
            "counter",
            "Handler panics caught.",
            s.handler_panics,
        );
        metric(
            "ssed_accept_errors_total",
            "counter",
            "Failed accept calls.",
            s.accept_errors,
        );
        // Read at scrape time, as the status feed reads them each second.
        if let Some(p) = process_usage() {
            metric(
                "ssed_resident_memory_bytes",
                "gauge",
                "Resident memory of the process (VmRSS), in bytes.",
                p.rss_bytes,
            );
            metric(
                "ssed_threads",
                "gauge",
                "Threads of the process: one per open stream, and the server's own.",
                p.threads,
            );
        }
        if let Some((_, not_after)) = self.config.tls.as_ref().and_then(served_validity) {
            metric(
                "ssed_tls_certificate_expiry_timestamp_seconds",
                "gauge",
                "When the TLS certificate served now expires (its notAfter), in seconds since the Unix epoch.",
                not_after.max(0) as u64,
            );
        }
        if let Some(acme) = self.acme.get() {
            metric(
                "ssed_acme_renewal_failures_total",
                "counter",
                "Attempts to obtain or renew the certificate by ACME that failed.",
                acme.failures.load(Relaxed),
            );
            metric(
                "ssed_acme_certificates_obtained_total",
                "counter",
                "Certificates obtained by ACME since start.",
                acme.obtained.load(Relaxed),
            );
        }
        metric(
            "ssed_uptime_seconds",
            "gauge",
            "Seconds since start.",
            self.started.elapsed().as_secs(),
        );
        if let Some(redis) = self.hub.redis_state() {
            metric(
                "ssed_redis_connected",
                "gauge",
                "1 when this node's Redis reader is connected, else 0.",
                u64::from(redis.connected),
            );
            metric(
                "ssed_redis_reconnects_total",
                "counter",
                "Times the Redis reader connected again after a loss.",
                redis.reconnects,
            );
            metric(
                "ssed_redis_errors_total",
                "counter",
                "Failed Redis commands and connects.",
                redis.errors,
            );
        }
        out.push_str("# HELP ssed_disconnects_total Streams ended early, by reason.\n");
        out.push_str("# TYPE ssed_disconnects_total counter\n");
        for reason in EndReason::ALL {
            let _ = writeln!(
                out,
                "ssed_disconnects_total{{reason=\"{}\"}} {}",
                reason.reason(),
                s.disconnects(reason)
            );
        }
        let _ = write!(
            out,
            "# HELP ssed_client_limited_total Requests refused with 429 by a per-client limit: \
             streams past max_streams_per_client, publishes past publish_rate.\n\
             # TYPE ssed_client_limited_total counter\n\
             ssed_client_limited_total{{limit=\"streams\"}} {}\n\
             ssed_client_limited_total{{limit=\"publish_rate\"}} {}\n",
            s.client_limited, s.rate_limited
        );
        let states: Vec<ListenerState> = self.postgres().iter().map(Listener::state).collect();
        if !states.is_empty() {
            let mut series =
                |name: &str, kind: &str, help: &str, value: fn(&ListenerState) -> u64| {
                    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
                    for (db, st) in states.iter().enumerate() {
                        let _ = writeln!(out, "{name}{{db=\"{db}\"}} {}", value(st));
                    }
                };
            series(
                "ssed_postgres_connected",
                "gauge",
                "1 when the LISTEN connection of [[postgres]] table number db is up, else 0.",
                |st| u64::from(st.connected),
            );
            series(
                "ssed_postgres_notifications_total",
                "counter",
                "NOTIFY payloads published to their topic.",
                |st| st.notifications,
            );
            series(
                "ssed_postgres_reconnects_total",
                "counter",
                "Times the LISTEN connection was made again after a loss.",
                |st| st.reconnects,
            );
        }
        // Memory: refusals below the cap, and what is left now (read at
        // scrape time, as the guard reads it).
        let _ = write!(
            out,
            "# HELP ssed_connections_rejected_memory_total Streams refused below the cap \
             because memory headroom was below the floor.\n\
             # TYPE ssed_connections_rejected_memory_total counter\n\
             ssed_connections_rejected_memory_total {}\n",
            s.memory_rejected
        );
        if let Some(m) = crate::memory_info() {
            let _ = write!(
                out,
                "# HELP ssed_memory_available_bytes Memory left: the smaller of MemAvailable \
                 and the memory cgroup's limit less its working set.\n\
                 # TYPE ssed_memory_available_bytes gauge\n\
                 ssed_memory_available_bytes {}\n",
                m.available
            );
        }
        Response::new(200)
            .with_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            .with_body(out)
    }
}
