//! Live replacement: `fifobus serve --replace` takes over a running broker
//! with nothing lost and nothing reordered (issue 10, item 3).
//!
//! The channel is a unix socket, `<bus>/state/control.sock`: `state/` is
//! 0700 and the broker's, and the broker also checks the peer's uid
//! (`SO_PEERCRED`), so only the broker's user (or root) can ask. The
//! exchange, one line each way:
//!
//! 1. new → old `HANDOVER`. The old broker pauses ([`Phase::Paused`]):
//!    it stops reading `hello` and every `send` at a line boundary (what it
//!    read but did not parse stays in each reader), waits for the
//!    handshakes in progress, lets the router apply what was read, writes
//!    every client's state, and lets its writers flush every outbox into
//!    the `recv` FIFOs, each bounded by [`DRAIN`].
//! 2. old → new `READY` (or `BUSY <why>`: it resumes serving, the new one
//!    exits with that error and nothing changed).
//! 3. The new broker opens `hello` and every client's FIFOs (checked as
//!    after a crash), so that no pipe loses its last open end, then
//!    new → old `GO`.
//! 4. The old broker saves what each reader read but did not parse
//!    (`state/<uuid>.unparsed`) and exits: no `BYE`, nothing removed, no
//!    FIFO closed before the new one held it. The kernel drops its lock.
//! 5. The new broker takes the lock, adopts every client (no `DROPPED ?
//!    restart`: nothing was lost), parses the saved bytes first, and serves.
//!
//! Reopening by path (checked) rather than passing descriptors over
//! `SCM_RIGHTS`: the new broker needs the same checks and the same state
//! files after a crash anyway, so the handover is that path plus a
//! guarantee that nothing was lost, and there is one way to adopt a client.
//! If the new broker goes away between `READY` and `GO`, the old one
//! resumes. `SIGTERM` keeps meaning "stop and say `BYE`".

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

use crate::context::{Context, Phase};
use crate::state::{CONTROL, STATE_DIR};

/// How long the old broker may take to pause, apply and flush before it
/// gives up the handover and resumes.
pub const DRAIN: Duration = Duration::from_secs(5);
/// How long each side waits for the other's next line.
pub const ANSWER: Duration = Duration::from_secs(10);

/// Why `serve --replace` could not take over.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error("--replace: no broker to replace at {path} ({source}); start without --replace")]
    NoBroker { path: PathBuf, source: io::Error },
    #[error("--replace: {path} is not the broker's control socket ({what}); check it")]
    Untrusted { path: PathBuf, what: String },
    #[error(
        "--replace: the running broker refused the handover: {0}; it keeps serving, try again"
    )]
    Busy(String),
    #[error("--replace: the running broker did not {0} within {ANSWER:?}; it keeps serving (or, if it went away, start without --replace)")]
    Timeout(&'static str),
    #[error("--replace: talking to the running broker failed: {0}; it keeps serving")]
    Io(#[from] io::Error),
}

/// Creates the control socket, before the broker says it serves (so a
/// `--replace` that saw it serving can connect). `None` (logged) when it
/// cannot: the broker serves, but cannot be replaced live.
pub fn bind(ctx: &Context) -> Option<UnixListener> {
    let path = ctx.state.dir().path().join(CONTROL);
    // Bound through the held descriptor of state/, not the path.
    let via = PathBuf::from(format!(
        "/proc/self/fd/{}/{CONTROL}",
        ctx.state.dir().raw().as_raw_fd()
    ));
    ctx.state.dir().remove(CONTROL);
    match UnixListener::bind(&via) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(
                "cannot listen on {}: {e}; serve --replace cannot take over this broker",
                path.display()
            );
            None
        }
    }
}

/// The old broker's side: answers on the control socket until shutdown; on
/// a completed handover the process exits (status 0) from here.
pub async fn listen(listener: UnixListener, ctx: Arc<Context>) {
    let path = ctx.state.dir().path().join(CONTROL);
    loop {
        let stream = tokio::select! {
            () = ctx.cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("{}: accept failed: {e}", path.display());
                    continue;
                }
            },
        };
        let me = nix::unistd::geteuid().as_raw();
        match stream.peer_cred() {
            Ok(c) if c.uid() == me || c.uid() == 0 => {}
            Ok(c) => {
                tracing::warn!(
                    "{}: uid {} may not ask for a handover",
                    path.display(),
                    c.uid()
                );
                continue;
            }
            Err(_) => continue,
        }
        if let Err(e) = hand_over(stream, &ctx).await {
            tracing::warn!("handover to serve --replace abandoned: {e}; serving on");
        }
        ctx.phase.send_replace(Phase::Serving);
    }
    ctx.state.dir().remove(CONTROL);
}

/// One handover, old side. Returns (having resumed nothing: the caller
/// does) when it is abandoned; exits the process when it is done.
async fn hand_over(stream: UnixStream, ctx: &Arc<Context>) -> io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    match tokio::time::timeout(ANSWER, rd.read_line(&mut line)).await {
        Ok(Ok(_)) if line.trim() == "HANDOVER" => {}
        _ => {
            return Err(io::Error::other(format!(
                "expected HANDOVER, got {:?}",
                line.trim()
            )))
        }
    }
    tracing::info!(
        clients = ctx.clients.len(),
        "serve --replace asks to take over: pausing"
    );
    ctx.phase.send_replace(Phase::Paused);
    if let Err(why) = drain(ctx).await {
        let _ = wr.write_all(format!("BUSY {why}\n").as_bytes()).await;
        return Err(io::Error::other(why));
    }
    wr.write_all(b"READY\n").await?;
    line.clear();
    match tokio::time::timeout(ANSWER, rd.read_line(&mut line)).await {
        Ok(Ok(_)) if line.trim() == "GO" => {}
        _ => return Err(io::Error::other("the new broker went away before GO")),
    }
    ctx.phase.send_replace(Phase::Released);
    // Each paused reader saves what it read but did not parse, then stops.
    let deadline = Instant::now() + DRAIN;
    while ctx.paused_readers.load(SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tracing::info!(
        "handed over to the new broker; exiting without BYE, leaving every client to it"
    );
    std::process::exit(0);
}

/// Pauses and flushes; `Err` says why it could not within [`DRAIN`].
async fn drain(ctx: &Arc<Context>) -> Result<(), String> {
    let deadline = Instant::now() + DRAIN;
    let tick = || tokio::time::sleep(Duration::from_millis(2));
    // Every reader at a line boundary, no handshake half done.
    loop {
        let (n, paused, hs) = (
            ctx.clients.len(),
            ctx.paused_readers.load(SeqCst),
            ctx.handshakes.load(SeqCst),
        );
        if hs == 0 && paused >= n {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} of {n} clients' readers paused, {hs} handshakes in progress after {DRAIN:?}",
                paused
            ));
        }
        tick().await;
    }
    // The router has applied every batch sent before this answer, and
    // the state on disk is complete.
    let Some(dirty) = ctx.router.take_dirty().await else {
        return Err("the router has stopped".into());
    };
    let store = ctx.state.clone();
    let _ = tokio::task::spawn_blocking(move || store.update(dirty)).await;
    // Every outbox written into its recv FIFO.
    loop {
        let mut waiting = None;
        ctx.clients.for_each(|c| {
            if waiting.is_none() && c.outbox.backlog() != (0, 0) {
                waiting = Some(c.label.clone());
            }
        });
        let Some(who) = waiting else { break };
        if Instant::now() >= deadline {
            return Err(format!(
                "client {who} did not read what was queued for it within {DRAIN:?}"
            ));
        }
        tick().await;
    }
    Ok(())
}

/// The new broker's side, first half: asks the broker on `bus` to hand
/// over and waits until it is `READY`. The returned connection says `GO`
/// ([`go`]) once the new broker holds every FIFO.
///
/// # Errors
/// [`ReplaceError`], saying whether the old broker keeps serving.
pub async fn request(bus: &Path) -> Result<UnixStream, ReplaceError> {
    let path = bus.join(STATE_DIR).join(CONTROL);
    {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::symlink_metadata(&path).map_err(|source| ReplaceError::NoBroker {
            path: path.clone(),
            source,
        })?;
        let me = nix::unistd::geteuid().as_raw();
        if !meta.file_type().is_socket() || meta.uid() != me {
            return Err(ReplaceError::Untrusted {
                path,
                what: format!("type {:?}, owner uid {}", meta.file_type(), meta.uid()),
            });
        }
    }
    let mut stream = UnixStream::connect(&path)
        .await
        .map_err(|source| ReplaceError::NoBroker {
            path: path.clone(),
            source,
        })?;
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(c) if c.uid() == me => {}
        Ok(c) => {
            return Err(ReplaceError::Untrusted {
                path,
                what: format!("served by uid {}", c.uid()),
            })
        }
        Err(e) => return Err(e.into()),
    }
    stream.write_all(b"HANDOVER\n").await?;
    let mut line = String::new();
    let mut rd = BufReader::new(&mut stream);
    match tokio::time::timeout(ANSWER + DRAIN, rd.read_line(&mut line)).await {
        Err(_) => return Err(ReplaceError::Timeout("get ready")),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) => {}
    }
    match line.trim_end().split_once(' ') {
        _ if line.trim_end() == "READY" => Ok(stream),
        Some(("BUSY", why)) => Err(ReplaceError::Busy(why.to_owned())),
        _ => Err(ReplaceError::Busy(format!(
            "unexpected answer {:?}",
            line.trim_end()
        ))),
    }
}

/// The new broker's side, second half: `GO`, then waits until the old
/// broker has exited (its end of the socket closes).
///
/// # Errors
/// When the old broker does not exit within [`ANSWER`].
pub async fn go(mut stream: UnixStream) -> Result<(), ReplaceError> {
    use tokio::io::AsyncReadExt;
    stream.write_all(b"GO\n").await?;
    let mut sink = [0u8; 64];
    let gone = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(ANSWER, gone)
        .await
        .map_err(|_| ReplaceError::Timeout("exit after GO"))
}

/// `serve --replace --detach`, the background broker's end of the pipe the
/// foreground command waits on: `READY` once it serves; its end closing
/// without that (the broker failed and exited) is the failure.
///
/// Shared and taken once, because the configuration is cloned.
#[derive(Debug, Clone)]
pub struct ReadyPipe(Arc<std::sync::Mutex<Option<std::fs::File>>>);

impl ReadyPipe {
    /// Adopts the inherited descriptor `fd` (`--ready-fd`), which must be
    /// a pipe: anything else is refused rather than written to. It is made
    /// close-on-exec so that it is not passed on.
    ///
    /// # Errors
    /// When `fd` is not an open pipe.
    pub fn adopt(fd: i32) -> io::Result<ReadyPipe> {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        use nix::sys::stat::{fstat, SFlag};
        use std::os::fd::{FromRawFd, OwnedFd};
        let st = fstat(fd).map_err(|e| {
            io::Error::other(format!(
                "--ready-fd {fd}: {e}; it is set by --detach, do not pass it yourself"
            ))
        })?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFIFO {
            return Err(io::Error::other(format!(
                "--ready-fd {fd} is not a pipe; it is set by --detach, do not pass it yourself"
            )));
        }
        // SAFETY: an open descriptor (fstat succeeded) that nothing else in
        // this process owns: it was inherited for this purpose.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        fcntl(owned.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        Ok(ReadyPipe(Arc::new(std::sync::Mutex::new(Some(
            std::fs::File::from(owned),
        )))))
    }

    /// Tells the waiting command that this broker serves, and closes the
    /// pipe. A reader already gone (killed) costs nothing.
    pub fn signal(&self) {
        use std::io::Write;
        let taken = self.0.lock().map(|mut g| g.take()).unwrap_or(None);
        if let Some(mut f) = taken {
            let _ = f.write_all(b"READY\n");
        }
    }
}
