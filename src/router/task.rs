//! The router task: the async shell around [`RouterCore`].
//!
//! It blocks only when there is nothing to do (an idle broker spends no CPU),
//! and once woken drains more messages without waiting, up to
//! `WORK_PER_TURN`,
//! so that a busy router pays the channel's wake-up cost once per batch.
//! Readers send one message per read, not per line. The channel is bounded:
//! when the router falls behind, readers wait, stop reading, and publishers
//! block in `write()` on their full `send` FIFO; that is the backpressure.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::core::{ClientKey, RouterCore};
use super::outbox::Outbox;
use crate::counters::Counters;
use crate::protocol::{Command, ProtocolError};
use crate::topic::Pattern;

/// Batches in flight. With at most 1024 lines per batch this bounds what
/// waits for the router (and so the memory publishers can make it hold).
const CHANNEL_CAPACITY: usize = 64;
/// Work (lines applied plus deliveries queued) before the router yields its
/// worker thread, so timers, signals and sessions run even under a flood.
const WORK_PER_TURN: usize = 16 * 1024;

pub enum RouterMsg {
    Attach {
        key: ClientKey,
        outbox: Arc<Outbox>,
        subs: Vec<Pattern>,
        /// Answered once the subscriptions are in force.
        done: oneshot::Sender<()>,
    },
    /// Everything one read from a client's `send` produced, in order.
    Batch {
        key: ClientKey,
        items: Vec<Result<Command, ProtocolError>>,
        /// When the reader read these lines.
        read_at: Instant,
    },
    Detach {
        key: ClientKey,
    },
}

/// A cloneable way to reach the router. The router stops when every handle
/// is gone, which is how shutdown ends it.
#[derive(Clone)]
pub struct RouterHandle {
    tx: mpsc::Sender<RouterMsg>,
}

impl RouterHandle {
    /// Starts the router task and returns a handle to it.
    pub fn spawn(counters: Arc<Counters>) -> RouterHandle {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tokio::spawn(run(rx, RouterCore::new(counters)));
        RouterHandle { tx }
    }

    /// Registers a client; returns once its `sub=` patterns are in force.
    /// Returns `false` if the router has stopped.
    pub async fn attach(&self, key: ClientKey, outbox: Arc<Outbox>, subs: Vec<Pattern>) -> bool {
        let (done, wait) = oneshot::channel();
        let msg = RouterMsg::Attach {
            key,
            outbox,
            subs,
            done,
        };
        self.tx.send(msg).await.is_ok() && wait.await.is_ok()
    }

    /// Sends one batch. Waits while the router is behind (backpressure).
    /// Returns `false` if the router has stopped.
    pub async fn batch(
        &self,
        key: ClientKey,
        items: Vec<Result<Command, ProtocolError>>,
        read_at: Instant,
    ) -> bool {
        let msg = RouterMsg::Batch {
            key,
            items,
            read_at,
        };
        self.tx.send(msg).await.is_ok()
    }

    pub async fn detach(&self, key: ClientKey) {
        let _ = self.tx.send(RouterMsg::Detach { key }).await;
    }
}

async fn run(mut rx: mpsc::Receiver<RouterMsg>, mut core: RouterCore) {
    while let Some(first) = rx.recv().await {
        let mut work = handle(&mut core, first);
        while work < WORK_PER_TURN {
            match rx.try_recv() {
                Ok(msg) => work += handle(&mut core, msg),
                Err(_) => break,
            }
        }
        if work >= WORK_PER_TURN {
            tokio::task::yield_now().await;
        }
    }
    tracing::debug!("router stopped");
}

/// Applies one message; returns the work it took (lines plus deliveries).
fn handle(core: &mut RouterCore, msg: RouterMsg) -> usize {
    match msg {
        RouterMsg::Attach {
            key,
            outbox,
            subs,
            done,
        } => {
            core.attach(key, outbox, subs);
            let _ = done.send(());
            1
        }
        RouterMsg::Batch {
            key,
            items,
            read_at,
        } => {
            let mut work = items.len();
            for item in items {
                let d = core.apply(key, item, read_at);
                work += d.delivered + d.dropped;
            }
            work
        }
        RouterMsg::Detach { key } => {
            core.detach(key);
            1
        }
    }
}
