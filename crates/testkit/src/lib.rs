//! `TempBus`: a real `fifobus serve` on a private temporary directory, and
//! the waits that go with it. The one broker-spawning harness, shared by the
//! integration tests (`tests/`) and the benchmark (`crates/bench`).
//!
//! Every wait here is bounded and event-driven: readiness and removals are
//! observed with inotify, child exits with a pidfd, protocol progress with
//! the `PING`/`PONG` barrier. Nothing sleeps to synchronise. Dropping a
//! `TempBus` stops and reaps its broker and removes its directory.
//!
//! Only the broker's public client and its command line are used here;
//! nothing reaches into broker modules.

pub mod users;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fifobus::client::{Client, ConnectOptions};
use fifobus::protocol::encode_pub;
use fifobus::topic::{Pattern, Topic};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const T: Duration = Duration::from_secs(10);

/// The `fifobus` binary cargo built into the same target directory as the
/// running executable (`target/<profile>/fifobus`; test executables live in
/// `target/<profile>/deps/`). Panics when there is none.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        sibling("fifobus").unwrap_or_else(|| {
            panic!(
                "no fifobus binary next to {:?}: build it first (cargo test --workspace does)",
                std::env::current_exe().unwrap_or_default()
            )
        })
    })
}

/// The executable `name` in the running executable's directory, or in its
/// parent (for test executables in `deps/`).
pub fn sibling(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let found = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| is_executable(p));
    found
}

/// The executable `name` next to the running executable, else on `PATH`.
pub fn sibling_or_on_path(name: &str) -> Option<PathBuf> {
    sibling(name).or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
    })
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// How a [`TempBus`] runs its broker. The default is what the integration
/// tests want; the benchmark changes the binary, the logging and the stop.
#[derive(Debug, Clone)]
pub struct BusOptions {
    /// The broker binary [default: [`bin()`]].
    pub program: PathBuf,
    /// Arguments after `serve --dir DIR --metrics-addr 127.0.0.1:0`, before
    /// those given to [`TempBus::spawn`] (later ones win).
    pub args: Vec<OsString>,
    /// The broker's `RUST_LOG` [default: `debug`].
    pub rust_log: String,
    /// The broker's stderr goes to [`TempBus::log`] (true, the default) or
    /// to this process's stderr.
    pub log_to_file: bool,
    /// On drop: `SIGTERM` and this long to exit before `SIGKILL`; `None`
    /// (the default): `SIGKILL` at once.
    pub graceful_stop: Option<Duration>,
    /// Prefix of the temporary directory's name.
    pub prefix: &'static str,
}

impl Default for BusOptions {
    fn default() -> Self {
        Self::new(bin())
    }
}

impl BusOptions {
    /// The defaults, with another broker binary.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        BusOptions {
            program: program.into(),
            args: Vec::new(),
            rust_log: "debug".into(),
            log_to_file: true,
            graceful_stop: None,
            prefix: "fifobus-test-",
        }
    }
}

pub struct TempBus {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub opts: BusOptions,
}

impl TempBus {
    pub fn start() -> TempBus {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> TempBus {
        let mut bus = Self::new(BusOptions::default()).unwrap();
        bus.spawn(args);
        bus
    }

    /// A bus directory with no broker yet (see [`TempBus::spawn`]).
    pub fn new(opts: BusOptions) -> io::Result<TempBus> {
        let tmp = temp_dir(opts.prefix)?;
        let dir = tmp.path().join("bus");
        let log = tmp.path().join("broker.log");
        Ok(TempBus {
            tmp,
            dir,
            log,
            child: None,
            opts,
        })
    }

    /// Starts a broker with `opts` and `args` and waits until it serves.
    ///
    /// # Errors
    /// When the directory or the broker cannot be created, or the broker
    /// exits or does not serve within [`T`].
    pub fn try_start(opts: BusOptions, args: &[&str]) -> io::Result<TempBus> {
        let mut bus = Self::new(opts)?;
        bus.try_spawn(args)?;
        Ok(bus)
    }

    /// Starts a broker on this bus's directory and waits until it serves.
    pub fn spawn(&mut self, args: &[&str]) {
        if let Err(e) = self.try_spawn(args) {
            panic!("broker did not start ({e}); log:\n{}", self.log_text());
        }
    }

    /// [`TempBus::spawn`], returning an error instead of panicking.
    ///
    /// # Errors
    /// When the broker cannot be spawned, exits, or does not serve within [`T`].
    pub fn try_spawn(&mut self, args: &[&str]) -> io::Result<()> {
        assert!(self.child.is_none(), "a broker is already running");
        let child = self.spawn_raw_checked(args)?;
        self.child = Some(child);
        // The broker removes a stale `hello` (left by a killed broker), then
        // writes its pid file, and publishes `hello` last. So read the pid
        // file first: once it names this broker, any `hello` seen afterwards
        // is its own. (Reading `hello` first raced: a stale one could be
        // seen just before the new pid was written.)
        let hello = self.dir.join("hello");
        let pid = self.pid().to_string();
        let pid_file = self.dir.join("broker.pid");
        let serving =
            || fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == pid) && hello.exists();
        let ready = wait_for(&hello, T, || serving() || self.exited());
        if ready && serving() {
            return Ok(());
        }
        let program = self.opts.program.display().to_string();
        match self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            Some(status) => Err(io::Error::other(format!(
                "the broker {program} exited at start: {status}"
            ))),
            None => Err(io::Error::other(format!(
                "the broker {program} did not start within {T:?}"
            ))),
        }
    }

    /// Spawns `fifobus serve` on this directory without waiting for it.
    pub fn spawn_raw(&self, args: &[&str]) -> Child {
        self.spawn_raw_checked(args).unwrap()
    }

    fn spawn_raw_checked(&self, args: &[&str]) -> io::Result<Child> {
        let stderr = if self.opts.log_to_file {
            Stdio::from(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)?,
            )
        } else {
            Stdio::inherit()
        };
        Command::new(&self.opts.program)
            .arg("serve")
            .arg("--dir")
            .arg(&self.dir)
            // A free port per broker, so tests can run in parallel; a
            // test's own --metrics-addr comes later and wins.
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(&self.opts.args)
            .args(args)
            .env("RUST_LOG", &self.opts.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot run {}: {e}", self.opts.program.display()),
                )
            })
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
            let stopped = self.opts.graceful_stop.is_some_and(|grace| {
                kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).is_ok()
                    && wait_child(&mut c, grace).is_some()
            });
            if !stopped {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("broker log:\n{}", self.log_text());
        }
    }
}

/// A temporary directory for a bus: on tmpfs when the machine has one, as
/// real bus directories are (`$XDG_RUNTIME_DIR`), else in the default temp dir.
pub fn temp_root() -> tempfile::TempDir {
    temp_dir("fifobus-test-").unwrap()
}

/// [`temp_root`] with another name prefix, returning errors.
///
/// # Errors
/// When no temporary directory can be created.
pub fn temp_dir(prefix: &str) -> io::Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    b.tempdir_in("/dev/shm").or_else(|_| b.tempdir())
}

/// Raises this process's open-file limit as far as allowed: to the hard
/// limit, and as root beyond it, up to `fs.nr_open`. For clients that hold
/// many FIFOs (the benchmark holds one per subscriber). Returns the soft
/// limit now in force.
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let nr_open = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    if nr_open > hard && setrlimit(Resource::RLIMIT_NOFILE, nr_open, nr_open).is_ok() {
        return nr_open;
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Waits for a child to exit (pidfd + poll), then reaps it.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let pidfd = rustix::process::Pid::from_raw(child.id() as i32)
        .map(|pid| rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()));
    if let Some(Ok(fd)) = pidfd {
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

/// A `HELLO` line (with its newline) naming `reply` and, if given, `name`:
/// for tests that write to `hello` themselves rather than through the client.
pub fn hello_line(reply: &Path, name: Option<&str>) -> String {
    hello_line_with(reply, name, None)
}

/// [`hello_line`] with a `pid=`.
pub fn hello_line_with(reply: &Path, name: Option<&str>, pid: Option<u32>) -> String {
    let line = fifobus::protocol::Hello {
        reply: reply.to_owned(),
        name: name.map(str::to_owned),
        pid: pid.map(|p| p as i32),
        subs: Vec::new(),
        no_echo: false,
    }
    .encode()
    .expect("a test's HELLO encodes");
    String::from_utf8(line).expect("test paths are UTF-8")
}

/// The one fenced code block of `file` (a path relative to the repository)
/// that holds `marker`: documented recipes are tested as written.
///
/// # Panics
/// When the file cannot be read, or not exactly one block holds `marker`.
pub fn doc_block(file: &str, marker: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = fs::read_to_string(root.join(file)).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            match current.take() {
                Some(b) => blocks.push(b),
                None => current = Some(String::new()),
            }
        } else if let Some(b) = current.as_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    let found: Vec<_> = blocks.into_iter().filter(|b| b.contains(marker)).collect();
    assert_eq!(found.len(), 1, "{file}: one code block with {marker:?}");
    found.into_iter().next().unwrap()
}
