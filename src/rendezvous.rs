//! The `hello` FIFO: reading HELLO lines and turning each into a client.
//!
//! Each HELLO is handled in its own task, so one client that is slow to open
//! its reply FIFO never holds up the next. A semaphore bounds how many
//! handshakes are pending; when it is exhausted the loop stops reading, the
//! `hello` pipe fills, and new clients wait in `write()`: backpressure, not
//! unbounded memory. A handshake creates nothing until the reply FIFO is open,
//! so a reply nobody reads times out without leaving anything behind.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::unix::pipe;
use tokio::sync::Semaphore;

use crate::broker::Shared;
use crate::busdir::BusDir;
use crate::protocol::hello::{HelloRejected, MAX_HELLO_LINE};
use crate::protocol::{encode, ErrorCode, Hello, Line, LineSplitter, ProtocolError};
use crate::router::Outbox;
use crate::session::Session;
use crate::watch::PidWatch;
use crate::{busdir, fifo, warn_throttled};

/// Handshakes in progress at once; each holds a reply FIFO descriptor.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Serves `hello` until shutdown, then removes it first of all.
pub async fn run(mut bus: BusDir, shared: Arc<Shared>) -> BusDir {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    let mut splitter = LineSplitter::new(MAX_HELLO_LINE - 1);
    let mut buf = BytesMut::new();
    loop {
        tokio::select! {
            () = shared.cancel.cancelled() => break,
            () = shared.watcher.hello_removed() => {
                if fifo::is_fifo(&bus.path().join(busdir::HELLO)) {
                    // A rescan after lost events found it intact.
                    continue;
                }
                match bus.recreate_hello() {
                    Ok(old) => {
                        tracing::warn!("{}/hello was deleted; recreated it", bus.path().display());
                        // Lines written before the deletion are still in the old pipe.
                        if drain(&old, &mut buf).is_err() { buf.clear(); }
                    }
                    Err(e) => tracing::error!("{}/hello was deleted and cannot be recreated: {e}", bus.path().display()),
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
                        shared.throttle,
                        "bad-hello",
                        "refused a HELLO longer than {} bytes (PIPE_BUF)",
                        MAX_HELLO_LINE
                    );
                    continue;
                }
            };
            let permit = tokio::select! {
                p = pending.clone().acquire_owned() => p.expect("semaphore is never closed"),
                () = shared.cancel.cancelled() => break,
            };
            let shared2 = shared.clone();
            shared.tracker.spawn(async move {
                handshake(&line, &shared2).await;
                drop(permit);
            });
        }
    }
    // First thing at shutdown: no new client may start writing HELLO.
    let _ = std::fs::remove_file(bus.path().join(busdir::HELLO));
    // Those that already did get a prompt answer rather than a timeout.
    if drain(bus.hello(), &mut buf).is_ok() {
        while let Some(line) = splitter.next_line(&mut buf) {
            if let Line::Complete(l) = line {
                if let Some(reply) = Hello::parse(&l)
                    .map(|h| Some(h.reply))
                    .unwrap_or_else(|r| r.reply)
                {
                    shared
                        .tracker
                        .spawn(async move { refuse_for_shutdown(&reply).await });
                }
            }
        }
    }
    bus
}

/// Answers `ERR shutting-down` on a reply FIFO if it can be opened at once
/// (its client is waiting on it); the shutdown deadline leaves no time for more.
async fn refuse_for_shutdown(reply: &Path) {
    const QUICK: std::time::Duration = std::time::Duration::from_millis(100);
    if let Ok(tx) = fifo::open_reply(reply, QUICK).await {
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

async fn handshake(line: &[u8], shared: &Arc<Shared>) {
    let (hello, refusal) = match Hello::parse(line) {
        Ok(h) => (Some(h), None),
        Err(HelloRejected { reply: None, error }) => {
            if let Some(m) = &shared.metrics {
                m.handshake_rejected(error.code.as_str());
            }
            warn_throttled!(
                shared.throttle,
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
            (Some(h), Some(error))
        }
    };
    let hello = hello.expect("set above");
    let reply = tokio::select! {
        r = fifo::open_reply(&hello.reply, shared.config.handshake_timeout) => r,
        () = shared.cancel.cancelled() => {
            refuse_for_shutdown(&hello.reply).await;
            return;
        }
    };
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            if let Some(m) = &shared.metrics {
                m.handshake_rejected(match e {
                    fifo::ReplyError::NoReader(..) => "reply-timeout",
                    _ => "bad-reply",
                });
            }
            warn_throttled!(shared.throttle, "bad-reply", "abandoned a handshake: {e}");
            return;
        }
    };
    let answer = match refusal {
        Some(e) => Err(e),
        None => create_client(&hello, shared).await,
    };
    if let Some(m) = &shared.metrics {
        match &answer {
            Ok(_) => m.handshakes_accepted.inc(),
            Err(e) => m.handshake_rejected(e.code.as_str()),
        }
    }
    let line = match &answer {
        Ok((_, id, dir)) => encode::welcome(id, dir),
        Err(e) => {
            warn_throttled!(
                shared.throttle,
                e.code.as_str(),
                "refused a HELLO: {}",
                e.text
            );
            encode::err(e)
        }
    };
    if let Err(e) = fifo::write_line(&reply, &line, shared.config.handshake_timeout).await {
        tracing::debug!("cannot answer HELLO on {}: {e}", hello.reply.display());
        if let Ok((outbox, ..)) = answer {
            outbox.close(
                crate::router::CloseReason::Io("client left before its WELCOME".into()),
                None,
            );
        }
    }
}

/// Creates the client directory and FIFOs, starts the session and returns
/// what WELCOME needs. Nothing is left behind on failure.
async fn create_client(
    hello: &Hello,
    shared: &Arc<Shared>,
) -> Result<(Arc<Outbox>, String, std::path::PathBuf), ProtocolError> {
    if shared.cancel.is_cancelled() {
        return Err(ProtocolError::new(
            ErrorCode::ShuttingDown,
            "the broker is stopping",
        ));
    }
    let Some(slot) = shared.client_slot() else {
        return Err(too_many(shared.max_clients));
    };
    let pid = match hello.pid.map(PidWatch::open).transpose() {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            return Err(ProtocolError::new(
                ErrorCode::BadPid,
                format!("no process with pid {}", hello.pid.unwrap_or_default()),
            ))
        }
        Err(e) => return Err(resource_error(&e, shared)),
    };
    let id = uuid::Uuid::new_v4().to_string();
    let dir = shared.clients_dir.join(&id);
    let outbox = Arc::new(Outbox::new(shared.config.backlog));
    // Subscribe before the directory exists: whoever sees the directory
    // (the client after WELCOME, or a script watching clients/) can rely on
    // the sub= patterns being in force.
    let key = shared.next_key();
    if !shared
        .router
        .attach(key, outbox.clone(), hello.subs.clone())
        .await
    {
        return Err(ProtocolError::new(
            ErrorCode::ShuttingDown,
            "the broker is stopping",
        ));
    }
    let (send, recv) = match make_client_fifos(&dir, shared) {
        Ok(fifos) => fifos,
        Err(e) => {
            shared.router.detach(key).await;
            return Err(resource_error(&e, shared));
        }
    };
    let watch = match shared.watcher.watch_client(&dir, outbox.clone()) {
        Ok(wd) => Some(wd),
        Err(e) => {
            warn_throttled!(shared.throttle, "inotify", "cannot watch {}: {e}; its deletion will go unnoticed (raise fs.inotify.max_user_watches)", dir.display());
            None
        }
    };
    let label = hello.name.clone().unwrap_or_else(|| id.clone());
    if let Some(m) = &shared.metrics {
        m.client_joined(key, &label, outbox.clone());
    }
    tracing::debug!(client = %label, id = %id, pid = ?hello.pid, "client joined");
    let session = Session {
        key,
        label,
        dir: dir.clone(),
        send,
        recv,
        outbox: outbox.clone(),
        pid,
        watch,
    };
    slot.keep();
    let shared2 = shared.clone();
    shared.tracker.spawn(session.run(shared2));
    Ok((outbox, id, dir))
}

fn make_client_fifos(dir: &Path, shared: &Shared) -> io::Result<(pipe::Receiver, pipe::Sender)> {
    use std::os::unix::fs::DirBuilderExt;
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    if let Err(e) = builder.create(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            return Err(e);
        }
        // Someone removed clients/; put it back.
        builder.recursive(true).create(dir)?;
    }
    let opened = (|| {
        fifo::make(&dir.join("send"), 0o600)?;
        fifo::make(&dir.join("recv"), 0o600)?;
        let send = fifo::open_resilient_rx(&dir.join("send"))?;
        let recv = fifo::open_resilient_tx(&dir.join("recv"))?;
        // The pipe size is chosen, not left to chance (--pipe-size); when the
        // user's pipe budget is spent the kernel gives less: say so.
        let want = shared.config.pipe_size;
        for fd in [send.as_raw_fd(), recv.as_raw_fd()] {
            let got = fifo::set_pipe_size(fd, want)?;
            if got < want {
                warn_throttled!(shared.throttle, "pipe-budget", "new client pipes get {got} bytes, not {want}: this user's pipe buffers passed fs.pipe-user-pages-soft (see docs/performance.md)");
            }
        }
        Ok((send, recv))
    })();
    if opened.is_err() {
        let _ = busdir::remove_client_dir(dir);
    }
    opened
}

fn too_many(max: usize) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::TooManyClients,
        format!("the broker serves at most {max} clients (open-file limit); try again later"),
    )
}

fn resource_error(e: &io::Error, shared: &Shared) -> ProtocolError {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => too_many(shared.max_clients),
        _ => ProtocolError::new(
            ErrorCode::Internal,
            format!("cannot create the client: {e}"),
        ),
    }
}
