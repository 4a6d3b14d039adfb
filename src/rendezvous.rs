//! The `hello` FIFO: reading HELLO lines and turning each into a client.
//!
//! Each HELLO is handled in its own task, so one client that is slow to open
//! its reply FIFO never holds up the next. A semaphore bounds how many
//! handshakes are pending; when it is exhausted the loop stops reading, the
//! `hello` pipe fills, and new clients wait in `write()`: backpressure, not
//! unbounded memory. A handshake creates nothing until the reply FIFO is open,
//! so a reply nobody reads times out without leaving anything behind.
//!
//! This module only reads, parses and answers: making the client is
//! [`session::create`]'s job.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::unix::pipe;
use tokio::sync::Semaphore;

use crate::busdir::{BusDir, HelloCheck};
use crate::context::Context;
use crate::counters::Rejection;
use crate::fifo::{FileId, ReplyError, ReplyGuard, ReplyInfo};
use crate::protocol::hello::{HelloRejected, MAX_HELLO_LINE};
use crate::protocol::{encode, ErrorCode, Hello, Line, LineSplitter, ProtocolError};
use crate::{busdir, fifo, session, warn_throttled};

/// Handshakes in progress at once; each holds a reply FIFO descriptor.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Serves `hello` until shutdown, then removes it first of all.
pub async fn run(mut bus: BusDir, ctx: Arc<Context>) -> BusDir {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let mut splitter = LineSplitter::new(MAX_HELLO_LINE - 1);
    let mut buf = BytesMut::new();
    loop {
        tokio::select! {
            () = ctx.cancel.cancelled() => break,
            () = ctx.watcher.hello_changed() => {
                let path = bus.path().join(busdir::HELLO);
                match bus.check_hello() {
                    // Our own publishing, or a rescan that found it intact.
                    HelloCheck::Ours => continue,
                    HelloCheck::Missing => tracing::warn!("{} was deleted; putting it back", path.display()),
                    HelloCheck::Impostor(what) => tracing::warn!(
                        "{} was replaced by {what}; putting the broker's own back (whoever did this may have read HELLOs written in between)",
                        path.display()
                    ),
                }
                match bus.replace_hello() {
                    Ok(old) => {
                        // Lines written to our FIFO before it lost its name are still in it.
                        if drain(&old, &mut buf).is_err() { buf.clear(); }
                    }
                    Err(e) => tracing::error!("cannot put {} back: {e}; new clients cannot connect until the broker restarts", path.display()),
                }
            }
            r = bus.hello().readable() => {
                if let Err(e) = r {
                    tracing::error!("waiting on hello failed: {e}");
                    break;
                }
                if let Err(e) = drain(bus.hello(), &mut buf) {
                    tracing::error!("reading hello failed: {e}");
                    break;
                }
            }
        }
        while let Some(line) = splitter.next_line(&mut buf) {
            let line = match line {
                Line::Complete(l) if l.iter().all(|&b| b == b' ') => continue,
                Line::Complete(l) => l,
                Line::TooLong => {
                    warn_throttled!(
                        ctx.throttle,
                        "bad-hello",
                        "refused a HELLO longer than {} bytes (PIPE_BUF)",
                        MAX_HELLO_LINE
                    );
                    continue;
                }
            };
            let permit = tokio::select! {
                p = pending.clone().acquire_owned() => p.expect("semaphore is never closed"),
                () = ctx.cancel.cancelled() => break,
            };
            let ctx2 = ctx.clone();
            ctx.tracker.spawn(async move {
                handshake(&line, &ctx2).await;
                drop(permit);
            });
        }
    }
    // First thing at shutdown: no new client may start writing HELLO.
    bus.unpublish_hello();
    // Those that already did get a prompt answer rather than a timeout.
    if drain(bus.hello(), &mut buf).is_ok() {
        while let Some(line) = splitter.next_line(&mut buf) {
            if let Line::Complete(l) = line {
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
    }
    bus
}

/// Opens a reply FIFO, refusing anything under the bus directory and any
/// FIFO the broker holds (`hello`, every live client's `send` and `recv`).
async fn open_reply(
    reply: &Path,
    timeout: std::time::Duration,
    ctx: &Context,
) -> Result<(pipe::Sender, ReplyInfo), ReplyError> {
    let held = |id: FileId| ctx.fs.hello_id() == Some(id) || ctx.clients.holds(id);
    let guard = ReplyGuard {
        bus_dir: ctx.fs.id(),
        held: &held,
    };
    fifo::open_reply(reply, timeout, &guard).await
}

/// Answers `ERR shutting-down` on a reply FIFO if it can be opened at once
/// (its client is waiting on it); the shutdown deadline leaves no time for more.
async fn refuse_for_shutdown(reply: &Path, ctx: &Context) {
    const QUICK: std::time::Duration = std::time::Duration::from_millis(100);
    if let Ok((tx, _)) = open_reply(reply, QUICK, ctx).await {
        let e = ProtocolError::new(
            ErrorCode::ShuttingDown,
            "the broker is stopping; try again when it is back",
        );
        let _ = fifo::write_line(&tx, &encode::err(&e), QUICK).await;
    }
}

fn drain(rx: &pipe::Receiver, buf: &mut BytesMut) -> io::Result<()> {
    loop {
        buf.reserve(16 * 1024);
        match rx.try_read_buf(buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads one HELLO and answers it on its reply FIFO, except when that FIFO
/// is the broker's own or lies in the bus directory (`reply=DIR/hello`,
/// `reply=<another client>/recv`): then writing `ERR bad-reply` there would
/// itself be the attack (a line injected into another client's stream, or
/// into `hello`), so the HELLO is refused in silence, logged and counted
/// as `bad-reply`, and no client is created.
async fn handshake(line: &[u8], ctx: &Arc<Context>) {
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
            return;
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
            };
            (h, Some(error))
        }
    };
    let reply = tokio::select! {
        r = open_reply(&hello.reply, ctx.config.handshake_timeout, ctx) => r,
        () = ctx.cancel.cancelled() => {
            refuse_for_shutdown(&hello.reply, ctx).await;
            return;
        }
    };
    let (reply, info) = match reply {
        Ok(r) => r,
        Err(e) => {
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
            return;
        }
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
    if let Err(e) = fifo::write_line(&reply, &line, ctx.config.handshake_timeout).await {
        tracing::debug!("cannot answer HELLO on {}: {e}", hello.reply.display());
        if let Ok(welcome) = answer {
            welcome.abandon();
        }
    }
}
