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

use crate::broker::Shared;
use crate::metrics::DropReason;
use crate::protocol::{encode, Command, ErrorCode, Line, LineSplitter, ProtocolError};
use crate::router::{ClientKey, CloseReason, Entry, Outbox};
use crate::watch::PidWatch;
use crate::{busdir, fifo, warn_throttled};

/// One read from `send`. Large enough that a bulk publisher costs one
/// syscall per many lines.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read before a batch goes to the router, so one busy publisher
/// cannot hold a huge batch while others wait.
const BATCH_BYTES: usize = 256 * 1024;
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
        let reason = self.serve(&shared).await;
        self.teardown(&shared, reason).await;
    }

    async fn serve(&self, shared: &Shared) -> CloseReason {
        let latency = shared.metrics.as_ref().map(|m| m.latency.local());
        let writer = write_lines(&self.recv, &self.outbox, latency);
        tokio::pin!(writer);
        let reader = read_commands(self, shared);
        let pid_exit = async {
            match &self.pid {
                Some(p) => p.exited().await,
                None => std::future::pending().await,
            }
        };
        let ended_by = tokio::select! {
            reason = &mut writer => return reason,
            reason = reader => reason,
            () = pid_exit => CloseReason::PidExited,
            () = shared.cancel.cancelled() => CloseReason::Shutdown,
        };
        let farewell = ended_by.flushes().then(encode::bye);
        self.outbox.close(ended_by.clone(), farewell);
        // Reasons that flush get the grace period to write what is queued;
        // the others make the writer return at once.
        tokio::time::timeout(shared.config.flush_grace, &mut writer)
            .await
            .unwrap_or(ended_by)
    }

    async fn teardown(self, shared: &Shared, reason: CloseReason) {
        if reason.flushes() {
            // Closing our end of `recv` destroys whatever the client has not
            // read yet, the final BYE included; give it a moment to read.
            wait_until_read(&self.recv, shared.config.flush_grace).await;
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

/// Reads `send` until BYE or an error, sending one batch per read burst.
async fn read_commands(s: &Session, shared: &Shared) -> CloseReason {
    let mut buf = BytesMut::new();
    let mut splitter = LineSplitter::new(shared.config.max_line);
    loop {
        if let Err(e) = s.send.readable().await {
            return CloseReason::Io(format!("waiting on send: {e}"));
        }
        let mut items = Vec::new();
        let read_at = std::time::Instant::now();
        let mut read = 0;
        let mut bye = false;
        while read < BATCH_BYTES && !bye {
            buf.reserve(READ_CHUNK);
            match s.send.try_read_buf(&mut buf) {
                // Impossible while we hold send O_RDWR; treat like "nothing yet".
                Ok(0) => break,
                Ok(n) => read += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return CloseReason::Io(format!("reading send: {e}")),
            }
            while let Some(line) = splitter.next_line(&mut buf) {
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
                        m.protocol_error(e.code.as_str());
                    }
                    warn_throttled!(shared.throttle, e.code.as_str(), client = %s.label, "refused a line: {}", e.text);
                }
                bye = matches!(item, Ok(Command::Bye));
                items.push(item);
                if bye {
                    break;
                }
            }
        }
        if !items.is_empty() && !shared.router.batch(s.key, items, read_at).await {
            return CloseReason::Shutdown;
        }
        if bye {
            // The router closes the outbox; anything sent after BYE is ignored.
            return std::future::pending().await;
        }
        if buf.is_empty() {
            // Idle clients should not pin a read buffer each.
            buf = BytesMut::new();
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
    let slices: Vec<IoSlice<'_>> = batch
        .iter()
        .take(MAX_IOVECS)
        .map(|e| IoSlice::new(&e.line))
        .collect();
    let mut n = recv.try_write_vectored(&slices)?;
    drop(slices);
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

/// Waits, up to `grace`, until the client has read everything in `recv`.
/// Only runs while a client is ending, so a short poll is acceptable here.
async fn wait_until_read(recv: &pipe::Sender, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match fifo::unread_bytes(recv.as_raw_fd()) {
            Ok(0) | Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
