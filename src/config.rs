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
    /// Pipe buffer of each client FIFO (F_SETPIPE_SZ).
    pub pipe_size: usize,
    pub metrics: MetricsEndpoint,
    pub metrics_limits: MetricsLimits,
    /// `--metrics-token-file`: `/metrics` then requires the bearer token in
    /// this file (checked and read at start, see [`crate::metrics_token`]).
    pub metrics_token_file: Option<PathBuf>,
    /// The access-control file (`--acl`); `None`: everything is allowed.
    pub acl: Option<PathBuf>,
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
            metrics: MetricsEndpoint::Default,
            metrics_limits: MetricsLimits::default(),
            metrics_token_file: None,
            acl: None,
        }
    }
}
