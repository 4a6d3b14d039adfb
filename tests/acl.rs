//! Access control (`--acl`) with a real broker and real, throwaway users.
//!
//! A client's identity is the owner of its reply FIFO. This branch has no
//! shared-bus filesystem yet (client directories are the broker's, 0700),
//! so a test user could not open its own `send`/`recv`. The clients here are
//! therefore this (root) test process, each making its reply FIFO and
//! `chown`ing it to the user it plays: the broker learns the uid exactly as
//! it will on a shared bus (fstat of the reply FIFO it opened), and the
//! users, their names and groups are real, resolved by the broker through
//! the system's databases.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::users::User;
use common::*;
use fifobus::protocol::{Hello, Reply};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::unistd::Pid;

/// A connected client, as a user's program would be.
struct Conn {
    send: File,
    recv: OwnedFd,
    buf: Vec<u8>,
}

/// A refused HELLO: the code and text of the `ERR` on the reply FIFO.
#[derive(Debug)]
struct Refused {
    code: String,
    text: String,
}

fn open(path: &Path, write: bool) -> OwnedFd {
    fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .into()
}

/// Reads one line from a non-blocking `fd`, within [`T`].
fn read_line(fd: &OwnedFd, buf: &mut Vec<u8>) -> String {
    let deadline = Instant::now() + T;
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return String::from_utf8_lossy(&line[..i]).into_owned();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no line within {T:?}; have {:?}",
            String::from_utf8_lossy(buf)
        );
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let ms = left.as_millis().min(1000) as u16;
        let _ = poll(&mut fds, PollTimeout::from(ms));
        let mut chunk = [0u8; 65536];
        match nix::unistd::read(fd.as_raw_fd(), &mut chunk) {
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Says HELLO on `bus` as `user`: the reply FIFO is chowned to the user.
fn hello(bus: &TempBus, user: &User, name: &str, subs: &[&str]) -> Result<Conn, Refused> {
    let reply = tempfile::Builder::new()
        .prefix("reply-")
        .tempdir_in(bus.tmp.path())
        .unwrap();
    let path = reply.path().join("reply");
    nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600)).unwrap();
    nix::unistd::chown(
        &path,
        Some(nix::unistd::Uid::from_raw(user.uid)),
        Some(nix::unistd::Gid::from_raw(user.gid)),
    )
    .unwrap();
    let reply_fd = open(&path, false);
    let line = Hello {
        reply: path.clone(),
        name: Some(name.to_owned()),
        pid: None,
        subs: subs.iter().map(|s| pattern(s)).collect(),
    }
    .encode()
    .unwrap();
    let mut hello = File::from(open(&bus.dir.join("hello"), true));
    hello.write_all(&line).unwrap();
    let mut buf = Vec::new();
    let answer = read_line(&reply_fd, &mut buf);
    match Reply::parse(answer.as_bytes()) {
        Reply::Welcome { dir, .. } => {
            let dir: PathBuf = dir.to_owned();
            let send = open(&dir.join("send"), true);
            // Blocking writes: the broker always reads send.
            let flags = nix::fcntl::fcntl(send.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(send.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags)).unwrap();
            Ok(Conn {
                send: File::from(send),
                recv: open(&dir.join("recv"), false),
                buf: Vec::new(),
            })
        }
        Reply::Err { code, text } => Err(Refused {
            code: code.to_owned(),
            text: text.to_owned(),
        }),
        _ => panic!("unexpected answer to HELLO: {answer}"),
    }
}

fn connect(bus: &TempBus, user: &User, name: &str, subs: &[&str]) -> Conn {
    hello(bus, user, name, subs)
        .unwrap_or_else(|e| panic!("{name}: HELLO refused: {e:?}\nlog:\n{}", bus.log_text()))
}

impl Conn {
    fn send(&mut self, line: &str) {
        self.send.write_all(format!("{line}\n").as_bytes()).unwrap();
    }

    /// PING barrier: the lines that arrived before the PONG.
    fn barrier(&mut self) -> Vec<String> {
        self.send("PING sync");
        let mut before = Vec::new();
        loop {
            let line = read_line(&self.recv, &mut self.buf);
            if line == "PONG sync" {
                return before;
            }
            before.push(line);
        }
    }
}

/// A broker on a fresh bus with `acl` (text) as its `--acl` file.
fn broker(acl: &str, extra: &[&str]) -> (TempBus, PathBuf) {
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    let file = bus.tmp.path().join("fifobus.acl");
    fs::write(&file, acl).unwrap();
    let mut args = vec!["--acl", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    bus.spawn(&args);
    (bus, file)
}

fn chat_acl(alice: &User, bob: &User) -> String {
    format!(
        "# the chat of tests/acl.rs
default deny
allow pubsub chat.>         user={alice}
allow sub    chat.public.>  user={bob}
# no rule opens _bus. to clients, even this one:
allow pub    _bus.>         all
",
        alice = alice.name,
        bob = bob.name
    )
}

/// Three users at once, each a row of the ACL matrix on a real broker:
/// alice may publish and subscribe on chat.>, bob may only subscribe to
/// chat.public.> (his chat.> is partial), carol may do nothing; nobody may
/// publish under _bus.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn three_users_get_what_the_acl_grants() {
    let (alice, bob, carol) = (
        User::create("alice"),
        User::create("bob"),
        User::create("carol"),
    );
    let (bus, _file) = broker(&chat_acl(&alice, &bob), &[]);

    let mut a = connect(&bus, &alice, "alice", &["chat.>"]);
    let mut b = connect(&bus, &bob, "bob", &[]);
    let mut c = connect(&bus, &carol, "carol", &[]);

    // bob: chat.> overlaps the denied chat.private: accepted (partial);
    // chat.private.> is denied entirely.
    b.send("SUB chat.>");
    b.send("SUB chat.private.>");
    b.send("PUB chat.public.x from-bob");
    assert_eq!(
        b.barrier(),
        [
            "ERR forbidden chat.private.>",
            "ERR forbidden chat.public.x"
        ]
    );
    // carol: nothing.
    c.send("SUB chat.>");
    c.send("PUB chat.x hi");
    assert_eq!(
        c.barrier(),
        ["ERR forbidden chat.>", "ERR forbidden chat.x"]
    );
    // alice: publishes in both rooms; _bus. is refused despite its rule.
    a.send("PUB chat.public.x 1");
    a.send("PUB chat.private.y 2");
    a.send("PUB _bus.x 3");
    assert_eq!(
        a.barrier(),
        [
            "MSG chat.public.x 1",
            "MSG chat.private.y 2",
            "ERR forbidden _bus.x"
        ]
    );
    assert_eq!(
        b.barrier(),
        ["MSG chat.public.x 1"],
        "bob gets only the public room"
    );
    assert!(c.barrier().is_empty());

    // A HELLO whose sub= is denied entirely is refused; no client is made.
    let clients = bus.client_dirs().len();
    let e = hello(&bus, &carol, "carol2", &["chat.>"])
        .err()
        .expect("refused");
    assert_eq!((e.code.as_str(), e.text.as_str()), ("forbidden", "chat.>"));
    assert_eq!(bus.client_dirs().len(), clients);
    // A partial one is accepted.
    let mut b2 = connect(&bus, &bob, "bob2", &["*.public.x"]);
    a.send("PUB chat.public.x 4");
    a.barrier();
    assert_eq!(b2.barrier(), ["MSG chat.public.x 4"]);
}

/// SIGHUP rereads the file: a good one takes effect for the next commands;
/// a bad one is refused with its line number and the old policy stays.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn sighup_reloads_the_acl_and_a_bad_file_changes_nothing() {
    let (alice, bob, carol) = (
        User::create("alice"),
        User::create("bob"),
        User::create("carol"),
    );
    let (bus, file) = broker(&chat_acl(&alice, &bob), &[]);
    let mut a = connect(&bus, &alice, "alice", &["chat.>"]);
    let mut b = connect(&bus, &bob, "bob", &[]);

    b.send("PUB chat.public.x before");
    assert_eq!(b.barrier(), ["ERR forbidden chat.public.x"]);

    // bob may now publish to chat.public.
    let more = format!(
        "{}allow pub chat.public.> user={}\n",
        chat_acl(&alice, &bob),
        bob.name
    );
    fs::write(&file, more).unwrap();
    let hup = || kill(Pid::from_raw(bus.pid()), Signal::SIGHUP).unwrap();
    hup();
    assert!(
        bus.wait_log(&format!("acl reloaded from {}: 4 rules", file.display())),
        "{}",
        bus.log_text()
    );
    b.send("PUB chat.public.x after");
    assert!(b.barrier().is_empty());
    assert_eq!(a.barrier(), ["MSG chat.public.x after"]);

    // A broken file: line 3 names a user that does not exist.
    fs::write(
        &file,
        format!(
            "default deny\nallow pubsub chat.> user={}\nallow pub chat.> user=no-such-user-{}\n",
            alice.name,
            std::process::id()
        ),
    )
    .unwrap();
    hup();
    let want = format!("acl {} line 3: unknown user", file.display());
    assert!(bus.wait_log(&want), "{}", bus.log_text());
    assert!(bus.wait_log("keeping the previous policy"));
    // bob's rights are those of the last good file.
    b.send("PUB chat.public.x still");
    b.send("PUB chat.private.y never");
    assert_eq!(b.barrier(), ["ERR forbidden chat.private.y"]);
    assert_eq!(a.barrier(), ["MSG chat.public.x still"]);
    let mut c = connect(&bus, &carol, "carol", &[]);
    c.send("PUB chat.x hi");
    assert_eq!(c.barrier(), ["ERR forbidden chat.x"]);
}

/// Per-user limits: clients and subscriptions per uid, backlog per client.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn per_user_limits_answer_with_their_codes() {
    let (alice, bob) = (User::create("alice"), User::create("bob"));
    let acl = format!(
        "default allow\nlimit user={bob} clients=2 subscriptions=3 backlog=4K\n",
        bob = bob.name
    );
    let (bus, _file) = broker(&acl, &[]);

    let mut b1 = connect(&bus, &bob, "bob1", &["a", "b"]);
    let mut b2 = connect(&bus, &bob, "bob2", &[]);
    let e = hello(&bus, &bob, "bob3", &[])
        .err()
        .expect("a third client is refused");
    assert_eq!(e.code, "too-many-clients");
    assert!(
        e.text.contains(&format!(
            "user {} (uid {}) may have at most 2 clients",
            bob.name, bob.uid
        )),
        "{}",
        e.text
    );
    // Others are not limited by bob's limit.
    let mut a = connect(&bus, &alice, "alice", &[]);
    let _a2 = connect(&bus, &alice, "alice2", &[]);
    let _a3 = connect(&bus, &alice, "alice3", &[]);

    // Subscriptions count over all of bob's clients: 2 + 1, then no more.
    b2.send("SUB c");
    b2.send("SUB d");
    let got = b2.barrier();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("ERR too-many-subscriptions "), "{got:?}");
    b1.send("UNSUB a");
    b1.barrier();
    b2.send("SUB d");
    assert!(b2.barrier().is_empty(), "room again after UNSUB");

    // Backlog: bob's clients hold at most 4 KiB; alice's the default.
    // Neither reads while 200 KiB pass (the pipes take 64 KiB each).
    b2.send("UNSUB c");
    b2.barrier();
    let mut b1_again = b1;
    b1_again.send("SUB flood");
    assert!(b1_again.barrier().is_empty());
    a.send("SUB flood");
    a.barrier();
    let line = format!("PUB flood {}", "x".repeat(100));
    let mut p = connect(&bus, &alice, "publisher", &[]);
    for _ in 0..2000 {
        p.send(&line);
    }
    p.barrier();
    let bob_lines = b1_again.barrier();
    assert!(
        bob_lines.iter().any(|l| l.starts_with("DROPPED ")),
        "bob's backlog is capped at 4K"
    );
    let alice_lines = a.barrier();
    assert_eq!(alice_lines.len(), 2000, "alice's is not");
    assert!(alice_lines.iter().all(|l| l.starts_with("MSG flood ")));
}

/// Without --acl nothing changes: everyone may do everything, _bus. included.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn without_acl_everything_is_allowed() {
    let carol = User::create("carol");
    let bus = TempBus::start();
    let mut c = connect(&bus, &carol, "carol", &["_bus.>"]);
    c.send("PUB _bus.x 1");
    assert_eq!(c.barrier(), ["MSG _bus.x 1"]);
    // SIGHUP is harmless without a file.
    kill(Pid::from_raw(bus.pid()), Signal::SIGHUP).unwrap();
    assert!(bus.wait_log("no --acl file to reload"));
    c.send("PUB _bus.x 2");
    assert_eq!(c.barrier(), ["MSG _bus.x 2"]);
}

/// A bad file at start: the broker does not start, and says where.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn a_bad_file_at_start_is_refused_with_its_line() {
    let alice = User::create("alice");
    let bus = TempBus::new(BusOptions::default()).unwrap();
    let file = bus.tmp.path().join("bad.acl");
    fs::write(
        &file,
        format!(
            "default deny\nallow pub chat.> user={}\nallow pub chat..x all\n",
            alice.name
        ),
    )
    .unwrap();
    let mut child = bus.spawn_raw(&["--acl", file.to_str().unwrap()]);
    let status = wait_child(&mut child, T).expect("exits");
    assert!(!status.success());
    let log = bus.log_text();
    assert!(
        log.contains(&format!(
            "acl {} line 3: bad pattern 'chat..x'",
            file.display()
        )),
        "{log}"
    );
    assert!(!bus.dir.join("hello").exists());
}

/// A newcomer that its user's ACL client limit refuses ends nobody, even
/// when the table is full and a client without `pid=` could make room.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn a_newcomer_over_its_user_limit_ends_nobody() {
    let (alice, bob) = (User::create("alice"), User::create("bob"));
    let acl = format!("default allow\nlimit user={} clients=1\n", bob.name);
    let (bus, _file) = broker(&acl, &["--max-clients", "2"]);
    let mut a = connect(&bus, &alice, "alice", &[]);
    let mut b = connect(&bus, &bob, "bob", &[]);
    // Full, and both are pid-less: bob's second client is refused by his
    // limit before anyone is chosen to make room.
    let e = hello(&bus, &bob, "bob2", &[])
        .err()
        .expect("over bob's limit");
    assert_eq!(e.code, "too-many-clients");
    assert!(e.text.contains("may have at most 1 clients"), "{}", e.text);
    assert_eq!(a.barrier(), Vec::<String>::new());
    assert_eq!(b.barrier(), Vec::<String>::new());
    assert_eq!(bus.client_dirs().len(), 2);
    assert!(!bus.log_text().contains("table was full"));
    // Within her limits, alice's newcomer does make room.
    let _a2 = connect(&bus, &alice, "alice2", &[]);
    assert!(bus.wait_log("ended: the table was full"));
}
