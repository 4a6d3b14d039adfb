//! A client FIFO's buffer follows its traffic.
//!
//! Linux charges pipe buffers to the user that opened the pipe first (here:
//! the broker's user), and past `fs.pipe-user-pages-soft` (64 MiB by
//! default) an unprivileged user's new pipes get a fraction of the usual
//! size and can no longer grow: a broker holding thousands of 64 KiB FIFOs
//! would spend that budget for all the user's programs. So a client's FIFOs
//! start at one page; a FIFO doubles, up to `--pipe-size`, each time its
//! size is what holds the traffic back (the writer finds `recv` full, or
//! the reader finds `send` was full); and it goes back to one page once it
//! has not held anything back for `--pipe-idle`.
//!
//! Shrinking is lazy, to keep an idle broker asleep: it is tried when the
//! session passes by anyway (before writing a new batch, before waiting for
//! the next one) and, while a FIFO is larger than a page, by one timer that
//! fires at the end of the idle period. A FIFO still holding more than a
//! page of unread bytes cannot shrink (the kernel says `EBUSY`); the timer
//! then backs off and stops after about two minutes, so a client that
//! never reads costs a few wakeups, not a periodic one. Its next traffic
//! starts over.

use std::os::fd::RawFd;
use std::time::Duration;

use tokio::time::Instant;

use crate::throttle::LogThrottle;
use crate::{fifo, warn_throttled};

/// First and last retry delays for a FIFO that could not shrink because
/// its client has not read it (doubling: 1 s, 2 s, … 64 s, then no more).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_LAST: Duration = Duration::from_secs(64);

pub(super) struct PipeSize {
    fd: RawFd,
    /// What the kernel says the FIFO holds, as of our last `F_SETPIPE_SZ`.
    size: usize,
    min: usize,
    max: usize,
    /// `--pipe-idle`: how long the size must not have mattered before the
    /// FIFO shrinks.
    idle: Duration,
    /// When the size last held the traffic back.
    busy_at: Instant,
    /// While larger than a page: when to try shrinking next.
    check_at: Option<Instant>,
    retry: Duration,
}

impl PipeSize {
    /// Tracks `fd`, whose buffer is `size` now; it may grow up to `max`.
    pub(super) fn new(fd: RawFd, size: usize, max: usize, idle: Duration) -> PipeSize {
        let min = fifo::min_pipe_size();
        PipeSize {
            fd,
            size,
            min,
            max: max.max(min),
            idle,
            busy_at: Instant::now(),
            check_at: None,
            retry: RETRY_FIRST,
        }
    }

    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// The FIFO's size held the traffic back just now: double it, up to
    /// `--pipe-size`. Returns whether it grew. Growing fails once the user's
    /// pipe budget is spent; then the FIFO keeps its size (the outbox holds
    /// what it cannot) and the broker says so, throttled.
    pub(super) fn grow(&mut self, throttle: &LogThrottle) -> bool {
        self.busy_at = Instant::now();
        if self.size >= self.max {
            self.arm();
            return false;
        }
        let want = (self.size * 2).min(self.max);
        let got = match fifo::set_pipe_size(self.fd, want) {
            Ok(got) => got,
            Err(e) => {
                warn_throttled!(throttle, "pipe-size", "cannot resize a client FIFO: {e}");
                self.size
            }
        };
        let grew = got > self.size;
        self.size = got;
        if !grew {
            warn_throttled!(throttle, "pipe-budget", "a busy client's FIFO stays at {got} bytes instead of growing to {want}: this user's pipe buffers passed fs.pipe-user-pages-soft (see docs/performance.md)");
        }
        self.arm();
        grew
    }

    /// Traffic passed without the size mattering: if the FIFO is large and
    /// nothing is due to shrink it (the timer gave up), look again later.
    pub(super) fn passed(&mut self) {
        if self.size > self.min && self.check_at.is_none() {
            self.retry = RETRY_FIRST;
            self.check_at = Some(Instant::now() + RETRY_FIRST.max(self.idle));
        }
    }

    /// Shrinks the FIFO to one page if its size has not mattered for
    /// `--pipe-idle`. Cheap unless it is due: one clock read.
    pub(super) fn shrink_if_idle(&mut self, now: Instant) {
        if self.size <= self.min || now < self.busy_at + self.idle {
            return;
        }
        if let Ok(got) = fifo::set_pipe_size(self.fd, self.min) {
            self.size = got;
        }
        if self.size <= self.min {
            self.check_at = None;
            return;
        }
        // EBUSY: more than a page is unread, so the size is in use after
        // all. Try again later, less and less often.
        self.busy_at = now;
        if self.retry > RETRY_LAST {
            // The client leaves its FIFO unread: stop looking until it has
            // traffic again.
            self.check_at = None;
        } else {
            self.check_at = Some(now + self.retry.max(self.idle));
            self.retry *= 2;
        }
    }

    /// When the session should call [`PipeSize::on_timer`]; `None` while
    /// the FIFO is at one page, or after the retries gave up.
    pub(super) fn check_at(&self) -> Option<Instant> {
        self.check_at
    }

    /// The [`PipeSize::check_at`] deadline passed.
    pub(super) fn on_timer(&mut self, now: Instant) {
        if now < self.busy_at + self.idle {
            self.check_at = Some(self.busy_at + self.idle);
        } else {
            self.shrink_if_idle(now);
        }
    }

    /// The size just mattered: the first try to shrink is one idle period
    /// from now.
    fn arm(&mut self) {
        if self.size > self.min {
            self.retry = RETRY_FIRST;
            self.check_at = Some(self.busy_at + self.idle);
        } else {
            self.check_at = None;
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for: a
/// `select!` branch that costs no timer while a FIFO is at one page.
pub(super) async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
