//! Restart survival of the messaging patterns (issue 10 with issue 11):
//! after `kill -9` and a new broker, an adopted queue-group member still
//! shares the group's messages, an adopted lossless subscriber is still
//! lossless, and retained messages are still there (`state/retained`); a
//! torn retained file is reported and ignored.

mod common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fifobus::client::ConnectOptions;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

fn state_of(bus: &TempBus, name: &str) -> String {
    fs::read_to_string(bus.dir.join("state").join(name)).unwrap_or_default()
}

fn with_pid(name: &str) -> ConnectOptions {
    ConnectOptions {
        name: Some(name.into()),
        pid: Some(std::process::id() as i32),
        subs: vec![],
    }
}

/// Lines from a FIFO the test holds (a client that outlives its broker),
/// each read bounded by a timeout.
struct Lines {
    file: File,
    buf: Vec<u8>,
}

impl Lines {
    fn next(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return String::from_utf8_lossy(&line[..i]).into_owned();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no line within {timeout:?}");
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
            let ms = left.as_millis().min(1000) as i32;
            if poll(&mut fds, PollTimeout::try_from(ms).unwrap()).unwrap() == 0 {
                continue;
            }
            let mut chunk = [0u8; 65536];
            match self.file.read(&mut chunk).unwrap() {
                0 => panic!("EOF: the broker went away"),
                k => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
    }
}

/// A client held as its two FIFOs, so that it outlives a `kill -9`.
struct Held {
    id: String,
    send: File,
    recv: Lines,
}

impl Held {
    fn connect(bus: &TempBus, name: &str) -> Held {
        let c = bus.connect_opts(with_pid(name));
        let id = c.id().to_owned();
        let (send, recv) = c.into_files().unwrap();
        Held {
            id,
            send,
            recv: Lines {
                file: recv,
                buf: Vec::new(),
            },
        }
    }

    /// What came before the `PONG` of a `PING` sent now.
    fn ping(&mut self, token: &str) -> Vec<String> {
        writeln!(self.send, "PING {token}").unwrap();
        let want = format!("PONG {token}");
        let mut before = Vec::new();
        loop {
            let line = self.recv.next(T);
            if line == want {
                return before;
            }
            before.push(line);
        }
    }

    /// Sends `line`, checks it was taken without an error, and waits until
    /// the client's state file holds `sub_line` (written coalesced).
    fn sub(&mut self, bus: &TempBus, line: &str, sub_line: &str) {
        writeln!(self.send, "{line}").unwrap();
        assert_eq!(self.ping("sub"), Vec::<String>::new(), "{line}");
        let file = bus.dir.join("state").join(&self.id);
        assert!(
            wait_for(&file, T, || state_of(bus, &self.id).contains(sub_line)),
            "{sub_line:?} never written: {:?}",
            state_of(bus, &self.id)
        );
    }
}

fn restart(bus: &mut TempBus, args: &[&str], adopted: usize) {
    bus.stop(Signal::SIGKILL);
    bus.spawn(args);
    let want = format!("adopted {adopted} client");
    assert!(bus.wait_log(&want), "log:\n{}", bus.log_text());
}

#[test]
fn an_adopted_queue_member_still_shares_the_jobs() {
    let mut bus = TempBus::start();
    let mut a = Held::connect(&bus, "worker-a");
    let mut b = Held::connect(&bus, "worker-b");
    let mut other = Held::connect(&bus, "other");
    a.sub(&bus, "SUB jobs.> queue=w", "\nsub jobs.> queue=w\n");
    b.sub(&bus, "SUB jobs.> queue=w", "\nsub jobs.> queue=w\n");
    other.sub(&bus, "SUB other.x", "\nsub other.x\n");

    restart(&mut bus, &[], 3);
    let mut p = bus.connect("pub", &[]);
    let msgs: Vec<(String, String)> = (0..10)
        .map(|i| (format!("jobs.{i}"), format!("job{i}")))
        .collect();
    p.send_raw(&pub_lines(msgs)).unwrap();
    assert_eq!(barrier(&mut p), Vec::<String>::new());
    let got_a = a.ping("a");
    let got_b = b.ping("b");
    assert_eq!(got_a.first().map(String::as_str), Some("DROPPED ? restart"));
    assert_eq!(got_b.first().map(String::as_str), Some("DROPPED ? restart"));
    let (na, nb) = (got_a.len() - 1, got_b.len() - 1);
    // Shared, not each a copy: every job exactly once, both take turns.
    assert_eq!(na + nb, 10, "a: {got_a:?}\nb: {got_b:?}");
    assert!(na > 0 && nb > 0, "a: {got_a:?}\nb: {got_b:?}");
    let mut jobs: Vec<&String> = got_a[1..].iter().chain(&got_b[1..]).collect();
    jobs.sort();
    jobs.dedup();
    assert_eq!(jobs.len(), 10, "a job twice: {got_a:?} {got_b:?}");
    assert_eq!(other.ping("o"), ["DROPPED ? restart"]);
    // Its membership is still recorded, for the next restart.
    assert!(state_of(&bus, &a.id).contains("\nsub jobs.> queue=w\n"));
}

#[test]
fn an_adopted_lossless_subscriber_still_stalls_its_publisher_instead_of_dropping() {
    let args = ["--backlog-bytes", "16KiB"];
    let mut bus = TempBus::start_with(&args);
    let mut l = Held::connect(&bus, "lossless");
    l.sub(&bus, "SUB t lossless", "\nsub t lossless\n");

    restart(&mut bus, &args, 1);
    // 4 MB for t: far beyond the pipe, the 16 KiB backlog and the channel.
    const N: usize = 20_000;
    let mut publisher = bus.connect("publisher", &[]);
    let done = Arc::new(AtomicBool::new(false));
    let done_in = done.clone();
    let thread = std::thread::spawn(move || {
        let msgs: Vec<(&str, String)> = (0..N)
            .map(|i| ("t", format!("{i:06}{}", "x".repeat(200))))
            .collect();
        publisher.send_raw(&pub_lines(msgs)).unwrap();
        let after = barrier(&mut publisher);
        done_in.store(true, Ordering::SeqCst);
        after
    });
    // Lossy, the publisher would be done and messages dropped by now.
    let stalled = wait_for(&bus.clients_dir(), T, || {
        done.load(Ordering::SeqCst) || stalled_publishers(&bus) == Some(1.0)
    });
    assert!(
        stalled && !done.load(Ordering::SeqCst),
        "the publisher was not held back by the adopted lossless subscriber"
    );
    assert_eq!(l.recv.next(T), "DROPPED ? restart");
    for want in 0..N {
        let line = l.recv.next(T);
        let n: usize = line
            .strip_prefix("MSG t ")
            .and_then(|p| p.get(..6))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected {line:?}"));
        assert_eq!(n, want, "in order, none lost");
    }
    assert_eq!(thread.join().unwrap(), Vec::<String>::new());
    assert!(state_of(&bus, &l.id).contains("\nsub t lossless\n"));
}

/// `fifobus_publishers_stalled` from the broker's `/metrics`.
fn stalled_publishers(bus: &TempBus) -> Option<f64> {
    let url = fifobus::stats::metrics_url(&bus.dir).ok()?;
    let addr = url.trim_start_matches("http://").split('/').next()?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(T)).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let text = std::io::read_to_string(s).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("fifobus_publishers_stalled "))
        .and_then(|v| v.trim().parse().ok())
}

/// `fifobus sub <pattern> -n 1`: the first payload a new subscriber gets.
fn first_for_new_subscriber(bus: &TempBus, pattern: &str) -> String {
    let out = Command::new(bin())
        .args(["sub", pattern, "-n", "1", "--timeout", "10"])
        .env("FIFOBUS_DIR", &bus.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fifobus sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn retained_path(bus: &TempBus) -> PathBuf {
    bus.dir.join("state").join("retained")
}

#[test]
fn retained_messages_survive_kill_9_and_are_not_sent_again_to_adopted_subscribers() {
    let mut bus = TempBus::start();
    let mut s = Held::connect(&bus, "watcher");
    s.sub(&bus, "SUB cfg.>", "\nsub cfg.>\n");
    let mut r = bus.connect("retainer", &[]);
    r.send_raw(b"RETAIN cfg.mode  two  spaces\nRETAIN cfg.gone x\nRETAIN cfg.gone\n")
        .unwrap();
    assert_eq!(barrier(&mut r), Vec::<String>::new());
    assert_eq!(
        s.ping("1"),
        ["MSG cfg.mode  two  spaces", "MSG cfg.gone x"],
        "published as PUB"
    );
    let file = retained_path(&bus);
    let want = "fifobus-retained 1\ncfg.mode  two  spaces\nend\n";
    assert!(
        wait_for(&file, T, || fs::read_to_string(&file)
            .is_ok_and(|t| t == want)),
        "{:?}",
        fs::read_to_string(&file)
    );
    drop(r);

    restart(&mut bus, &[], 2);
    // An adopted subscription is not new: no second copy.
    assert_eq!(s.ping("2"), ["DROPPED ? restart"]);
    assert_eq!(first_for_new_subscriber(&bus, "cfg.>"), " two  spaces\n");
    let mut c = bus.connect("late", &["cfg.mode"]);
    assert_eq!(barrier(&mut c), ["MSG cfg.mode  two  spaces"]);
}

#[test]
fn a_torn_retained_file_is_reported_and_ignored() {
    let mut bus = TempBus::start();
    let mut r = bus.connect("retainer", &[]);
    r.send_raw(b"RETAIN cfg.mode on\n").unwrap();
    assert_eq!(barrier(&mut r), Vec::<String>::new());
    let file = retained_path(&bus);
    assert!(wait_for(&file, T, || file.exists()));
    drop(r);
    bus.stop(Signal::SIGKILL);
    // Cut short, as by a full disk.
    fs::write(&file, "fifobus-retained 1\ncfg.mode o").unwrap();
    bus.spawn(&[]);
    assert!(
        bus.wait_log("ignoring the retained messages in"),
        "log:\n{}",
        bus.log_text()
    );
    let mut c = bus.connect("late", &["cfg.>"]);
    assert_eq!(barrier(&mut c), Vec::<String>::new());
    // Serving goes on, and the next RETAIN replaces the file.
    c.send_raw(b"RETAIN cfg.mode off\n").unwrap();
    assert_eq!(barrier(&mut c), ["MSG cfg.mode off"]);
    let want = "fifobus-retained 1\ncfg.mode off\nend\n";
    assert!(wait_for(&file, T, || fs::read_to_string(&file)
        .is_ok_and(|t| t == want)));
}

#[test]
fn a_stop_takes_the_retained_messages_with_the_bus_directory() {
    let mut bus = TempBus::start();
    let mut r = bus.connect("retainer", &[]);
    r.send_raw(b"RETAIN cfg.mode on\n").unwrap();
    assert_eq!(barrier(&mut r), Vec::<String>::new());
    let file = retained_path(&bus);
    assert!(wait_for(&file, T, || file.exists()));
    drop(r);
    assert!(bus.stop(Signal::SIGTERM).success());
    // Nothing of the broker's is left, so state/ itself could go.
    assert!(!file.exists());
    assert!(!bus.dir.join("state").exists(), "state/ left behind");
    bus.spawn(&[]);
    let mut c = bus.connect("late", &["cfg.>"]);
    assert_eq!(barrier(&mut c), Vec::<String>::new());
}
