//! A global allocator that counts the allocations made on threads marked
//! as the broker's (the in-process broker's tokio runtime threads), for the
//! `allocs` group: the proof of issue 14's "no allocation per delivery".
//!
//! Every other thread of the bench (its FIFO clients, the ceilings) pays
//! one thread-local read per allocation and nothing else, so the other
//! groups measure what they measured before.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    // `const`, and `bool` has no destructor: reading it never allocates
    // and never registers a thread-local destructor, which an allocator
    // must not do.
    static MARKED: Cell<bool> = const { Cell::new(false) };
}

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

/// The system allocator, counting on marked threads.
pub struct Counting;

impl Counting {
    #[inline]
    fn count(size: usize) {
        // `try_with`: during a thread's teardown the slot may be gone; such
        // an allocation is not the broker's steady state.
        if MARKED.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(size as u64, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is forwarded unchanged to `System`; counting touches
// only atomics and a const thread-local, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A realloc may move the block: it costs what an allocation costs.
        Self::count(new_size);
        // SAFETY: as `alloc`; `ptr` and `layout` come from our own `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Marks the calling thread: its allocations are counted from now on.
/// Given to the in-process broker's runtime as `on_thread_start`.
pub fn mark_this_thread() {
    MARKED.with(|m| m.set(true));
}

/// Allocations (including reallocs) and bytes requested on marked threads
/// so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub allocations: u64,
    pub bytes: u64,
}

pub fn snapshot() -> Snapshot {
    Snapshot {
        allocations: ALLOCATIONS.load(Ordering::Relaxed),
        bytes: BYTES.load(Ordering::Relaxed),
    }
}

impl std::ops::Sub for Snapshot {
    type Output = Snapshot;
    fn sub(self, earlier: Snapshot) -> Snapshot {
        Snapshot {
            allocations: self.allocations.saturating_sub(earlier.allocations),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only marked threads count: an allocation on a thread that is not the
    /// broker's leaves the counters alone, one on a marked thread moves them.
    #[test]
    fn counts_marked_threads_only() {
        let unmarked = std::thread::spawn(|| {
            let before = snapshot();
            let v: Vec<u8> = std::hint::black_box(Vec::with_capacity(1000));
            drop(v);
            snapshot() - before
        })
        .join()
        .unwrap();
        // Other tests' threads are unmarked too, so nothing else counts.
        assert_eq!(unmarked.allocations, 0);
        let marked = std::thread::spawn(|| {
            mark_this_thread();
            let before = snapshot();
            let v: Vec<u8> = std::hint::black_box(Vec::with_capacity(1000));
            drop(v);
            snapshot() - before
        })
        .join()
        .unwrap();
        assert!(marked.allocations >= 1, "{marked:?}");
        assert!(marked.bytes >= 1000, "{marked:?}");
    }
}
