//! A client's reader: `send` → lines → commands → the router.
//!
//! Each read becomes at most one batch on the router channel, capped in
//! lines and bytes, so one busy publisher costs one channel send per many
//! lines, cannot hold a huge batch, and yields between batches. A bad line
//! becomes an error item in its place in the batch, so its `ERR` keeps the
//! order of the client's requests.

use std::io;
use std::os::fd::AsRawFd;

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;

use super::Session;
use crate::context::Context;
use crate::protocol::{Command, ErrorCode, Line, LineSplitter, ProtocolError};
use crate::router::CloseReason;
use crate::{fifo, warn_throttled};

/// One read from `send`. Large enough that a bulk publisher costs one
/// syscall per many lines.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read, and lines, before a batch goes to the router: one busy
/// publisher cannot hold a huge batch (memory) or a long turn (fairness).
const BATCH_BYTES: usize = 256 * 1024;
const BATCH_ITEMS: usize = 1024;

/// Reads `send` until BYE or an error (returns the reason), or until `stop`
/// is cancelled: then it first passes on whatever the client wrote before
/// (a script that publishes and exits must not lose its last lines to the
/// pidfd firing first) and returns `None`.
pub(super) async fn read_commands(
    s: &Session,
    ctx: &Context,
    stop: &CancellationToken,
) -> Option<CloseReason> {
    let mut buf = BytesMut::new();
    let mut splitter = LineSplitter::new(ctx.config.max_line);
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
            let batch = match read_batch(s, ctx, &mut buf, &mut splitter, last) {
                Ok(b) => b,
                Err(e) => return Some(CloseReason::Io(format!("reading send: {e}"))),
            };
            if let (Some(a), false) = (&s.activity, batch.items.is_empty()) {
                a.touch(); // a command read: a sign of life (orphan.rs)
            }
            if !batch.items.is_empty() && !ctx.router.batch(s.key, batch.items, batch.read_at).await
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
    ctx: &Context,
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
                ctx.counters.protocol_error(e.code);
                warn_throttled!(ctx.throttle, e.code.as_str(), client = %s.label, "refused a line: {}", e.text);
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
