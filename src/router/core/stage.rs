//! Deliveries held back while the router applies one publisher's batch, so
//! that each subscriber's outbox is locked once per batch, not once per
//! message, and its writer woken at most once ([`Outbox::push_run`]).
//!
//! Each `MSG` is encoded once into a buffer reused batch after batch; per
//! target outbox a slot keeps byte ranges into it (adjacent ones merged: a
//! stream on one topic is one range per subscriber). A line is held only
//! when it would certainly be queued as it is: the outbox has room by its
//! lock-free levels ([`Outbox::fits`]) and the memory budget has room for
//! everything held. Otherwise the caller flushes that outbox's slot and
//! pushes the line alone, overflow policy and all, so drop accounting per
//! topic stays exact. Anything else that pushes straight into an outbox
//! (replies, farewells, queue groups, lossless subscribers) runs only
//! after [`Stage::flush`], so every outbox keeps the order of lines as the
//! router produced them.
//!
//! One race is not closed: a client ended (by its session: its process
//! exited, its directory went) between a line being held and the flush
//! has that line counted as delivered, then discarded by the close, as a
//! line queued a moment earlier would have been.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use super::FastMap;
use crate::counters::MemoryBudget;
use crate::protocol::{encode, PubRun};
use crate::router::outbox::{Outbox, RUN_COST};
use crate::topic::Topic;

/// Beyond this the batch buffer is given back after a flush (a batch of
/// 1024 lines of up to 256 KiB in all needs far less).
const KEEP_BYTES: usize = 1 << 20;
/// Beyond these a slot's ranges, and the slots (one per subscriber a batch
/// reached), are given back after a flush: the capacity a stream on one
/// topic to a few hundred subscribers reuses batch after batch.
const KEEP_RANGES: usize = 64;
const KEEP_SLOTS: usize = 1024;

#[derive(Default)]
pub(super) struct Stage {
    /// Set while a `PUB` of a batch is applied: its deliveries may be held.
    pub(super) active: bool,
    buf: Vec<u8>,
    /// Slots `0..used` are this batch's; the rest keep their capacity.
    slots: Vec<Slot>,
    used: usize,
    /// Slot by outbox address (the slot holds the `Arc`, so the address is
    /// not reused while it is in here).
    index: FastMap<usize, usize>,
    read_at: Option<Instant>,
    /// What the held lines will charge to the memory budget.
    pending: usize,
    /// The subscriber list of the route last held for (its address), and
    /// the slot of each of its subscribers by position (`NO_SLOT` if none
    /// yet): a stream on one topic finds its slots without hashing, which
    /// was a tenth of the broker's time in a 1 -> 10 profile.
    route: usize,
    route_slots: Vec<usize>,
}

const NO_SLOT: usize = usize::MAX;

#[derive(Default)]
struct Slot {
    outbox: Option<Arc<Outbox>>,
    ranges: Vec<Range<usize>>,
    lines: usize,
    bytes: usize,
}

impl Stage {
    /// Encodes `MSG <topic> <payload>` once; the range is valid until the
    /// next [`Stage::flush`].
    pub(super) fn encode(&mut self, topic: &Topic, payload: &[u8]) -> Range<usize> {
        let start = self.start();
        encode::msg_append(&mut self.buf, topic, payload);
        start..self.buf.len()
    }

    /// Copies whole `MSG` lines already encoded (a run of `PUB` lines
    /// turned into `MSG` by the reader); the range is valid until the next
    /// [`Stage::flush`].
    pub(super) fn encode_lines(&mut self, lines: &[u8]) -> Range<usize> {
        let start = self.start();
        self.buf.extend_from_slice(lines);
        start..self.buf.len()
    }

    /// Where the next encoded line goes: the buffer starts over once
    /// nothing held refers to it.
    fn start(&mut self) -> usize {
        if self.used == 0 {
            self.buf.clear();
        }
        self.buf.len()
    }

    pub(super) fn line(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// Holds `r`, `lines` whole lines (one message, or a run of `PUB`
    /// lines), for `outbox`, subscriber number `at` of the route whose
    /// subscriber list is `route` (any stable address naming it), if they
    /// certainly fit there and in the memory budget, all together (`budget`
    /// is what it holds and its limit, read once per message: the shared
    /// counter is written by every writer); `false` when the caller must
    /// push them itself: whatever was held for `outbox` is queued by then,
    /// so they follow it.
    pub(super) fn add(
        &mut self,
        (route, at): (usize, usize),
        outbox: &Arc<Outbox>,
        r: Range<usize>,
        lines: usize,
        read_at: Instant,
        budget: (usize, usize),
    ) -> bool {
        if !self.active {
            // Nothing is held outside a batch's PUBs (see `apply_batch`).
            debug_assert_eq!(self.used, 0);
            return false;
        }
        if self.read_at.is_some_and(|t| t != read_at) {
            // All lines of a run share one read time.
            self.flush_slots();
        }
        self.read_at = Some(read_at);
        let i = match self.route_slot(route, at, outbox) {
            Some(i) => i,
            None => {
                let i = self.slot_of(outbox);
                self.route_slots
                    .resize(self.route_slots.len().max(at + 1), NO_SLOT);
                self.route_slots[at] = i;
                i
            }
        };
        let slot = &mut self.slots[i];
        let len = r.len();
        let cost = len + if slot.lines == 0 { RUN_COST } else { 0 };
        if !outbox.fits(slot.lines + lines, slot.bytes + len)
            || budget.0 + self.pending + cost > budget.1
        {
            // Found already: no second lookup to queue what it holds.
            self.pending -= push(slot, &self.buf, self.read_at);
            return false;
        }
        match slot.ranges.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => slot.ranges.push(r),
        }
        slot.lines += lines;
        slot.bytes += len;
        self.pending += cost;
        true
    }

    /// Whether the memory budget certainly has room for `run` queued to
    /// `subscribers` outboxes, on top of what is held: a run is routed
    /// whole only then. Line by line, the budget is checked before each
    /// line and reclaimed after it; a run pushed whole past it could go
    /// over by a run per subscriber, more than one reclaim gives back.
    pub(super) fn budget_fits(
        &self,
        memory: &MemoryBudget,
        subscribers: usize,
        run: &PubRun,
    ) -> bool {
        let need = subscribers.saturating_mul(run.lines.len() + RUN_COST);
        memory
            .held()
            .saturating_add(self.pending)
            .saturating_add(need)
            <= memory.limit()
    }

    /// Queues everything held: each outbox once.
    pub(super) fn flush(&mut self) {
        if self.used == 0 {
            return;
        }
        self.flush_slots();
        self.buf.clear();
        if self.buf.capacity() > KEEP_BYTES {
            self.buf = Vec::new();
        }
    }
}

impl Stage {
    /// [`Stage::flush`], keeping the encoded lines (a range may be in use).
    fn flush_slots(&mut self) {
        for slot in &mut self.slots[..self.used] {
            push(slot, &self.buf, self.read_at);
            slot.outbox = None;
            if slot.ranges.capacity() > KEEP_RANGES {
                // A batch alternating topics left many ranges here.
                slot.ranges = Vec::new();
            }
        }
        self.used = 0;
        self.index.clear();
        self.pending = 0;
        self.read_at = None;
        self.route = 0;
        self.route_slots.clear();
        // What one batch to many subscribers needed is not kept for ever.
        self.slots.truncate(KEEP_SLOTS);
        self.index.shrink_to(KEEP_SLOTS);
        self.route_slots.shrink_to(KEEP_SLOTS);
    }

    /// The slot already found for subscriber `at` of `route`, if `route` is
    /// the route last held for. A different route becomes the remembered one.
    fn route_slot(&mut self, route: usize, at: usize, outbox: &Arc<Outbox>) -> Option<usize> {
        if self.route != route {
            self.route = route;
            self.route_slots.clear();
            return None;
        }
        let i = *self.route_slots.get(at)?;
        // Checked, not assumed: a route freed in mid-batch (the match cache
        // cleared) may leave its address to another.
        (i != NO_SLOT
            && self.slots[i]
                .outbox
                .as_ref()
                .is_some_and(|o| Arc::ptr_eq(o, outbox)))
        .then_some(i)
    }

    /// `outbox`'s slot in this batch, made if it has none.
    fn slot_of(&mut self, outbox: &Arc<Outbox>) -> usize {
        let key = Arc::as_ptr(outbox) as usize;
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        if self.used == self.slots.len() {
            self.slots.push(Slot::default());
        }
        let i = self.used;
        self.used += 1;
        self.slots[i].outbox = Some(outbox.clone());
        self.index.insert(key, i);
        i
    }
}

/// Queues a slot's lines; returns what they were counted in `pending`.
fn push(slot: &mut Slot, buf: &[u8], read_at: Option<Instant>) -> usize {
    if slot.lines == 0 {
        return 0;
    }
    // A slot with lines always has its outbox and the read time.
    if let (Some(outbox), Some(at)) = (&slot.outbox, read_at) {
        outbox.push_run(
            slot.ranges.iter().map(|r| &buf[r.clone()]),
            slot.lines,
            slot.bytes,
            at,
        );
    }
    let held = slot.bytes + RUN_COST;
    slot.ranges.clear();
    slot.lines = 0;
    slot.bytes = 0;
    held
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::BacklogLimits;

    /// A batch alternating two topics to many subscribers leaves each a
    /// range per line and a slot per subscriber; after the flush the stage
    /// keeps no more than its bounds (a publisher cannot make it hold that
    /// for ever).
    #[test]
    fn a_flush_gives_back_what_one_wide_batch_needed() {
        let mut stage = Stage {
            active: true,
            ..Stage::default()
        };
        let outs: Vec<Arc<Outbox>> = (0..KEEP_SLOTS + 10)
            .map(|_| Arc::new(Outbox::new(BacklogLimits::default())))
            .collect();
        let at = Instant::now();
        for i in 0..200 {
            let r = stage.encode_lines(b"MSG t x\n");
            // Every other line goes to the first outbox: ranges not adjacent.
            if i % 2 == 0 {
                assert!(stage.add((1, 0), &outs[0], r, 1, at, (0, usize::MAX)));
            }
        }
        let r = stage.encode_lines(b"MSG u y\n");
        for (k, o) in outs.iter().enumerate() {
            assert!(stage.add((2, k), o, r.clone(), 1, at, (0, usize::MAX)));
        }
        assert!(stage.slots[0].ranges.len() > KEEP_RANGES);
        assert!(stage.slots.len() > KEEP_SLOTS);
        stage.flush();
        assert!(stage.slots[0].ranges.capacity() <= KEEP_RANGES);
        assert_eq!(stage.slots.len(), KEEP_SLOTS);
        assert!(stage.route_slots.capacity() <= KEEP_SLOTS);
        assert_eq!(outs[0].backlog().0, 101, "everything held was queued");
    }
}
