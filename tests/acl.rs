//! Access control (`--acl`) on the shared bus, end to end: a root broker
//! with `--shared --acl FILE`, and real, throwaway users as its clients,
//! each running the built-in `fifobus pub`, `fifobus sub` and
//! `fifobus connect`, or the documented shell handshake, as itself. A
//! client's identity is the owner of its reply FIFO, which here the user's
//! own process made; its FIFOs are opened by the user's own processes,
//! which only works because the broker gave them to that user.
//!
//! Synchronisation is on protocol events only: `PING`/`PONG` through a
//! user's own FIFOs, `fifobus sub -n N` exiting after N messages,
//! `fifobus pub` exiting after its own barrier, a new client directory owned
//! by the user (the `sub=` patterns are in force before it exists), and the
//! broker's log for reloads.

mod common;

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use common::users::User;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A refused HELLO: the code and text of the broker's `ERR`, as the client
/// reported it.
#[derive(Debug)]
struct Refused {
    code: String,
    text: String,
}

/// A child's stderr, collected by a thread so the child never blocks on it.
fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Waits [`T`] for `child`, killing it if it does not exit.
fn reap(child: &mut Child, what: &str) -> ExitStatus {
    wait_child(child, T).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what} did not exit within {T:?}")
    })
}

/// A `fifobus` command run as `user` on `bus`.
fn fifobus_as(user: &User, bus: &TempBus, args: &[&str]) -> Command {
    let mut c = user.command(bin());
    c.arg("--dir").arg(&bus.dir).args(args).current_dir("/");
    c
}

/// Runs `fifobus ARGS` as `user` with `input` on stdin; (status, stdout, stderr).
fn run(user: &User, bus: &TempBus, args: &[&str], input: &[u8]) -> (ExitStatus, String, String) {
    let mut child = fifobus_as(user, bus, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let status = reap(&mut child, &format!("fifobus {args:?} as {}", user.name));
    writer.join().unwrap();
    (status, out.join().unwrap(), err.join().unwrap())
}

/// `fifobus pub TOPIC MESSAGE` as `user`: `Ok` when the broker took it,
/// else the refusal `fifobus pub` reported on stderr.
fn publish(user: &User, bus: &TempBus, topic: &str, message: &str) -> Result<(), String> {
    let (status, _, err) = run(user, bus, &["pub", topic, message], b"");
    if status.success() {
        assert!(err.is_empty(), "{err}");
        Ok(())
    } else {
        let refusal = "fifobus pub: the broker refused a message: ";
        assert!(err.starts_with(refusal), "{status:?}: {err}");
        Err(err[refusal.len()..].trim_end().to_owned())
    }
}

/// The client directories `owner` has on `bus` now.
fn client_dirs_of(bus: &TempBus, owner: u32) -> HashSet<PathBuf> {
    bus.client_dirs()
        .into_iter()
        .filter(|d| fs::symlink_metadata(d).is_ok_and(|m| m.uid() == owner))
        .collect()
}

/// A `fifobus sub -v -n N PATTERNS` run by a user.
struct Sub {
    child: Child,
    out: JoinHandle<String>,
    err: JoinHandle<String>,
}

impl Sub {
    /// Starts it and waits until its client exists (directory owned by the
    /// user): its patterns are then in force. `Err` with what it printed
    /// when it exits instead (refused).
    fn start(user: &User, bus: &TempBus, n: u32, patterns: &[&str]) -> Result<Sub, String> {
        let before = client_dirs_of(bus, user.uid);
        let n = n.to_string();
        let mut args = vec!["sub", "-v", "-n", &n, "--name", "sub"];
        args.extend_from_slice(patterns);
        let mut child = fifobus_as(user, bus, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        let mut exited = None;
        let started = wait_for(&bus.clients_dir(), T, || {
            exited = child.try_wait().unwrap();
            // A new name, not a larger count: a client that just said BYE
            // (fifobus pub) may still be leaving.
            exited.is_some() || !client_dirs_of(bus, user.uid).is_subset(&before)
        });
        let sub = Sub { child, out, err };
        if exited.is_some() {
            let (status, _, err) = sub.finish();
            assert!(!status.success());
            return Err(err);
        }
        assert!(started, "fifobus sub as {} did not connect", user.name);
        Ok(sub)
    }

    /// Waits for it to exit (after its N messages); (status, stdout, stderr).
    fn finish(mut self) -> (ExitStatus, String, String) {
        let status = reap(&mut self.child, "fifobus sub");
        (status, self.out.join().unwrap(), self.err.join().unwrap())
    }
}

/// How a [`Conn`] says HELLO.
enum Via<'a> {
    /// `fifobus connect --name NAME --sub P... --pid $$`.
    Connect(&'a str, &'a [&'a str]),
    /// `fifobus connect --name NAME --no-pid`: a client nothing ties to a
    /// process, which a full table may end to make room.
    ConnectNoPid(&'a str),
    /// The safe plain-shell handshake of docs/protocol.md, as written there,
    /// with its `name=` and `sub=` replaced.
    Recipe(&'a str, &'a [&'a str]),
}

/// A raw client, as a user's shell script has one: a user's process holds
/// `recv` (and relays it to the test), another one `send` (fed by the test).
/// Both are the user's own processes opening the user's own FIFOs.
struct Conn {
    dir: PathBuf,
    /// Says HELLO, then relays `recv` to stdout once told to on stdin.
    reader: Child,
    gate: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// `cat > send`.
    writer: Child,
    send: Option<ChildStdin>,
}

impl Conn {
    fn open(bus: &TempBus, user: &User, via: Via) -> Result<Conn, Refused> {
        let handshake = match via {
            Via::Connect(name, subs) => {
                let subs: String = subs.iter().map(|s| format!(" --sub '{s}'")).collect();
                format!(
                    r#"cdir=$("$FIFOBUS" connect --dir "$FIFOBUS_DIR" --name {name}{subs} --pid $$) || exit 1"#
                )
            }
            Via::ConnectNoPid(name) => format!(
                r#"cdir=$("$FIFOBUS" connect --dir "$FIFOBUS_DIR" --name {name} --no-pid) || exit 1"#
            ),
            Via::Recipe(name, subs) => {
                let recipe = doc_block("docs/protocol.md", "trap 'exit 130' INT");
                let sub = if subs.is_empty() {
                    String::new()
                } else {
                    format!(" sub={}", subs.join(","))
                };
                let doc_hello = "name=alice pid=$$ sub=chat.>";
                assert!(recipe.contains(doc_hello), "{recipe}");
                recipe.replace(doc_hello, &format!("name={name} pid=$${sub}"))
            }
        };
        // The client's life is this process's ($$, which becomes `cat`).
        let script =
            format!("{handshake}\necho \"$cdir\"\nread -r _ || exit 0\nexec cat \"$cdir/recv\"\n");
        let mut reader = user
            .command("bash")
            .arg("-c")
            .arg(&script)
            .env("FIFOBUS", bin())
            .env("FIFOBUS_DIR", &bus.dir)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let gate = reader.stdin.take();
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(reader.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let err = collect(reader.stderr.take().unwrap());
        let Ok(dir) = lines.recv_timeout(T) else {
            drop(gate);
            let status = reap(&mut reader, "the handshake");
            let err = err.join().unwrap();
            assert!(!status.success(), "{err}");
            // `fifobus: the broker refused: CODE TEXT` (connect), or
            // `refused: ERR CODE TEXT` (the recipe).
            let (_, said) = err
                .split_once("refused: ")
                .unwrap_or_else(|| panic!("no refusal in: {err}\nlog:\n{}", bus.log_text()));
            let said = said.trim_end();
            let said = said.strip_prefix("ERR ").unwrap_or(said);
            let (code, text) = said.split_once(' ').unwrap_or((said, ""));
            return Err(Refused {
                code: code.to_owned(),
                text: text.to_owned(),
            });
        };
        let dir = PathBuf::from(dir);
        let writer_cmd = r#"exec cat > "$1/send""#;
        let mut writer = user
            .command("bash")
            .args(["-c", writer_cmd, "bash"])
            .arg(&dir)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let send = writer.stdin.take();
        Ok(Conn {
            dir,
            reader,
            gate,
            lines,
            writer,
            send,
        })
    }

    fn send(&mut self, line: &str) {
        let send = self.send.as_mut().unwrap();
        send.write_all(format!("{line}\n").as_bytes()).unwrap();
        send.flush().unwrap();
    }

    /// The next line from `recv`; starts reading it on first use.
    fn line(&mut self, deadline: Instant) -> String {
        if let Some(mut gate) = self.gate.take() {
            gate.write_all(b"go\n").unwrap();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no line from {} within {T:?}: {e}", self.dir.display()))
    }

    /// PING barrier: the lines that arrived before the PONG.
    fn barrier(&mut self) -> Vec<String> {
        self.send("PING sync");
        let deadline = Instant::now() + T;
        let mut before = Vec::new();
        loop {
            let line = self.line(deadline);
            if line == "PONG sync" {
                return before;
            }
            before.push(line);
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // EOF ends `cat > send`; killing the reader ends the client (its pid=).
        drop(self.send.take());
        drop(self.gate.take());
        let _ = kill(Pid::from_raw(self.reader.id() as i32), Signal::SIGKILL);
        for c in [&mut self.reader, &mut self.writer] {
            if wait_child(c, T).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn connect(bus: &TempBus, user: &User, via: Via) -> Conn {
    let c = Conn::open(bus, user, via).unwrap_or_else(|e| {
        panic!(
            "{}: HELLO refused: {e:?}\nlog:\n{}",
            user.name,
            bus.log_text()
        )
    });
    // Any local user may say HELLO; what it gets is its own.
    let m = fs::symlink_metadata(&c.dir).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (user.uid, 0o700));
    c
}

/// Writes the ACL file as an administrator would: root's, 0644.
fn write_acl(file: &Path, text: &str) {
    fs::write(file, text).unwrap();
    fs::set_permissions(file, fs::Permissions::from_mode(0o644)).unwrap();
}

/// A directory the users can reach (its parents are searchable), for a bus.
fn reachable_bus() -> TempBus {
    let bus = TempBus::new(BusOptions::default()).unwrap();
    fs::set_permissions(bus.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    bus
}

/// A root broker with `--shared --acl FILE` (FILE holding `acl`).
fn broker(acl: &str, extra: &[&str]) -> (TempBus, PathBuf) {
    let mut bus = reachable_bus();
    let file = bus.tmp.path().join("fifobus.acl");
    write_acl(&file, acl);
    let mut args = vec!["--shared", "--acl", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    bus.spawn(&args);
    (bus, file)
}

/// The value of the `/metrics` series `series` (name and labels, as exported).
fn metric(bus: &TempBus, series: &str) -> u64 {
    let url = fifobus::stats::metrics_url(&bus.dir).unwrap();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(T))
        .build()
        .into();
    let text = agent
        .get(&url)
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .unwrap();
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    value.parse().unwrap()
}

/// The `ERRORS` and `REJECTED` lines of `fifobus stats`.
fn stats_errors(bus: &TempBus) -> (String, String) {
    let out = Command::new(bin())
        .arg("--dir")
        .arg(&bus.dir)
        .args(["stats", "--interval", "10ms"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let line = |head: &str| {
        text.lines()
            .find(|l| l.starts_with(head))
            .unwrap_or_else(|| panic!("no {head} in:\n{text}"))
            .to_owned()
    };
    (line("ERRORS "), line("REJECTED "))
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

/// Three users at once on one shared bus, each a row of the ACL matrix:
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

    // alice by the documented shell handshake, the others by fifobus connect.
    let mut a = connect(&bus, &alice, Via::Recipe("alice", &["chat.>"]));
    let mut b = connect(&bus, &bob, Via::Connect("bob", &[]));
    let mut c = connect(&bus, &carol, Via::Connect("carol", &[]));

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
    // The same refusals reach the built-in clients.
    assert_eq!(
        publish(&carol, &bus, "chat.x", "hi"),
        Err("forbidden chat.x".into())
    );
    assert_eq!(
        publish(&bob, &bus, "chat.public.x", "from-bob"),
        Err("forbidden chat.public.x".into())
    );
    assert_eq!(
        publish(&bob, &bus, "_bus.x", "0"),
        Err("forbidden _bus.x".into())
    );
    // bob's fifobus sub on chat.> is partial too: chat.private.y, published
    // first, never reaches it; chat.public.x does.
    let bob_sub = Sub::start(&bob, &bus, 1, &["chat.>"]).expect("a partial sub= is accepted");
    // alice: publishes in both rooms; _bus. is refused despite its rule.
    a.send("PUB chat.private.y 0");
    a.send("PUB chat.public.x 1");
    a.send("PUB chat.private.y 2");
    a.send("PUB _bus.x 3");
    assert_eq!(
        a.barrier(),
        [
            "MSG chat.private.y 0",
            "MSG chat.public.x 1",
            "MSG chat.private.y 2",
            "ERR forbidden _bus.x"
        ]
    );
    let (status, out, err) = bob_sub.finish();
    assert!(status.success(), "{err}");
    assert_eq!(out, "chat.public.x 1\n");
    assert_eq!(
        b.barrier(),
        ["MSG chat.public.x 1"],
        "bob gets only the public room"
    );
    assert!(c.barrier().is_empty());

    // A HELLO whose sub= is denied entirely is refused; no client is made:
    // by the documented recipe and by fifobus sub.
    let carols = client_dirs_of(&bus, carol.uid);
    let e = Conn::open(&bus, &carol, Via::Recipe("carol2", &["chat.>"]))
        .err()
        .expect("refused");
    assert_eq!((e.code.as_str(), e.text.as_str()), ("forbidden", "chat.>"));
    let err = Sub::start(&carol, &bus, 1, &["chat.>"])
        .err()
        .expect("refused");
    assert!(
        err.contains("the broker refused: forbidden chat.>"),
        "{err}"
    );
    assert!(client_dirs_of(&bus, carol.uid).is_subset(&carols));
    // A partial one is accepted.
    let mut b2 = connect(&bus, &bob, Via::Connect("bob2", &["*.public.x"]));
    a.send("PUB chat.public.x 4");
    a.barrier();
    assert_eq!(b2.barrier(), ["MSG chat.public.x 4"]);

    // Every refusal is counted under its code, in /metrics and fifobus
    // stats: 8 commands (bob 2 + 2 by fifobus pub, carol 2 + 1, alice 1),
    // 2 HELLOs (carol's recipe and fifobus sub).
    assert_eq!(
        metric(&bus, r#"fifobus_protocol_errors_total{kind="forbidden"}"#),
        8
    );
    assert_eq!(
        metric(
            &bus,
            r#"fifobus_handshakes_rejected_total{reason="forbidden"}"#
        ),
        2
    );
    let (errors, rejected) = stats_errors(&bus);
    assert!(errors.contains("forbidden 8 ("), "{errors}");
    assert!(rejected.contains("forbidden 2 ("), "{rejected}");
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
    let mut a = connect(&bus, &alice, Via::Connect("alice", &["chat.>"]));

    assert_eq!(
        publish(&bob, &bus, "chat.public.x", "before"),
        Err("forbidden chat.public.x".into())
    );

    // bob may now publish to chat.public.
    let more = format!(
        "{}allow pub chat.public.> user={}\n",
        chat_acl(&alice, &bob),
        bob.name
    );
    write_acl(&file, &more);
    let hup = || kill(Pid::from_raw(bus.pid()), Signal::SIGHUP).unwrap();
    hup();
    assert!(
        bus.wait_log(&format!("acl reloaded from {}: 4 rules", file.display())),
        "{}",
        bus.log_text()
    );
    assert_eq!(publish(&bob, &bus, "chat.public.x", "after"), Ok(()));
    assert_eq!(a.barrier(), ["MSG chat.public.x after"]);

    // A broken file: line 3 names a user that does not exist.
    write_acl(
        &file,
        &format!(
            "default deny\nallow pubsub chat.> user={}\nallow pub chat.> user=no-such-user-{}\n",
            alice.name,
            std::process::id()
        ),
    );
    hup();
    let want = format!("acl {} line 3: unknown user", file.display());
    assert!(bus.wait_log(&want), "{}", bus.log_text());
    assert!(bus.wait_log("keeping the previous policy"));
    // bob's rights are those of the last good file.
    let mut b = connect(&bus, &bob, Via::Connect("bob", &[]));
    b.send("PUB chat.public.x still");
    b.send("PUB chat.private.y never");
    assert_eq!(b.barrier(), ["ERR forbidden chat.private.y"]);
    assert_eq!(a.barrier(), ["MSG chat.public.x still"]);
    assert_eq!(
        publish(&carol, &bus, "chat.x", "hi"),
        Err("forbidden chat.x".into())
    );
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

    let mut b1 = connect(&bus, &bob, Via::Connect("bob1", &["a", "b"]));
    let mut b2 = connect(&bus, &bob, Via::Connect("bob2", &[]));
    let e = Conn::open(&bus, &bob, Via::Connect("bob3", &[]))
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
    let err = Sub::start(&bob, &bus, 1, &["x"])
        .err()
        .expect("nor may fifobus sub connect");
    assert!(
        err.contains("the broker refused: too-many-clients"),
        "{err}"
    );
    // Others are not limited by bob's limit.
    let _a1 = connect(&bus, &alice, Via::Connect("alice1", &[]));
    let _a2 = connect(&bus, &alice, Via::Connect("alice2", &[]));
    let _a3 = connect(&bus, &alice, Via::Connect("alice3", &[]));

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
    // Neither reads while 200 KiB pass (the pipes take 64 KiB each). bob
    // makes room for a reader that has not read yet: b2 leaves, and a new
    // one subscribes to flood.
    drop(b2);
    // Logged once the router has let go of it too (its directory goes
    // first), so bob's count of clients is down.
    assert!(
        bus.wait_log(r#"client left client=bob2 reason="pid-exited""#),
        "bob2 was not removed when its process died"
    );
    let mut bob_flood = connect(&bus, &bob, Via::Connect("bob-flood", &["flood"]));
    let mut alice_flood = connect(&bus, &alice, Via::Connect("alice-flood", &["flood"]));
    let lines = format!("{}\n", "x".repeat(100)).repeat(2000);
    let (status, _, err) = run(
        &alice,
        &bus,
        &["pub", "--name", "publisher", "flood"],
        lines.as_bytes(),
    );
    assert!(status.success(), "{err}");
    let bob_lines = bob_flood.barrier();
    assert!(
        bob_lines.iter().any(|l| l.starts_with("DROPPED ")),
        "bob's backlog is capped at 4K"
    );
    let alice_lines = alice_flood.barrier();
    assert_eq!(alice_lines.len(), 2000, "alice's is not");
    assert!(alice_lines.iter().all(|l| l.starts_with("MSG flood ")));

    // Counted under their codes: bob's third client (by connect and by
    // fifobus sub), his fourth subscription.
    assert_eq!(
        metric(
            &bus,
            r#"fifobus_handshakes_rejected_total{reason="too-many-clients"}"#
        ),
        2
    );
    assert_eq!(
        metric(
            &bus,
            r#"fifobus_protocol_errors_total{kind="too-many-subscriptions"}"#
        ),
        1
    );
    let (errors, rejected) = stats_errors(&bus);
    assert!(errors.contains("too-many-subscriptions 1 ("), "{errors}");
    assert!(rejected.contains("too-many-clients 2 ("), "{rejected}");
}

/// Without --acl nothing changes: everyone may do everything, _bus. included.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn without_acl_everything_is_allowed() {
    let carol = User::create("carol");
    let mut bus = reachable_bus();
    bus.spawn(&["--shared"]);
    let mut c = connect(&bus, &carol, Via::Connect("carol", &["open.>"]));
    c.send("PUB open.x 1");
    assert_eq!(c.barrier(), ["MSG open.x 1"]);
    // _bus. is the broker's with or without an ACL (tests/patterns_rr.rs).
    c.send("PUB _bus.x 1");
    assert_eq!(c.barrier(), ["ERR forbidden _bus.x"]);
    // SIGHUP is harmless without a file.
    kill(Pid::from_raw(bus.pid()), Signal::SIGHUP).unwrap();
    assert!(bus.wait_log("no --acl file to reload"));
    assert_eq!(publish(&carol, &bus, "open.x", "2"), Ok(()));
    assert_eq!(c.barrier(), ["MSG open.x 2"]);
    // A TMPDIR the user cannot write (inherited from root, as `su` keeps
    // it) does not stop the built-in clients: their reply directory goes
    // to /tmp instead.
    let (status, _, err) = {
        let mut child = fifobus_as(&carol, &bus, &["pub", "open.x", "3"])
            .env("TMPDIR", bus.tmp.path())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = collect(child.stderr.take().unwrap());
        let status = reap(&mut child, "fifobus pub");
        (status, (), err.join().unwrap())
    };
    assert!(status.success(), "{err}");
    assert_eq!(c.barrier(), ["MSG open.x 3"]);
}

/// A bad file at start: the broker does not start, and says where.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn a_bad_file_at_start_is_refused_with_its_line() {
    let alice = User::create("alice");
    let bus = reachable_bus();
    let file = bus.tmp.path().join("bad.acl");
    write_acl(
        &file,
        &format!(
            "default deny\nallow pub chat.> user={}\nallow pub chat..x all\n",
            alice.name
        ),
    );
    let log = refused_at_start(&bus, &file);
    assert!(
        log.contains(&format!(
            "acl {} line 3: bad pattern 'chat..x'",
            file.display()
        )),
        "{log}"
    );
}

/// Starts a shared broker with `--acl file` that must refuse to start;
/// returns its log.
fn refused_at_start(bus: &TempBus, file: &Path) -> String {
    let mut child = bus.spawn_raw(&["--shared", "--acl", file.to_str().unwrap()]);
    let status = reap(&mut child, "a broker with a bad --acl");
    assert!(!status.success());
    assert!(!bus.dir.join("hello").exists());
    bus.log_text()
}

/// The ACL decides what every user may do, so a file someone else could
/// write is refused, at start and on SIGHUP (keeping the policy in force):
/// writable by group or others, owned by a user, or a symbolic link (whose
/// owner chose what it leads to). A readable one is fine.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn an_acl_file_others_could_write_is_refused() {
    let (alice, mallory) = (User::create("alice"), User::create("mallory"));
    let good = format!("default deny\nallow pubsub chat.> user={}\n", alice.name);
    let evil = format!("default allow\nallow pubsub chat.> user={}\n", mallory.name);
    let (bus, file) = broker(&good, &[]);
    let elsewhere = bus.tmp.path().join("elsewhere.acl");
    write_acl(&elsewhere, &evil);

    type Spoil = Box<dyn Fn(&Path)>;
    let (uid, gid) = (mallory.uid, mallory.gid);
    let target = elsewhere.clone();
    let cases: Vec<(&str, Spoil, String)> = vec![
        (
            "other-writable",
            Box::new(|f| fs::set_permissions(f, fs::Permissions::from_mode(0o646)).unwrap()),
            "is writable by group or others (mode 0646)".into(),
        ),
        (
            "group-writable",
            Box::new(|f| fs::set_permissions(f, fs::Permissions::from_mode(0o664)).unwrap()),
            "is writable by group or others (mode 0664)".into(),
        ),
        (
            "a user's",
            Box::new(move |f| {
                nix::unistd::chown(
                    f,
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                )
                .unwrap()
            }),
            format!("is owned by uid {}", mallory.uid),
        ),
        (
            "a symlink",
            Box::new(move |f| {
                fs::remove_file(f).unwrap();
                std::os::unix::fs::symlink(&target, f).unwrap();
            }),
            "is a symbolic link".into(),
        ),
    ];
    let hup = || kill(Pid::from_raw(bus.pid()), Signal::SIGHUP).unwrap();
    for (i, (what, spoil, want)) in cases.iter().enumerate() {
        // At start: refused.
        let start = reachable_bus();
        let f = start.tmp.path().join("acl");
        write_acl(&f, &evil);
        spoil(&f);
        let log = refused_at_start(&start, &f);
        assert!(
            log.contains(&format!("acl {}: {want}", f.display())),
            "{what}: {log}"
        );
        // On SIGHUP: refused, the previous policy stays.
        let _ = fs::remove_file(&file);
        write_acl(&file, &evil);
        spoil(&file);
        hup();
        let line = format!("acl {}: {want}", file.display());
        assert!(
            wait_for(&bus.log, T, || bus.log_text().matches(&line).count() == 1),
            "{what}: {}",
            bus.log_text()
        );
        assert_eq!(
            publish(&mallory, &bus, "chat.x", &i.to_string()),
            Err("forbidden chat.x".into()),
            "{what}"
        );
    }
    // Readable by everyone, writable by root only: taken.
    let _ = fs::remove_file(&file);
    write_acl(&file, &evil);
    hup();
    assert!(bus.wait_log(&format!("acl reloaded from {}", file.display())));
    assert_eq!(publish(&mallory, &bus, "chat.x", "ok"), Ok(()));
}

/// A newcomer that its user's ACL client limit refuses ends nobody, even
/// when the table is full and a client without `pid=` could make room.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn a_newcomer_over_its_user_limit_ends_nobody() {
    let (alice, bob) = (User::create("alice"), User::create("bob"));
    let acl = format!("default allow\nlimit user={} clients=1\n", bob.name);
    let (bus, _file) = broker(&acl, &["--max-clients", "2"]);
    let mut a = connect(&bus, &alice, Via::ConnectNoPid("alice"));
    let mut b = connect(&bus, &bob, Via::ConnectNoPid("bob"));
    // Full, and both are pid-less: bob's second client is refused by his
    // limit before anyone is chosen to make room.
    let e = Conn::open(&bus, &bob, Via::ConnectNoPid("bob2"))
        .err()
        .expect("over bob's limit");
    assert_eq!(e.code, "too-many-clients");
    assert!(e.text.contains("may have at most 1 clients"), "{}", e.text);
    assert_eq!(a.barrier(), Vec::<String>::new());
    assert_eq!(b.barrier(), Vec::<String>::new());
    assert_eq!(bus.client_dirs().len(), 2);
    assert!(!bus.log_text().contains("table was full"));
    // Within her limits, alice's newcomer does make room.
    let _a2 = connect(&bus, &alice, Via::ConnectNoPid("alice2"));
    assert!(bus.wait_log("ended: the table was full"));
}
