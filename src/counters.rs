//! The broker's plain counters: what happened, counted where it happens.
//!
//! The router, the sessions and the rendezvous count into atomics here and
//! know nothing of Prometheus; [`crate::metrics`] reads these at scrape time
//! (rumqttd's meters, nats-server's `Varz`). So counting never depends on
//! whether metrics are served, the pure core stays pure, and a count is one
//! relaxed atomic add.
//!
//! Cardinality is bounded here, where the names come from: the first
//! `topic_limit` topics get counters of their own, the rest share the
//! `_other` ones, and [`Counters::folded_topics`] says how often that
//! happened.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocol::ErrorCode;

/// The label of the series that sums everything over a cardinality cap.
pub const OTHER: &str = "_other";

/// The label of the one series that sums everything when names are not
/// exported at all (`--metrics-topic-labels off`, `--metrics-client-labels
/// off`). Distinct from [`OTHER`], which means "over the cap": a dashboard
/// showing `_all` says names are off, not that there are too many.
pub const ALL: &str = "_all";

/// Why messages were discarded; the `reason` label of
/// `fifobus_messages_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Backlog full, oldest discarded (`--overflow drop-oldest`).
    BacklogOldest,
    /// Backlog full, newest discarded (`--overflow drop-newest`).
    BacklogNewest,
    /// Backlog full, client ended with its backlog (`--overflow disconnect`).
    SlowConsumer,
    /// Queued for a client that went away (pid exited, directory removed).
    ClientGone,
    /// The broker-wide `--max-memory` was reached: the overflow policy was
    /// applied to the largest backlog.
    MemoryBudget,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::BacklogOldest,
        DropReason::BacklogNewest,
        DropReason::SlowConsumer,
        DropReason::ClientGone,
        DropReason::MemoryBudget,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BacklogOldest => "backlog-drop-oldest",
            DropReason::BacklogNewest => "backlog-drop-newest",
            DropReason::SlowConsumer => "slow-consumer",
            DropReason::ClientGone => "client-gone",
            DropReason::MemoryBudget => "memory-budget",
        }
    }
}

/// Why a handshake did not end in `WELCOME`: a protocol error code sent to
/// the client, or a reply FIFO that could not be used at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Answered with `ERR <code>`, or unanswerable for that reason.
    Code(ErrorCode),
    /// Nobody opened the reply FIFO in time.
    ReplyTimeout,
    /// Another handshake was already waiting on the same reply FIFO.
    ReplyBusy,
    /// Bytes left in `hello` after the last newline once it was drained:
    /// a HELLO written without its newline (or in pieces), discarded.
    Fragment,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Code(c) => c.as_str(),
            Rejection::ReplyTimeout => "reply-timeout",
            Rejection::ReplyBusy => "reply-busy",
            Rejection::Fragment => "hello-fragment",
        }
    }

    fn index(self) -> usize {
        match self {
            Rejection::Code(c) => c.index(),
            Rejection::ReplyTimeout => ErrorCode::ALL.len(),
            Rejection::ReplyBusy => ErrorCode::ALL.len() + 1,
            Rejection::Fragment => ErrorCode::ALL.len() + 2,
        }
    }

    /// Every rejection, in a fixed order, for export.
    pub fn all() -> impl Iterator<Item = Rejection> {
        ErrorCode::ALL.into_iter().map(Rejection::Code).chain([
            Rejection::ReplyTimeout,
            Rejection::ReplyBusy,
            Rejection::Fragment,
        ])
    }
}

/// Counts for one topic (or for `_other`). The router resolves a topic's
/// counters once and keeps them beside its route.
#[derive(Debug, Default)]
pub struct TopicCounters {
    pub published: AtomicU64,
    pub published_bytes: AtomicU64,
    pub delivered: AtomicU64,
    pub delivered_bytes: AtomicU64,
}

/// Upper bounds of the delivery-latency buckets, in seconds: 5 µs to about
/// 1.9 s in steps of 2.5×, as the dashboard expects.
pub const LATENCY_BUCKETS: [f64; 14] = {
    let mut b = [5e-6; 14];
    let mut i = 1;
    while i < b.len() {
        b[i] = b[i - 1] * 2.5;
        i += 1;
    }
    b
};

/// A fixed-bucket histogram of delivery latency. Writers observe into a
/// [`LocalLatency`] and flush once per batch, so the shared atomics are
/// touched once per `writev`, not once per line.
#[derive(Debug, Default)]
pub struct Latency {
    /// Per-bucket (not cumulative) counts; the last slot is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A snapshot of [`Latency`]: cumulative counts per bucket, count and sum.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Latency {
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .take(LATENCY_BUCKETS.len())
            .map(|b| {
                total += b.load(Relaxed);
                total
            })
            .collect();
        total += self.buckets[LATENCY_BUCKETS.len()].load(Relaxed);
        LatencySnapshot {
            cumulative,
            count: total,
            sum_seconds: self.sum_nanos.load(Relaxed) as f64 * 1e-9,
        }
    }
}

/// A writer's private share of [`Latency`]; see [`LocalLatency::flush`].
#[derive(Debug)]
pub struct LocalLatency {
    shared: Arc<Counters>,
    buckets: [u64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: u64,
    dirty: bool,
}

impl LocalLatency {
    pub fn observe(&mut self, d: Duration) {
        self.observe_n(d, 1);
    }

    /// `n` lines that took `d` each: the lines of one run share one read
    /// time and one write, so the writer observes a run at once rather
    /// than searching the buckets once per line.
    pub fn observe_n(&mut self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i] += n;
        let nanos = d.as_nanos().min(u64::MAX as u128) as u64;
        self.sum_nanos = self.sum_nanos.saturating_add(nanos.saturating_mul(n));
        self.dirty = true;
    }

    /// Adds what was observed since the last flush to the shared histogram.
    pub fn flush(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let shared = &self.shared.latency;
        for (local, total) in self.buckets.iter_mut().zip(&shared.buckets) {
            if *local > 0 {
                total.fetch_add(std::mem::take(local), Relaxed);
            }
        }
        shared
            .sum_nanos
            .fetch_add(std::mem::take(&mut self.sum_nanos), Relaxed);
    }
}

impl Drop for LocalLatency {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The broker-wide memory budget (`--max-memory`): bytes that all clients
/// together hold in the broker (backlogs, batches in writers' hands, partial
/// lines), against a limit.
///
/// Holding costs one relaxed atomic add when charged and one sub when
/// credited, nothing else per message. Enforcing it is the router's job
/// ([`crate::router::RouterCore`]), since it alone owns every outbox: when
/// `held` passes `limit` it applies the overflow policy to the largest
/// backlogs until `held` is back under [`MemoryBudget::low_water`]; the gap
/// between the two means one scan of the clients frees room for many
/// messages rather than one.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: AtomicUsize,
    held: AtomicUsize,
}

impl Default for MemoryBudget {
    fn default() -> Self {
        MemoryBudget::new(usize::MAX)
    }
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Self {
        MemoryBudget {
            limit: AtomicUsize::new(limit),
            held: AtomicUsize::new(0),
        }
    }

    /// Set once at start, before any client (a budget is born unlimited).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    pub fn charge(&self, n: usize) {
        self.held.fetch_add(n, Relaxed);
    }

    pub fn credit(&self, n: usize) {
        self.held.fetch_sub(n, Relaxed);
    }

    pub fn held(&self) -> usize {
        self.held.load(Relaxed)
    }

    /// Whether the router should reclaim now.
    pub fn over(&self) -> bool {
        self.held() > self.limit()
    }

    /// Where a reclaim stops: 1/32 below the limit.
    pub fn low_water(&self) -> usize {
        let l = self.limit();
        l - l / 32
    }
}

/// Topics that have counters of their own.
type TopicTable = std::collections::HashMap<String, Arc<TopicCounters>>;

/// Everything the broker counts. One per broker, shared by `Arc`.
#[derive(Debug)]
pub struct Counters {
    topic_limit: usize,
    /// `false`: no topic has counters of its own and the shared ones are
    /// exported as [`ALL`], so `/metrics` names no topic.
    topic_labels: bool,
    topics: Mutex<TopicTable>,
    other_topic: Arc<TopicCounters>,
    pub unrouted: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// Subscriptions (pattern, client pairs) in force; set by the router.
    pub subscriptions: AtomicU64,
    pub handshakes_accepted: AtomicU64,
    rejected: [AtomicU64; ErrorCode::ALL.len() + 3],
    protocol_errors: [AtomicU64; ErrorCode::ALL.len()],
    pub folded_topics: AtomicU64,
    pub folded_clients: AtomicU64,
    pub latency: Latency,
    /// `--max-memory`, and what clients hold against it.
    pub memory: Arc<MemoryBudget>,
    /// Client state files that could not be written (full disk, I/O error).
    pub state_write_errors: AtomicU64,
    /// Topics with a retained message, and the bytes charged for them
    /// (also held against `memory`); set by the router.
    pub retained_messages: AtomicU64,
    pub retained_bytes: AtomicU64,
    /// Times a publisher was stalled because it filled a lossless
    /// subscriber's backlog.
    pub lossless_stalls: AtomicU64,
}

impl Counters {
    /// Counters whose first `topic_limit` topics get series of their own.
    pub fn new(topic_limit: usize) -> Arc<Counters> {
        Arc::new(Counters {
            topic_limit,
            topic_labels: true,
            topics: Mutex::default(),
            other_topic: Arc::default(),
            unrouted: AtomicU64::new(0),
            dropped: Default::default(),
            subscriptions: AtomicU64::new(0),
            handshakes_accepted: AtomicU64::new(0),
            rejected: Default::default(),
            protocol_errors: Default::default(),
            folded_topics: AtomicU64::new(0),
            folded_clients: AtomicU64::new(0),
            latency: Latency::default(),
            memory: Arc::default(),
            state_write_errors: AtomicU64::new(0),
            retained_messages: AtomicU64::new(0),
            retained_bytes: AtomicU64::new(0),
            lossless_stalls: AtomicU64::new(0),
        })
    }

    /// Counters that export no topic name: every topic is counted in the
    /// one series labelled [`ALL`], and nothing is counted as a fold (there
    /// is no cap being reached). The same families exist, so queries that
    /// sum over topics work unchanged.
    pub fn without_topic_labels() -> Arc<Counters> {
        let mut c = Counters::new(0);
        Arc::get_mut(&mut c).expect("just made").topic_labels = false;
        c
    }

    /// A topic's own counters while fewer than the limit exist, else `None`
    /// (counted as a fold, unless topic labels are off): the caller counts it
    /// under [`Counters::other_topic`] and should not remember it, or
    /// ever-new names would grow its memory.
    /// Callers keep the result; this takes a lock.
    pub fn topic(&self, name: &str) -> Option<Arc<TopicCounters>> {
        if !self.topic_labels {
            return None;
        }
        let mut t = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = t.get(name) {
            return Some(c.clone());
        }
        if t.len() >= self.topic_limit {
            drop(t);
            self.folded_topics.fetch_add(1, Relaxed);
            return None;
        }
        let c = Arc::new(TopicCounters::default());
        t.insert(name.to_owned(), c.clone());
        Some(c)
    }

    /// The counters shared by every topic over the limit.
    pub fn other_topic(&self) -> Arc<TopicCounters> {
        self.other_topic.clone()
    }

    /// Calls `f` with every topic's label and counters, `_other` last
    /// (or `_all` alone when topic labels are off).
    pub fn for_each_topic(&self, mut f: impl FnMut(&str, &TopicCounters)) {
        if !self.topic_labels {
            f(ALL, &self.other_topic);
            return;
        }
        let t = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        for (name, c) in t.iter() {
            f(name, c);
        }
        drop(t);
        f(OTHER, &self.other_topic);
    }

    /// Topics with counters of their own (at most the limit).
    pub fn topic_count(&self) -> usize {
        self.topics.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn dropped(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.dropped[reason as usize].fetch_add(n, Relaxed);
        }
    }

    pub fn dropped_total(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Relaxed)
    }

    pub fn handshake_rejected(&self, why: Rejection) {
        self.rejected[why.index()].fetch_add(1, Relaxed);
    }

    pub fn handshakes_rejected(&self, why: Rejection) -> u64 {
        self.rejected[why.index()].load(Relaxed)
    }

    pub fn protocol_error(&self, code: ErrorCode) {
        self.protocol_errors[code.index()].fetch_add(1, Relaxed);
    }

    pub fn protocol_errors(&self, code: ErrorCode) -> u64 {
        self.protocol_errors[code.index()].load(Relaxed)
    }

    /// A writer's local latency recorder, flushed into these counters.
    pub fn local_latency(self: &Arc<Self>) -> LocalLatency {
        LocalLatency {
            shared: self.clone(),
            buckets: [0; LATENCY_BUCKETS.len() + 1],
            sum_nanos: 0,
            dirty: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observing_a_run_at_once_counts_as_observing_each_line() {
        let (each, run) = (Counters::new(10), Counters::new(10));
        for (d, n) in [(3u64, 5u64), (400, 2), (90_000, 1), (7, 0)] {
            let d = Duration::from_micros(d);
            let mut l = each.local_latency();
            for _ in 0..n {
                l.observe(d);
            }
            run.local_latency().observe_n(d, n);
        }
        let (a, b) = (each.latency.snapshot(), run.latency.snapshot());
        assert_eq!(a, b);
        assert_eq!(b.count, 8);
    }

    #[test]
    fn topics_over_the_limit_share_other_and_count_the_fold() {
        let c = Counters::new(2);
        let a = c.topic("a").unwrap();
        assert!(Arc::ptr_eq(&a, &c.topic("a").unwrap()), "one per topic");
        c.topic("b").unwrap();
        assert!(c.topic("c").is_none());
        assert!(c.topic("d").is_none());
        assert_eq!(c.topic_count(), 2);
        assert_eq!(c.folded_topics.load(Relaxed), 2);
        let mut seen = Vec::new();
        c.for_each_topic(|n, _| seen.push(n.to_owned()));
        seen[..2].sort();
        assert_eq!(seen, ["a", "b", OTHER]);
    }

    #[test]
    fn without_topic_labels_every_topic_counts_under_all_and_nothing_folds() {
        let c = Counters::without_topic_labels();
        for t in ["secret.a", "secret.b"] {
            assert!(c.topic(t).is_none(), "no topic gets counters of its own");
            c.other_topic().published.fetch_add(1, Relaxed);
        }
        assert_eq!(c.folded_topics.load(Relaxed), 0, "labels off is not a fold");
        assert_eq!(c.topic_count(), 0);
        let mut seen = Vec::new();
        c.for_each_topic(|n, t| seen.push((n.to_owned(), t.published.load(Relaxed))));
        assert_eq!(seen, [(ALL.to_owned(), 2)]);
    }

    #[test]
    fn latency_is_bucketed_cumulatively_once_flushed() {
        let c = Counters::new(1);
        let mut l = c.local_latency();
        l.observe(Duration::from_micros(1));
        l.observe(Duration::from_micros(10));
        l.observe(Duration::from_secs(100));
        assert_eq!(c.latency.snapshot().count, 0, "nothing before a flush");
        l.flush();
        let s = c.latency.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.cumulative[0], 1, "1 µs <= 5 µs");
        assert_eq!(s.cumulative[1], 2, "10 µs <= 12.5 µs");
        assert_eq!(*s.cumulative.last().unwrap(), 2, "100 s is only in +Inf");
        assert!((s.sum_seconds - 100.000011).abs() < 1e-6);
    }
}
