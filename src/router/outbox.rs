//! The bounded queue of lines waiting to be written to one client's `recv`.
//!
//! The router pushes and never waits: a slow reader must not slow anyone
//! else. When the backlog passes its caps (lines and bytes) the overflow
//! policy decides what to lose, and the loss is counted so the writer can
//! tell the client `DROPPED <n>` at the exact place of the gap:
//!
//! - drop-oldest discards from the front, so the gap sits before everything
//!   still queued: `DROPPED` is written first in the next batch;
//! - drop-newest refuses new lines, so the gap sits after everything queued:
//!   `DROPPED` is written last in the next batch.
//!
//! The writer takes a batch (up to what one `writev` can write) under one
//! short lock (rumqttd's `exchange`), so locking costs once per batch, not
//! once per line. What it took stays counted, against the client's byte cap
//! and the broker's memory budget, until it reports it written
//! ([`Outbox::written`]): a slow reader cannot hold more than its cap by
//! having its writer hold the rest.
//!
//! A client holding a lossless subscription (`SUB <pattern> lossless`) has a
//! lossless outbox: lines are never dropped for it ([`Outbox::push_lossless`]);
//! instead, once it is full, the publishers of those lines are told to stop
//! ([`Outbox::stall_on`]): their readers stop reading `send` until it has
//! drained to half its caps ([`Outbox::until_unstalled`]).
//!
//! Every queued line is also charged to the broker-wide
//! [`MemoryBudget`], at its length plus [`ENTRY_COST`]. The router enforces
//! the budget by calling [`Outbox::shed`] on the largest backlogs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::counters::MemoryBudget;
use crate::protocol::{encode, Reply};

/// Queued lines that may share an encoding-arena chunk (see `push_entry`).
const PIN_LINES: usize = 64;
/// What one queued line costs beyond its bytes, charged to the memory
/// budget: its slot in the queue (an `Entry`, 48 bytes) and the allocator's
/// header of its private copy.
pub const ENTRY_COST: usize = 64;
/// Lines the writer takes at once: `IOV_MAX`, what one `writev` can write.
pub const TAKE_LINES: usize = 1024;
/// Bytes the writer takes at once (at least one line), so that a writer
/// stuck on a full pipe holds little that the budget cannot reclaim.
pub const TAKE_BYTES: usize = 64 * 1024;

/// What happens when a client's backlog is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Discard the oldest queued lines to make room (the client sees the newest).
    #[default]
    DropOldest,
    /// Discard the new line (the client sees the oldest).
    DropNewest,
    /// End the client: its directory is removed and its reader sees EOF.
    Disconnect,
}

impl OverflowPolicy {
    pub const ALL: [OverflowPolicy; 3] = [
        OverflowPolicy::DropOldest,
        OverflowPolicy::DropNewest,
        OverflowPolicy::Disconnect,
    ];

    /// The name used on the command line (`--overflow`).
    pub fn as_str(self) -> &'static str {
        match self {
            OverflowPolicy::DropOldest => "drop-oldest",
            OverflowPolicy::DropNewest => "drop-newest",
            OverflowPolicy::Disconnect => "disconnect",
        }
    }
}

impl std::str::FromStr for OverflowPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("'{s}' is not drop-oldest, drop-newest or disconnect"))
    }
}

impl std::fmt::Display for OverflowPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BacklogLimits {
    pub messages: usize,
    pub bytes: usize,
    pub policy: OverflowPolicy,
}

impl Default for BacklogLimits {
    fn default() -> Self {
        BacklogLimits {
            // Bytes bind for any line over 67 bytes; the count only bounds
            // the per-line overhead of tiny lines (1M × 64 B).
            messages: 1_000_000,
            bytes: 64 << 20,
            policy: OverflowPolicy::DropOldest,
        }
    }
}

/// Why a client's session ended. Logged once per client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client said `BYE`.
    Bye,
    /// The broker is stopping.
    Shutdown,
    /// The backlog overflowed under `--overflow disconnect`.
    SlowConsumer,
    /// The process named by `pid=` exited.
    PidExited,
    /// The client directory, `send` or `recv` was deleted or renamed.
    Removed,
    /// An unexpected I/O error on the client's FIFOs.
    Io(String),
    /// No `pid=`, the table was full, and it was the client idle longest.
    Evicted,
    /// No `pid=`, and idle for `--orphan-timeout`.
    IdleTimeout,
}

impl CloseReason {
    /// Whether queued lines (and a final `BYE`) are still worth writing.
    pub fn flushes(&self) -> bool {
        matches!(self, CloseReason::Bye | CloseReason::Shutdown)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::Bye => "bye",
            CloseReason::Shutdown => "shutdown",
            CloseReason::SlowConsumer => "slow-consumer",
            CloseReason::PidExited => "pid-exited",
            CloseReason::Removed => "removed",
            CloseReason::Io(_) => "io-error",
            CloseReason::Evicted => "evicted",
            CloseReason::IdleTimeout => "idle-timeout",
        }
    }
}

/// One queued line. `published` is when the broker read the `PUB` it came
/// from (for the delivery-latency histogram); `None` for control lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub line: Bytes,
    pub published: Option<Instant>,
}

impl Entry {
    pub fn control(line: Bytes) -> Self {
        Entry {
            line,
            published: None,
        }
    }
}

/// The result of one [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Queued, but older lines were discarded to make room (drop-oldest).
    QueuedDropping(usize),
    /// The line itself was discarded (drop-newest).
    Dropped,
    /// The line itself was discarded under drop-oldest, with the given
    /// number of lines in all (this one included): the queue ran empty and
    /// the writer's hand still fills the cap, so there was nothing older
    /// left to drop. The gap is reported where it is (first in the next batch).
    Skipped(usize),
    /// The overflow ended this client (disconnect policy), discarding this
    /// line and the given number of queued ones.
    Disconnected(usize),
    /// The client is already ending; the line was ignored.
    Closed,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Entry>,
    /// Line bytes queued plus those in the writer's hand.
    bytes: usize,
    /// Bytes and lines the writer took and has not reported written.
    in_hand: usize,
    in_hand_lines: usize,
    /// Lines discarded since the client was last told.
    dropped: u64,
    /// Lines discarded by a close that does not flush.
    discarded_at_close: usize,
    end: Option<CloseReason>,
}

impl State {
    /// Queued messages; BYE, PONG, ERR or DROPPED lines are not data to lose.
    fn messages_queued(&self) -> usize {
        self.queue.iter().filter(|e| e.published.is_some()).count()
    }

    /// What this outbox holds against the memory budget.
    fn charged(&self) -> usize {
        self.bytes + (self.queue.len() + self.in_hand_lines) * ENTRY_COST
    }

    /// The part of [`State::charged`] in the writer's hand.
    fn in_hand_charged(&self) -> usize {
        self.in_hand + self.in_hand_lines * ENTRY_COST
    }

    /// Gives a line made by `take` (a gap marker) straight to the writer,
    /// counted as in its hand.
    fn hand_over(&mut self, e: Entry, into: &mut VecDeque<Entry>, budget: &MemoryBudget) {
        budget.charge(e.line.len() + ENTRY_COST);
        self.bytes += e.line.len();
        self.in_hand += e.line.len();
        self.in_hand_lines += 1;
        into.push_back(e);
    }

    fn push_back(&mut self, e: Entry, budget: &MemoryBudget) {
        budget.charge(e.line.len() + ENTRY_COST);
        self.bytes += e.line.len();
        self.queue.push_back(e);
    }

    /// Discards queued lines from the front while `more(self, freed so
    /// far)`, counting them as dropped; returns (lines, bytes freed against
    /// the budget), which the caller credits.
    fn drop_front(&mut self, mut more: impl FnMut(&State, usize) -> bool) -> (usize, usize) {
        let (mut n, mut freed) = (0, 0);
        while !self.queue.is_empty() && more(self, freed) {
            let old = self.queue.pop_front().expect("checked non-empty");
            self.bytes -= old.line.len();
            freed += old.line.len() + ENTRY_COST;
            n += 1;
        }
        self.dropped += n as u64;
        (n, freed)
    }

    /// Empties the queue (not the writer's hand); returns the bytes freed
    /// against the budget, which the caller credits.
    fn clear_queue(&mut self) -> usize {
        let lines: usize = self.queue.iter().map(|e| e.line.len()).sum();
        let freed = lines + self.queue.len() * ENTRY_COST;
        self.bytes -= lines;
        self.queue.clear();
        freed
    }
}

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer (one waiter).
    wake: Notify,
    /// Wakes the session when the client is being ended (any number of waiters).
    closing: Notify,
    limits: BacklogLimits,
    budget: Arc<MemoryBudget>,
    /// The client holds a lossless subscription: nothing is dropped for it.
    lossless: AtomicBool,
    /// Woken when a lossless outbox drains to half its caps, or closes.
    room: Notify,
    /// Lossless outboxes this client's published lines filled: its reader
    /// reads nothing more until they have room. Weak: two clients may
    /// publish to each other.
    stalled_on: Mutex<Vec<Weak<Outbox>>>,
}

impl Outbox {
    /// An outbox under a budget of its own, unlimited (tests, benchmarks).
    pub fn new(limits: BacklogLimits) -> Self {
        Self::with_budget(limits, Arc::default())
    }

    /// An outbox that charges what it holds to the broker's `budget`.
    pub fn with_budget(limits: BacklogLimits, budget: Arc<MemoryBudget>) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            closing: Notify::new(),
            limits,
            budget,
            lossless: AtomicBool::new(false),
            room: Notify::new(),
            stalled_on: Mutex::default(),
        }
    }

    /// Makes this a lossless outbox (the client holds a lossless
    /// subscription), or an ordinary one again. Only the router calls it.
    pub fn set_lossless(&self, on: bool) {
        self.lossless.store(on, Relaxed);
        if !on {
            self.room.notify_waiters();
        }
    }

    pub fn is_lossless(&self) -> bool {
        self.lossless.load(Relaxed)
    }

    /// Queues a line for a lossless client: never dropped, whatever the
    /// caps. Returns the outcome and whether the backlog is now full, in
    /// which case the caller stalls the line's publisher on this outbox.
    /// The caps are passed only by what publishers had sent before they
    /// were stalled (bounded by the router's channel).
    pub fn push_lossless(&self, mut entry: Entry) -> (Push, bool) {
        let mut s = self.lock();
        if s.end.is_some() {
            return (Push::Closed, false);
        }
        if s.queue.len() >= PIN_LINES {
            entry.line = Bytes::copy_from_slice(&entry.line);
        }
        let was_empty = s.queue.is_empty();
        s.push_back(entry, &self.budget);
        let full = self.full(&s);
        drop(s);
        if was_empty {
            self.wake.notify_one();
        }
        (Push::Queued, full)
    }

    /// Queues a line for a lossless client from a publisher it may not
    /// hold back (another user's): queued while there is room; once full,
    /// discarded, with one `DROPPED <n>` kept at the back of the queue where
    /// the gap is (consecutive losses add up in it, so it costs one line).
    /// Nothing already queued is touched.
    pub fn push_unstallable(&self, entry: Entry) -> Push {
        let mut s = self.lock();
        if s.end.is_some() {
            return Push::Closed;
        }
        if !self.full(&s) {
            drop(s);
            return self.push_lossless(entry).0;
        }
        let before = match s.queue.back().and_then(gap_marker) {
            Some(n) => {
                let old = s.queue.pop_back().expect("just seen");
                s.bytes -= old.line.len();
                self.budget.credit(old.line.len() + ENTRY_COST);
                n
            }
            None => 0,
        };
        s.push_back(Entry::control(encode::dropped(before + 1)), &self.budget);
        Push::Dropped
    }

    /// At or over either cap.
    fn full(&self, s: &State) -> bool {
        s.queue.len() + s.in_hand_lines >= self.limits.messages || s.bytes >= self.limits.bytes
    }

    /// Over half of either cap: a stalled publisher waits for less.
    fn above_half(&self, s: &State) -> bool {
        s.queue.len() + s.in_hand_lines > self.limits.messages / 2
            || s.bytes > self.limits.bytes / 2
    }

    /// Whether a publisher stalled on this outbox must go on waiting.
    fn blocks(&self) -> bool {
        let s = self.lock();
        s.end.is_none() && self.is_lossless() && self.above_half(&s)
    }

    /// Whether this is a lossless client whose backlog is full now: it is
    /// holding up its publishers (for `/metrics`).
    pub fn is_lossless_full(&self) -> bool {
        let s = self.lock();
        s.end.is_none() && self.is_lossless() && self.full(&s)
    }

    /// Stops this client's reader until every outbox in `full` has drained
    /// to half its caps (or ended).
    pub fn stall_on(&self, full: &[Arc<Outbox>]) {
        let mut list = self.stalled_on.lock().unwrap_or_else(|p| p.into_inner());
        for o in full {
            let w = Arc::downgrade(o);
            if !list.iter().any(|x| x.ptr_eq(&w)) {
                list.push(w);
            }
        }
    }

    /// Whether this client's reader is stopped by a lossless outbox it
    /// filled (one that has drained to half since, or ended, no longer
    /// counts).
    pub fn is_stalled(&self) -> bool {
        let mut list = self.stalled_on.lock().unwrap_or_else(|p| p.into_inner());
        if list.is_empty() {
            return false;
        }
        list.retain(|w| w.upgrade().is_some_and(|o| o.blocks()));
        !list.is_empty()
    }

    /// Resolves once no lossless outbox this client filled still blocks it.
    pub async fn until_unstalled(&self) {
        loop {
            let blocker = {
                let mut list = self.stalled_on.lock().unwrap_or_else(|p| p.into_inner());
                list.retain(|w| w.upgrade().is_some_and(|o| o.blocks()));
                match list.first() {
                    None => return,
                    Some(w) => w.upgrade(),
                }
            };
            let Some(blocker) = blocker else { continue };
            let notified = blocker.room.notified();
            tokio::pin!(notified);
            // Register before checking, so a drain in between is not missed.
            notified.as_mut().enable();
            if !blocker.blocks() {
                continue;
            }
            notified.await;
        }
    }

    /// Queues a control line (`PONG`, `ERR`).
    pub fn push(&self, line: Bytes) -> Push {
        self.push_entry(Entry::control(line))
    }

    /// Queues one encoded line. Never blocks beyond a short lock. One line
    /// may exceed the byte cap when nothing else is held, so a line larger
    /// than the cap is still delivered to a reader that keeps up.
    pub fn push_entry(&self, mut entry: Entry) -> Push {
        let line_len = entry.line.len();
        let mut s = self.lock();
        if s.end.is_some() {
            return Push::Closed;
        }
        // A control line (PONG, ERR) on an empty queue is taken even when
        // the writer's hand alone fills the caps: dropping it there would
        // lose a PONG with nothing else to drop, and break the PING barrier
        // of a client that reads. (One such line at a time: bounded.)
        let control_on_empty = entry.published.is_none();
        let over = |s: &State| {
            s.bytes > 0
                && !(control_on_empty && s.queue.is_empty())
                && (s.queue.len() >= self.limits.messages || s.bytes + line_len > self.limits.bytes)
        };
        let mut outcome = Push::Queued;
        if over(&s) {
            match self.limits.policy {
                OverflowPolicy::DropOldest => {
                    let (n, freed) = s.drop_front(|s, _| over(s));
                    self.budget.credit(freed);
                    if over(&s) {
                        // Everything older is in the writer's hand.
                        s.dropped += 1;
                        return Push::Skipped(n + 1);
                    }
                    outcome = Push::QueuedDropping(n);
                }
                OverflowPolicy::DropNewest => {
                    s.dropped += 1;
                    return Push::Dropped;
                }
                OverflowPolicy::Disconnect => {
                    let discarded = s.queue.len();
                    self.end_slow(s);
                    return Push::Disconnected(discarded);
                }
            }
        }
        // Lines come from the router's encoding arena, sharing 16 KiB chunks
        // with their neighbours. A client that is backed up keeps private
        // copies instead, so it pins at most PIN_LINES chunks here (plus as
        // many in its writer's hand: about 2 MiB) however long its backlog:
        // the byte cap stays honest.
        if s.queue.len() >= PIN_LINES {
            entry.line = Bytes::copy_from_slice(&entry.line);
        }
        let was_empty = s.queue.is_empty();
        if s.dropped > 0 && self.limits.policy != OverflowPolicy::DropOldest {
            // Under drop-newest the gap is behind everything queued: mark
            // it here, before the first line that made it through after it.
            let d = std::mem::take(&mut s.dropped);
            s.push_back(Entry::control(encode::dropped(d)), &self.budget);
        }
        s.push_back(entry, &self.budget);
        drop(s);
        // The writer drains everything it finds, so it needs waking only when
        // the queue goes from empty to non-empty.
        if was_empty {
            self.wake.notify_one();
        }
        outcome
    }

    /// Frees about `want` bytes of this client's backlog for the broker's
    /// memory budget, as its overflow policy says: drop-oldest discards from
    /// the front, drop-newest from the back (its newest lines), disconnect
    /// ends the client. Lines in the writer's hand are not touched. Returns
    /// (lines discarded, bytes freed against the budget).
    pub fn shed(&self, want: usize) -> (usize, usize) {
        let mut s = self.lock();
        if s.end.is_some() || s.queue.is_empty() {
            return (0, 0);
        }
        let (lines, freed) = match self.limits.policy {
            OverflowPolicy::DropOldest => s.drop_front(|_, freed| freed < want),
            OverflowPolicy::DropNewest => {
                let (mut n, mut freed) = (0, 0);
                loop {
                    let marker = match s.queue.back() {
                        None => break,
                        Some(e) => gap_marker(e),
                    };
                    // Past `want`, go on only to fold a gap marker left at
                    // the back into the gap there.
                    if freed >= want && marker.is_none() {
                        break;
                    }
                    let e = s.queue.pop_back().expect("checked above");
                    s.bytes -= e.line.len();
                    freed += e.line.len() + ENTRY_COST;
                    s.dropped += marker.unwrap_or(1);
                    n += usize::from(marker.is_none());
                }
                (n, freed)
            }
            OverflowPolicy::Disconnect => {
                let n = s.messages_queued();
                return (n, self.end_slow(s));
            }
        };
        self.budget.credit(freed);
        (lines, freed)
    }

    /// Ends the client under the disconnect policy: discards the queue,
    /// credits the budget, wakes its writer and session. Returns the bytes
    /// freed against the budget.
    fn end_slow(&self, mut s: std::sync::MutexGuard<'_, State>) -> usize {
        let freed = s.clear_queue();
        self.budget.credit(freed);
        s.end = Some(CloseReason::SlowConsumer);
        drop(s);
        self.wake.notify_one();
        self.closing.notify_waiters();
        self.room.notify_waiters();
        freed
    }

    /// Ends this client. The first reason wins, except that a reason that
    /// does not flush (the client is gone) overrides a pending flush. For
    /// reasons that flush, queued lines stay and `farewell` is appended past
    /// the caps (after any `DROPPED` owed); otherwise the queue is discarded.
    /// Returns `None` if the reason was not taken, else how many queued lines
    /// were discarded.
    pub fn close(&self, reason: CloseReason, farewell: Option<Bytes>) -> Option<usize> {
        let mut s = self.lock();
        match &s.end {
            Some(current) if !current.flushes() || reason.flushes() => return None,
            _ => {}
        }
        let mut discarded = 0;
        if reason.flushes() {
            if let Some(f) = farewell {
                // Under drop-newest the gap is at the end: report it before
                // the farewell, which is the last line a client reads.
                if s.dropped > 0 && self.limits.policy != OverflowPolicy::DropOldest {
                    let d = std::mem::take(&mut s.dropped);
                    s.push_back(Entry::control(encode::dropped(d)), &self.budget);
                }
                s.push_back(Entry::control(f), &self.budget);
            }
        } else {
            discarded = s.messages_queued();
            let freed = s.clear_queue();
            self.budget.credit(freed);
        }
        s.discarded_at_close = discarded;
        s.end = Some(reason);
        drop(s);
        self.wake.notify_one();
        self.closing.notify_waiters();
        self.room.notify_waiters();
        Some(discarded)
    }

    /// Resolves once the client is being ended (now or later).
    pub async fn closed(&self) {
        let notified = self.closing.notified();
        tokio::pin!(notified);
        // Register before checking, so a close in between is not missed.
        notified.as_mut().enable();
        if self.is_closed() {
            return;
        }
        notified.await
    }

    /// Why the client is ending, if it is.
    pub fn reason(&self) -> Option<CloseReason> {
        self.lock().end.clone()
    }

    /// Moves the next batch of queued lines into `into` (at most
    /// [`TAKE_LINES`] lines and [`TAKE_BYTES`] or the byte cap, at least
    /// one line), with a `DROPPED` line where a gap is. They stay counted as
    /// the client's until reported with [`Outbox::written`]. Returns the
    /// close reason if the client is ending and nothing is left queued:
    /// once `into` is written, the writer is done.
    pub fn take(&self, into: &mut VecDeque<Entry>) -> Option<CloseReason> {
        let mut s = self.lock();
        let gap_first = self.limits.policy == OverflowPolicy::DropOldest;
        if s.dropped > 0 && gap_first {
            let d = std::mem::take(&mut s.dropped);
            s.hand_over(Entry::control(encode::dropped(d)), into, &self.budget);
        }
        let max_bytes = TAKE_BYTES.min(self.limits.bytes);
        let (mut n, mut bytes) = (0, 0);
        for e in &s.queue {
            if n > 0 && (n >= TAKE_LINES || bytes + e.line.len() > max_bytes) {
                break;
            }
            n += 1;
            bytes += e.line.len();
        }
        into.extend(s.queue.drain(..n));
        s.in_hand += bytes;
        s.in_hand_lines += n;
        if !s.queue.is_empty() {
            return None;
        }
        if s.dropped > 0 && !gap_first {
            let d = std::mem::take(&mut s.dropped);
            s.hand_over(Entry::control(encode::dropped(d)), into, &self.budget);
        }
        s.end.clone()
    }

    /// The writer wrote `bytes` of what it took, completing `lines` lines
    /// (or discarded them, the client being gone): no longer the client's
    /// to hold.
    pub fn written(&self, bytes: usize, lines: usize) {
        if bytes == 0 && lines == 0 {
            return;
        }
        let mut s = self.lock();
        s.bytes -= bytes;
        s.in_hand -= bytes;
        s.in_hand_lines -= lines;
        let room = self.is_lossless() && !self.above_half(&s);
        drop(s);
        self.budget.credit(bytes + lines * ENTRY_COST);
        if room {
            self.room.notify_waiters();
        }
    }

    /// Whether a line of `line_len` bytes would be queued without the
    /// overflow policy acting: how a queue group passes over a busy member.
    pub fn has_room(&self, line_len: usize) -> bool {
        let s = self.lock();
        s.end.is_none()
            && (s.bytes == 0
                || (s.queue.len() < self.limits.messages
                    && s.bytes + line_len <= self.limits.bytes))
    }

    /// Bytes queued that [`Outbox::shed`] could free now (not those in the
    /// writer's hand), for the router to find the largest backlogs.
    pub fn sheddable(&self) -> usize {
        let s = self.lock();
        // A lossless client's lines are never discarded; it is bounded by
        // stalling its publishers instead.
        if s.end.is_some() || self.is_lossless() {
            return 0;
        }
        s.charged() - s.in_hand_charged()
    }

    /// The close reason, if one was set and it does not flush: the writer
    /// checks this while waiting on a full pipe, so that a client that was
    /// removed or disconnected does not keep it waiting.
    pub fn abandoned(&self) -> Option<CloseReason> {
        self.lock().end.clone().filter(|r| !r.flushes())
    }

    /// Lines that will never be written: discarded by the close, plus any
    /// still queued. For the `client-gone` drop count at teardown.
    pub fn undelivered(&self) -> usize {
        let s = self.lock();
        s.discarded_at_close + s.messages_queued()
    }

    pub fn is_closed(&self) -> bool {
        self.lock().end.is_some()
    }

    /// Lines and bytes waiting, including what the writer took and has
    /// not written yet.
    pub fn backlog(&self) -> (usize, usize) {
        let s = self.lock();
        (s.queue.len() + s.in_hand_lines, s.bytes)
    }

    /// Waits until something was pushed or the outbox was closed since the
    /// last wait. A push that happened before this call still wakes it.
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The count of a `DROPPED` line that `push_entry` put in the queue.
fn gap_marker(e: &Entry) -> Option<u64> {
    let line = e.line.strip_suffix(b"\n").unwrap_or(&e.line);
    match (e.published, Reply::parse(line)) {
        (None, Reply::Dropped(d)) => Some(d),
        _ => None,
    }
}

impl Drop for Outbox {
    /// Whatever is still held goes back to the budget with the client.
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        self.budget.credit(s.charged());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(messages: usize, bytes: usize, policy: OverflowPolicy) -> Outbox {
        Outbox::new(BacklogLimits {
            messages,
            bytes,
            policy,
        })
    }

    fn line(s: &str) -> Bytes {
        Bytes::from(format!("{s}\n"))
    }

    fn taken(o: &Outbox) -> Vec<String> {
        let mut q = VecDeque::new();
        o.take(&mut q);
        q.iter()
            .map(|e| String::from_utf8_lossy(&e.line).trim_end().to_string())
            .collect()
    }

    #[test]
    fn drop_oldest_reports_the_gap_first() {
        let o = outbox(2, 1 << 20, OverflowPolicy::DropOldest);
        for s in ["a", "b", "c", "d"] {
            o.push(line(s));
        }
        assert_eq!(taken(&o), ["DROPPED 2", "c", "d"]);
        o.push(line("e"));
        assert_eq!(taken(&o), ["e"], "the count resets once reported");
    }

    #[test]
    fn drop_newest_reports_the_gap_last() {
        let o = outbox(2, 1 << 20, OverflowPolicy::DropNewest);
        let pushes: Vec<Push> = ["a", "b", "c", "d"]
            .iter()
            .map(|s| o.push(line(s)))
            .collect();
        assert_eq!(
            pushes,
            [Push::Queued, Push::Queued, Push::Dropped, Push::Dropped]
        );
        assert_eq!(taken(&o), ["a", "b", "DROPPED 2"]);
    }

    #[test]
    fn byte_cap_applies_as_well_as_line_cap() {
        let o = outbox(100, 4, OverflowPolicy::DropOldest);
        o.push(line("a")); // 2 bytes
        o.push(line("b")); // 4 bytes
        o.push(line("c")); // would be 6: drop "a"
        assert_eq!(o.backlog(), (2, 4));
        assert_eq!(taken(&o), ["DROPPED 1", "b", "c"]);
    }

    #[test]
    fn one_oversize_line_still_goes_through_an_empty_queue() {
        let o = outbox(10, 4, OverflowPolicy::DropNewest);
        assert_eq!(o.push(line("much too long")), Push::Queued);
        assert_eq!(o.push(line("x")), Push::Dropped);
    }

    #[test]
    fn disconnect_ends_the_client_and_discards_the_backlog() {
        let o = outbox(1, 1 << 20, OverflowPolicy::Disconnect);
        assert_eq!(o.push(line("a")), Push::Queued);
        assert_eq!(o.push(line("b")), Push::Disconnected(1));
        assert_eq!(o.abandoned(), Some(CloseReason::SlowConsumer));
        assert_eq!(o.push(line("c")), Push::Closed);
        assert!(taken(&o).is_empty());
    }

    #[test]
    fn a_backed_up_client_keeps_copies_not_arena_chunks() {
        let o = outbox(1000, 1 << 20, OverflowPolicy::DropOldest);
        let arena = Bytes::from(vec![b'x'; 200 * 4]);
        for i in 0..200 {
            o.push(arena.slice(i * 4..i * 4 + 4));
        }
        let mut q = VecDeque::new();
        o.take(&mut q);
        let in_arena = |e: &Entry| {
            let p = e.line.as_ptr() as usize;
            (arena.as_ptr() as usize..arena.as_ptr() as usize + arena.len()).contains(&p)
        };
        assert_eq!(q.iter().filter(|e| in_arena(e)).count(), PIN_LINES);
        assert!(q.iter().all(|e| e.line.len() == 4));
    }

    #[test]
    fn drop_newest_gap_is_reported_before_the_farewell() {
        let o = outbox(1, 1 << 20, OverflowPolicy::DropNewest);
        o.push(line("a"));
        o.push(line("b"));
        o.close(CloseReason::Bye, Some(encode::bye()));
        assert_eq!(taken(&o), ["a", "DROPPED 1", "BYE"]);
    }

    #[test]
    fn a_client_that_is_gone_overrides_a_pending_flush() {
        let o = outbox(10, 1 << 20, OverflowPolicy::DropOldest);
        o.push_entry(Entry {
            line: line("MSG t a"),
            published: Some(Instant::now()),
        });
        o.push(line("PONG"));
        assert_eq!(o.close(CloseReason::Bye, Some(encode::bye())), Some(0));
        assert_eq!(o.close(CloseReason::Shutdown, Some(encode::bye())), None);
        // Only the message counts as lost, not PONG or the farewell BYE.
        assert_eq!(o.close(CloseReason::Removed, None), Some(1));
        assert_eq!(o.undelivered(), 1);
        assert_eq!(o.abandoned(), Some(CloseReason::Removed));
        assert_eq!(o.close(CloseReason::PidExited, None), None);
    }

    #[test]
    fn flushing_close_keeps_the_queue_and_adds_the_farewell() {
        let o = outbox(1, 1 << 20, OverflowPolicy::DropOldest);
        o.push(line("a"));
        assert_eq!(o.close(CloseReason::Shutdown, Some(encode::bye())), Some(0));
        assert_eq!(
            o.close(CloseReason::Bye, Some(encode::bye())),
            None,
            "the first flushing reason wins over another"
        );
        let mut q = VecDeque::new();
        assert_eq!(o.take(&mut q), Some(CloseReason::Shutdown));
        assert_eq!(q.len(), 2);
        assert_eq!(o.abandoned(), None);
    }

    fn msg(s: &str) -> Entry {
        Entry {
            line: line(s),
            published: Some(Instant::now()),
        }
    }

    fn budgeted(bytes: usize, policy: OverflowPolicy) -> (Outbox, Arc<MemoryBudget>) {
        let budget = Arc::new(MemoryBudget::default());
        let limits = BacklogLimits {
            messages: 1000,
            bytes,
            policy,
        };
        (Outbox::with_budget(limits, budget.clone()), budget)
    }

    #[test]
    fn the_byte_cap_counts_what_the_writer_holds_until_it_is_written() {
        let o = outbox(100, 6, OverflowPolicy::DropOldest);
        o.push(line("a"));
        o.push(line("b"));
        let mut hand = VecDeque::new();
        o.take(&mut hand); // the writer holds "a", "b" (4 bytes)
        assert_eq!(o.backlog(), (2, 4), "taken is still held");
        o.push(line("c")); // 6: fits
        o.push(line("d")); // 8: "c" goes, the writer's lines cannot
        assert_eq!(o.backlog(), (3, 6));
        o.written(4, 2);
        assert_eq!(o.backlog(), (1, 2));
        assert_eq!(taken(&o), ["DROPPED 1", "d"]);
    }

    #[test]
    fn with_the_cap_in_the_writers_hand_a_new_line_is_the_one_dropped() {
        let o = outbox(100, 4, OverflowPolicy::DropOldest);
        o.push_entry(msg("a"));
        o.push_entry(msg("b"));
        let mut hand = VecDeque::new();
        o.take(&mut hand);
        assert_eq!(o.push_entry(msg("c")), Push::Skipped(1));
        o.written(4, 2);
        o.push_entry(msg("d"));
        assert_eq!(taken(&o), ["DROPPED 1", "d"], "the gap where it is");
    }

    #[test]
    fn a_pong_is_kept_when_the_writers_hand_alone_fills_the_cap() {
        // The client reads, slowly: its PING barrier must still complete.
        let o = outbox(100, 4, OverflowPolicy::DropOldest);
        o.push_entry(msg("a"));
        o.push_entry(msg("b"));
        let mut hand = VecDeque::new();
        o.take(&mut hand);
        assert_eq!(o.push(line("PONG x")), Push::Queued);
        // Only on an empty queue: a second one is under the policy again
        // (a client that pings without reading holds one line past the cap).
        assert_eq!(o.push(line("PONG y")), Push::QueuedDropping(1));
        o.written(4, 2);
        assert_eq!(taken(&o), ["DROPPED 1", "PONG y"]);
    }

    #[test]
    fn the_writer_takes_one_writev_at_a_time_and_ends_only_when_drained() {
        let o = outbox(10_000, 1 << 30, OverflowPolicy::DropOldest);
        for i in 0..TAKE_LINES + 5 {
            o.push(line(&i.to_string()));
        }
        o.close(CloseReason::Bye, Some(encode::bye()));
        let mut hand = VecDeque::new();
        assert_eq!(o.take(&mut hand), None, "more is queued");
        assert_eq!(hand.len(), TAKE_LINES);
        hand.clear();
        assert_eq!(o.take(&mut hand), Some(CloseReason::Bye));
        assert_eq!(hand.len(), 6);
        // And by bytes: one line at least, however long.
        let o = outbox(10, 1 << 30, OverflowPolicy::DropOldest);
        o.push(Bytes::from(vec![b'x'; TAKE_BYTES + 1]));
        o.push(line("y"));
        hand.clear();
        o.take(&mut hand);
        assert_eq!(hand.len(), 1);
    }

    #[test]
    fn drop_newest_marks_the_gap_before_the_next_line_that_gets_through() {
        let o = outbox(2, 1 << 20, OverflowPolicy::DropNewest);
        for s in ["a", "b", "c"] {
            o.push(line(s));
        }
        let mut hand = VecDeque::new();
        o.take(&mut hand); // a, b in hand; the queue is empty, "c" was lost
        assert_eq!(hand.len(), 3, "a, b, then the gap, since nothing follows");
        let (n, b) = (hand.len(), hand.iter().map(|e| e.line.len()).sum());
        o.written(b, n);
        for s in ["d", "e", "f"] {
            o.push(line(s));
        }
        assert_eq!(taken(&o), ["d", "e", "DROPPED 1"]);
    }

    #[test]
    fn the_budget_is_charged_per_line_and_fully_given_back() {
        let (o, budget) = budgeted(1 << 20, OverflowPolicy::DropOldest);
        o.push_entry(msg("MSG t a")); // 8 bytes
        o.push(line("PONG")); // 5 bytes
        assert_eq!(budget.held(), 13 + 2 * ENTRY_COST);
        let mut hand = VecDeque::new();
        o.take(&mut hand);
        assert_eq!(budget.held(), 13 + 2 * ENTRY_COST, "in hand still counts");
        o.written(10, 1); // "MSG t a\n" and 2 bytes of "PONG\n"
        assert_eq!(budget.held(), 3 + ENTRY_COST);
        o.written(3, 1);
        assert_eq!(budget.held(), 0);
        o.push_entry(msg("MSG t b"));
        o.close(CloseReason::Removed, None);
        assert_eq!(budget.held(), 0, "a discarding close gives it back");
        let (o, budget) = budgeted(1 << 20, OverflowPolicy::DropOldest);
        o.push_entry(msg("MSG t c"));
        drop(o);
        assert_eq!(budget.held(), 0, "so does a client that goes");
    }

    #[test]
    fn shedding_under_drop_oldest_takes_from_the_front() {
        let (o, budget) = budgeted(1 << 20, OverflowPolicy::DropOldest);
        for s in ["a", "b", "c", "d"] {
            o.push_entry(msg(s));
        }
        assert_eq!(o.sheddable(), 4 * (2 + ENTRY_COST));
        assert_eq!(o.shed(2 * ENTRY_COST), (2, 2 * (2 + ENTRY_COST)));
        assert_eq!(budget.held(), 2 * (2 + ENTRY_COST));
        assert_eq!(taken(&o), ["DROPPED 2", "c", "d"]);
    }

    #[test]
    fn shedding_under_drop_newest_takes_the_newest_and_reports_the_gap_at_the_end() {
        let (o, _) = budgeted(1 << 20, OverflowPolicy::DropNewest);
        for s in ["a", "b", "c", "d"] {
            o.push_entry(msg(s));
        }
        assert_eq!(o.shed(1).0, 1);
        o.push_entry(msg("e"));
        assert_eq!(o.shed(1).0, 1, "takes e; the marker before it merges");
        assert_eq!(taken(&o), ["a", "b", "c", "DROPPED 2"]);
    }

    #[test]
    fn shedding_under_disconnect_ends_the_client() {
        let (o, budget) = budgeted(1 << 20, OverflowPolicy::Disconnect);
        o.push_entry(msg("a"));
        o.push_entry(msg("b"));
        assert_eq!(o.shed(1), (2, 2 * (2 + ENTRY_COST)));
        assert_eq!(o.abandoned(), Some(CloseReason::SlowConsumer));
        assert_eq!(budget.held(), 0);
        assert_eq!(o.sheddable(), 0, "an ending client is not shed again");
    }
}
