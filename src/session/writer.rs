//! A client's writer: outbox → `recv`.
//!
//! It swaps the outbox's whole queue out under one lock, writes it with
//! `writev` (up to `IOV_MAX` lines a call), and waits for room on `EAGAIN`
//! while the lines stay counted as the client's backlog.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::time::Duration;

use bytes::Buf;
use tokio::net::unix::pipe;
use tokio::time::Instant;

use crate::counters::LocalLatency;
use crate::fifo;
use crate::registry::Activity;
use crate::router::{CloseReason, Entry, Outbox};

/// `IOV_MAX` on Linux: lines per `writev`.
const MAX_IOVECS: usize = 1024;

/// Writes the outbox to `recv` until the outbox ends; returns why.
/// `latency` gets publish-to-write time per `MSG`, counted locally and
/// flushed once per batch. `activity` (clients without `pid=`) counts the
/// bytes written, so that a later look at `recv` can tell they were read.
pub(super) async fn write_lines(
    recv: &pipe::Sender,
    outbox: &Outbox,
    mut latency: LocalLatency,
    activity: Option<&Activity>,
) -> CloseReason {
    let mut batch: VecDeque<Entry> = VecDeque::new();
    loop {
        let end = outbox.take(&mut batch);
        if batch.is_empty() {
            match end {
                Some(reason) => return reason,
                None => {
                    outbox.changed().await;
                    continue;
                }
            }
        }
        while !batch.is_empty() {
            match write_some(recv, &mut batch, &mut latency) {
                Ok(n) => {
                    if let Some(a) = activity {
                        a.wrote(n);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    latency.flush();
                    // The client is not reading. Wait for room, but give up
                    // at once if the client is being ended meanwhile.
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
        if let Some(reason) = end {
            return reason;
        }
    }
}

/// One `writev` of as many queued lines as fit; drops what was written and
/// returns how many bytes that was.
fn write_some(
    recv: &pipe::Sender,
    batch: &mut VecDeque<Entry>,
    latency: &mut LocalLatency,
) -> io::Result<usize> {
    // On the stack: a writev per batch should not cost an allocation too.
    let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
    let mut count = 0;
    for (slot, e) in slices.iter_mut().zip(batch.iter()) {
        *slot = IoSlice::new(&e.line);
        count += 1;
    }
    let written = recv.try_write_vectored(&slices[..count])?;
    let mut n = written;
    let now = std::time::Instant::now();
    while n > 0 {
        let front = batch.front_mut().expect("wrote more than was queued");
        if n >= front.line.len() {
            n -= front.line.len();
            if let Some(t) = front.published {
                latency.observe(now.duration_since(t));
            }
            batch.pop_front();
        } else {
            front.line.advance(n);
            n = 0;
        }
    }
    Ok(written)
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
