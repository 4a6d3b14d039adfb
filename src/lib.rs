//! fifobus: a message broker for processes on one machine whose clients
//! need no library: only `open()`, a line reader and `print`.
//!
//! # Layout
//!
//! Pure logic, no I/O (property-tested):
//! - [`topic`]: validated topics and patterns, and the subscription trie.
//! - [`protocol`]: line splitting, and every line in both directions: client
//!   commands and HELLO parsed and encoded, broker lines encoded and decoded.
//! - [`acl`]: the access-control policy of a shared bus (`--acl FILE`).
//! - [`router`]: the single owner of subscriptions ([`router::RouterCore`])
//!   and the bounded per-client [`router::Outbox`].
//!
//! The edges, where the kernel is:
//! - [`fifo`]: non-blocking, link-refusing FIFO opens.
//! - [`busdir`]: the bus directory, its lock, and stale-state cleanup.
//! - [`state`]: durable client state, so clients survive a broker crash.
//! - [`watch`]: pidfd and inotify, to notice departed clients without polling.
//! - [`rendezvous`]: the `hello` FIFO and handshakes.
//! - [`session`]: one client's reader, writer and teardown.
//! - [`broker`]: wiring and ordered shutdown.
//! - [`metrics`], [`http`], [`metrics_token`]: Prometheus metrics, the `/metrics`
//!   endpoint and the bearer token that may guard it.
//! - [`client`], [`commands`], [`cli`], [`stats`]: the client side and the command line.
//!
//! The benchmark (`fifobus bench`) is a crate of its own, `crates/bench`,
//! built on [`client`] and [`protocol`] alone.
//!
//! # Data path of one `PUB`
//!
//! `session` reads up to 64 KiB from `send`, splits lines
//! ([`protocol::LineSplitter`]), parses each ([`protocol::Command::parse`]),
//! and sends the whole read as one batch to the router task. The router
//! matches the topic (cached per topic, else the trie), encodes `MSG` once
//! ([`protocol::encode::msg`]) and pushes the same buffer into every matching
//! outbox. Each subscriber's writer swaps its outbox out and writes it to
//! `recv` with `writev`. See docs/architecture.md.

pub mod acl;
pub mod broker;
pub mod busdir;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod context;
pub mod control;
pub mod counters;
pub mod fifo;
pub mod format;
pub mod http;
pub mod metrics;
pub mod metrics_token;
pub mod protocol;
pub mod registry;
pub mod rendezvous;
pub mod requests;
pub mod router;
pub mod session;
pub mod state;
pub mod stats;
pub mod throttle;
pub mod topic;
pub mod watch;
