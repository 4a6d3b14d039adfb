//! A client's reader: `send` → lines → commands → the router.
//!
//! Each read becomes at most one batch on the router channel, capped in
//! lines and bytes, so one busy publisher costs one channel send per many
//! lines, cannot hold a huge batch, and yields between batches. A bad line
//! becomes an error item in its place in the batch, so its `ERR` keeps the
//! order of the client's requests.
//!
//! A read that takes more than half of what `send` can hold means the
//! client writes faster than this pipe size lets it (a bulk publisher: its
//! `write` was blocked, or about to be): `send` then doubles, up to
//! `--pipe-size` (see `pipe_size.rs`). Half, not all: a pipe of one-page
//! slots counts as full before its bytes reach its size (a line that does
//! not fit in what is left of the last page takes a new one), and half is
//! what it holds at least when full. Before waiting for the client to write
//! again, the reader shrinks `send` back to a page if it has not been full
//! for `--pipe-idle`.
//!
//! A partial line (the bytes after the last newline) stays in the reader's
//! buffer until its newline comes, up to `--max-line`. What that buffer
//! holds is charged to the broker's memory budget ([`PartialCharge`]), and
//! the buffer is cut to size when the pipe is drained, so a partial line
//! costs its length rather than a 64 KiB read chunk. While the budget is
//! exhausted the reader accepts lines of at most [`FAIR_PARTIAL`] bytes:
//! a longer one (partial or not) is discarded up to its newline and
//! answered `ERR line-too-long`, so clients holding partial lines cannot
//! pin `--max-line` each while the broker is short. Backpressure (not
//! reading) was the alternative; it would not free what a client already
//! sent, and a hostile client does not mind being blocked.
//!
//! Backpressure is what a lossless subscriber asks for, though: when lines
//! this client published filled a lossless subscriber's backlog, the router
//! stalls this client's outbox, and the reader reads nothing more (the
//! client's writes to `send` block once its pipe is full, as on any pipe)
//! until that backlog has drained to half ([`Outbox::until_unstalled`]).
//!
//! [`Outbox::until_unstalled`]: crate::router::Outbox::until_unstalled

use std::io;
use std::os::fd::AsRawFd;

use bytes::BytesMut;
use tokio_util::sync::CancellationToken;

use super::pipe_size::{self, PipeSize};
use super::Session;
use crate::context::{Context, Phase};
use crate::counters::MemoryBudget;
use crate::protocol::{Command, ErrorCode, Input, Line, LineSplitter, ProtocolError};
use crate::router::CloseReason;
use crate::{fifo, warn_throttled};

/// One read from `send`. Large enough that a bulk publisher costs one
/// syscall per many lines.
const READ_CHUNK: usize = 64 * 1024;
/// Bytes read, and lines, before a batch goes to the router: one busy
/// publisher cannot hold a huge batch (memory) or a long turn (fairness).
const BATCH_BYTES: usize = 256 * 1024;
const BATCH_ITEMS: usize = 1024;

/// The longest line accepted while the memory budget is exhausted: ordinary
/// messages still pass, a partial line cannot grow to `--max-line`.
pub(crate) const FAIR_PARTIAL: usize = 64 * 1024;

/// What this client's read buffer holds against the memory budget; given
/// back when the reader stops.
struct PartialCharge<'a> {
    budget: &'a MemoryBudget,
    held: usize,
}

impl PartialCharge<'_> {
    /// Charges what `buf` holds now, in place of what was charged before.
    fn update(&mut self, buf: &BytesMut) {
        let now = if buf.is_empty() { 0 } else { buf.capacity() };
        if now > self.held {
            self.budget.charge(now - self.held);
        } else {
            self.budget.credit(self.held - now);
        }
        self.held = now;
    }
}

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
    let budget = &ctx.counters.memory;
    let mut charge = PartialCharge { budget, held: 0 };
    let mut pipe = PipeSize::new(
        s.send.as_raw_fd(),
        s.send_size,
        ctx.config.pipe_size,
        ctx.config.pipe_idle,
    );
    if !s.seed.is_empty() {
        // What the previous broker had read but not parsed (serve --replace).
        tracing::debug!(client = %s.label, bytes = s.seed.len(), "handover: parsing first what the previous broker read");
        buf.extend_from_slice(&s.seed);
    }
    let mut phase = ctx.phase.subscribe();
    let mut seeded = !buf.is_empty();
    loop {
        if *phase.borrow_and_update() != Phase::Serving {
            pause(s, ctx, &mut phase, &buf).await;
            continue;
        }
        pipe.shrink_if_idle(tokio::time::Instant::now());
        if s.outbox.is_stalled() {
            // Being stopped ends the wait: what was sent is then passed on.
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                () = s.outbox.until_unstalled() => {}
            }
        }
        let last = if std::mem::take(&mut seeded) {
            false
        } else {
            tokio::select! {
            biased;
            r = s.send.readable() => {
                if let Err(e) = r {
                    return Some(CloseReason::Io(format!("waiting on send: {e}")));
                }
                false
            }
            () = stop.cancelled() => true,
            () = pipe_size::until(pipe.check_at()) => {
                pipe.on_timer(tokio::time::Instant::now());
                continue;
            }
            _ = phase.changed() => continue,
            }
        };
        // Batches are capped in lines and bytes, and the reader yields
        // between them: one busy publisher cannot hold a worker thread, fill
        // the router channel with huge batches, or starve shutdown.
        loop {
            splitter.set_max_line(if budget.over() {
                ctx.config.max_line.min(FAIR_PARTIAL)
            } else {
                ctx.config.max_line
            });
            let batch = read_batch(s, ctx, &mut buf, &mut splitter, &mut pipe, last);
            charge.update(&buf);
            let batch = match batch {
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
            if batch.drained
                || *phase.borrow() != Phase::Serving
                || (!last && s.outbox.is_stalled())
            {
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
        } else if buf.capacity() > 2 * buf.len() {
            // A partial line waits for its newline: keep only its bytes.
            buf = BytesMut::from(&buf[..]);
        }
        charge.update(&buf);
    }
}

/// Paused for a handover (`crate::control`), at a line boundary: every
/// batch read so far is with the router. Counted as paused until the phase
/// changes; when released, what was read but not parsed (`buf`) is saved
/// for the next broker, and nothing more is read.
async fn pause(
    s: &Session,
    ctx: &Context,
    phase: &mut tokio::sync::watch::Receiver<Phase>,
    buf: &BytesMut,
) {
    use std::sync::atomic::Ordering::SeqCst;
    ctx.paused_readers.fetch_add(1, SeqCst);
    let released = loop {
        match *phase.borrow_and_update() {
            Phase::Serving => break false,
            Phase::Released => break true,
            Phase::Paused => {}
        }
        if phase.changed().await.is_err() {
            break false;
        }
    };
    if released {
        tracing::debug!(client = %s.label, bytes = buf.len(), lines = memchr::memchr_iter(b'\n', buf).count(), "handover: saving what was read but not parsed");
        ctx.state.save_unparsed(&s.name, buf);
        ctx.paused_readers.fetch_sub(1, SeqCst);
        std::future::pending::<()>().await;
    }
    ctx.paused_readers.fetch_sub(1, SeqCst);
}

struct Batch {
    items: Vec<Input>,
    /// The lines `items` stand for.
    lines: usize,
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
    pipe: &mut PipeSize,
    raw: bool,
) -> io::Result<Batch> {
    let mut batch = Batch {
        items: Vec::new(),
        lines: 0,
        read_at: std::time::Instant::now(),
        drained: false,
        bye: false,
    };
    let mut read = 0;
    loop {
        loop {
            // A publisher's stream: its `PUB` lines taken whole (see
            // `protocol::run`), the rest line by line.
            if let Some(run) = splitter.take_pub_run(buf, BATCH_ITEMS - batch.lines) {
                batch.lines += run.count;
                batch.items.push(Input::Pubs(run));
                if batch.lines >= BATCH_ITEMS {
                    return Ok(batch);
                }
                continue;
            }
            let Some(line) = splitter.next_line(buf) else {
                break;
            };
            let item = match line {
                Line::Complete(l) => match Command::parse(l) {
                    Ok(None) => continue,
                    Ok(Some(c)) => Ok(c),
                    Err(e) => Err(e),
                },
                Line::TooLong if splitter.max_line() < ctx.config.max_line => {
                    Err(ProtocolError::new(
                        ErrorCode::LineTooLong,
                        format!(
                            "line longer than {} bytes skipped: the broker's memory budget (--max-memory) is exhausted, so lines are capped below --max-line ({}) until it recovers; send it again later",
                            splitter.max_line(),
                            ctx.config.max_line
                        ),
                    ))
                }
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
            batch.items.push(Input::Line(item));
            batch.lines += 1;
            if batch.bye || batch.lines >= BATCH_ITEMS {
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
            Ok(n) => {
                read += n;
                if 2 * n > pipe.size().min(READ_CHUNK) {
                    pipe.grow(&ctx.throttle);
                } else {
                    pipe.passed();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                batch.drained = true;
                return Ok(batch);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
