//! Prometheus metrics: one [`Metrics`] value, shared by every part of the
//! broker, read by `/metrics` and `fifobus stats`.
//!
//! Counting stays off the per-message cost as far as possible:
//! - label handles are resolved once per topic ([`TopicMetrics`], kept by
//!   the router beside its match cache), once per client and once per error
//!   code, never per message: a count is one uncontended atomic increment;
//! - writers observe the latency histogram locally and flush it once per
//!   batch;
//! - backlogs are not counted at all: they are read from the live outboxes
//!   when Prometheus scrapes (`BacklogCollector`).
//!
//! Cardinality is bounded: the first `--metrics-topic-limit` topics and
//! `--metrics-client-limit` client labels get their own series; the rest are
//! summed into one series labelled `_other`, and
//! `fifobus_metrics_series_folded_total` counts the folds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::router::{ClientKey, Outbox};

/// The label of the series that sums everything over a cardinality cap.
pub const OTHER: &str = "_other";

#[derive(Debug, Clone, Copy)]
pub struct MetricsLimits {
    pub topics: usize,
    pub clients: usize,
}

impl Default for MetricsLimits {
    fn default() -> Self {
        MetricsLimits {
            topics: 1000,
            clients: 1000,
        }
    }
}

/// Why messages were discarded; the `reason` label of
/// `fifobus_messages_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Backlog full, oldest discarded (`--overflow drop-oldest`).
    BacklogOldest,
    /// Backlog full, newest discarded (`--overflow drop-newest`).
    BacklogNewest,
    /// Backlog full, client ended with its backlog (`--overflow disconnect`).
    SlowConsumer,
    /// Queued for a client that went away (pid exited, directory removed).
    ClientGone,
}

impl DropReason {
    const ALL: [DropReason; 4] = [
        DropReason::BacklogOldest,
        DropReason::BacklogNewest,
        DropReason::SlowConsumer,
        DropReason::ClientGone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BacklogOldest => "backlog-drop-oldest",
            DropReason::BacklogNewest => "backlog-drop-newest",
            DropReason::SlowConsumer => "slow-consumer",
            DropReason::ClientGone => "client-gone",
        }
    }
}

/// Counter handles for one topic (or for `_other`).
#[derive(Clone)]
pub struct TopicMetrics {
    pub published: IntCounter,
    pub published_bytes: IntCounter,
    pub delivered: IntCounter,
    pub delivered_bytes: IntCounter,
}

pub struct Metrics {
    registry: Registry,
    limits: MetricsLimits,
    published: IntCounterVec,
    published_bytes: IntCounterVec,
    delivered: IntCounterVec,
    delivered_bytes: IntCounterVec,
    other_topic: TopicMetrics,
    topics_with_series: Mutex<usize>,
    pub unrouted: IntCounter,
    dropped: IntCounterVec,
    pub subscriptions: IntGauge,
    pub topics: IntGauge,
    pub handshakes_accepted: IntCounter,
    handshakes_rejected: IntCounterVec,
    /// One handle per error code, resolved up front: a client flooding bad
    /// lines costs an atomic increment per line, not a label lookup.
    protocol_errors: Vec<IntCounter>,
    pub latency: Histogram,
    folded: IntCounterVec,
    clients: Arc<ClientTable>,
}

/// Live clients, for the scrape-time backlog figures.
#[derive(Default)]
struct ClientTable {
    /// Live clients: (series label, folded into `_other`?, outbox).
    clients: DashMap<ClientKey, (String, bool, Arc<Outbox>)>,
    /// Labels that have their own series (bounded by the client limit).
    /// Labels that have their own series (bounded by the client limit), and
    /// how many live clients use each.
    labelled: Mutex<HashMap<String, usize>>,
}

impl ClientTable {
    fn labels(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.labelled.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(v.clone())).expect("unique metric");
    v
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    pub fn new(limits: MetricsLimits) -> Arc<Metrics> {
        let r = Registry::new();
        let published = counter_vec(
            &r,
            "fifobus_messages_published_total",
            "Messages published, by topic.",
            &["topic"],
        );
        let published_bytes = counter_vec(
            &r,
            "fifobus_published_bytes_total",
            "Payload bytes published, by topic.",
            &["topic"],
        );
        let delivered = counter_vec(
            &r,
            "fifobus_messages_delivered_total",
            "Messages queued for a subscriber (one per subscriber), by topic.",
            &["topic"],
        );
        let delivered_bytes = counter_vec(
            &r,
            "fifobus_delivered_bytes_total",
            "Payload bytes queued for subscribers, by topic.",
            &["topic"],
        );
        let other_topic = TopicMetrics {
            published: published.with_label_values(&[OTHER]),
            published_bytes: published_bytes.with_label_values(&[OTHER]),
            delivered: delivered.with_label_values(&[OTHER]),
            delivered_bytes: delivered_bytes.with_label_values(&[OTHER]),
        };
        let dropped = counter_vec(&r, "fifobus_messages_dropped_total", "Lines discarded instead of delivered, by reason (every one is also reported to its client as DROPPED <n>, except client-gone).", &["reason"]);
        for reason in DropReason::ALL {
            dropped.with_label_values(&[reason.as_str()]);
        }
        let handshakes_rejected = counter_vec(
            &r,
            "fifobus_handshakes_rejected_total",
            "HELLOs refused or abandoned, by reason.",
            &["reason"],
        );
        let protocol_errors = counter_vec(
            &r,
            "fifobus_protocol_errors_total",
            "Client lines answered with ERR, by kind.",
            &["kind"],
        );
        let folded = counter_vec(&r, "fifobus_metrics_series_folded_total", "Times a topic or client was put under the _other label because its kind reached the series limit (a folded topic counts again each time the router's topic cache is rebuilt after interest changes).", &["kind"]);
        for kind in ["topic", "client"] {
            folded.with_label_values(&[kind]);
        }
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "fifobus_delivery_latency_seconds",
                "Time from reading a PUB on the publisher's send FIFO to writing the MSG into a subscriber's recv FIFO.",
            )
            .buckets(prometheus::exponential_buckets(5e-6, 2.5, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        r.register(Box::new(latency.clone()))
            .expect("unique metric");
        let clients = Arc::new(ClientTable::default());
        r.register(Box::new(BacklogCollector::new(clients.clone())))
            .expect("unique metric");
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("unique metric");
        Arc::new(Metrics {
            limits,
            unrouted: counter(&r, "fifobus_messages_unrouted_total", "Messages published to a topic nobody was subscribed to."),
            subscriptions: gauge(&r, "fifobus_subscriptions", "Subscriptions (pattern, client pairs) in force."),
            topics: gauge(&r, "fifobus_topics", "Distinct topics published to since start that have their own series (at most --metrics-topic-limit)."),
            handshakes_accepted: counter(&r, "fifobus_handshakes_accepted_total", "HELLOs answered with WELCOME."),
            published,
            published_bytes,
            delivered,
            delivered_bytes,
            other_topic,
            topics_with_series: Mutex::new(0),
            dropped,
            handshakes_rejected,
            protocol_errors: crate::protocol::ErrorCode::ALL
                .iter()
                .map(|c| protocol_errors.with_label_values(&[c.as_str()]))
                .collect(),
            latency,
            folded,
            clients,
            registry: r,
        })
    }

    /// Handles for a topic seen for the first time (the router keeps them),
    /// or `None` once the topic limit is reached: the topic is folded into
    /// [`Metrics::other_topic`].
    pub fn topic(&self, topic: &str) -> Option<TopicMetrics> {
        let mut n = self
            .topics_with_series
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *n >= self.limits.topics {
            self.folded.with_label_values(&["topic"]).inc();
            return None;
        }
        *n += 1;
        self.topics.set(*n as i64);
        Some(TopicMetrics {
            published: self.published.with_label_values(&[topic]),
            published_bytes: self.published_bytes.with_label_values(&[topic]),
            delivered: self.delivered.with_label_values(&[topic]),
            delivered_bytes: self.delivered_bytes.with_label_values(&[topic]),
        })
    }

    /// The shared handles of the `_other` topic series.
    pub fn other_topic(&self) -> TopicMetrics {
        self.other_topic.clone()
    }

    pub fn dropped(&self, reason: DropReason) -> IntCounter {
        self.dropped.with_label_values(&[reason.as_str()])
    }

    pub fn handshake_rejected(&self, reason: &str) {
        self.handshakes_rejected.with_label_values(&[reason]).inc();
    }

    pub fn protocol_error(&self, code: crate::protocol::ErrorCode) {
        self.protocol_errors[code.index()].inc();
    }

    /// Registers a live client under `label` (its `name=`, else its uuid),
    /// or under `_other` once the client limit is reached.
    pub fn client_joined(&self, key: ClientKey, label: &str, outbox: Arc<Outbox>) {
        let mut labelled = self.clients.labels();
        let own = labelled.contains_key(label) || labelled.len() < self.limits.clients;
        let label = if own {
            *labelled.entry(label.to_owned()).or_default() += 1;
            label.to_owned()
        } else {
            self.folded.with_label_values(&["client"]).inc();
            OTHER.to_owned()
        };
        drop(labelled);
        // Remember whether it was folded: a client may also be *named* _other.
        self.clients.clients.insert(key, (label, !own, outbox));
    }

    pub fn client_left(&self, key: ClientKey) {
        if let Some((_, (label, folded, _))) = self.clients.clients.remove(&key) {
            if folded {
                return;
            }
            // Free the label's slot once no live client uses it.
            let mut labelled = self.clients.labels();
            if let Some(n) = labelled.get_mut(&label) {
                *n -= 1;
                if *n == 0 {
                    labelled.remove(&label);
                }
            }
        }
    }

    /// The text exposition format, for `/metrics`.
    pub fn encode(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// Per-client and total backlog, and the client count, read from the live
/// outboxes at scrape time.
struct BacklogCollector {
    table: Arc<ClientTable>,
    per_client_messages: IntGaugeVec,
    per_client_bytes: IntGaugeVec,
    total_messages: IntGauge,
    total_bytes: IntGauge,
    clients: IntGauge,
    descs: Vec<Desc>,
    /// Scrapes may overlap; the gauges are reset and refilled under this.
    scrape: Mutex<()>,
}

impl BacklogCollector {
    fn new(table: Arc<ClientTable>) -> Self {
        const NOTE: &str = " Counts lines waiting in the broker; up to one pipe buffer more may sit in the recv FIFO itself.";
        let per_client_messages = IntGaugeVec::new(
            Opts::new(
                "fifobus_client_backlog_messages",
                format!("Lines queued for a client, by client.{NOTE}"),
            ),
            &["client"],
        )
        .expect("valid metric");
        let per_client_bytes = IntGaugeVec::new(
            Opts::new(
                "fifobus_client_backlog_bytes",
                format!("Bytes queued for a client, by client.{NOTE}"),
            ),
            &["client"],
        )
        .expect("valid metric");
        let total_messages = IntGauge::new(
            "fifobus_backlog_messages",
            format!("Lines queued for all clients.{NOTE}"),
        )
        .expect("valid metric");
        let total_bytes = IntGauge::new(
            "fifobus_backlog_bytes",
            format!("Bytes queued for all clients.{NOTE}"),
        )
        .expect("valid metric");
        let clients = IntGauge::new("fifobus_clients", "Clients connected.").expect("valid metric");
        let descs = [
            per_client_messages.desc(),
            per_client_bytes.desc(),
            total_messages.desc(),
            total_bytes.desc(),
            clients.desc(),
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        BacklogCollector {
            table,
            per_client_messages,
            per_client_bytes,
            total_messages,
            total_bytes,
            clients,
            descs,
            scrape: Mutex::new(()),
        }
    }
}

impl Collector for BacklogCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let mut per_label: HashMap<String, (usize, usize)> = HashMap::new();
        let (mut msgs, mut bytes) = (0, 0);
        for entry in self.table.clients.iter() {
            let (label, _, outbox) = entry.value();
            let (m, b) = outbox.backlog();
            let sum = per_label.entry(label.clone()).or_default();
            sum.0 += m;
            sum.1 += b;
            msgs += m;
            bytes += b;
        }
        self.per_client_messages.reset();
        self.per_client_bytes.reset();
        for (label, (m, b)) in &per_label {
            self.per_client_messages
                .with_label_values(&[label])
                .set(*m as i64);
            self.per_client_bytes
                .with_label_values(&[label])
                .set(*b as i64);
        }
        self.total_messages.set(msgs as i64);
        self.total_bytes.set(bytes as i64);
        self.clients.set(self.table.clients.len() as i64);
        let mut families = self.per_client_messages.collect();
        families.extend(self.per_client_bytes.collect());
        families.extend(self.total_messages.collect());
        families.extend(self.total_bytes.collect());
        families.extend(self.clients.collect());
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::BacklogLimits;

    #[test]
    fn topics_over_the_limit_fold_into_other() {
        let m = Metrics::new(MetricsLimits {
            topics: 2,
            clients: 1,
        });
        for t in ["a", "b", "c", "d"] {
            m.topic(t)
                .unwrap_or_else(|| m.other_topic())
                .published
                .inc();
        }
        let text = m.encode();
        assert!(text.contains(r#"fifobus_messages_published_total{topic="a"} 1"#));
        assert!(text.contains(r#"fifobus_messages_published_total{topic="_other"} 2"#));
        assert!(!text.contains(r#"topic="c""#));
        assert!(text.contains(r#"fifobus_metrics_series_folded_total{kind="topic"} 2"#));
        assert!(text.contains("fifobus_topics 2"));
    }

    #[test]
    fn a_client_named_other_keeps_its_slot_when_a_folded_client_leaves() {
        let m = Metrics::new(MetricsLimits {
            topics: 1,
            clients: 1,
        });
        let o = || Arc::new(Outbox::new(BacklogLimits::default()));
        m.client_joined(1, OTHER, o());
        m.client_joined(2, "bob", o()); // folded
        m.client_left(2);
        m.client_joined(3, "carol", o()); // still folded: the one slot is taken
        let text = m.encode();
        assert!(!text.contains(r#"client="carol""#), "{text}");
    }

    #[test]
    fn unrouted_counts_only_messages_nobody_subscribed_to() {
        use crate::router::{OverflowPolicy, RouterCore};
        let m = Metrics::new(MetricsLimits::default());
        let mut core = RouterCore::with_metrics(m.clone(), OverflowPolicy::DropNewest);
        let full = Arc::new(Outbox::new(BacklogLimits {
            messages: 1,
            bytes: 1 << 20,
            policy: OverflowPolicy::DropNewest,
        }));
        core.attach(1, full, vec!["t".parse().unwrap()]);
        let now = std::time::Instant::now();
        for topic in ["t", "t", "nobody"] {
            core.publish(
                &topic.parse().unwrap(),
                &bytes::Bytes::from_static(b"x"),
                now,
            );
        }
        let text = m.encode();
        assert!(text.contains("fifobus_messages_unrouted_total 1"), "{text}");
        assert!(text.contains(r#"fifobus_messages_dropped_total{reason="backlog-drop-newest"} 1"#));
    }

    #[test]
    fn backlog_is_read_at_scrape_time_and_clients_fold() {
        let m = Metrics::new(MetricsLimits {
            topics: 1,
            clients: 1,
        });
        let a = Arc::new(Outbox::new(BacklogLimits::default()));
        let b = Arc::new(Outbox::new(BacklogLimits::default()));
        a.push(bytes::Bytes::from_static(b"MSG t x\n"));
        b.push(bytes::Bytes::from_static(b"MSG t y\n"));
        b.push(bytes::Bytes::from_static(b"MSG t z\n"));
        m.client_joined(1, "alice", a);
        m.client_joined(2, "bob", b);
        let text = m.encode();
        assert!(
            text.contains(r#"fifobus_client_backlog_messages{client="alice"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"fifobus_client_backlog_messages{client="_other"} 2"#));
        assert!(text.contains("fifobus_backlog_messages 3"));
        assert!(text.contains("fifobus_backlog_bytes 24"));
        assert!(text.contains("fifobus_clients 2"));
        m.client_left(2);
        let text = m.encode();
        assert!(
            !text.contains(r#"client="_other""#),
            "a departed client's series goes"
        );
        assert!(text.contains("fifobus_clients 1"));
    }
}
