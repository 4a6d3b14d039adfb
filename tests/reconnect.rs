//! The built-in clients (`fifobus sub`, `fifobus pub`) ride out a broker
//! that goes away: they wait, bounded by `--reconnect-timeout`, for a broker
//! to serve their client directory again, and carry on in it.
//!
//! "A broker serves the directory again" is what a restarted broker does
//! when it takes a client over: it opens the client's `send` and `recv`
//! (both `O_RDWR`) and writes `DROPPED ? restart` first. [`StandIn`] does
//! exactly that, so these tests exercise the clients whatever the broker
//! does at start-up.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(10);

/// A child's output, line by line, through a thread, so that every wait
/// for a line has a deadline.
struct Lines(mpsc::Receiver<String>);

impl Lines {
    fn of<R: Read + Send + 'static>(r: R) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines(rx)
    }

    /// Lines until one containing `needle` (returned last); panics after `T`.
    fn until(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + T;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(l) => {
                    let done = l.contains(needle);
                    seen.push(l);
                    if done {
                        return seen;
                    }
                }
                Err(e) => panic!("no line with {needle:?} ({e}); got {seen:?}"),
            }
        }
    }

    /// Everything until the writer closes (the process exited).
    fn rest(&self) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(l) = self.0.recv_timeout(T) {
            seen.push(l);
        }
        seen
    }
}

/// A running `fifobus` client command, killed and reaped on drop.
struct Cmd {
    child: Child,
    out: Lines,
    err: Lines,
}

impl Cmd {
    fn spawn(bus: &Path, args: &[&str], stdin: Stdio) -> Cmd {
        let mut child = Command::new(bin())
            .arg("--dir")
            .arg(bus)
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out: ChildStdout = child.stdout.take().unwrap();
        let err: ChildStderr = child.stderr.take().unwrap();
        Cmd {
            child,
            out: Lines::of(out),
            err: Lines::of(err),
        }
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_child(&mut self.child, timeout).expect("the command did not exit in time")
    }
}

impl Drop for Cmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a broker that takes a client over does with its FIFOs: opens both
/// for reading and writing (so a client's `open` of either end, and its
/// reads and writes, proceed), and says `DROPPED ? restart` first.
struct StandIn {
    send: OwnedFd,
    recv: fs::File,
    buf: Vec<u8>,
}

impl StandIn {
    fn take_over(cdir: &Path) -> StandIn {
        let open = |name: &str| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(cdir.join(name))
                .unwrap()
        };
        let send = OwnedFd::from(open("send"));
        let mut recv = open("recv");
        recv.write_all(b"DROPPED ? restart\n").unwrap();
        StandIn {
            send,
            recv,
            buf: Vec::new(),
        }
    }

    fn say(&mut self, line: &str) {
        self.recv.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    /// The next line the client wrote to `send`; panics after `T`.
    fn next_line(&mut self) -> String {
        let deadline = Instant::now() + T;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return String::from_utf8_lossy(&line[..i]).into_owned();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no line on send; have {:?}", self.buf);
            let mut fds = [PollFd::new(self.send.as_fd(), PollFlags::POLLIN)];
            let _ = poll(
                &mut fds,
                PollTimeout::try_from(left.as_millis() as i32).unwrap(),
            );
            let mut chunk = [0u8; 4096];
            match nix::unistd::read(self.send.as_raw_fd(), &mut chunk) {
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => panic!("read send: {e}"),
            }
        }
    }
}

/// Starts `fifobus sub` and waits until it is subscribed (a message
/// published afterwards reaches it). Returns it with its client directory.
fn subscribed(bus: &TempBus, extra: &[&str]) -> (Cmd, PathBuf) {
    let mut args = vec!["sub", "news.>"];
    args.extend_from_slice(extra);
    let sub = Cmd::spawn(&bus.dir, &args, Stdio::null());
    // The handshake subscribes (sub= in HELLO), so once the client directory
    // exists, a publication reaches it.
    assert!(wait_for(&bus.clients_dir(), T, || bus.client_dirs().len() == 1));
    let cdir = bus.client_dirs().remove(0);
    let mut p = bus.connect("pub", &[]);
    p.publish(&topic("news.a"), b"before").unwrap();
    barrier(&mut p);
    p.bye(T).unwrap();
    assert_eq!(sub.out.until("before"), ["before"]);
    (sub, cdir)
}

#[test]
fn sub_carries_on_when_a_broker_takes_its_directory_back() {
    let mut bus = TempBus::start();
    let (mut sub, cdir) = subscribed(&bus, &["-n", "2", "--reconnect-timeout", "60s"]);
    // A line the broker never finished when it died: the bytes are in
    // recv, with no newline after them.
    let mut cut = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(cdir.join("recv"))
        .unwrap();
    cut.write_all(b"MSG news.b cu").unwrap();
    drop(cut);
    bus.stop(Signal::SIGKILL);
    // It noticed, said so, and waits (it has not exited).
    sub.err.until("the broker went away; waiting up to 1m");
    assert!(sub.child.try_wait().unwrap().is_none());
    let mut standin = StandIn::take_over(&cdir);
    standin.say("MSG news.b after");
    // The cut line is dropped, not glued to the new broker's first line.
    assert_eq!(sub.out.until("after"), ["after"]);
    let err = sub.err.until("restarted");
    assert!(
        err.iter().any(|l| l.contains("the broker is back")),
        "{err:?}"
    );
    // -n 2 reached: it leaves properly, through the same FIFO.
    assert_eq!(standin.next_line(), "BYE");
    standin.say("BYE");
    assert!(sub.wait(T).success());
}

#[test]
fn sub_exits_after_the_reconnect_timeout_when_no_broker_comes_back() {
    let mut bus = TempBus::start();
    let (mut sub, cdir) = subscribed(&bus, &["--reconnect-timeout", "1s"]);
    // Timed from before the kill: `sub` may notice the broker gone (and
    // start its clock) before `stop` has reaped it.
    let began = Instant::now();
    bus.stop(Signal::SIGKILL);
    let status = sub.wait(T);
    let waited = began.elapsed();
    assert_eq!(status.code(), Some(1));
    let err = sub.err.rest().join("\n");
    assert!(err.contains("waiting up to 1s"), "{err}");
    assert!(
        err.contains(&format!(
            "no broker took client directory {} back within 1s",
            cdir.display()
        )),
        "{err}"
    );
    assert!(err.contains("--reconnect-timeout"), "{err}");
    assert!(
        waited >= Duration::from_millis(990),
        "gave up after {waited:?}"
    );
}

#[test]
fn sub_with_no_reconnect_timeout_exits_at_once_as_before() {
    let mut bus = TempBus::start();
    let (mut sub, _) = subscribed(&bus, &["--reconnect-timeout", "0"]);
    bus.stop(Signal::SIGKILL);
    let status = sub.wait(T);
    assert_eq!(status.code(), Some(1));
    let err = sub.err.rest().join("\n");
    assert!(err.contains("the broker closed the connection"), "{err}");
    assert!(!err.contains("waiting"), "{err}");
}

#[test]
fn sub_stops_waiting_when_its_directory_is_removed() {
    let mut bus = TempBus::start();
    let (mut sub, cdir) = subscribed(&bus, &["--reconnect-timeout", "60s"]);
    bus.stop(Signal::SIGKILL);
    sub.err.until("the broker went away");
    fs::remove_dir_all(&cdir).unwrap();
    // Well before the 60 s: the removal itself wakes it.
    let status = sub.wait(T);
    assert_eq!(status.code(), Some(1));
    let err = sub.err.rest().join("\n");
    assert!(
        err.contains(&format!("client directory {} is gone", cdir.display())),
        "{err}"
    );
}

#[test]
fn sub_does_not_reopen_a_fifo_someone_else_put_in_its_place() {
    let mut bus = TempBus::start();
    let (mut sub, cdir) = subscribed(&bus, &["--reconnect-timeout", "60s"]);
    bus.stop(Signal::SIGKILL);
    sub.err.until("the broker went away");
    // A regular file where `send` was: not a FIFO the broker made. Renamed
    // over it, so that `send` is never missing (that would end the wait
    // with "gone" instead).
    fs::write(cdir.join("planted"), b"").unwrap();
    fs::rename(cdir.join("planted"), cdir.join("send")).unwrap();
    let status = sub.wait(T);
    assert_eq!(status.code(), Some(1));
    let err = sub.err.rest().join("\n");
    assert!(
        err.contains(
            "is not the FIFO the broker gave this client any more (it is a regular file now)"
        ),
        "{err}"
    );
    assert_eq!(fs::read(cdir.join("send")).unwrap(), b"", "nothing written");
}

#[test]
fn pub_waits_for_the_broker_and_sends_the_rest_to_it() {
    let mut bus = TempBus::start();
    let mut sub = bus.connect("watcher", &["news.>"]);
    let mut publ = Cmd::spawn(
        &bus.dir,
        &["pub", "news.x", "--reconnect-timeout", "60s"],
        Stdio::piped(),
    );
    let mut stdin = publ.child.stdin.take().unwrap();
    stdin.write_all(b"one\n").unwrap();
    assert_eq!(read_until(&mut sub, "MSG news.x one"), Vec::<String>::new());
    let cdir = bus
        .client_dirs()
        .into_iter()
        .find(|d| d != sub.dir())
        .unwrap();
    bus.stop(Signal::SIGKILL);
    // Its next write finds no reader (EPIPE): it waits instead of failing.
    stdin.write_all(b"two\n").unwrap();
    publ.err.until("the broker went away; waiting up to 1m");
    assert!(publ.child.try_wait().unwrap().is_none());
    let mut standin = StandIn::take_over(&cdir);
    publ.err.until("the broker is back");
    assert_eq!(standin.next_line(), "PUB news.x two");
    drop(stdin);
    // The barrier and the goodbye go to the broker that took it over.
    assert_eq!(standin.next_line(), "PING pub-done");
    standin.say("PONG pub-done");
    assert_eq!(standin.next_line(), "BYE");
    standin.say("BYE");
    assert!(publ.wait(T).success());
    let err = publ.err.rest().join("\n");
    assert!(
        err.contains("fifobus pub: the broker restarted after a crash"),
        "{err}"
    );
}

#[test]
fn pub_with_no_reconnect_timeout_fails_at_once() {
    let mut bus = TempBus::start();
    let mut sub = bus.connect("watcher", &["news.>"]);
    let mut publ = Cmd::spawn(
        &bus.dir,
        &["pub", "news.x", "--reconnect-timeout", "0"],
        Stdio::piped(),
    );
    let mut stdin = publ.child.stdin.take().unwrap();
    stdin.write_all(b"one\n").unwrap();
    read_until(&mut sub, "MSG news.x one");
    bus.stop(Signal::SIGKILL);
    let _ = stdin.write_all(b"two\n");
    drop(stdin);
    let status = publ.wait(T);
    assert_eq!(status.code(), Some(1));
    assert!(!publ.err.rest().join("\n").contains("waiting"));
}

// End to end, with a real broker restarted on the same directory: it takes
// over the clients whose process lives (src/busdir.rs, session::adopt).

#[test]
fn sub_survives_a_broker_kill_and_restart_and_gets_what_is_published_after() {
    let mut bus = TempBus::start();
    let (mut sub, cdir) = subscribed(&bus, &["-n", "4", "--reconnect-timeout", "60s"]);
    bus.stop(Signal::SIGKILL);
    sub.err.until("the broker went away");
    bus.spawn(&[]);
    // `hello` is published after every adoption: the subscription is back.
    let mut p = bus.connect("pub", &[]);
    for m in ["after-1", "after-2"] {
        p.publish(&topic("news.a"), m.as_bytes()).unwrap();
    }
    barrier(&mut p);
    assert_eq!(sub.out.until("after-2"), ["after-1", "after-2"]);
    let err = sub.err.until("restarted after a crash");
    assert!(
        err.iter().any(|l| l.contains(&format!(
            "the broker is back; carrying on in {}",
            cdir.display()
        ))),
        "{err:?}"
    );
    assert!(cdir.exists(), "the same client directory");
    // Still subscribed: -n 4 ("before" counts) is reached with one more,
    // and it says BYE.
    p.publish(&topic("news.b"), b"after-3").unwrap();
    barrier(&mut p);
    assert_eq!(sub.out.until("after-3"), ["after-3"]);
    assert!(sub.wait(T).success());
    assert!(wait_gone(&cdir, T), "BYE removed it");
}

#[test]
fn pub_survives_a_broker_kill_and_restart() {
    let mut bus = TempBus::start();
    let mut watcher = bus.connect("watcher", &["news.>"]);
    let mut publ = Cmd::spawn(
        &bus.dir,
        &["pub", "news.x", "--reconnect-timeout", "60s"],
        Stdio::piped(),
    );
    let mut stdin = publ.child.stdin.take().unwrap();
    stdin.write_all(b"one\n").unwrap();
    read_until(&mut watcher, "MSG news.x one");
    bus.stop(Signal::SIGKILL);
    stdin.write_all(b"two\n").unwrap();
    publ.err.until("the broker went away");
    bus.spawn(&[]);
    publ.err.until("the broker is back");
    stdin.write_all(b"three\n").unwrap();
    drop(stdin);
    // Exit 0 means its PING barrier came back from the new broker: every
    // line it sent before, "two" included, was read and routed.
    assert!(publ.wait(T).success(), "{:?}", publ.err.rest());
    // "three" went out once the new broker had adopted everyone (hello
    // exists): the watcher, adopted too, gets it after the restart notice.
    let before = read_until(&mut watcher, "MSG news.x three");
    assert_eq!(
        before.first().map(String::as_str),
        Some("DROPPED ? restart")
    );
}

// The bus directory removed or renamed under a running broker: the broker
// stops with an error and exit status 1 (so `Restart=on-failure` acts),
// rather than running on with no `hello` anyone can reach.

/// Waits for the broker to exit on its own; returns its status and log.
fn broker_exit(bus: &mut TempBus) -> (std::process::ExitStatus, String) {
    let mut child = bus.child.take().unwrap();
    let status = wait_child(&mut child, T).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the broker kept running; log:\n{}", bus.log_text())
    });
    (status, bus.log_text())
}

#[test]
fn removing_the_bus_directory_stops_the_broker_with_an_error() {
    let mut bus = TempBus::start();
    let mut c = bus.connect("c", &["x.>"]);
    // It goes in one try: the broker does not put `hello` back under rm's
    // feet (its final rmdir would fail with "Directory not empty").
    fs::remove_dir_all(&bus.dir).unwrap();
    let (status, log) = broker_exit(&mut bus);
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert!(
        log.contains(&format!(
            "the bus directory {} was removed or renamed while the broker ran",
            bus.dir.display()
        )),
        "log:\n{log}"
    );
    assert!(log.contains("Restart=on-failure"), "log:\n{log}");
    assert!(!bus.dir.exists(), "nothing put back");
    // The client sees its connection end.
    assert_eq!(c.read_line(Some(T)).unwrap(), None);
}

#[test]
fn renaming_the_bus_directory_stops_the_broker_with_an_error() {
    let mut bus = TempBus::start();
    let mut c = bus.connect("c", &["x.>"]);
    let moved = bus.tmp.path().join("moved");
    fs::rename(&bus.dir, &moved).unwrap();
    let (status, log) = broker_exit(&mut bus);
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert!(log.contains("was removed or renamed"), "log:\n{log}");
    // Its directory moved along, so the client was still there to be told.
    read_until(&mut c, "BYE");
    // What the broker made is gone from the moved directory too; nothing
    // appeared at the old path.
    assert!(fs::read_dir(&moved).unwrap().next().is_none());
    assert!(!bus.dir.exists());
}

#[test]
fn a_deleted_hello_alone_is_still_put_back() {
    let bus = TempBus::start();
    let hello = bus.dir.join("hello");
    fs::remove_file(&hello).unwrap();
    assert!(wait_for(&hello, T, || hello.exists()));
    // A new client gets in, and the broker did not stop.
    let mut c = bus.connect("late", &[]);
    barrier(&mut c);
}
