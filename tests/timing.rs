//! The timing rules of sessions and the rendezvous, on tokio's paused clock.
//!
//! Each test runs the broker in-process (`broker::run`) on a current-thread
//! runtime whose clock is virtual (`start_paused`), against real FIFOs in a
//! temporary directory. The rules hold in virtual time, so the asserts on
//! durations are exact and deterministic, and nothing here depends on how
//! fast the machine is: no wall-clock duration is asserted.
//!
//! How the test client waits, and why it never awaits I/O directly: under a
//! paused clock tokio advances time to the next timer whenever no task is
//! ready, and it does so even in the very park that collects pending I/O
//! readiness (see "Preventing auto-advance" in `tokio::time::pause`). A test
//! that awaited a read on `recv` under a 10 s `timeout` could see the clock
//! jump 10 s while the broker merely processed a line. So the client is
//! synchronous and non-blocking (`O_NONBLOCK` opens, plain `read`/`write`),
//! and [`until`] waits for a condition by yielding (which lets the broker run
//! and collects I/O without moving the clock), then stepping the clock by
//! 1 ms, up to a bound in virtual time. Virtual time therefore moves only in
//! 1 ms steps or to a timer the test sets itself.
//!
//! The broker and the test share one thread: nothing here blocks it, but for
//! reaping a child process after SIGKILL, which takes no time.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fifobus::broker::{self, BrokerError, SHUTDOWN_DEADLINE};
use fifobus::config::{BrokerConfig, MetricsEndpoint};
use fifobus::fifo;
use fifobus::protocol::{encode_pub, Command, Hello, Reply};
use fifobus::rendezvous::{MAX_PENDING_HANDSHAKES, MIN_HANDSHAKE_WAIT};
use fifobus::topic::{Pattern, Topic};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

/// `BrokerConfig::flush_grace`, as the broker is configured by default.
const GRACE: Duration = Duration::from_millis(500);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How late after its deadline a session may notice it: the teardown polls
/// `recv` for unread bytes every few milliseconds.
const POLL_SLACK: Duration = Duration::from_millis(10);
/// Bound on every wait, in virtual time.
const LIMIT: Duration = Duration::from_secs(10);
/// Yields per virtual millisecond while waiting: enough for a line to go
/// from one client's `send` through the router to another's `recv`.
const YIELDS: usize = 32;
const MS: Duration = Duration::from_millis(1);

/// Waits until `ready` returns `Some`: yields (the broker runs, pending I/O is
/// collected, the clock stands still), then steps the clock by 1 ms. Panics
/// after [`LIMIT`] of virtual time.
async fn until<T>(what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + LIMIT;
    loop {
        for _ in 0..YIELDS {
            if let Some(v) = ready() {
                return v;
            }
            tokio::task::yield_now().await;
        }
        if let Some(v) = ready() {
            return v;
        }
        assert!(
            Instant::now() < end,
            "waited {LIMIT:?} of virtual time for {what}"
        );
        tokio::time::sleep(MS).await;
    }
}

/// Lets every task run until the broker has nothing left to do at this
/// instant, without moving the clock.
async fn settle() {
    for _ in 0..YIELDS * 4 {
        tokio::task::yield_now().await;
    }
}

fn topic(s: &str) -> Topic {
    s.parse().unwrap()
}

fn pattern(s: &str) -> Pattern {
    s.parse().unwrap()
}

/// Opens a FIFO without blocking (`O_NONBLOCK`, std adds `O_CLOEXEC`).
fn open_nb(path: &Path, write: bool) -> File {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// What the broker logged, captured per test: the runtime is
/// current-thread, so a thread-local subscriber sees every broker task.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A broker running in this runtime on a private temporary directory.
struct Bus {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    log: Log,
    stop: Option<oneshot::Sender<()>>,
    broker: Option<JoinHandle<Result<(), BrokerError>>>,
    replies: usize,
    _log_guard: tracing::subscriber::DefaultGuard,
}

impl Bus {
    async fn start(handshake_timeout: Duration) -> Bus {
        Self::start_configured(|c| c.handshake_timeout = handshake_timeout).await
    }

    /// A broker with the test's defaults, changed by `configure`.
    async fn start_configured(configure: impl FnOnce(&mut BrokerConfig)) -> Bus {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let log_guard = tracing::subscriber::set_default(subscriber);
        // On tmpfs like real bus directories, as tests/common's temp_root.
        let mut b = tempfile::Builder::new();
        b.prefix("fifobus-timing-");
        let tmp = b.tempdir_in("/dev/shm").or_else(|_| b.tempdir()).unwrap();
        let dir = tmp.path().join("bus");
        let mut config = BrokerConfig::new(dir.clone());
        config.metrics = MetricsEndpoint::Off;
        config.handshake_timeout = HANDSHAKE_TIMEOUT;
        configure(&mut config);
        assert_eq!(config.flush_grace, GRACE, "the default flush grace changed");
        let (stop, stopped) = oneshot::channel::<()>();
        let broker = tokio::spawn(broker::run(config, async {
            let _ = stopped.await;
        }));
        let hello = dir.join("hello");
        until("the broker to publish hello", || {
            hello.exists().then_some(())
        })
        .await;
        Bus {
            tmp,
            dir,
            log,
            stop: Some(stop),
            broker: Some(broker),
            replies: 0,
            _log_guard: log_guard,
        }
    }

    /// A new reply FIFO, in the test's directory (outside the bus).
    fn reply_fifo(&mut self) -> PathBuf {
        self.replies += 1;
        let path = self.tmp.path().join(format!("reply-{}", self.replies));
        fifo::make(&path, 0o600).unwrap();
        path
    }

    /// Writes one HELLO line to `hello` in a single non-blocking write.
    fn try_hello(&self, hello: &Hello) -> io::Result<()> {
        let line = hello.encode().unwrap();
        let n = open_nb(&self.dir.join("hello"), true).write(&line)?;
        assert_eq!(n, line.len(), "a HELLO line is written whole (PIPE_BUF)");
        Ok(())
    }

    fn hello(&self, hello: &Hello) {
        self.try_hello(hello).unwrap();
    }

    /// The whole handshake: reply FIFO open for reading first, then HELLO,
    /// then the one-line answer.
    async fn connect(&mut self, name: &str, pid: Option<i32>, subs: &[&str]) -> TestClient {
        let reply = self.reply_fifo();
        let mut answer = LineReader::reply(&reply);
        self.hello(&Hello {
            reply: reply.clone(),
            name: Some(name.to_owned()),
            pid,
            subs: subs.iter().map(|s| pattern(s)).collect(),
            no_echo: false,
        });
        let line = answer
            .next_line(&format!("the answer to {name}'s HELLO"))
            .await;
        fs::remove_file(&reply).unwrap();
        TestClient::welcomed(&line.expect("the reply FIFO does not end"))
    }

    fn client_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = fs::read_dir(self.dir.join("clients"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        dirs.sort();
        dirs
    }

    /// Resolves the shutdown future, waits for `broker::run` to return Ok,
    /// and returns how long that took in virtual time.
    async fn stop(&mut self) -> Duration {
        let start = Instant::now();
        self.stop.take().unwrap().send(()).unwrap();
        let broker = self.broker.as_ref().unwrap();
        until("broker::run to return", || {
            broker.is_finished().then_some(())
        })
        .await;
        let took = start.elapsed();
        let result = self.broker.take().unwrap().await.unwrap();
        assert!(result.is_ok(), "broker::run failed: {result:?}");
        assert!(!self.dir.exists(), "the broker left {}", self.dir.display());
        took
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.log.text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "broker log (last {} lines):\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// A client after WELCOME: it writes `send` (non-blocking, the broker holds
/// the other end) and reads `recv` only when a test opens it.
struct TestClient {
    dir: PathBuf,
    send: File,
}

impl TestClient {
    fn welcomed(line: &[u8]) -> TestClient {
        let Reply::Welcome { dir, .. } = Reply::parse(line) else {
            panic!("expected WELCOME, got {:?}", String::from_utf8_lossy(line));
        };
        TestClient {
            dir: dir.to_owned(),
            send: open_nb(&dir.join("send"), true),
        }
    }

    /// Writes commands in one write; they fit in the empty pipe.
    fn send(&mut self, commands: &[Command]) {
        let mut buf = Vec::new();
        for c in commands {
            c.encode(&mut buf).unwrap();
        }
        self.write(&buf);
    }

    fn publish(&mut self, t: &str, payloads: &[String]) {
        let mut buf = Vec::new();
        for p in payloads {
            encode_pub(&mut buf, &topic(t), p.as_bytes()).unwrap();
        }
        self.write(&buf);
    }

    fn write(&mut self, buf: &[u8]) {
        let n = self.send.write(buf).unwrap();
        assert_eq!(n, buf.len(), "short write to an empty send pipe");
    }

    /// Writes more than the pipe holds, letting the broker read in between.
    async fn write_all(&mut self, mut buf: &[u8]) {
        let send = &mut self.send;
        until("room in send", || loop {
            match send.write(buf) {
                Ok(n) => {
                    buf = &buf[n..];
                    if buf.is_empty() {
                        return Some(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => panic!("writing send: {e}"),
            }
        })
        .await
    }

    /// Bytes in `send` the broker has not read yet.
    fn unread_send(&self) -> usize {
        fifo::unread_bytes(self.send.as_raw_fd()).unwrap()
    }

    /// Waits until the broker has read everything written to `send`.
    async fn sent(&self) {
        until("the broker to read send", || {
            (self.unread_send() == 0).then_some(())
        })
        .await
    }

    fn recv(&self) -> LineReader {
        LineReader {
            file: open_nb(&self.dir.join("recv"), false),
            buf: Vec::new(),
            zero_is_eof: true,
        }
    }
}

/// Lines from a FIFO opened `O_RDONLY|O_NONBLOCK`, read with plain `read`.
struct LineReader {
    file: File,
    buf: Vec<u8>,
    /// On `recv` (the broker holds a write end) a read of 0 is EOF; on a
    /// reply FIFO it only means the broker has not opened it yet.
    zero_is_eof: bool,
}

impl LineReader {
    fn reply(path: &Path) -> LineReader {
        LineReader {
            file: open_nb(path, false),
            buf: Vec::new(),
            zero_is_eof: false,
        }
    }

    /// `Some(Some(line))`, `Some(None)` at EOF, `None` when nothing is there yet.
    fn try_line(&mut self) -> Option<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.drain(..=i).take(i).collect();
                return Some(Some(line));
            }
            let mut chunk = [0; 4096];
            match self.file.read(&mut chunk) {
                Ok(0) if self.zero_is_eof => {
                    assert!(self.buf.is_empty(), "EOF after a partial line");
                    return Some(None);
                }
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// The next line, or `None` at EOF.
    async fn next_line(&mut self, what: &str) -> Option<Vec<u8>> {
        until(what, || self.try_line()).await
    }

    /// The next line, which must be `want`.
    async fn expect(&mut self, want: Reply<'_>) {
        let line = self
            .next_line(&format!("{want:?}"))
            .await
            .unwrap_or_else(|| panic!("EOF before {want:?}"));
        assert_eq!(Reply::parse(&line), want);
    }

    async fn expect_eof(&mut self) {
        if let Some(line) = self.next_line("EOF").await {
            panic!("expected EOF, got {:?}", String::from_utf8_lossy(&line));
        }
    }
}

/// A process to name in `pid=`, killed and reaped on drop.
struct Doomed(Child);

impl Doomed {
    fn spawn() -> Doomed {
        Doomed(
            Process::new("sleep")
                .arg("1000")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// SIGKILL, then reap: once this returns the process is gone and its
    /// pidfd is readable. The wait takes no time after SIGKILL.
    fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Doomed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// A client that says BYE and never reads keeps its directory and FIFOs
/// for exactly the flush grace, counted from the BYE, then is removed.
#[tokio::test(start_paused = true)]
async fn bye_without_reader_keeps_the_client_for_the_flush_grace() {
    let mut bus = Bus::start(HANDSHAKE_TIMEOUT).await;
    let mut c = bus.connect("quiet", None, &[]).await;
    c.send(&[Command::Bye]);
    c.sent().await;
    // The broker read BYE now; the rest (router, writer, BYE on recv) needs
    // no I/O and happens at this same instant.
    let bye = Instant::now();

    sleep_until(bye + GRACE - MS).await;
    settle().await;
    for path in [c.dir.clone(), c.dir.join("send"), c.dir.join("recv")] {
        assert!(
            path.exists(),
            "{} removed before the flush grace ({:?} after BYE)",
            path.display(),
            bye.elapsed()
        );
    }

    let gone = until("the client directory to be removed", || {
        (!c.dir.exists()).then(Instant::now)
    })
    .await;
    let after = gone - bye;
    assert!(
        after >= GRACE && after <= GRACE + POLL_SLACK,
        "removed {after:?} after BYE, expected the flush grace {GRACE:?}"
    );
    assert!(bus.client_dirs().is_empty());
    bus.stop().await;
}

/// BYE, then a reader that comes late but within the grace: it gets every
/// queued line and the final BYE, then EOF as soon as it has read them,
/// with the directory already gone.
#[tokio::test(start_paused = true)]
async fn bye_then_late_reader_gets_everything_then_eof() {
    let mut bus = Bus::start(HANDSHAKE_TIMEOUT).await;
    let mut c = bus.connect("late", None, &[]).await;
    let sent = payloads("x", 3);
    let mut commands = vec![Command::Sub(pattern("t"))];
    commands.extend(sent.iter().map(|p| Command::Pub {
        topic: topic("t"),
        payload: p.clone().into(),
    }));
    commands.push(Command::Bye);
    c.send(&commands);
    c.sent().await;
    let bye = Instant::now();

    sleep_until(bye + Duration::from_millis(300)).await;
    settle().await;
    assert!(c.dir.join("recv").exists(), "recv gone before the grace");
    let mut recv = c.recv();
    for p in &sent {
        recv.expect(Reply::Msg {
            topic: "t",
            payload: p.as_bytes(),
        })
        .await;
    }
    recv.expect(Reply::Bye).await;
    let read = Instant::now();
    recv.expect_eof().await;
    let eof = Instant::now();
    assert!(
        !c.dir.exists(),
        "EOF on recv while {} still exists",
        c.dir.display()
    );
    assert!(
        eof - read <= POLL_SLACK,
        "EOF {:?} after everything was read; the session should end once read",
        eof - read
    );
    assert!(eof - bye < GRACE, "EOF only after the whole grace");
    bus.stop().await;
}

/// When the `pid=` process dies, the lines it wrote to `send` before dying
/// still reach the subscribers (the pidfd firing first loses nothing), and
/// the client is removed within a second.
#[tokio::test(start_paused = true)]
async fn pid_death_drains_send_then_removes_the_client() {
    let mut bus = Bus::start(HANDSHAKE_TIMEOUT).await;
    let mut sub = bus.connect("listener", None, &["t"]).await;
    let mut doomed = Doomed::spawn();
    let mut publisher = bus.connect("script", Some(doomed.pid()), &[]).await;
    let sent = payloads("m", 20);
    // Several writes, none read yet: the broker sees the data and the
    // death in the same turn, and the session takes the death first.
    for chunk in sent.chunks(5) {
        publisher.publish("t", chunk);
    }
    assert!(publisher.unread_send() > 0);
    doomed.kill();
    let died = Instant::now();

    let mut recv = sub.recv();
    for p in &sent {
        recv.expect(Reply::Msg {
            topic: "t",
            payload: p.as_bytes(),
        })
        .await;
    }
    let gone = until("the dead client's directory to be removed", || {
        (!publisher.dir.exists()).then(Instant::now)
    })
    .await;
    assert!(
        gone - died < Duration::from_secs(1),
        "removed {:?} after its process died",
        gone - died
    );
    // Nothing else came for the subscriber, and it is still served.
    sub.send(&[Command::Ping(Some("after".into()))]);
    recv.expect(Reply::Pong(Some(&b"after"[..]))).await;
    assert_eq!(bus.client_dirs(), vec![sub.dir.clone()]);
    bus.stop().await;
}

/// `--orphan-timeout`: a client without `pid=` that neither sends a command
/// nor reads its `recv` for the timeout is ended at the timeout (BYE, EOF,
/// directory gone); a command or a read keeps it; a client with `pid=` is
/// never ended for idleness.
#[tokio::test(start_paused = true)]
async fn pidless_clients_idle_for_the_orphan_timeout_are_ended() {
    const TIMEOUT: Duration = Duration::from_secs(600);
    let mut bus = Bus::start_configured(|c| c.orphan_timeout = Some(TIMEOUT)).await;
    let process = Doomed::spawn();
    let before = Instant::now();
    let idle = bus.connect("idle", None, &[]).await;
    let mut pinger = bus.connect("pinger", None, &[]).await;
    let reader = bus.connect("reader", None, &["t"]).await;
    let tied = bus.connect("tied", Some(process.pid()), &[]).await;
    let connected = Instant::now();
    let mut idle_recv = idle.recv();
    let mut pinger_recv = pinger.recv();
    let mut reader_recv = reader.recv();

    // Half way: one client sends a command (and publishes), the other only
    // reads what it is sent.
    sleep_until(connected + TIMEOUT / 2).await;
    pinger.send(&[
        Command::Ping(Some("alive".into())),
        Command::Pub {
            topic: topic("t"),
            payload: "news".into(),
        },
    ]);
    // Read by the broker: the PING is its sign of life. Its PONG stays
    // unread for now, or that read would count too.
    pinger.sent().await;
    let pinged = Instant::now();
    reader_recv
        .expect(Reply::Msg {
            topic: "t",
            payload: b"news",
        })
        .await;

    sleep_until(before + TIMEOUT - MS).await;
    settle().await;
    assert_eq!(
        bus.client_dirs().len(),
        4,
        "a client ended before the timeout"
    );

    idle_recv.expect(Reply::Bye).await;
    idle_recv.expect_eof().await;
    let ended = Instant::now();
    assert!(!idle.dir.exists(), "EOF before the directory was removed");
    assert!(
        ended - before >= TIMEOUT && ended - connected <= TIMEOUT + POLL_SLACK,
        "the idle client was ended {:?} after it connected, expected {TIMEOUT:?}",
        ended - connected
    );
    settle().await;
    assert!(pinger.dir.exists() && reader.dir.exists() && tied.dir.exists());

    // The pinger's last sign of life was its PING: it goes one timeout later.
    sleep_until(pinged + TIMEOUT - MS).await;
    settle().await;
    assert!(pinger.dir.exists(), "the pinger ended before its timeout");
    let ended = until("the pinger to be ended", || {
        (!pinger.dir.exists()).then(Instant::now)
    })
    .await;
    // Read only now: a read before would have been a sign of life.
    pinger_recv.expect(Reply::Pong(Some(&b"alive"[..]))).await;
    pinger_recv.expect(Reply::Bye).await;
    pinger_recv.expect_eof().await;
    assert!(
        ended - pinged >= TIMEOUT && ended - pinged <= TIMEOUT + POLL_SLACK,
        "the pinger was ended {:?} after its PING, expected {TIMEOUT:?}",
        ended - pinged
    );
    // The reader read at half time; the broker notices when it looks (at
    // its first deadline), so it goes one timeout after that: late rather
    // than early.
    sleep_until(before + 2 * TIMEOUT - MS).await;
    settle().await;
    assert!(reader.dir.exists(), "the reader ended before its timeout");
    reader_recv.expect(Reply::Bye).await;
    reader_recv.expect_eof().await;
    let ended = Instant::now();
    assert!(
        ended - connected <= 2 * TIMEOUT + POLL_SLACK,
        "the reader was ended {:?} after it connected, expected twice {TIMEOUT:?}",
        ended - connected
    );
    // The client with pid= stays, however idle.
    sleep_until(Instant::now() + 3 * TIMEOUT).await;
    settle().await;
    assert_eq!(bus.client_dirs(), vec![tied.dir.clone()]);
    assert!(bus.log.text().contains("idle for --orphan-timeout"));
    bus.stop().await;
}

/// A HELLO whose reply FIFO nobody opens is abandoned once the handshake
/// timeout has passed, not before, leaving nothing behind; meanwhile other
/// clients are served, and one that opens its reply late but within the
/// timeout is welcomed.
#[tokio::test(start_paused = true)]
async fn handshake_timeout_abandons_an_unread_reply() {
    let mut bus = Bus::start(HANDSHAKE_TIMEOUT).await;
    let start = Instant::now();
    let stuck = bus.reply_fifo();
    bus.hello(&Hello {
        reply: stuck.clone(),
        name: Some("stuck".into()),
        pid: None,
        subs: Vec::new(),
        no_echo: false,
    });
    let late_reply = bus.reply_fifo();
    bus.hello(&Hello {
        reply: late_reply.clone(),
        name: Some("late".into()),
        pid: None,
        subs: Vec::new(),
        no_echo: false,
    });

    // A pending handshake holds up no one.
    let prompt = bus.connect("prompt", None, &[]).await;
    assert!(
        start.elapsed() < HANDSHAKE_TIMEOUT / 10,
        "a client waited {:?} behind a pending handshake",
        start.elapsed()
    );

    // Opening the reply just before the timeout is still in time.
    sleep_until(start + HANDSHAKE_TIMEOUT - Duration::from_millis(10)).await;
    settle().await;
    assert!(
        !bus.log.text().contains("abandoned a handshake"),
        "a handshake was abandoned after {:?}, before the timeout {HANDSHAKE_TIMEOUT:?}:\n{}",
        start.elapsed(),
        bus.log.text()
    );
    let mut answer = LineReader::reply(&late_reply);
    let line = answer
        .next_line("the answer to a reply opened late")
        .await
        .unwrap();
    let late = TestClient::welcomed(&line);

    let log = bus.log.clone();
    let abandoned = until("the stuck handshake to be abandoned", || {
        log.text()
            .contains("abandoned a handshake")
            .then(Instant::now)
    })
    .await;
    let after = abandoned - start;
    assert!(
        after >= HANDSHAKE_TIMEOUT && after <= HANDSHAKE_TIMEOUT + POLL_SLACK,
        "abandoned after {after:?}, expected the handshake timeout {HANDSHAKE_TIMEOUT:?}"
    );
    assert!(log.text().contains(&stuck.display().to_string()));
    // Nothing was created for it and nothing was written to its reply.
    let mut expected = vec![prompt.dir.clone(), late.dir.clone()];
    expected.sort();
    assert_eq!(bus.client_dirs(), expected);
    assert_eq!(open_nb(&stuck, false).read(&mut [0; 64]).unwrap(), 0);
    // And the rendezvous goes on.
    let after_timeout = bus.connect("after", None, &[]).await;
    assert!(after_timeout.dir.exists());
    bus.stop().await;
}

/// A full table of handshakes waiting on reply FIFOs nobody opens (a
/// flood): a client that opened its reply before writing HELLO is welcomed
/// at once, without waiting for a seat; the waits shrink to
/// `MIN_HANDSHAKE_WAIT` as the table fills, so every flood handshake is
/// abandoned after that (not after the 2 s handshake timeout), never
/// before; and a client that opens its reply only after writing HELLO (a
/// shell's `read < "$r"`) gets a seat and its WELCOME. Before the wait
/// shrank, the first client waited the whole timeout for a slot.
#[tokio::test(start_paused = true)]
async fn a_full_table_of_unread_replies_is_cut_short() {
    let mut bus = Bus::start(HANDSHAKE_TIMEOUT).await;
    let start = Instant::now();
    for _ in 0..MAX_PENDING_HANDSHAKES {
        let hello = Hello {
            reply: bus.reply_fifo(),
            name: None,
            pid: None,
            subs: Vec::new(),
            no_echo: false,
        };
        // The pipe may fill: let the broker read, the clock standing still.
        let bus = &bus;
        until("room in hello", || match bus.try_hello(&hello) {
            Ok(()) => Some(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("writing hello: {e}"),
        })
        .await;
    }
    let filled = start.elapsed();
    assert!(filled < MIN_HANDSHAKE_WAIT / 4, "filling took {filled:?}");
    let abandoned = |bus: &Bus| bus.log.text().matches("nobody opened").count();
    let c = bus.connect("patient", None, &[]).await;
    assert!(
        start.elapsed() < MIN_HANDSHAKE_WAIT,
        "welcomed after {:?}, with the table full",
        start.elapsed()
    );
    assert_eq!(
        abandoned(&bus),
        0,
        "no flood handshake is cut before the floor"
    );
    // Every flood handshake is abandoned within one backoff step (50 ms)
    // of the shortest wait, though the timeout is 2 s.
    let bus_ref = &bus;
    until("the flood handshakes to be abandoned", || {
        (abandoned(bus_ref) == MAX_PENDING_HANDSHAKES).then_some(())
    })
    .await;
    let cut = start.elapsed();
    assert!(
        cut >= MIN_HANDSHAKE_WAIT && cut <= filled + MIN_HANDSHAKE_WAIT + Duration::from_millis(55),
        "all abandoned after {cut:?}"
    );
    // A client that opens its reply only after its HELLO was read.
    let reply = bus.reply_fifo();
    bus.hello(&Hello {
        reply: reply.clone(),
        name: Some("late".to_owned()),
        pid: None,
        subs: Vec::new(),
        no_echo: false,
    });
    settle().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut answer = LineReader::reply(&reply);
    let line = answer.next_line("the answer to late's HELLO").await;
    let late = TestClient::welcomed(&line.expect("the reply FIFO does not end"));
    let mut expected = vec![c.dir.clone(), late.dir.clone()];
    expected.sort();
    assert_eq!(bus.client_dirs(), expected);
    bus.stop().await;
}

/// Stopping a broker whose clients never read: every session gets its flush
/// grace and no more, and `broker::run` returns within the shutdown
/// deadline plus the grace, having removed `hello`, `clients/` and the bus
/// directory.
#[tokio::test(start_paused = true)]
async fn shutdown_with_clients_that_never_read_meets_the_deadline() {
    let mut bus = Bus::start(HANDSHAKE_TIMEOUT).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(bus.connect(&format!("idle{i}"), None, &["t"]).await);
    }
    // 1000 lines of 200 bytes to each: more than a pipe holds, so every
    // writer is stuck on a full recv with a backlog behind it.
    let mut buf = Vec::new();
    for i in 0..1000 {
        encode_pub(&mut buf, &topic("t"), format!("{i:0>190}").as_bytes()).unwrap();
    }
    clients[0].write_all(&buf).await;
    clients[0].sent().await;
    settle().await;
    // One of them has recv open, and does not read it either.
    let held = clients[1].recv();
    assert!(fifo::unread_bytes(held.file.as_raw_fd()).unwrap() >= 4096);

    let hello = bus.dir.join("hello");
    let clients_dir = bus.dir.join("clients");
    let took = bus.stop().await;
    assert!(
        took >= GRACE && took <= SHUTDOWN_DEADLINE + GRACE,
        "broker::run took {took:?} of virtual time to stop; expected the flush grace {GRACE:?}, \
         within the deadline {:?}",
        SHUTDOWN_DEADLINE + GRACE
    );
    assert!(!hello.exists() && !clients_dir.exists());
    for c in &clients {
        assert!(!c.dir.exists());
    }
}
