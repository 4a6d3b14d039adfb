//! [`Context`]: what every task of a running broker shares.
//!
//! It lives in a module of its own so that the wiring ([`crate::broker`])
//! sits on top: the rendezvous and the sessions take a `Context`, and
//! nothing below imports the module that builds it.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acl::Policy;
use crate::busdir::BusFs;
use crate::config::BrokerConfig;
use crate::counters::Counters;
use crate::registry::Registry;
use crate::router::RouterHandle;
use crate::throttle::LogThrottle;
use crate::watch::FsWatcher;

pub struct Context {
    pub config: BrokerConfig,
    pub router: RouterHandle,
    /// The live clients and the connection limit.
    pub clients: Arc<Registry>,
    pub watcher: Arc<FsWatcher>,
    pub counters: Arc<Counters>,
    /// Cancelled once, when the broker starts to stop.
    pub cancel: CancellationToken,
    /// Every session and handshake task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// `<bus>/clients`, where client directories are made.
    pub clients_dir: PathBuf,
    /// The bus directory's descriptors and identities: client directories
    /// are made relative to them, and `reply=` is checked against them.
    pub fs: Arc<BusFs>,
    pub throttle: LogThrottle,
    /// The access-control policy in force (`--acl`; open without it), for
    /// what is decided outside the router (per-user backlog). The router
    /// holds its own copy, replaced by the same reload.
    pub policy: std::sync::RwLock<Arc<Policy>>,
    /// Each live client's file in `<bus>/state/`, so it survives a crash.
    pub state: Arc<crate::state::StateStore>,
    /// Serving, or paused for `serve --replace` (`crate::control`).
    pub phase: tokio::sync::watch::Sender<Phase>,
    /// Readers paused at a line boundary, and handshakes in progress: what
    /// a handover waits for.
    pub paused_readers: std::sync::atomic::AtomicUsize,
    pub handshakes: std::sync::atomic::AtomicUsize,
}

/// Where the broker is in a handover to a `serve --replace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Nothing new is read (hello, every send); what was read is routed and
    /// written. Back to `Serving` if the handover is abandoned.
    Paused,
    /// The new broker holds every FIFO: save what was read but not parsed,
    /// and read nothing more; the process exits.
    Released,
}

impl Context {
    /// The access-control policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
