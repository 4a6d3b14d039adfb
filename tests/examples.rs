//! The example chat clients in examples/clients/ (bash, python3, C), run
//! for real against a broker and against each other.
//!
//! python3 and a C compiler may be missing on a fresh machine, so these
//! tests are `#[ignore]`d: a plain `cargo test` lists them as ignored, and
//! `cargo test -- --include-ignored` (what CI runs, after installing them)
//! runs them, failing with a clear message if a tool is missing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;

use common::*;

/// Fails the test, saying what to install, unless `tool` is on PATH.
fn require(tool: &str, install: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    assert!(
        std::env::split_paths(&path).any(|d| d.join(tool).is_file()),
        "{tool} is not on PATH; this test needs it: apt-get install {install}"
    );
}

/// What the example clients need beyond bash.
fn require_python_and_cc() {
    require("python3", "python3");
    require("cc", "gcc libc6-dev");
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/clients")
}

/// A running chat client whose stdout lines arrive on a channel.
struct Chat {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Chat {
    fn start(program: &Path, args: &[&str], bus: &TempBus) -> Chat {
        let mut child = Command::new(program)
            .args(args)
            .env("FIFOBUS_DIR", &bus.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Chat {
            child,
            stdin,
            lines,
        }
    }

    fn expect(&self, want: &str) {
        let got = self
            .lines
            .recv_timeout(T)
            .unwrap_or_else(|_| panic!("no line within {T:?}, wanted {want:?}"));
        assert_eq!(got, want);
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    /// Closes stdin; the client says BYE and must exit 0.
    fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let status = wait_child(&mut self.child, T).expect("client exits after stdin EOF");
        assert!(status.success(), "{status:?}");
        self.lines.try_iter().collect()
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

#[test]
#[ignore = "needs python3 and a C compiler: apt-get install python3 gcc libc6-dev, then cargo test -- --include-ignored"]
fn bash_python_and_c_clients_chat_with_each_other() {
    require_python_and_cc();
    let bus = TempBus::start();
    let tmp = tempfile::tempdir().unwrap();
    let c_bin = build_c_client(tmp.path());

    let mut py = Chat::start(&examples().join("chat.py"), &["py", "lobby"], &bus);
    py.expect("* joined chat.lobby as py");
    let mut c = Chat::start(&c_bin, &["cc", "lobby"], &bus);
    c.expect("* joined chat.lobby as cc");

    // The bash client joins, says one line, and leaves at stdin EOF after
    // its own message came back (PING/PONG barrier), with status 0.
    let (status, out, err) = sh(
        &format!(
            "echo 'hello from bash' | {}/chat.sh sh lobby",
            examples().display()
        ),
        &[("FIFOBUS_DIR", bus.dir.as_os_str())],
        T,
    );
    assert!(status.success(), "chat.sh failed: {err}");
    assert_eq!(out, "* joined chat.lobby as sh\nsh: hello from bash\n");
    py.expect("sh: hello from bash");
    c.expect("sh: hello from bash");

    py.say("hi from python");
    py.expect("py: hi from python");
    c.expect("py: hi from python");
    c.say("hi from c");
    c.expect("cc: hi from c");
    py.expect("cc: hi from c");

    assert!(c.finish().is_empty());
    assert!(py.finish().is_empty());
    assert!(
        wait_for(&bus.clients_dir(), T, || bus.client_dirs().is_empty()),
        "every client said BYE and its directory is gone"
    );
}

#[test]
#[ignore = "needs python3 and a C compiler: apt-get install python3 gcc libc6-dev, then cargo test -- --include-ignored"]
fn clients_say_so_when_no_broker_runs() {
    require_python_and_cc();
    let tmp = tempfile::tempdir().unwrap();
    let c_bin = build_c_client(tmp.path());
    let nobus = tmp.path().join("nobus");
    for program in [
        examples().join("chat.sh"),
        examples().join("chat.py"),
        c_bin,
    ] {
        let (status, out, err) = sh(
            &format!("'{}' x lobby < /dev/null", program.display()),
            &[("FIFOBUS_DIR", nobus.as_os_str())],
            T,
        );
        assert!(!status.success(), "{}", program.display());
        assert!(out.is_empty());
        assert!(
            err.contains("no broker is running"),
            "{}: {err}",
            program.display()
        );
    }
}

/// The shell recipes of README.md and docs/protocol.md, as `bash -c`
/// scripts: (what, script, what it prints or publishes on chat.room).
fn shell_recipes() -> Vec<(&'static str, String)> {
    let then_pub = "echo 'PUB chat.room from the recipe' > \"$cdir/send\"\n";
    vec![
        ("README terminal 1", doc_block("README.md", "name=alice")),
        ("README terminal 2", doc_block("README.md", "name=bob")),
        (
            "protocol.md shortest handshake",
            doc_block("docs/protocol.md", "# $cdir/send and $cdir/recv are ready") + then_pub,
        ),
        (
            "protocol.md safe handshake",
            doc_block("docs/protocol.md", "trap 'exit 130' INT") + then_pub,
        ),
        (
            "protocol.md bash printer",
            doc_block("docs/protocol.md", "name=printer"),
        ),
    ]
}

/// The recipes need `DIR`: the README's computes it, protocol.md's take it
/// from the surrounding script.
fn with_dir(script: &str) -> String {
    format!("DIR=$FIFOBUS_DIR\n{script}")
}

/// Runs `bash -c script` in a process group of its own with `FIFOBUS_DIR`
/// = `dir`; after `T` the whole group is killed (a recipe's subshell blocked
/// in `open(hello)` would otherwise outlive its bash) and `None` returned.
fn run_recipe(script: &str, dir: &Path) -> Option<(std::process::ExitStatus, String, String)> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(with_dir(script))
        .env("FIFOBUS_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(out).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
    let status = wait_child(&mut child, T);
    // Whatever the recipe left running (nothing, if it behaves) goes too.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let status = status.or_else(|| {
        let _ = child.wait();
        None
    })?;
    Some((status, out.join().unwrap(), err.join().unwrap()))
}

/// Every documented shell recipe, with no broker running, ends on its own
/// (within its 2 s write limit), says so, and leaves no regular `hello`:
/// whether the bus directory is missing, empty, or holds the FIFO a broker
/// killed with SIGKILL left behind (a `hello` nobody reads).
#[test]
fn documented_shell_recipes_refuse_to_hang_without_a_broker() {
    let tmp = temp_root();
    let missing = tmp.path().join("missing");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let stale = tmp.path().join("stale");
    std::fs::create_dir(&stale).unwrap();
    nix::unistd::mkfifo(
        &stale.join("hello"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    // All at once: the stale cases each take the 2 s write limit.
    let runs: Vec<_> = shell_recipes()
        .into_iter()
        .flat_map(|(what, script)| {
            [&missing, &empty, &stale].map(|dir| {
                let script = script.clone();
                let env = dir.clone();
                let run = std::thread::spawn(move || run_recipe(&script, &env));
                (what, dir.clone(), run)
            })
        })
        .collect();
    for (what, dir, run) in runs {
        let what = format!("{what} on {}", dir.display());
        let (status, out, err) = run
            .join()
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: still running after {T:?}"));
        assert_eq!(status.code(), Some(1), "{what}: {status:?} {err}");
        assert!(out.is_empty(), "{what}: printed {out:?}");
        assert!(err.contains("no broker"), "{what}: {err}");
    }
    assert!(!missing.exists(), "no recipe creates the bus directory");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "nor a hello");
    let hello = std::fs::symlink_metadata(stale.join("hello")).unwrap();
    assert!(
        std::os::unix::fs::FileTypeExt::is_fifo(&hello.file_type()),
        "the stale hello is still a FIFO"
    );
}

/// The same recipes against a running broker: the README's two terminals
/// chat, and each protocol.md recipe reaches a subscriber.
#[test]
fn documented_shell_recipes_chat_through_a_broker() {
    use std::os::unix::process::CommandExt;
    let bus = TempBus::start();
    let mut watcher = bus.connect("watcher", &["chat.>"]);
    barrier(&mut watcher);
    let recipes = shell_recipes();
    // The two that print what they receive run in the background, each in
    // a process group of its own that the test ends.
    let listen = |what: &str, script: &str| {
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(with_dir(script))
            .env("FIFOBUS_DIR", &bus.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        (what.to_owned(), child, move || {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            line
        })
    };
    let mut listeners = Vec::new();
    for (what, script) in &recipes {
        if what.contains("terminal 1") || what.contains("printer") {
            listeners.push(listen(what, script));
        }
    }
    // Both listeners are subscribed once their client directories exist.
    assert!(
        wait_for(&bus.clients_dir(), T, || bus.client_dirs().len() == 3),
        "both listeners connected"
    );
    for (what, script) in &recipes {
        if what.contains("terminal 1") || what.contains("printer") {
            continue;
        }
        let (status, _out, err) =
            run_recipe(script, &bus.dir).unwrap_or_else(|| panic!("{what}: hangs"));
        assert!(status.success(), "{what}: {status:?} {err}");
        let line = watcher.read_line(Some(T)).unwrap().unwrap();
        let line = String::from_utf8_lossy(&line).into_owned();
        assert!(line.starts_with("MSG chat.room "), "{what}: {line}");
        for (who, _, read) in &mut listeners {
            let got = read();
            let want = if who.contains("printer") {
                line["MSG chat.room ".len()..].to_owned()
            } else {
                line.clone()
            };
            assert_eq!(got.trim_end(), want, "{who} after {what}");
        }
    }
    for (_, mut child, _) in listeners {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        assert!(wait_child(&mut child, T).is_some());
    }
}
