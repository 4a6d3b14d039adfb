//! A client of the bus, as any program would write one: plain blocking-ish
//! file I/O on the FIFOs, no async runtime. The `connect`, `pub` and `sub`
//! subcommands use it, and so do the integration tests.
//!
//! Waits have deadlines: opening `hello` is non-blocking (`ENOENT` or `ENXIO`
//! means no broker), and every read and write goes through `poll(2)` with a
//! timeout, so a missing or stuck broker is reported instead of hanging.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;

use crate::protocol::hello::MAX_HELLO_LINE;
use crate::protocol::{encode_ping, encode_pub, Command, EncodeError, ErrorCode, Hello, Reply};
use crate::topic::{Pattern, Topic};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no broker is running on {0} ({1}); start one with: fifobus serve --dir {0}")]
    NoBroker(String, &'static str),
    #[error("the broker refused: {code} {text}")]
    Refused { code: String, text: String },
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the broker closed the connection")]
    Closed,
    #[error("unexpected reply from the broker: {0}")]
    Unexpected(String),
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

#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    pub name: Option<String>,
    pub pid: Option<i32>,
    pub subs: Vec<Pattern>,
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
        loop {
            if let Some(line) = self.buffered_line() {
                return Ok(Some(line));
            }
            if self.eof {
                return Ok(None);
            }
            wait_fd(self.fd.as_fd(), PollFlags::POLLIN, deadline)?;
            self.fill()?;
        }
    }
}

/// Waits until `fd` is ready for `events` or `deadline` passes.
fn wait_fd(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Option<Instant>,
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
        match poll(&mut fds, timeout) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(ClientError::Timeout(Duration::ZERO));
                }
            }
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
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
}

impl Client {
    /// Performs the handshake on `bus_dir/hello` and opens the client's FIFOs.
    ///
    /// # Errors
    /// [`ClientError::NoBroker`] within milliseconds when no broker runs;
    /// [`ClientError::Refused`] with the broker's `ERR`; `Timeout`.
    pub fn connect(
        bus_dir: &Path,
        opts: &ConnectOptions,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let deadline = Instant::now() + timeout;
        let shown = bus_dir.display().to_string();
        let hello = match open_nonblocking(&bus_dir.join("hello"), true) {
            Ok(fd) => fd,
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(libc::ENOENT | libc::ENOTDIR) => {
                        ClientError::NoBroker(shown, "no hello FIFO there")
                    }
                    Some(libc::ENXIO) => ClientError::NoBroker(shown, "hello has no reader"),
                    _ => e.into(),
                })
            }
        };
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
            wait_fd(hello.as_fd(), PollFlags::POLLOUT, Some(deadline))
                .map_err(|e| with_timeout(e, timeout))?;
            match nix::unistd::write(&hello, &line) {
                Ok(_) => break,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
        let answer = reply
            .read_line(Some(deadline))
            .map_err(|e| with_timeout(e, timeout))?
            .ok_or(ClientError::Closed)?;
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
        let send = open_nonblocking(&dir.join("send"), true)?;
        set_blocking(&send)?;
        let recv = open_nonblocking(&dir.join("recv"), false)?;
        Ok(Client {
            id,
            dir,
            send: File::from(send),
            recv: LineReader::new(recv),
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

    /// Sends one command.
    ///
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
/// (tmpfs, private to the user, cheap to create FIFOs in), else `$TMPDIR`.
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
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        if let Ok(d) = b.tempdir_in(runtime) {
            if usable(&d) {
                return Ok(d);
            }
        }
    }
    let d = b.tempdir()?;
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
