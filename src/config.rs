//! The broker's settings, validated, independent of how they were given.

use std::path::PathBuf;
use std::time::Duration;

use std::net::SocketAddr;

use crate::router::BacklogLimits;

/// Where `fifobus serve` serves metrics by default. Loopback only: metrics
/// name topics and clients, which is nobody else's business.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9478";

/// How long a client without `pid=` may stay idle before the broker ends it.
///
/// An hour, because this timeout is a janitor, not the defence: a full
/// table is handled at once by ending the pid-less client idle longest, so
/// vanished clients never lock anyone out, whatever this is. What is left
/// for the timeout is giving back the memory and descriptors of clients
/// that vanished while the table had room; an hour does that within the
/// hour while never cutting a person who leaves a hand-made client alone
/// through a meeting, or a script that polls every few minutes.
pub const DEFAULT_ORPHAN_TIMEOUT: Duration = Duration::from_secs(3600);

/// The `--metrics-addr` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsEndpoint {
    /// Serve nothing (the broker counts all the same).
    Off,
    /// The default address; if it is taken (another user's broker), fall
    /// back to a free loopback port rather than refuse to start.
    Default,
    At(SocketAddr),
}

impl std::str::FromStr for MetricsEndpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" => Ok(MetricsEndpoint::Off),
            "default" => Ok(MetricsEndpoint::Default),
            _ => s.parse().map(MetricsEndpoint::At).map_err(|_| {
                format!("'{s}' is not HOST:PORT (e.g. {DEFAULT_METRICS_ADDR}) or 'off'")
            }),
        }
    }
}

/// Cardinality caps of the metric series (`--metrics-topic-limit`,
/// `--metrics-client-limit`); the rest are summed under `_other`.
/// With `topic_labels` or `client_labels` off (`--metrics-topic-labels off`,
/// `--metrics-client-labels off`) no name is exported at all: everything is
/// one series labelled `_all`.
#[derive(Debug, Clone, Copy)]
pub struct MetricsLimits {
    pub topics: usize,
    pub clients: usize,
    pub topic_labels: bool,
    pub client_labels: bool,
}

impl Default for MetricsLimits {
    fn default() -> Self {
        MetricsLimits {
            topics: 1000,
            clients: 1000,
            topic_labels: true,
            client_labels: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_budget_is_a_quarter_of_what_the_broker_may_use() {
        const G: usize = 1 << 30;
        assert_eq!(default_max_memory(Some(16 * G), None), 4 * G);
        assert_eq!(
            default_max_memory(Some(16 * G), Some(2 * G)),
            G / 2,
            "the cgroup when lower"
        );
        assert_eq!(
            default_max_memory(Some(128 << 20), None),
            64 << 20,
            "never under 64 MiB"
        );
        assert_eq!(default_max_memory(None, None), 64 << 20);
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("1073741824\n"), Some(G));
    }
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub dir: PathBuf,
    /// Mode of the bus directory when the broker creates it.
    pub mode: u32,
    /// `--shared`: a bus any local user may reach (root only); client
    /// directories belong to their users.
    pub shared: bool,
    /// Longest accepted line on `send`, excluding the newline.
    pub max_line: usize,
    pub backlog: BacklogLimits,
    /// How long a client has to open its reply FIFO for reading.
    pub handshake_timeout: Duration,
    /// At shutdown or after `BYE`: how long queued lines and the final `BYE`
    /// may take to be read before the broker closes the client's FIFOs.
    pub flush_grace: Duration,
    /// Upper bound on clients; `None` derives it from the open-file limit.
    pub max_clients: Option<usize>,
    /// A client without `pid=` that shows no sign of life (no command read,
    /// nothing read from its `recv`) for this long is ended; `None`: never.
    /// See [`DEFAULT_ORPHAN_TIMEOUT`] for the default.
    pub orphan_timeout: Option<Duration>,
    /// Largest pipe buffer a client FIFO grows to (F_SETPIPE_SZ); a quiet
    /// client's FIFOs have one page.
    pub pipe_size: usize,
    /// How long a grown FIFO's size must not have mattered before it is
    /// shrunk back to one page.
    pub pipe_idle: Duration,
    pub metrics: MetricsEndpoint,
    pub metrics_limits: MetricsLimits,
    /// `--metrics-token-file`: `/metrics` then requires the bearer token in
    /// this file (checked and read at start, see [`crate::metrics_token`]).
    pub metrics_token_file: Option<PathBuf>,
    /// The access-control file (`--acl`); `None`: everything is allowed.
    pub acl: Option<PathBuf>,
    /// `--max-memory`: what all clients together may hold in the broker
    /// (backlogs, batches in writers' hands, partial lines). The command
    /// line derives a default from the machine ([`default_max_memory`]);
    /// a library user who sets nothing gets no bound.
    pub max_memory: usize,
    /// `--max-subscriptions`: patterns one client may hold.
    pub max_subscriptions: usize,
    /// `serve --replace`: take over from the broker running on `dir`.
    pub replace: bool,
    /// `serve --replace --detach`, in the background broker: told once it
    /// serves, so that the command waiting in the foreground can exit.
    pub ready: Option<crate::control::ReadyPipe>,
    /// `--max-retained`, `--max-retained-bytes`.
    pub retain: crate::router::RetainLimits,
}

/// The smallest default budget: enough for a few busy clients on a tiny
/// machine or container.
const MIN_DEFAULT_MEMORY: usize = 64 << 20;

/// `--max-memory`'s default: a quarter of the memory the broker may use
/// (`MemTotal`, or the cgroup's `memory.max` when lower), at least 64 MiB.
/// A quarter leaves the machine to its other programs while a broker with
/// stuck readers is at its worst; the bound is on what clients hold, and the
/// broker's own memory (a few MiB) comes on top.
pub fn default_max_memory(mem_total: Option<usize>, cgroup_max: Option<usize>) -> usize {
    let machine = match (mem_total, cgroup_max) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        // Unknown machine: the floor, which is safe anywhere.
        (None, None) => return MIN_DEFAULT_MEMORY,
    };
    (machine / 4).max(MIN_DEFAULT_MEMORY)
}

/// A cgroup v2 `memory.max` ("max" means no limit).
pub fn parse_memory_max(text: &str) -> Option<usize> {
    text.trim().parse().ok()
}

impl BrokerConfig {
    pub fn new(dir: PathBuf) -> Self {
        BrokerConfig {
            dir,
            mode: 0o700,
            shared: false,
            max_line: 1 << 20,
            backlog: BacklogLimits::default(),
            handshake_timeout: Duration::from_secs(5),
            flush_grace: Duration::from_millis(500),
            max_clients: None,
            orphan_timeout: Some(DEFAULT_ORPHAN_TIMEOUT),
            pipe_size: 64 * 1024,
            pipe_idle: Duration::from_secs(1),
            metrics: MetricsEndpoint::Default,
            metrics_limits: MetricsLimits::default(),
            metrics_token_file: None,
            acl: None,
            max_memory: usize::MAX,
            max_subscriptions: crate::router::MAX_SUBSCRIPTIONS,
            replace: false,
            ready: None,
            retain: crate::router::RetainLimits::default(),
        }
    }
}
