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
//! The writer swaps the whole queue out under one short lock (rumqttd's
//! `exchange`), so locking costs once per batch, not once per line.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::protocol::encode;

/// Queued lines that may share an encoding-arena chunk (see `push_entry`).
const PIN_LINES: usize = 64;

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
            messages: 100_000,
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
    /// The overflow ended this client (disconnect policy), discarding this
    /// line and the given number of queued ones.
    Disconnected(usize),
    /// The client is already ending; the line was ignored.
    Closed,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Entry>,
    bytes: usize,
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
}

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer (one waiter).
    wake: Notify,
    /// Wakes the session when the client is being ended (any number of waiters).
    closing: Notify,
    limits: BacklogLimits,
}

impl Outbox {
    pub fn new(limits: BacklogLimits) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            closing: Notify::new(),
            limits,
        }
    }

    /// Queues a control line (`PONG`, `ERR`).
    pub fn push(&self, line: Bytes) -> Push {
        self.push_entry(Entry::control(line))
    }

    /// Queues one encoded line. Never blocks beyond a short lock. One line
    /// may exceed the byte cap when the queue is empty, so a line larger than
    /// the cap is still delivered to a reader that keeps up.
    pub fn push_entry(&self, mut entry: Entry) -> Push {
        let line_len = entry.line.len();
        let mut s = self.lock();
        if s.end.is_some() {
            return Push::Closed;
        }
        let over = |s: &State| {
            !s.queue.is_empty()
                && (s.queue.len() >= self.limits.messages || s.bytes + line_len > self.limits.bytes)
        };
        let mut outcome = Push::Queued;
        if over(&s) {
            match self.limits.policy {
                OverflowPolicy::DropOldest => {
                    let mut n = 0;
                    while over(&s) {
                        let old = s.queue.pop_front().expect("over() implies non-empty");
                        s.bytes -= old.line.len();
                        n += 1;
                    }
                    s.dropped += n as u64;
                    outcome = Push::QueuedDropping(n);
                }
                OverflowPolicy::DropNewest => {
                    s.dropped += 1;
                    return Push::Dropped;
                }
                OverflowPolicy::Disconnect => {
                    let discarded = s.queue.len();
                    s.queue.clear();
                    s.bytes = 0;
                    s.end = Some(CloseReason::SlowConsumer);
                    drop(s);
                    self.wake.notify_one();
                    self.closing.notify_waiters();
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
        s.bytes += line_len;
        s.queue.push_back(entry);
        drop(s);
        // The writer drains everything it finds, so it needs waking only when
        // the queue goes from empty to non-empty.
        if was_empty {
            self.wake.notify_one();
        }
        outcome
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
                    s.queue.push_back(Entry::control(encode::dropped(d)));
                }
                s.bytes += f.len();
                s.queue.push_back(Entry::control(f));
            }
        } else {
            discarded = s.messages_queued();
            s.queue.clear();
            s.bytes = 0;
        }
        s.discarded_at_close = discarded;
        s.end = Some(reason);
        drop(s);
        self.wake.notify_one();
        self.closing.notify_waiters();
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

    /// Moves every queued line into `into` (with a `DROPPED` line where the
    /// gap is) and returns the close reason if the client is ending: once
    /// `into` is written, the writer is done.
    pub fn take(&self, into: &mut VecDeque<Entry>) -> Option<CloseReason> {
        let mut s = self.lock();
        let dropped = std::mem::take(&mut s.dropped);
        if dropped > 0 && self.limits.policy == OverflowPolicy::DropOldest {
            into.push_back(Entry::control(encode::dropped(dropped)));
        }
        into.append(&mut s.queue);
        if dropped > 0 && self.limits.policy != OverflowPolicy::DropOldest {
            into.push_back(Entry::control(encode::dropped(dropped)));
        }
        s.bytes = 0;
        s.end.clone()
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

    /// Lines and bytes waiting (not counting what the writer already took).
    pub fn backlog(&self) -> (usize, usize) {
        let s = self.lock();
        (s.queue.len(), s.bytes)
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
}
