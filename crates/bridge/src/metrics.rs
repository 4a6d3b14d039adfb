//! The bridge's counters and its `/metrics` endpoint.
//!
//! Plain atomics written in the Prometheus text format by hand: a handful
//! of series do not justify the broker's axum and prometheus stack in a
//! second binary. Names follow the broker's (`fifobus_` prefix, `_total`
//! counters, `direction`/`side` labels) so one dashboard reads both.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
pub struct Way {
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    /// Refused by a full buffer (`--buffer`, `--buffer-bytes`).
    pub dropped_buffer: AtomicU64,
    /// Exports whose delivery to NATS was never confirmed (the connection
    /// dropped before the flush that would have confirmed them); imports
    /// the NATS client had no room for (its slow-consumer events).
    pub dropped_unconfirmed: AtomicU64,
    /// Lines the broker dropped for the bridge (its `DROPPED <n>`).
    pub dropped_broker: AtomicU64,
    /// Messages in the buffer now, and their payload bytes.
    pub buffered: AtomicU64,
    pub buffered_bytes: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    pub export: Way,
    pub import: Way,
    pub reconnects_nats: AtomicU64,
    pub reconnects_bus: AtomicU64,
    /// Imported messages whose origin is this bus (`Fifobus-Origin`), not
    /// published again.
    pub looped: AtomicU64,
    /// Imported subjects that are not fifobus topics.
    pub invalid: AtomicU64,
    pub nats_connected: AtomicU64,
    pub bus_connected: AtomicU64,
    pub buffer_limit_messages: AtomicU64,
    pub buffer_limit_bytes: AtomicU64,
    /// Not a metric: whether the current NATS outage's error was logged.
    pub nats_error_said: std::sync::atomic::AtomicBool,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let ways = [("export", &self.export), ("import", &self.import)];
        let mut family = |name: &str, kind: &str, help: &str, rows: &[(String, u64)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        let per_way = |f: &dyn Fn(&Way) -> u64| -> Vec<(String, u64)> {
            ways.iter()
                .map(|(d, w)| (format!("{{direction=\"{d}\"}}"), f(w)))
                .collect()
        };
        family(
            "fifobus_bridge_messages_total",
            "counter",
            "Messages bridged: export = bus to NATS (confirmed by a flush), import = NATS to bus.",
            &per_way(&|w| w.messages.load(Relaxed)),
        );
        family(
            "fifobus_bridge_bytes_total",
            "counter",
            "Payload bytes of the messages bridged.",
            &per_way(&|w| w.bytes.load(Relaxed)),
        );
        let mut dropped = Vec::new();
        for (d, w) in ways {
            for (reason, v) in [
                ("buffer", &w.dropped_buffer),
                ("unconfirmed", &w.dropped_unconfirmed),
                ("broker", &w.dropped_broker),
            ] {
                dropped.push((
                    format!("{{direction=\"{d}\",reason=\"{reason}\"}}"),
                    v.load(Relaxed),
                ));
            }
        }
        family(
            "fifobus_bridge_dropped_total",
            "counter",
            "Messages lost or possibly lost: buffer = the bound was reached (NATS unreachable or the bus slow), unconfirmed = sent to NATS but the connection dropped before a flush confirmed them (export) or the NATS client had no room (import), broker = the broker's DROPPED for the bridge.",
            &dropped,
        );
        family(
            "fifobus_bridge_reconnects_total",
            "counter",
            "Reconnections after a loss: to NATS, or to a restarted broker (bus).",
            &[
                ("{side=\"nats\"}".into(), self.reconnects_nats.load(Relaxed)),
                ("{side=\"bus\"}".into(), self.reconnects_bus.load(Relaxed)),
            ],
        );
        family(
            "fifobus_bridge_connected",
            "gauge",
            "1 while connected on that side.",
            &[
                ("{side=\"nats\"}".into(), self.nats_connected.load(Relaxed)),
                ("{side=\"bus\"}".into(), self.bus_connected.load(Relaxed)),
            ],
        );
        family(
            "fifobus_bridge_buffered_messages",
            "gauge",
            "Messages waiting in the bridge's buffer.",
            &per_way(&|w| w.buffered.load(Relaxed)),
        );
        family(
            "fifobus_bridge_buffered_bytes",
            "gauge",
            "Payload bytes waiting in the bridge's buffer.",
            &per_way(&|w| w.buffered_bytes.load(Relaxed)),
        );
        family(
            "fifobus_bridge_buffer_limit_messages",
            "gauge",
            "--buffer: the bound of each direction's buffer, in messages.",
            &[(String::new(), self.buffer_limit_messages.load(Relaxed))],
        );
        family(
            "fifobus_bridge_buffer_limit_bytes",
            "gauge",
            "--buffer-bytes: the bound of each direction's buffer, in payload bytes.",
            &[(String::new(), self.buffer_limit_bytes.load(Relaxed))],
        );
        family(
            "fifobus_bridge_looped_total",
            "counter",
            "Imported messages that came from this bus (Fifobus-Origin), not published again.",
            &[(String::new(), self.looped.load(Relaxed))],
        );
        family(
            "fifobus_bridge_invalid_subjects_total",
            "counter",
            "Imported messages whose subject is not a fifobus topic, not published.",
            &[(String::new(), self.invalid.load(Relaxed))],
        );
        s
    }
}

/// Serves `/metrics` (and `/healthz`) on `listener` until the process ends.
/// HTTP/1.0-style: one request per connection, answered and closed.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            };
            let complete =
                tokio::time::timeout(std::time::Duration::from_secs(5), read).await == Ok(true);
            if !complete {
                return;
            }
            let path = buf
                .split(|&b| b == b' ')
                .nth(1)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            let (status, body, kind) = match path.as_str() {
                "/metrics" => (
                    "200 OK",
                    metrics.render(),
                    "text/plain; version=0.0.4; charset=utf-8",
                ),
                "/healthz" => ("200 OK", "ok\n".to_owned(), "text/plain"),
                _ => (
                    "404 Not Found",
                    "not found: try /metrics\n".to_owned(),
                    "text/plain",
                ),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
