//! Opening and inspecting FIFOs without ever blocking or following a link.
//!
//! The rules every caller relies on:
//! - Every open uses `O_NONBLOCK`, so no task can hang in `open()`; that is
//!   what makes shutdown bounded.
//! - The broker opens its own FIFOs (`hello`, `send`, `recv`) `O_RDWR`. On
//!   Linux that never blocks and makes the broker a reader and a writer at
//!   once: a client that closes its end is not an EOF, a client's `open()`
//!   of either end returns at once, and bytes in the pipe survive a client
//!   that reopens per line.
//! - A client-supplied path (`reply=`) is opened `O_PATH|O_NOFOLLOW` first
//!   and checked with `fstat` on that descriptor, then reopened for writing
//!   through `/proc/self/fd`: a symlink, a regular file or a device is never
//!   opened for writing, and swapping the path between check and open does
//!   not help an attacker.
//! - The broker's own FIFOs are made with [`make_at`], relative to a
//!   directory descriptor it holds, and their mode and owner are set on the
//!   opened descriptor: nothing in the bus directory is reached by a path.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::stat::{fstat, Mode, SFlag};
use tokio::net::unix::pipe;
use tokio::time::Instant;

/// Creates a FIFO with exactly `mode` (umask does not apply).
///
/// It follows paths (the `chmod` follows a symlink swapped in after the
/// `mkfifo`): for directories only the caller can write to, such as a
/// client's private reply directory. Never for the bus directory: the
/// broker uses [`make_at`] there.
pub fn make(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    nix::unistd::mkfifo(path, Mode::from_bits_truncate(mode))?;
    // mkfifo applies the umask; the mode we promise is the mode we set.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Whether `path` is a FIFO, without following a symlink.
pub fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// `O_RDWR | O_NONBLOCK | O_NOFOLLOW` (std adds `O_CLOEXEC`).
fn open_own(path: &Path) -> io::Result<OwnedFd> {
    let fd = OwnedFd::from(
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
            .open(path)?,
    );
    if !fd_is_fifo(fd.as_raw_fd())? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a FIFO", path.display()),
        ));
    }
    Ok(fd)
}

/// Opens one of the broker's own FIFOs as a reader that never sees EOF.
pub fn open_resilient_rx(path: &Path) -> io::Result<pipe::Receiver> {
    pipe::Receiver::from_owned_fd_unchecked(open_own(path)?)
}

/// Opens one of the broker's own FIFOs as a writer that never gets `EPIPE`
/// and whose unread bytes survive the client's reader coming and going.
pub fn open_resilient_tx(path: &Path) -> io::Result<pipe::Sender> {
    pipe::Sender::from_owned_fd_unchecked(open_own(path)?)
}

/// A file's identity: what two names or descriptors share when they are the
/// same file, whatever the path said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(st: &nix::sys::stat::FileStat) -> FileId {
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }

    /// The identity of what `fd` refers to.
    ///
    /// # Errors
    /// When `fstat` fails.
    pub fn of_fd(fd: RawFd) -> io::Result<FileId> {
        Ok(FileId::of(&fstat(fd)?))
    }
}

/// Creates the FIFO `name` in the directory `dir` (a descriptor the broker
/// holds) and opens it `O_RDWR` like [`open_resilient_rx`]. `O_EXCL`
/// semantics: an existing `name`, whatever it is, is an error (`EEXIST`).
/// The mode, and the owner when `owner` is given (a shared bus gives a
/// client's FIFOs to its user), are set with `fchmod`/`fchown` on the opened
/// descriptor, so they land on the FIFO just made and nowhere else.
///
/// # Errors
/// From `mkfifoat`, `openat`, `fchmod` or `fchown`; `InvalidData` if what
/// was opened is not a FIFO of ours (someone swapped it in between, which
/// needs write access to `dir`).
pub fn make_at(dir: RawFd, name: &str, mode: u32, owner: Option<u32>) -> io::Result<OwnedFd> {
    use nix::fcntl::{openat, OFlag};
    use std::os::fd::FromRawFd;
    nix::unistd::mkfifoat(Some(dir), name, Mode::from_bits_truncate(mode & 0o777))?;
    let raw = openat(
        Some(dir),
        name,
        OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let st = fstat(fd.as_raw_fd())?;
    let me = nix::unistd::geteuid().as_raw();
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFIFO || st.st_uid != me {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} was replaced between mkfifo and open"),
        ));
    }
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode & 0o777))?;
    if let Some(uid) = owner.filter(|&u| u != me) {
        nix::unistd::fchown(fd.as_raw_fd(), Some(nix::unistd::Uid::from_raw(uid)), None)?;
    }
    Ok(fd)
}

fn fd_is_fifo(fd: RawFd) -> io::Result<bool> {
    let st = fstat(fd)?;
    Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFIFO)
}

/// Why a client's reply FIFO could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("{0} does not exist")]
    Missing(String),
    #[error("{0} is a symlink; the broker never follows links")]
    Symlink(String),
    #[error("{0} is not a FIFO; the broker only writes to FIFOs")]
    NotFifo(String),
    #[error("{0} is inside the bus directory; a reply FIFO must be the client's own")]
    InsideBus(String),
    #[error("{0} is a FIFO the broker itself holds (hello, or a client's send or recv)")]
    BrokerFifo(String),
    #[error("nobody opened {0} for reading within {1:?}")]
    NoReader(String, Duration),
    #[error("cannot open {0}: {1}")]
    Io(String, io::Error),
}

impl ReplyError {
    /// Whether answering on this reply would write into a FIFO of the
    /// broker's own (another client's `recv`, `hello`): such a HELLO is
    /// refused without a word, since the answer itself is the attack.
    pub fn is_injection(&self) -> bool {
        matches!(self, ReplyError::InsideBus(_) | ReplyError::BrokerFifo(_))
    }
}

/// What the `fstat` of a reply FIFO said, before it was opened for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyInfo {
    /// The FIFO's owner: the client's identity (only that user, or root,
    /// can have made a FIFO owned by that user).
    pub uid: u32,
    pub dev: u64,
    pub ino: u64,
}

impl ReplyInfo {
    pub fn id(&self) -> FileId {
        FileId {
            dev: self.dev,
            ino: self.ino,
        }
    }
}

/// What a reply FIFO must not be. Both checks are on identities
/// (device, inode), not on path strings, so a symlinked parent, a bind
/// mount or a hard link elsewhere does not get around them.
pub struct ReplyGuard<'a> {
    /// The bus directory: a reply anywhere under it is refused. This covers
    /// FIFOs the broker does not (yet) hold: a client's FIFOs between their
    /// creation and its registration, `hello`'s temporary name.
    pub bus_dir: FileId,
    /// Whether the broker holds this FIFO (`hello`, a client's `send` or
    /// `recv`), wherever it is linked.
    pub held: &'a (dyn Fn(FileId) -> bool + Send + Sync),
}

fn open_path(dir: Option<RawFd>, path: &Path, flags: nix::fcntl::OFlag) -> nix::Result<OwnedFd> {
    use nix::fcntl::{openat, OFlag};
    use std::os::fd::FromRawFd;
    let raw = openat(
        dir,
        path,
        flags | OFlag::O_PATH | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Whether the directory `dir` is `ancestor` or lies under it: walks `..`
/// from the directory itself (not from a path string) up to the root, where
/// `..` is the directory itself. A directory we may not search on the way
/// up is an error, not a "no": the caller refuses what it cannot check.
fn is_under(dir: OwnedFd, ancestor: FileId) -> io::Result<bool> {
    use nix::fcntl::OFlag;
    let mut cur = dir;
    let mut id = FileId::of_fd(cur.as_raw_fd())?;
    // PATH_MAX bounds the depth of anything a path can name.
    for _ in 0..libc::PATH_MAX {
        if id == ancestor {
            return Ok(true);
        }
        let up = open_path(Some(cur.as_raw_fd()), Path::new(".."), OFlag::O_DIRECTORY)?;
        let up_id = FileId::of_fd(up.as_raw_fd())?;
        if up_id == id {
            return Ok(false);
        }
        cur = up;
        id = up_id;
    }
    Ok(false)
}

/// Opens a client's reply FIFO for writing, safely (see the module docs),
/// after checking it against `guard`: [`check_reply`], then
/// [`CheckedReply::open`] waiting at most `timeout` for a reader.
///
/// # Errors
/// [`ReplyError`] saying which check failed.
pub async fn open_reply(
    path: &Path,
    timeout: Duration,
    guard: &ReplyGuard<'_>,
) -> Result<(pipe::Sender, ReplyInfo), ReplyError> {
    check_reply(path, guard)?
        .open(Instant::now(), || timeout)
        .await
}

/// A reply FIFO that passed every check, held by an `O_PATH` descriptor
/// (nothing else: a pending handshake costs one descriptor), not yet open
/// for writing.
#[derive(Debug)]
pub struct CheckedReply {
    handle: OwnedFd,
    info: ReplyInfo,
    shown: String,
}

/// Checks a client's reply FIFO (see the module docs) against `guard`
/// without opening it for writing, so the caller knows which FIFO it is
/// (its identity, its owner) before deciding to wait for it. Never waits.
///
/// # Errors
/// [`ReplyError`] saying which check failed.
pub fn check_reply(path: &Path, guard: &ReplyGuard<'_>) -> Result<CheckedReply, ReplyError> {
    use nix::fcntl::OFlag;
    let shown = || path.display().to_string();
    let io = |e: Errno| ReplyError::Io(shown(), e.into());
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(ReplyError::NotFifo(shown()));
    };
    // The parent is pinned first and the FIFO opened relative to it, so the
    // directory walked below is the one the FIFO was found in. Links in the
    // parent's path are followed (a client's temp dir may be reached through
    // one); the last component never is.
    let parent = match open_path(None, parent, OFlag::O_DIRECTORY) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ENOTDIR) => return Err(ReplyError::Missing(shown())),
        Err(e) => return Err(io(e)),
    };
    let handle = match open_path(Some(parent.as_raw_fd()), Path::new(name), OFlag::O_NOFOLLOW) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Err(ReplyError::Missing(shown())),
        Err(e) => return Err(io(e)),
    };
    let st = fstat(handle.as_raw_fd()).map_err(io)?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFLNK {
        return Err(ReplyError::Symlink(shown()));
    }
    if kind != SFlag::S_IFIFO {
        return Err(ReplyError::NotFifo(shown()));
    }
    let info = ReplyInfo {
        uid: st.st_uid,
        dev: st.st_dev,
        ino: st.st_ino,
    };
    if (guard.held)(info.id()) {
        return Err(ReplyError::BrokerFifo(shown()));
    }
    match is_under(parent, guard.bus_dir) {
        Ok(false) => {}
        Ok(true) => return Err(ReplyError::InsideBus(shown())),
        Err(e) => return Err(ReplyError::Io(shown(), e)),
    }
    Ok(CheckedReply {
        handle,
        info,
        shown: shown(),
    })
}

impl CheckedReply {
    pub fn info(&self) -> ReplyInfo {
        self.info
    }

    /// One attempt to open the checked FIFO for writing: `Ok(None)` when it
    /// has no reader yet (`ENXIO`).
    ///
    /// # Errors
    /// [`ReplyError::Io`] for any other failure.
    pub fn try_open(&self) -> Result<Option<(pipe::Sender, ReplyInfo)>, ReplyError> {
        let via = PathBuf::from(format!("/proc/self/fd/{}", self.handle.as_raw_fd()));
        // `O_WRONLY | O_NONBLOCK` (std adds `O_CLOEXEC`); no `O_NOFOLLOW`:
        // the `/proc/self/fd` entry is a magic link to the checked FIFO.
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&via)
        {
            Ok(file) => {
                let tx = pipe::Sender::from_owned_fd_unchecked(OwnedFd::from(file))
                    .map_err(|e| ReplyError::Io(self.shown.clone(), e))?;
                Ok(Some((tx, self.info)))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            Err(e) => Err(ReplyError::Io(self.shown.clone(), e)),
        }
    }

    /// The error for a reply nobody opened for reading within `waited`.
    pub fn no_reader(&self, waited: Duration) -> ReplyError {
        ReplyError::NoReader(self.shown.clone(), waited)
    }

    /// Opens the checked FIFO for writing. `ENXIO` means the client has not
    /// opened it for reading yet: plain shell clients write HELLO first and
    /// open the reply afterwards, so retry with a short backoff until
    /// `started + wait()`. `wait` is asked again at every retry, so a
    /// caller may shorten it while this waits (the rendezvous does as its
    /// table of pending handshakes fills); the deadline is then noticed
    /// within one backoff step (at most 50 ms). The wait never grows back:
    /// the shortest answer so far holds. This only runs while a
    /// handshake is pending, never while the broker is idle.
    ///
    /// # Errors
    /// [`ReplyError::NoReader`] when the deadline passes, `Io` otherwise.
    pub async fn open(
        &self,
        started: Instant,
        wait: impl Fn() -> Duration,
    ) -> Result<(pipe::Sender, ReplyInfo), ReplyError> {
        let mut backoff = Duration::from_millis(1);
        let mut shortest = Duration::MAX;
        loop {
            if let Some(opened) = self.try_open()? {
                return Ok(opened);
            }
            let now = Instant::now();
            shortest = shortest.min(wait());
            let wait = shortest;
            let deadline = started + wait;
            if now >= deadline {
                return Err(self.no_reader(wait));
            }
            // The last try is at the deadline itself: a client that opens
            // its reply within the wait is never refused.
            tokio::time::sleep_until((now + backoff).min(deadline)).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }
}

/// Writes one short line (under `PIPE_BUF`, so it is atomic) to a pipe,
/// waiting for room until `timeout`.
///
/// # Errors
/// `TimedOut` if the pipe stayed full; `BrokenPipe` if the reader left.
pub async fn write_line(tx: &pipe::Sender, line: &[u8], timeout: Duration) -> io::Result<()> {
    tokio::time::timeout(timeout, async {
        let mut rest = line;
        while !rest.is_empty() {
            tx.writable().await?;
            match tx.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "pipe stayed full"))?
}

/// Asks for a pipe buffer of `size` bytes (F_SETPIPE_SZ) and returns the
/// size the pipe really has. The kernel charges pipe buffers to the user
/// that opened the pipe first, and once that user's pipe buffers pass
/// `fs.pipe-user-pages-soft` it refuses to grow a pipe (unless the process
/// has `CAP_SYS_RESOURCE`); it refuses to shrink one below what it holds
/// unread. Either way the pipe keeps its size, which is what this returns:
/// compare it with `size` to know which happened.
///
/// # Errors
/// When `fcntl` fails for another reason than the budget or unread bytes.
pub fn set_pipe_size(fd: RawFd, size: usize) -> io::Result<usize> {
    use nix::fcntl::{fcntl, FcntlArg};
    let size = i32::try_from(size).unwrap_or(i32::MAX);
    match fcntl(fd, FcntlArg::F_SETPIPE_SZ(size)) {
        Ok(n) => Ok(n as usize),
        // Over the user's budget (EPERM), over pipe-max-size (EINVAL), or
        // shrinking below the unread bytes (EBUSY): keep what we have.
        Err(Errno::EPERM | Errno::EINVAL | Errno::EBUSY) => {
            Ok(fcntl(fd, FcntlArg::F_GETPIPE_SZ)? as usize)
        }
        Err(e) => Err(e.into()),
    }
}

/// The smallest pipe buffer `F_SETPIPE_SZ` gives: one page. What a quiet
/// client's FIFOs are kept at, so that an idle client costs the user's pipe
/// budget two pages rather than the default 32.
pub fn min_pipe_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096)
}

/// One plain `read(2)` into the spare capacity of `buf` (reserve first);
/// returns how many bytes it appended. For callers outside tokio's
/// readiness tracking: the blocking client, and a session's final drain.
///
/// # Errors
/// The `read(2)` error, `WouldBlock` included.
pub fn read_into(fd: RawFd, buf: &mut bytes::BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: read(2) writes at most spare.len() bytes into this
    // (uninitialised) memory and reports how many it wrote.
    let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: read(2) initialised the first n bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

/// Bytes written to this pipe that no reader has taken yet (`FIONREAD`).
pub fn unread_bytes(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer we pass.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nothing_held(_: FileId) -> bool {
        false
    }

    /// A guard for a bus directory that is not on the way to any test path.
    fn elsewhere() -> ReplyGuard<'static> {
        ReplyGuard {
            bus_dir: FileId { dev: 0, ino: 0 },
            held: &nothing_held,
        }
    }

    #[tokio::test]
    async fn reply_checks_refuse_links_files_and_absence() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        make(&fifo, 0o600).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let t = Duration::from_millis(20);
        assert!(matches!(
            open_reply(&link, t, &elsewhere()).await,
            Err(ReplyError::Symlink(_))
        ));
        assert!(matches!(
            open_reply(&file, t, &elsewhere()).await,
            Err(ReplyError::NotFifo(_))
        ));
        assert!(matches!(
            open_reply(Path::new("/dev/null"), t, &elsewhere()).await,
            Err(ReplyError::NotFifo(_))
        ));
        assert!(matches!(
            open_reply(&dir.path().join("none"), t, &elsewhere()).await,
            Err(ReplyError::Missing(_))
        ));
        assert!(matches!(
            open_reply(&fifo, t, &elsewhere()).await,
            Err(ReplyError::NoReader(..))
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    #[tokio::test]
    async fn reply_opens_once_a_reader_exists() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        make(&fifo, 0o600).unwrap();
        let rx = open_resilient_rx(&fifo).unwrap();
        let (tx, info) = open_reply(&fifo, Duration::from_secs(1), &elsewhere())
            .await
            .unwrap();
        assert_eq!(info.uid, nix::unistd::geteuid().as_raw());
        write_line(&tx, b"hi\n", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(unread_bytes(rx.as_raw_fd()).unwrap(), 3);
    }

    #[tokio::test]
    async fn reply_inside_the_bus_or_held_is_refused_before_opening() {
        let bus = tempfile::tempdir().unwrap();
        let sub = bus.path().join("clients/x");
        std::fs::create_dir_all(&sub).unwrap();
        let inside = sub.join("recv");
        make(&inside, 0o600).unwrap();
        let _rx = open_resilient_rx(&inside).unwrap();
        let bus_id = FileId::of(&nix::sys::stat::stat(bus.path()).unwrap());
        let guard = ReplyGuard {
            bus_dir: bus_id,
            held: &nothing_held,
        };
        let t = Duration::from_millis(20);
        assert!(matches!(
            open_reply(&inside, t, &guard).await,
            Err(ReplyError::InsideBus(_))
        ));
        // A hard link outside the bus is still the same FIFO.
        let other = tempfile::tempdir().unwrap();
        let link = other.path().join("recv");
        std::fs::hard_link(&inside, &link).unwrap();
        let held_id = FileId::of(&nix::sys::stat::stat(&inside).unwrap());
        let held = move |id: FileId| id == held_id;
        let guard = ReplyGuard {
            bus_dir: bus_id,
            held: &held,
        };
        assert!(matches!(
            open_reply(&link, t, &guard).await,
            Err(ReplyError::BrokerFifo(_))
        ));
    }
}
