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
//! The queue is bytes, not entries: lines are copied into pooled 4 KiB
//! blocks ([`ByteQueue`]), as Redis copies replies into a client's output
//! buffer and nats-server into its pending buffers, so a delivery costs a
//! `memcpy` and no allocation; line boundaries are found again with
//! `memchr` where drop-oldest, drop-newest and `DROPPED` placement need
//! them, and per-line metadata is kept only per run of lines of one kind
//! ([`Run`]: typically all a reader batch delivered to this client).
//!
//! The router queues a whole batch's lines for a client at once
//! ([`Outbox::push_run`], one lock and at most one wake-up) when it knows
//! without the lock that they fit ([`Outbox::fits`]), and one line at a
//! time ([`Outbox::push_line`], the overflow policy applied) otherwise.
//!
//! The writer copies a batch of whole lines (up to [`TAKE_BYTES`]) into a
//! buffer of its own ([`Batch`]) under one short lock (rumqttd's
//! `exchange`), so locking costs once per batch, not once per line, and it
//! writes them with one `write`. What it took stays counted, against the client's byte cap
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
//! Every queued byte is also charged to the broker-wide [`MemoryBudget`],
//! plus [`RUN_COST`] per queued run. The router enforces the budget by
//! calling [`Outbox::shed`] on the largest backlogs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::counters::MemoryBudget;
use crate::protocol::encode;

/// What one queued run of lines costs beyond its bytes, charged to the
/// memory budget: its slot in the run deque (32 bytes) with room for the
/// deque's spare capacity. Not charged: the unused tail of the last block
/// (under a block, 4 KiB, per client with a backlog) and the shared pool of free
/// blocks (bounded, 4 MiB), nor the writer's reused buffer (its bytes in
/// hand are charged, its spare capacity is not).
pub const RUN_COST: usize = 64;
/// Bytes the writer takes at once (at least one line), so that a writer
/// stuck on a full pipe holds little that the budget cannot reclaim.
pub const TAKE_BYTES: usize = 64 * 1024;
/// Room [`Outbox::fits`] keeps for a `DROPPED <n>` line (at most 29 bytes).
const GAP_ROOM: usize = 32;

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

/// What a run of queued lines is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `MSG` (or `REQUEST`) lines the broker read at this instant (for the
    /// delivery-latency histogram).
    Msg(Instant),
    /// `PONG`, `ERR`, `BYE`, ...: not data to lose, not timed.
    Control,
    /// One `DROPPED <n>` line the queue holds where a gap is (drop-newest,
    /// or a lossless client's unstallable publisher): folded into the next
    /// gap rather than kept as a line of its own.
    Gap(u64),
}

impl Kind {
    fn published(self) -> Option<Instant> {
        match self {
            Kind::Msg(t) => Some(t),
            _ => None,
        }
    }
}

/// Consecutive queued lines of one kind: all a reader batch delivered to
/// this client, typically. Line boundaries inside a run are found again
/// with `memchr` (lines end in `\n`, payloads never hold one), so the
/// metadata costs one slot per run, not per line.
#[derive(Debug, Clone, Copy)]
struct Run {
    lines: usize,
    bytes: usize,
    kind: Kind,
}

/// Bytes per block of a queue: a page. Small, because every client with
/// anything queued holds at least one: with 64 KiB blocks, 6,200
/// subscribers each queueing a few lines per batch (100 topics × 62) took,
/// faulted in and gave back 64 KiB each per batch, and ran at a third of
/// the speed.
const BLOCK: usize = 4 * 1024;
/// Free blocks kept for reuse by all outboxes together (4 MiB): enough
/// that a steady stream to many clients takes and gives back blocks
/// without calling the allocator, few enough that a burst's memory goes
/// back to the system once it is over.
const POOL_MAX: usize = 1024;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty block of capacity [`BLOCK`] (filled by `extend`, so a new
/// one is never zeroed first).
fn block_get() -> Vec<u8> {
    let spare = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
    spare.unwrap_or_else(|| Vec::with_capacity(BLOCK))
}

fn block_put(mut b: Vec<u8>) {
    b.clear();
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < POOL_MAX {
        pool.push(b);
    }
}

/// The queued bytes: a FIFO of pooled fixed-size blocks. Lines are copied
/// in (no allocation per line, and no buffer shared with anything else,
/// so what a client holds is what it is charged); an empty queue holds no
/// block, so an idle client costs nothing here.
///
/// Every block but the last is full (`BLOCK` bytes), so offsets map to
/// blocks by division.
#[derive(Debug, Default)]
struct ByteQueue {
    blocks: VecDeque<Vec<u8>>,
    /// Where the first byte is in `blocks[0]`.
    head: usize,
    len: usize,
    /// The last block, kept when the queue drained while `keep_spare`: a
    /// client that receives a few lines per batch reuses it instead of
    /// taking one from the pool (or the allocator, when 6,200 such clients
    /// outrun the pool) each time. Its writer asks for this while it
    /// streams and gives it back once quiet ([`Outbox::keep_buffers`]).
    spare: Option<Vec<u8>>,
    keep_spare: bool,
}

impl ByteQueue {
    fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.blocks.back().is_none_or(|b| b.len() == BLOCK) {
                let b = self.spare.take().unwrap_or_else(block_get);
                self.blocks.push_back(b);
            }
            let b = self.blocks.back_mut().expect("just made sure");
            let n = (BLOCK - b.len()).min(data.len());
            b.extend_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
        }
    }

    /// The bytes in `from..to` (offsets from the front), block by block,
    /// each with its offset.
    fn segments(&self, from: usize, to: usize) -> impl DoubleEndedIterator<Item = (usize, &[u8])> {
        let (a, b) = (self.head + from, self.head + to);
        let blocks = if a < b {
            a / BLOCK..(b - 1) / BLOCK + 1
        } else {
            0..0
        };
        blocks.map(move |i| {
            let lo = a.max(i * BLOCK) - i * BLOCK;
            let hi = b.min((i + 1) * BLOCK) - i * BLOCK;
            (i * BLOCK + lo - self.head, &self.blocks[i][lo..hi])
        })
    }

    /// The offset of the first `\n` at or after `from`.
    fn find_newline(&self, from: usize) -> Option<usize> {
        self.segments(from, self.len)
            .find_map(|(off, s)| memchr::memchr(b'\n', s).map(|p| off + p))
    }

    /// The offset of the last `\n` in `from..to`.
    fn rfind_newline(&self, from: usize, to: usize) -> Option<usize> {
        self.segments(from, to)
            .rev()
            .find_map(|(off, s)| memchr::memrchr(b'\n', s).map(|p| off + p))
    }

    fn count_newlines(&self, from: usize, to: usize) -> usize {
        self.segments(from, to)
            .map(|(_, s)| memchr::memchr_iter(b'\n', s).count())
            .sum()
    }

    fn copy_front(&self, n: usize, into: &mut Vec<u8>) {
        for (_, s) in self.segments(0, n) {
            into.extend_from_slice(s);
        }
    }

    /// Discards `n` bytes from the front; emptied blocks go back to the pool.
    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.head += n;
        self.len -= n;
        if self.len == 0 {
            self.clear();
            return;
        }
        while self.head >= BLOCK {
            block_put(self.blocks.pop_front().expect("head is inside the blocks"));
            self.head -= BLOCK;
        }
    }

    /// Discards `n` bytes from the back.
    fn truncate_back(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        if self.len == 0 {
            self.clear();
            return;
        }
        let end = self.head + self.len;
        let needed = end.div_ceil(BLOCK);
        while self.blocks.len() > needed {
            block_put(self.blocks.pop_back().expect("more blocks than needed"));
        }
        if let Some(last) = self.blocks.back_mut() {
            last.truncate(end - (needed - 1) * BLOCK);
        }
    }

    fn clear(&mut self) {
        for mut b in self.blocks.drain(..) {
            if self.keep_spare && self.spare.is_none() {
                b.clear();
                self.spare = Some(b);
            } else {
                block_put(b);
            }
        }
        if self.blocks.capacity() > 64 {
            // A burst's index of blocks; an idle client keeps none.
            self.blocks = VecDeque::new();
        }
        self.head = 0;
        self.len = 0;
    }
}

/// What a writer took from its outbox ([`Outbox::take`]) and has not
/// written yet: whole lines, copied into a buffer the writer keeps and
/// reuses, so that it writes large contiguous chunks with one `write`
/// while the router goes on queueing.
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
    /// Bytes of `buf` written already.
    pos: usize,
    /// The unwritten lines, by run (the front one possibly part written).
    runs: VecDeque<Run>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// What is left to write.
    pub fn unwritten(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Lines not completely written.
    pub fn line_count(&self) -> usize {
        self.runs.iter().map(|r| r.lines).sum()
    }

    /// The unwritten lines, each with its `\n` (tests, benchmarks).
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.unwritten().split_inclusive(|&b| b == b'\n')
    }

    /// Records that `n` more bytes were written; calls `published` with the
    /// read time of the `MSG` lines completed and how many there are (once
    /// per run they belong to). Returns the lines completed.
    pub fn wrote(&mut self, n: usize, mut published: impl FnMut(Instant, usize)) -> usize {
        let (mut at, mut left, mut lines) = (self.pos, n, 0);
        self.pos += n;
        while left > 0 {
            let run = self.runs.front_mut().expect("wrote more than was taken");
            let done = if left >= run.bytes {
                let r = self.runs.pop_front().expect("just seen");
                left -= r.bytes;
                at += r.bytes;
                (r.lines, r.kind)
            } else {
                let k = memchr::memchr_iter(b'\n', &self.buf[at..at + left]).count();
                run.lines -= k;
                run.bytes -= left;
                left = 0;
                (k, run.kind)
            };
            lines += done.0;
            if let Some(t) = done.1.published() {
                published(t, done.0);
            }
        }
        lines
    }

    /// Forgets what is left: (bytes, lines) the caller reports to
    /// [`Outbox::written`] as gone.
    pub fn clear(&mut self) -> (usize, usize) {
        let left = (self.buf.len() - self.pos, self.line_count());
        self.buf.clear();
        self.pos = 0;
        self.runs.clear();
        left
    }

    /// Gives the buffers back once everything is written (a writer gone
    /// quiet), so that idle clients hold nothing.
    pub fn release(&mut self) {
        if self.is_empty() {
            *self = Batch::default();
        }
    }

    /// Makes room for a take: drops what was written; a buffer a huge line
    /// grew goes back to the usual size once written.
    fn compact(&mut self) {
        if self.is_empty() {
            self.buf.clear();
            self.pos = 0;
            if self.buf.capacity() > 4 * TAKE_BYTES {
                self.buf.shrink_to(TAKE_BYTES);
            }
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    fn push_gap(&mut self, n: u64) -> usize {
        let before = self.buf.len();
        encode::put_dropped(&mut self.buf, n);
        let len = self.buf.len() - before;
        self.runs.push_back(Run {
            lines: 1,
            bytes: len,
            kind: Kind::Gap(n),
        });
        len
    }
}

#[derive(Debug, Default)]
struct State {
    data: ByteQueue,
    runs: VecDeque<Run>,
    /// Lines queued (not those in the writer's hand).
    lines: usize,
    /// Of those, messages (`Kind::Msg`).
    msgs: usize,
    /// Line bytes queued plus those in the writer's hand.
    bytes: usize,
    /// Bytes and lines the writer took and has not reported written.
    in_hand: usize,
    in_hand_lines: usize,
    /// What is charged to the memory budget now ([`State::charged`] as of
    /// the last [`Outbox::settle`]).
    charged_now: usize,
    /// Lines discarded since the client was last told.
    dropped: u64,
    /// Lines discarded by a close that does not flush.
    discarded_at_close: usize,
    end: Option<CloseReason>,
}

impl State {
    /// What this outbox holds against the memory budget: every byte queued
    /// or in the writer's hand, plus [`RUN_COST`] per queued run.
    fn charged(&self) -> usize {
        self.bytes + self.runs.len() * RUN_COST
    }

    /// Queues `bytes` of `lines` whole lines of one kind, after what is
    /// queued (merged into the last run when it is of the same kind).
    fn append<'a>(
        &mut self,
        parts: impl IntoIterator<Item = &'a [u8]>,
        lines: usize,
        bytes: usize,
        kind: Kind,
    ) {
        for p in parts {
            self.data.push(p);
        }
        self.lines += lines;
        self.bytes += bytes;
        if matches!(kind, Kind::Msg(_)) {
            self.msgs += lines;
        }
        match self.runs.back_mut() {
            Some(r) if r.kind == kind && !matches!(kind, Kind::Gap(_)) => {
                r.lines += lines;
                r.bytes += bytes;
            }
            _ => self.runs.push_back(Run { lines, bytes, kind }),
        }
    }

    fn append_line(&mut self, line: &[u8], kind: Kind) {
        debug_assert!(line.ends_with(b"\n"), "a line ends in a newline");
        self.append([line], 1, line.len(), kind);
    }

    fn append_gap(&mut self, n: u64) {
        let mut b = [0u8; encode::DROPPED_MAX];
        let mut w = &mut b[..];
        encode::put_dropped(&mut w, n);
        let len = encode::DROPPED_MAX - w.len();
        self.append_line(&b[..len], Kind::Gap(n));
    }

    /// Forgets `n` lines of `len` bytes just taken off run `r`.
    fn unqueue(&mut self, kind: Kind, n: usize, len: usize) {
        self.lines -= n;
        if matches!(kind, Kind::Msg(_)) {
            self.msgs -= n;
        }
        self.bytes -= len;
    }

    /// Discards the first queued line; returns its kind.
    fn pop_front_line(&mut self) -> Option<Kind> {
        let run = self.runs.front_mut()?;
        let len = if run.lines == 1 {
            run.bytes
        } else {
            self.data.find_newline(0).expect("a run holds whole lines") + 1
        };
        run.lines -= 1;
        run.bytes -= len;
        let kind = run.kind;
        if run.lines == 0 {
            self.runs.pop_front();
        }
        self.data.consume(len);
        self.unqueue(kind, 1, len);
        Some(kind)
    }

    /// Discards the last queued line; returns its kind.
    fn pop_back_line(&mut self) -> Option<Kind> {
        let run = self.runs.back_mut()?;
        let len = if run.lines == 1 {
            run.bytes
        } else {
            let start = self.data.len - run.bytes;
            let p = self
                .data
                .rfind_newline(start, self.data.len - 1)
                .expect("a run of several lines has a newline before its last");
            self.data.len - (p + 1)
        };
        run.lines -= 1;
        run.bytes -= len;
        let kind = run.kind;
        if run.lines == 0 {
            self.runs.pop_back();
        }
        self.data.truncate_back(len);
        self.unqueue(kind, 1, len);
        Some(kind)
    }

    /// Discards queued lines from the front while `more(self, charge freed
    /// so far)`, counting them as dropped; returns how many.
    fn drop_front(&mut self, mut more: impl FnMut(&State, usize) -> bool) -> usize {
        let (start, mut n) = (self.charged(), 0);
        while !self.runs.is_empty() && more(self, start - self.charged()) {
            self.pop_front_line();
            n += 1;
        }
        self.dropped += n as u64;
        n
    }

    /// Empties the queue (not the writer's hand).
    fn clear_queue(&mut self) {
        self.bytes -= self.data.len;
        self.data.clear();
        self.runs.clear();
        self.lines = 0;
        self.msgs = 0;
        if self.runs.capacity() > 64 {
            self.runs = VecDeque::new();
        }
    }
}

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Lines (queued and in the writer's hand) and bytes as of the last
    /// change, and whether the client is ending: for [`Outbox::fits`], the
    /// router's check without the lock. Stored under the lock.
    level_lines: AtomicUsize,
    level_bytes: AtomicUsize,
    ending: AtomicBool,
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
    /// Locks taken on this outbox (tests: a batch costs one per subscriber,
    /// not one per line).
    #[cfg(test)]
    pub(crate) pushes: AtomicUsize,
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
            level_lines: AtomicUsize::new(0),
            level_bytes: AtomicUsize::new(0),
            ending: AtomicBool::new(false),
            wake: Notify::new(),
            closing: Notify::new(),
            limits,
            budget,
            lossless: AtomicBool::new(false),
            room: Notify::new(),
            stalled_on: Mutex::default(),
            #[cfg(test)]
            pushes: AtomicUsize::new(0),
        }
    }

    /// Brings the budget and the lock-free levels up to date after a change.
    fn settle(&self, s: &mut State) {
        let now = s.charged();
        match now.cmp(&s.charged_now) {
            std::cmp::Ordering::Greater => self.budget.charge(now - s.charged_now),
            std::cmp::Ordering::Less => self.budget.credit(s.charged_now - now),
            std::cmp::Ordering::Equal => {}
        }
        s.charged_now = now;
        self.level_lines.store(s.lines + s.in_hand_lines, Relaxed);
        self.level_bytes.store(s.bytes, Relaxed);
        self.ending.store(s.end.is_some(), Relaxed);
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
    pub fn push_lossless(&self, line: &[u8], published: Option<Instant>) -> (Push, bool) {
        let mut s = self.lock();
        if s.end.is_some() {
            return (Push::Closed, false);
        }
        let was_empty = s.runs.is_empty();
        s.append_line(line, kind_of(published));
        self.settle(&mut s);
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
    pub fn push_unstallable(&self, line: &[u8], published: Option<Instant>) -> Push {
        let mut s = self.lock();
        if s.end.is_some() {
            return Push::Closed;
        }
        if !self.full(&s) {
            drop(s);
            return self.push_lossless(line, published).0;
        }
        let before = match s.runs.back().map(|r| r.kind) {
            Some(Kind::Gap(n)) => {
                s.pop_back_line();
                n
            }
            _ => 0,
        };
        s.append_gap(before + 1);
        self.settle(&mut s);
        Push::Dropped
    }

    /// At or over either cap.
    fn full(&self, s: &State) -> bool {
        s.lines + s.in_hand_lines >= self.limits.messages || s.bytes >= self.limits.bytes
    }

    /// Over half of either cap: a stalled publisher waits for less.
    fn above_half(&self, s: &State) -> bool {
        s.lines + s.in_hand_lines > self.limits.messages / 2 || s.bytes > self.limits.bytes / 2
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
    pub fn push(&self, line: impl AsRef<[u8]>) -> Push {
        self.push_line(line.as_ref(), None)
    }

    /// Queues one encoded line (with `published`, a message read then).
    /// Never blocks beyond a short lock. One line may exceed the byte cap
    /// when nothing else is held, so a line larger than the cap is still
    /// delivered to a reader that keeps up.
    pub fn push_line(&self, line: &[u8], published: Option<Instant>) -> Push {
        let line_len = line.len();
        let mut s = self.lock();
        if s.end.is_some() {
            return Push::Closed;
        }
        // A control line (PONG, ERR) on an empty queue is taken even when
        // the writer's hand alone fills the caps: dropping it there would
        // lose a PONG with nothing else to drop, and break the PING barrier
        // of a client that reads. (One such line at a time: bounded.)
        let control_on_empty = published.is_none();
        let over = |s: &State| {
            s.bytes > 0
                && !(control_on_empty && s.runs.is_empty())
                && (s.lines >= self.limits.messages || s.bytes + line_len > self.limits.bytes)
        };
        let mut outcome = Push::Queued;
        if over(&s) {
            match self.limits.policy {
                OverflowPolicy::DropOldest => {
                    let n = s.drop_front(|s, _| over(s));
                    if over(&s) {
                        // Everything older is in the writer's hand.
                        s.dropped += 1;
                        self.settle(&mut s);
                        return Push::Skipped(n + 1);
                    }
                    outcome = Push::QueuedDropping(n);
                }
                OverflowPolicy::DropNewest => {
                    s.dropped += 1;
                    return Push::Dropped;
                }
                OverflowPolicy::Disconnect => {
                    let discarded = s.lines;
                    self.end_slow(s);
                    return Push::Disconnected(discarded);
                }
            }
        }
        let was_empty = s.runs.is_empty();
        self.mark_newest_gap(&mut s);
        s.append_line(line, kind_of(published));
        self.settle(&mut s);
        drop(s);
        // The writer drains everything it finds, so it needs waking only when
        // the queue goes from empty to non-empty.
        if was_empty {
            self.wake.notify_one();
        }
        outcome
    }

    /// Under drop-newest the gap is behind everything queued: marks it
    /// before the first line that makes it through after it.
    fn mark_newest_gap(&self, s: &mut State) {
        if s.dropped > 0 && self.limits.policy != OverflowPolicy::DropOldest {
            let d = std::mem::take(&mut s.dropped);
            s.append_gap(d);
        }
    }

    /// Whether `lines` more message lines of `bytes` in all would certainly
    /// be queued as they are, without the overflow policy acting: how the
    /// router decides, without taking the lock, that it may hold a batch's
    /// lines for this client and queue them at once ([`Outbox::push_run`]).
    /// The router is the only producer of data lines, so the levels only go
    /// down behind its back, except for a `DROPPED` line a writer may add
    /// to its hand; room for one is kept.
    pub fn fits(&self, lines: usize, bytes: usize) -> bool {
        !self.ending.load(Relaxed)
            && !self.is_lossless()
            && self.level_lines.load(Relaxed) + lines < self.limits.messages
            && self.level_bytes.load(Relaxed) + bytes + GAP_ROOM <= self.limits.bytes
    }

    /// Queues `lines` message lines (`bytes` in all, the concatenation of
    /// `parts`, whole lines) read at `published`, under one lock and with at
    /// most one wake-up of the writer. The caller checked
    /// [`Outbox::fits`]: the overflow policy is not applied here.
    pub fn push_run<'a>(
        &self,
        parts: impl IntoIterator<Item = &'a [u8]>,
        lines: usize,
        bytes: usize,
        published: Instant,
    ) -> Push {
        let mut s = self.lock();
        if s.end.is_some() {
            return Push::Closed;
        }
        let was_empty = s.runs.is_empty();
        self.mark_newest_gap(&mut s);
        s.append(parts, lines, bytes, Kind::Msg(published));
        self.settle(&mut s);
        drop(s);
        if was_empty {
            self.wake.notify_one();
        }
        Push::Queued
    }

    /// Frees about `want` bytes of this client's backlog for the broker's
    /// memory budget, as its overflow policy says: drop-oldest discards from
    /// the front, drop-newest from the back (its newest lines), disconnect
    /// ends the client. Lines in the writer's hand are not touched. Returns
    /// (lines discarded, bytes freed against the budget).
    pub fn shed(&self, want: usize) -> (usize, usize) {
        let mut s = self.lock();
        if s.end.is_some() || s.runs.is_empty() {
            return (0, 0);
        }
        let start = s.charged();
        let lines = match self.limits.policy {
            OverflowPolicy::DropOldest => s.drop_front(|_, freed| freed < want),
            OverflowPolicy::DropNewest => {
                let mut n = 0;
                loop {
                    let marker = match s.runs.back().map(|r| r.kind) {
                        None => break,
                        Some(Kind::Gap(d)) => Some(d),
                        Some(_) => None,
                    };
                    // Past `want`, go on only to fold a gap marker left at
                    // the back into the gap there.
                    if start - s.charged() >= want && marker.is_none() {
                        break;
                    }
                    s.pop_back_line();
                    s.dropped += marker.unwrap_or(1);
                    n += usize::from(marker.is_none());
                }
                n
            }
            OverflowPolicy::Disconnect => {
                let n = s.msgs;
                return (n, self.end_slow(s));
            }
        };
        let freed = start - s.charged();
        self.settle(&mut s);
        (lines, freed)
    }

    /// Ends the client under the disconnect policy: discards the queue,
    /// credits the budget, wakes its writer and session. Returns the bytes
    /// freed against the budget.
    fn end_slow(&self, mut s: std::sync::MutexGuard<'_, State>) -> usize {
        let start = s.charged();
        s.clear_queue();
        let freed = start - s.charged();
        s.end = Some(CloseReason::SlowConsumer);
        self.settle(&mut s);
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
                self.mark_newest_gap(&mut s);
                s.append_line(&f, Kind::Control);
            }
        } else {
            discarded = s.msgs;
            s.clear_queue();
        }
        s.discarded_at_close = discarded;
        s.end = Some(reason);
        self.settle(&mut s);
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

    /// Copies the next queued lines into `into` (after what it holds: whole
    /// lines, up to [`TAKE_BYTES`] or the byte cap, at least one line), with
    /// a `DROPPED` line where a gap is. They stay counted as the client's
    /// until reported with [`Outbox::written`]. Returns the close reason if
    /// the client is ending and nothing is left queued: once `into` is
    /// written, the writer is done.
    pub fn take(&self, into: &mut Batch) -> Option<CloseReason> {
        into.compact();
        let mut s = self.lock();
        let gap_first = self.limits.policy == OverflowPolicy::DropOldest;
        if s.dropped > 0 && gap_first {
            let d = std::mem::take(&mut s.dropped);
            let len = into.push_gap(d);
            s.hand_over(len);
        }
        let max_bytes = TAKE_BYTES.min(self.limits.bytes);
        let (mut taken, mut lines) = (0, 0);
        while let Some(run) = s.runs.front().copied() {
            let room = max_bytes.saturating_sub(taken);
            if run.bytes <= room {
                taken += run.bytes;
                lines += run.lines;
                s.runs.pop_front();
                s.unqueue(run.kind, run.lines, run.bytes);
                into.runs.push_back(run);
                continue;
            }
            // Whole lines only: up to the last newline that fits, or, if
            // nothing was taken yet, the first line however long.
            let end = match s.data.rfind_newline(taken, taken + room) {
                Some(p) => p + 1,
                None if taken == 0 => s.data.find_newline(0).expect("whole lines") + 1,
                None => break,
            };
            let (len, k) = (end - taken, s.data.count_newlines(taken, end));
            let front = s.runs.front_mut().expect("just seen");
            front.lines -= k;
            front.bytes -= len;
            if front.lines == 0 {
                // Its one line, longer than a take.
                s.runs.pop_front();
            }
            s.unqueue(run.kind, k, len);
            into.runs.push_back(Run {
                lines: k,
                bytes: len,
                kind: run.kind,
            });
            taken += len;
            lines += k;
            break;
        }
        s.data.copy_front(taken, &mut into.buf);
        s.data.consume(taken);
        // `unqueue` took these off `bytes`: they are still held, in hand.
        s.bytes += taken;
        s.in_hand += taken;
        s.in_hand_lines += lines;
        if !s.runs.is_empty() {
            self.settle(&mut s);
            return None;
        }
        if s.runs.capacity() > 64 {
            s.runs = VecDeque::new();
        }
        if s.dropped > 0 && !gap_first {
            let d = std::mem::take(&mut s.dropped);
            let len = into.push_gap(d);
            s.hand_over(len);
        }
        self.settle(&mut s);
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
        self.settle(&mut s);
        let room = self.is_lossless() && !self.above_half(&s);
        drop(s);
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
                || (s.lines < self.limits.messages && s.bytes + line_len <= self.limits.bytes))
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
        s.charged() - s.in_hand
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
        s.discarded_at_close + s.msgs
    }

    pub fn is_closed(&self) -> bool {
        self.lock().end.is_some()
    }

    /// Lines and bytes waiting, including what the writer took and has
    /// not written yet.
    pub fn backlog(&self) -> (usize, usize) {
        let s = self.lock();
        (s.lines + s.in_hand_lines, s.bytes)
    }

    /// Whether the queue keeps a drained block for the next lines: asked
    /// by a writer that streams, turned off (the block given back to the
    /// pool) once it has been quiet a while, so an idle client holds
    /// nothing and a quiet one arms no timer for it.
    pub fn keep_buffers(&self, on: bool) {
        let mut s = self.lock();
        s.data.keep_spare = on;
        if on {
            return;
        }
        if let Some(b) = s.data.spare.take() {
            block_put(b);
        }
        if s.runs.is_empty() && s.runs.capacity() > 0 {
            s.runs = VecDeque::new();
        }
    }

    /// Waits until something was pushed or the outbox was closed since the
    /// last wait. A push that happened before this call still wakes it.
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        #[cfg(test)]
        self.pushes.fetch_add(1, Relaxed);
        // A panic while holding this lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn kind_of(published: Option<Instant>) -> Kind {
    published.map_or(Kind::Control, Kind::Msg)
}

impl State {
    /// Counts a line made by `take` (a gap marker) as in the writer's hand.
    fn hand_over(&mut self, len: usize) {
        self.bytes += len;
        self.in_hand += len;
        self.in_hand_lines += 1;
    }
}

impl Drop for Outbox {
    /// Whatever is still held goes back to the budget with the client.
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        self.budget.credit(s.charged_now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode;

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
        let mut q = Batch::default();
        o.take(&mut q);
        texts(&q)
    }

    fn texts(q: &Batch) -> Vec<String> {
        q.lines()
            .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
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
    fn a_drained_outbox_holds_no_block_and_blocks_are_reused() {
        let o = outbox(100_000, 1 << 30, OverflowPolicy::DropOldest);
        o.keep_buffers(true);
        let l = vec![b'x'; 999];
        let mut l = l;
        l.push(b'\n');
        for _ in 0..200 {
            o.push(&l[..]); // 200 KB
        }
        assert_eq!(o.lock().data.blocks.len(), 200_000usize.div_ceil(BLOCK));
        let mut q = Batch::default();
        let mut got = 0;
        loop {
            o.take(&mut q);
            if q.is_empty() {
                break;
            }
            assert!(q.lines().all(|x| x == &l[..]), "whole lines, in order");
            got += q.line_count();
            let (b, n) = q.clear();
            o.written(b, n);
        }
        assert_eq!(got, 200);
        assert!(o.lock().data.spare.is_some(), "one block kept while active");
        o.keep_buffers(false);
        let s = o.lock();
        assert!(
            s.data.blocks.is_empty() && s.data.spare.is_none(),
            "an idle client holds nothing"
        );
        assert_eq!((s.data.len, s.lines, s.bytes), (0, 0, 0));
        drop(s);
        assert!(
            !POOL.lock().unwrap().is_empty(),
            "its blocks wait in the pool"
        );
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
        o.push_line(&line("MSG t a"), Some(Instant::now()));
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
        let mut q = Batch::default();
        assert_eq!(o.take(&mut q), Some(CloseReason::Shutdown));
        assert_eq!(q.line_count(), 2);
        assert_eq!(o.abandoned(), None);
    }

    fn msg(o: &Outbox, s: &str) -> Push {
        o.push_line(&line(s), Some(Instant::now()))
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
        let mut hand = Batch::default();
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
        msg(&o, "a");
        msg(&o, "b");
        let mut hand = Batch::default();
        o.take(&mut hand);
        assert_eq!(msg(&o, "c"), Push::Skipped(1));
        o.written(4, 2);
        msg(&o, "d");
        assert_eq!(taken(&o), ["DROPPED 1", "d"], "the gap where it is");
    }

    #[test]
    fn a_pong_is_kept_when_the_writers_hand_alone_fills_the_cap() {
        // The client reads, slowly: its PING barrier must still complete.
        let o = outbox(100, 4, OverflowPolicy::DropOldest);
        msg(&o, "a");
        msg(&o, "b");
        let mut hand = Batch::default();
        o.take(&mut hand);
        assert_eq!(o.push(line("PONG x")), Push::Queued);
        // Only on an empty queue: a second one is under the policy again
        // (a client that pings without reading holds one line past the cap).
        assert_eq!(o.push(line("PONG y")), Push::QueuedDropping(1));
        o.written(4, 2);
        assert_eq!(taken(&o), ["DROPPED 1", "PONG y"]);
    }

    #[test]
    fn the_writer_takes_one_write_at_a_time_and_ends_only_when_drained() {
        let o = outbox(100_000, 1 << 30, OverflowPolicy::DropOldest);
        let n = TAKE_BYTES / 5 + 100; // lines of 5 or 6 bytes: more than one take
        for i in 0..n {
            o.push(line(&format!("{:04}", i % 10_000)));
        }
        o.close(CloseReason::Bye, Some(encode::bye()));
        let mut hand = Batch::default();
        assert_eq!(o.take(&mut hand), None, "more is queued");
        assert!(hand.unwritten().len() <= TAKE_BYTES);
        assert!(hand.unwritten().len() > TAKE_BYTES - 5, "as much as fits");
        assert!(hand.unwritten().ends_with(b"\n"), "whole lines only");
        let first = hand.line_count();
        assert_eq!(first, hand.lines().count());
        let (b, l) = hand.clear();
        o.written(b, l);
        assert_eq!(o.take(&mut hand), Some(CloseReason::Bye));
        assert_eq!(first + hand.line_count(), n + 1, "the rest, then BYE");
        // And by bytes: one line at least, however long.
        let o = outbox(10, 1 << 30, OverflowPolicy::DropOldest);
        let mut long = vec![b'x'; TAKE_BYTES + 1];
        long.push(b'\n');
        o.push(&long[..]);
        o.push(line("y"));
        let mut hand = Batch::default();
        o.take(&mut hand);
        assert_eq!(hand.line_count(), 1);
        assert_eq!(hand.unwritten(), &long[..]);
    }

    #[test]
    fn drop_newest_marks_the_gap_before_the_next_line_that_gets_through() {
        let o = outbox(2, 1 << 20, OverflowPolicy::DropNewest);
        for s in ["a", "b", "c"] {
            o.push(line(s));
        }
        let mut hand = Batch::default();
        o.take(&mut hand); // a, b in hand; the queue is empty, "c" was lost
        assert_eq!(
            texts(&hand),
            ["a", "b", "DROPPED 1"],
            "a, b, then the gap, since nothing follows"
        );
        let (b, n) = hand.clear();
        o.written(b, n);
        for s in ["d", "e", "f"] {
            o.push(line(s));
        }
        assert_eq!(taken(&o), ["d", "e", "DROPPED 1"]);
    }

    #[test]
    fn the_budget_is_charged_per_byte_and_run_and_fully_given_back() {
        let (o, budget) = budgeted(1 << 20, OverflowPolicy::DropOldest);
        msg(&o, "MSG t a"); // 8 bytes
        o.push(line("PONG")); // 5 bytes
        assert_eq!(budget.held(), 13 + 2 * RUN_COST, "two kinds: two runs");
        let at = Instant::now();
        o.push_line(&line("MSG t b"), Some(at));
        o.push_line(&line("MSG t c"), Some(at));
        assert_eq!(budget.held(), 29 + 3 * RUN_COST, "one read: one run");
        let mut hand = Batch::default();
        o.take(&mut hand);
        assert_eq!(budget.held(), 29, "in hand, the bytes still count");
        o.written(10, 1); // "MSG t a\n" and 2 bytes of "PONG\n"
        assert_eq!(budget.held(), 19);
        o.written(19, 3);
        assert_eq!(budget.held(), 0);
        msg(&o, "MSG t b");
        o.close(CloseReason::Removed, None);
        assert_eq!(budget.held(), 0, "a discarding close gives it back");
        let (o, budget) = budgeted(1 << 20, OverflowPolicy::DropOldest);
        msg(&o, "MSG t c");
        drop(o);
        assert_eq!(budget.held(), 0, "so does a client that goes");
    }

    #[test]
    fn shedding_under_drop_oldest_takes_from_the_front() {
        let (o, budget) = budgeted(1 << 20, OverflowPolicy::DropOldest);
        for s in ["a", "b", "c", "d"] {
            msg(&o, s);
        }
        assert_eq!(o.sheddable(), 4 * (2 + RUN_COST));
        assert_eq!(o.shed(2 * RUN_COST), (2, 2 * (2 + RUN_COST)));
        assert_eq!(budget.held(), 2 * (2 + RUN_COST));
        assert_eq!(taken(&o), ["DROPPED 2", "c", "d"]);
    }

    #[test]
    fn shedding_under_drop_newest_takes_the_newest_and_reports_the_gap_at_the_end() {
        let (o, _) = budgeted(1 << 20, OverflowPolicy::DropNewest);
        for s in ["a", "b", "c", "d"] {
            msg(&o, s);
        }
        assert_eq!(o.shed(1).0, 1);
        msg(&o, "e");
        assert_eq!(o.shed(1).0, 1, "takes e; the marker before it merges");
        assert_eq!(taken(&o), ["a", "b", "c", "DROPPED 2"]);
    }

    #[test]
    fn shedding_under_disconnect_ends_the_client() {
        let (o, budget) = budgeted(1 << 20, OverflowPolicy::Disconnect);
        msg(&o, "a");
        msg(&o, "b");
        assert_eq!(o.shed(1), (2, 2 * (2 + RUN_COST)));
        assert_eq!(o.abandoned(), Some(CloseReason::SlowConsumer));
        assert_eq!(budget.held(), 0);
        assert_eq!(o.sheddable(), 0, "an ending client is not shed again");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A message (padded to vary its length), read now or at the last read.
        Msg {
            pad: usize,
            same_read: bool,
        },
        Control,
        /// `n` messages as the router's batch path queues them: at once if
        /// they fit, else one by one.
        Run {
            n: usize,
            pad: usize,
        },
        Take,
        Write(usize),
        Shed(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..40usize, any::<bool>()).prop_map(|(pad, same_read)| Op::Msg { pad, same_read }),
            1 => Just(Op::Control),
            2 => (1..12usize, 0..30usize).prop_map(|(n, pad)| Op::Run { n, pad }),
            2 => Just(Op::Take),
            3 => (1..200usize).prop_map(Op::Write),
            1 => (1..300usize).prop_map(Op::Shed),
        ]
    }

    fn line(kind: u8, id: usize, pad: usize) -> Vec<u8> {
        let mut l = format!("{}{id} ", kind as char).into_bytes();
        l.extend(std::iter::repeat_n(b'x', pad));
        l.push(b'\n');
        l
    }

    /// The outbox's books agree with what it holds.
    fn consistent(o: &Outbox, budget: &MemoryBudget) {
        let s = o.lock();
        let run_lines: usize = s.runs.iter().map(|r| r.lines).sum();
        let run_bytes: usize = s.runs.iter().map(|r| r.bytes).sum();
        let msgs: usize = s
            .runs
            .iter()
            .filter(|r| matches!(r.kind, Kind::Msg(_)))
            .map(|r| r.lines)
            .sum();
        assert_eq!(s.lines, run_lines);
        assert_eq!(s.msgs, msgs);
        assert_eq!(s.data.len, run_bytes);
        assert_eq!(s.bytes, s.data.len + s.in_hand);
        assert_eq!(s.data.count_newlines(0, s.data.len), s.lines, "whole lines");
        assert!(s.runs.iter().all(|r| r.lines > 0 && r.bytes > 0));
        assert_eq!(budget.held(), s.charged());
        assert_eq!(o.level_lines.load(Relaxed), s.lines + s.in_hand_lines);
        assert_eq!(o.level_bytes.load(Relaxed), s.bytes);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any sequence of pushes, batch pushes, takes, partial writes and
        /// sheds keeps the books right, never splits a line, and what the
        /// reader gets is the pushed lines in order with `DROPPED <n>`
        /// exactly covering every gap.
        #[test]
        fn lines_arrive_in_order_and_gaps_are_counted_exactly(
            ops in proptest::collection::vec(op(), 1..120),
            messages in 1..20usize,
            bytes in 16..400usize,
            newest in any::<bool>(),
        ) {
            let policy = if newest { OverflowPolicy::DropNewest } else { OverflowPolicy::DropOldest };
            let budget = Arc::new(MemoryBudget::default());
            let o = Outbox::with_budget(BacklogLimits { messages, bytes, policy }, budget.clone());
            let mut hand = Batch::default();
            let (mut next, mut read) = (0usize, Instant::now());
            let mut out: Vec<u8> = Vec::new();
            let write = |hand: &mut Batch, n: usize, out: &mut Vec<u8>| {
                let n = n.min(hand.unwritten().len());
                out.extend_from_slice(&hand.unwritten()[..n]);
                let lines = hand.wrote(n, |_, _| {});
                o.written(n, lines);
            };
            for op in ops {
                match op {
                    Op::Msg { pad, same_read } => {
                        if !same_read {
                            read = Instant::now();
                        }
                        o.push_line(&line(b'M', next, pad), Some(read));
                        next += 1;
                    }
                    Op::Control => {
                        o.push(line(b'C', next, 0));
                        next += 1;
                    }
                    Op::Run { n, pad } => {
                        let lines: Vec<Vec<u8>> = (next..next + n).map(|i| line(b'M', i, pad)).collect();
                        next += n;
                        let total = lines.iter().map(Vec::len).sum();
                        if o.fits(n, total) {
                            o.push_run(lines.iter().map(|l| &l[..]), n, total, read);
                        } else {
                            for l in &lines {
                                o.push_line(l, Some(read));
                            }
                        }
                    }
                    Op::Take => {
                        o.take(&mut hand);
                        prop_assert!(hand.is_empty() || hand.unwritten().ends_with(b"\n"));
                    }
                    Op::Write(n) => write(&mut hand, n, &mut out),
                    Op::Shed(want) => {
                        o.shed(want);
                    }
                }
                consistent(&o, &budget);
                let (l, b) = o.backlog();
                // The caps hold, up to one line past them (a control line
                // or an oversize line on an empty queue) plus a gap marker.
                prop_assert!(l <= messages + 2 + hand.line_count(), "{l} lines");
                prop_assert!(b <= bytes + 2 * 80 + hand.unwritten().len(), "{b} bytes");
            }
            loop {
                o.take(&mut hand);
                if hand.is_empty() {
                    break;
                }
                let n = hand.unwritten().len();
                write(&mut hand, n, &mut out);
            }
            consistent(&o, &budget);
            prop_assert_eq!(o.backlog(), (0, 0));
            prop_assert_eq!(budget.held(), 0);
            // Walk what the reader got.
            prop_assert!(out.is_empty() || out.ends_with(b"\n"));
            let (mut expect, mut gap) = (0usize, 0u64);
            for l in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let text = std::str::from_utf8(l).unwrap();
                if let Some(n) = text.strip_prefix("DROPPED ") {
                    let n: u64 = n.parse().unwrap();
                    prop_assert!(n > 0);
                    gap += n;
                    continue;
                }
                let id: usize = text[1..].split(' ').next().unwrap().parse().unwrap();
                prop_assert_eq!(id as u64, expect as u64 + gap, "at {}: {:?}", id, String::from_utf8_lossy(&out));
                expect = id + 1;
                gap = 0;
            }
            prop_assert_eq!(expect as u64 + gap, next as u64, "every line delivered or counted");
        }
    }
}
