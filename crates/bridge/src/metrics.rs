//! The bridge's counters and its `/metrics` endpoint.
//!
//! The bus thread and the NATS tasks count into plain atomics ([`Metrics`]):
//! counting stays a `fetch_add` on the message path and never waits for a
//! scrape. At scrape time `Exporter`, a prometheus `Collector` like the
//! broker's (src/metrics.rs), reads them into metric families and the
//! prometheus crate's `TextEncoder` writes the exposition; axum serves it,
//! as src/http.rs does for the broker. Both crates are the broker's, already
//! built in this workspace, so the bridge adds no dependency and neither
//! escaping nor HTTP parsing is ours to get right.
//!
//! Names follow the broker's (`fifobus_` prefix, `_total` counters,
//! `direction`/`side` labels) so one dashboard reads both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::Registry;

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

/// Name, help, type and labels of every family [`Exporter`] builds, in the
/// order it builds them: the single list `desc()` and `collect()` share.
const FAMILIES: &[(&str, &str, MetricType, &[&str])] = &[
    ("fifobus_bridge_messages_total", "Messages bridged: export = bus to NATS (confirmed by a flush), import = NATS to bus.", MetricType::COUNTER, &["direction"]),
    ("fifobus_bridge_bytes_total", "Payload bytes of the messages bridged.", MetricType::COUNTER, &["direction"]),
    ("fifobus_bridge_dropped_total", "Messages lost or possibly lost: buffer = the bound was reached (NATS unreachable or the bus slow), unconfirmed = sent to NATS but the connection dropped before a flush confirmed them (export) or the NATS client had no room (import), broker = the broker's DROPPED for the bridge.", MetricType::COUNTER, &["direction", "reason"]),
    ("fifobus_bridge_reconnects_total", "Reconnections after a loss: to NATS, or to a restarted broker (bus).", MetricType::COUNTER, &["side"]),
    ("fifobus_bridge_connected", "1 while connected on that side.", MetricType::GAUGE, &["side"]),
    ("fifobus_bridge_buffered_messages", "Messages waiting in the bridge's buffer.", MetricType::GAUGE, &["direction"]),
    ("fifobus_bridge_buffered_bytes", "Payload bytes waiting in the bridge's buffer.", MetricType::GAUGE, &["direction"]),
    ("fifobus_bridge_buffer_limit_messages", "--buffer: the bound of each direction's buffer, in messages.", MetricType::GAUGE, &[]),
    ("fifobus_bridge_buffer_limit_bytes", "--buffer-bytes: the bound of each direction's buffer, in payload bytes.", MetricType::GAUGE, &[]),
    ("fifobus_bridge_looped_total", "Imported messages that came from this bus (Fifobus-Origin), not published again.", MetricType::COUNTER, &[]),
    ("fifobus_bridge_invalid_subjects_total", "Imported messages whose subject is not a fifobus topic, not published.", MetricType::COUNTER, &[]),
];

/// Reads [`Metrics`] into metric families when Prometheus scrapes.
struct Exporter {
    metrics: Arc<Metrics>,
    descs: Vec<Desc>,
}

impl Exporter {
    fn new(metrics: Arc<Metrics>) -> Self {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, labels)| {
                let labels = labels.iter().map(|l| l.to_string()).collect();
                Desc::new(name.to_string(), help.to_string(), labels, HashMap::new())
                    .expect("valid metric")
            })
            .collect();
        Exporter { metrics, descs }
    }
}

/// One family being filled: samples are appended with [`Family::add`].
struct Family {
    labels: &'static [&'static str],
    mf: MetricFamily,
}

impl Family {
    fn new(
        &(name, help, kind, labels): &'static (&str, &str, MetricType, &'static [&'static str]),
    ) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_owned());
        mf.set_help(help.to_owned());
        mf.set_field_type(kind);
        Family { labels, mf }
    }

    /// A sample whose label values are `values`, in the family's label order.
    fn add(&mut self, values: &[&str], value: &AtomicU64) {
        debug_assert_eq!(values.len(), self.labels.len());
        let value = value.load(Relaxed) as f64;
        let mut m = proto::Metric::default();
        m.set_label(
            self.labels
                .iter()
                .zip(values)
                .map(|(name, v)| {
                    let mut pair = proto::LabelPair::default();
                    pair.set_name((*name).to_owned());
                    pair.set_value((*v).to_owned());
                    pair
                })
                .collect(),
        );
        if self.mf.get_field_type() == MetricType::COUNTER {
            let mut c = proto::Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = proto::Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        self.mf.mut_metric().push(m);
    }
}

impl Collector for Exporter {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let m = &self.metrics;
        let mut f: Vec<Family> = FAMILIES.iter().map(Family::new).collect();
        for (d, w) in [("export", &m.export), ("import", &m.import)] {
            f[0].add(&[d], &w.messages);
            f[1].add(&[d], &w.bytes);
            f[2].add(&[d, "buffer"], &w.dropped_buffer);
            f[2].add(&[d, "unconfirmed"], &w.dropped_unconfirmed);
            f[2].add(&[d, "broker"], &w.dropped_broker);
            f[5].add(&[d], &w.buffered);
            f[6].add(&[d], &w.buffered_bytes);
        }
        for (side, reconnects, connected) in [
            ("nats", &m.reconnects_nats, &m.nats_connected),
            ("bus", &m.reconnects_bus, &m.bus_connected),
        ] {
            f[3].add(&[side], reconnects);
            f[4].add(&[side], connected);
        }
        f[7].add(&[], &m.buffer_limit_messages);
        f[8].add(&[], &m.buffer_limit_bytes);
        f[9].add(&[], &m.looped);
        f[10].add(&[], &m.invalid);
        f.into_iter().map(|f| f.mf).collect()
    }
}

/// Serves `/metrics` (and `/healthz`) on `listener` until the process ends.
///
/// Every response says `Connection: close`, so hyper closes the connection
/// after it: one request per connection, as before axum, which lets a
/// client read the answer to its end (`nc`, a shell's `/dev/tcp`) and keeps
/// no idle scraper connections open.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    let registry = Registry::new();
    registry
        .register(Box::new(Exporter::new(metrics)))
        .expect("unique metric");
    let app = Router::new()
        .route("/metrics", get(move || async move { encode(&registry) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: try /metrics\n") })
        .layer(axum::middleware::map_response(
            |mut r: Response| async move {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                r
            },
        ));
    if let Err(e) = axum::serve(listener, app).await {
        crate::log(format_args!(
            "the metrics endpoint failed: {e}; restart the bridge to serve /metrics again"
        ));
    }
}

fn encode(registry: &Registry) -> Response {
    use prometheus::Encoder;
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding cannot fail");
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
