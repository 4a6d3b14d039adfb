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
    #[error("nobody opened {0} for reading within {1:?}")]
    NoReader(String, Duration),
    #[error("cannot open {0}: {1}")]
    Io(String, io::Error),
}

/// Opens a client's reply FIFO for writing, safely (see the module docs).
/// `ENXIO` means the client has not opened it for reading yet: plain shell
/// clients write HELLO first and open the reply afterwards, so retry with a
/// short backoff until `timeout`. This only runs while a handshake is
/// pending, never while the broker is idle.
///
/// # Errors
/// [`ReplyError`] saying which check failed.
pub async fn open_reply(path: &Path, timeout: Duration) -> Result<pipe::Sender, ReplyError> {
    let shown = || path.display().to_string();
    // `O_PATH | O_NOFOLLOW` (std adds `O_CLOEXEC`). std insists on an access
    // mode; `read(true)` is `O_RDONLY`, which is 0 and which `O_PATH` ignores.
    let handle = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => OwnedFd::from(file),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return Err(ReplyError::Missing(shown()))
        }
        Err(e) => return Err(ReplyError::Io(shown(), e)),
    };
    let st = fstat(handle.as_raw_fd()).map_err(|e| ReplyError::Io(shown(), e.into()))?;
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFLNK {
        return Err(ReplyError::Symlink(shown()));
    }
    if kind != SFlag::S_IFIFO {
        return Err(ReplyError::NotFifo(shown()));
    }
    let via = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        // `O_WRONLY | O_NONBLOCK` (std adds `O_CLOEXEC`); no `O_NOFOLLOW`:
        // the `/proc/self/fd` entry is a magic link to the checked FIFO.
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&via)
        {
            Ok(file) => {
                return pipe::Sender::from_owned_fd_unchecked(OwnedFd::from(file))
                    .map_err(|e| ReplyError::Io(shown(), e));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(ReplyError::NoReader(shown(), timeout));
                }
                // The last try is at the deadline itself: a client that
                // opens its reply within the timeout is never refused.
                tokio::time::sleep_until((now + backoff).min(deadline)).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(ReplyError::Io(shown(), e)),
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
/// size the pipe really has. Linux gives a new pipe one page instead of the
/// default 16 once the user's pipe buffers pass `fs.pipe-user-pages-soft`,
/// and then refuses to grow it: the returned size says which happened.
///
/// # Errors
/// When `fcntl` fails for another reason than the budget.
pub fn set_pipe_size(fd: RawFd, size: usize) -> io::Result<usize> {
    use nix::fcntl::{fcntl, FcntlArg};
    let size = i32::try_from(size).unwrap_or(i32::MAX);
    match fcntl(fd, FcntlArg::F_SETPIPE_SZ(size)) {
        Ok(n) => Ok(n as usize),
        // Over the user's budget (EPERM) or over pipe-max-size: keep what we have.
        Err(Errno::EPERM | Errno::EINVAL) => Ok(fcntl(fd, FcntlArg::F_GETPIPE_SZ)? as usize),
        Err(e) => Err(e.into()),
    }
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
            open_reply(&link, t).await,
            Err(ReplyError::Symlink(_))
        ));
        assert!(matches!(
            open_reply(&file, t).await,
            Err(ReplyError::NotFifo(_))
        ));
        assert!(matches!(
            open_reply(Path::new("/dev/null"), t).await,
            Err(ReplyError::NotFifo(_))
        ));
        assert!(matches!(
            open_reply(&dir.path().join("none"), t).await,
            Err(ReplyError::Missing(_))
        ));
        assert!(matches!(
            open_reply(&fifo, t).await,
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
        let tx = open_reply(&fifo, Duration::from_secs(1)).await.unwrap();
        write_line(&tx, b"hi\n", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(unread_bytes(rx.as_raw_fd()).unwrap(), 3);
    }
}
