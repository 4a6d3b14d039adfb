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

use super::core::{ClientInfo, ClientKey, RetainLimits, RouterCore};
use super::outbox::Outbox;
use crate::acl::{Identity, Policy};
use crate::counters::Counters;
use crate::protocol::{Input, ProtocolError, SubOptions};
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
        /// Whom the access-control policy judges.
        who: Identity,
        subs: Vec<Pattern>,
        /// Answered once the subscriptions are in force, or with why the
        /// policy refused the client.
        done: oneshot::Sender<Result<(), ProtocolError>>,
        /// Who it is, to announce on `_bus.client.joined` once attached.
        /// In this message rather than one of its own: a second wake-up of
        /// the router per handshake cost a fifth of the handshake rate
        /// under load (tests/handshake.rs, the 10,000-HELLO burst).
        info: Option<ClientInfo>,
    },
    /// Everything one read from a client's `send` produced, in order.
    Batch {
        key: ClientKey,
        items: Vec<Input>,
        /// When the reader read these lines.
        read_at: Instant,
    },
    Detach {
        key: ClientKey,
    },
    /// A new access-control policy (`--acl`, at start and on reload).
    SetPolicy(Arc<Policy>),
    /// For the state writer: the clients whose subscriptions changed, with
    /// what they hold now, and the retained messages if they changed
    /// (`RouterCore::take_dirty`).
    TakeDirty(oneshot::Sender<crate::state::Dirty>),
    /// A client a previous broker served (`RouterCore::adopt`).
    Adopt {
        key: ClientKey,
        outbox: Arc<Outbox>,
        who: Identity,
        subs: Vec<(Pattern, SubOptions)>,
        done: oneshot::Sender<AdoptResult>,
    },
    /// Retained messages a previous broker left (`RouterCore::load_retained`).
    LoadRetained(crate::state::Retained, oneshot::Sender<Vec<String>>),
    /// `echo=no` for a client just attached or adopted (`RouterCore::set_no_echo`).
    NoEcho {
        key: ClientKey,
    },
    /// [`RouterMsg::Detach`], announced on `_bus.client.left` with why.
    Leave {
        key: ClientKey,
        reason: &'static str,
    },
}

/// The options subscriptions refused (index in `subs`, why), or why the
/// client was refused.
pub type AdoptResult = Result<Vec<(usize, ProtocolError)>, ProtocolError>;

/// Why [`RouterHandle::attach`] did not attach a client.
#[derive(Debug)]
pub enum AttachError {
    /// The policy refused it: answer the HELLO with this.
    Refused(ProtocolError),
    /// The router has stopped (the broker is shutting down).
    Stopped,
}

/// A cloneable way to reach the router. The router stops when every handle
/// is gone, which is how shutdown ends it.
#[derive(Clone)]
pub struct RouterHandle {
    tx: mpsc::Sender<RouterMsg>,
}

impl RouterHandle {
    /// Starts the router task and returns a handle to it. It enforces the
    /// memory budget in `counters`, `max_subscriptions` per client and
    /// the retained-message limits.
    pub fn spawn(
        counters: Arc<Counters>,
        max_subscriptions: usize,
        retain: RetainLimits,
    ) -> RouterHandle {
        Self::spawn_tracking(counters, max_subscriptions, retain, None)
    }

    /// [`RouterHandle::spawn`], waking `changed` when subscriptions change
    /// (durable state, see `crate::state`).
    pub fn spawn_tracking(
        counters: Arc<Counters>,
        max_subscriptions: usize,
        retain: RetainLimits,
        changed: Option<Arc<tokio::sync::Notify>>,
    ) -> RouterHandle {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let mut core = RouterCore::new(counters);
        core.set_max_subscriptions(max_subscriptions);
        if let Some(changed) = changed {
            core.track_changes(changed);
        }
        core.set_retain_limits(retain);
        tokio::spawn(run(rx, core));
        RouterHandle { tx }
    }

    /// Registers a client; returns once its `sub=` patterns are in force.
    ///
    /// # Errors
    /// The policy's refusal, or [`AttachError::Stopped`].
    pub async fn attach(
        &self,
        key: ClientKey,
        outbox: Arc<Outbox>,
        who: Identity,
        subs: Vec<Pattern>,
    ) -> Result<(), AttachError> {
        self.attach_msg(key, outbox, who, subs, None).await
    }

    /// [`RouterHandle::attach`], then announces the client on
    /// `_bus.client.joined` (and lists it in `fifobus ls`) as `info`. A
    /// client that is then not created after all must be detached with
    /// [`RouterHandle::leave`], so that its `left` follows.
    ///
    /// # Errors
    /// As [`RouterHandle::attach`]; nothing is announced then.
    pub async fn attach_joined(
        &self,
        key: ClientKey,
        outbox: Arc<Outbox>,
        who: Identity,
        subs: Vec<Pattern>,
        info: ClientInfo,
    ) -> Result<(), AttachError> {
        self.attach_msg(key, outbox, who, subs, Some(info)).await
    }

    async fn attach_msg(
        &self,
        key: ClientKey,
        outbox: Arc<Outbox>,
        who: Identity,
        subs: Vec<Pattern>,
        info: Option<ClientInfo>,
    ) -> Result<(), AttachError> {
        let (done, wait) = oneshot::channel();
        let msg = RouterMsg::Attach {
            key,
            outbox,
            who,
            subs,
            done,
            info,
        };
        self.tx.send(msg).await.map_err(|_| AttachError::Stopped)?;
        match wait.await {
            Ok(r) => r.map_err(AttachError::Refused),
            Err(_) => Err(AttachError::Stopped),
        }
    }

    /// Puts an access-control policy in force; commands sent after this
    /// call returns are judged by it. Returns `false` if the router has stopped.
    pub async fn set_policy(&self, policy: Arc<Policy>) -> bool {
        self.tx.send(RouterMsg::SetPolicy(policy)).await.is_ok()
    }

    /// Sends one batch. Waits while the router is behind (backpressure).
    /// Returns `false` if the router has stopped.
    pub async fn batch(&self, key: ClientKey, items: Vec<Input>, read_at: Instant) -> bool {
        let msg = RouterMsg::Batch {
            key,
            items,
            read_at,
        };
        self.tx.send(msg).await.is_ok()
    }

    /// `echo=no` for `key`: sent before its session starts, so it is in
    /// force before its first `PUB` (one channel, applied in order).
    pub async fn no_echo(&self, key: ClientKey) {
        let _ = self.tx.send(RouterMsg::NoEcho { key }).await;
    }

    pub async fn detach(&self, key: ClientKey) {
        let _ = self.tx.send(RouterMsg::Detach { key }).await;
    }

    /// Registers a client a previous broker served, with every
    /// subscription it held (options included), as
    /// [`RouterCore::adopt`].
    ///
    /// # Errors
    /// The policy's refusal of the client, or [`AttachError::Stopped`].
    pub async fn adopt(
        &self,
        key: ClientKey,
        outbox: Arc<Outbox>,
        who: Identity,
        subs: Vec<(Pattern, SubOptions)>,
    ) -> Result<Vec<(usize, ProtocolError)>, AttachError> {
        let (done, wait) = oneshot::channel();
        let msg = RouterMsg::Adopt {
            key,
            outbox,
            who,
            subs,
            done,
        };
        self.tx.send(msg).await.map_err(|_| AttachError::Stopped)?;
        match wait.await {
            Ok(r) => r.map_err(AttachError::Refused),
            Err(_) => Err(AttachError::Stopped),
        }
    }

    /// Loads retained messages a previous broker left; returns what was
    /// left out and why (`None` once the router has stopped).
    pub async fn load_retained(&self, msgs: crate::state::Retained) -> Option<Vec<String>> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(RouterMsg::LoadRetained(msgs, done))
            .await
            .ok()?;
        wait.await.ok()
    }

    /// The clients whose subscriptions changed since the last call, with
    /// what each holds now, and the retained messages if they changed;
    /// `None` once the router has stopped.
    pub async fn take_dirty(&self) -> Option<crate::state::Dirty> {
        let (done, wait) = oneshot::channel();
        self.tx.send(RouterMsg::TakeDirty(done)).await.ok()?;
        wait.await.ok()
    }

    /// Detaches a client, publishing `_bus.client.left` with `reason`.
    pub async fn leave(&self, key: ClientKey, reason: &'static str) {
        let _ = self.tx.send(RouterMsg::Leave { key, reason }).await;
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
            who,
            subs,
            done,
            info,
        } => {
            let r = core.attach_as(key, outbox, who, subs);
            if let (Ok(()), Some(info)) = (&r, info) {
                core.joined(key, info);
            }
            let _ = done.send(r);
            1
        }
        RouterMsg::Batch {
            key,
            items,
            read_at,
        } => core.apply_batch(key, items, read_at),
        RouterMsg::Detach { key } => {
            core.detach(key);
            1
        }
        RouterMsg::SetPolicy(policy) => {
            core.set_policy(policy);
            1
        }
        RouterMsg::TakeDirty(done) => {
            let dirty = core.take_dirty();
            let work = dirty.clients.len();
            let _ = done.send(dirty);
            work.max(1)
        }
        RouterMsg::Adopt {
            key,
            outbox,
            who,
            subs,
            done,
        } => {
            let work = subs.len().max(1);
            let _ = done.send(core.adopt(key, outbox, who, subs));
            work
        }
        RouterMsg::LoadRetained(msgs, done) => {
            let work = msgs.len().max(1);
            let _ = done.send(core.load_retained(msgs));
            work
        }
        RouterMsg::NoEcho { key } => {
            core.set_no_echo(key);
            1
        }
        RouterMsg::Leave { key, reason } => {
            core.leave(key, reason);
            1
        }
    }
}
