//! The `hello` FIFO: reading HELLO lines and turning each into a client.
//!
//! Each HELLO is handled in its own task, so one client that is slow to open
//! its reply FIFO never holds up the next. A semaphore bounds how many
//! handshakes are pending; when it is exhausted the loop stops reading, the
//! `hello` pipe fills, and new clients wait in `write()`: backpressure, not
//! unbounded memory. A handshake creates nothing until the reply FIFO is open,
//! so a reply nobody reads times out without leaving anything behind.
//!
//! HELLOs naming reply FIFOs nobody opens are cheap to write, so a flood of
//! them must not keep real clients out:
//! - a reply FIFO is tried at once, before the handshake takes a seat in the
//!   table of waiting handshakes: a client that opened its reply before
//!   writing HELLO (the client library, `fifobus connect`) never waits for a
//!   seat, however full the table;
//! - at most one handshake waits on a given reply FIFO (by identity, device
//!   and inode); another HELLO naming it meanwhile is dropped (`reply-busy`);
//! - the wait for a reader shrinks as the table fills (see
//!   [`handshake_wait`]), down to [`MIN_HANDSHAKE_WAIT`] when it is full, and
//!   every waiting handshake follows the figure as it changes (the shortest
//!   it has seen: it does not grow back when the flood ebbs), not the one it
//!   started with;
//! - when the table is full, a newcomer takes the seat of the oldest waiter
//!   if that one has waited [`MIN_HANDSHAKE_WAIT`], and is refused at once
//!   otherwise (`reply-timeout`). Either way the loop goes on reading
//!   `hello`: a flood is worked off as fast as HELLOs can be parsed, so real
//!   HELLOs do not queue behind it in the pipe.
//!
//! Why a real client still gets through: it opens its reply FIFO for
//! reading before writing HELLO, or right after (a shell's `read < "$r"`),
//! so the broker's first or second try succeeds, milliseconds after its
//! HELLO is read: at once without a seat, or well inside the
//! [`MIN_HANDSHAKE_WAIT`] every seated handshake is guaranteed. Only a flood
//! that fills the whole table within [`MIN_HANDSHAKE_WAIT`] (over ten
//! thousand distinct FIFOs a second) refuses a late opener, and then only
//! one whose first try failed.
//!
//! This module only reads, parses and answers: making the client is
//! [`session::create`]'s job.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::unix::pipe;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::busdir::{BusDir, HelloCheck};
use crate::context::{Context, Phase};
use crate::counters::Rejection;
use crate::fifo::{CheckedReply, FileId, ReplyError, ReplyGuard, ReplyInfo};
use crate::protocol::hello::{self, HelloRejected};
use crate::protocol::{encode, ErrorCode, Hello, ProtocolError};
use crate::{busdir, fifo, session, warn_throttled};

/// Handshakes in progress at once; each holds a reply FIFO descriptor.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// The shortest wait for a reader a handshake is given, however full the
/// table (unless `--handshake-timeout` is shorter still): ample for a client
/// that opens its reply before or right after writing HELLO, and short
/// enough that a full table frees a slot ten times a second.
pub const MIN_HANDSHAKE_WAIT: Duration = Duration::from_millis(100);

/// How long a handshake waits for its reply FIFO's reader while `pending`
/// handshakes (itself included) are in the table: the whole `timeout` up to
/// half full, then linearly less, down to [`MIN_HANDSHAKE_WAIT`] when full.
/// Under half full nothing changes for slow clients; past it, the HELLOs
/// that hold slots longest (those nobody answers) are the ones cut short.
pub fn handshake_wait(timeout: Duration, pending: usize) -> Duration {
    let floor = MIN_HANDSHAKE_WAIT.min(timeout);
    let half = MAX_PENDING_HANDSHAKES / 2;
    if pending <= half {
        return timeout;
    }
    let room = MAX_PENDING_HANDSHAKES.saturating_sub(pending) as u32;
    floor + (timeout - floor) * room / half as u32
}

/// Handshake tasks at once, in any phase: the hard bound on their memory
/// and descriptors. Twice the waiting table, so that a full table of waiters
/// leaves room for HELLOs that are answered at once.
const MAX_HANDSHAKE_TASKS: usize = 2 * MAX_PENDING_HANDSHAKES;

/// The handshakes in progress: a bound on tasks, the table of those
/// waiting for their reply FIFO to be opened, and which FIFOs those are.
struct Pending {
    tasks: Arc<Semaphore>,
    replies: Mutex<Claims>,
    waiting: Mutex<Waiting>,
}

/// The reply FIFOs handshakes are waiting on, by identity and by the path
/// their HELLO gave: the path lets a repeated HELLO be dropped before any
/// system call, the identity catches the same FIFO named another way.
#[derive(Default)]
struct Claims {
    ids: HashSet<FileId>,
    paths: HashSet<PathBuf>,
}

/// Handshakes waiting for a reader, oldest first, each with the token that
/// abandons it.
#[derive(Default)]
struct Waiting {
    next: u64,
    seats: BTreeMap<u64, (Instant, CancellationToken)>,
}

impl Pending {
    fn new() -> Arc<Pending> {
        Arc::new(Pending {
            tasks: Arc::new(Semaphore::new(MAX_HANDSHAKE_TASKS)),
            replies: Mutex::default(),
            waiting: Mutex::default(),
        })
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.replies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a handshake is waiting on a reply FIFO named exactly `path`:
    /// a check without a system call, so that a flood repeating the same
    /// HELLOs costs a hash lookup per line.
    fn waited_on(&self, path: &Path) -> bool {
        self.claims().paths.contains(path)
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handshakes waiting for a reader now.
    fn count(&self) -> usize {
        self.waiting().seats.len()
    }

    /// Marks `id`, named `path`, as waited on, unless some handshake
    /// already waits on that FIFO or on that path.
    fn claim(self: &Arc<Self>, id: FileId, path: &Path) -> Option<ReplyClaim> {
        let mut c = self.claims();
        if c.ids.contains(&id) || c.paths.contains(path) {
            return None;
        }
        c.ids.insert(id);
        c.paths.insert(path.to_owned());
        Some(ReplyClaim {
            pending: self.clone(),
            id,
            path: path.to_owned(),
        })
    }

    /// A seat in the waiting table: a free one, else the oldest waiter's
    /// if it has waited [`MIN_HANDSHAKE_WAIT`] (it is abandoned), else none.
    fn seat(self: &Arc<Self>) -> Option<Seat> {
        let now = Instant::now();
        let mut w = self.waiting();
        if w.seats.len() >= MAX_PENDING_HANDSHAKES {
            let (&oldest, (since, _)) = w.seats.first_key_value()?;
            if now.duration_since(*since) < MIN_HANDSHAKE_WAIT {
                return None;
            }
            let (_, abandon) = w.seats.remove(&oldest).expect("just seen");
            abandon.cancel();
        }
        let seq = w.next;
        w.next += 1;
        let abandoned = CancellationToken::new();
        w.seats.insert(seq, (now, abandoned.clone()));
        Some(Seat {
            pending: self.clone(),
            seq,
            abandoned,
        })
    }
}

/// One handshake's hold on its reply FIFO, released on drop.
struct ReplyClaim {
    pending: Arc<Pending>,
    id: FileId,
    path: PathBuf,
}

impl Drop for ReplyClaim {
    fn drop(&mut self) {
        let mut c = self.pending.claims();
        c.ids.remove(&self.id);
        c.paths.remove(&self.path);
    }
}

/// A seat in the waiting table, given up on drop.
struct Seat {
    pending: Arc<Pending>,
    seq: u64,
    /// Cancelled when a newcomer takes this seat.
    abandoned: CancellationToken,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.pending.waiting().seats.remove(&self.seq);
    }
}

/// How long a deleted `hello` stays missing before it is put back: longer
/// than `rm -rf` takes to empty a bus directory, so that removing the whole
/// directory ends the broker (which a supervisor then restarts) instead of
/// racing it. A `hello` replaced by something else is put back at once.
const HELLO_REPUBLISH_GRACE: Duration = Duration::from_millis(200);

/// Serves `hello` until shutdown, then removes it first of all.
pub async fn run(mut bus: BusDir, ctx: Arc<Context>) -> BusDir {
    let pending = Pending::new();
    let mut buf = BytesMut::new();
    // Whether the last read left `hello` empty (see `discard_fragment`).
    let mut emptied = false;
    let mut phase = ctx.phase.subscribe();
    loop {
        // Handing over to `serve --replace`: read no HELLO; what is in
        // `hello` stays there for the next broker (which opens it first).
        if *phase.borrow_and_update() != Phase::Serving {
            tokio::select! {
                () = ctx.cancel.cancelled() => break,
                r = phase.changed() => if r.is_err() { break },
            }
            continue;
        }
        tokio::select! {
            () = ctx.cancel.cancelled() => break,
            _ = phase.changed() => continue,
            () = ctx.watcher.hello_changed() => {
                let path = bus.path().join(busdir::HELLO);
                match bus.check_hello() {
                    // Our own publishing, or a rescan that found it intact.
                    HelloCheck::Ours => continue,
                    HelloCheck::Missing => {
                        // `rm -rf` of the bus directory takes `hello` first: a
                        // `hello` put back at once would make its final rmdir
                        // fail, and leave a directory without clients/ or pid
                        // file. So wait briefly; if the directory goes, the
                        // broker stops instead (`FsWatcher::bus_dir_gone`).
                        tokio::select! {
                            () = tokio::time::sleep(HELLO_REPUBLISH_GRACE) => {}
                            () = ctx.watcher.bus_dir_gone() => continue,
                            () = ctx.cancel.cancelled() => break,
                        }
                        if bus.check_hello() == HelloCheck::Ours {
                            continue;
                        }
                        tracing::warn!("{} was deleted; putting it back", path.display())
                    }
                    HelloCheck::Impostor(what) => tracing::warn!(
                        "{} was replaced by {what}; putting the broker's own back (whoever did this may have read HELLOs written in between)",
                        path.display()
                    ),
                }
                match bus.replace_hello() {
                    Ok(old) => {
                        // Lines written to our FIFO before it lost its name are still in it.
                        match drain(&old, &mut buf) {
                            Ok(e) => emptied = e,
                            Err(_) => buf.clear(),
                        }
                    }
                    Err(e) => tracing::error!("cannot put {} back: {e}; new clients cannot connect until the broker restarts", path.display()),
                }
            }
            r = bus.hello().readable() => {
                if let Err(e) = r {
                    tracing::error!("waiting on hello failed: {e}");
                    break;
                }
                match drain(bus.hello(), &mut buf) {
                    Ok(e) => emptied = e,
                    Err(e) => {
                        tracing::error!("reading hello failed: {e}");
                        break;
                    }
                }
            }
        }
        while let Some((line, skipped)) = hello::take_line(&mut buf) {
            if skipped > 0 {
                fragments_skipped(skipped, &ctx);
            }
            if line.iter().all(|&b| b == b' ') {
                continue;
            }
            let Some(attempt) = first_attempt(&line, &ctx, &pending) else {
                continue;
            };
            let permit = tokio::select! {
                p = pending.tasks.clone().acquire_owned() => p.expect("semaphore is never closed"),
                () = ctx.cancel.cancelled() => break,
            };
            let (ctx2, pending2) = (ctx.clone(), pending.clone());
            ctx.handshakes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ctx.tracker.spawn(async move {
                handshake(attempt, &ctx2, &pending2).await;
                ctx2.handshakes
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                drop(permit);
            });
        }
        // (Unless stopping: then `buf` may still hold lines to refuse below.)
        if emptied && !ctx.cancel.is_cancelled() {
            discard_fragment(&mut buf, &ctx);
        }
        let dropped = hello::trim_partial(&mut buf);
        if dropped > 0 {
            fragments_skipped(dropped, &ctx);
        }
    }
    // First thing at shutdown: no new client may start writing HELLO.
    bus.unpublish_hello();
    // Those that already did get a prompt answer rather than a timeout.
    if drain(bus.hello(), &mut buf).is_ok() {
        while let Some((l, _)) = hello::take_line(&mut buf) {
            if let Some(reply) = Hello::parse(&l)
                .map(|h| Some(h.reply))
                .unwrap_or_else(|r| r.reply)
            {
                let ctx2 = ctx.clone();
                ctx.tracker
                    .spawn(async move { refuse_for_shutdown(&reply, &ctx2).await });
            }
        }
    }
    bus
}

/// What is left in `buf` once every complete line is taken, right after
/// `hello` was drained to `EAGAIN`: a fragment that can never become a valid
/// HELLO, so it is dropped (counted, logged) rather than glued to the front
/// of the next client's line.
///
/// Why it can never complete: a valid HELLO is one `write()` of at most
/// `PIPE_BUF` bytes ending in `\n`, and the kernel places such a write in
/// the pipe whole, never interleaved with another and never half visible to
/// a reader (it waits for room for all of it, and copies it under the pipe's
/// lock). Having read until the pipe was empty, `buf` therefore holds whole
/// writes only, so bytes after its last newline are the end of a write that
/// itself ended without one (`echo -n`, or a HELLO written in pieces):
/// whatever comes next starts a new write. Only writes over `PIPE_BUF` can
/// be seen in part, and those are over [`MAX_HELLO_LINE`]: the splitter is
/// then discarding up to the next newline and has left `buf` empty, so this
/// does not touch them. What this cannot undo is a fragment and another
/// HELLO landing between the same two reads: they are one line, refused
/// (its client times out), and the next HELLO is unaffected.
fn discard_fragment(buf: &mut BytesMut, ctx: &Context) {
    if buf.is_empty() {
        return;
    }
    ctx.counters.handshake_rejected(Rejection::Fragment);
    warn_throttled!(
        ctx.throttle,
        "hello-fragment",
        "discarded {} bytes left in hello without a newline ({:?}): a HELLO must be one write ending in a newline",
        buf.len(),
        String::from_utf8_lossy(&buf[..buf.len().min(80)])
    );
    buf.clear();
}

/// Fragments skipped in front of a HELLO, or dropped from a partial line
/// that grew past one HELLO's length (see [`hello::take_line`]): counted
/// with the other fragments, logged at most once a second.
fn fragments_skipped(bytes: usize, ctx: &Context) {
    ctx.counters.handshake_rejected(Rejection::Fragment);
    warn_throttled!(
        ctx.throttle,
        "hello-fragment",
        "skipped {bytes} bytes of fragments in hello (writes without a newline): a HELLO must be one write ending in a newline"
    );
}

/// Checks a reply FIFO, refusing anything under the bus directory and any
/// FIFO the broker holds (`hello`, every live client's `send` and `recv`).
fn check_reply(reply: &Path, ctx: &Context) -> Result<CheckedReply, ReplyError> {
    let held = |id: FileId| ctx.fs.hello_id() == Some(id) || ctx.clients.holds(id);
    let guard = ReplyGuard {
        bus_dir: ctx.fs.id(),
        held: &held,
    };
    fifo::check_reply(reply, &guard)
}

/// Answers `ERR shutting-down` on a reply FIFO if it can be opened at once
/// (its client is waiting on it); the shutdown deadline leaves no time for more.
async fn refuse_for_shutdown(reply: &Path, ctx: &Context) {
    const QUICK: Duration = Duration::from_millis(100);
    let Ok(checked) = check_reply(reply, ctx) else {
        return;
    };
    if let Ok((tx, _)) = checked.open(Instant::now(), || QUICK).await {
        let e = ProtocolError::new(
            ErrorCode::ShuttingDown,
            "the broker is stopping; try again when it is back",
        );
        let _ = fifo::write_line(&tx, &encode::err(&e), QUICK).await;
    }
}

/// Reads what `hello` holds, at most `DRAIN_MAX` bytes a turn so that a
/// writer that never stops cannot grow `buf` without bound (the readiness
/// stays set, and the loop comes back for the rest). Returns whether the
/// pipe was left empty.
fn drain(rx: &pipe::Receiver, buf: &mut BytesMut) -> io::Result<bool> {
    const DRAIN_MAX: usize = 256 * 1024;
    let mut read = 0;
    loop {
        if read >= DRAIN_MAX {
            return Ok(false);
        }
        buf.reserve(16 * 1024);
        match rx.try_read_buf(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Why [`wait_for_reader`] gave up.
enum Busy {
    /// Another handshake is waiting for this FIFO's reader.
    Busy,
    Reply(ReplyError),
}

impl From<ReplyError> for Busy {
    fn from(e: ReplyError) -> Busy {
        Busy::Reply(e)
    }
}

/// Waits for a reader on a checked reply FIFO whose first try failed, from
/// a seat in the waiting table, for as long as [`handshake_wait`] allows or
/// until a newcomer takes the seat, provided no other handshake is already
/// waiting on the same FIFO or path.
async fn wait_for_reader(
    checked: CheckedReply,
    path: &Path,
    timeout: Duration,
    pending: &Arc<Pending>,
) -> Result<(pipe::Sender, ReplyInfo), Busy> {
    let started = Instant::now();
    // Held while waiting only: once open, the FIFO may serve the client's
    // next HELLO (a script reusing its reply FIFO).
    let Some(_claim) = pending.claim(checked.info().id(), path) else {
        return Err(Busy::Busy);
    };
    let Some(seat) = pending.seat() else {
        return Err(checked.no_reader(Duration::ZERO).into());
    };
    let abandoned = &seat.abandoned;
    let r = tokio::select! {
        r = checked.open(started, || handshake_wait(timeout, pending.count())) => r,
        () = abandoned.cancelled() => Err(checked.no_reader(started.elapsed())),
    };
    Ok(r?)
}

/// A HELLO as far as the `hello` loop takes it: parsed, its reply FIFO
/// checked and tried once.
struct Attempt {
    hello: Hello,
    /// Why the HELLO is refused, to be said on its reply FIFO.
    refusal: Option<ProtocolError>,
    reply: FirstTry,
}

enum FirstTry {
    /// The reply FIFO had a reader: it is open.
    Open(pipe::Sender, ReplyInfo),
    /// Nobody reads the reply FIFO yet.
    NoReader(CheckedReply),
}

/// Everything about a HELLO that never waits, done by the `hello` loop
/// itself rather than in a task of its own: a client that opened its reply
/// FIFO first (the client library, `fifobus connect`) is then past its
/// only system calls before the next line is read, instead of queued behind
/// every task a flood has made, and a HELLO repeating one that is already
/// waiting is dropped before any system call. `None`: refused or dropped,
/// counted and logged; nothing is said to a reply FIFO that failed its
/// checks.
///
/// Refused in silence: a reply FIFO that is the broker's own or lies in
/// the bus directory (`reply=DIR/hello`, `reply=<another client>/recv`),
/// since writing `ERR bad-reply` there would itself be the attack (a line
/// injected into another client's stream, or into `hello`).
fn first_attempt(line: &[u8], ctx: &Context, pending: &Pending) -> Option<Attempt> {
    let (hello, refusal) = match Hello::parse(line) {
        Ok(h) => (h, None),
        Err(HelloRejected { reply: None, error }) => {
            ctx.counters.handshake_rejected(Rejection::Code(error.code));
            warn_throttled!(
                ctx.throttle,
                error.code.as_str(),
                "refused a HELLO with no usable reply=: {}",
                error.text
            );
            return None;
        }
        Err(HelloRejected {
            reply: Some(r),
            error,
        }) => {
            let h = Hello {
                reply: r,
                name: None,
                pid: None,
                subs: Vec::new(),
                no_echo: false,
            };
            (h, Some(error))
        }
    };
    if pending.waited_on(&hello.reply) {
        reply_busy(&hello.reply, ctx);
        return None;
    }
    let tried = check_reply(&hello.reply, ctx).and_then(|checked| {
        Ok(match checked.try_open()? {
            Some((tx, info)) => FirstTry::Open(tx, info),
            None => FirstTry::NoReader(checked),
        })
    });
    match tried {
        Ok(reply) => Some(Attempt {
            hello,
            refusal,
            reply,
        }),
        Err(e) => {
            reply_failed(&e, ctx);
            None
        }
    }
}

/// A HELLO dropped because another handshake waits on its reply FIFO.
fn reply_busy(reply: &Path, ctx: &Context) {
    ctx.counters.handshake_rejected(Rejection::ReplyBusy);
    warn_throttled!(
        ctx.throttle,
        "reply-busy",
        "dropped a HELLO naming {}: another handshake is already waiting for that FIFO to be opened",
        reply.display()
    );
}

/// A HELLO given up because its reply FIFO failed a check or was not
/// opened in time.
fn reply_failed(e: &ReplyError, ctx: &Context) {
    ctx.counters.handshake_rejected(match e {
        ReplyError::NoReader(..) => Rejection::ReplyTimeout,
        _ => Rejection::Code(ErrorCode::BadReply),
    });
    if e.is_injection() {
        warn_throttled!(
            ctx.throttle,
            "bad-reply",
            "refused a HELLO without answering it (bad-reply): {e}"
        );
    } else {
        warn_throttled!(ctx.throttle, "bad-reply", "abandoned a handshake: {e}");
    }
}

/// Finishes a handshake the `hello` loop started: waits for the reply
/// FIFO's reader if need be, makes the client and answers.
async fn handshake(attempt: Attempt, ctx: &Arc<Context>, pending: &Arc<Pending>) {
    let Attempt {
        hello,
        refusal,
        reply,
    } = attempt;
    let timeout = ctx.config.handshake_timeout;
    let opened = match reply {
        FirstTry::Open(tx, info) => Ok((tx, info)),
        FirstTry::NoReader(checked) => tokio::select! {
            r = wait_for_reader(checked, &hello.reply, timeout, pending) => r,
            () = ctx.cancel.cancelled() => {
                refuse_for_shutdown(&hello.reply, ctx).await;
                return;
            }
        },
    };
    let (reply, info) = match opened {
        Ok(r) => r,
        Err(Busy::Busy) => return reply_busy(&hello.reply, ctx),
        Err(Busy::Reply(e)) => return reply_failed(&e, ctx),
    };
    // The client's identity is who owns its reply FIFO (`info.uid`).
    let answer = match refusal {
        Some(e) => Err(e),
        None => session::create(&hello, info.uid, ctx).await,
    };
    let line = match &answer {
        Ok(welcome) => {
            ctx.counters.handshakes_accepted.fetch_add(1, Relaxed);
            encode::welcome(&welcome.id, &welcome.dir)
        }
        Err(e) => {
            ctx.counters.handshake_rejected(Rejection::Code(e.code));
            warn_throttled!(ctx.throttle, e.code.as_str(), "refused a HELLO: {}", e.text);
            encode::err(e)
        }
    };
    // A reader that does not read gets the same budget as one that does
    // not open.
    let wait = handshake_wait(timeout, pending.count());
    if let Err(e) = fifo::write_line(&reply, &line, wait).await {
        tracing::debug!("cannot answer HELLO on {}: {e}", hello.reply.display());
        if let Ok(welcome) = answer {
            welcome.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_whole_to_half_full_then_shrinks_to_the_floor() {
        let t = Duration::from_secs(5);
        let half = MAX_PENDING_HANDSHAKES / 2;
        assert_eq!(handshake_wait(t, 1), t);
        assert_eq!(handshake_wait(t, half), t);
        let three_quarters = handshake_wait(t, half + half / 2);
        assert_eq!(
            three_quarters,
            MIN_HANDSHAKE_WAIT + (t - MIN_HANDSHAKE_WAIT) / 2
        );
        assert_eq!(
            handshake_wait(t, MAX_PENDING_HANDSHAKES),
            MIN_HANDSHAKE_WAIT
        );
        assert_eq!(
            handshake_wait(t, MAX_PENDING_HANDSHAKES + 5),
            MIN_HANDSHAKE_WAIT
        );
        // Never longer than asked for.
        let short = Duration::from_millis(30);
        assert_eq!(handshake_wait(short, MAX_PENDING_HANDSHAKES), short);
        assert_eq!(handshake_wait(short, half + 1), short);
        let mut last = t;
        for n in half..=MAX_PENDING_HANDSHAKES {
            let w = handshake_wait(t, n);
            assert!(w <= last, "the wait only shrinks as the table fills");
            last = w;
        }
    }
}
