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
//! | `clients/<uuid>/` with `send` and `recv`, relative to `clients/`'s descriptor | `ClientFifos::create` | [`busdir::remove_client_dir`] |
//! | an inotify watch on that directory | [`FsWatcher::watch_client`] | [`FsWatcher::unwatch_client`] |
//! | its entry in the registry (metrics, watcher) | [`Registry::insert`] | [`Registry::remove`] |
//! | its file in `<bus>/state/` (`crate::state`) | `StateStore::register` | `StateStore::forget` |
//!
//! A session is one task. Inside it, the reader (`send` → parsed batches →
//! router, `reader.rs`) and the writer (outbox → `recv`, `writer.rs`) run side
//! by side, and the first of these ends it: the writer finishing because the
//! outbox was closed (by `BYE`, an overflow, a deleted directory, a full
//! table needing its place), the `pid=` process exiting, a client without
//! `pid=` staying idle for `--orphan-timeout` (`orphan.rs`), or the broker
//! stopping. Whatever ends it, the
//! teardown is the same: flush if the reason allows, then undo the table.
//!
//! [`Registry::admit`]: crate::registry::Registry::admit
//! [`Registry::insert`]: crate::registry::Registry::insert
//! [`Registry::remove`]: crate::registry::Registry::remove
//! [`FsWatcher::watch_client`]: crate::watch::FsWatcher::watch_client
//! [`FsWatcher::unwatch_client`]: crate::watch::FsWatcher::unwatch_client

mod orphan;
mod pipe_size;
mod reader;
mod writer;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::unix::pipe;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::acl::Identity;
use crate::context::Context;
use crate::counters::DropReason;
use crate::fifo::FileId;
use crate::protocol::{encode, ErrorCode, Hello, ProtocolError};
use crate::registry::Activity;
use crate::router::{AttachError, ClientInfo, ClientKey, CloseReason, Outbox};
use crate::state::ClientRecord;
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
/// `uid` is the client's identity: the owner of its reply FIFO, which only
/// that user (or root) can have made. `pid=` must name a process of that
/// user (root's clients may name any), and on a `--shared` bus the client's
/// directory and FIFOs are given to that user.
///
/// # Errors
/// The [`ProtocolError`] to answer the HELLO with: `too-many-clients`,
/// `bad-pid`, `forbidden`, `too-many-subscriptions`, `shutting-down`, or
/// `internal-error`.
pub async fn create(hello: &Hello, uid: u32, ctx: &Arc<Context>) -> Result<Welcome, ProtocolError> {
    if ctx.cancel.is_cancelled() {
        return Err(shutting_down());
    }
    // When full, a place is made below, once the ACL has let this client in;
    // if every client has pid=, none can be: refuse before it costs more.
    let permit = ctx.clients.admit();
    if permit.is_none() && !ctx.clients.may_make_room() {
        return Err(too_many(ctx.clients.max()));
    }
    let pid = match hello.pid {
        Some(p) => Some(watch_pid(p, uid, ctx)?),
        None => None,
    };
    let key = ctx.clients.next_key();
    let id = uuid::Uuid::new_v4().to_string();
    let dir = ctx.fs.clients_path().join(&id);
    let who = identity(uid, ctx).await;
    let mut backlog = ctx.config.backlog;
    if let Some(cap) = ctx.policy().limits(&who).backlog {
        backlog.bytes = backlog.bytes.min(cap);
    }
    let outbox = Arc::new(Outbox::with_budget(backlog, ctx.counters.memory.clone()));
    let info = ClientInfo {
        uuid: id.clone(),
        name: hello.name.clone(),
        pid: hello.pid,
        uid,
        since: std::time::Instant::now(),
    };
    // Subscribe before the directory exists: whoever sees the directory
    // (the client after WELCOME, or a script watching clients/) can rely on
    // the sub= patterns being in force.
    match ctx
        .router
        .attach_joined(key, outbox.clone(), who, hello.subs.clone(), info)
        .await
    {
        Ok(()) => {}
        Err(AttachError::Refused(e)) => return Err(e),
        Err(AttachError::Stopped) => return Err(shutting_down()),
    }
    if hello.no_echo {
        ctx.router.no_echo(key).await;
    }
    // Full: a client without pid= may have vanished unseen; the one idle
    // longest makes room (docs/protocol.md, "Lifecycle"). Only now, so that
    // a newcomer the ACL refuses (its user's client limit) ends nobody.
    let permit = match permit {
        Some(p) => p,
        None => match orphan::make_room(ctx).await {
            Some(p) => p,
            None => {
                ctx.router.leave(key, "refused").await;
                return Err(too_many(ctx.clients.max()));
            }
        },
    };
    let owner = ctx.fs.shared().then_some(uid);
    let mut clients = ctx.fs.clients();
    let made = match ClientFifos::create(&clients, &id, owner) {
        // Someone removed clients/; put it back.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            ctx.fs.recreate_clients(&clients).and_then(|c| {
                clients = c;
                ClientFifos::create(&clients, &id, owner)
            })
        }
        r => r,
    };
    let fifos = match made {
        Ok(f) => f,
        Err(e) => {
            ctx.router.leave(key, "refused").await;
            return Err(resource_error(&e, ctx));
        }
    };
    // The watch is added through the descriptor, so it is on the directory
    // just made, whatever its name leads to by now.
    let via = PathBuf::from(format!("/proc/self/fd/{}", fifos.dir.as_raw_fd()));
    let watch = match ctx.watcher.watch_client(&via) {
        Ok(wd) => Some(wd),
        Err(e) => {
            warn_throttled!(ctx.throttle, "inotify", "cannot watch {}: {e}; its deletion will go unnoticed (raise fs.inotify.max_user_watches)", dir.display());
            None
        }
    };
    let label = hello.name.clone().unwrap_or_else(|| id.clone());
    ctx.clients.insert(
        key,
        label.clone(),
        dir.clone(),
        outbox.clone(),
        watch,
        fifos.ids,
    );
    // Before WELCOME: a client told it is welcome survives a crash from now on.
    ctx.state.register(
        key,
        ClientRecord {
            uuid: id.clone(),
            name: hello.name.clone(),
            pid: hello.pid,
            uid,
            send: fifos.ids[0],
            recv: fifos.ids[1],
            subs: hello.subs.iter().map(crate::state::sub_text).collect(),
            no_echo: hello.no_echo,
        },
    );
    // Without pid=, idleness is what ends it.
    let activity = pid
        .is_none()
        .then(|| ctx.clients.track_activity(key, fifos.recv.as_raw_fd()));
    tracing::debug!(client = %label, id = %id, uid, pid = ?hello.pid, "client joined");
    let session = Session {
        key,
        label,
        dir: dir.clone(),
        clients,
        name: id.clone(),
        send: fifos.send,
        recv: fifos.recv,
        send_size: fifos.sizes[0],
        recv_size: fifos.sizes[1],
        outbox: outbox.clone(),
        pid,
        activity,
        permit: Some(permit),
        seed: Vec::new(),
    };
    ctx.tracker.spawn(session.run(ctx.clone()));
    Ok(Welcome { id, dir, outbox })
}

/// Serves again a client that a crashed broker left (`busdir::Adoptable`):
/// same uuid, directory, FIFOs (already open) and subscriptions. Its first
/// line is `DROPPED ? restart` (see docs/protocol.md). Its `pid=` process
/// must be alive and still be the client's user's (as at the handshake); a
/// client without `pid=` is adopted and then ends by the orphan rules.
///
/// The caller starts the returned session ([`Session::run`]) once every
/// client is adopted: a client's reader must not route what it reads (what
/// it wrote while no broker ran, or what the previous broker had read)
/// before the other clients' subscriptions are back in force.
///
/// # Errors
/// Why it could not be adopted, for the log; nothing is left registered,
/// and the caller removes its directory and state file.
pub async fn adopt(found: busdir::Adoptable, ctx: &Arc<Context>) -> Result<Session, String> {
    let busdir::Adoptable {
        record: rec,
        fifos,
        handover,
    } = found;
    let permit = ctx.clients.admit().ok_or_else(|| {
        "the client table is full (--max-clients or the open-file limit)".to_owned()
    })?;
    let pid = match rec.pid {
        Some(p) => Some(watch_pid(p, rec.uid, ctx).map_err(|e| e.text)?),
        None => None,
    };
    let mut rec = rec;
    let subs = rec
        .subs
        .iter()
        .map(|t| crate::state::parse_sub(t))
        .collect::<Result<Vec<_>, _>>()?;
    let key = ctx.clients.next_key();
    let who = identity(rec.uid, ctx).await;
    let mut backlog = ctx.config.backlog;
    if let Some(cap) = ctx.policy().limits(&who).backlog {
        backlog.bytes = backlog.bytes.min(cap);
    }
    let outbox = Arc::new(Outbox::with_budget(backlog, ctx.counters.memory.clone()));
    if !handover {
        // First, before anything routed to it: lines may have been lost.
        outbox.push(encode::restarted());
    }
    let seed = ctx.state.dir().take_unparsed(&rec.uuid);
    match ctx.router.adopt(key, outbox.clone(), who, subs).await {
        Ok(refused) if refused.is_empty() => {}
        Ok(refused) => {
            // The rest is served; the client is told, as a `SUB` would be.
            for (i, e) in refused.iter().rev() {
                tracing::warn!(
                    "adopted client {} loses its subscription 'SUB {}': {}",
                    rec.uuid,
                    rec.subs[*i],
                    e.text
                );
                outbox.push(encode::err(e));
                rec.subs.remove(*i);
            }
        }
        Err(AttachError::Refused(e)) => {
            return Err(format!("the policy refuses it now: {}", e.text))
        }
        Err(AttachError::Stopped) => return Err("the broker is stopping".into()),
    }
    if rec.no_echo {
        ctx.router.no_echo(key).await;
    }
    let ids = [
        FileId::of_fd(fifos.send.as_raw_fd()).map_err(|e| e.to_string())?,
        FileId::of_fd(fifos.recv.as_raw_fd()).map_err(|e| e.to_string())?,
    ];
    let opened = (|| -> io::Result<_> {
        let send = pipe::Receiver::from_owned_fd_unchecked(fifos.send)?;
        let recv = pipe::Sender::from_owned_fd_unchecked(fifos.recv)?;
        // Shrinks only what holds nothing unread (EBUSY keeps the size).
        let min = fifo::min_pipe_size();
        let sizes = [
            fifo::set_pipe_size(send.as_raw_fd(), min)?,
            fifo::set_pipe_size(recv.as_raw_fd(), min)?,
        ];
        Ok((send, recv, sizes))
    })();
    let (send, recv, sizes) = match opened {
        Ok(o) => o,
        Err(e) => {
            ctx.router.detach(key).await;
            return Err(format!("cannot use its FIFOs: {e}"));
        }
    };
    let dir = ctx.fs.clients_path().join(&rec.uuid);
    let via = PathBuf::from(format!("/proc/self/fd/{}", fifos.dir.as_raw_fd()));
    let watch = match ctx.watcher.watch_client(&via) {
        Ok(wd) => Some(wd),
        Err(e) => {
            warn_throttled!(ctx.throttle, "inotify", "cannot watch {}: {e}; its deletion will go unnoticed (raise fs.inotify.max_user_watches)", dir.display());
            None
        }
    };
    let label = rec.name.clone().unwrap_or_else(|| rec.uuid.clone());
    ctx.clients
        .insert(key, label.clone(), dir.clone(), outbox.clone(), watch, ids);
    let activity = pid
        .is_none()
        .then(|| ctx.clients.track_activity(key, recv.as_raw_fd()));
    tracing::debug!(client = %label, id = %rec.uuid, uid = rec.uid, pid = ?rec.pid, "client adopted");
    let name = rec.uuid.clone();
    ctx.state.register(key, rec);
    let session = Session {
        key,
        label,
        dir,
        clients: ctx.fs.clients(),
        name,
        send,
        recv,
        send_size: sizes[0],
        recv_size: sizes[1],
        outbox,
        pid,
        activity,
        permit: Some(permit),
        seed,
    };
    Ok(session)
}

/// Opens a pidfd for `pid=` and checks that the process belongs to `uid`
/// (see [`PidWatch::owner`] for why this order is race-free).
fn watch_pid(pid: i32, uid: u32, ctx: &Context) -> Result<PidWatch, ProtocolError> {
    let gone = || ProtocolError::new(ErrorCode::BadPid, format!("no process with pid {pid}"));
    let watch = match PidWatch::open(pid) {
        Ok(w) => w,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(gone()),
        Err(e) => return Err(resource_error(&e, ctx)),
    };
    if uid == 0 {
        return Ok(watch);
    }
    match watch.owner(pid) {
        Ok(owner) if owner == uid => Ok(watch),
        Ok(owner) => Err(ProtocolError::new(
            ErrorCode::BadPid,
            format!("process {pid} belongs to uid {owner}, not to uid {uid} (the owner of reply=); give the pid of a process of your own"),
        )),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(gone()),
        Err(e) => Err(ProtocolError::new(
            ErrorCode::BadPid,
            format!("cannot tell who owns process {pid}: {e}"),
        )),
    }
}

/// A client's directory and its two FIFOs, opened `O_RDWR` by the broker.
struct ClientFifos {
    send: pipe::Receiver,
    recv: pipe::Sender,
    /// Identities of `send` and `recv`, for the registry.
    ids: [FileId; 2],
    /// Pipe buffers of `send` and `recv` as made: one page.
    sizes: [usize; 2],
    /// The client directory, held while the session is set up.
    dir: OwnedFd,
}

impl ClientFifos {
    /// Makes `clients/<name>/` (0700) with `send` and `recv` (0600), all
    /// relative to descriptors, and opens both with a one-page buffer (they
    /// grow with their traffic, see `pipe_size.rs`); then gives them to
    /// `owner` if set (a shared bus). Removes what it made if any step
    /// fails.
    fn create(clients: &OwnedFd, name: &str, owner: Option<u32>) -> io::Result<ClientFifos> {
        let dir = busdir::make_client_dir(clients.as_raw_fd(), name)?;
        let opened = Self::make_and_open(dir, owner);
        if opened.is_err() {
            let _ = busdir::remove_client_dir(clients.as_raw_fd(), name);
        }
        opened
    }

    fn make_and_open(dir: OwnedFd, owner: Option<u32>) -> io::Result<ClientFifos> {
        let send = fifo::make_at(dir.as_raw_fd(), "send", 0o600, owner)?;
        let recv = fifo::make_at(dir.as_raw_fd(), "recv", 0o600, owner)?;
        let ids = [
            FileId::of_fd(send.as_raw_fd())?,
            FileId::of_fd(recv.as_raw_fd())?,
        ];
        let send = pipe::Receiver::from_owned_fd_unchecked(send)?;
        let recv = pipe::Sender::from_owned_fd_unchecked(recv)?;
        // A new pipe has 16 pages (64 KiB), charged to the broker's user:
        // an idle client should cost that budget the least it can, one page
        // per FIFO. Traffic grows them (up to --pipe-size) when it needs to.
        let min = fifo::min_pipe_size();
        let sizes = [
            fifo::set_pipe_size(send.as_raw_fd(), min)?,
            fifo::set_pipe_size(recv.as_raw_fd(), min)?,
        ];
        // Last, once it holds what it should: from now on the user may
        // open its directory.
        if let Some(uid) = owner.filter(|&u| u != nix::unistd::geteuid().as_raw()) {
            nix::unistd::fchown(dir.as_raw_fd(), Some(nix::unistd::Uid::from_raw(uid)), None)?;
        }
        Ok(ClientFifos {
            send,
            recv,
            ids,
            sizes,
            dir,
        })
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
        format!("the broker serves at most {max} clients (--max-clients, or the open-file limit) and none of them can be ended for idleness (those with pid= never are); try again later"),
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
    /// The `clients/` its directory was made in, and the directory's name
    /// there: teardown removes it relative to that descriptor.
    clients: Arc<OwnedFd>,
    name: String,
    send: pipe::Receiver,
    recv: pipe::Sender,
    /// Pipe buffers of `send` and `recv` when the session started.
    send_size: usize,
    recv_size: usize,
    outbox: Arc<Outbox>,
    pid: Option<PidWatch>,
    /// Signs of life of a client without `pid=` (see `orphan.rs`).
    activity: Option<Arc<Activity>>,
    /// The client's place under the connection limit, given back on drop
    /// (to the newcomer it was ended for, if it was).
    permit: Option<OwnedSemaphorePermit>,
    /// Bytes the previous broker read from `send` but did not parse (a
    /// handover): parsed first.
    seed: Vec<u8>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // `recv` is closed right after this: nobody may look at it any more.
        if let Some(a) = &self.activity {
            a.release(self.permit.take());
        }
    }
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
        let mut recv_size = pipe_size::PipeSize::new(
            self.recv.as_raw_fd(),
            self.recv_size,
            ctx.config.pipe_size,
            ctx.config.pipe_idle,
        );
        let writer = writer::write_lines(
            &self.recv,
            &self.outbox,
            ctx.counters.local_latency(),
            &mut recv_size,
            &ctx.throttle,
            self.activity.as_deref(),
        );
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
            () = orphan::idle_too_long(self.activity.as_deref(), ctx) => CloseReason::IdleTimeout,
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
        if matches!(reason, CloseReason::Evicted | CloseReason::IdleTimeout) {
            // Ended for idleness: its queue is discarded (it was not reading),
            // but a client still there learns why it sees EOF, if its pipe
            // has room. Under PIPE_BUF: written whole or not at all.
            let _ = self.recv.try_write(&encode::bye());
        }
        if let Some(wd) = ctx.clients.remove(self.key) {
            ctx.watcher.unwatch_client(wd);
        }
        // Its state first: a crash from here on leaves a directory without
        // state, which the next broker removes.
        ctx.state.forget(self.key);
        // Remove the directory before closing the FIFOs: a client that sees
        // EOF on recv can rely on its directory being gone.
        if let Err(e) = busdir::remove_client_dir(self.clients.as_raw_fd(), &self.name) {
            tracing::warn!(client = %self.label, "cannot remove {}: {e}", self.dir.display());
        }
        ctx.router.leave(self.key, reason.as_str()).await;
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
        CloseReason::Evicted => tracing::info!(
            client = %label,
            "client without pid= ended: the table was full and it was idle longest"
        ),
        CloseReason::IdleTimeout => tracing::info!(
            client = %label,
            "client without pid= ended: idle for --orphan-timeout"
        ),
    }
}
