//! A client of the bus, as any program would write one: plain blocking-ish
//! file I/O on the FIFOs, no async runtime. The `connect`, `pub` and `sub`
//! subcommands use it, and so do the integration tests.
//!
//! Waits have deadlines: opening `hello` is non-blocking (`ENOENT` or `ENXIO`
//! means no broker), and every read and write goes through `poll(2)` with a
//! timeout, so a missing or stuck broker is reported instead of hanging.
//!
//! Nothing is said to a bus before its owner is known: anyone can make a
//! directory named like someone else's bus, or a FIFO named `hello`, and
//! read the HELLO lines (reply path, name, pid, patterns) written into it.
//! So the bus directory and `hello` must belong to the caller, to root (the
//! system bus) or to a bus owner the caller named, and `hello` is opened
//! relative to the directory, without following links, and checked again
//! after opening ([`open_hello`]).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, AtFlags, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::protocol::hello::MAX_HELLO_LINE;
use crate::protocol::{encode_ping, encode_pub, Command, EncodeError, ErrorCode, Hello, Reply};
use crate::topic::{Pattern, Topic};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no broker is running on {0} ({1}); start one with: fifobus serve --dir {0}")]
    NoBroker(String, &'static str),
    /// The bus directory or `hello` (or a symbolic link leading to the bus
    /// directory) belongs to a user the caller does not trust.
    #[error("{}", untrusted_message(path, *owner, *me, *named))]
    Untrusted {
        path: PathBuf,
        owner: u32,
        me: u32,
        named: Option<u32>,
    },
    /// `hello` is not a FIFO (a symbolic link, a file...): no broker made it.
    #[error("{}/hello is {kind}, not a FIFO: no broker made it; not sending HELLO (remove it, then start a broker: fifobus serve --dir {})", dir.display(), dir.display())]
    NotAFifo { dir: PathBuf, kind: &'static str },
    /// SIGINT or SIGTERM arrived during the handshake (with
    /// [`Handshake::catch_signals`]); the reply directory is already gone.
    /// The caller should die of the same signal: [`die_of`].
    #[error("interrupted by {0} during the handshake")]
    Interrupted(Signal),
    #[error("the broker refused: {code} {text}")]
    Refused { code: String, text: String },
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the broker closed the connection")]
    Closed,
    #[error("unexpected reply from the broker: {0}")]
    Unexpected(String),
    /// The client directory, or a FIFO in it, is gone: the broker ended
    /// this client (its teardown removes the directory before closing the
    /// FIFOs), a broker that came back did not take it over, or someone
    /// removed it. Nothing can continue there.
    #[error("client directory {0} is gone: the broker ended this client, did not take it back after a restart, or the directory was removed; connect again")]
    Gone(PathBuf),
    /// Something other than the FIFO the broker gave this client is at its
    /// path now; it is not opened.
    #[error("{path} is not the FIFO the broker gave this client any more ({what}); not reconnecting to it (connect again)")]
    Changed { path: PathBuf, what: String },
    /// No broker served the client directory again within the wait.
    #[error("no broker took client directory {dir} back within {waited:?}; start one (fifobus serve --dir <bus directory>) or give a longer --reconnect-timeout")]
    NotBack { dir: PathBuf, waited: Duration },
    /// Refused before sending: the broker would not read it back as given.
    #[error("cannot send this: {0}")]
    Encode(#[from] EncodeError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ClientError {
    /// The protocol error code, for refusals.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => ErrorCode::parse(code),
            _ => None,
        }
    }
}

fn untrusted_message(path: &Path, owner: u32, me: u32, named: Option<u32>) -> String {
    let trusted = match named {
        Some(n) if n != me && n != 0 => {
            format!("not to you (uid {me}), root or the bus owner you named (uid {n})")
        }
        _ if me == 0 => "not to you (root)".to_owned(),
        _ => format!("not to you (uid {me}) or root"),
    };
    format!(
        "{} belongs to uid {owner}, {trusted}: someone else may be impersonating the broker; not sending HELLO (use --bus-owner {owner} if you trust that user)",
        path.display()
    )
}

#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub name: Option<String>,
    pub pid: Option<i32>,
    pub subs: Vec<Pattern>,
}

/// How [`Client::connect_with`] guards the handshake, beyond
/// [`Client::connect`]'s defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct Handshake {
    /// Also trust a bus directory and `hello` owned by this uid (besides
    /// the caller's own and root's): `--bus-owner`, `FIFOBUS_OWNER`.
    pub bus_owner: Option<u32>,
    /// Catch SIGINT and SIGTERM during the handshake, so that the reply
    /// directory is removed before the process dies of them: the handshake
    /// returns [`ClientError::Interrupted`] and the caller calls [`die_of`].
    /// Only signals left at their default action are caught (a shell's
    /// `trap '' INT` or a background job's ignored SIGINT stay as they
    /// are). Uses a signalfd with the signals blocked in the calling thread,
    /// so it is for single-threaded programs such as the `fifobus` commands:
    /// in a multi-threaded process another thread may take the signal.
    pub catch_signals: bool,
    /// Send `echo=no`: the broker does not deliver this client's own `PUB`s
    /// back to it. Kept by the broker for the client's whole life (across a
    /// broker restart too), so it belongs to the handshake, not to a command.
    pub no_echo: bool,
}

/// Buffered line reading from a non-blocking descriptor, with deadlines.
struct LineReader {
    fd: OwnedFd,
    /// Bytes read but not yet returned as lines. `BytesMut` so that taking
    /// a line off the front is O(1), not a move of everything behind it.
    buf: bytes::BytesMut,
    eof: bool,
}

impl LineReader {
    fn new(fd: OwnedFd) -> Self {
        LineReader {
            fd,
            buf: bytes::BytesMut::new(),
            eof: false,
        }
    }

    /// A complete line already buffered, without its newline.
    fn buffered_line(&mut self) -> Option<Vec<u8>> {
        let i = memchr::memchr(b'\n', &self.buf)?;
        let line = self.buf.split_to(i + 1);
        Some(line[..i].to_vec())
    }

    /// Reads what is available now. After EOF, [`LineReader::at_eof`] is
    /// true, but lines read before it are still buffered: take them first.
    fn fill(&mut self) -> io::Result<()> {
        const CHUNK: usize = 64 * 1024;
        loop {
            self.buf.reserve(CHUNK);
            let result = crate::fifo::read_into(self.fd.as_raw_fd(), &mut self.buf);
            match result {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) if n < CHUNK => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// EOF was seen: the broker closed its end. Buffered lines may remain.
    fn at_eof(&self) -> bool {
        self.eof
    }

    /// Bytes of an incomplete last line (meaningful once at EOF).
    fn partial(&self) -> &[u8] {
        &self.buf
    }

    /// The next line, waiting until `deadline` (None: forever). `Ok(None)`
    /// is EOF once every buffered line has been returned.
    fn read_line(&mut self, deadline: Option<Instant>) -> Result<Option<Vec<u8>>, ClientError> {
        self.read_line_or(deadline, None)
    }

    /// [`LineReader::read_line`], ending early when `interrupt` (a signalfd)
    /// becomes readable.
    fn read_line_or(
        &mut self,
        deadline: Option<Instant>,
        interrupt: Option<&SignalFd>,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        loop {
            if let Some(line) = self.buffered_line() {
                return Ok(Some(line));
            }
            if self.eof {
                return Ok(None);
            }
            wait_fd(self.fd.as_fd(), PollFlags::POLLIN, deadline, interrupt)?;
            self.fill()?;
        }
    }
}

/// Waits until `fd` is ready for `events` or `deadline` passes. With
/// `interrupt` (a signalfd), a signal read from it ends the wait with
/// [`ClientError::Interrupted`].
fn wait_fd(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Option<Instant>,
    interrupt: Option<&SignalFd>,
) -> Result<(), ClientError> {
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(fd, events)];
        let mut with_signals;
        let fds: &mut [PollFd] = match interrupt {
            None => &mut fds,
            Some(sfd) => {
                with_signals = [fds[0], PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
                &mut with_signals
            }
        };
        match poll(fds, timeout) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(ClientError::Timeout(Duration::ZERO));
                }
            }
            Ok(_) => {
                if let Some(sfd) = interrupt {
                    if let Some(info) = sfd.read_signal().map_err(io::Error::from)? {
                        let sig =
                            Signal::try_from(info.ssi_signo as i32).map_err(io::Error::from)?;
                        return Err(ClientError::Interrupted(sig));
                    }
                }
                if fds[0].any().unwrap_or(false) {
                    return Ok(());
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
}

/// Opens a directory as `O_PATH`, not following a link at its last
/// component.
fn open_path_dir(path: &Path) -> nix::Result<OwnedFd> {
    let raw = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `raw` was just returned by open and is owned by nothing else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// Opens `path` with `O_NONBLOCK` and either `O_WRONLY` or `O_RDONLY` (std
/// adds `O_CLOEXEC`).
fn open_nonblocking(path: &Path, write: bool) -> io::Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map(OwnedFd::from)
}

fn set_blocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A connected client.
pub struct Client {
    id: String,
    dir: PathBuf,
    send: File,
    recv: LineReader,
    /// What the broker gave us at the handshake, so that after a broker
    /// restart only those very FIFOs are opened again.
    given: Given,
}

/// The identity (device, inode) and owner of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdent {
    dev: u64,
    ino: u64,
    uid: u32,
}

impl FileIdent {
    fn of(st: &FileStat) -> FileIdent {
        FileIdent {
            dev: st.st_dev,
            ino: st.st_ino,
            uid: st.st_uid,
        }
    }
}

/// The client directory and its FIFOs as the handshake found them.
#[derive(Debug, Clone, Copy)]
struct Given {
    dir_uid: u32,
    send: FileIdent,
    recv: FileIdent,
}

/// How often [`Client::wait_for_broker`] looks again even without an
/// inotify event (when the watch could not be added, or an event was
/// missed): a safety net, not the way the broker's return is noticed.
const REPROBE_EVERY: Duration = Duration::from_secs(1);

impl Client {
    /// Performs the handshake on `bus_dir/hello` and opens the client's FIFOs,
    /// if the bus belongs to the caller or to root.
    ///
    /// # Errors
    /// [`ClientError::NoBroker`] within milliseconds when no broker runs;
    /// [`ClientError::Untrusted`] or [`ClientError::NotAFifo`] at once for
    /// a bus directory or `hello` someone else made;
    /// [`ClientError::Refused`] with the broker's `ERR`; `Timeout`.
    pub fn connect(
        bus_dir: &Path,
        opts: &ConnectOptions,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        Self::connect_with(bus_dir, opts, timeout, &Handshake::default())
    }

    /// [`Client::connect`], trusting `guard.bus_owner` too, and catching
    /// SIGINT/SIGTERM when `guard.catch_signals` says so.
    ///
    /// # Errors
    /// As [`Client::connect`]; [`ClientError::Untrusted`] or
    /// [`ClientError::NotAFifo`] at once, before anything is written, for a
    /// bus someone else may have set up; [`ClientError::Interrupted`].
    pub fn connect_with(
        bus_dir: &Path,
        opts: &ConnectOptions,
        timeout: Duration,
        guard: &Handshake,
    ) -> Result<Client, ClientError> {
        let deadline = Instant::now() + timeout;
        let trust = Trust {
            me: nix::unistd::geteuid().as_raw(),
            named: guard.bus_owner,
        };
        let hello = open_hello(bus_dir, &trust)?;
        // Installed before the reply directory exists, so that from then on
        // SIGINT/SIGTERM remove it first.
        let signals = if guard.catch_signals {
            SignalGuard::install()?
        } else {
            None
        };
        let interrupt = signals.as_ref().map(|g| &g.fd);
        let reply_dir = reply_dir()?;
        let reply_path = reply_dir.path().join("reply");
        nix::unistd::mkfifo(&reply_path, Mode::from_bits_truncate(0o600))
            .map_err(io::Error::from)?;
        // Open our end first, so the broker's open for writing succeeds at once.
        let mut reply = LineReader::new(open_nonblocking(&reply_path, false)?);
        let line = Hello {
            reply: reply_path,
            name: opts.name.clone(),
            pid: opts.pid,
            subs: opts.subs.clone(),
            no_echo: guard.no_echo,
        }
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if line.len() > MAX_HELLO_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the HELLO line is {} bytes, the limit is {MAX_HELLO_LINE}; subscribe fewer patterns at first and send SUB for the rest", line.len()),
            )
            .into());
        }
        // Under PIPE_BUF, so one write is atomic: all or nothing. Under
        // contention POLLOUT may be stale by the time we write: EAGAIN means
        // wait again, until the deadline.
        loop {
            wait_fd(hello.as_fd(), PollFlags::POLLOUT, Some(deadline), interrupt)
                .map_err(|e| with_timeout(e, timeout))?;
            match nix::unistd::write(&hello, &line) {
                Ok(_) => break,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
        let answer = reply
            .read_line_or(Some(deadline), interrupt)
            .map_err(|e| with_timeout(e, timeout))?
            .ok_or(ClientError::Closed)?;
        // The reply directory goes before the signals are let through again:
        // one that arrived since the last poll kills us with nothing left.
        drop(reply);
        drop(reply_dir);
        drop(signals);
        let (id, dir) = match Reply::parse(&answer) {
            Reply::Welcome { id, dir } => (id.to_owned(), dir.to_owned()),
            Reply::Err { code, text } => {
                return Err(ClientError::Refused {
                    code: code.to_owned(),
                    text: text.to_owned(),
                })
            }
            _ => {
                return Err(ClientError::Unexpected(
                    String::from_utf8_lossy(&answer).into_owned(),
                ))
            }
        };
        // The broker holds both FIFOs open, so neither open can block.
        let (send_path, recv_path) = (dir.join("send"), dir.join("recv"));
        let send =
            open_nonblocking(&send_path, true).map_err(|e| at_path(e, "open", &send_path))?;
        set_blocking(&send)?;
        let recv =
            open_nonblocking(&recv_path, false).map_err(|e| at_path(e, "open", &recv_path))?;
        let fst = |fd: &OwnedFd, path: &Path| {
            nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| at_path(e, "stat", path))
        };
        let dir_st = nix::sys::stat::stat(&dir).map_err(|e| at_path(e, "stat", &dir))?;
        let given = Given {
            dir_uid: dir_st.st_uid,
            send: FileIdent::of(&fst(&send, &send_path)?),
            recv: FileIdent::of(&fst(&recv, &recv_path)?),
        };
        Ok(Client {
            id,
            dir,
            send: File::from(send),
            recv: LineReader::new(recv),
            given,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The client directory, holding `send` and `recv`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sends raw protocol bytes (one or more lines, with newlines).
    ///
    /// # Errors
    /// `BrokenPipe` when the broker has gone.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.send.write_all(bytes)
    }

    /// Writes what `send` takes of `bytes` in one `write(2)` (blocking):
    /// for callers that must know how much went out before the broker left
    /// (`EPIPE`), to send the rest once it is back.
    ///
    /// # Errors
    /// `BrokenPipe` when the broker has gone.
    pub fn write_some(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.send.write(bytes)
    }

    /// After EOF on `recv` or `EPIPE` on `send`: whether the broker went
    /// away leaving this client's directory and FIFOs in place (it crashed,
    /// or was killed), so that a broker coming back may serve them again.
    /// `false` when the client was ended: the broker removes the directory
    /// before it closes the FIFOs, so EOF after an ending finds it gone.
    pub fn broker_away(&self) -> bool {
        self.probe_files().is_ok()
    }

    /// Waits until a broker serves this client's directory again (a broker
    /// restarted on the bus takes over the client directories of live
    /// clients and opens their FIFOs), then continues on the same FIFOs.
    ///
    /// The broker's return shows in the FIFOs themselves: it holds both
    /// open, so `send` can be opened for writing without blocking (no
    /// reader gives `ENXIO`), and a read of `recv` finds data or `EAGAIN`
    /// instead of EOF. An inotify watch on the directory wakes the wait when
    /// anything there is opened, removed or renamed; without a broker,
    /// nothing is written. Before anything is opened, the directory and
    /// both FIFOs are checked to be what the handshake gave (FIFOs, same
    /// owners), opened relative to the directory without following links,
    /// and checked again once open. `recv` is kept open throughout when it
    /// is the same FIFO, so the lines in it are not lost.
    ///
    /// Call it after EOF on `recv` once every buffered line was taken, or
    /// after `EPIPE` on `send`.
    ///
    /// # Errors
    /// [`ClientError::Gone`] when the directory or a FIFO is removed (no
    /// broker can serve it again); [`ClientError::Changed`] when something
    /// else took a FIFO's place; [`ClientError::NotBack`] after `timeout`.
    pub fn wait_for_broker(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        // Added before the first look, so nothing that happens after it
        // goes unnoticed. Without it (the watch limit), the periodic look
        // still finds the broker.
        let watch = nix::sys::inotify::Inotify::init(
            nix::sys::inotify::InitFlags::IN_NONBLOCK | nix::sys::inotify::InitFlags::IN_CLOEXEC,
        )
        .ok()
        .filter(|i| {
            use nix::sys::inotify::AddWatchFlags as W;
            i.add_watch(
                &self.dir,
                W::IN_OPEN
                    | W::IN_ATTRIB
                    | W::IN_CREATE
                    | W::IN_DELETE
                    | W::IN_MOVED_FROM
                    | W::IN_MOVED_TO
                    | W::IN_DELETE_SELF
                    | W::IN_MOVE_SELF
                    | W::IN_DONT_FOLLOW
                    | W::IN_ONLYDIR,
            )
            .is_ok()
        });
        // What followed the last newline before EOF is a line the broker
        // never finished: among what the crash lost (the broker that takes
        // over says so first, `DROPPED ? restart`). Kept, it would be glued
        // to the front of that line.
        match memchr::memrchr(b'\n', &self.recv.buf) {
            Some(i) => self.recv.buf.truncate(i + 1),
            None => self.recv.buf.clear(),
        }
        // `send`, once it opens, is held across looks: every open of ours
        // is an inotify event that would wake this wait again.
        let mut send = None;
        loop {
            if self.try_resume(&mut send)? {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::NotBack {
                    dir: self.dir.clone(),
                    waited: timeout,
                });
            }
            let wait = (deadline - now).min(REPROBE_EVERY);
            let wait = PollTimeout::try_from(wait.as_millis() as i32).unwrap_or(PollTimeout::MAX);
            match &watch {
                Some(i) => {
                    let mut fds = [PollFd::new(i.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, wait) {
                        // Drained so the next poll waits for new events.
                        Ok(n) if n > 0 => {
                            while matches!(i.read_events(), Ok(ev) if !ev.is_empty()) {}
                        }
                        Ok(_) | Err(Errno::EINTR) => {}
                        Err(e) => return Err(io::Error::from(e).into()),
                    }
                }
                None => match poll(&mut [], wait) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(io::Error::from(e).into()),
                },
            }
        }
    }

    /// Checks the directory and both FIFOs against what the handshake gave,
    /// without opening any FIFO. Returns the directory, opened `O_PATH`.
    fn probe_files(&self) -> Result<OwnedFd, ClientError> {
        let gone = || ClientError::Gone(self.dir.clone());
        let dir = match open_path_dir(&self.dir) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Err(gone()),
            Err(e) => return Err(at_path(e, "open", &self.dir)),
        };
        let st =
            nix::sys::stat::fstat(dir.as_raw_fd()).map_err(|e| at_path(e, "stat", &self.dir))?;
        if st.st_uid != self.given.dir_uid {
            return Err(ClientError::Changed {
                path: self.dir.clone(),
                what: format!(
                    "the directory now belongs to uid {}, not {}",
                    st.st_uid, self.given.dir_uid
                ),
            });
        }
        for (name, want) in [("send", self.given.send), ("recv", self.given.recv)] {
            match nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            {
                Ok(st) => self.check_fifo(name, &st, want)?,
                Err(Errno::ENOENT) => return Err(gone()),
                Err(e) => return Err(at_path(e, "stat", &self.dir.join(name))),
            }
        }
        Ok(dir)
    }

    /// A FIFO at `name` owned as the one the handshake gave (it may be
    /// another inode: then it is opened anew).
    fn check_fifo(&self, name: &str, st: &FileStat, want: FileIdent) -> Result<(), ClientError> {
        let path = self.dir.join(name);
        if file_type(st) != SFlag::S_IFIFO {
            return Err(ClientError::Changed {
                path,
                what: format!("it is {} now", type_name(st)),
            });
        }
        if st.st_uid != want.uid {
            return Err(ClientError::Changed {
                path,
                what: format!("it belongs to uid {} now, not {}", st.st_uid, want.uid),
            });
        }
        Ok(())
    }

    /// One look: `Ok(true)` once a broker holds both FIFOs again, with this
    /// client's descriptors switched to them. `send` keeps a `send` opened
    /// by an earlier look while it is still the FIFO at its path.
    fn try_resume(&mut self, send: &mut Option<OwnedFd>) -> Result<bool, ClientError> {
        let dir = self.probe_files()?;
        let open_checked = |name: &str,
                            flags: OFlag,
                            want: FileIdent|
         -> Result<Option<OwnedFd>, ClientError> {
            let flags =
                flags | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
            let raw = match nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags, Mode::empty()) {
                Ok(fd) => fd,
                // `send` has no reader: no broker yet.
                Err(Errno::ENXIO) => return Ok(None),
                Err(Errno::ENOENT) => return Err(ClientError::Gone(self.dir.clone())),
                Err(e) => return Err(at_path(e, "open", &self.dir.join(name))),
            };
            // SAFETY: `raw` was just returned by openat and is owned by
            // nothing else.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
            let st = nix::sys::stat::fstat(fd.as_raw_fd())
                .map_err(|e| at_path(e, "stat", &self.dir.join(name)))?;
            self.check_fifo(name, &st, want)?;
            Ok(Some(fd))
        };
        let send_st =
            nix::sys::stat::fstatat(Some(dir.as_raw_fd()), "send", AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| at_path(e, "stat", &self.dir.join("send")))?;
        let still = send.as_ref().is_some_and(|fd| {
            nix::sys::stat::fstat(fd.as_raw_fd())
                .is_ok_and(|st| (st.st_dev, st.st_ino) == (send_st.st_dev, send_st.st_ino))
        });
        if !still {
            *send = open_checked("send", OFlag::O_WRONLY, self.given.send)?;
        }
        let Some(opened) = send.as_ref() else {
            return Ok(false);
        };
        // `recv`: the same FIFO is read on through the descriptor already
        // held (what is in it stays readable); another one at its path is
        // opened, and the new one is read from now on.
        let st =
            nix::sys::stat::fstatat(Some(dir.as_raw_fd()), "recv", AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| at_path(e, "stat", &self.dir.join("recv")))?;
        let held = nix::sys::stat::fstat(self.recv.fd.as_raw_fd()).map_err(io::Error::from)?;
        if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino) {
            let Some(fd) = open_checked("recv", OFlag::O_RDONLY, self.given.recv)? else {
                return Ok(false);
            };
            self.recv = LineReader::new(fd);
        }
        // A read of `recv` says whether it has a writer again: EOF if not,
        // data or EAGAIN if so.
        self.recv.eof = false;
        self.recv.fill()?;
        if self.recv.eof {
            return Ok(false);
        }
        set_blocking(opened)?;
        self.send = File::from(send.take().expect("checked above"));
        Ok(true)
    }
    /// # Errors
    /// [`ClientError::Encode`] for a payload or token the broker could not
    /// read back as given (nothing is sent); `Io` when the broker has gone.
    pub fn send(&mut self, command: &Command) -> Result<(), ClientError> {
        let mut line = Vec::new();
        command.encode(&mut line)?;
        Ok(self.send_raw(&line)?)
    }

    /// Sends `PUB`, without copying the payload into a [`Command`].
    ///
    /// # Errors
    /// As [`Client::send`]: a payload holding a newline is refused.
    pub fn publish(&mut self, topic: &Topic, payload: &[u8]) -> Result<(), ClientError> {
        let mut line = Vec::new();
        encode_pub(&mut line, topic, payload)?;
        Ok(self.send_raw(&line)?)
    }

    /// # Errors
    /// `Io` when the broker has gone.
    pub fn subscribe(&mut self, pattern: &Pattern) -> Result<(), ClientError> {
        self.send(&Command::Sub(pattern.clone()))
    }

    /// # Errors
    /// `Io` when the broker has gone.
    pub fn unsubscribe(&mut self, pattern: &Pattern) -> Result<(), ClientError> {
        self.send(&Command::Unsub(pattern.clone()))
    }

    /// The next line from `recv`; `Ok(None)` at EOF (the broker closed it).
    ///
    /// # Errors
    /// [`ClientError::Timeout`] when nothing arrives within `timeout`.
    pub fn read_line(&mut self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, ClientError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.recv
            .read_line(deadline)
            .map_err(|e| with_timeout(e, timeout.unwrap_or_default()))
    }

    /// A line already read from `recv`, if any: for callers that poll
    /// [`Client::recv_fd`] themselves.
    pub fn buffered_line(&mut self) -> Option<Vec<u8>> {
        self.recv.buffered_line()
    }

    /// Reads what `recv` holds now, into the buffer [`Client::buffered_line`]
    /// takes lines from.
    ///
    /// # Errors
    /// I/O errors from `read`.
    pub fn fill(&mut self) -> io::Result<()> {
        self.recv.fill()
    }

    /// Whether `recv` reached EOF (the broker closed this client). Lines
    /// read before EOF may still be buffered.
    pub fn at_eof(&self) -> bool {
        self.recv.at_eof()
    }

    /// What is left after the last complete line: at EOF, an incomplete
    /// line the broker never finished.
    pub fn partial_line(&self) -> &[u8] {
        self.recv.partial()
    }

    pub fn recv_fd(&self) -> BorrowedFd<'_> {
        self.recv.fd.as_fd()
    }

    /// Sends `PING token` and collects every line that arrives before the
    /// matching `PONG`: when it returns, every earlier command took effect.
    ///
    /// # Errors
    /// `Timeout`, or `Closed` if the broker closed the connection first;
    /// `Encode` for a token `PONG` could not echo (empty, starting with a
    /// space, or holding a newline).
    pub fn ping(&mut self, token: &str, timeout: Duration) -> Result<Vec<Vec<u8>>, ClientError> {
        let mut line = Vec::new();
        encode_ping(&mut line, Some(token.as_bytes()))?;
        self.send_raw(&line)?;
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let line = self
                .recv
                .read_line(Some(deadline))
                .map_err(|e| with_timeout(e, timeout))?
                .ok_or(ClientError::Closed)?;
            if Reply::parse(&line) == Reply::Pong(Some(token.as_bytes())) {
                return Ok(before);
            }
            before.push(line);
        }
    }

    /// Says `BYE` and waits for the broker's `BYE` or EOF. Returns the lines
    /// that arrived in between.
    ///
    /// # Errors
    /// `Timeout` if the broker does not answer.
    pub fn bye(mut self, timeout: Duration) -> Result<Vec<Vec<u8>>, ClientError> {
        self.send(&Command::Bye)?;
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        while let Some(line) = self
            .recv
            .read_line(Some(deadline))
            .map_err(|e| with_timeout(e, timeout))?
        {
            if Reply::parse(&line) == Reply::Bye {
                break;
            }
            before.push(line);
        }
        Ok(before)
    }

    /// The client's FIFOs as plain blocking files, for code that does its
    /// own framing at full speed (`fifobus bench`). Returns (send, recv).
    ///
    /// # Errors
    /// When the descriptors cannot be switched to blocking mode.
    pub fn into_files(self) -> io::Result<(File, File)> {
        let recv = self.recv.fd;
        set_blocking(&recv)?;
        Ok((self.send, File::from(recv)))
    }

    /// Gives up this process's handles but leaves the client connected, for
    /// `fifobus connect`: another process takes over the directory.
    pub fn into_parts(self) -> (String, PathBuf) {
        (self.id, self.dir)
    }
}

/// A private directory for the reply FIFO: in `$XDG_RUNTIME_DIR` when set
/// (tmpfs, private to the user, cheap to create FIFOs in), else `$TMPDIR`,
/// else /tmp.
/// HELLO fields are separated by spaces, so a directory with a space in its
/// path cannot be used; fall back to /tmp.
fn reply_dir() -> io::Result<tempfile::TempDir> {
    let usable = |d: &tempfile::TempDir| {
        !d.path()
            .as_os_str()
            .as_bytes()
            .iter()
            .any(|&b| b == b' ' || b.is_ascii_control())
    };
    let mut b = tempfile::Builder::new();
    b.prefix("fifobus-reply-");
    // mkdir(2) with 0700 itself: never a moment with a wider mode (the
    // default, 0777 less the umask, let every user list it and see the
    // reply FIFO's name).
    b.permissions(std::fs::Permissions::from_mode(0o700));
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        if let Ok(d) = b.tempdir_in(runtime) {
            if usable(&d) {
                return Ok(d);
            }
        }
    }
    // A $TMPDIR this user cannot write (one inherited from another user,
    // as `su` keeps it) is no reason to fail: /tmp serves, and the
    // directory is private (0700) wherever it is.
    let d = match b.tempdir() {
        Ok(d) => d,
        Err(e) => return b.tempdir_in("/tmp").map_err(|_| e),
    };
    if usable(&d) {
        return Ok(d);
    }
    b.tempdir_in("/tmp")
}

fn with_timeout(e: ClientError, timeout: Duration) -> ClientError {
    match e {
        ClientError::Timeout(_) => ClientError::Timeout(timeout),
        e => e,
    }
}

/// Whom a client trusts to run its bus: itself, root, and the owner it named.
struct Trust {
    me: u32,
    named: Option<u32>,
}

impl Trust {
    fn check(&self, path: &Path, st: &FileStat) -> Result<(), ClientError> {
        let owner = st.st_uid;
        if owner == self.me || owner == 0 || Some(owner) == self.named {
            return Ok(());
        }
        Err(ClientError::Untrusted {
            path: path.to_owned(),
            owner,
            me: self.me,
            named: self.named,
        })
    }
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

fn type_name(st: &FileStat) -> &'static str {
    match file_type(st) {
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR | SFlag::S_IFBLK => "a device",
        _ => "not a FIFO",
    }
}

/// An I/O error that names the path it happened on.
fn at_path(e: impl Into<io::Error>, what: &str, path: &Path) -> ClientError {
    let e: io::Error = e.into();
    io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display())).into()
}

/// Opens the bus directory as an `O_PATH` descriptor (search permission is
/// enough, as for a root bus of mode 0711) and checks its owner.
///
/// The last component may be a symbolic link only if the caller, root or
/// the named bus owner made it: the link's owner chose where it leads, and
/// a link planted by anyone else could lead the client to another bus that
/// passes the owner check (root's system bus, shared with every user).
/// Links higher up the path (`/var/run` → `/run`) are the system's or the
/// user's own choice of path and are followed.
fn open_bus_dir(bus_dir: &Path, trust: &Trust) -> Result<OwnedFd, ClientError> {
    let no_broker = |why| ClientError::NoBroker(bus_dir.display().to_string(), why);
    let open = |follow: bool| {
        let mut flags = libc::O_PATH | libc::O_DIRECTORY;
        if !follow {
            flags |= libc::O_NOFOLLOW;
        }
        // `read(true)` is O_RDONLY, which is 0 and which O_PATH ignores.
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(bus_dir)
            .map(OwnedFd::from)
    };
    let dir = match open(false) {
        Ok(fd) => fd,
        Err(e) => match e.raw_os_error() {
            Some(libc::ENOENT) => return Err(no_broker("no such directory")),
            // O_PATH|O_NOFOLLOW|O_DIRECTORY on a symbolic link: ENOTDIR.
            Some(libc::ENOTDIR | libc::ELOOP) => {
                let link = match nix::sys::stat::lstat(bus_dir) {
                    Ok(st) if file_type(&st) == SFlag::S_IFLNK => st,
                    _ => return Err(no_broker("not a directory")),
                };
                trust.check(bus_dir, &link)?;
                open(true).map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOENT | libc::ENOTDIR) => {
                        no_broker("a symbolic link to no directory")
                    }
                    _ => at_path(e, "open", bus_dir),
                })?
            }
            _ => return Err(at_path(e, "open", bus_dir)),
        },
    };
    let st = nix::sys::stat::fstat(dir.as_raw_fd()).map_err(|e| at_path(e, "stat", bus_dir))?;
    trust.check(bus_dir, &st)?;
    Ok(dir)
}

/// Opens `hello` for writing (non-blocking) relative to the checked bus
/// directory, never through a symbolic link, after checking its owner and
/// type (an open for writing already wakes a reader blocked in `open`,
/// telling it a client is there), and checks the opened FIFO again (it may
/// have been replaced in between).
fn open_hello(bus_dir: &Path, trust: &Trust) -> Result<OwnedFd, ClientError> {
    let dir = open_bus_dir(bus_dir, trust)?;
    let path = bus_dir.join("hello");
    let no_broker = |why| ClientError::NoBroker(bus_dir.display().to_string(), why);
    let check = |st: &FileStat| {
        trust.check(&path, st)?;
        if file_type(st) != SFlag::S_IFIFO {
            return Err(ClientError::NotAFifo {
                dir: bus_dir.to_owned(),
                kind: type_name(st),
            });
        }
        Ok(())
    };
    match nix::sys::stat::fstatat(Some(dir.as_raw_fd()), "hello", AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => check(&st)?,
        Err(Errno::ENOENT) => return Err(no_broker("no hello FIFO there")),
        Err(e) => return Err(at_path(e, "stat", &path)),
    }
    let flags = OFlag::O_WRONLY
        | OFlag::O_NONBLOCK
        | OFlag::O_NOFOLLOW
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    let raw = match nix::fcntl::openat(Some(dir.as_raw_fd()), "hello", flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Err(no_broker("no hello FIFO there")),
        Err(Errno::ENXIO) => return Err(no_broker("hello has no reader")),
        Err(Errno::ELOOP) => {
            return Err(ClientError::NotAFifo {
                dir: bus_dir.to_owned(),
                kind: "a symbolic link",
            })
        }
        Err(e) => return Err(at_path(e, "open", &path)),
    };
    // SAFETY: `raw` is the descriptor openat just returned, owned by nothing
    // else, so this OwnedFd becomes its only owner.
    let hello = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let st = nix::sys::stat::fstat(hello.as_raw_fd()).map_err(|e| at_path(e, "stat", &path))?;
    check(&st)?;
    Ok(hello)
}

/// SIGINT and SIGTERM, blocked in this thread and readable on a signalfd,
/// for as long as the handshake lasts; dropping it restores the signal mask
/// (a signal that arrived since the last poll is then delivered as usual).
struct SignalGuard {
    fd: SignalFd,
    old_mask: SigSet,
}

impl SignalGuard {
    /// `None` when neither signal is left at its default action and
    /// unblocked: whoever ignored, caught or blocked it keeps it so.
    fn install() -> Result<Option<SignalGuard>, ClientError> {
        let old_mask = SigSet::thread_get_mask().map_err(io::Error::from)?;
        let mut set = SigSet::empty();
        let mut any = false;
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            if !old_mask.contains(sig) && at_default_action(sig) {
                set.add(sig);
                any = true;
            }
        }
        if !any {
            return Ok(None);
        }
        set.thread_block().map_err(io::Error::from)?;
        match SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
            Ok(fd) => Ok(Some(SignalGuard { fd, old_mask })),
            Err(e) => {
                let _ = old_mask.thread_set_mask();
                Err(io::Error::from(e).into())
            }
        }
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        let _ = self.old_mask.thread_set_mask();
    }
}

fn at_default_action(sig: Signal) -> bool {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action makes sigaction(2) only report the current
    // one into `old`, memory we own and which it fills on success.
    let rc = unsafe { libc::sigaction(sig as libc::c_int, std::ptr::null(), old.as_mut_ptr()) };
    // SAFETY: zero-initialised, and filled by sigaction when rc == 0.
    rc == 0 && unsafe { old.assume_init() }.sa_sigaction == libc::SIG_DFL
}

/// Dies of `sig`, caught during a handshake ([`ClientError::Interrupted`]):
/// with its default action, as it would have without the catching, so that
/// the parent sees the real signal (a shell stops a loop on SIGINT only when
/// its child died of it). Returns 128 + the signal number, the shell's
/// convention, only if the process somehow survives.
pub fn die_of(sig: Signal) -> std::process::ExitCode {
    let mut set = SigSet::empty();
    set.add(sig);
    let _ = set.thread_unblock();
    let _ = nix::sys::signal::raise(sig);
    std::process::ExitCode::from(128u8.saturating_add(sig as u8))
}
