//! `TempBus`: a real `fifobus serve` on a private temporary directory.
//!
//! Every wait here is bounded and event-driven: readiness and removals are
//! observed with inotify, child exits with a pidfd, protocol progress with
//! the `PING`/`PONG` barrier. Nothing sleeps to synchronise. Dropping a
//! `TempBus` kills and reaps its broker and removes its directory.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fifobus::client::{Client, ConnectOptions};
use fifobus::protocol::encode_pub;
use fifobus::topic::{Pattern, Topic};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const T: Duration = Duration::from_secs(10);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_fifobus")
}

pub struct TempBus {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl TempBus {
    pub fn start() -> TempBus {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> TempBus {
        let tmp = temp_root();
        let dir = tmp.path().join("bus");
        let log = tmp.path().join("broker.log");
        let mut bus = TempBus {
            tmp,
            dir,
            log,
            child: None,
        };
        bus.spawn(args);
        bus
    }

    /// Starts a broker on this bus's directory and waits until it serves.
    pub fn spawn(&mut self, args: &[&str]) {
        assert!(self.child.is_none(), "a broker is already running");
        let child = self.spawn_raw(args);
        self.child = Some(child);
        // `hello` is published last, after the pid file; a stale `hello`
        // left by a killed broker does not count.
        let hello = self.dir.join("hello");
        let pid = self.pid().to_string();
        let pid_file = self.dir.join("broker.pid");
        let serving =
            || hello.exists() && fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == pid);
        let ready = wait_for(&hello, T, || serving() || self.exited());
        if !ready || !serving() {
            panic!("broker did not start; log:\n{}", self.log_text());
        }
    }

    /// Spawns `fifobus serve` on this directory without waiting for it.
    pub fn spawn_raw(&self, args: &[&str]) -> Child {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        Command::new(bin())
            .arg("serve")
            .arg("--dir")
            .arg(&self.dir)
            // A free port per broker, so tests can run in parallel; a
            // test's own --metrics-addr comes later and wins.
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_some())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the broker's log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> bool {
        wait_for(&self.log, T, || self.log_text().contains(needle))
    }

    pub fn connect(&self, name: &str, subs: &[&str]) -> Client {
        self.connect_opts(ConnectOptions {
            name: Some(name.to_owned()),
            pid: None,
            subs: subs.iter().map(|s| s.parse().unwrap()).collect(),
        })
    }

    pub fn connect_opts(&self, opts: ConnectOptions) -> Client {
        Client::connect(&self.dir, &opts, T)
            .unwrap_or_else(|e| panic!("connect failed: {e}\nlog:\n{}", self.log_text()))
    }

    pub fn clients_dir(&self) -> PathBuf {
        self.dir.join("clients")
    }

    pub fn client_dirs(&self) -> Vec<PathBuf> {
        fs::read_dir(self.clients_dir())
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    /// Sends `sig` and waits (at most [`T`]) for the broker to exit; returns
    /// its status.
    pub fn stop(&mut self, sig: Signal) -> ExitStatus {
        let mut child = self.child.take().expect("no broker running");
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let status = wait_child(&mut child, T).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "broker did not exit within {T:?} of {sig}; log:\n{}",
                self.log_text()
            )
        });
        status
    }
}

impl Drop for TempBus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("broker log:\n{}", self.log_text());
        }
    }
}

/// A temporary directory for a bus: on tmpfs when the machine has one, as
/// real bus directories are (`$XDG_RUNTIME_DIR`), else in the default temp dir.
pub fn temp_root() -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix("fifobus-test-");
    b.tempdir_in("/dev/shm").or_else(|_| b.tempdir()).unwrap()
}

/// Waits for a child to exit (pidfd + poll), then reaps it.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    // SAFETY: pidfd_open(2) takes two integers (pid_t, unsigned flags),
    // touches no memory of ours, and returns a new descriptor or -1.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if rc >= 0 {
        // SAFETY: rc >= 0 is the descriptor pidfd_open just created, owned by
        // nothing else, so this OwnedFd becomes its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(rc as i32) };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            match poll(
                &mut fds,
                PollTimeout::try_from(left.as_millis() as i32).unwrap(),
            ) {
                Ok(0) => return None,
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("poll on pidfd: {e}"),
            }
        }
    }
    // Exited (or already reaped by try_wait), so this does not block.
    Some(child.wait().unwrap())
}

/// Waits until `done()` holds, re-checking after every inotify event on
/// `path` or its parent directory. Returns whether it held before `timeout`.
pub fn wait_for(path: &Path, timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    let parent = path.parent().unwrap();
    let mut watched_parent = false;
    let deadline = Instant::now() + timeout;
    loop {
        // Watch whatever exists of the path's ancestors: the directory may not
        // exist yet when the broker has only just been spawned.
        if !watched_parent {
            let mut p = parent;
            loop {
                if inotify.add_watch(p, AddWatchFlags::IN_ALL_EVENTS).is_ok() {
                    watched_parent = p == parent;
                    break;
                }
                match p.parent() {
                    Some(pp) => p = pp,
                    None => break,
                }
            }
            let _ = inotify.add_watch(path, AddWatchFlags::IN_ALL_EVENTS);
        }
        if done() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        // Cap each wait so that a watch added late (path created between
        // checks) or a child exit (no inotify event) is still noticed.
        let slice = left.min(Duration::from_millis(100));
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(slice.as_millis() as i32).unwrap(),
        );
        let _ = inotify.read_events();
    }
}

pub fn wait_gone(path: &Path, timeout: Duration) -> bool {
    wait_for(path, timeout, || fs::symlink_metadata(path).is_err())
}

/// Runs a shell script with a timeout; returns (status, stdout, stderr).
pub fn sh(script: &str, env: &[(&str, &OsStr)], timeout: Duration) -> (ExitStatus, String, String) {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || io::read_to_string(out).unwrap_or_default());
    let err_t = std::thread::spawn(move || io::read_to_string(err).unwrap_or_default());
    let status = wait_child(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        ExitStatus::from_raw(9 << 8)
    });
    (status, out_t.join().unwrap(), err_t.join().unwrap())
}

/// Reads lines until one equals `want` (as bytes), returning those before it.
pub fn read_until(c: &mut Client, want: &str) -> Vec<String> {
    let mut before = Vec::new();
    loop {
        let line = c
            .read_line(Some(T))
            .unwrap()
            .unwrap_or_else(|| panic!("EOF before {want:?}; got {before:?}"));
        let line = String::from_utf8_lossy(&line).into_owned();
        if line == want {
            return before;
        }
        before.push(line);
    }
}

/// `PING` barrier; returns the lines received before the `PONG`, as text.
pub fn barrier(c: &mut Client) -> Vec<String> {
    c.ping("barrier", T)
        .unwrap()
        .into_iter()
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .collect()
}

pub fn raw_fd(c: &Client) -> i32 {
    c.recv_fd().as_raw_fd()
}

pub fn topic(s: &str) -> Topic {
    s.parse().unwrap()
}

pub fn pattern(s: &str) -> Pattern {
    s.parse().unwrap()
}

/// `PUB` lines in one buffer, for tests that send a batch in one write as
/// a bulk publisher does.
pub fn pub_lines<T: AsRef<str>, P: AsRef<[u8]>>(
    messages: impl IntoIterator<Item = (T, P)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for (t, p) in messages {
        encode_pub(&mut out, &topic(t.as_ref()), p.as_ref()).unwrap();
    }
    out
}
