//! Prometheus exposition of what the broker counts, built at scrape time.
//!
//! Nothing here is on the message path: the router, sessions and
//! rendezvous count into [`Counters`] (plain atomics), and the live clients
//! are in the [`Registry`]. When Prometheus scrapes, `Exporter` reads
//! both and builds the metric families, so backlogs and client counts are
//! exact at that moment and counting never depends on serving.
//!
//! Cardinality is bounded where the names come from ([`Counters::topic`],
//! [`Registry::insert`]): the first `--metrics-topic-limit` topics and
//! `--metrics-client-limit` client labels get their own series; the rest
//! are summed into one series labelled `_other`, and
//! `fifobus_metrics_series_folded_total` counts the folds.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::Registry as PromRegistry;

use crate::counters::{Counters, DropReason, Rejection, LATENCY_BUCKETS};
use crate::protocol::ErrorCode;
use crate::registry::Registry;

pub use crate::counters::OTHER;

pub struct Metrics {
    registry: PromRegistry,
}

impl Metrics {
    /// Metrics over `counters` and the live `clients`, plus the process's
    /// own figures (CPU, memory, descriptors).
    pub fn new(counters: Arc<Counters>, clients: Arc<Registry>) -> Arc<Metrics> {
        let registry = PromRegistry::new();
        registry
            .register(Box::new(Exporter::new(counters, clients)))
            .expect("unique metric");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        Arc::new(Metrics { registry })
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

/// Reads [`Counters`] and the [`Registry`] into metric families.
struct Exporter {
    counters: Arc<Counters>,
    clients: Arc<Registry>,
    descs: Vec<Desc>,
    /// Scrapes may overlap; each builds its families under this.
    scrape: Mutex<()>,
}

/// Name, help, type and label of every family the exporter builds, in the
/// order it builds them: the single list that `desc()` and `collect()` share.
const FAMILIES: &[(&str, &str, MetricType, Option<&str>)] = &[
    ("fifobus_messages_published_total", "Messages published, by topic.", MetricType::COUNTER, Some("topic")),
    ("fifobus_published_bytes_total", "Payload bytes published, by topic.", MetricType::COUNTER, Some("topic")),
    ("fifobus_messages_delivered_total", "Messages queued for a subscriber (one per subscriber), by topic.", MetricType::COUNTER, Some("topic")),
    ("fifobus_delivered_bytes_total", "Payload bytes queued for subscribers, by topic.", MetricType::COUNTER, Some("topic")),
    ("fifobus_messages_unrouted_total", "Messages published to a topic nobody was subscribed to.", MetricType::COUNTER, None),
    ("fifobus_messages_dropped_total", "Lines discarded instead of delivered, by reason (every one is also reported to its client as DROPPED <n>, except client-gone).", MetricType::COUNTER, Some("reason")),
    ("fifobus_subscriptions", "Subscriptions (pattern, client pairs, and queue-group memberships) in force.", MetricType::GAUGE, None),
    ("fifobus_topics", "Distinct topics published to since start that have their own series (at most --metrics-topic-limit).", MetricType::GAUGE, None),
    ("fifobus_handshakes_accepted_total", "HELLOs answered with WELCOME.", MetricType::COUNTER, None),
    ("fifobus_handshakes_rejected_total", "HELLOs refused or abandoned, by reason.", MetricType::COUNTER, Some("reason")),
    ("fifobus_protocol_errors_total", "Client lines answered with ERR, by kind.", MetricType::COUNTER, Some("kind")),
    ("fifobus_metrics_series_folded_total", "Times a topic or client was put under the _other label because its kind reached the series limit (a folded topic counts again each time the router's topic cache is rebuilt after interest changes).", MetricType::COUNTER, Some("kind")),
    ("fifobus_delivery_latency_seconds", "Time from reading a PUB on the publisher's send FIFO to writing the MSG into a subscriber's recv FIFO.", MetricType::HISTOGRAM, None),
    ("fifobus_client_backlog_messages", "Lines queued for a client, by client. Counts lines waiting in the broker; up to one pipe buffer more may sit in the recv FIFO itself.", MetricType::GAUGE, Some("client")),
    ("fifobus_client_backlog_bytes", "Bytes queued for a client, by client. Counts lines waiting in the broker; up to one pipe buffer more may sit in the recv FIFO itself.", MetricType::GAUGE, Some("client")),
    ("fifobus_backlog_messages", "Lines queued for all clients. Counts lines waiting in the broker; up to one pipe buffer more may sit in the recv FIFO itself.", MetricType::GAUGE, None),
    ("fifobus_backlog_bytes", "Bytes queued for all clients. Counts lines waiting in the broker; up to one pipe buffer more may sit in the recv FIFO itself.", MetricType::GAUGE, None),
    ("fifobus_clients", "Clients connected.", MetricType::GAUGE, None),
    ("fifobus_memory_held_bytes", "Bytes all clients hold in the broker against --max-memory: backlogs (with a per-line overhead), batches being written, partial lines, subscriptions (about 400 bytes each).", MetricType::GAUGE, None),
    ("fifobus_memory_limit_bytes", "The broker-wide memory budget (--max-memory).", MetricType::GAUGE, None),
    ("fifobus_state_write_errors_total", "Client state files (<bus>/state/) that could not be written; such clients would not survive a crash until a retry succeeds.", MetricType::COUNTER, None),
    ("fifobus_retained_messages", "Topics with a retained message (at most --max-retained).", MetricType::GAUGE, None),
    ("fifobus_retained_bytes", "Bytes retained messages take (at most --max-retained-bytes; also held against --max-memory).", MetricType::GAUGE, None),
    ("fifobus_lossless_stalls_total", "Times the broker stopped reading a publisher because its messages filled a lossless subscriber's backlog.", MetricType::COUNTER, None),
    ("fifobus_publishers_stalled", "Clients whose send FIFO the broker is not reading now, until a lossless subscriber they filled drains.", MetricType::GAUGE, None),
    ("fifobus_client_lossless_full", "1 for a lossless subscriber whose backlog is full now: it holds up the publishers of its topics. By client.", MetricType::GAUGE, Some("client")),
];

impl Exporter {
    fn new(counters: Arc<Counters>, clients: Arc<Registry>) -> Self {
        let descs = FAMILIES
            .iter()
            .map(|(name, help, _, label)| {
                let labels = label.iter().map(|l| l.to_string()).collect();
                Desc::new(name.to_string(), help.to_string(), labels, HashMap::new())
                    .expect("valid metric")
            })
            .collect();
        Exporter {
            counters,
            clients,
            descs,
            scrape: Mutex::new(()),
        }
    }
}

/// One family being filled: samples are appended with [`Family::add`].
struct Family<'a> {
    label: Option<&'a str>,
    mf: MetricFamily,
}

impl<'a> Family<'a> {
    fn new(&(name, help, kind, label): &'a (&str, &str, MetricType, Option<&str>)) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_owned());
        mf.set_help(help.to_owned());
        mf.set_field_type(kind);
        Family { label, mf }
    }

    /// A sample, labelled with `value_of_label` when the family has a label.
    fn add(&mut self, value_of_label: Option<&str>, value: u64) {
        let mut m = proto::Metric::default();
        if let (Some(name), Some(v)) = (self.label, value_of_label) {
            let mut pair = proto::LabelPair::default();
            pair.set_name(name.to_owned());
            pair.set_value(v.to_owned());
            m.set_label(vec![pair]);
        }
        if self.mf.get_field_type() == MetricType::COUNTER {
            let mut c = proto::Counter::default();
            c.set_value(value as f64);
            m.set_counter(c);
        } else {
            let mut g = proto::Gauge::default();
            g.set_value(value as f64);
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
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let c = &self.counters;
        let mut f: Vec<Family> = FAMILIES.iter().map(Family::new).collect();
        c.for_each_topic(|topic, t| {
            f[0].add(Some(topic), t.published.load(Relaxed));
            f[1].add(Some(topic), t.published_bytes.load(Relaxed));
            f[2].add(Some(topic), t.delivered.load(Relaxed));
            f[3].add(Some(topic), t.delivered_bytes.load(Relaxed));
        });
        f[4].add(None, c.unrouted.load(Relaxed));
        for r in DropReason::ALL {
            f[5].add(Some(r.as_str()), c.dropped_total(r));
        }
        f[6].add(None, c.subscriptions.load(Relaxed));
        f[7].add(None, c.topic_count() as u64);
        f[8].add(None, c.handshakes_accepted.load(Relaxed));
        for r in Rejection::all() {
            f[9].add(Some(r.as_str()), c.handshakes_rejected(r));
        }
        for code in ErrorCode::ALL {
            f[10].add(Some(code.as_str()), c.protocol_errors(code));
        }
        f[11].add(Some("topic"), c.folded_topics.load(Relaxed));
        f[11].add(Some("client"), c.folded_clients.load(Relaxed));
        f[12].mf.mut_metric().push(latency(c));
        self.backlogs(&mut f[13..18]);
        f[18].add(None, c.memory.held() as u64);
        f[19].add(None, c.memory.limit().min(u64::MAX as usize) as u64);
        f[20].add(None, c.state_write_errors.load(Relaxed));
        f[21].add(None, c.retained_messages.load(Relaxed));
        f[22].add(None, c.retained_bytes.load(Relaxed));
        f[23].add(None, c.lossless_stalls.load(Relaxed));
        self.stalls(&mut f[24..26]);
        f.into_iter()
            .map(|f| f.mf)
            .filter(|mf| !mf.get_metric().is_empty())
            .collect()
    }
}

impl Exporter {
    /// Publishers stalled now, and the lossless subscribers holding them up.
    fn stalls(&self, f: &mut [Family]) {
        let mut stalled = 0;
        let mut full: HashMap<String, u64> = HashMap::new();
        self.clients.for_each(|client| {
            stalled += u64::from(client.outbox.is_stalled());
            if client.outbox.is_lossless() {
                *full.entry(client.series.clone()).or_default() +=
                    u64::from(client.outbox.is_lossless_full());
            }
        });
        f[0].add(None, stalled);
        for (label, n) in &full {
            f[1].add(Some(label), *n);
        }
    }

    /// Per-client (by series label) and total backlog, and the client
    /// count, read from the live outboxes now.
    fn backlogs(&self, f: &mut [Family]) {
        let mut per_label: HashMap<String, (usize, usize)> = HashMap::new();
        let (mut msgs, mut bytes, mut clients) = (0, 0, 0);
        self.clients.for_each(|client| {
            let (m, b) = client.outbox.backlog();
            let sum = per_label.entry(client.series.clone()).or_default();
            sum.0 += m;
            sum.1 += b;
            msgs += m;
            bytes += b;
            clients += 1;
        });
        for (label, (m, b)) in &per_label {
            f[0].add(Some(label), *m as u64);
            f[1].add(Some(label), *b as u64);
        }
        f[2].add(None, msgs as u64);
        f[3].add(None, bytes as u64);
        f[4].add(None, clients);
    }
}

fn latency(c: &Counters) -> proto::Metric {
    let snap = c.latency.snapshot();
    let mut h = proto::Histogram::default();
    h.set_sample_count(snap.count);
    h.set_sample_sum(snap.sum_seconds);
    h.set_bucket(
        LATENCY_BUCKETS
            .iter()
            .zip(&snap.cumulative)
            .map(|(&upper, &n)| {
                let mut b = proto::Bucket::default();
                b.set_upper_bound(upper);
                b.set_cumulative_count(n);
                b
            })
            .collect(),
    );
    let mut m = proto::Metric::default();
    m.set_histogram(h);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode;
    use crate::router::{BacklogLimits, Outbox, OverflowPolicy, RouterCore};
    use std::path::PathBuf;

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(BacklogLimits::default()))
    }

    fn setup(topics: usize, clients: usize) -> (Arc<Counters>, Arc<Registry>, Arc<Metrics>) {
        let c = Counters::new(topics);
        let r = Registry::new(100, clients, c.clone());
        let m = Metrics::new(c.clone(), r.clone());
        (c, r, m)
    }

    #[test]
    fn topics_over_the_limit_fold_into_other() {
        let (c, _, m) = setup(2, 1);
        for t in ["a", "b", "c", "d"] {
            c.topic(t)
                .unwrap_or_else(|| c.other_topic())
                .published
                .fetch_add(1, Relaxed);
        }
        let text = m.encode();
        assert!(text.contains(r#"fifobus_messages_published_total{topic="a"} 1"#));
        assert!(text.contains(r#"fifobus_messages_published_total{topic="_other"} 2"#));
        assert!(!text.contains(r#"topic="c""#));
        assert!(text.contains(r#"fifobus_metrics_series_folded_total{kind="topic"} 2"#));
        assert!(text.contains("fifobus_topics 2"));
    }

    fn no_fifos(n: u64) -> [crate::fifo::FileId; 2] {
        [0, 1].map(|i| crate::fifo::FileId {
            dev: 0,
            ino: 2 * n + i,
        })
    }

    #[test]
    fn with_labels_off_no_name_is_exported_and_the_totals_remain() {
        let c = Counters::without_topic_labels();
        let r = Registry::without_client_labels(100, c.clone());
        let m = Metrics::new(c.clone(), r.clone());
        let mut core = RouterCore::new(c);
        let sub = outbox();
        core.attach(1, sub.clone(), vec!["secret.>".parse().unwrap()]);
        r.insert(
            1,
            "alice-secret".into(),
            PathBuf::from("/nonexistent"),
            sub,
            None,
            no_fifos(1),
        );
        let now = std::time::Instant::now();
        for topic in ["secret.plans", "secret.plans", "secret.other"] {
            core.publish(
                &topic.parse().unwrap(),
                &bytes::Bytes::from_static(b"xy"),
                now,
            );
        }
        let text = m.encode();
        assert!(!text.contains("secret"), "{text}");
        assert!(
            text.contains(r#"fifobus_messages_published_total{topic="_all"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"fifobus_published_bytes_total{topic="_all"} 6"#),
            "{text}"
        );
        assert!(
            text.contains(r#"fifobus_messages_delivered_total{topic="_all"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"fifobus_client_backlog_messages{client="_all"} 3"#),
            "{text}"
        );
        assert!(!text.contains(r#""_other""#), "{text}");
        assert!(text.contains(r#"fifobus_metrics_series_folded_total{kind="topic"} 0"#));
        assert!(text.contains(r#"fifobus_metrics_series_folded_total{kind="client"} 0"#));
    }

    #[test]
    fn a_client_named_other_keeps_its_slot_when_a_folded_client_leaves() {
        let (_, r, m) = setup(1, 1);
        let dir = PathBuf::from("/nonexistent");
        r.insert(1, OTHER.into(), dir.clone(), outbox(), None, no_fifos(1));
        r.insert(2, "bob".into(), dir.clone(), outbox(), None, no_fifos(2)); // folded
        r.remove(2);
        r.insert(3, "carol".into(), dir, outbox(), None, no_fifos(3)); // still folded: the one slot is taken
        let text = m.encode();
        assert!(!text.contains(r#"client="carol""#), "{text}");
    }

    #[test]
    fn unrouted_counts_only_messages_nobody_subscribed_to() {
        let (c, _, m) = setup(1000, 1000);
        let mut core = RouterCore::new(c);
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
        let (_, r, m) = setup(1, 1);
        let a = outbox();
        let b = outbox();
        let t = "t".parse().unwrap();
        a.push(encode::msg(&t, b"x"));
        b.push(encode::msg(&t, b"y"));
        b.push(encode::msg(&t, b"z"));
        let dir = PathBuf::from("/nonexistent");
        r.insert(1, "alice".into(), dir.clone(), a, None, no_fifos(4));
        r.insert(2, "bob".into(), dir, b, None, no_fifos(5));
        let text = m.encode();
        assert!(
            text.contains(r#"fifobus_client_backlog_messages{client="alice"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"fifobus_client_backlog_messages{client="_other"} 2"#));
        assert!(text.contains("fifobus_backlog_messages 3"));
        assert!(text.contains("fifobus_backlog_bytes 24"));
        assert!(text.contains("fifobus_clients 2"));
        r.remove(2);
        let text = m.encode();
        assert!(
            !text.contains(r#"client="_other""#),
            "a departed client's series goes"
        );
        assert!(text.contains("fifobus_clients 1"));
    }

    #[test]
    fn every_family_is_valid_exposition_with_a_latency_histogram() {
        let (c, _, m) = setup(10, 10);
        let mut l = c.local_latency();
        l.observe(std::time::Duration::from_micros(7));
        l.flush();
        let text = m.encode();
        assert!(
            text.contains(r#"fifobus_delivery_latency_seconds_bucket{le="0.000005"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"fifobus_delivery_latency_seconds_bucket{le="0.0000125"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"fifobus_delivery_latency_seconds_bucket{le="+Inf"} 1"#));
        assert!(text.contains("fifobus_delivery_latency_seconds_count 1"));
        assert!(text.contains("# TYPE fifobus_messages_published_total counter"));
        assert!(text.contains("# TYPE fifobus_clients gauge"));
        assert!(text.contains(r#"fifobus_protocol_errors_total{kind="unknown-command"} 0"#));
    }
}
