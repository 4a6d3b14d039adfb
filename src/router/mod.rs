//! Routing: one owner of all subscription state, fed by batches of commands.
//!
//! - [`core`]: [`RouterCore`], synchronous: applies commands, matches topics,
//!   pushes encoded lines into outboxes. No `.await`, so it is unit-testable.
//! - [`outbox`]: [`Outbox`], the bounded per-client queue between the router
//!   and that client's writer, where the overflow policy lives.
//! - [`task`]: the async shell around the core: receive, drain a batch, apply.

pub mod core;
pub mod outbox;
pub mod task;

pub use self::core::{
    is_bus_topic, ClientInfo, ClientKey, RetainLimits, RouterCore, BUS_PREFIX,
    MAX_PENDING_REQUESTS, MAX_SUBSCRIPTIONS,
};
pub use outbox::{BacklogLimits, Batch, CloseReason, Outbox, OverflowPolicy, Push};
pub use task::{AttachError, RouterHandle, RouterMsg};
