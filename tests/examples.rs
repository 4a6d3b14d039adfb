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
