//! A client's writer: outbox → `recv`.
//!
//! It copies a batch of whole lines from the outbox into a buffer of its
//! own under one lock ([`Outbox::take`]), writes it with plain `write`s
//! (large contiguous chunks: no iovec per line), and waits for room on
//! `EAGAIN`. The
//! lines it holds stay counted as the client's backlog (and against the
//! memory budget) until written: it reports each write with
//! [`Outbox::written`], and what it still holds when it stops is returned
//! by [`InHand`]'s drop. The buffer is reused from batch to batch, so
//! writing allocates nothing in steady state.
//!
//! `EAGAIN` is also what grows `recv` (see `pipe_size.rs`): the client
//! reads slower than the pipe's size allows, or a burst came. Before
//! writing a batch and before waiting for the next one, the writer shrinks
//! `recv` back to a page if it has not been full for `--pipe-idle`.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::unix::pipe;
use tokio::time::Instant;

use super::pipe_size::{self, PipeSize};
use crate::counters::LocalLatency;
use crate::fifo;
use crate::registry::Activity;
use crate::router::{Batch, CloseReason, Outbox};
use crate::throttle::LogThrottle;

/// How long a writer keeps its buffers (its batch buffer and its outbox's
/// spare block) after its last batch: a stream reuses them with no
/// allocation, an idle client holds nothing once this has passed.
const QUIET: Duration = Duration::from_secs(1);
/// Bytes written after which a client counts as streaming: its buffers are
/// kept between batches (and given back after [`QUIET`]).
const STREAMING: usize = 16 * 1024;

/// Writes the outbox to `recv` until the outbox ends; returns why.
/// `latency` gets publish-to-write time per `MSG`, counted locally and
/// flushed once per batch. `activity` (clients without `pid=`) counts the
/// bytes written, so that a later look at `recv` can tell they were read.
pub(super) async fn write_lines(
    recv: &pipe::Sender,
    outbox: &Outbox,
    mut latency: LocalLatency,
    pipe: &mut PipeSize,
    throttle: &LogThrottle,
    activity: Option<&Activity>,
) -> CloseReason {
    let mut hand = InHand {
        outbox,
        batch: Batch::default(),
    };
    let batch = &mut hand.batch;
    // Bytes written since the buffers were last given back, and when to give
    // them back if no batch comes (armed only once this client streams, so
    // a client that only exchanges PING and PONG wakes no timer).
    let (mut streamed, mut quiet_at) = (0, None);
    loop {
        let end = outbox.take(batch);
        // Here the writer has written all it had: if `recv` has been quiet
        // long enough, this is where it shrinks (before the next batch is
        // written, so whoever has read all that came before it, the PONG
        // to a PING included, finds it shrunk once the next batch arrives).
        pipe.shrink_if_idle(Instant::now());
        if batch.is_empty() {
            match end {
                Some(reason) => return reason,
                None => {
                    tokio::select! {
                        () = outbox.changed() => {}
                        () = pipe_size::until(pipe.check_at()) => pipe.on_timer(Instant::now()),
                        () = pipe_size::until(quiet_at) => {
                            // Quiet: an idle client holds no buffer.
                            batch.release();
                            outbox.keep_buffers(false);
                            (quiet_at, streamed) = (None, 0);
                        }
                    }
                    continue;
                }
            }
        }
        let mut full = false;
        while !batch.is_empty() {
            match write_some(recv, batch, &mut latency, activity) {
                Ok((bytes, lines)) => {
                    outbox.written(bytes, lines);
                    streamed += bytes;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    latency.flush();
                    full = true;
                    // The client reads slower than this pipe size allows:
                    // grow it (the kernel then reports room at once).
                    pipe.grow(throttle);
                    // Wait for room, but give up at once if the client is
                    // being ended meanwhile.
                    tokio::select! {
                        r = recv.writable() => if let Err(e) = r {
                            return CloseReason::Io(format!("waiting on recv: {e}"));
                        },
                        () = outbox.changed() => if let Some(reason) = outbox.abandoned() {
                            return reason;
                        },
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return CloseReason::Io(format!("writing recv: {e}")),
            }
        }
        latency.flush();
        if !full {
            pipe.passed();
        }
        if streamed >= STREAMING {
            if quiet_at.is_none() {
                outbox.keep_buffers(true);
            }
            quiet_at = Some(Instant::now() + QUIET);
        }
        if let Some(reason) = end {
            return reason;
        }
    }
}

/// The lines a writer took from its outbox; those not written when it
/// stops are reported to the outbox as gone, so they stop counting.
struct InHand<'a> {
    outbox: &'a Outbox,
    batch: Batch,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        let (bytes, lines) = self.batch.clear();
        self.outbox.written(bytes, lines);
    }
}

/// One `write` of as much of the batch as the pipe takes; returns (bytes
/// written, lines completed), observing each completed `MSG`'s latency.
/// With `activity` (clients without `pid=`), counted there as it is written.
fn write_some(
    recv: &pipe::Sender,
    batch: &mut Batch,
    latency: &mut LocalLatency,
    activity: Option<&Activity>,
) -> io::Result<(usize, usize)> {
    let bytes = batch.unwritten();
    let n = match activity {
        Some(a) => a.write(|| recv.try_write(bytes))?,
        None => recv.try_write(bytes)?,
    };
    let now = std::time::Instant::now();
    let lines = batch.wrote(n, |t, k| latency.observe_n(now.duration_since(t), k as u64));
    Ok((n, lines))
}

/// Waits, until `deadline` at most, for the client to read everything in `recv`.
/// Only runs while a client is ending, so a short poll is acceptable here.
pub(super) async fn wait_until_read(recv: &pipe::Sender, deadline: Instant) {
    while Instant::now() < deadline {
        match fifo::unread_bytes(recv.as_raw_fd()) {
            Ok(0) | Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
