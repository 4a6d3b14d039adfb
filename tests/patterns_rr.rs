//! Request/reply, presence, `fifobus ls`, `sub --format` and `pub --pairs`
//! (issue 11, items 1 and 5 to 7): the real binary against a real broker
//! and real FIFOs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::*;
use fifobus::client::ConnectOptions;
use fifobus::protocol::Reply;

/// `fifobus --dir DIR ARGS...`.
fn fifobus(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("--dir").arg(dir).args(args);
    cmd
}

/// Runs a command to its end with `stdin`; (status, stdout, stderr).
fn run(mut cmd: Command, stdin: &[u8]) -> (ExitStatus, String, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = w.write_all(&data);
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_child(&mut child, T).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not exit within {T:?}")
    });
    (status, out_t.join().unwrap(), err_t.join().unwrap())
}

/// A long-running command (a responder, a subscriber), its stdout and
/// stderr read line by line. Killed and reaped on drop.
struct Bg {
    child: Child,
    out: Receiver<String>,
    err: Receiver<String>,
}

impl Bg {
    fn start(mut cmd: Command) -> Bg {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let lines = |r: Box<dyn Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
            rx
        };
        let out = lines(Box::new(child.stdout.take().unwrap()));
        let err = lines(Box::new(child.stderr.take().unwrap()));
        Bg { child, out, err }
    }

    /// Waits for a stderr line starting with `prefix`.
    fn stderr_until(&self, prefix: &str) {
        loop {
            let line = self
                .err
                .recv_timeout(T)
                .unwrap_or_else(|e| panic!("no stderr line '{prefix}...' ({e})"));
            if line.starts_with(prefix) {
                return;
            }
        }
    }

    fn line(&self) -> String {
        self.out
            .recv_timeout(T)
            .unwrap_or_else(|e| panic!("no stdout line: {e}"))
    }

    fn wait(&mut self) -> ExitStatus {
        wait_child(&mut self.child, T).expect("exits in time")
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.child.wait();
        }
    }
}

/// `fifobus reply ARGS...`, returned once its SERVE is in force (it says
/// so on stderr after its PING barrier).
fn responder(bus: &TempBus, args: &[&str]) -> Bg {
    let mut full = vec!["reply"];
    full.extend_from_slice(args);
    let r = Bg::start(fifobus(&bus.dir, &full));
    r.stderr_until("fifobus reply: serving ");
    r
}

fn req(bus: &TempBus, args: &[&str]) -> (ExitStatus, String, String) {
    let mut full = vec!["req"];
    full.extend_from_slice(args);
    run(fifobus(&bus.dir, &full), b"")
}

#[test]
fn req_prints_the_answer_of_a_command_or_a_fixed_text() {
    let bus = TempBus::start();
    let _upper = responder(&bus, &["svc.upper", "--command", "tr a-z A-Z"]);
    let (status, out, err) = req(&bus, &["svc.upper", "hello there"]);
    assert_eq!(
        (status.code(), out.as_str()),
        (Some(0), "HELLO THERE\n"),
        "{err}"
    );

    // The command sees the topic; only its first line answers.
    let _topic = responder(
        &bus,
        &[
            "svc.who.*",
            "--command",
            "echo \"$FIFOBUS_TOPIC\"; echo second",
        ],
    );
    let (status, out, _) = req(&bus, &["svc.who.x", ""]);
    assert_eq!((status.code(), out.as_str()), (Some(0), "svc.who.x\n"));

    let _fixed = responder(&bus, &["svc.ping", "pong"]);
    let (status, out, _) = req(&bus, &["svc.ping", "anything"]);
    assert_eq!((status.code(), out.as_str()), (Some(0), "pong\n"));
}

/// Nobody serving the topic: at once (well before --timeout), status 3,
/// "no responders". A plain subscriber is no responder: it could not answer.
#[test]
fn req_without_responders_fails_at_once_with_its_own_status() {
    let bus = TempBus::start();
    let _listener = bus.connect("plain", &["svc.>"]);
    let started = Instant::now();
    let (status, out, err) = req(&bus, &["--timeout", "30s", "svc.none", "x"]);
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("no responders on svc.none"), "{err}");
    assert!(out.is_empty());
    assert!(started.elapsed() < Duration::from_secs(10), "not at once");
}

#[test]
fn req_without_an_answer_in_time_exits_124() {
    let bus = TempBus::start();
    let mut silent = bus.connect("silent", &[]);
    silent.send_raw(b"SERVE svc.slow\n").unwrap();
    assert!(barrier(&mut silent).is_empty());
    let (status, _, err) = req(&bus, &["--timeout", "300ms", "svc.slow", "x"]);
    assert_eq!(status.code(), Some(124), "{err}");
    assert!(err.contains("no answer on svc.slow within 300ms"), "{err}");
    // The request did reach the responder, with a handle to answer.
    let line = silent.read_line(Some(T)).unwrap().unwrap();
    assert!(
        matches!(
            Reply::parse(&line),
            Reply::Request {
                topic: "svc.slow",
                payload: b"x",
                ..
            }
        ),
        "{}",
        String::from_utf8_lossy(&line)
    );
}

#[test]
fn two_hundred_requests_from_a_shell_loop_each_get_their_own_answer() {
    let bus = TempBus::start();
    let _r = responder(&bus, &["svc.n", "--command", "read -r x; echo \"got $x\""]);
    let script = r#"
        for i in $(seq 200); do
            a=$("$B" --dir "$D" req svc.n "$i") || { echo "request $i: status $?"; exit 1; }
            [ "$a" = "got $i" ] || { echo "request $i got '$a'"; exit 1; }
        done
        echo all-answered"#;
    let (status, out, err) = sh(
        script,
        &[("B", bin().as_os_str()), ("D", bus.dir.as_os_str())],
        Duration::from_secs(120),
    );
    assert!(status.success(), "{out}{err}");
    assert_eq!(out, "all-answered\n");
}

/// The raw protocol: REQ, REQUEST with a handle, REPLY back with the id; a
/// plain subscriber sees no REQUEST line; only a client the request reached
/// may answer it.
#[test]
fn raw_clients_request_and_reply_with_one_line_each() {
    let bus = TempBus::start();
    let mut asker = bus.connect("asker", &[]);
    let mut server = bus.connect("server", &[]);
    let mut old = bus.connect("old", &[">"]);
    let mut forger = bus.connect("forger", &[]);
    server.send_raw(b"SERVE calc.*\n").unwrap();
    barrier(&mut server);
    asker.send_raw(b"REQ my-1 calc.add 2 3\n").unwrap();
    assert!(barrier(&mut asker).is_empty());
    let line = server.read_line(Some(T)).unwrap().unwrap();
    let Reply::Request {
        handle,
        topic,
        payload,
    } = Reply::parse(&line)
    else {
        panic!("not a REQUEST: {}", String::from_utf8_lossy(&line))
    };
    assert_eq!((topic, payload), ("calc.add", &b"2 3"[..]));
    let handle = handle.to_owned();
    forger
        .send_raw(format!("REPLY {handle} 666\n").as_bytes())
        .unwrap();
    let refused = barrier(&mut forger);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].starts_with(&format!("ERR unknown-request {handle} ")),
        "{refused:?}"
    );
    server
        .send_raw(format!("REPLY {handle} 5\n").as_bytes())
        .unwrap();
    barrier(&mut server);
    assert_eq!(read_until(&mut asker, "REPLY my-1 5"), Vec::<String>::new());
    assert!(barrier(&mut asker).is_empty(), "one answer only");
    // The subscriber to everything saw no request: it did not ask for them.
    let seen = barrier(&mut old);
    assert!(seen.iter().all(|l| l.starts_with("MSG _bus.")), "{seen:?}");
}

/// A client that goes on asking while nobody answers holds at most 1024
/// requests in the broker: the oldest is forgotten, and it is told which.
#[test]
fn pending_requests_per_client_are_bounded() {
    let bus = TempBus::start();
    let mut silent = bus.connect("silent", &[]);
    silent.send_raw(b"SERVE svc.slow\n").unwrap();
    barrier(&mut silent);
    let mut asker = bus.connect("asker", &[]);
    let mut lines = Vec::new();
    for i in 1..=1026 {
        lines.extend_from_slice(format!("REQ r{i} svc.slow x\n").as_bytes());
    }
    asker.send_raw(&lines).unwrap();
    let got = barrier(&mut asker);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].starts_with("ERR too-many-requests r1 "), "{got:?}");
    assert!(got[1].starts_with("ERR too-many-requests r2 "), "{got:?}");
}

/// The last responder a request reached leaves unanswered: the requester
/// hears "no responders" instead of waiting for its timeout.
#[test]
fn a_responder_that_leaves_unanswered_ends_the_request() {
    let bus = TempBus::start();
    let mut asker = bus.connect("asker", &[]);
    let mut r = Bg::start(fifobus(
        &bus.dir,
        &["reply", "svc.x", "--command", "exec sleep 60"],
    ));
    r.stderr_until("fifobus reply: serving svc.x");
    asker.send_raw(b"REQ q svc.x hi\n").unwrap();
    barrier(&mut asker);
    // Its pid= process is gone: the broker removes it.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(r.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    r.wait();
    let line = asker.read_line(Some(T)).unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&line), "ERR no-responders q");
}

#[test]
fn presence_events_tell_who_joined_and_why_they_left() {
    let bus = TempBus::start();
    let mut watch = bus.connect("watch", &["_bus.client.>"]);
    // One that says BYE, one whose pid= process dies.
    let c = bus.connect("polite", &[]);
    let id = c.id().to_owned();
    c.bye(T).unwrap();
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id() as i32;
    let d = bus.connect_opts(ConnectOptions {
        name: Some("mortal".into()),
        pid: Some(pid),
        subs: Vec::new(),
    });
    let id2 = d.id().to_owned();
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let uid = nix::unistd::getuid().as_raw();
    let want = [
        // Its sub= is in force before it is announced: it sees itself join.
        format!(
            "MSG _bus.client.joined uuid={} name=watch uid={uid}",
            watch.id()
        ),
        format!("MSG _bus.client.joined uuid={id} name=polite uid={uid}"),
        format!("MSG _bus.client.left uuid={id} name=polite uid={uid} reason=bye"),
        format!("MSG _bus.client.joined uuid={id2} name=mortal pid={pid} uid={uid}"),
        format!(
            "MSG _bus.client.left uuid={id2} name=mortal pid={pid} uid={uid} reason=pid-exited"
        ),
    ];
    let mut got = Vec::new();
    while got.len() < want.len() {
        let l = watch.read_line(Some(T)).unwrap().expect("not EOF");
        got.push(String::from_utf8_lossy(&l).into_owned());
    }
    assert_eq!(got, want);
}

#[test]
fn only_the_broker_publishes_under_bus() {
    let bus = TempBus::start();
    let mut watch = bus.connect("watch", &["_bus.>"]);
    let (status, _, err) = run(
        fifobus(
            &bus.dir,
            &["pub", "_bus.client.left", "uuid=fake reason=bye"],
        ),
        b"",
    );
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("forbidden _bus.client.left"), "{err}");
    let mut raw = bus.connect("raw", &[]);
    raw.send_raw(b"PUB _bus.x y\nPUB _bus z\n").unwrap();
    assert_eq!(
        barrier(&mut raw),
        ["ERR forbidden _bus.x", "ERR forbidden _bus"]
    );
    // The watcher saw the clients come and go, and nothing forged.
    let seen = barrier(&mut watch);
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|l| l.starts_with("MSG _bus.client.")),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|l| l.contains("fake")), "{seen:?}");
}

#[test]
fn ls_lists_clients_and_topics_through_the_bus() {
    let bus = TempBus::start_with(&["--metrics-addr", "off"]);
    let alice = bus.connect("alice", &["chat.>"]);
    let mut bob = bus.connect("bob", &[]);
    bob.send_raw(b"SERVE svc.>\nPUB chat.room hi\nPUB chat.room again\n")
        .unwrap();
    barrier(&mut bob);

    let (status, out, err) = run(fifobus(&bus.dir, &["ls", "--json"]), b"");
    assert!(status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{out}");
    let a = &rows[0];
    assert_eq!(a["name"], "alice");
    assert_eq!(a["uuid"], alice.id());
    assert_eq!(a["subscriptions"], serde_json::json!(["chat.>"]));
    // What is not yet in its recv pipe: alice does not read, but the pipe has room.
    assert!(
        a["backlog_lines"].is_u64() && a["backlog_bytes"].is_u64(),
        "{out}"
    );
    assert!(a["age_secs"].is_u64());
    assert_eq!(rows[1]["name"], "bob");
    assert_eq!(rows[1]["serves"], serde_json::json!(["svc.>"]));

    let (status, out, _) = run(fifobus(&bus.dir, &["ls"]), b"");
    assert!(status.success());
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("NAME "), "{out}");
    assert!(lines.next().unwrap().starts_with("alice "), "{out}");
    assert!(out.contains(alice.id()), "{out}");

    let (status, out, _) = run(fifobus(&bus.dir, &["ls", "topics", "--json"]), b"");
    assert!(status.success());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let room = v["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["topic"] == "chat.room")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        (room["subscribers"].as_u64(), room["published"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(v["patterns"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!({"pattern": "svc.>", "subscribers": 0, "responders": 1})));
}

#[test]
fn sub_format_prints_json_or_a_template() {
    let bus = TempBus::start();
    let json = Bg::start(fifobus(
        &bus.dir,
        &["sub", "t.>", "-n", "1", "--format", "json"],
    ));
    let tpl = Bg::start(fifobus(
        &bus.dir,
        &["sub", "t.>", "-n", "1", "-F", "%t|%p|%U"],
    ));
    // A client's sub= patterns are in force before its directory exists.
    assert!(wait_for(&bus.clients_dir(), T, || bus.client_dirs().len() >= 2));
    let mut p = bus.connect("pub", &[]);
    p.send_raw(b"PUB t.a say \"hi\"\n").unwrap();
    barrier(&mut p);
    let v: serde_json::Value = serde_json::from_str(&json.line()).unwrap();
    assert_eq!(
        (v["topic"].as_str(), v["payload"].as_str()),
        (Some("t.a"), Some("say \"hi\""))
    );
    assert!(v["time"].as_str().unwrap().ends_with('Z'));
    assert!(v["ts"].as_f64().unwrap() > 1.6e9);
    let line = tpl.line();
    let (head, ts) = line.rsplit_once('|').unwrap();
    assert_eq!(head, "t.a|say \"hi\"");
    assert!(ts.parse::<f64>().unwrap() > 1.6e9, "{line}");
    let (status, _, err) = run(fifobus(&bus.dir, &["sub", "t", "-F", "%q"]), b"");
    assert_eq!(status.code(), Some(2), "a typo is refused: {err}");
}

#[test]
fn pub_pairs_publishes_each_line_on_its_own_topic() {
    let bus = TempBus::start();
    let mut sub = bus.connect("sub", &["temp.>"]);
    let (status, _, err) = run(
        fifobus(&bus.dir, &["pub", "--pairs"]),
        b"temp.kitchen 21.5\r\nbad..topic x\n\ntemp.cellar  12\ntemp.attic\n",
    );
    assert_eq!(status.code(), Some(1), "a bad line is an error: {err}");
    assert!(err.contains("line 2: invalid topic 'bad..topic'"), "{err}");
    assert_eq!(
        barrier(&mut sub),
        [
            "MSG temp.kitchen 21.5",
            "MSG temp.cellar  12",
            "MSG temp.attic "
        ]
    );
    let (status, _, err) = run(fifobus(&bus.dir, &["pub", "--pairs"]), b"a.b 1\n");
    assert!(status.success(), "{err}");
    assert!(barrier(&mut sub).is_empty());
}

/// examples/requests/: a bash service on raw FIFOs, and a bash client.
#[test]
fn the_bash_request_reply_example_serves_and_asks() {
    let bus = TempBus::start();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/requests");
    let mut service = Command::new("bash");
    service
        .arg(dir.join("upper-service.sh"))
        .env("FIFOBUS_DIR", &bus.dir);
    let service = Bg::start(service);
    service.stderr_until("upper-service: serving svc.upper");
    let (status, out, err) = req(&bus, &["svc.upper", "from the cli"]);
    assert_eq!(
        (status.code(), out.as_str()),
        (Some(0), "FROM THE CLI\n"),
        "{err}"
    );
    let mut client = Command::new("bash");
    client
        .arg(dir.join("ask.sh"))
        .args(["svc.upper", "from bash"])
        .env("FIFOBUS_DIR", &bus.dir);
    let (status, out, err) = run(client, b"");
    assert_eq!(
        (status.code(), out.as_str()),
        (Some(0), "FROM BASH\n"),
        "{err}"
    );
    let mut client = Command::new("bash");
    client
        .arg(dir.join("ask.sh"))
        .args(["svc.nobody", "x"])
        .env("FIFOBUS_DIR", &bus.dir);
    let (status, _, err) = run(client, b"");
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(err.contains("no responders"), "{err}");
}

/// On a shared bus, an unprivileged user can neither publish under `_bus.`
/// (forge presence) nor answer a request that did not reach it.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn another_user_cannot_forge_presence_or_answers() {
    use fifobus_testkit::users::User;
    let mallory = User::create("mallory");
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    std::fs::set_permissions(bus.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    bus.spawn(&["--shared"]);
    let mut watch = bus.connect("watch", &["_bus.client.>"]);
    let mut asker = bus.connect("asker", &[]);
    let mut server = bus.connect("server", &[]);
    server.send_raw(b"SERVE svc.x\n").unwrap();
    barrier(&mut server);
    asker.send_raw(b"REQ q svc.x hi\n").unwrap();
    barrier(&mut asker);
    let line = server.read_line(Some(T)).unwrap().unwrap();
    let Reply::Request { handle, .. } = Reply::parse(&line) else {
        panic!("{}", String::from_utf8_lossy(&line))
    };
    let handle = handle.to_owned();
    // mallory: fifobus pub under _bus., then a raw REPLY with the handle.
    let script = format!(
        r#""$B" --dir "$D" pub _bus.client.left 'uuid=x reason=bye'; echo "pub=$?"
        cdir=$("$B" --dir "$D" connect --name mallory --pid $$) || exit 9
        exec 3<"$cdir/recv"
        printf 'REPLY {handle} forged\nPING done\n' > "$cdir/send"
        while IFS= read -r l <&3; do [ "$l" = "PONG done" ] && break; echo "$l"; done
        echo BYE > "$cdir/send""#
    );
    let mut cmd = mallory.command("bash");
    cmd.arg("-c")
        .arg(&script)
        .env("B", bin())
        .env("D", &bus.dir)
        .current_dir("/");
    let (status, out, err) = run(cmd, b"");
    assert!(status.success(), "{out}{err}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("pub=1"), "{out}{err}");
    assert!(err.contains("forbidden _bus.client.left"), "{err}");
    assert!(
        lines
            .next()
            .unwrap_or_default()
            .starts_with(&format!("ERR unknown-request {handle} ")),
        "{out}"
    );
    // The real answer still goes through, and only it.
    server
        .send_raw(format!("REPLY {handle} real\n").as_bytes())
        .unwrap();
    barrier(&mut server);
    assert_eq!(read_until(&mut asker, "REPLY q real"), Vec::<String>::new());
    let seen = barrier(&mut watch);
    assert!(!seen.iter().any(|l| l.contains("uuid=x ")), "{seen:?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("name=mallory") && l.contains("reason=bye")),
        "{seen:?}"
    );
}

/// What a client can make the broker hold for requests is bounded:
/// SERVE patterns under --max-subscriptions, ids of at most 64 bytes.
#[test]
fn serve_patterns_and_ids_are_bounded() {
    let bus = TempBus::start_with(&["--max-subscriptions", "2"]);
    let mut c = bus.connect("c", &[]);
    c.send_raw(b"SERVE a\nSERVE b\nSERVE c\n").unwrap();
    let got = barrier(&mut c);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("ERR too-many-subscriptions "), "{got:?}");
    let long = "i".repeat(65);
    c.send_raw(format!("REQ {long} z x\nREQ {} z x\n", &long[1..]).as_bytes())
        .unwrap();
    let got = barrier(&mut c);
    assert!(got[0].starts_with("ERR bad-syntax request id"), "{got:?}");
    assert_eq!(
        got[1],
        format!("ERR no-responders {}", &long[1..]),
        "64 is fine"
    );
    assert_eq!(got.len(), 2, "{got:?}");
}

/// Under an ACL, listing the bus (and hearing presence) needs the right to
/// receive the `_bus.` topic: a user the ACL denies gets `forbidden`.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn the_acl_decides_who_may_list_the_bus() {
    use fifobus_testkit::users::User;
    let (alice, mallory) = (User::create("alice"), User::create("mallory"));
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    std::fs::set_permissions(bus.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let acl = bus.tmp.path().join("fifobus.acl");
    std::fs::write(
        &acl,
        format!("default allow\ndeny sub _bus.> user={}\n", mallory.name),
    )
    .unwrap();
    std::fs::set_permissions(&acl, std::fs::Permissions::from_mode(0o644)).unwrap();
    bus.spawn(&["--shared", "--acl", acl.to_str().unwrap()]);
    let _someone = bus.connect("someone", &["chat.>"]);
    let ls = |user: &User| {
        let mut cmd = user.command(bin());
        cmd.arg("--dir")
            .arg(&bus.dir)
            .args(["ls", "--json"])
            .current_dir("/");
        run(cmd, b"")
    };
    let (status, out, err) = ls(&alice);
    assert!(status.success(), "{err}");
    assert!(out.contains("\"name\":\"someone\""), "{out}");
    let (status, out, err) = ls(&mallory);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(err.contains("forbidden _bus.ls.clients"), "{err}");
    assert!(!out.contains("someone"), "{out}");
}
