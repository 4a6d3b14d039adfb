//! Noticing, without polling, that a client is gone.
//!
//! The broker holds both ends of every client FIFO, so it never sees EOF or
//! `EPIPE` when a client dies; those are the price of the resilient opens in
//! [`crate::fifo`]. Instead:
//! - [`PidWatch`]: a pidfd for the `pid=` a client gave; it becomes readable
//!   when that process exits (even before it is reaped).
//! - [`FsWatcher`]: one inotify instance for the whole broker, watching the
//!   bus directory (a deleted or replaced `hello` is put back), its parent
//!   (the bus directory itself removed or renamed ends the broker, see
//!   [`FsWatcher::bus_dir_gone`]) and each client directory
//!   (a deleted or renamed directory, `send` or `recv` ends that client).
//!
//! Both are file descriptors in tokio's reactor: an idle broker sleeps in
//! `epoll_wait` with no timers.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::router::CloseReason;

/// Resolves when a given process exits.
pub struct PidWatch {
    fd: AsyncFd<OwnedFd>,
}

impl PidWatch {
    /// # Errors
    /// `NotFound` when no such process exists; `EMFILE` when out of descriptors.
    pub fn open(pid: i32) -> io::Result<PidWatch> {
        // pidfd_open(2) refuses pid <= 0 with EINVAL; rustix's Pid cannot hold it.
        let pid = (pid > 0)
            .then(|| rustix::process::Pid::from_raw(pid))
            .flatten()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK)?;
        Ok(PidWatch { fd: register(fd)? })
    }

    /// The real uid of process `pid`, the one this pidfd was opened for.
    /// Race-free: the pidfd was opened first, and it is checked after
    /// reading `/proc/<pid>` that its process is still alive; a pid is only
    /// reused once its process has exited and been reaped, which would have
    /// made the pidfd readable.
    ///
    /// # Errors
    /// `ESRCH` when the process is gone; an I/O error reading `/proc`.
    pub fn owner(&self, pid: i32) -> io::Result<u32> {
        let status = procfs::process::Process::new(pid).and_then(|p| p.status());
        let mut fds = [libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, timeout 0: poll only writes revents.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        match status {
            Ok(status) => Ok(status.ruid),
            Err(procfs::ProcError::NotFound(_)) => Err(io::ErrorKind::NotFound.into()),
            Err(procfs::ProcError::PermissionDenied(_)) => {
                Err(io::ErrorKind::PermissionDenied.into())
            }
            Err(e) => Err(io::Error::other(format!("/proc/{pid}/status: {e}"))),
        }
    }

    pub async fn exited(&self) {
        // A pidfd stays readable once the process has exited; one readiness
        // event is the whole answer. An error here means the reactor is gone
        // (shutdown), which the session notices by other means.
        if self.fd.readable().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Registers an owned descriptor with tokio's reactor for readability.
fn register<T: AsRawFd>(owner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `owner` owns its descriptor (OwnedFd, or Inotify which holds an
    // OwnedFd) and moves into the AsyncFd, so the descriptor stays open and
    // unchanged for as long as it is registered.
    unsafe { AsyncFd::register_with_interest(owner, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct FsWatcher {
    inotify: AsyncFd<InotifyFd>,
    bus_dir: WatchDescriptor,
    /// The live clients, each with the watch on its directory.
    clients: Arc<Registry>,
    hello_changed: Notify,
    /// The bus directory's path and identity, and a watch on its parent:
    /// `rmdir` of a directory the broker holds open raises no
    /// `IN_DELETE_SELF` (that waits for the last close), but its parent
    /// sees `IN_DELETE` at once.
    bus_path: PathBuf,
    bus_id: crate::fifo::FileId,
    parent: Option<WatchDescriptor>,
    bus_gone: CancellationToken,
}

const CLIENT_EVENTS: AddWatchFlags = AddWatchFlags::IN_DELETE
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF)
    .union(AddWatchFlags::IN_ONLYDIR);

impl FsWatcher {
    /// Watches the bus directory for a deleted, renamed or replaced
    /// `hello`, and the directories of `clients` as they are added. Give
    /// `bus_dir` as `/proc/self/fd/N` of the locked directory, so the watch
    /// is on the directory the broker holds; `bus_path` is its name, whose
    /// parent is watched for the directory's removal.
    ///
    /// # Errors
    /// When inotify is unavailable or the directory cannot be watched.
    pub fn new(
        bus_dir: &Path,
        bus_path: &Path,
        clients: Arc<Registry>,
    ) -> io::Result<Arc<FsWatcher>> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let wd = inotify.add_watch(
            bus_dir,
            AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_CREATE
                | AddWatchFlags::IN_MOVE_SELF
                | AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_ONLYDIR,
        )?;
        let bus_id = crate::fifo::FileId::of(&nix::sys::stat::stat(bus_dir)?);
        let parent = bus_path.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = match parent.map(|p| {
            inotify.add_watch(
                p,
                AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_ONLYDIR,
            )
        }) {
            Some(Ok(wd)) => Some(wd),
            Some(Err(e)) => {
                tracing::warn!(
                    "cannot watch {} with inotify: {e}; a removed bus directory will only be noticed when it is renamed",
                    bus_path.parent().unwrap_or(bus_path).display()
                );
                None
            }
            None => None,
        };
        Ok(Arc::new(FsWatcher {
            inotify: register(InotifyFd(inotify))?,
            bus_dir: wd,
            clients,
            hello_changed: Notify::new(),
            bus_path: bus_path.to_owned(),
            bus_id,
            parent,
            bus_gone: CancellationToken::new(),
        }))
    }

    /// Resolves once the bus directory was removed or renamed: its path no
    /// longer leads to the directory the broker holds.
    ///
    /// The broker then stops (and exits non-zero) rather than re-creating
    /// it: every client directory went with it, so there is nobody left to
    /// serve, and no client could reach a broker whose `hello` is gone. A
    /// supervisor (`Restart=on-failure`) starts a new broker, which sets the
    /// directory up through the one code path that does it at start-up.
    pub async fn bus_dir_gone(&self) {
        self.bus_gone.cancelled().await
    }

    /// Whether the bus directory's path still leads to the directory held.
    fn check_bus_path(&self) {
        let here = nix::sys::stat::lstat(&self.bus_path)
            .is_ok_and(|st| crate::fifo::FileId::of(&st) == self.bus_id);
        if !here {
            self.bus_gone.cancel();
        }
    }

    /// Starts watching a client directory: once the client is registered
    /// with the returned descriptor, deleting or renaming `dir`, or `send` or
    /// `recv` inside it, ends that client.
    ///
    /// # Errors
    /// `ENOSPC` when the user's inotify watch limit is reached.
    pub fn watch_client(&self, dir: &Path) -> io::Result<WatchDescriptor> {
        Ok(self.inotify.get_ref().0.add_watch(dir, CLIENT_EVENTS)?)
    }

    /// Stops watching a client directory (a descriptor that
    /// [`Registry::remove`] returned, so it is still that client's).
    pub fn unwatch_client(&self, wd: WatchDescriptor) {
        // Fails with EINVAL when the directory is already gone; fine.
        let _ = self.inotify.get_ref().0.rm_watch(wd);
    }

    /// Resolves once a name `hello` was deleted, renamed, created or
    /// renamed over since the last call (the broker's own publishing counts
    /// too: the caller compares what is there with what it holds).
    pub async fn hello_changed(&self) {
        self.hello_changed.notified().await
    }

    /// Reads events until the reactor goes away. Spawn it once.
    pub async fn run(self: Arc<Self>) {
        loop {
            let mut guard = match self.inotify.readable().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("inotify stopped working: {e}; deleted client directories will go unnoticed");
                    return;
                }
            };
            match self.inotify.get_ref().0.read_events() {
                Ok(events) => {
                    for ev in events {
                        self.dispatch(ev);
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => {
                    tracing::error!("reading inotify events failed: {e}");
                    guard.clear_ready();
                }
            }
        }
    }

    fn dispatch(&self, ev: nix::sys::inotify::InotifyEvent) {
        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            self.rescan();
            return;
        }
        let gone = AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM;
        let name = ev.name.as_deref().and_then(|n| n.to_str());
        if Some(ev.wd) == self.parent {
            if ev.name.as_deref() == self.bus_path.file_name() {
                self.check_bus_path();
            }
            return;
        }
        if ev.wd == self.bus_dir {
            if ev
                .mask
                .intersects(AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_DELETE_SELF)
            {
                self.check_bus_path();
            }
            let arrived = AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CREATE;
            if ev.mask.intersects(gone | arrived) && name == Some("hello") {
                self.hello_changed.notify_one();
            }
            return;
        }
        let ends_client = ev
            .mask
            .intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF)
            || (ev.mask.intersects(gone) && matches!(name, Some("send" | "recv")));
        if ends_client {
            if let Some(client) = self.clients.by_watch(ev.wd) {
                client.outbox.close(CloseReason::Removed, None);
            }
        }
        if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
            self.clients.forget_watch(ev.wd);
        }
    }

    /// The kernel's event queue overflowed, so some deletions may have gone
    /// unreported: look at the files themselves. (The rendezvous puts
    /// `hello` back only if it is really missing or not the broker's.)
    fn rescan(&self) {
        tracing::warn!("inotify queue overflowed; checking the bus directory, hello and every client directory");
        self.check_bus_path();
        self.hello_changed.notify_one();
        self.clients.for_each(|client| {
            let intact = ["send", "recv"]
                .iter()
                .all(|f| crate::fifo::is_fifo(&client.dir.join(f)));
            if !intact {
                client.outbox.close(CloseReason::Removed, None);
            }
        });
    }
}
