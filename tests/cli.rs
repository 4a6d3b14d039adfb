//! The command-line contract: `fifobus connect`, `pub` and `sub` run as real
//! processes against a real broker, with their exit statuses and output.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};

use common::*;
use nix::sys::signal::{killpg, Signal};
use nix::sys::stat::Mode;
use nix::unistd::Pid;

/// `fifobus --dir DIR ARGS...`.
fn fifobus(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("--dir").arg(dir).args(args);
    cmd
}

/// `bash -c SCRIPT` with `$B` set to the fifobus binary.
fn bash(script: &str, env: &[(&str, &OsStr)]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .env("B", bin())
        .envs(env.iter().map(|(k, v)| (*k, *v)));
    cmd
}

/// A spawned process in its own process group, with stdout read line by
/// line and stderr read whole, each in a thread. Dropping it before
/// [`Proc::finish`] kills the whole group and reaps the process.
struct Proc {
    child: Option<Child>,
    out: Receiver<String>,
    err: Receiver<String>,
}

impl Proc {
    fn start(mut cmd: Command, stdin: Option<Vec<u8>>) -> Proc {
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        let mut child = cmd.spawn().unwrap();
        if let Some(data) = stdin {
            let mut w = child.stdin.take().unwrap();
            // Ends by itself: at the end of the data, or with EPIPE once the
            // process is gone.
            std::thread::spawn(move || {
                let _ = w.write_all(&data);
            });
        }
        let (out_tx, out) = mpsc::channel();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || loop {
            let mut line = Vec::new();
            match stdout.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if out_tx
                        .send(String::from_utf8_lossy(&line).into_owned())
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        let (err_tx, err) = mpsc::channel();
        let mut stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            let _ = err_tx.send(s);
        });
        Proc {
            child: Some(child),
            out,
            err,
        }
    }

    /// The next line of stdout, newline included.
    fn line(&self) -> String {
        match self.out.recv_timeout(T) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => panic!("no line on stdout within {T:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("stdout closed before a line came"),
        }
    }

    /// Whether the process is still running (not exited, not reaped).
    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits for the process to exit; returns (status, rest of stdout, stderr).
    fn finish(mut self) -> (ExitStatus, String, String) {
        let status = wait_child(self.child.as_mut().unwrap(), T)
            .unwrap_or_else(|| panic!("process did not exit within {T:?}"));
        self.child = None;
        let mut out = String::new();
        loop {
            match self.out.recv_timeout(T) {
                Ok(l) => out.push_str(&l),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("stdout still open {T:?} after exit"),
            }
        }
        let err = self
            .err
            .recv_timeout(T)
            .unwrap_or_else(|e| panic!("stderr not closed after exit: {e}"));
        (status, out, err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

fn run(cmd: Command) -> (ExitStatus, String, String) {
    Proc::start(cmd, None).finish()
}

fn run_with_stdin(cmd: Command, stdin: &[u8]) -> (ExitStatus, String, String) {
    Proc::start(cmd, Some(stdin.to_vec())).finish()
}

/// Waits until the client started by the command under test exists. The
/// broker subscribes a client's `sub=` patterns before it creates the
/// client's directory, so once it appears a publish reaches it. `name` is
/// only for the failure message: tests start one such client at a time.
fn wait_joined(bus: &TempBus, name: &str) {
    assert!(
        wait_for(&bus.clients_dir(), T, || !bus.client_dirs().is_empty()),
        "{name} did not join"
    );
}

/// Waits until every client has gone and its directory with it.
fn wait_no_clients(bus: &TempBus) {
    assert!(
        wait_for(&bus.clients_dir(), T, || bus.client_dirs().is_empty()),
        "clients left: {:?}",
        bus.client_dirs()
    );
}

/// Publishes (topic, payload) pairs in one write from a harness client,
/// which then leaves.
fn publish(bus: &TempBus, messages: &[(&str, &str)]) {
    let mut p = bus.connect("test-publisher", &[]);
    p.send_raw(&pub_lines(messages.iter().copied())).unwrap();
    assert_eq!(barrier(&mut p), Vec::<String>::new());
    assert!(p.bye(T).unwrap().is_empty());
}

fn msgs(topic: &str, payloads: impl IntoIterator<Item = String>) -> Vec<String> {
    payloads
        .into_iter()
        .map(|p| format!("MSG {topic} {p}"))
        .collect()
}

#[test]
fn help_exits_zero_and_shows_an_example() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["connect", "--help"],
        &["pub", "--help"],
        &["sub", "--help"],
    ] {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        let (status, out, err) = run(cmd);
        assert!(status.success(), "{args:?}: {status:?} {err}");
        assert!(out.contains("Example"), "{args:?} shows no example:\n{out}");
    }
}

#[test]
fn client_commands_report_a_missing_broker() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let stale = tmp.path().join("stale");
    fs::create_dir(&stale).unwrap();
    nix::unistd::mkfifo(&stale.join("hello"), Mode::S_IRUSR | Mode::S_IWUSR).unwrap();
    let missing = tmp.path().join("missing");
    for dir in [&empty, &stale, &missing] {
        for args in [&["connect"][..], &["pub", "t", "x"], &["sub", "t"]] {
            let (status, out, err) = run(fifobus(dir, args));
            let what = format!("{args:?} on {}", dir.display());
            assert!(!status.success(), "{what}: {status:?}");
            assert_eq!(out, "", "{what}: stdout");
            assert_eq!(
                err.lines().count(),
                1,
                "{what}: one line on stderr: {err:?}"
            );
            assert!(err.ends_with('\n'), "{what}: {err:?}");
            assert!(
                err.contains("no broker is running on"),
                "{what}: stderr: {err:?}"
            );
        }
    }
    assert!(
        stale.join("hello").exists(),
        "a client left the stale hello alone"
    );
}

#[test]
fn connect_prints_a_client_directory_that_receives_messages() {
    let bus = TempBus::start();
    let (status, out, err) = run(fifobus(
        &bus.dir,
        &["connect", "--sub", "chat.>", "--name", "x"],
    ));
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(out.lines().count(), 1, "{out:?}");
    let cdir = PathBuf::from(out.trim_end_matches('\n'));
    assert_eq!(cdir.parent(), Some(bus.clients_dir().as_path()));
    for fifo in ["send", "recv"] {
        let meta = fs::metadata(cdir.join(fifo)).unwrap();
        assert!(meta.file_type().is_fifo(), "{fifo} is a FIFO");
    }

    publish(&bus, &[("chat.a", "hi"), ("other.topic", "no")]);
    let env = [("C", cdir.as_os_str())];
    let (status, out, err) = run(bash(r#"read -r l < "$C/recv"; echo "$l""#, &env));
    assert!(status.success(), "{err}");
    assert_eq!(out, "MSG chat.a hi\n");

    // The client lives on after `connect` exits, until someone says BYE.
    let (status, out, err) = run(bash(r#"echo BYE > "$C/send"; cat "$C/recv""#, &env));
    assert!(status.success(), "{err}");
    assert_eq!(out, "BYE\n");
    assert!(wait_gone(&cdir, T));
}

#[test]
fn pub_sends_one_message() {
    let bus = TempBus::start();
    let mut s = bus.connect("s", &["t"]);
    let (status, out, err) = run(fifobus(&bus.dir, &["pub", "t", "hello world"]));
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!((out.as_str(), err.as_str()), ("", ""));
    assert_eq!(barrier(&mut s), ["MSG t hello world"]);
}

#[test]
fn pub_sends_each_line_of_stdin_in_order() {
    let bus = TempBus::start();
    let mut s = bus.connect("s", &["t"]);
    let input: String = (0..1000).map(|i| format!("line {i}\n")).collect();
    let (status, out, err) = run_with_stdin(fifobus(&bus.dir, &["pub", "t"]), input.as_bytes());
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!((out.as_str(), err.as_str()), ("", ""));
    let want = msgs("t", (0..1000).map(|i| format!("line {i}")));
    assert_eq!(barrier(&mut s), want);

    // A last line without its newline is a message too.
    let (status, _, err) = run_with_stdin(fifobus(&bus.dir, &["pub", "t"]), b"a\nlast");
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(barrier(&mut s), ["MSG t a", "MSG t last"]);
}

#[test]
fn pub_rejects_bad_input_before_connecting() {
    // No broker here: these must fail on their own input, not on connecting.
    let tmp = tempfile::tempdir().unwrap();
    let (status, out, err) = run(fifobus(tmp.path(), &["pub", "a..b", "x"]));
    assert!(!status.success());
    assert_eq!(out, "");
    assert!(
        err.contains("a..b") && err.contains("invalid topic"),
        "{err}"
    );
    assert!(!err.contains("no broker"), "{err}");

    let (status, _, err) = run(fifobus(tmp.path(), &["pub", "t", "two\nlines"]));
    assert!(!status.success());
    assert!(err.contains("newline"), "{err}");
    assert!(!err.contains("no broker"), "{err}");
}

#[test]
fn pub_reports_a_line_too_long_and_delivers_the_others() {
    let bus = TempBus::start_with(&["--max-line", "100"]);
    let mut s = bus.connect("s", &["t"]);
    let input = format!("ok 1\n{}\nok 2\n", "x".repeat(200));
    let (status, out, err) = run_with_stdin(fifobus(&bus.dir, &["pub", "t"]), input.as_bytes());
    assert!(!status.success(), "{status:?}");
    assert_eq!(out, "");
    assert!(err.contains("line-too-long"), "{err}");
    assert_eq!(barrier(&mut s), ["MSG t ok 1", "MSG t ok 2"]);
}

#[test]
fn sub_with_count_prints_that_many_payloads_and_exits() {
    let bus = TempBus::start();
    let sub = Proc::start(fifobus(&bus.dir, &["sub", "t", "-n", "2"]), None);
    wait_joined(&bus, "fifobus-sub");
    publish(&bus, &[("t", "one"), ("t", "two"), ("t", "three")]);
    let (status, out, err) = sub.finish();
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(out, "one\ntwo\n");
    assert_eq!(err, "");
    wait_no_clients(&bus);
}

#[test]
fn sub_verbose_prints_topics() {
    let bus = TempBus::start();
    let args = ["sub", "t.*", "-v", "-n", "2", "--name", "verbose"];
    let sub = Proc::start(fifobus(&bus.dir, &args), None);
    wait_joined(&bus, "verbose");
    publish(&bus, &[("t.a", "one"), ("u.a", "no"), ("t.b", "two words")]);
    let (status, out, err) = sub.finish();
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(out, "t.a one\nt.b two words\n");
}

#[test]
fn sub_flushes_each_line() {
    let bus = TempBus::start();
    let mut sub = Proc::start(fifobus(&bus.dir, &["sub", "t"]), None);
    wait_joined(&bus, "fifobus-sub");
    publish(&bus, &[("t", "one")]);
    assert_eq!(sub.line(), "one\n");
    assert!(sub.running(), "sub without -n keeps running");
    publish(&bus, &[("t", "two")]);
    assert_eq!(sub.line(), "two\n");
    drop(sub);
    // It connected with pid=: the broker ends the client when it dies.
    wait_no_clients(&bus);
}

#[test]
fn sub_ends_quietly_when_its_reader_goes_away() {
    let bus = TempBus::start();
    let script = r#"set -o pipefail; "$B" --dir "$D" sub t | head -1"#;
    let pipeline = Proc::start(bash(script, &[("D", bus.dir.as_os_str())]), None);
    wait_joined(&bus, "fifobus-sub");
    publish(&bus, &[("t", "first"), ("t", "second")]);
    let (status, out, err) = pipeline.finish();
    assert!(
        status.success(),
        "sub and head both succeed: {status:?}: {err}"
    );
    assert_eq!(out, "first\n");
    assert_eq!(err, "");
    wait_no_clients(&bus);
}

#[test]
fn sub_timeout_exits_124_and_says_bye() {
    let bus = TempBus::start();
    let (status, out, err) = run(fifobus(&bus.dir, &["sub", "t", "--timeout", "0.3"]));
    assert_eq!(status.code(), Some(124), "{status:?}: {err}");
    assert_eq!(out, "");
    assert!(err.contains("--timeout 300ms passed"), "{err}");
    wait_no_clients(&bus);
}

/// `--timeout` is a total limit, as in timeout(1) and mosquitto_sub -W:
/// messages arriving all the while do not extend it (they did when it was
/// an idle timeout, which is now `--idle`).
#[test]
fn sub_timeout_is_a_total_limit_that_messages_do_not_extend() {
    let bus = TempBus::start();
    let started = std::time::Instant::now();
    let mut sub = Proc::start(fifobus(&bus.dir, &["sub", "t", "--timeout", "1s"]), None);
    wait_joined(&bus, "fifobus-sub");
    let mut p = bus.connect("test-publisher", &[]);
    let mut seen = 0;
    // One message at a time, each waited for: never a second without one.
    while sub.running() {
        assert!(started.elapsed() < T, "sub still running after {T:?}");
        p.publish(&topic("t"), b"tick").unwrap();
        match sub.out.recv_timeout(T) {
            Ok(line) => {
                assert_eq!(line, "tick\n");
                seen += 1;
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("sub printed nothing within {T:?}"),
        }
    }
    let (status, _, err) = sub.finish();
    assert_eq!(status.code(), Some(124), "{status:?}: {err}");
    assert!(err.contains("--timeout 1s passed"), "{err}");
    assert!(seen > 1, "messages kept coming: {seen}");
    p.bye(T).unwrap();
    wait_no_clients(&bus);
}

#[test]
fn sub_idle_exits_124_when_no_message_comes() {
    let bus = TempBus::start();
    for idle in ["300ms", "0.3"] {
        let (status, out, err) = run(fifobus(&bus.dir, &["sub", "t", "--idle", idle]));
        assert_eq!(status.code(), Some(124), "--idle {idle}: {status:?}: {err}");
        assert_eq!(out, "");
        assert!(err.contains("no message within 300ms (--idle)"), "{err}");
    }
    // A message restarts the idle clock, and is printed. The clock is long
    // enough here that a loaded machine's slow `fifobus pub` start cannot
    // outlast it before the message arrives (300 ms did, once, under load).
    let sub = Proc::start(fifobus(&bus.dir, &["sub", "t", "--idle", "5s"]), None);
    wait_joined(&bus, "fifobus-sub");
    publish(&bus, &[("t", "one")]);
    assert_eq!(sub.line(), "one\n");
    let (status, _, err) = sub.finish();
    assert_eq!(status.code(), Some(124), "{status:?}: {err}");
    assert!(err.contains("after 1 messages"), "{err}");
    wait_no_clients(&bus);
}

/// `fifobus sub chat.> -v` unquoted: bash runs `fifobus sub chat.` with
/// stdout to a file named `-v`. The error says what probably happened.
#[test]
fn a_pattern_ending_in_a_dot_blames_the_shell_redirection() {
    let bus = TempBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = bash(
        r#""$B" --dir "$D" sub chat.> -v"#,
        &[("D", bus.dir.as_os_str())],
    );
    cmd.current_dir(tmp.path());
    let (status, _, err) = run(cmd);
    assert_eq!(status.code(), Some(1), "{status:?}: {err}");
    assert!(
        err.contains("invalid pattern 'chat.'")
            && err.contains("unquoted '>' as a redirection")
            && err.contains("'chat.>'"),
        "{err}"
    );
}

/// The broker stops while `pub` reads stdin: the next write meets a FIFO
/// without a reader, said in words rather than as `Broken pipe (os error 32)`.
#[test]
fn pub_says_the_broker_went_away() {
    let mut bus = TempBus::start();
    let mut child = fifobus(&bus.dir, &["pub", "t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_joined(&bus, "fifobus-pub");
    assert!(bus.stop(Signal::SIGTERM).success());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"too late\n").unwrap();
    drop(stdin);
    let status = wait_child(&mut child, T).expect("pub exits");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("went away")
            && err.contains("fifobus serve --dir")
            && !err.contains("os error"),
        "{err}"
    );
}

/// A broker killed with SIGKILL leaves metrics.addr behind; `stats` says
/// no broker runs and how to start one, as `pub` does, not `Connection refused`.
#[test]
fn stats_after_a_crash_says_no_broker_is_running() {
    let mut bus = TempBus::start();
    assert!(!bus.stop(Signal::SIGKILL).success());
    assert!(bus.dir.join("metrics.addr").exists());
    let (status, out, err) = run(fifobus(&bus.dir, &["stats", "--interval", "10ms"]));
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(out, "");
    assert!(
        err.contains(&format!("no broker is running on {}", bus.dir.display()))
            && err.contains("start one with: fifobus serve --dir"),
        "{err}"
    );
}

/// Help texts: the top-level examples fit (clap wraps at 100 columns when
/// not on a terminal) without breaking a comment, `pub` describes TOPIC,
/// and `--dir` shows that it reads FIFOBUS_DIR.
#[test]
fn help_texts_fit_and_name_what_they_take() {
    let help = |args: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        let (status, out, err) = run(cmd);
        assert!(status.success(), "{args:?}: {err}");
        out
    };
    let top = help(&["--help"]);
    for line in top.lines() {
        assert!(line.chars().count() <= 100, "too wide: {line:?}");
    }
    assert!(
        top.lines()
            .any(|l| l.contains("fifobus connect --sub") && l.ends_with("$cdir/recv")),
        "{top}"
    );
    assert!(top.contains("[env: FIFOBUS_DIR"), "{top}");
    assert!(!top.contains("Protocol: docs/protocol.md"), "{top}");
    let pub_help = help(&["pub", "--help"]);
    let topic = pub_help
        .lines()
        .skip_while(|l| !l.starts_with("Arguments:"))
        .find(|l| l.contains("TOPIC"))
        .unwrap_or_else(|| panic!("{pub_help}"));
    assert!(
        topic.trim().len() > "[TOPIC]".len(),
        "no description: {topic:?}"
    );
    for cmd in ["pub", "sub"] {
        let text = help(&[cmd, "--help"]);
        assert!(text.contains("Exit status:"), "{cmd}: {text}");
    }
}

#[test]
fn sub_fails_when_the_broker_stops() {
    let mut bus = TempBus::start();
    let sub = Proc::start(fifobus(&bus.dir, &["sub", "t"]), None);
    wait_joined(&bus, "fifobus-sub");
    let broker = bus.stop(Signal::SIGTERM);
    assert!(broker.success(), "{broker:?}");
    let (status, out, err) = sub.finish();
    assert!(!status.success(), "{status:?}");
    assert_eq!(status.signal(), None, "exited, not killed");
    assert_eq!(out, "");
    assert!(err.contains("shutting down"), "{err}");
}

#[test]
fn invalid_patterns_are_refused() {
    let bus = TempBus::start();
    for args in [&["sub", "a.>.b"][..], &["connect", "--sub", "a.>.b"]] {
        let (status, out, err) = run(fifobus(&bus.dir, args));
        assert!(!status.success(), "{args:?}: {status:?}");
        assert_eq!(out, "", "{args:?}");
        assert!(
            err.contains("invalid pattern") && err.contains("a.>.b"),
            "{args:?}: {err}"
        );
    }
    assert!(bus.client_dirs().is_empty());
}

#[test]
fn out_of_range_timeout_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    for t in ["1e30", "-1", "nan"] {
        let arg = format!("--timeout={t}");
        let (status, out, err) = run(fifobus(tmp.path(), &["sub", "t", &arg]));
        assert_eq!(status.code(), Some(2), "--timeout {t}: {status:?} {err}");
        assert_eq!(out, "");
        assert!(err.contains("give a duration such as 5s"), "{err}");
    }
}

#[test]
fn names_that_would_break_the_hello_line_are_refused_locally() {
    let bus = TempBus::start();
    for name in ["a\nHELLO reply=/tmp/x", "a b"] {
        let (status, _, err) = run(fifobus(&bus.dir, &["pub", "--name", name, "t", "x"]));
        assert!(!status.success(), "{name:?}");
        assert!(err.contains("without spaces"), "{name:?}: {err}");
    }
    assert!(bus.client_dirs().is_empty(), "no client was created");
}

#[test]
fn a_tmpdir_with_a_space_still_works() {
    let bus = TempBus::start();
    let mut sub = bus.connect("s", &["t"]);
    let spaced = tempfile::Builder::new().prefix("sp ace").tempdir().unwrap();
    let mut cmd = fifobus(&bus.dir, &["pub", "t", "through a spaced TMPDIR"]);
    cmd.env("TMPDIR", spaced.path());
    let (status, _, err) = run(cmd);
    assert!(status.success(), "{err}");
    assert_eq!(barrier(&mut sub), ["MSG t through a spaced TMPDIR"]);
}

#[test]
fn stats_shows_topics_clients_and_drops() {
    let bus = TempBus::start_with(&["--backlog-messages", "10"]);
    let _stuck = bus.connect("stuck-reader", &["news.>"]);
    let mut p = bus.connect("newsroom", &[]);
    let batch = pub_lines((0..5000).map(|i| ("news.sport", i.to_string())));
    p.send_raw(&batch).unwrap();
    barrier(&mut p);
    let (status, out, err) = run(fifobus(&bus.dir, &["stats", "--interval", "100ms"]));
    assert!(status.success(), "{err}");
    assert!(out.contains("clients 2 "), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("news.sport ") && l.contains("5000")),
        "{out}"
    );
    assert!(out.contains("stuck-reader"), "{out}");
    assert!(out.contains("backlog-drop-oldest"), "{out}");
}

#[test]
fn stats_says_when_metrics_are_off() {
    let bus = TempBus::start_with(&["--metrics-addr", "off"]);
    let (status, out, err) = run(fifobus(&bus.dir, &["stats"]));
    assert!(!status.success());
    assert_eq!(out, "");
    assert!(err.contains("no metrics endpoint recorded"), "{err}");
}

/// A copy (or hard link) of the fifobus binary alone in a directory of its
/// own, so that what it finds "beside" itself is up to the test.
fn fifobus_alone() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exe = dir.path().join("fifobus");
    fs::hard_link(bin(), &exe)
        .or_else(|_| fs::copy(bin(), &exe).map(drop))
        .unwrap();
    (dir, exe)
}

/// A stand-in for a companion program: prints its arguments, each followed
/// by `|`, then the value of `$var`, and exits 3.
fn fake_program(dir: &std::path::Path, name: &str, var: &str) {
    let fake = dir.join(name);
    fs::write(
        &fake,
        format!("#!/bin/bash\nprintf '%s|' \"$@\"; echo \"${var}\"; exit 3\n"),
    )
    .unwrap();
    fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// `fifobus bench ARGS...` runs the `fifobus-bench` next to it with the
/// arguments unchanged, pointing it at this very broker unless
/// `FIFOBUS_BENCH_BROKER` says otherwise; without one, it says how to build it.
#[test]
fn bench_passes_through_to_fifobus_bench() {
    let (dir, exe) = fifobus_alone();
    let x = [("X", exe.as_os_str())];

    // No fifobus-bench beside it, none on PATH.
    let (status, out, err) = sh(r#"PATH= "$X" bench --quick"#, &x, T);
    assert!(!status.success());
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cargo build"), "{err}");

    fake_program(dir.path(), "fifobus-bench", "FIFOBUS_BENCH_BROKER");
    let script = r#"PATH= "$X" bench --only "1 -> 1" --json --help"#;
    let (status, out, _) = sh(script, &x, T);
    assert_eq!(status.code(), Some(3));
    assert_eq!(
        out,
        format!("--only|1 -> 1|--json|--help|{}\n", exe.display())
    );
    let env = [
        ("X", exe.as_os_str()),
        ("FIFOBUS_BENCH_BROKER", OsStr::new("/old/fifobus")),
    ];
    let (_, out, _) = sh(r#""$X" bench"#, &env, T);
    assert_eq!(out, "|/old/fifobus\n");
}

/// `fifobus bridge ARGS...` runs the `fifobus-bridge` next to it with the
/// arguments unchanged and the bus directory (`--dir`, before or after
/// `bridge`) in FIFOBUS_DIR; without one, it says how to build it.
#[test]
fn bridge_passes_through_to_fifobus_bridge() {
    let (dir, exe) = fifobus_alone();
    let x = [("X", exe.as_os_str())];
    let (status, out, err) = sh(r#"PATH= "$X" bridge --export a"#, &x, T);
    assert!(!status.success());
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("fifobus-bridge")
            && err.contains("cargo build")
            && err.contains("-p fifobus-bridge"),
        "{err}"
    );

    fake_program(dir.path(), "fifobus-bridge", "FIFOBUS_DIR");
    for script in [
        r#"unset FIFOBUS_DIR; PATH= "$X" --dir /b bridge --export 'a.>' --import x"#,
        r#"unset FIFOBUS_DIR; PATH= "$X" bridge --dir /b --export 'a.>' --import x"#,
    ] {
        let (status, out, _) = sh(script, &x, T);
        assert_eq!(status.code(), Some(3), "{script}");
        assert!(out.ends_with("|/b\n"), "{script}: {out}");
        assert!(out.contains("--export|a.>|--import|x|"), "{script}: {out}");
    }
}

/// An explicit `--metrics-addr` that is taken is an error at start: a
/// Prometheus configured for it must never scrape some other broker.
#[test]
fn an_explicit_metrics_addr_that_is_taken_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let bus = TempBus::new(BusOptions::default()).unwrap();
    let mut child = bus.spawn_raw(&["--metrics-addr", &addr]);
    let status = wait_child(&mut child, T).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the broker still runs with a taken --metrics-addr")
    });
    assert_eq!(status.code(), Some(1), "{}", bus.log_text());
    let log = bus.log_text();
    assert!(
        log.contains(&format!("cannot serve metrics on {addr}"))
            && log.contains("never falls back"),
        "{log}"
    );
    assert!(!bus.dir.join("hello").exists(), "it did not serve");
}

/// Only the default address falls back, and then it says so: in the log,
/// and in metrics.addr (what `stats` and the Prometheus file_sd recipe read).
#[test]
fn only_the_default_metrics_addr_falls_back_and_says_so() {
    // Taken, by this test or by whatever already listens there.
    let _hold = std::net::TcpListener::bind(fifobus::config::DEFAULT_METRICS_ADDR);
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    bus.spawn(&["--metrics-addr", "default"]);
    assert!(
        bus.log_text().contains(&format!(
            "cannot serve metrics on {}",
            fifobus::config::DEFAULT_METRICS_ADDR
        )),
        "{}",
        bus.log_text()
    );
    let recorded = fs::read_to_string(bus.dir.join("metrics.addr")).unwrap();
    let recorded = recorded.trim();
    assert_ne!(recorded, fifobus::config::DEFAULT_METRICS_ADDR);
    assert!(recorded.starts_with("127.0.0.1:"), "{recorded}");
    let (status, out, err) = run(fifobus(&bus.dir, &["stats", "--interval", "10ms"]));
    assert!(status.success(), "{err}");
    assert!(
        out.contains(recorded),
        "stats scrapes the recorded port: {out}"
    );
}
