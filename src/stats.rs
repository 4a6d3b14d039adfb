//! `fifobus stats`: the broker's `/metrics`, for a person.
//!
//! It reads the endpoint's address from `metrics.addr` in the bus directory,
//! scrapes twice `--interval` apart and prints rates. Parsing and rendering
//! are pure functions over the scraped text, so they are unit-tested.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::busdir::METRICS_ADDR_FILE;
use crate::metrics_token::{BearerToken, TokenError};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("no metrics endpoint recorded in {0} (is a broker running there, with metrics on?)")]
    NoAddress(String),
    #[error("cannot read {url}: {source}")]
    Fetch {
        url: String,
        source: Box<ureq::Error>,
    },
    #[error("cannot parse the metrics from {url}: {source}")]
    Parse { url: String, source: std::io::Error },
    #[error("{url} requires a bearer token: pass --metrics-token-file FILE (or set FIFOBUS_METRICS_TOKEN_FILE) naming the broker's token file or a copy of it")]
    TokenRequired { url: String },
    #[error("{url} refused the token from --metrics-token-file: it is not the broker's token (see the broker's --metrics-token-file)")]
    TokenRefused { url: String },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("no broker is running on {dir}: {url}, recorded in its metrics.addr, refuses connections (the broker that wrote it is gone); start one with: fifobus serve --dir {dir}")]
    NoBroker { dir: String, url: String },
}

impl StatsError {
    /// Nothing listens at the URL: for an address read from `metrics.addr`,
    /// the broker that wrote it is gone (killed, or crashed).
    pub fn is_refused(&self) -> bool {
        match self {
            StatsError::Fetch { source, .. } => match source.as_ref() {
                ureq::Error::ConnectionFailed => true,
                ureq::Error::Io(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
                _ => false,
            },
            _ => false,
        }
    }
}

/// The figures `stats` shows, from one scrape.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    pub clients: f64,
    pub subscriptions: f64,
    pub backlog_messages: f64,
    pub backlog_bytes: f64,
    pub handshakes_accepted: f64,
    pub handshakes_rejected: BTreeMap<String, f64>,
    /// topic → (published, delivered, published bytes)
    pub topics: BTreeMap<String, (f64, f64, f64)>,
    /// client → (backlog lines, backlog bytes)
    pub client_backlog: BTreeMap<String, (f64, f64)>,
    pub dropped: BTreeMap<String, f64>,
    pub errors: BTreeMap<String, f64>,
}

impl Snapshot {
    /// # Errors
    /// When the text is not in the Prometheus text format.
    pub fn parse(text: &str) -> std::io::Result<Snapshot> {
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
        let mut s = Snapshot::default();
        for sample in scrape.samples {
            let v = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => continue,
            };
            let label = |name: &str| sample.labels.get(name).unwrap_or("").to_owned();
            match sample.metric.as_str() {
                "fifobus_clients" => s.clients = v,
                "fifobus_subscriptions" => s.subscriptions = v,
                "fifobus_backlog_messages" => s.backlog_messages = v,
                "fifobus_backlog_bytes" => s.backlog_bytes = v,
                "fifobus_handshakes_accepted_total" => s.handshakes_accepted = v,
                "fifobus_handshakes_rejected_total" => {
                    s.handshakes_rejected.insert(label("reason"), v);
                }
                "fifobus_messages_published_total" => {
                    s.topics.entry(label("topic")).or_default().0 = v
                }
                "fifobus_messages_delivered_total" => {
                    s.topics.entry(label("topic")).or_default().1 = v
                }
                "fifobus_published_bytes_total" => {
                    s.topics.entry(label("topic")).or_default().2 = v
                }
                "fifobus_client_backlog_messages" => {
                    s.client_backlog.entry(label("client")).or_default().0 = v
                }
                "fifobus_client_backlog_bytes" => {
                    s.client_backlog.entry(label("client")).or_default().1 = v
                }
                "fifobus_messages_dropped_total" => {
                    s.dropped.insert(label("reason"), v);
                }
                "fifobus_protocol_errors_total" => {
                    s.errors.insert(label("kind"), v);
                }
                _ => {}
            }
        }
        Ok(s)
    }
}

fn per_second(now: f64, before: f64, secs: f64) -> f64 {
    // A counter that went down means the broker restarted in between.
    ((now - before).max(0.0)) / secs
}

/// Renders the table for a person: totals, topics by publish rate, clients
/// by backlog, drops and errors with their rates.
pub fn render(before: &Snapshot, now: &Snapshot, secs: f64, max_rows: usize) -> String {
    let mut out = String::new();
    // (A float sum of nothing is -0.0; start from +0.0.)
    let rejected = now.handshakes_rejected.values().fold(0.0, |a, b| a + b);
    let _ = writeln!(
        out,
        "clients {}   subscriptions {}   backlog {} lines / {} bytes   handshakes {} accepted, {} rejected",
        now.clients, now.subscriptions, now.backlog_messages, now.backlog_bytes, now.handshakes_accepted, rejected
    );
    let mut topics: Vec<(&String, f64, f64, f64, f64)> = now
        .topics
        .iter()
        // Series that exist but never counted (the _other series before any
        // topic is folded) are noise here.
        .filter(|(_, &(p, d, _))| p > 0.0 || d > 0.0)
        .map(|(t, &(p, d, b))| {
            let (p0, d0, b0) = before.topics.get(t).copied().unwrap_or_default();
            (
                t,
                p,
                per_second(p, p0, secs),
                per_second(d, d0, secs),
                per_second(b, b0, secs),
            )
        })
        .collect();
    topics.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(b.0)));
    let _ = writeln!(
        out,
        "\n{:<32} {:>12} {:>10} {:>10} {:>12}",
        "TOPIC", "PUBLISHED", "IN/s", "OUT/s", "BYTES IN/s"
    );
    for (t, p, pin, pout, bin) in topics.iter().take(max_rows) {
        let _ = writeln!(out, "{t:<32} {p:>12} {pin:>10.1} {pout:>10.1} {bin:>12.1}");
    }
    if topics.len() > max_rows {
        let _ = writeln!(out, "… and {} more topics", topics.len() - max_rows);
    }
    let mut clients: Vec<(&String, &(f64, f64))> = now.client_backlog.iter().collect();
    clients.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then(a.0.cmp(b.0)));
    let _ = writeln!(
        out,
        "\n{:<40} {:>14} {:>14}",
        "CLIENT", "BACKLOG LINES", "BACKLOG BYTES"
    );
    for (c, (m, b)) in clients.iter().take(max_rows) {
        let _ = writeln!(out, "{c:<40} {m:>14} {b:>14}");
    }
    if clients.len() > max_rows {
        let _ = writeln!(out, "… and {} more clients", clients.len() - max_rows);
    }
    let counted = |name: &str,
                   now_map: &BTreeMap<String, f64>,
                   before_map: &BTreeMap<String, f64>,
                   out: &mut String| {
        let parts: Vec<String> = now_map
            .iter()
            .filter(|(_, &v)| v > 0.0)
            .map(|(k, &v)| {
                let rate = per_second(v, before_map.get(k).copied().unwrap_or(0.0), secs);
                format!("{k} {v} ({rate:.1}/s)")
            })
            .collect();
        let _ = writeln!(
            out,
            "{name:<9}{}",
            if parts.is_empty() {
                "none".to_owned()
            } else {
                parts.join("   ")
            }
        );
    };
    out.push('\n');
    counted("DROPPED", &now.dropped, &before.dropped, &mut out);
    counted("ERRORS", &now.errors, &before.errors, &mut out);
    counted(
        "REJECTED",
        &now.handshakes_rejected,
        &before.handshakes_rejected,
        &mut out,
    );
    out
}

/// Reads `metrics.addr` and returns the `/metrics` URL.
///
/// # Errors
/// [`StatsError::NoAddress`] when there is no such file.
pub fn metrics_url(bus_dir: &Path) -> Result<String, StatsError> {
    let file = bus_dir.join(METRICS_ADDR_FILE);
    let addr = std::fs::read_to_string(&file)
        .map_err(|_| StatsError::NoAddress(bus_dir.display().to_string()))?;
    Ok(format!("http://{}/metrics", addr.trim()))
}

/// Fetches and parses one scrape, sending `token` as a bearer token when
/// given.
///
/// # Errors
/// When the endpoint does not answer within 5 s, answers nonsense, or
/// wants a token that was not given or is not its own (401).
pub fn scrape(url: &str, token: Option<&BearerToken>) -> Result<Snapshot, StatsError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut request = agent.get(url);
    if let Some(t) = token {
        request = request.header("Authorization", format!("Bearer {}", t.as_str()));
    }
    let text = request
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .map_err(|e| match e {
            ureq::Error::StatusCode(401) if token.is_some() => StatsError::TokenRefused {
                url: url.to_owned(),
            },
            ureq::Error::StatusCode(401) => StatsError::TokenRequired {
                url: url.to_owned(),
            },
            e => StatsError::Fetch {
                url: url.to_owned(),
                source: Box::new(e),
            },
        })?;
    Snapshot::parse(&text).map_err(|source| StatsError::Parse {
        url: url.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"
# TYPE fifobus_clients gauge
fifobus_clients 2
# TYPE fifobus_messages_published_total counter
fifobus_messages_published_total{topic="a"} 10
fifobus_messages_published_total{topic="b"} 0
# TYPE fifobus_messages_dropped_total counter
fifobus_messages_dropped_total{reason="backlog-drop-oldest"} 0
"#;
    const NOW: &str = r#"
# TYPE fifobus_clients gauge
fifobus_clients 3
# TYPE fifobus_messages_published_total counter
fifobus_messages_published_total{topic="a"} 30
fifobus_messages_published_total{topic="b"} 100
# TYPE fifobus_messages_delivered_total counter
fifobus_messages_delivered_total{topic="b"} 200
# TYPE fifobus_client_backlog_messages gauge
fifobus_client_backlog_messages{client="slow"} 7
fifobus_client_backlog_messages{client="quick"} 0
# TYPE fifobus_messages_dropped_total counter
fifobus_messages_dropped_total{reason="backlog-drop-oldest"} 4
"#;

    #[test]
    fn rates_are_computed_and_busiest_topics_come_first() {
        let before = Snapshot::parse(BEFORE).unwrap();
        let now = Snapshot::parse(NOW).unwrap();
        let text = render(&before, &now, 2.0, 10);
        assert!(text.starts_with("clients 3 "), "{text}");
        let b = text.find("\nb ").unwrap();
        let a = text.find("\na ").unwrap();
        assert!(b < a, "b (50/s) before a (10/s):\n{text}");
        assert!(
            text.contains("50.0") && text.contains("100.0") && text.contains("10.0"),
            "{text}"
        );
        assert!(text.find("slow").unwrap() < text.find("quick").unwrap());
        assert!(text.contains("backlog-drop-oldest 4 (2.0/s)"), "{text}");
        assert!(text.contains("ERRORS   none"), "{text}");
        assert!(text.contains(", 0 rejected"), "{text}");
        assert!(!text.contains("-0"), "{text}");
        let empty = Snapshot::parse("# TYPE fifobus_messages_published_total counter\nfifobus_messages_published_total{topic=\"_other\"} 0\n").unwrap();
        assert!(!render(&empty, &empty, 1.0, 10).contains("_other"));
    }
}
