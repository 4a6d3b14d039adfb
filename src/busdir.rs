//! The bus directory: where it is, who owns it, and what is left behind.
//!
//! [`BusDir::open`] creates (or adopts) the directory, takes an exclusive
//! `flock` on it, cleans up after a broker that died without cleaning up,
//! and publishes `hello`. The lock is on the directory itself, not on a lock
//! file, so removing files at shutdown can never let two brokers hold "the"
//! lock at once, and the kernel drops it when the owner dies, even by SIGKILL.
//! The pid file only serves error messages.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use tokio::net::unix::pipe;

use crate::fifo;

pub const HELLO: &str = "hello";
pub const CLIENTS: &str = "clients";
pub const PID_FILE: &str = "broker.pid";
/// Where the metrics endpoint listens, for `fifobus stats` and scripts.
pub const METRICS_ADDR_FILE: &str = "metrics.addr";

/// The default bus directory: `$FIFOBUS_DIR`, else `$XDG_RUNTIME_DIR/fifobus`,
/// else `/tmp/fifobus-<uid>`.
pub fn default_path() -> PathBuf {
    if let Some(d) = std::env::var_os("FIFOBUS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("fifobus");
    }
    PathBuf::from(format!("/tmp/fifobus-{}", nix::unistd::getuid()))
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
        "bus directory {dir} belongs to uid {owner}, not to you (uid {me}); choose another --dir"
    )]
    NotOwned { dir: PathBuf, owner: u32, me: u32 },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BusDirError + 'a {
    move |source| BusDirError::Io {
        action,
        path: path.to_owned(),
        source,
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
}

impl StaleCleanup {
    pub fn is_empty(&self) -> bool {
        self.previous_pid.is_none() && !self.removed_hello && self.removed_clients == 0
    }
}

pub struct BusDir {
    path: PathBuf,
    _lock: Flock<OwnedFd>,
    created: bool,
    /// Set by [`BusDir::publish_hello`], the last step of startup.
    hello: Option<pipe::Receiver>,
}

impl BusDir {
    /// Creates or adopts `path`, locks it, cleans up stale state and creates
    /// `hello` and `clients/`. Must run inside a tokio runtime (the `hello`
    /// receiver registers with its reactor).
    ///
    /// # Errors
    /// [`BusDirError`], each variant saying what to do.
    pub fn open(path: &Path, mode: u32) -> Result<(BusDir, StaleCleanup), BusDirError> {
        let created = Self::create_or_check(path, mode)?;
        // `O_RDONLY | O_DIRECTORY | O_NOFOLLOW` (std adds `O_CLOEXEC`).
        let dir_fd = OwnedFd::from(
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(path)
                .map_err(io_err("open", path))?,
        );
        let lock = match Flock::lock(dir_fd, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => {
                let dir = path.to_owned();
                return Err(match read_pid(path) {
                    Some(pid) => BusDirError::Locked { dir, pid },
                    None => BusDirError::LockedUnknown { dir },
                });
            }
            Err((_, e)) => return Err(io_err("lock", path)(e.into())),
        };
        // We hold the lock, so whoever wrote what is here is gone.
        let stale = cleanup_stale(path)?;
        let pid_path = path.join(PID_FILE);
        fs::write(&pid_path, format!("{}\n", std::process::id()))
            .map_err(io_err("write", &pid_path))?;
        let clients = path.join(CLIENTS);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&clients)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io_err("create", &clients))?;
        Ok((
            BusDir {
                path: path.to_owned(),
                _lock: lock,
                created,
                hello: None,
            },
            stale,
        ))
    }

    fn create_or_check(path: &Path, mode: u32) -> Result<bool, BusDirError> {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(mode)
                    .create(path)
                    .map_err(io_err("create", path))?;
                // DirBuilder's mode is filtered by the umask; set what we promised.
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(path, fs::Permissions::from_mode(mode))
                    .map_err(io_err("set the mode of", path))?;
                Ok(true)
            }
            Err(e) => Err(io_err("inspect", path)(e)),
            Ok(m) if m.file_type().is_symlink() => Err(BusDirError::Symlink {
                dir: path.to_owned(),
            }),
            Ok(m) if !m.is_dir() => Err(BusDirError::NotADirectory {
                dir: path.to_owned(),
            }),
            Ok(m) => {
                let me = nix::unistd::getuid().as_raw();
                if m.uid() != me && me != 0 {
                    return Err(BusDirError::NotOwned {
                        dir: path.to_owned(),
                        owner: m.uid(),
                        me,
                    });
                }
                Ok(false)
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn clients_dir(&self) -> PathBuf {
        self.path.join(CLIENTS)
    }

    /// Creates `hello`: the broker's "ready" signal, so call it last, once
    /// everything that serves clients (and notices a deleted `hello`) runs.
    ///
    /// # Errors
    /// When the FIFO cannot be created.
    pub fn publish_hello(&mut self) -> io::Result<()> {
        self.hello = Some(publish_hello(&self.path)?);
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
        fs::write(self.path.join(METRICS_ADDR_FILE), format!("{addr}\n"))
    }

    /// Puts a fresh `hello` in place after someone deleted it, and returns
    /// the old receiver so the caller can drain what was written before.
    ///
    /// # Errors
    /// When the FIFO cannot be created.
    pub fn recreate_hello(&mut self) -> io::Result<pipe::Receiver> {
        let fresh = publish_hello(&self.path)?;
        Ok(self.hello.replace(fresh).expect("hello was published"))
    }

    /// Removes what this broker created: `hello` first (so no new client
    /// blocks writing to it), then leftover client directories, `clients/`,
    /// the pid file, and the bus directory itself if this broker created it.
    pub fn remove(self) {
        let _ = fs::remove_file(self.path.join(HELLO));
        let clients = self.path.join(CLIENTS);
        let _ = remove_client_dirs(&clients);
        let _ = fs::remove_dir(&clients);
        let _ = fs::remove_file(self.path.join(PID_FILE));
        let _ = fs::remove_file(self.path.join(METRICS_ADDR_FILE));
        if self.created {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// Creates `hello` under a temporary name, opens it, then renames it into
/// place: whenever `hello` exists, a broker is reading it.
fn publish_hello(dir: &Path) -> io::Result<pipe::Receiver> {
    let tmp = dir.join(format!(".hello.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    fifo::make(&tmp, 0o600)?;
    let rx = fifo::open_resilient_rx(&tmp);
    let rx = match rx {
        Ok(rx) => rx,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, dir.join(HELLO))?;
    Ok(rx)
}

fn read_pid(dir: &Path) -> Option<i32> {
    fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn cleanup_stale(dir: &Path) -> Result<StaleCleanup, BusDirError> {
    let mut report = StaleCleanup {
        previous_pid: read_pid(dir),
        ..StaleCleanup::default()
    };
    let _ = fs::remove_file(dir.join(METRICS_ADDR_FILE));
    let hello = dir.join(HELLO);
    if fifo::is_fifo(&hello) {
        fs::remove_file(&hello).map_err(io_err("remove stale", &hello))?;
        report.removed_hello = true;
    }
    let clients = dir.join(CLIENTS);
    if clients.is_dir() {
        let (removed, kept) = remove_client_dirs(&clients).map_err(io_err("clean up", &clients))?;
        report.removed_clients = removed;
        report.kept = kept;
    }
    Ok(report)
}

/// Removes every `clients/<uuid>/` that holds nothing but our FIFOs. Anything
/// else is somebody's file: keep it and report it. Never recursive.
fn remove_client_dirs(clients: &Path) -> io::Result<(usize, Vec<PathBuf>)> {
    let mut removed = 0;
    let mut kept = Vec::new();
    for entry in fs::read_dir(clients)? {
        let path = entry?.path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| uuid::Uuid::parse_str(n).is_ok())
            && fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if ours && remove_client_dir(&path).is_ok() {
            removed += 1;
        } else {
            kept.push(path);
        }
    }
    Ok((removed, kept))
}

/// Removes one client directory holding only `send` and `recv` FIFOs.
///
/// # Errors
/// If the directory holds anything else, or cannot be removed.
pub fn remove_client_dir(dir: &Path) -> io::Result<()> {
    for name in ["send", "recv"] {
        let p = dir.join(name);
        if fifo::is_fifo(&p) {
            fs::remove_file(&p)?;
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}
