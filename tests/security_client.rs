//! Issue 8, item 2: clients check who runs the broker before they talk.
//!
//! `fifobus connect/pub/sub`, the documented shell recipes and the example
//! clients refuse a bus directory or `hello` that belongs to another user
//! than their own or root (or the `--bus-owner` they named), before writing
//! a byte of HELLO; their reply directory is 0700 and is removed when they
//! are killed during the handshake. Every test runs the clients as real,
//! throwaway, unprivileged users (we are root; CI runs as root).

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use fifobus_testkit::users::User;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid};

/// "At once": a refusal takes milliseconds; the old clients waited 10 s for
/// an answer that never came. Generous for a loaded CI machine.
const AT_ONCE: Duration = Duration::from_secs(5);

/// A process whose stdout lines arrive on a channel and whose stderr is
/// collected; killed and reaped on drop.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err = std::thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
        Proc {
            child,
            lines,
            err: Some(err),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Waits for the exit; returns (status, stdout, stderr), or None when it
    /// is still running after `timeout` (it is then killed and reaped).
    fn finish(mut self, timeout: Duration) -> Option<(ExitStatus, String, String)> {
        let status = wait_child(&mut self.child, timeout)?;
        let err = self.err.take().unwrap().join().unwrap();
        let out: Vec<String> = self.lines.try_iter().collect();
        Some((status, out.join("\n"), err))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory every test user can reach (root's are 0700).
fn reachable_root() -> tempfile::TempDir {
    let tmp = temp_dir("fifobus-sec-").unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

fn chown(path: &Path, uid: u32, gid: u32) {
    nix::unistd::fchownat(
        None,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn make_dir(path: &Path, owner: &User, mode: u32) {
    fs::create_dir(path).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    chown(path, owner.uid, owner.gid);
}

/// Makes the FIFO `path` owned by `owner` with `mode`, and opens it for
/// reading (without blocking) as the owner's eavesdropping end.
fn make_fifo(path: &Path, owner: &User, mode: u32) -> OwnedFd {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(mode)).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    chown(path, owner.uid, owner.gid);
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .unwrap()
        .into()
}

/// Everything in the FIFO now, without waiting.
fn drain(fd: &OwnedFd) -> String {
    let mut buf = bytes::BytesMut::with_capacity(65536);
    loop {
        buf.reserve(65536);
        match fifobus::fifo::read_into(fd.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Waits (at most [`T`]) for a complete line in the FIFO and returns all
/// that was read.
fn read_hello(fd: &OwnedFd) -> String {
    let mut got = String::new();
    let deadline = std::time::Instant::now() + T;
    while !got.ends_with('\n') {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "no HELLO within {T:?}; got {got:?}");
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(left.as_millis() as i32).unwrap(),
        );
        got.push_str(&drain(fd));
    }
    got
}

/// A bus directory another user got to first, and the one read end its
/// `hello` has.
struct Squat {
    _tmp: tempfile::TempDir,
    /// The path the victim uses.
    dir: PathBuf,
    /// What the refusal must name.
    culprit: PathBuf,
    hello: OwnedFd,
}

#[derive(Clone, Copy, Debug)]
enum SquatKind {
    /// B made the directory (and its `hello`) before A's broker started.
    Directory,
    /// A's own directory, mode 0777, whose `hello` B replaced.
    HelloReplaced,
    /// B planted a symbolic link where A's bus directory should be, to a
    /// directory of A's holding a FIFO only B's link leads to.
    Symlink,
}

fn squat(kind: SquatKind, victim: &User, squatter: &User) -> Squat {
    let tmp = reachable_root();
    let dir = tmp.path().join("bus");
    let (culprit, hello) = match kind {
        SquatKind::Directory => {
            make_dir(&dir, squatter, 0o755);
            let h = make_fifo(&dir.join("hello"), squatter, 0o622);
            (dir.clone(), h)
        }
        SquatKind::HelloReplaced => {
            make_dir(&dir, victim, 0o777);
            let h = make_fifo(&dir.join("hello"), squatter, 0o622);
            (dir.join("hello"), h)
        }
        SquatKind::Symlink => {
            let target = tmp.path().join("elsewhere");
            make_dir(&target, victim, 0o700);
            let h = make_fifo(&target.join("hello"), victim, 0o600);
            std::os::unix::fs::symlink(&target, &dir).unwrap();
            chown(&dir, squatter.uid, squatter.gid);
            (dir.clone(), h)
        }
    };
    Squat {
        _tmp: tmp,
        dir,
        culprit,
        hello,
    }
}

/// `fifobus --dir DIR ARGS...` as `user`.
fn fifobus_as(user: &User, dir: &Path, args: &[&str]) -> Command {
    let mut c = user.command(bin());
    c.arg("--dir")
        .arg(dir)
        .args(args)
        .env_remove("FIFOBUS_OWNER");
    c
}

const CLIENT_COMMANDS: [&[&str]; 3] = [
    &["pub", "chat.room", "secret plans"],
    &["sub", "chat.>"],
    &["connect", "--name", "victim", "--sub", "chat.>"],
];

#[test]
#[ignore = "needs root: creates throwaway users"]
fn builtin_clients_refuse_another_users_bus_at_once_and_send_nothing() {
    let a = User::create("victim");
    let b = User::create("squatter");
    for kind in [
        SquatKind::Directory,
        SquatKind::HelloReplaced,
        SquatKind::Symlink,
    ] {
        let s = squat(kind, &a, &b);
        for args in CLIENT_COMMANDS {
            let what = format!("{kind:?}: fifobus {}", args.join(" "));
            let (status, out, err) = Proc::spawn(fifobus_as(&a, &s.dir, args))
                .finish(AT_ONCE)
                .unwrap_or_else(|| panic!("{what}: still waiting after {AT_ONCE:?}"));
            assert!(!status.success(), "{what}: {status:?}");
            assert!(out.is_empty(), "{what}: printed {out:?}");
            let want = format!(
                "fifobus: {} belongs to uid {}, not to you (uid {}) or root: someone else may be impersonating the broker; not sending HELLO (use --bus-owner {} if you trust that user)",
                s.culprit.display(),
                b.uid,
                a.uid,
                b.uid
            );
            assert_eq!(err.trim_end(), want, "{what}");
            assert_eq!(drain(&s.hello), "", "{what}: the squatter heard the HELLO");
        }
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/clients")
}

/// The README's terminal-2 chat, the protocol's safe handshake (finishing
/// with one PUB) and the example clients, as `bash -c` scripts.
fn shell_clients(c_bin: &Path) -> Vec<(&'static str, String)> {
    let safe = doc_block("docs/protocol.md", "trap 'exit 130' INT")
        + "echo 'PUB chat.room from the safe recipe' > \"$cdir/send\"\n";
    vec![
        ("README chat", doc_block("README.md", "name=bob")),
        ("protocol.md safe handshake", safe),
        (
            "chat.sh",
            format!(
                "echo hi | '{}' sh room",
                examples().join("chat.sh").display()
            ),
        ),
        (
            "chat.py",
            format!(
                "echo hi | '{}' py room",
                examples().join("chat.py").display()
            ),
        ),
        ("chat.c", format!("echo hi | '{}' cc room", c_bin.display())),
    ]
}

fn build_c_client(out: &Path) -> PathBuf {
    let bin = out.join("chat");
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-O2", "-o"])
        .arg(&bin)
        .arg(examples().join("chat.c"))
        .status()
        .expect("a C compiler (cc) is needed for this test: apt-get install gcc");
    assert!(status.success(), "chat.c does not compile");
    bin
}

/// A directory of root's with the compiled chat.c, which users may run.
fn c_client() -> (tempfile::TempDir, PathBuf) {
    let tmp = reachable_root();
    let bin = build_c_client(tmp.path());
    (tmp, bin)
}

#[test]
#[ignore = "needs root: creates throwaway users"]
fn shell_recipes_and_example_clients_refuse_another_users_bus() {
    let a = User::create("victim");
    let b = User::create("squatter");
    let (_c_tmp, c_bin) = c_client();
    for kind in [SquatKind::Directory, SquatKind::HelloReplaced] {
        let s = squat(kind, &a, &b);
        for (what, script) in shell_clients(&c_bin) {
            let what = format!("{kind:?}: {what}");
            let mut cmd = a.command("bash");
            cmd.arg("-c")
                .arg(&script)
                .env("FIFOBUS_DIR", &s.dir)
                .env_remove("TMPDIR");
            let (status, _out, err) = Proc::spawn(cmd)
                .finish(AT_ONCE)
                .unwrap_or_else(|| panic!("{what}: still waiting after {AT_ONCE:?}"));
            assert!(!status.success(), "{what}: {status:?}");
            assert!(
                err.contains(&format!("{} belongs to uid {}", s.culprit.display(), b.uid))
                    && err.contains("not your broker"),
                "{what}: {err}"
            );
            assert_eq!(drain(&s.hello), "", "{what}: the squatter heard the HELLO");
        }
    }
}

/// The documented recipes and the example clients still work against a
/// broker of the user's own (as root here: root's bus, root's client).
#[test]
#[ignore = "needs python3 and a C compiler: apt-get install python3 gcc libc6-dev, then cargo test -- --include-ignored"]
fn shell_recipes_and_example_clients_still_talk_to_their_own_broker() {
    let bus = TempBus::start();
    let mut watcher = bus.connect("watcher", &["chat.>"]);
    barrier(&mut watcher);
    let (_c_tmp, c_bin) = c_client();
    for (what, script) in shell_clients(&c_bin) {
        let (status, _out, err) = sh(&script, &[("FIFOBUS_DIR", bus.dir.as_os_str())], T);
        assert!(status.success(), "{what}: {status:?} {err}");
        let line = watcher.read_line(Some(T)).unwrap().unwrap();
        assert!(
            String::from_utf8_lossy(&line).starts_with("MSG chat."),
            "{what}: {}",
            String::from_utf8_lossy(&line)
        );
    }
}

#[test]
#[ignore = "needs root: creates throwaway users"]
fn a_bus_run_by_root_is_trusted() {
    let a = User::create("user");
    // A stub: root's directory and root's FIFO, read by the test.
    let tmp = reachable_root();
    let dir = tmp.path().join("bus");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let hello_path = dir.join("hello");
    nix::unistd::mkfifo(&hello_path, nix::sys::stat::Mode::from_bits_truncate(0o622)).unwrap();
    fs::set_permissions(&hello_path, fs::Permissions::from_mode(0o622)).unwrap();
    let hello: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&hello_path)
        .unwrap()
        .into();
    let (status, _, err) = Proc::spawn(fifobus_as(
        &a,
        &dir,
        &["connect", "--name", "to-root", "--timeout", "200ms"],
    ))
    .finish(T)
    .expect("connect --timeout 200ms ends");
    assert!(!status.success());
    assert!(err.contains("did not answer"), "{err}");
    assert!(
        drain(&hello).starts_with("HELLO reply="),
        "the HELLO went to root's hello"
    );

    // A real broker run by root: the shared system bus. A's client gets
    // all the way through: WELCOME, and its own FIFOs it can open.
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    fs::set_permissions(bus.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    bus.spawn(&["--shared"]);
    let (status, out, err) =
        Proc::spawn(fifobus_as(&a, &bus.dir, &["connect", "--name", "to-root"]))
            .finish(T)
            .expect("connect ends");
    assert!(status.success(), "{err}\n{}", bus.log_text());
    let cdir = fs::metadata(out.trim()).unwrap();
    assert_eq!(cdir.uid(), a.uid, "the client directory is A's");
    let (status, _, err) = Proc::spawn(fifobus_as(&a, &bus.dir, &["pub", "chat.room", "to-root"]))
        .finish(T)
        .expect("pub ends");
    assert!(status.success(), "{err}\n{}", bus.log_text());
}

#[test]
#[ignore = "needs root: creates throwaway users"]
fn bus_owner_makes_another_users_bus_trusted() {
    let a = User::create("user");
    let b = User::create("owner");
    let s = squat(SquatKind::Directory, &a, &b);

    // --bus-owner UID, with connect: it says HELLO there, then times out.
    let uid = b.uid.to_string();
    let (status, _, err) = Proc::spawn(fifobus_as(
        &a,
        &s.dir,
        &["connect", "--bus-owner", &uid, "--timeout", "200ms"],
    ))
    .finish(T)
    .expect("connect --timeout 200ms ends");
    assert!(!status.success());
    assert!(err.contains("did not answer"), "{err}");
    assert!(drain(&s.hello).starts_with("HELLO reply="));

    // FIFOBUS_OWNER=NAME, with sub: the HELLO arrives with its patterns.
    let mut cmd = fifobus_as(&a, &s.dir, &["sub", "chat.>"]);
    cmd.env("FIFOBUS_OWNER", &b.name);
    let sub = Proc::spawn(cmd);
    let hello = read_hello(&s.hello);
    assert!(
        hello.starts_with("HELLO reply=") && hello.contains(" sub=chat.>"),
        "{hello}"
    );
    kill(sub.pid(), Signal::SIGTERM).unwrap();
    let (status, _, _) = sub.finish(T).expect("sub dies of SIGTERM");
    assert_eq!(status.signal(), Some(libc::SIGTERM));

    // Another user than the one named is still refused.
    let c = User::create("other");
    let (status, _, err) = Proc::spawn(fifobus_as(
        &a,
        &s.dir,
        &["pub", "--bus-owner", &c.name, "chat.room", "x"],
    ))
    .finish(AT_ONCE)
    .expect("refused at once");
    assert!(!status.success());
    assert!(
        err.contains(&format!("belongs to uid {}", b.uid))
            && err.contains(&format!("or the bus owner you named (uid {})", c.uid)),
        "{err}"
    );
    assert_eq!(drain(&s.hello), "");

    // A name that is no user is a usage error.
    let (status, _, err) = Proc::spawn(fifobus_as(
        &a,
        &s.dir,
        &["connect", "--bus-owner", "no-such-user-fifobus"],
    ))
    .finish(AT_ONCE)
    .expect("refused at once");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("no-such-user-fifobus"), "{err}");
    assert_eq!(drain(&s.hello), "");
}

#[test]
#[ignore = "needs root: creates throwaway users"]
fn reply_directory_is_private_and_removed_when_killed_during_the_handshake() {
    let a = User::create("user");
    // A "broker" of A's own that reads HELLO and never answers.
    let tmp = reachable_root();
    let dir = tmp.path().join("bus");
    make_dir(&dir, &a, 0o700);
    let hello = make_fifo(&dir.join("hello"), &a, 0o600);
    // A's temporary directory, where its reply directory goes.
    let user_tmp = tmp.path().join("tmp");
    make_dir(&user_tmp, &a, 0o700);

    let cases: [(&[&str], Signal); 4] = [
        (&["pub", "chat.room", "hi"], Signal::SIGTERM),
        (&["sub", "chat.>"], Signal::SIGINT),
        (&["connect"], Signal::SIGTERM),
        (&["connect"], Signal::SIGINT),
    ];
    for (args, sig) in cases {
        let what = format!("fifobus {} killed by {sig}", args.join(" "));
        let mut cmd = fifobus_as(&a, &dir, args);
        cmd.env("TMPDIR", &user_tmp);
        let client = Proc::spawn(cmd);
        let line = read_hello(&hello);
        let reply = line
            .split(' ')
            .find_map(|f| f.strip_prefix("reply="))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{what}: no reply= in {line:?}"));
        let reply_dir = reply.parent().unwrap().to_owned();
        assert!(reply_dir.starts_with(&user_tmp), "{what}: {reply_dir:?}");
        let meta = fs::symlink_metadata(&reply_dir).unwrap();
        assert_eq!(
            meta.mode() & 0o7777,
            0o700,
            "{what}: reply directory {} is {:o}",
            reply_dir.display(),
            meta.mode() & 0o7777
        );
        assert_eq!(meta.uid(), a.uid);
        kill(client.pid(), sig).unwrap();
        let (status, _, err) = client
            .finish(T)
            .unwrap_or_else(|| panic!("{what}: still running {T:?} after the signal"));
        assert_eq!(
            status.signal(),
            Some(sig as i32),
            "{what}: {status:?} {err}"
        );
        assert!(
            fs::symlink_metadata(&reply_dir).is_err(),
            "{what}: {} was left behind",
            reply_dir.display()
        );
    }
    assert_eq!(
        fs::read_dir(&user_tmp).unwrap().count(),
        0,
        "nothing left in the user's temporary directory"
    );
}

#[test]
#[ignore = "needs root: creates throwaway users"]
fn sub_still_dies_of_sigint_after_the_handshake() {
    let a = User::create("user");
    let tmp = reachable_root();
    let home = tmp.path().join("home");
    make_dir(&home, &a, 0o700);
    let dir = home.join("bus");
    // A's own broker, on a directory it makes: trusted as the user's own.
    let mut broker = a.command(bin());
    broker
        .arg("serve")
        .arg("--dir")
        .arg(&dir)
        .args(["--metrics-addr", "off"]);
    let broker = Proc::spawn(broker);
    assert!(wait_for(&dir.join("hello"), T, || dir
        .join("hello")
        .exists()));

    let sub = Proc::spawn(fifobus_as(&a, &dir, &["sub", "chat.>"]));
    let clients = dir.join("clients");
    assert!(wait_for(&clients, T, || fs::read_dir(&clients)
        .is_ok_and(|mut d| d.next().is_some())));
    let (status, _, err) = Proc::spawn(fifobus_as(&a, &dir, &["pub", "chat.room", "hi"]))
        .finish(T)
        .expect("pub ends");
    assert!(status.success(), "{err}");
    assert_eq!(sub.lines.recv_timeout(T).as_deref(), Ok("hi"));
    kill(sub.pid(), Signal::SIGINT).unwrap();
    let (status, _, err) = sub.finish(T).expect("sub dies of SIGINT");
    assert_eq!(status.signal(), Some(libc::SIGINT), "{err}");

    kill(broker.pid(), Signal::SIGTERM).unwrap();
    let (status, _, err) = broker.finish(T).expect("the broker stops");
    assert!(status.success(), "{err}");
}
