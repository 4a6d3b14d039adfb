//! Pipe memory: a quiet client's FIFOs cost one page each of the user's
//! pipe budget (`fs.pipe-user-pages-soft`); a FIFO grows while its traffic
//! fills it and shrinks back once it is read and quiet.
//!
//! A descriptor the test opens on a client's `recv` or `send` refers to the
//! same pipe as the broker's, so `F_GETPIPE_SZ` on it reads the size the
//! broker set.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Stdio};

use common::users::User;
use common::*;
use fifobus::client::Client;

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Opens a FIFO read-only without blocking and without reading from it:
/// only to ask the kernel about the pipe.
fn probe(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap()
}

fn pipe_size(fd: RawFd) -> usize {
    use nix::fcntl::{fcntl, FcntlArg};
    fcntl(fd, FcntlArg::F_GETPIPE_SZ).unwrap() as usize
}

fn unread(fd: RawFd) -> usize {
    fifobus::fifo::unread_bytes(fd).unwrap()
}

/// `n` messages of `size` bytes on `t`, in one buffer: what a subscriber of
/// `t` receives is `n` lines of `MSG t <payload>\n`.
fn burst(n: usize, size: usize) -> (Vec<u8>, usize) {
    let payload = "x".repeat(size);
    let lines = pub_lines((0..n).map(|_| ("t", payload.as_bytes())));
    (lines, n * format!("MSG t {payload}\n").len())
}

#[test]
fn a_new_clients_fifos_have_one_page() {
    let bus = TempBus::start();
    let c = bus.connect("quiet", &["t"]);
    for name in ["send", "recv"] {
        let f = probe(&c.dir().join(name));
        assert_eq!(pipe_size(f.as_raw_fd()), page(), "{name} of a new client");
    }
    // The client's own descriptor is on the same pipe.
    assert_eq!(pipe_size(raw_fd(&c)), page());
}

/// Sends a burst of about 24 KiB to `sub`, which does not read yet, and
/// waits until the broker has written all of it into `recv`: that needs
/// `recv` to have grown past a page. Returns the probe on `recv`.
fn burst_to_a_slow_reader(bus: &TempBus, sub: &Client) -> File {
    let recv = probe(&sub.dir().join("recv"));
    assert_eq!(pipe_size(recv.as_raw_fd()), page());
    let (lines, delivered) = burst(24, 1000);
    let mut publisher = bus.connect("pub", &[]);
    publisher.send_raw(&lines).unwrap();
    // After the publisher's PONG, every MSG is in sub's outbox; the writer
    // moves them into recv, growing it, and each write is an inotify event
    // on recv.
    barrier(&mut publisher);
    let all_written = wait_for(&sub.dir().join("recv"), T, || {
        unread(recv.as_raw_fd()) >= delivered
    });
    assert!(
        all_written,
        "recv holds {} of {delivered} bytes at {} bytes: it did not grow",
        unread(recv.as_raw_fd()),
        pipe_size(recv.as_raw_fd())
    );
    let size = pipe_size(recv.as_raw_fd());
    assert!(
        size > page() && size >= delivered && size <= 64 * 1024,
        "recv holds {delivered} unread bytes at {size} bytes"
    );
    recv
}

#[test]
fn recv_grows_for_a_burst_and_shrinks_once_read() {
    // --pipe-idle 0s: the writer shrinks recv as soon as it finds it read,
    // which makes the moment observable through PING/PONG.
    let bus = TempBus::start_with(&["--pipe-idle", "0s"]);
    let mut sub = bus.connect("sub", &["t"]);
    let recv = burst_to_a_slow_reader(&bus, &sub);

    // The first PONG comes after the burst: reading it reads recv empty.
    let before = barrier(&mut sub);
    assert_eq!(before.len(), 24, "{before:?}");
    assert_eq!(unread(recv.as_raw_fd()), 0);
    // The second PONG is written after the writer found recv read, which
    // is where it shrinks.
    assert!(barrier(&mut sub).is_empty());
    assert_eq!(
        pipe_size(recv.as_raw_fd()),
        page(),
        "recv after it was read"
    );

    // And it grows again for the next burst.
    let recv = burst_to_a_slow_reader(&bus, &sub);
    assert_eq!(barrier(&mut sub).len(), 24);
    drop(recv);
}

#[test]
fn recv_shrinks_after_pipe_idle_with_no_more_traffic() {
    // No later batch comes by: the session's one timer does it.
    let bus = TempBus::start_with(&["--pipe-idle", "200ms"]);
    let mut sub = bus.connect("sub", &["t"]);
    let recv = burst_to_a_slow_reader(&bus, &sub);
    assert_eq!(barrier(&mut sub).len(), 24);
    let path = sub.dir().join("recv");
    let shrunk = wait_for(&path, T, || pipe_size(recv.as_raw_fd()) == page());
    assert!(
        shrunk,
        "recv still has {} bytes after it was read and idle",
        pipe_size(recv.as_raw_fd())
    );
}

#[test]
fn send_grows_for_a_bulk_publisher() {
    // --pipe-idle 1h: nothing shrinks it back during the test.
    let bus = TempBus::start_with(&["--pipe-idle", "1h"]);
    let mut publisher = bus.connect("pub", &[]);
    let send = probe(&publisher.dir().join("send"));
    // 256 KiB in one write: the client's write fills the one-page pipe and
    // blocks until the broker reads it, again and again.
    let (lines, _) = burst(256, 1000);
    publisher.send_raw(&lines).unwrap();
    barrier(&mut publisher);
    let size = pipe_size(send.as_raw_fd());
    assert!(
        size > page() && size <= 64 * 1024,
        "send of a bulk publisher has {size} bytes"
    );
}

#[test]
fn send_shrinks_once_the_publisher_is_quiet() {
    let bus = TempBus::start_with(&["--pipe-idle", "0s"]);
    let mut publisher = bus.connect("pub", &[]);
    let send = probe(&publisher.dir().join("send"));
    let (lines, _) = burst(256, 1000);
    publisher.send_raw(&lines).unwrap();
    barrier(&mut publisher);
    // The reader shrinks send before it waits for the client's next write;
    // the second PING is read after that wait.
    barrier(&mut publisher);
    assert_eq!(pipe_size(send.as_raw_fd()), page());
}

/// `fs.pipe-user-pages-soft`, in pages.
fn soft_budget() -> usize {
    fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A pipe made by `user` now: the buffer the kernel gives a new pipe of
/// that user's (16 pages within the budget, 2 past it). `bash` as the user
/// makes a FIFO and opens it first (the opener is who is charged), and
/// keeps it open while the test asks the kernel about it.
fn new_pipe_of(user: &User, dir: &Path) -> usize {
    let fifo = dir.join("probe");
    let _ = fs::remove_file(&fifo);
    let mut bash = user
        .command("bash")
        .arg("-c")
        .arg(r#"mkfifo "$1" && exec 3<>"$1" && echo ready && { read -r _ || true; }"#)
        .arg("bash")
        .arg(&fifo)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(bash.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let size = pipe_size(probe(&fifo).as_raw_fd());
    drop(bash.stdin.take());
    assert!(wait_child(&mut bash, T).is_some_and(|s| s.success()));
    let _ = fs::remove_file(&fifo);
    size
}

/// The user's broker, reaped on drop.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs root: creates throwaway users"]
fn thousands_of_idle_clients_leave_the_users_pipe_budget_alone() {
    let soft = soft_budget();
    assert!(
        soft > 0,
        "fs.pipe-user-pages-soft is 0 (no budget): nothing to show here"
    );
    // Enough clients that 16-page FIFOs (32 pages a client) would spend the
    // budget four times over, and one-page FIFOs use a quarter of it.
    let clients = soft / 8;
    raise_open_file_limit();
    let user = User::create("pipes");
    let tmp = temp_root();
    let top = tmp.path();
    fs::set_permissions(top, fs::Permissions::from_mode(0o755)).unwrap();
    let home = top.join("home");
    fs::create_dir(&home).unwrap();
    nix::unistd::chown(
        &home,
        Some(nix::unistd::Uid::from_raw(user.uid)),
        Some(nix::unistd::Gid::from_raw(user.gid)),
    )
    .unwrap();
    assert_eq!(new_pipe_of(&user, &home), 16 * page(), "before the broker");

    let dir = home.join("bus");
    let log = top.join("broker.log");
    let _broker = Broker(
        user.command(bin())
            .arg("serve")
            .arg("--dir")
            .arg(&dir)
            .args(["--metrics-addr", "off"])
            .env("RUST_LOG", "info")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let hello = dir.join("hello");
    assert!(
        wait_for(&hello, T, || hello.exists()),
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );

    // The clients, as the user: raw HELLOs on one reply FIFO that the
    // script holds open, so each handshake costs no process.
    let script = r#"
        set -e
        mkfifo "$2/reply"
        exec 3<>"$2/reply"
        for ((i = 0; i < $3; i++)); do
            printf 'HELLO reply=%s name=idle%d\n' "$2/reply" "$i" > "$1/hello"
            read -r -t 10 -u 3 answer
            case $answer in WELCOME*) ;; *) echo "client $i: $answer" >&2; exit 1;; esac
        done
    "#;
    let mut helper = user
        .command("bash")
        .arg("-c")
        .arg(script)
        .arg("bash")
        .arg(&dir)
        .arg(&home)
        .arg(clients.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_child(&mut helper, 120 * T / 10).unwrap_or_else(|| {
        let _ = helper.kill();
        let _ = helper.wait();
        panic!("{clients} handshakes did not finish in time")
    });
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut helper.stderr.take().unwrap(), &mut err);
    assert!(
        status.success(),
        "{err}\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let made = fs::read_dir(dir.join("clients")).unwrap().count();
    assert_eq!(made, clients);

    // The user's other programs still get full-size pipes.
    assert_eq!(
        new_pipe_of(&user, &home),
        16 * page(),
        "a new pipe of the user with {clients} idle clients"
    );
    // What the broker's client FIFOs hold, summed.
    let mut pages = 0;
    for d in fs::read_dir(dir.join("clients")).unwrap() {
        let d = d.unwrap().path();
        for name in ["send", "recv"] {
            pages += pipe_size(probe(&d.join(name)).as_raw_fd()) / page();
        }
    }
    eprintln!("{clients} idle clients hold {pages} pages of pipe buffers (budget {soft} pages)");
    assert_eq!(pages, 2 * clients);
}
