//! Restart survival, broker side (issue 10, items 1, 2 and 7): client state
//! kept on disk, coalesced; a broker started after `kill -9` adopts the
//! clients whose process lives (same directory, FIFOs and subscriptions),
//! tells each that messages may have been lost, and removes the rest;
//! torn state files cost only their own client; a full disk is an error in
//! the log, not a crash.

mod common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::users::User;
use common::*;
use fifobus::client::{Client, ConnectOptions};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn state_dir(bus: &TempBus) -> PathBuf {
    bus.dir.join("state")
}

fn state_of(bus: &TempBus, id: &str) -> String {
    fs::read_to_string(state_dir(bus).join(id)).unwrap_or_default()
}

fn with_pid(name: &str, subs: &[&str]) -> ConnectOptions {
    ConnectOptions {
        name: Some(name.into()),
        pid: Some(std::process::id() as i32),
        subs: subs.iter().map(|s| pattern(s)).collect(),
    }
}

/// Lines from a FIFO held open by the test (an open-once client), each
/// read bounded by a timeout; `None` at EOF (no writer: the broker died).
struct Lines {
    file: File,
    buf: Vec<u8>,
}

impl Lines {
    fn new(file: File) -> Lines {
        Lines {
            file,
            buf: Vec::new(),
        }
    }

    fn next(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no line within {timeout:?}");
            let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
            let n = poll(
                &mut fds,
                PollTimeout::try_from(left.as_millis().min(1000) as i32).unwrap(),
            )
            .unwrap();
            if n == 0 {
                continue;
            }
            let mut chunk = [0u8; 65536];
            match self.file.read(&mut chunk).unwrap() {
                0 => return None,
                k => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
    }
}

/// Kills and reaps the children it holds when dropped (a failing test
/// leaves no process behind).
#[derive(Default)]
struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `PING` on a client's held `send` and returns what came on its
/// held `recv` before the `PONG`.
fn ping(send: &mut File, recv: &mut Lines, token: &str) -> Vec<String> {
    writeln!(send, "PING {token}").unwrap();
    let want = format!("PONG {token}");
    let mut before = Vec::new();
    loop {
        let line = recv.next(T).expect("EOF before PONG");
        if line == want {
            return before;
        }
        before.push(line);
    }
}

#[test]
fn client_state_follows_subscriptions_and_is_written_coalesced() {
    let mut bus = TempBus::start();
    let c = bus.connect_opts(with_pid("keeper", &["first.>"]));
    let id = c.id().to_owned();
    let dir_mode = fs::metadata(state_dir(&bus)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(dir_mode, 0o700, "state/ must be the broker's alone");
    // Written before WELCOME: a client told it is welcome survives a crash.
    let text = state_of(&bus, &id);
    assert!(text.starts_with("fifobus-client-state 1\n"), "{text}");
    for want in [
        format!("uuid {id}\n"),
        "name keeper\n".into(),
        format!("pid {}\n", std::process::id()),
        "sub first.>\n".into(),
    ] {
        assert!(text.contains(&want), "{want:?} not in {text}");
    }
    let file_mode = fs::metadata(state_dir(&bus).join(&id))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(file_mode, 0o600);

    // 5000 SUBs, one write each: renames into state/ are counted.
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    inotify
        .add_watch(&state_dir(&bus), AddWatchFlags::IN_MOVED_TO)
        .unwrap();
    let (mut send, recv) = c.into_files().unwrap();
    let mut recv = Lines::new(recv);
    const N: usize = 5000;
    for i in 0..N {
        send.write_all(format!("SUB many.{i}\n").as_bytes())
            .unwrap();
    }
    send.write_all(b"UNSUB first.>\n").unwrap();
    assert!(ping(&mut send, &mut recv, "subs").is_empty());
    let file = state_dir(&bus).join(&id);
    let all_there = || {
        let t = state_of(&bus, &id);
        t.contains(&format!("sub many.{}\n", N - 1))
            && t.matches("\nsub ").count() == N
            && !t.contains("sub first.>")
    };
    assert!(
        wait_for(&file, T, all_there),
        "state never held the {N} subscriptions: {} sub lines",
        state_of(&bus, &id).matches("\nsub ").count()
    );
    let mut writes = 0;
    while let Ok(events) = inotify.read_events() {
        writes += events.len();
    }
    assert!(
        (1..=100).contains(&writes),
        "{N} SUBs cost {writes} state writes; they should be coalesced"
    );
    eprintln!("{N} SUBs (one write each) cost {writes} state file writes");

    // BYE: the file goes with the client; SIGTERM: state/ goes with the broker.
    writeln!(send, "BYE").unwrap();
    assert!(wait_gone(&file, T), "state file outlived its client");
    let status = bus.stop(Signal::SIGTERM);
    assert!(status.success());
    assert!(!state_dir(&bus).exists(), "state/ left after a clean stop");
}

/// A per-line shell subscriber: it reopens `recv` for every line (the
/// documented pattern) and appends what it reads to `out`, until `MSG t.end`.
const PER_LINE_SUB: &str = r#"
cdir=$("$FB" connect --name perline --sub 't.>') || exit 3
echo "$cdir" > "$OUT.dir"
while :; do
  IFS= read -r line < "$cdir/recv" || continue
  printf '%s\n' "$line" >> "$OUT"
  [ "$line" = "MSG t.end x" ] && break
done
"#;

/// An open-once Python subscriber: opens `recv` once; at EOF (the broker
/// died) it opens it again, which blocks until a broker holds it again.
const OPEN_ONCE_SUB: &str = r#"
import sys
d = sys.stdin.readline().strip()
out = open(sys.argv[1], "w")
f = open(d + "/recv", "rb")
pending = b""
while True:
    chunk = f.readline()
    if not chunk:
        f.close()
        f = open(d + "/recv", "rb")
        continue
    pending += chunk
    if not pending.endswith(b"\n"):
        continue
    line, pending = pending, b""
    out.write(line.decode())
    out.flush()
    if line == b"MSG t.end x\n":
        break
"#;

/// What one subscriber got, checked against what was published
/// (`MSG t.n <i>` for i in 0..total, then `MSG t.end x`): each message at
/// most once and in order; `DROPPED ? restart` exactly once; every gap at a
/// `DROPPED` line (the only place the broker may lose messages); and
/// everything published after the restart delivered.
fn check_stream(who: &str, lines: &[String], total: usize, after_restart: usize) {
    let mut next = 0usize;
    let mut restarts = 0;
    let mut gap_announced = false;
    let mut lost = 0usize;
    for l in lines {
        if l == "DROPPED ? restart" {
            restarts += 1;
            gap_announced = true;
        } else if let Some(n) = l.strip_prefix("DROPPED ") {
            n.parse::<usize>()
                .unwrap_or_else(|_| panic!("{who}: odd line {l:?}"));
            gap_announced = true;
        } else if let Some(i) = l.strip_prefix("MSG t.n ") {
            let i: usize = i.parse().unwrap();
            assert!(
                i >= next,
                "{who}: message {i} after {next}: out of order or twice"
            );
            if i > next {
                assert!(
                    gap_announced,
                    "{who}: messages {next}..{i} lost without a DROPPED line"
                );
                lost += i - next;
            }
            gap_announced = false;
            next = i + 1;
        } else if l == "MSG t.end x" {
            break;
        } else {
            panic!("{who}: unexpected line {l:?}");
        }
    }
    assert_eq!(next, total, "{who}: the stream did not reach its end");
    assert_eq!(
        restarts, 1,
        "{who}: 'DROPPED ? restart' seen {restarts} times"
    );
    assert!(
        lost <= total - after_restart,
        "{who}: lost {lost}, more than was published before the restart"
    );
    eprintln!(
        "{who}: delivered {}, lost {lost} (announced), of {total}",
        total - lost
    );
}

#[test]
fn after_kill_9_a_new_broker_adopts_live_clients_and_the_stream_goes_on() {
    let mut bus = TempBus::start();
    let tmp = bus.tmp.path().to_owned();
    let mut kids = Reaper::default();

    // The per-line shell subscriber, tied to its script by fifobus connect.
    let perline_out = tmp.join("perline.out");
    kids.0.push(
        Command::new("bash")
            .args(["-c", PER_LINE_SUB])
            .env("FB", bin())
            .env("FIFOBUS_DIR", &bus.dir)
            .env("OUT", &perline_out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let perline_dir = tmp.join("perline.out.dir");
    assert!(
        wait_for(&perline_dir, T, || fs::read_to_string(&perline_dir)
            .is_ok_and(|s| s.ends_with('\n'))),
        "the shell subscriber did not connect"
    );
    let perline_dir = PathBuf::from(fs::read_to_string(&perline_dir).unwrap().trim());

    // The open-once Python subscriber, its client tied to its pid.
    let python_out = tmp.join("python.out");
    let mut python = Command::new("python3")
        .args(["-c", OPEN_ONCE_SUB])
        .arg(&python_out)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let py = bus.connect_opts(ConnectOptions {
        name: Some("python".into()),
        pid: Some(python.id() as i32),
        subs: vec![pattern("t.>")],
    });
    let (py_id, py_dir) = py.into_parts();
    writeln!(python.stdin.take().unwrap(), "{}", py_dir.display()).unwrap();
    kids.0.push(python);

    // A client whose process will be gone when the new broker starts.
    let mut doomed = Command::new("sleep").arg("600").spawn().unwrap();
    let doomed_client = bus.connect_opts(ConnectOptions {
        name: Some("doomed".into()),
        pid: Some(doomed.id() as i32),
        subs: vec![pattern("t.>")],
    });
    let doomed_dir = doomed_client.dir().to_owned();
    drop(doomed_client);

    // The publisher: the test, holding its FIFOs open.
    let publisher = bus.connect_opts(with_pid("publisher", &[]));
    let pub_dir = publisher.dir().to_owned();
    let (mut send, recv) = publisher.into_files().unwrap();
    let mut recv = Lines::new(recv);
    assert!(ping(&mut send, &mut recv, "ready").is_empty());
    // Every subscriber is subscribed: their sub= is in force before WELCOME.

    const BEFORE: usize = 3000;
    const AFTER: usize = 3000;
    let mut batch = Vec::new();
    for i in 0..BEFORE {
        batch.extend_from_slice(format!("PUB t.n {i}\n").as_bytes());
    }
    send.write_all(&batch).unwrap();
    // In the middle of the stream: some of it is in the broker's outboxes,
    // some in the subscribers' pipes, some maybe still in send.
    let old = bus.pid();
    bus.stop(Signal::SIGKILL);
    kill(Pid::from_raw(doomed.id() as i32), Signal::SIGKILL).unwrap();
    doomed.wait().unwrap();

    bus.spawn(&[]);
    assert_ne!(bus.pid(), old);
    assert!(
        bus.wait_log("adopted 3 clients"),
        "log:\n{}",
        bus.log_text()
    );
    let log = bus.log_text();
    assert!(
        log.contains("removed 1"),
        "the doomed client was not removed:\n{log}"
    );
    assert!(
        wait_gone(&doomed_dir, T),
        "the doomed client's directory is left"
    );
    for d in [&perline_dir, &py_dir, &pub_dir] {
        assert!(
            d.join("send").exists() && d.join("recv").exists(),
            "{} lost its FIFOs",
            d.display()
        );
    }
    assert!(py_dir.ends_with(&py_id), "the python client keeps its uuid");

    // The same FIFOs, no new handshake: the publisher goes on writing.
    let mut batch = Vec::new();
    for i in BEFORE..BEFORE + AFTER {
        batch.extend_from_slice(format!("PUB t.n {i}\n").as_bytes());
    }
    batch.extend_from_slice(b"PUB t.end x\n");
    send.write_all(&batch).unwrap();
    let before_pong = ping(&mut send, &mut recv, "after");
    assert_eq!(
        before_pong.first().map(String::as_str),
        Some("DROPPED ? restart"),
        "the publisher's first line after the restart: {before_pong:?}"
    );
    // The dead broker may have read the first bytes of a PUB line: the new
    // one then reads the rest as a line of its own and refuses it, once
    // (docs/protocol.md, what a crash can lose). Nothing else may come.
    match &before_pong[1..] {
        [] => {}
        [cut] => assert!(
            cut.starts_with("ERR unknown-command ") || cut.starts_with("ERR bad-"),
            "only a line cut by the crash may be refused: {before_pong:?}"
        ),
        more => panic!("more than one line cut by the crash: {more:?}"),
    }

    for (who, out) in [
        ("per-line shell", &perline_out),
        ("open-once python", &python_out),
    ] {
        let done = || fs::read_to_string(out).is_ok_and(|s| s.contains("MSG t.end x\n"));
        assert!(
            wait_for(out, Duration::from_secs(60), done),
            "{who} did not get to the end; got {} lines",
            fs::read_to_string(out).unwrap_or_default().lines().count()
        );
        let lines: Vec<String> = fs::read_to_string(out)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        check_stream(who, &lines, BEFORE + AFTER, AFTER);
    }
    for c in &mut kids.0 {
        let status = wait_child(c, T).expect("a subscriber did not exit after t.end");
        assert!(status.success(), "a subscriber failed: {status}");
    }
}

#[test]
fn adopted_clients_keep_subscriptions_and_a_client_blocked_in_open_proceeds() {
    let mut bus = TempBus::start();
    let held = bus.connect_opts(with_pid("held", &["a.>"]));
    let held_id = held.id().to_owned();
    let held_dir = held.dir().to_owned();
    let (mut send, recv) = held.into_files().unwrap();
    let mut recv = Lines::new(recv);
    writeln!(send, "SUB b.*").unwrap();
    assert!(ping(&mut send, &mut recv, "1").is_empty());
    // The SUB is on disk (coalesced, so wait for it) before the crash.
    let file = state_dir(&bus).join(&held_id);
    assert!(wait_for(&file, T, || state_of(&bus, &held_id).contains("sub b.*\n")));
    // A pid-less client: adopted, then under the orphan rules as before.
    let orphan = bus.connect_opts(ConnectOptions {
        name: Some("orphan".into()),
        pid: None,
        subs: vec![pattern("a.x")],
    });
    let orphan_dir = orphan.dir().to_owned();
    // The test lets go of it: only the shell below will open its recv.
    drop(orphan);

    bus.stop(Signal::SIGKILL);
    // Broker dead: a per-line reader blocks in open() of recv (no writer).
    let script = format!(
        "IFS= read -r l < '{}/recv'; printf '%s\\n' \"$l\"; IFS= read -r l < '{}/recv'; printf '%s\\n' \"$l\"",
        orphan_dir.display(),
        orphan_dir.display()
    );
    let mut reader = Command::new("bash")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let syscall = format!("/proc/{}/syscall", reader.id());
    let deadline = Instant::now() + T;
    // Bounded poll of the kernel's view: the shell is inside openat (257).
    while !fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with("257 ")) {
        assert!(
            Instant::now() < deadline,
            "the shell never blocked in open()"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    bus.spawn(&[]);
    assert!(
        bus.wait_log("adopted 2 clients"),
        "log:\n{}",
        bus.log_text()
    );
    // Same uuid and directory, both subscriptions in force.
    assert!(held_dir.ends_with(&held_id) && held_dir.exists());
    assert_eq!(state_of(&bus, &held_id).matches("\nsub ").count(), 2);
    let mut p = bus.connect("pub", &[]);
    p.send_raw(b"PUB a.x one\nPUB b.y two\nPUB c.z three\n")
        .unwrap();
    barrier(&mut p);
    let got = ping(&mut send, &mut recv, "2");
    assert_eq!(got, vec!["DROPPED ? restart", "MSG a.x one", "MSG b.y two"]);
    // The shell blocked in open() proceeded and read the orphan's lines.
    let status = wait_child(&mut reader, T).expect("the shell stayed blocked");
    assert!(status.success());
    let mut out = String::new();
    reader
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "DROPPED ? restart\nMSG a.x one\n");
}

#[test]
fn torn_or_garbled_state_files_cost_only_their_client() {
    let mut bus = TempBus::start();
    let mut clients: Vec<Client> = (0..3)
        .map(|i| bus.connect_opts(with_pid(&format!("c{i}"), &["t.>"])))
        .collect();
    for c in &mut clients {
        barrier(c);
    }
    let ids: Vec<String> = clients.iter().map(|c| c.id().to_owned()).collect();
    let dirs: Vec<PathBuf> = clients.iter().map(|c| c.dir().to_owned()).collect();
    bus.stop(Signal::SIGKILL);
    let torn = state_dir(&bus).join(&ids[0]);
    let text = fs::read_to_string(&torn).unwrap();
    fs::write(&torn, &text[..text.len() / 2]).unwrap();
    let garbled = state_dir(&bus).join(&ids[1]);
    fs::write(&garbled, b"\x00\x17garbage\nsub >\nend\n").unwrap();

    bus.spawn(&[]);
    assert!(
        bus.wait_log("adopted 1 client "),
        "log:\n{}",
        bus.log_text()
    );
    let log = bus.log_text();
    for p in [&torn, &garbled] {
        let line = log
            .lines()
            .find(|l| l.contains(&p.display().to_string()))
            .unwrap_or_else(|| panic!("{} not reported:\n{log}", p.display()));
        assert!(line.contains("removed"), "{line}");
    }
    assert!(log.contains("removed 2"), "{log}");
    assert!(wait_gone(&dirs[0], T) && wait_gone(&dirs[1], T));
    assert!(!torn.exists() && !garbled.exists());
    // The third is served as before.
    let mut p = bus.connect("pub", &[]);
    p.send_raw(b"PUB t.x still\n").unwrap();
    barrier(&mut p);
    let got = barrier(&mut clients[2]);
    assert_eq!(got, vec!["DROPPED ? restart", "MSG t.x still"]);
}

/// One unlabelled sample from the broker's `/metrics`.
fn metric(bus: &TempBus, name: &str) -> f64 {
    let addr = fs::read_to_string(bus.dir.join("metrics.addr")).unwrap();
    let mut s = std::net::TcpStream::connect(addr.trim()).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
        .parse()
        .unwrap()
}

/// Unmounts on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root: mounts a tmpfs"]
fn a_full_disk_while_writing_state_is_logged_and_serving_goes_on() {
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    fs::create_dir(&bus.dir).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
        .arg(&bus.dir)
        .status()
        .unwrap();
    assert!(status.success(), "mount failed");
    let _mount = Mount(bus.dir.clone());
    bus.spawn(&[]);
    let mut c = bus.connect_opts(with_pid("big", &[]));
    let id = c.id().to_owned();
    // About 200 KiB of patterns: the state file cannot fit in 64 KiB.
    let long = "x".repeat(180);
    let mut subs = Vec::new();
    for i in 0..1000 {
        subs.extend_from_slice(format!("SUB {long}.{i}\n").as_bytes());
    }
    c.send_raw(&subs).unwrap();
    assert!(barrier(&mut c).is_empty());
    assert!(
        bus.wait_log("cannot write client state"),
        "no error logged:\n{}",
        bus.log_text()
    );
    let log = bus.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("cannot write client state"))
        .unwrap();
    assert!(
        line.contains(&state_dir(&bus).join(&id).display().to_string()),
        "{line}"
    );
    assert!(
        line.contains("full") && line.contains("free space"),
        "{line}"
    );
    // Still serving: messages flow, the broker did not crash.
    c.send_raw(format!("PUB {long}.7 alive\n").as_bytes())
        .unwrap();
    assert_eq!(barrier(&mut c), vec![format!("MSG {long}.7 alive")]);
    assert!(bus.child.as_mut().unwrap().try_wait().unwrap().is_none());
    let errors = metric(&bus, "fifobus_state_write_errors_total");
    assert!(
        errors >= 1.0,
        "fifobus_state_write_errors_total is {errors}"
    );
    // Room again (fewer patterns): a later retry writes the file whole.
    let mut unsubs = Vec::new();
    for i in 10..1000 {
        unsubs.extend_from_slice(format!("UNSUB {long}.{i}\n").as_bytes());
    }
    c.send_raw(&unsubs).unwrap();
    barrier(&mut c);
    let file = state_dir(&bus).join(&id);
    assert!(
        wait_for(&file, T, || state_of(&bus, &id).matches("\nsub ").count()
            == 10
            && state_of(&bus, &id).ends_with("end\n")),
        "state never written again once there was room"
    );
    let status = bus.stop(Signal::SIGTERM);
    assert!(status.success());
}

/// A client of a throwaway user on a `--shared` bus: a bash that does the
/// handshake with `pid=$$`, prints its directory, holds `recv` open, and on
/// each line of stdin sends `PING` and prints the two lines it then reads.
const USER_CLIENT: &str = r#"
set -eu
d=$(mktemp -d); r=$d/r; mkfifo -m 600 "$r"
echo "HELLO reply=$r name=$2 pid=$$" > "$1/hello"
read -r w id cdir < "$r"; rm -rf "$d"
[ "$w" = WELCOME ] || { echo "got: $w $id $cdir" >&2; exit 1; }
exec 4<> "$cdir/recv"
echo "$cdir"
while read -r token; do
  echo "PING $token" > "$cdir/send"
  read -r a <&4; read -r b <&4
  echo "$a|$b"
done
"#;

/// The security side of adoption on a shared bus, with a real unprivileged
/// user: the user cannot read the broker's `state/`; a client whose user
/// swapped its `recv` for a symlink while no broker ran is not adopted and
/// the link is never followed (its target is untouched); the user's other
/// client, untouched, is adopted and goes on.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn shared_bus_adoption_checks_what_the_user_could_have_swapped() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::MetadataExt;
    let user = User::create("rst");
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    fs::set_permissions(bus.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    bus.spawn(&["--shared"]);
    let mut kids = Reaper::default();
    let mut outs = Vec::new();
    let mut ins = Vec::new();
    let mut dirs = Vec::new();
    for name in ["keeps", "swaps"] {
        let mut c = user
            .command("bash")
            .args(["-c", USER_CLIENT, "bash"])
            .arg(&bus.dir)
            .arg(name)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        ins.push(c.stdin.take().unwrap());
        let mut out = BufReader::new(c.stdout.take().unwrap());
        kids.0.push(c);
        let mut dir = String::new();
        out.read_line(&mut dir).unwrap();
        assert!(
            !dir.is_empty(),
            "{name} did not connect:\n{}",
            bus.log_text()
        );
        dirs.push(PathBuf::from(dir.trim()));
        outs.push(out);
    }
    // state/ is the broker's alone.
    let st = fs::metadata(state_dir(&bus)).unwrap();
    assert_eq!((st.uid(), st.mode() & 0o7777), (0, 0o700));
    let peek = user
        .command("bash")
        .args(["-c", r#"ls "$1"/state; cat "$1"/state/*"#, "bash"])
        .arg(&bus.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        !peek.status.success()
            && String::from_utf8_lossy(&peek.stderr).contains("Permission denied"),
        "the user read state/: {}",
        String::from_utf8_lossy(&peek.stdout)
    );

    bus.stop(Signal::SIGKILL);
    // While no broker runs, the user swaps its second client's recv for a
    // link to a file of root's.
    let target = bus.tmp.path().join("roots-file");
    fs::write(&target, b"root's\n").unwrap();
    let swap = user
        .command("bash")
        .args(["-c", r#"rm -f "$1/recv" && ln -s "$2" "$1/recv""#, "bash"])
        .arg(&dirs[1])
        .arg(&target)
        .status()
        .unwrap();
    assert!(swap.success());

    bus.spawn(&["--shared"]);
    assert!(
        bus.wait_log("adopted 1 client "),
        "log:\n{}",
        bus.log_text()
    );
    let log = bus.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(&dirs[1].display().to_string()) && l.contains("not adopting"))
        .unwrap_or_else(|| panic!("the swapped client is not reported:\n{log}"));
    assert!(line.contains("recv is a symlink"), "{line}");
    // What the user put there is not the broker's to remove: left, and said so.
    assert!(
        log.contains(&format!("left {} alone", dirs[1].display())),
        "{log}"
    );
    assert_eq!(
        fs::read(&target).unwrap(),
        b"root's\n",
        "the link was followed"
    );
    assert!(fs::symlink_metadata(&target).unwrap().file_type().is_file());
    // The untouched client goes on, on the same FIFOs, told of the restart.
    writeln!(ins[0], "after").unwrap();
    let mut got = String::new();
    outs[0].read_line(&mut got).unwrap();
    assert_eq!(got.trim(), "DROPPED ? restart|PONG after");
    drop(ins);
    for c in &mut kids.0 {
        let _ = c.kill();
        let _ = c.wait();
    }
    kids.0.clear();
}
