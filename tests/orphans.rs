//! Vanished clients cannot lock others out (issue 9, item 1): what ties a
//! client to a process, and how the broker ends pid-less clients that went
//! quiet: the longest idle one when the table is full, any of them after
//! `--orphan-timeout` (that rule runs on the paused clock in tests/timing.rs).

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::*;
use fifobus::client::{Client, ClientError, ConnectOptions};
use fifobus::protocol::Reply;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The `pid=` the broker logged for the client named `name`: `None` when
/// it had none.
fn joined_pid(bus: &TempBus, name: &str) -> Option<i32> {
    let needle = format!("client joined client={name} ");
    assert!(bus.wait_log(&needle), "no client named {name} joined");
    let log = bus.log_text();
    let line = log.lines().find(|l| l.contains(&needle)).unwrap();
    let pid = line.rsplit_once(" pid=").unwrap().1.trim();
    match pid {
        "None" => None,
        p => Some(
            p.strip_prefix("Some(")
                .and_then(|p| p.strip_suffix(')'))
                .unwrap_or_else(|| panic!("pid field {p:?}"))
                .parse()
                .unwrap(),
        ),
    }
}

/// `shell -c script` with the bus in `$FIFOBUS_DIR` and the binary in
/// `$FB`; its stdin is a pipe (the script ends when the test closes it)
/// and the first line it prints is returned.
fn run_script(bus: &TempBus, shell: &str, script: &str) -> (Child, String) {
    let mut child = Command::new(shell)
        .arg("-c")
        .arg(script)
        .env("FIFOBUS_DIR", &bus.dir)
        .env("FB", bin())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim_end().to_owned())
}

fn pidless(name: &str, subs: &[&str]) -> ConnectOptions {
    ConnectOptions {
        name: Some(name.to_owned()),
        pid: None,
        subs: subs.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

/// The client was ended by the broker: its recv says BYE, then EOF, and its
/// directory is gone.
fn assert_ended(c: &mut Client) {
    let line = c.read_line(Some(T)).unwrap().expect("BYE before EOF");
    assert_eq!(Reply::parse(&line), Reply::Bye);
    assert_eq!(c.read_line(Some(T)).unwrap(), None, "EOF after BYE");
    assert!(!c.dir().exists(), "directory removed before recv closed");
}

fn refused(r: Result<Client, ClientError>) -> String {
    match r {
        Err(ClientError::Refused { code, .. }) => code,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(c) => panic!("expected a refusal, got WELCOME {}", c.dir().display()),
    }
}

#[test]
fn a_full_table_ends_the_longest_idle_pidless_client() {
    let bus = TempBus::start_with(&["--max-clients", "5"]);
    // Connected in this order: c0 is the oldest.
    let mut c0 = bus.connect_opts(pidless("c0", &[]));
    let mut c1 = bus.connect_opts(pidless("c1", &["t"]));
    let mut c2 = bus.connect_opts(pidless("c2", &[]));
    let mut c3 = bus.connect_opts(pidless("c3", &[]));
    let mut c4 = bus.connect_opts(pidless("c4", &[]));
    // c0 is active by a command, c3 by publishing, c1 by reading its recv
    // (it sends nothing): the longest idle is now c2.
    barrier(&mut c0);
    c3.publish(&topic("t"), b"hi").unwrap();
    barrier(&mut c3);
    let line = c1.read_line(Some(T)).unwrap().unwrap();
    assert_eq!(line, b"MSG t hi");
    let mut c5 = bus.connect_opts(pidless("c5", &[]));
    assert_ended(&mut c2);
    for c in [&mut c0, &mut c1, &mut c3, &mut c4, &mut c5] {
        barrier(c);
    }
    assert_eq!(bus.client_dirs().len(), 5);
    assert!(bus.wait_log("table full"), "the eviction is logged");
}

#[test]
fn clients_with_a_pid_are_never_evicted() {
    let bus = TempBus::start_with(&["--max-clients", "3"]);
    let me = std::process::id() as i32;
    let with_pid = |name: &str| ConnectOptions {
        pid: Some(me),
        ..pidless(name, &[])
    };
    let mut tied: Vec<Client> = (0..2)
        .map(|i| bus.connect_opts(with_pid(&format!("tied{i}"))))
        .collect();
    // The one pid-less client is the only one that can make room, however
    // recently it was active.
    let mut loose = bus.connect_opts(pidless("loose", &[]));
    barrier(&mut loose);
    let mut newcomer = bus.connect_opts(with_pid("newcomer"));
    assert_ended(&mut loose);
    // Now every place is held by a client with pid=: nobody can be ended.
    let code = refused(Client::connect(&bus.dir, &pidless("late", &[]), T));
    assert_eq!(code, "too-many-clients");
    let code = refused(Client::connect(&bus.dir, &with_pid("late2"), T));
    assert_eq!(code, "too-many-clients");
    for c in tied.iter_mut().chain([&mut newcomer]) {
        barrier(c);
    }
}

/// 10,000 pid-less clients that vanish without BYE against 100 places: the
/// broker keeps admitting, and a well-behaved client connects at the end.
#[test]
fn a_flood_of_vanishing_clients_cannot_lock_others_out() {
    let bus = TempBus::start_with(&["--max-clients", "100", "--metrics-addr", "off"]);
    const THREADS: usize = 4;
    const EACH: usize = 2500;
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let bus = &bus;
            s.spawn(move || {
                for i in 0..EACH {
                    let opts = pidless(&format!("gone{t}x{i}"), &[]);
                    match Client::connect(&bus.dir, &opts, T) {
                        // Vanishes: no BYE, no pid=, its FIFOs closed.
                        Ok(c) => drop(c),
                        Err(e) => panic!("HELLO {i} of thread {t} failed: {e}"),
                    }
                }
            });
        }
    });
    let mut good = bus.connect_opts(pidless("good", &["t"]));
    barrier(&mut good);
    assert!(bus.client_dirs().len() <= 100);
}

/// `fifobus connect` without flags ties the client to the script that ran
/// it, also when the shell runs it from a subshell of `$(...)` (which
/// exits as soon as the directory is printed): the client lives as long
/// as the script and ends with it.
#[test]
fn connect_ties_its_client_to_the_calling_script() {
    let bus = TempBus::start();
    let cases = [
        ("bash", "plain", r#"cdir=$("$FB" connect --name plain)"#),
        // A forked subshell runs these, not the script itself.
        ("bash", "list", r#"cdir=$("$FB" connect --name list; true)"#),
        (
            "bash",
            "piped",
            r#"cdir=$("$FB" connect --name piped | cat)"#,
        ),
        ("sh", "dash", r#"cdir=$("$FB" connect --name dash)"#),
        (
            "sh",
            "dashfn",
            r#"f() { "$FB" connect --name dashfn; }; cdir=$(f)"#,
        ),
    ];
    for (shell, name, connect) in cases {
        let script = format!(r#"{connect} || exit 1; echo "$cdir"; read -r _; exit 0"#);
        let (mut child, cdir) = run_script(&bus, shell, &script);
        let cdir = PathBuf::from(cdir);
        assert_eq!(
            joined_pid(&bus, name),
            Some(child.id() as i32),
            "{shell}: {connect}: tied to the wrong process"
        );
        assert!(cdir.is_dir(), "{name}: {} missing", cdir.display());
        // The script ends: so does its client.
        drop(child.stdin.take());
        assert!(wait_child(&mut child, T).unwrap().success());
        assert!(wait_gone(&cdir, T), "{name}: client outlived its script");
    }
}

#[test]
fn connect_pid_and_no_pid() {
    let bus = TempBus::start();
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    let out = Command::new(bin())
        .args(["--dir".as_ref(), bus.dir.as_os_str()])
        .args(["connect", "--name", "chosen", "--pid"])
        .arg(sleeper.id().to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    let chosen = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim_end());
    assert_eq!(joined_pid(&bus, "chosen"), Some(sleeper.id() as i32));

    // --no-pid: the client outlives the script that made it.
    let (mut child, loose) = run_script(
        &bus,
        "bash",
        r#""$FB" connect --name loose --no-pid && { read -r _; exit 0; }"#,
    );
    drop(child.stdin.take());
    assert!(wait_child(&mut child, T).unwrap().success());
    assert_eq!(joined_pid(&bus, "loose"), None);
    let mut other = bus.connect("other", &[]);
    barrier(&mut other);
    assert!(
        PathBuf::from(&loose).is_dir(),
        "a --no-pid client ended with its script"
    );

    assert!(chosen.is_dir());
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert!(wait_gone(&chosen, T), "not ended with its --pid process");

    let out = Command::new(bin())
        .args(["--dir".as_ref(), bus.dir.as_os_str()])
        .args(["connect", "--pid", "1", "--no-pid"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

/// `fifobus pub` and `fifobus sub` name their own pid: killed, their client
/// goes at once, with no BYE.
#[test]
fn pub_and_sub_are_tied_to_their_own_process() {
    let bus = TempBus::start();
    for (name, args) in [("s", &["sub", "t"][..]), ("p", &["pub", "t"][..])] {
        let mut child = Command::new(bin())
            .args(["--dir".as_ref(), bus.dir.as_os_str()])
            .args(args)
            .args(["--name", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        assert_eq!(joined_pid(&bus, name), Some(child.id() as i32));
        let clients = bus.clients_dir();
        assert!(wait_for(&clients, T, || bus.client_dirs().len() == 1));
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        assert!(wait_for(&clients, T, || bus.client_dirs().is_empty()));
    }
}
