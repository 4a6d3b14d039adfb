//! One connected client: its FIFOs, its reader and writer, and its end.
//!
//! A session is one task. Inside it, the reader (`send` → parsed batches →
//! router) and the writer (outbox → `recv`) run side by side, and the first
//! of these ends it: the writer finishing because the outbox was closed (by
//! `BYE`, an overflow, a deleted directory), the `pid=` process exiting, or
//! the broker stopping. Whatever ends it, teardown is the same: flush if
//! the reason allows, remove the directory, forget the subscriptions, close.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use nix::sys::inotify::WatchDescriptor;
use tokio::net::unix::pipe;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::Shared;
use crate::metrics::DropReason;
use crate::protocol::{encode, Command, ErrorCode, Line, LineSplitter, ProtocolError};
use crate::router::{ClientKey, CloseReason, Entry, Outbox};
use crate::watch::PidWatch;
use crate::{busdir, fifo, warn_throttled};

/// One read from `send`. Large enough that a bulk publisher costs one
/// syscall per many lines.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read, and lines, before a batch goes to the router: one busy
/// publisher cannot hold a huge batch (memory) or a long turn (fairness).
const BATCH_BYTES: usize = 256 * 1024;
const BATCH_ITEMS: usize = 1024;
/// `IOV_MAX` on Linux: lines per `writev`.
const MAX_IOVECS: usize = 1024;

pub struct Session {
    pub key: ClientKey,
    /// The client's `name=`, else its uuid: what logs call it.
    pub label: String,
    pub dir: PathBuf,
    pub send: pipe::Receiver,
    pub recv: pipe::Sender,
    pub outbox: Arc<Outbox>,
    pub pid: Option<PidWatch>,
    pub watch: Option<WatchDescriptor>,
}

impl Session {
    /// Runs the client until it ends, then tears it down.
    pub async fn run(self, shared: Arc<Shared>) {
        let (reason, deadline) = self.serve(&shared).await;
        self.teardown(&shared, reason, deadline).await;
    }

    /// Resolves when the `pid=` process exits; never without `pid=`.
    async fn pid_exited(&self) {
        match &self.pid {
            Some(p) => p.exited().await,
            None => std::future::pending().await,
        }
    }

    /// Serves until the client ends; returns why, and the deadline for
    /// flushing it: one grace period from the moment the end began, shared
    /// by writing the last lines and waiting for the client to read them.
    async fn serve(&self, shared: &Shared) -> (CloseReason, Instant) {
        let grace = shared.config.flush_grace;
        let latency = shared.metrics.as_ref().map(|m| m.latency.local());
        let writer = write_lines(&self.recv, &self.outbox, latency);
        tokio::pin!(writer);
        let stop = CancellationToken::new();
        let reader = read_commands(self, shared, &stop);
        tokio::pin!(reader);
        // Biased: when the pidfd and new data are ready together, take the
        // pid branch, whose drain passes the data on anyway.
        let ended_by = tokio::select! {
            biased;
            reason = &mut writer => return (reason, Instant::now() + grace),
            () = self.pid_exited() => {
                // Pass on what the client wrote before it died, then end it.
                stop.cancel();
                let _ = tokio::time::timeout(grace, &mut reader).await;
                CloseReason::PidExited
            }
            reason = &mut reader => reason.unwrap_or(CloseReason::Shutdown),
            () = shared.cancel.cancelled() => CloseReason::Shutdown,
            () = self.outbox.closed() => {
                // Closed by the router (BYE, overflow) or the watcher (deleted).
                // A flush gets the grace period, no more: a client that says
                // BYE and never reads must not keep its session forever.
                let deadline = Instant::now() + grace;
                let reason = match tokio::time::timeout_at(deadline, &mut writer).await {
                    Ok(reason) => reason,
                    Err(_) => self.outbox.reason().unwrap_or(CloseReason::Shutdown),
                };
                return (reason, deadline);
            }
        };
        let deadline = Instant::now() + grace;
        let farewell = ended_by.flushes().then(encode::bye);
        self.outbox.close(ended_by.clone(), farewell);
        // Reasons that flush get what is left of the grace period to write
        // what is queued; the others make the writer return at once.
        let reason = tokio::time::timeout_at(deadline, &mut writer)
            .await
            .unwrap_or(ended_by);
        (reason, deadline)
    }

    async fn teardown(self, shared: &Shared, reason: CloseReason, deadline: Instant) {
        if reason.flushes() {
            // Closing our end of `recv` destroys whatever the client has not
            // read yet, the final BYE included: let it read, until the
            // deadline or until its process is gone (then nobody will).
            tokio::select! {
                () = wait_until_read(&self.recv, deadline) => {}
                () = self.pid_exited() => {}
            }
        }
        if let Some(wd) = self.watch {
            shared.watcher.unwatch_client(wd, &self.outbox);
        }
        // Remove the directory before closing the FIFOs: a client that sees
        // EOF on recv can rely on its directory being gone.
        if let Err(e) = busdir::remove_client_dir(&self.dir) {
            tracing::warn!(client = %self.label, "cannot remove {}: {e}", self.dir.display());
        }
        shared.router.detach(self.key).await;
        shared.client_left();
        if let Some(m) = &shared.metrics {
            m.client_left(self.key);
            let lost = self.outbox.undelivered();
            if lost > 0 {
                m.dropped(DropReason::ClientGone).inc_by(lost as u64);
            }
        }
        match &reason {
            CloseReason::Bye | CloseReason::PidExited | CloseReason::Shutdown => {
                tracing::debug!(client = %self.label, reason = reason.as_str(), "client left")
            }
            CloseReason::Removed => {
                tracing::info!(client = %self.label, "client directory or FIFO was deleted; client ended")
            }
            CloseReason::SlowConsumer => tracing::warn!(
                client = %self.label,
                "client's backlog overflowed (--overflow disconnect); client ended"
            ),
            CloseReason::Io(e) => {
                tracing::warn!(client = %self.label, "client ended by an I/O error: {e}")
            }
        }
    }
}

/// Reads `send` until BYE or an error (returns the reason), or until `stop`
/// is cancelled: then it first passes on whatever the client wrote before
/// (a script that publishes and exits must not lose its last lines to the
/// pidfd firing first) and returns `None`.
async fn read_commands(
    s: &Session,
    shared: &Shared,
    stop: &CancellationToken,
) -> Option<CloseReason> {
    let mut buf = BytesMut::new();
    let mut splitter = LineSplitter::new(shared.config.max_line);
    loop {
        let last = tokio::select! {
            biased;
            r = s.send.readable() => {
                if let Err(e) = r {
                    return Some(CloseReason::Io(format!("waiting on send: {e}")));
                }
                false
            }
            () = stop.cancelled() => true,
        };
        // Batches are capped in lines and bytes, and the reader yields
        // between them: one busy publisher cannot hold a worker thread, fill
        // the router channel with huge batches, or starve shutdown.
        loop {
            let batch = match read_batch(s, shared, &mut buf, &mut splitter, last) {
                Ok(b) => b,
                Err(e) => return Some(CloseReason::Io(format!("reading send: {e}"))),
            };
            if !batch.items.is_empty()
                && !shared.router.batch(s.key, batch.items, batch.read_at).await
            {
                return Some(CloseReason::Shutdown);
            }
            if batch.bye {
                // The router closes the outbox; anything sent after BYE is
                // ignored. Wait only to be stopped.
                stop.cancelled().await;
                return None;
            }
            if batch.drained {
                break;
            }
            tokio::task::yield_now().await;
        }
        if last {
            return None;
        }
        if buf.is_empty() {
            // Idle clients should not pin a read buffer each.
            buf = BytesMut::new();
        }
    }
}

struct Batch {
    items: Vec<Result<Command, ProtocolError>>,
    read_at: std::time::Instant,
    /// The pipe had nothing more to read.
    drained: bool,
    bye: bool,
}

/// Splits buffered lines and reads more until the batch is full, `BYE` is
/// seen, or the pipe is empty. With `raw`, reads bypass tokio's readiness
/// tracking (the final drain after `stop`, when no readiness will come).
fn read_batch(
    s: &Session,
    shared: &Shared,
    buf: &mut BytesMut,
    splitter: &mut LineSplitter,
    raw: bool,
) -> io::Result<Batch> {
    let mut batch = Batch {
        items: Vec::new(),
        read_at: std::time::Instant::now(),
        drained: false,
        bye: false,
    };
    let mut read = 0;
    loop {
        while let Some(line) = splitter.next_line(buf) {
            let item = match line {
                Line::Complete(l) => match Command::parse(l) {
                    Ok(None) => continue,
                    Ok(Some(c)) => Ok(c),
                    Err(e) => Err(e),
                },
                Line::TooLong => Err(ProtocolError::new(
                    ErrorCode::LineTooLong,
                    format!(
                        "line longer than {} bytes skipped (--max-line)",
                        splitter.max_line()
                    ),
                )),
            };
            if let Err(e) = &item {
                if let Some(m) = &shared.metrics {
                    m.protocol_error(e.code);
                }
                warn_throttled!(shared.throttle, e.code.as_str(), client = %s.label, "refused a line: {}", e.text);
            }
            batch.bye = matches!(item, Ok(Command::Bye));
            batch.items.push(item);
            if batch.bye || batch.items.len() >= BATCH_ITEMS {
                return Ok(batch);
            }
        }
        if read >= BATCH_BYTES {
            return Ok(batch);
        }
        buf.reserve(READ_CHUNK);
        let n = if raw {
            fifo::read_into(s.send.as_raw_fd(), buf)
        } else {
            s.send.try_read_buf(buf)
        };
        match n {
            // Impossible while we hold send O_RDWR; treat like "nothing yet".
            Ok(0) => {
                batch.drained = true;
                return Ok(batch);
            }
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                batch.drained = true;
                return Ok(batch);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes the outbox to `recv` until the outbox ends; returns why.
/// `latency` (when metrics are on) gets publish-to-write time per `MSG`,
/// counted locally and flushed once per batch.
async fn write_lines(
    recv: &pipe::Sender,
    outbox: &Outbox,
    latency: Option<prometheus::local::LocalHistogram>,
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
            match write_some(recv, &mut batch, latency.as_ref()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(l) = &latency {
                        l.flush();
                    }
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
        if let Some(l) = &latency {
            l.flush();
        }
        if let Some(reason) = end {
            return reason;
        }
    }
}

/// One `writev` of as many queued lines as fit; drops what was written.
fn write_some(
    recv: &pipe::Sender,
    batch: &mut VecDeque<Entry>,
    latency: Option<&prometheus::local::LocalHistogram>,
) -> io::Result<()> {
    // On the stack: a writev per batch should not cost an allocation too.
    let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
    let mut count = 0;
    for (slot, e) in slices.iter_mut().zip(batch.iter()) {
        *slot = IoSlice::new(&e.line);
        count += 1;
    }
    let mut n = recv.try_write_vectored(&slices[..count])?;
    let now = latency.map(|_| std::time::Instant::now());
    while n > 0 {
        let front = batch.front_mut().expect("wrote more than was queued");
        if n >= front.line.len() {
            n -= front.line.len();
            if let (Some(l), Some(now), Some(t)) = (latency, now, front.published) {
                l.observe(now.duration_since(t).as_secs_f64());
            }
            batch.pop_front();
        } else {
            front.line.advance(n);
            n = 0;
        }
    }
    Ok(())
}

/// Waits, until `deadline` at most, for the client to read everything in `recv`.
/// Only runs while a client is ending, so a short poll is acceptable here.
async fn wait_until_read(recv: &pipe::Sender, deadline: Instant) {
    while Instant::now() < deadline {
        match fifo::unread_bytes(recv.as_raw_fd()) {
            Ok(0) | Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
