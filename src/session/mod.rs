//! One client's whole life: [`create`] makes it, [`Session::run`] serves it,
//! and its teardown undoes exactly what `create` did, in one place.
//!
//! What a client holds, made in this order by `create` and released in the
//! reverse order by the teardown (or by drop, if creation fails halfway):
//!
//! | resource | made by | released by |
//! | --- | --- | --- |
//! | a place under the connection limit | [`Registry::admit`] | dropping the permit the session owns |
//! | a pidfd for `pid=` | [`PidWatch::open`] | drop |
//! | its subscriptions and outbox in the router | `RouterHandle::attach` | `RouterHandle::detach` |
//! | `clients/<uuid>/` with `send` and `recv` | [`ClientFifos::create`] | [`busdir::remove_client_dir`] |
//! | an inotify watch on that directory | [`FsWatcher::watch_client`] | [`FsWatcher::unwatch_client`] |
//! | its entry in the registry (metrics, watcher) | [`Registry::insert`] | [`Registry::remove`] |
//!
//! A session is one task. Inside it, the reader (`send` → parsed batches →
//! router, [`reader`]) and the writer (outbox → `recv`, [`writer`]) run side
//! by side, and the first of these ends it: the writer finishing because the
//! outbox was closed (by `BYE`, an overflow, a deleted directory), the
//! `pid=` process exiting, or the broker stopping. Whatever ends it, the
//! teardown is the same: flush if the reason allows, then undo the table.
//!
//! [`Registry::admit`]: crate::registry::Registry::admit
//! [`Registry::insert`]: crate::registry::Registry::insert
//! [`Registry::remove`]: crate::registry::Registry::remove
//! [`FsWatcher::watch_client`]: crate::watch::FsWatcher::watch_client
//! [`FsWatcher::unwatch_client`]: crate::watch::FsWatcher::unwatch_client

mod reader;
mod writer;

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::unix::pipe;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::acl::Identity;
use crate::context::Context;
use crate::counters::DropReason;
use crate::protocol::{encode, ErrorCode, Hello, ProtocolError};
use crate::router::{AttachError, ClientKey, CloseReason, Outbox};
use crate::watch::PidWatch;
use crate::{busdir, fifo, warn_throttled};

/// What the handshake tells a new client in `WELCOME`.
pub struct Welcome {
    pub id: String,
    pub dir: PathBuf,
    outbox: Arc<Outbox>,
}

impl Welcome {
    /// The client never got its `WELCOME` (it left during the handshake):
    /// end it at once.
    pub fn abandon(&self) {
        self.outbox.close(
            CloseReason::Io("client left before its WELCOME".into()),
            None,
        );
    }
}

/// Creates a client for `hello`, whose reply FIFO `uid` owns (the client's
/// identity for the ACL): everything in the module table, in order, then
/// spawns its session. Nothing is left behind on failure.
///
/// # Errors
/// The [`ProtocolError`] to answer the HELLO with: `too-many-clients`,
/// `bad-pid`, `forbidden`, `too-many-subscriptions`, `shutting-down`, or
/// `internal-error`.
pub async fn create(hello: &Hello, uid: u32, ctx: &Arc<Context>) -> Result<Welcome, ProtocolError> {
    if ctx.cancel.is_cancelled() {
        return Err(shutting_down());
    }
    let Some(permit) = ctx.clients.admit() else {
        return Err(too_many(ctx.clients.max()));
    };
    let pid = match hello.pid.map(PidWatch::open).transpose() {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
            return Err(ProtocolError::new(
                ErrorCode::BadPid,
                format!("no process with pid {}", hello.pid.unwrap_or_default()),
            ))
        }
        Err(e) => return Err(resource_error(&e, ctx)),
    };
    let key = ctx.clients.next_key();
    let id = uuid::Uuid::new_v4().to_string();
    let dir = ctx.clients_dir.join(&id);
    let who = identity(uid, ctx).await;
    let mut backlog = ctx.config.backlog;
    if let Some(cap) = ctx.policy().limits(&who).backlog {
        backlog.bytes = backlog.bytes.min(cap);
    }
    let outbox = Arc::new(Outbox::new(backlog));
    // Subscribe before the directory exists: whoever sees the directory
    // (the client after WELCOME, or a script watching clients/) can rely on
    // the sub= patterns being in force.
    match ctx
        .router
        .attach(key, outbox.clone(), who, hello.subs.clone())
        .await
    {
        Ok(()) => {}
        Err(AttachError::Refused(e)) => return Err(e),
        Err(AttachError::Stopped) => return Err(shutting_down()),
    }
    let fifos = match ClientFifos::create(&dir, ctx) {
        Ok(f) => f,
        Err(e) => {
            ctx.router.detach(key).await;
            return Err(resource_error(&e, ctx));
        }
    };
    let watch = match ctx.watcher.watch_client(&dir) {
        Ok(wd) => Some(wd),
        Err(e) => {
            warn_throttled!(ctx.throttle, "inotify", "cannot watch {}: {e}; its deletion will go unnoticed (raise fs.inotify.max_user_watches)", dir.display());
            None
        }
    };
    let label = hello.name.clone().unwrap_or_else(|| id.clone());
    ctx.clients
        .insert(key, label.clone(), dir.clone(), outbox.clone(), watch);
    tracing::debug!(client = %label, id = %id, pid = ?hello.pid, "client joined");
    let session = Session {
        key,
        label,
        dir: dir.clone(),
        send: fifos.send,
        recv: fifos.recv,
        outbox: outbox.clone(),
        pid,
        _permit: permit,
    };
    ctx.tracker.spawn(session.run(ctx.clone()));
    Ok(Welcome { id, dir, outbox })
}

/// A client's directory and its two FIFOs, opened `O_RDWR` by the broker.
struct ClientFifos {
    send: pipe::Receiver,
    recv: pipe::Sender,
}

impl ClientFifos {
    /// Makes `dir` (0700) with `send` and `recv` (0600) and opens both, at
    /// the configured pipe size. Removes what it made if any step fails.
    fn create(dir: &Path, ctx: &Context) -> io::Result<ClientFifos> {
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
        let opened = Self::make_and_open(dir, ctx);
        if opened.is_err() {
            let _ = busdir::remove_client_dir(dir);
        }
        opened
    }

    fn make_and_open(dir: &Path, ctx: &Context) -> io::Result<ClientFifos> {
        fifo::make(&dir.join("send"), 0o600)?;
        fifo::make(&dir.join("recv"), 0o600)?;
        let send = fifo::open_resilient_rx(&dir.join("send"))?;
        let recv = fifo::open_resilient_tx(&dir.join("recv"))?;
        // The pipe size is chosen, not left to chance (--pipe-size); when the
        // user's pipe budget is spent the kernel gives less: say so.
        let want = ctx.config.pipe_size;
        for fd in [send.as_raw_fd(), recv.as_raw_fd()] {
            let got = fifo::set_pipe_size(fd, want)?;
            if got < want {
                warn_throttled!(ctx.throttle, "pipe-budget", "new client pipes get {got} bytes, not {want}: this user's pipe buffers passed fs.pipe-user-pages-soft (see docs/performance.md)");
            }
        }
        Ok(ClientFifos { send, recv })
    }
}

/// Who `uid` is for the ACL. Its groups are read (NSS, possibly slow) only
/// when an ACL is configured, off the async threads.
async fn identity(uid: u32, ctx: &Context) -> Identity {
    if ctx.config.acl.is_none() {
        return Identity::new(uid, Vec::new());
    }
    tokio::task::spawn_blocking(move || Identity::of_uid(uid))
        .await
        .unwrap_or_else(|_| Identity::new(uid, Vec::new()))
}

fn shutting_down() -> ProtocolError {
    ProtocolError::new(ErrorCode::ShuttingDown, "the broker is stopping")
}

fn too_many(max: usize) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::TooManyClients,
        format!("the broker serves at most {max} clients (open-file limit); try again later"),
    )
}

fn resource_error(e: &io::Error, ctx: &Context) -> ProtocolError {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => too_many(ctx.clients.max()),
        _ => ProtocolError::new(
            ErrorCode::Internal,
            format!("cannot create the client: {e}"),
        ),
    }
}

/// A live client, owned by its session task.
pub struct Session {
    key: ClientKey,
    /// The client's `name=`, else its uuid: what logs call it.
    label: String,
    dir: PathBuf,
    send: pipe::Receiver,
    recv: pipe::Sender,
    outbox: Arc<Outbox>,
    pid: Option<PidWatch>,
    /// The client's place under the connection limit, given back on drop.
    _permit: OwnedSemaphorePermit,
}

impl Session {
    /// Runs the client until it ends, then tears it down.
    pub async fn run(self, ctx: Arc<Context>) {
        let (reason, deadline) = self.serve(&ctx).await;
        self.teardown(&ctx, reason, deadline).await;
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
    async fn serve(&self, ctx: &Arc<Context>) -> (CloseReason, Instant) {
        let grace = ctx.config.flush_grace;
        let writer = writer::write_lines(&self.recv, &self.outbox, ctx.counters.local_latency());
        tokio::pin!(writer);
        let stop = CancellationToken::new();
        let reader = reader::read_commands(self, ctx, &stop);
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
            () = ctx.cancel.cancelled() => CloseReason::Shutdown,
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

    /// Undoes [`create`], in reverse order.
    async fn teardown(self, ctx: &Context, reason: CloseReason, deadline: Instant) {
        if reason.flushes() {
            // Closing our end of `recv` destroys whatever the client has not
            // read yet, the final BYE included: let it read, until the
            // deadline or until its process is gone (then nobody will).
            tokio::select! {
                () = writer::wait_until_read(&self.recv, deadline) => {}
                () = self.pid_exited() => {}
            }
        }
        if let Some(wd) = ctx.clients.remove(self.key) {
            ctx.watcher.unwatch_client(wd);
        }
        // Remove the directory before closing the FIFOs: a client that sees
        // EOF on recv can rely on its directory being gone.
        if let Err(e) = busdir::remove_client_dir(&self.dir) {
            tracing::warn!(client = %self.label, "cannot remove {}: {e}", self.dir.display());
        }
        ctx.router.detach(self.key).await;
        let lost = self.outbox.undelivered();
        ctx.counters.dropped(DropReason::ClientGone, lost as u64);
        log_end(&self.label, &reason);
        // Dropping self closes the FIFOs and the pidfd and frees the place.
    }
}

fn log_end(label: &str, reason: &CloseReason) {
    match reason {
        CloseReason::Bye | CloseReason::PidExited | CloseReason::Shutdown => {
            tracing::debug!(client = %label, reason = reason.as_str(), "client left")
        }
        CloseReason::Removed => {
            tracing::info!(client = %label, "client directory or FIFO was deleted; client ended")
        }
        CloseReason::SlowConsumer => tracing::warn!(
            client = %label,
            "client's backlog overflowed (--overflow disconnect); client ended"
        ),
        CloseReason::Io(e) => {
            tracing::warn!(client = %label, "client ended by an I/O error: {e}")
        }
    }
}
