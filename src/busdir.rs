//! The bus directory: where it is, who owns it, and what is left behind.
//!
//! [`BusDir::open`] creates (or adopts) the directory, takes an exclusive
//! `flock` on it, cleans up after a broker that died without cleaning up,
//! and publishes `hello`. The lock is on the directory itself, not on a lock
//! file, so removing files at shutdown can never let two brokers hold "the"
//! lock at once, and the kernel drops it when the owner dies, even by SIGKILL.
//! The pid file only serves error messages.
//!
//! The filesystem is hostile ground. The directory is adopted only if the
//! broker's effective uid owns it (root included) and nobody else may write
//! to it (a `--shared` bus may be group/other-writable only with the sticky
//! bit). From then on everything is reached relative to the locked
//! directory's descriptor: files are created `O_EXCL|O_NOFOLLOW` (or under
//! a temporary name and renamed into place), modes and owners are set with
//! `fchmod`/`fchown` on what was opened, and removal is `unlinkat`, which
//! never follows a link. What is found in the way and is not ours (a
//! symlink, a file of another user, a writable `clients/`) is refused with
//! an error naming it.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, Flock, FlockArg, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use tokio::net::unix::pipe;

use crate::fifo::{self, FileId};
use crate::state::{self, ClientRecord, Rejected, StateDir, STATE_DIR};

pub const HELLO: &str = "hello";
pub const CLIENTS: &str = "clients";
pub const PID_FILE: &str = "broker.pid";
/// Where the metrics endpoint listens, for `fifobus stats` and scripts.
pub const METRICS_ADDR_FILE: &str = "metrics.addr";
/// The system bus: root's default, and where `--shared` is meant to run.
pub const SYSTEM_BUS: &str = "/run/fifobus";

/// The default bus directory: `$FIFOBUS_DIR`, else `$XDG_RUNTIME_DIR/fifobus`,
/// else `/run/fifobus` for root (never a shared temporary directory, where
/// another user could prepare it first), else `/tmp/fifobus-<uid>`.
pub fn default_path() -> PathBuf {
    if let Some(d) = std::env::var_os("FIFOBUS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("fifobus");
    }
    let me = nix::unistd::geteuid();
    if me.is_root() {
        return PathBuf::from(SYSTEM_BUS);
    }
    PathBuf::from(format!("/tmp/fifobus-{me}"))
}

#[derive(Debug, thiserror::Error)]
pub enum BusDirError {
    #[error("bus directory {dir} is locked by pid {pid} (another fifobus serve is running)")]
    Locked { dir: PathBuf, pid: i32 },
    #[error("bus directory {dir} is locked by another process (another fifobus serve is starting or running)")]
    LockedUnknown { dir: PathBuf },
    #[error("bus directory {dir} is a symlink; give the real path with --dir")]
    Symlink { dir: PathBuf },
    #[error("{dir} exists and is not a directory; choose another --dir")]
    NotADirectory { dir: PathBuf },
    #[error(
        "bus directory {dir} belongs to uid {owner}, not to you (uid {me}): it could have been prepared by another user; remove it or choose another --dir"
    )]
    NotOwned { dir: PathBuf, owner: u32, me: u32 },
    #[error(
        "bus directory {dir} is writable by others (mode {mode:04o}): it could have been prepared by another user; remove it or choose another --dir (a bus for many users: --shared, on a directory with the sticky bit)"
    )]
    WritableByOthers { dir: PathBuf, mode: u32 },
    #[error(
        "--mode {mode:o} lets group or others write to the bus directory, so they could replace hello; use 700 (private) or 755, or --shared for a bus that other users may reach"
    )]
    UnsafeMode { mode: u32 },
    #[error("--shared needs root: client directories are given to the users who own them (run it as root, e.g. deploy/fifobus-shared.service)")]
    SharedNeedsRoot,
    #[error(
        "{path} is {what}, not something this broker made: it could have been planted by another user; check it, remove it, and start again"
    )]
    Planted { path: PathBuf, what: String },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a, E: Into<io::Error>>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(E) -> BusDirError + 'a {
    move |source| BusDirError::Io {
        action,
        path: path.to_owned(),
        source: source.into(),
    }
}

/// Modes of what the broker makes, private or shared.
#[derive(Debug, Clone, Copy)]
struct Layout {
    shared: bool,
}

impl Layout {
    /// A shared `hello` may be written by anyone, read by the broker alone.
    fn hello_mode(self) -> u32 {
        if self.shared {
            0o622
        } else {
            0o600
        }
    }

    /// A shared `clients/` is searchable (a client reaches its own
    /// directory by the name WELCOME gave it) but not listable.
    fn clients_mode(self) -> u32 {
        if self.shared {
            0o711
        } else {
            0o700
        }
    }
}

/// What a dead broker left behind and [`BusDir::open`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleCleanup {
    pub previous_pid: Option<i32>,
    pub removed_hello: bool,
    pub removed_clients: usize,
    /// Entries under `clients/` that did not look like ours and were kept.
    pub kept: Vec<PathBuf>,
    /// Clients whose state file or directory could not be used, and why
    /// (removed like the others).
    pub rejected: Vec<Rejected>,
}

impl StaleCleanup {
    pub fn is_empty(&self) -> bool {
        self.previous_pid.is_none() && !self.removed_hello && self.removed_clients == 0
    }
}

/// The descriptors and identities the rest of the broker needs to work in
/// the bus directory without paths: shared by the sessions (client
/// directories) and the handshakes (what a reply FIFO must not be).
pub struct BusFs {
    path: PathBuf,
    dir: OwnedFd,
    id: FileId,
    /// `clients/`; replaced if someone removes it.
    clients: RwLock<Arc<OwnedFd>>,
    hello: Mutex<Option<FileId>>,
    layout: Layout,
}

impl BusFs {
    /// The bus directory's identity.
    pub fn id(&self) -> FileId {
        self.id
    }

    /// Whether this is a `--shared` bus: client files belong to their users.
    pub fn shared(&self) -> bool {
        self.layout.shared
    }

    /// `<bus>/clients`, for messages and `WELCOME`; never opened by path.
    pub fn clients_path(&self) -> PathBuf {
        self.path.join(CLIENTS)
    }

    /// The descriptor of `clients/`, where client directories are made.
    pub fn clients(&self) -> Arc<OwnedFd> {
        self.clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `clients/` back after someone removed it (`stale` is the
    /// descriptor that found it gone); returns the one to use now.
    ///
    /// # Errors
    /// When it cannot be made, or something not ours is in its place.
    pub fn recreate_clients(&self, stale: &Arc<OwnedFd>) -> io::Result<Arc<OwnedFd>> {
        let mut cur = self.clients.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&cur, stale) {
            let fd = open_clients(self.dir.as_raw_fd(), &self.path, self.layout)
                .map_err(|e| io::Error::other(e.to_string()))?;
            *cur = Arc::new(fd);
        }
        Ok(cur.clone())
    }

    /// The identity of the `hello` FIFO the broker reads, once published.
    pub fn hello_id(&self) -> Option<FileId> {
        *self.hello.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_hello_id(&self, id: FileId) {
        *self.hello.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }
}

/// What is at `hello` now, compared with the FIFO the broker reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloCheck {
    Ours,
    Missing,
    /// Something else: what it is and who owns it.
    Impostor(String),
}

pub struct BusDir {
    path: PathBuf,
    _lock: Flock<OwnedFd>,
    created: bool,
    fs: Arc<BusFs>,
    /// `state/`, until the broker takes it ([`BusDir::take_state`]).
    state: Option<StateDir>,
    /// Clients a dead broker left that may be served again.
    adoptable: Vec<Adoptable>,
    /// The previous broker's `hello`, held across a handover.
    kept_hello: Option<(OwnedFd, FileId)>,
    /// Set by [`BusDir::publish_hello`], the last step of startup.
    hello: Option<pipe::Receiver>,
}

impl BusDir {
    /// Creates or adopts `path`, locks it, cleans up stale state and creates
    /// `clients/`. `mode` applies when the directory is created; `shared`
    /// makes a bus other users may reach (see the module docs). Must run
    /// inside a tokio runtime (the `hello` receiver registers with its
    /// reactor).
    ///
    /// # Errors
    /// [`BusDirError`], each variant saying what to do.
    pub fn open(
        path: &Path,
        mode: u32,
        shared: bool,
    ) -> Result<(BusDir, StaleCleanup), BusDirError> {
        Self::open_with(path, mode, shared, None)
    }

    /// [`BusDir::open`] for `serve --replace`, once the previous broker has
    /// exited: `pre` holds `hello` and the clients' FIFOs, opened while it
    /// still ran ([`preopen`]); those clients are adopted as handed over.
    ///
    /// # Errors
    /// As [`BusDir::open`].
    pub fn open_with(
        path: &Path,
        mode: u32,
        shared: bool,
        mut pre: Option<PreOpened>,
    ) -> Result<(BusDir, StaleCleanup), BusDirError> {
        let me = nix::unistd::geteuid().as_raw();
        if shared && me != 0 {
            return Err(BusDirError::SharedNeedsRoot);
        }
        let mut mode = mode & 0o7777;
        if mode & 0o022 != 0 {
            if !shared {
                return Err(BusDirError::UnsafeMode { mode });
            }
            // Others may create names here, but not rename over or remove
            // ours (hello, clients/).
            mode |= 0o1000;
        }
        let created = create(path, mode)?;
        let dir = open_dir_at(None, path).map_err(|e| match e {
            Errno::ELOOP => BusDirError::Symlink {
                dir: path.to_owned(),
            },
            Errno::ENOTDIR => BusDirError::NotADirectory {
                dir: path.to_owned(),
            },
            e => io_err("open", path)(e),
        })?;
        // Checked on the descriptor, not the path: what we hold is what we checked.
        let st = fstat(dir.as_raw_fd()).map_err(io_err("inspect", path))?;
        if st.st_uid != me {
            return Err(BusDirError::NotOwned {
                dir: path.to_owned(),
                owner: st.st_uid,
                me,
            });
        }
        if created {
            // mkdir applied the umask; set what we promised.
            fchmod(dir.as_raw_fd(), Mode::from_bits_truncate(mode))
                .map_err(io_err("set the mode of", path))?;
        } else {
            let have = st.st_mode & 0o7777;
            if have & 0o022 != 0 && !(shared && have & 0o1000 != 0) {
                return Err(BusDirError::WritableByOthers {
                    dir: path.to_owned(),
                    mode: have,
                });
            }
            if shared && have & 0o001 == 0 {
                tracing::warn!("bus directory {} has mode {have:04o}: other users cannot reach it; chmod o+x it for a shared bus", path.display());
            }
        }
        let lock = match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((fd, Errno::EWOULDBLOCK)) => {
                let dir = path.to_owned();
                return Err(match read_pid(fd.as_raw_fd()) {
                    Some(pid) => BusDirError::Locked { dir, pid },
                    None => BusDirError::LockedUnknown { dir },
                });
            }
            Err((_, e)) => return Err(io_err("lock", path)(e)),
        };
        let dir_fd = lock.as_raw_fd();
        let layout = Layout { shared };
        // We hold the lock, so whoever wrote what is here is gone. A hello
        // held since before the previous broker let go is kept: HELLOs
        // written into it meanwhile are read by this broker.
        let kept_hello = pre.as_mut().and_then(|p| p.hello.take()).filter(|(_, id)| {
            stat_at(dir_fd, HELLO).is_ok_and(|st| st.is_some_and(|st| FileId::of(&st) == *id))
        });
        let mut stale = cleanup_stale(dir_fd, path, kept_hello.is_some())?;
        let clients = open_clients(dir_fd, path, layout)?;
        let state_path = path.join(STATE_DIR);
        let state = match state::open_state_dir(dir_fd) {
            Ok(fd) => StateDir::new(fd, state_path),
            Err(e)
                if e.kind() == io::ErrorKind::PermissionDenied
                    || e.raw_os_error() == Some(libc::ELOOP)
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                let what = stat_at(dir_fd, STATE_DIR)
                    .ok()
                    .flatten()
                    .map_or_else(|| e.to_string(), |st| describe(&st));
                return Err(BusDirError::Planted {
                    path: state_path,
                    what,
                });
            }
            Err(e) => return Err(io_err("open", &state_path)(e)),
        };
        // What a dead broker recorded: each client whose directory and
        // FIFOs are still the ones it made is opened now (so a client
        // blocked in open() proceeds) and kept for adoption; the rest goes.
        let clients_path = path.join(CLIENTS);
        let (records, rejected) = state.load_all().map_err(io_err("read", state.path()))?;
        stale.rejected = rejected;
        let mut adoptable = Vec::new();
        for rec in records {
            let handed = pre
                .as_mut()
                .and_then(|p| p.clients.remove(&rec.uuid))
                .filter(|f| {
                    FileId::of_fd(f.send.as_raw_fd()).is_ok_and(|id| id == rec.send)
                        && FileId::of_fd(f.recv.as_raw_fd()).is_ok_and(|id| id == rec.recv)
                });
            if let Some(fifos) = handed {
                adoptable.push(Adoptable {
                    record: rec,
                    fifos,
                    handover: true,
                });
                continue;
            }
            match open_recorded(clients.as_raw_fd(), &rec, layout) {
                Ok(fifos) => adoptable.push(Adoptable {
                    record: rec,
                    fifos,
                    handover: false,
                }),
                Err(why) => {
                    state.remove(&rec.uuid);
                    stale.rejected.push(Rejected {
                        path: clients_path.join(&rec.uuid),
                        why,
                    });
                }
            }
        }
        let keep: Vec<&str> = adoptable.iter().map(|a| a.record.uuid.as_str()).collect();
        let (removed, kept) = remove_client_dirs(clients.as_raw_fd(), &clients_path, &keep)
            .map_err(io_err("clean up", &clients_path))?;
        stale.removed_clients = removed;
        stale.kept = kept;
        write_file_at(dir_fd, path, PID_FILE, &format!("{}\n", std::process::id()))?;
        let fs = Arc::new(BusFs {
            path: path.to_owned(),
            dir: nix::unistd::dup(dir_fd)
                // SAFETY: dup just returned this descriptor; we own it.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .map_err(io_err("duplicate the descriptor of", path))?,
            id: FileId::of(&st),
            clients: RwLock::new(Arc::new(clients)),
            hello: Mutex::new(None),
            layout,
        });
        Ok((
            BusDir {
                path: path.to_owned(),
                _lock: lock,
                created,
                fs,
                state: Some(state),
                adoptable,
                kept_hello,
                hello: None,
            },
            stale,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<bus>/state/`, for the broker's [`crate::state::StateStore`].
    ///
    /// # Panics
    /// When taken twice.
    pub fn take_state(&mut self) -> StateDir {
        self.state
            .take()
            .expect("the state directory is taken once")
    }

    pub fn clients_dir(&self) -> PathBuf {
        self.path.join(CLIENTS)
    }

    /// The clients a dead broker left whose directory and FIFOs checked
    /// out, their FIFOs already open: for `session::adopt`.
    pub fn take_adoptable(&mut self) -> Vec<Adoptable> {
        std::mem::take(&mut self.adoptable)
    }

    /// What sessions and handshakes need of the bus directory.
    pub fn fs(&self) -> Arc<BusFs> {
        self.fs.clone()
    }

    /// A path that names the locked directory itself, whatever happens to
    /// its name (for inotify, which takes paths).
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fs.dir.as_raw_fd()))
    }

    fn dir_fd(&self) -> RawFd {
        self.fs.dir.as_raw_fd()
    }

    /// Creates `hello`: the broker's "ready" signal, so call it last, once
    /// everything that serves clients (and notices a deleted `hello`) runs.
    ///
    /// # Errors
    /// When the FIFO cannot be created.
    pub fn publish_hello(&mut self) -> io::Result<()> {
        if let Some((fd, id)) = self.kept_hello.take() {
            // Handed over: the same FIFO, whatever waits in it included.
            self.fs.set_hello_id(id);
            self.hello = Some(pipe::Receiver::from_owned_fd_unchecked(fd)?);
            return Ok(());
        }
        let (rx, id) = publish_hello(self.dir_fd(), self.fs.layout.hello_mode())?;
        self.fs.set_hello_id(id);
        self.hello = Some(rx);
        Ok(())
    }

    /// # Panics
    /// Before [`BusDir::publish_hello`].
    pub fn hello(&self) -> &pipe::Receiver {
        self.hello.as_ref().expect("hello is published at startup")
    }

    /// Records the metrics endpoint's address for `fifobus stats`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_metrics_addr(&self, addr: std::net::SocketAddr) -> io::Result<()> {
        write_file_at(
            self.dir_fd(),
            &self.path,
            METRICS_ADDR_FILE,
            &format!("{addr}\n"),
        )
        .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Compares what is at `hello` now (not following a link) with the FIFO
    /// the broker reads.
    pub fn check_hello(&self) -> HelloCheck {
        match stat_at(self.dir_fd(), HELLO) {
            Ok(None) => HelloCheck::Missing,
            Ok(Some(st)) if Some(FileId::of(&st)) == self.fs.hello_id() => HelloCheck::Ours,
            Ok(Some(st)) => HelloCheck::Impostor(describe(&st)),
            Err(e) => HelloCheck::Impostor(format!("something that cannot be inspected ({e})")),
        }
    }

    /// Puts a fresh `hello` in place after someone deleted or replaced it,
    /// and returns the old receiver so the caller can drain what was
    /// written before. An impostor that is not a directory is replaced
    /// atomically by the rename, so there is no moment without a `hello`;
    /// an (empty) directory is removed first.
    ///
    /// # Errors
    /// When the FIFO cannot be created or the impostor cannot be removed.
    pub fn replace_hello(&mut self) -> io::Result<pipe::Receiver> {
        if let Ok(Some(st)) = stat_at(self.dir_fd(), HELLO) {
            if kind(&st) == SFlag::S_IFDIR {
                unlinkat(Some(self.dir_fd()), HELLO, UnlinkatFlags::RemoveDir)?;
            }
        }
        let (fresh, id) = publish_hello(self.dir_fd(), self.fs.layout.hello_mode())?;
        self.fs.set_hello_id(id);
        Ok(self.hello.replace(fresh).expect("hello was published"))
    }

    /// Removes `hello` if it is still ours, so no new client starts
    /// writing to it; an impostor is left for the owner to look at.
    pub fn unpublish_hello(&self) {
        if self.check_hello() == HelloCheck::Ours {
            let _ = unlinkat(Some(self.dir_fd()), HELLO, UnlinkatFlags::NoRemoveDir);
        }
    }

    /// Removes what this broker created: `hello` first (so no new client
    /// blocks writing to it), then leftover client directories, `clients/`,
    /// the pid file, and the bus directory itself if this broker created it.
    pub fn remove(self) {
        self.unpublish_hello();
        let dir = self.dir_fd();
        let clients = self.fs.clients();
        let _ = remove_client_dirs(clients.as_raw_fd(), &self.clients_dir(), &[]);
        let _ = unlinkat(Some(dir), CLIENTS, UnlinkatFlags::RemoveDir);
        // Empty once every session has forgotten its client.
        let _ = unlinkat(Some(dir), STATE_DIR, UnlinkatFlags::RemoveDir);
        let _ = unlinkat(Some(dir), PID_FILE, UnlinkatFlags::NoRemoveDir);
        let _ = unlinkat(Some(dir), METRICS_ADDR_FILE, UnlinkatFlags::NoRemoveDir);
        if self.created {
            // Only the directory we hold, found again in its parent.
            let (Some(parent), Some(name)) = (self.path.parent(), self.path.file_name()) else {
                return;
            };
            if let Ok(p) = open_dir_at(None, parent) {
                if stat_at(p.as_raw_fd(), name)
                    .is_ok_and(|st| st.is_some_and(|st| FileId::of(&st) == self.fs.id))
                {
                    let _ = unlinkat(Some(p.as_raw_fd()), name, UnlinkatFlags::RemoveDir);
                }
            }
        }
    }
}

/// Makes the bus directory (and missing parents); whether it was made now.
fn create(path: &Path, mode: u32) -> Result<bool, BusDirError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(mode & 0o777)
                .create(parent)
                .map_err(io_err("create", parent))?;
        }
    }
    match nix::unistd::mkdir(path, Mode::from_bits_truncate(mode & 0o777)) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(e) => Err(io_err("create", path)(e)),
    }
}

/// `O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC`, relative to `dir`.
fn open_dir_at<P: ?Sized + nix::NixPath>(dir: Option<RawFd>, name: &P) -> nix::Result<OwnedFd> {
    let raw = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` when there is nothing.
fn stat_at<P: ?Sized + nix::NixPath>(dir: RawFd, name: &P) -> nix::Result<Option<FileStat>> {
    match fstatat(Some(dir), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// "a symlink owned by uid 1001", for messages.
fn describe(st: &FileStat) -> String {
    let what = match kind(st) {
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFLNK => "a symlink",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFSOCK => "a socket",
        _ => "a device",
    };
    format!(
        "{what} owned by uid {} (mode {:04o})",
        st.st_uid,
        st.st_mode & 0o7777
    )
}

/// Checks that `name`, if it exists, is a `want` owned by us; whether it exists.
fn expect_ours(dir: RawFd, bus: &Path, name: &str, want: SFlag) -> Result<bool, BusDirError> {
    let path = bus.join(name);
    match stat_at(dir, name).map_err(io_err("inspect", &path))? {
        None => Ok(false),
        Some(st) if kind(&st) == want && st.st_uid == nix::unistd::geteuid().as_raw() => Ok(true),
        Some(st) => Err(BusDirError::Planted {
            path,
            what: describe(&st),
        }),
    }
}

/// Writes `name` whole: under a temporary name created `O_EXCL|O_NOFOLLOW`,
/// then renamed into place, which replaces a name without following it.
fn write_file_at(dir: RawFd, bus: &Path, name: &str, contents: &str) -> Result<(), BusDirError> {
    use std::io::Write;
    let tmp = format!(".{name}.{}", std::process::id());
    let tmp_path = bus.join(&tmp);
    if expect_ours(dir, bus, &tmp, SFlag::S_IFREG)? {
        unlinkat(Some(dir), tmp.as_str(), UnlinkatFlags::NoRemoveDir)
            .map_err(io_err("remove stale", &tmp_path))?;
    }
    let raw = openat(
        Some(dir),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(io_err("create", &tmp_path))?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    let mut file = fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let written = fchmod(file.as_raw_fd(), Mode::from_bits_truncate(0o644))
        .map_err(io::Error::from)
        .and_then(|()| file.write_all(contents.as_bytes()))
        .map_err(io_err("write", &tmp_path))
        .and_then(|()| {
            renameat(Some(dir), tmp.as_str(), Some(dir), name)
                .map_err(io_err("write", &bus.join(name)))
        });
    if written.is_err() {
        let _ = unlinkat(Some(dir), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    written
}

/// Creates `hello` under a temporary name, opens it, then renames it into
/// place: whenever `hello` exists, a broker is reading it. Returns the
/// receiver and the FIFO's identity.
fn publish_hello(dir: RawFd, mode: u32) -> io::Result<(pipe::Receiver, FileId)> {
    let tmp = format!(".hello.{}", std::process::id());
    if let Some(st) = stat_at(dir, tmp.as_str())? {
        if kind(&st) != SFlag::S_IFIFO || st.st_uid != nix::unistd::geteuid().as_raw() {
            return Err(io::Error::other(format!(
                "{tmp} in the bus directory is {}; remove it",
                describe(&st)
            )));
        }
        unlinkat(Some(dir), tmp.as_str(), UnlinkatFlags::NoRemoveDir)?;
    }
    let fd = fifo::make_at(dir, &tmp, mode, None)?;
    let id = FileId::of_fd(fd.as_raw_fd())?;
    let placed = pipe::Receiver::from_owned_fd_unchecked(fd).and_then(|rx| {
        renameat(Some(dir), tmp.as_str(), Some(dir), HELLO)?;
        Ok(rx)
    });
    match placed {
        Ok(rx) => Ok((rx, id)),
        Err(e) => {
            let _ = unlinkat(Some(dir), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            Err(e)
        }
    }
}

/// The pid in the pid file, if it is a regular file (never a FIFO someone
/// planted to make us block, never through a link).
fn read_pid(dir: RawFd) -> Option<i32> {
    use std::io::Read;
    let raw = openat(
        Some(dir),
        PID_FILE,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    let mut file = fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    if kind(&fstat(file.as_raw_fd()).ok()?) != SFlag::S_IFREG {
        return None;
    }
    let mut s = String::new();
    file.by_ref().take(64).read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Removes a dead broker's `hello` and `metrics.addr`, and checks that its
/// pid file is one. Anything of the wrong kind or owner is refused.
fn cleanup_stale(dir: RawFd, bus: &Path, keep_hello: bool) -> Result<StaleCleanup, BusDirError> {
    let mut report = StaleCleanup::default();
    if expect_ours(dir, bus, PID_FILE, SFlag::S_IFREG)? {
        report.previous_pid = read_pid(dir);
    }
    if expect_ours(dir, bus, METRICS_ADDR_FILE, SFlag::S_IFREG)? {
        let path = bus.join(METRICS_ADDR_FILE);
        unlinkat(Some(dir), METRICS_ADDR_FILE, UnlinkatFlags::NoRemoveDir)
            .map_err(io_err("remove stale", &path))?;
    }
    if expect_ours(dir, bus, HELLO, SFlag::S_IFIFO)? && !keep_hello {
        let path = bus.join(HELLO);
        unlinkat(Some(dir), HELLO, UnlinkatFlags::NoRemoveDir)
            .map_err(io_err("remove stale", &path))?;
        report.removed_hello = true;
    }
    Ok(report)
}

/// Makes or adopts `clients/`: a directory of ours that nobody else may
/// write to, then set to the layout's mode.
fn open_clients(dir: RawFd, bus: &Path, layout: Layout) -> Result<OwnedFd, BusDirError> {
    let path = bus.join(CLIENTS);
    match mkdirat(Some(dir), CLIENTS, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(io_err("create", &path)(e)),
    }
    let planted = |what: String| BusDirError::Planted {
        path: path.clone(),
        what,
    };
    let fd = match open_dir_at(Some(dir), CLIENTS) {
        Ok(fd) => fd,
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            let st = stat_at(dir, CLIENTS).map_err(io_err("inspect", &path))?;
            return Err(planted(
                st.map_or_else(|| "gone".into(), |st| describe(&st)),
            ));
        }
        Err(e) => return Err(io_err("open", &path)(e)),
    };
    let st = fstat(fd.as_raw_fd()).map_err(io_err("inspect", &path))?;
    if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_mode & 0o022 != 0 {
        return Err(planted(describe(&st)));
    }
    fchmod(
        fd.as_raw_fd(),
        Mode::from_bits_truncate(layout.clients_mode()),
    )
    .map_err(io_err("set the mode of", &path))?;
    Ok(fd)
}

/// Makes the client directory `name` in `clients` (mode 0700) and returns
/// its descriptor. Its owner is set by the caller once it is filled.
///
/// # Errors
/// From `mkdirat` (`ENOENT`: `clients/` was removed), `openat` or `fchmod`.
pub fn make_client_dir(clients: RawFd, name: &str) -> io::Result<OwnedFd> {
    mkdirat(Some(clients), name, Mode::from_bits_truncate(0o700))?;
    let fd = open_dir_at(Some(clients), name)?;
    let st = fstat(fd.as_raw_fd())?;
    if st.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} was replaced between mkdir and open"),
        ));
    }
    fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o700))?;
    Ok(fd)
}

/// Removes every `clients/<uuid>/` that holds nothing but our FIFOs. Anything
/// else is somebody's file: keep it and report it. Never recursive, never
/// through a link (a symlink named like a uuid is kept).
fn remove_client_dirs(
    clients: RawFd,
    clients_path: &Path,
    keep: &[&str],
) -> io::Result<(usize, Vec<PathBuf>)> {
    let mut names = Vec::new();
    let mut listing = nix::dir::Dir::openat(
        Some(clients),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    for entry in listing.iter() {
        let name = entry?.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            names.push(name);
        }
    }
    let mut removed = 0;
    let mut kept = Vec::new();
    for name in names {
        let text = name.to_str().unwrap_or("");
        if keep.contains(&text) {
            continue;
        }
        let ours = uuid::Uuid::parse_str(text).is_ok()
            && stat_at(clients, name.as_c_str())
                .is_ok_and(|st| st.is_some_and(|st| kind(&st) == SFlag::S_IFDIR));
        if ours && remove_client_dir(clients, text).is_ok() {
            removed += 1;
        } else {
            kept.push(clients_path.join(std::ffi::OsStr::from_bytes(name.as_bytes())));
        }
    }
    Ok((removed, kept))
}

use std::os::unix::ffi::OsStrExt;

/// Removes the client directory `name` in `clients` if it holds only `send`
/// and `recv` FIFOs. Never follows a link: `name` must be a directory, and
/// only FIFOs are unlinked inside it.
///
/// # Errors
/// If the directory holds anything else, or cannot be removed.
pub fn remove_client_dir(clients: RawFd, name: &str) -> io::Result<()> {
    let dir = match open_dir_at(Some(clients), name) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for f in ["send", "recv"] {
        if stat_at(dir.as_raw_fd(), f)?.is_some_and(|st| kind(&st) == SFlag::S_IFIFO) {
            unlinkat(Some(dir.as_raw_fd()), f, UnlinkatFlags::NoRemoveDir)?;
        }
    }
    match unlinkat(Some(clients), name, UnlinkatFlags::RemoveDir) {
        Err(Errno::ENOENT) => Ok(()),
        r => Ok(r?),
    }
}

/// A client a dead broker left, checked and opened: what `session::adopt`
/// needs to serve it again.
pub struct Adoptable {
    pub record: ClientRecord,
    pub fifos: OpenedClient,
    /// Handed over by a live broker (`serve --replace`): nothing was lost.
    pub handover: bool,
}

/// A recorded client's directory and its two FIFOs, opened `O_RDWR`.
pub struct OpenedClient {
    pub dir: OwnedFd,
    pub send: OwnedFd,
    pub recv: OwnedFd,
}

/// Opens `clients/<uuid>/` and its FIFOs if they are exactly what the state
/// file recorded: a directory (mode 0700) and two FIFOs (0600) of the
/// expected owner (the client's user on a `--shared` bus, else ours), the
/// FIFOs with the recorded (device, inode). Each FIFO is inspected without
/// following links before it is opened (`O_NOFOLLOW|O_NONBLOCK`, so never a
/// device and never a wait), and checked again on the descriptor. Opening
/// them is what lets a client blocked in `open()` proceed.
fn open_recorded(
    clients: RawFd,
    rec: &ClientRecord,
    layout: Layout,
) -> Result<OpenedClient, String> {
    let me = nix::unistd::geteuid().as_raw();
    let owner = if layout.shared { rec.uid } else { me };
    let dir = open_dir_at(Some(clients), rec.uuid.as_str()).map_err(|e| match e {
        Errno::ENOENT => "its directory is gone".to_owned(),
        Errno::ELOOP | Errno::ENOTDIR => "its directory is not a directory".to_owned(),
        e => format!("cannot open its directory: {e}"),
    })?;
    let st = fstat(dir.as_raw_fd()).map_err(|e| format!("cannot inspect its directory: {e}"))?;
    if st.st_uid != owner || st.st_mode & 0o7777 != 0o700 {
        return Err(format!(
            "its directory is {}, not a directory of uid {owner} (mode 0700)",
            describe(&st)
        ));
    }
    let open = |name: &str, want: FileId| -> Result<OwnedFd, String> {
        let st = stat_at(dir.as_raw_fd(), name)
            .map_err(|e| format!("cannot inspect {name}: {e}"))?
            .ok_or_else(|| format!("{name} is gone"))?;
        let fits = |st: &FileStat| {
            kind(st) == SFlag::S_IFIFO
                && st.st_uid == owner
                && st.st_mode & 0o7777 == 0o600
                && FileId::of(st) == want
        };
        if !fits(&st) {
            return Err(format!(
                "{name} is {}, not the FIFO the broker made",
                describe(&st)
            ));
        }
        let raw = openat(
            Some(dir.as_raw_fd()),
            name,
            OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("cannot open {name}: {e}"))?;
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        match fstat(fd.as_raw_fd()) {
            Ok(st) if fits(&st) => Ok(fd),
            _ => Err(format!("{name} was replaced while it was opened")),
        }
    };
    let send = open("send", rec.send)?;
    let recv = open("recv", rec.recv)?;
    Ok(OpenedClient { dir, send, recv })
}

/// What `serve --replace` opens while the previous broker still runs (it
/// is paused and has written its state): `hello` and every recorded
/// client's FIFOs, checked as after a crash. Holding them is what keeps
/// every byte in those pipes when the previous broker exits.
pub struct PreOpened {
    previous_pid: Option<i32>,
    hello: Option<(OwnedFd, FileId)>,
    clients: std::collections::HashMap<String, OpenedClient>,
}

impl PreOpened {
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// The running broker's pid, from its pid file.
    pub fn previous_pid(&self) -> Option<i32> {
        self.previous_pid
    }
}

/// Opens what [`PreOpened`] holds, without the lock (the previous broker
/// has it). Clients whose files do not check out are left to
/// [`BusDir::open_with`], which treats them as after a crash.
///
/// # Errors
/// When the bus directory is not ours or cannot be read.
pub fn preopen(path: &Path, shared: bool) -> Result<PreOpened, BusDirError> {
    let layout = Layout { shared };
    let dir = open_dir_at(None, path).map_err(io_err("open", path))?;
    let st = fstat(dir.as_raw_fd()).map_err(io_err("inspect", path))?;
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != me {
        return Err(BusDirError::NotOwned {
            dir: path.to_owned(),
            owner: st.st_uid,
            me,
        });
    }
    let clients_path = path.join(CLIENTS);
    let clients =
        open_dir_at(Some(dir.as_raw_fd()), CLIENTS).map_err(io_err("open", &clients_path))?;
    let state_path = path.join(STATE_DIR);
    let state_fd =
        open_dir_at(Some(dir.as_raw_fd()), STATE_DIR).map_err(io_err("open", &state_path))?;
    let sst = fstat(state_fd.as_raw_fd()).map_err(io_err("inspect", &state_path))?;
    if sst.st_uid != me || sst.st_mode & 0o077 != 0 {
        return Err(BusDirError::Planted {
            path: state_path,
            what: describe(&sst),
        });
    }
    let state = StateDir::new(state_fd, state_path.clone());
    let (records, _) = state.load_all().map_err(io_err("read", &state_path))?;
    let mut map = std::collections::HashMap::new();
    for rec in records {
        if let Ok(f) = open_recorded(clients.as_raw_fd(), &rec, layout) {
            map.insert(rec.uuid.clone(), f);
        }
    }
    let hello = match stat_at(dir.as_raw_fd(), HELLO) {
        Ok(Some(st)) if kind(&st) == SFlag::S_IFIFO && st.st_uid == me => openat(
            Some(dir.as_raw_fd()),
            HELLO,
            OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()
        // SAFETY: openat just returned this descriptor; nothing else owns it.
        .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) })
        .and_then(|fd| {
            let got = fstat(fd.as_raw_fd()).ok()?;
            (FileId::of(&got) == FileId::of(&st)).then_some((fd, FileId::of(&st)))
        }),
        _ => None,
    };
    Ok(PreOpened {
        previous_pid: read_pid(dir.as_raw_fd()),
        hello,
        clients: map,
    })
}
