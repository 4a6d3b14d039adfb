//! The broker's settings, validated, independent of how they were given.

use std::path::PathBuf;
use std::time::Duration;

use crate::http::MetricsEndpoint;
use crate::metrics::MetricsLimits;
use crate::router::BacklogLimits;

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub dir: PathBuf,
    /// Mode of the bus directory when the broker creates it.
    pub mode: u32,
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
    /// Pipe buffer of each client FIFO (F_SETPIPE_SZ).
    pub pipe_size: usize,
    pub metrics: MetricsEndpoint,
    pub metrics_limits: MetricsLimits,
}

impl BrokerConfig {
    pub fn new(dir: PathBuf) -> Self {
        BrokerConfig {
            dir,
            mode: 0o700,
            max_line: 1 << 20,
            backlog: BacklogLimits::default(),
            handshake_timeout: Duration::from_secs(5),
            flush_grace: Duration::from_millis(500),
            max_clients: None,
            pipe_size: 64 * 1024,
            metrics: MetricsEndpoint::Default,
            metrics_limits: MetricsLimits::default(),
        }
    }
}
