//! How clients end, and how the broker starts and stops.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use fifobus::client::ConnectOptions;
use fifobus::protocol::Reply;
use nix::sys::signal::Signal;

#[test]
fn client_whose_pid_dies_is_removed() {
    let bus = TempBus::start();
    let mut child = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = bus.connect_opts(ConnectOptions {
        name: Some("mortal".into()),
        pid: Some(child.id() as i32),
        subs: vec!["t".parse().unwrap()],
    });
    barrier(&mut c);
    let dir = c.dir().to_owned();
    child.kill().unwrap();
    child.wait().unwrap();
    // The broker closes its end of recv when it removes the client: EOF.
    assert_eq!(c.read_line(Some(T)).unwrap(), None);
    assert!(!dir.exists(), "directory removed before recv closed");
    // Its subscription is gone too: a publisher reaches nobody, and others are fine.
    let mut p = bus.connect("p", &[]);
    p.publish(&topic("t"), b"x").unwrap();
    barrier(&mut p);
}

#[test]
fn hello_with_a_dead_pid_is_refused() {
    let bus = TempBus::start();
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    let r = fifobus::client::Client::connect(
        &bus.dir,
        &ConnectOptions {
            pid: Some(pid),
            ..Default::default()
        },
        T,
    );
    assert!(matches!(r, Err(e) if e.code() == Some(fifobus::protocol::ErrorCode::BadPid)));
}

#[test]
fn deleting_a_client_directory_or_fifo_ends_only_that_client() {
    let bus = TempBus::start();
    let mut keep = bus.connect("keep", &["t"]);
    for victim in ["dir", "send", "recv"] {
        let mut c = bus.connect(victim, &["t"]);
        barrier(&mut c);
        match victim {
            "dir" => fs::remove_dir_all(c.dir()).unwrap(),
            f => fs::remove_file(c.dir().join(f)).unwrap(),
        }
        assert_eq!(c.read_line(Some(T)).unwrap(), None, "{victim}: EOF on recv");
        assert!(wait_gone(c.dir(), T), "{victim}: directory removed");
    }
    let mut p = bus.connect("p", &[]);
    p.publish(&topic("t"), b"still-here").unwrap();
    barrier(&mut p);
    assert_eq!(barrier(&mut keep), ["MSG t still-here"]);
}

#[test]
fn deleted_hello_is_recreated() {
    let bus = TempBus::start();
    let hello = bus.dir.join("hello");
    fs::remove_file(&hello).unwrap();
    assert!(wait_for(&hello, T, || hello.exists()), "hello came back");
    let mut c = bus.connect("after", &[]);
    barrier(&mut c);
}

#[test]
fn bye_is_answered_and_removes_the_directory() {
    let bus = TempBus::start();
    let c = bus.connect("c", &[]);
    let dir = c.dir().to_owned();
    assert!(c.bye(T).unwrap().is_empty());
    assert!(wait_gone(&dir, T));
}

#[test]
fn bye_survives_a_reader_that_opens_recv_late() {
    // The client writes BYE and only then opens recv: the broker must keep
    // recv open until the BYE line has been read, or it would vanish.
    let bus = TempBus::start();
    let script = r#"
        set -eu
        r=$(mktemp -u); mkfifo -m 600 "$r"
        echo "HELLO reply=$r" > "$DIR/hello"
        read -r _ id cdir < "$r"; rm -f "$r"
        echo "PUB nobody.listens x" > "$cdir/send"
        echo "SUB me" > "$cdir/send"
        echo "PUB me 1" > "$cdir/send"
        echo BYE > "$cdir/send"
        cat "$cdir/recv"
    "#;
    let (status, out, err) = sh(script, &[("DIR", bus.dir.as_os_str())], T);
    assert!(status.success(), "{err}");
    assert_eq!(out, "MSG me 1\nBYE\n");
}

#[test]
fn sigterm_stops_promptly_with_blocked_clients_and_cleans_up() {
    let mut bus = TempBus::start();
    let mut idle = bus.connect("idle", &["t"]);
    barrier(&mut idle);
    // A shell client: `cat` blocked in read() on its recv, and a loop
    // flooding its send (to a topic nobody reads).
    let shell = bus.connect("shell", &[]);
    let cdir = shell.dir().to_owned();
    drop(shell);
    let mut reader = Command::new("cat")
        .arg(cdir.join("recv"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let writer_script = format!(
        "while :; do echo 'PUB f flood'; done > '{}'",
        cdir.join("send").display()
    );
    let mut writer = Command::new("bash")
        .arg("-c")
        .arg(&writer_script)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A shell blocked opening its reply FIFO after HELLO never sees a reply
    // open; the broker must not wait for it either.
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path().join("r");
    nix::unistd::mkfifo(&r, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(bus.dir.join("hello"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, hello_line(&r, None).as_bytes()))
        .unwrap();
    barrier(&mut idle);
    // That shutdown meets its deadline is tested in-process under tokio's
    // paused time, not here against the wall clock.
    let status = bus.stop(Signal::SIGTERM);
    assert!(status.success(), "{status:?}");
    assert!(!bus.dir.exists(), "bus directory removed");
    // Clients see the end: BYE then EOF, the writer gets EPIPE, the reader EOF.
    assert!(read_until(&mut idle, "BYE").is_empty());
    assert_eq!(idle.read_line(Some(T)).unwrap(), None);
    assert!(wait_child(&mut reader, T).is_some(), "cat on recv ended");
    assert!(wait_child(&mut writer, T).is_some(), "writer on send ended");
}

#[test]
fn sigint_works_like_sigterm() {
    let mut bus = TempBus::start();
    let _c = bus.connect("c", &[]);
    let status = bus.stop(Signal::SIGINT);
    assert!(status.success());
    assert!(!bus.dir.exists());
}

#[test]
fn second_broker_on_the_same_directory_names_the_first() {
    let bus = TempBus::start();
    let out = Command::new(bin())
        .arg("serve")
        .arg("--dir")
        .arg(&bus.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "is locked by pid {} (another fifobus serve is running)",
            bus.pid()
        )),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let mut c = bus.connect("still", &[]);
    barrier(&mut c);
}

#[test]
fn broker_killed_with_sigkill_leaves_nothing_that_stops_the_next() {
    let mut bus = TempBus::start();
    // A client whose process is gone when the next broker starts: removed
    // (one whose process lives is adopted, tests/restart.rs).
    let mut gone = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let c = bus.connect_opts(fifobus::client::ConnectOptions {
        name: Some("orphan".into()),
        pid: Some(gone.id() as i32),
        subs: vec![pattern("t")],
    });
    let stale = c.dir().to_owned();
    drop(c);
    let status = bus.stop(Signal::SIGKILL);
    assert!(!status.success());
    assert!(
        stale.exists() && bus.dir.join("hello").exists(),
        "SIGKILL leaves state behind"
    );
    let _ = gone.kill();
    let _ = gone.wait();
    bus.spawn(&[]);
    assert!(!stale.exists(), "stale client directory removed");
    assert!(bus.wait_log("did not stop cleanly: removed the hello FIFO"));
    assert!(bus.wait_log("adopted 0 clients (each first reads 'DROPPED ? restart'), removed 1"));
    let mut c = bus.connect("new", &[]);
    barrier(&mut c);
}

#[test]
fn idle_broker_uses_no_cpu() {
    let bus = TempBus::start();
    let mut clients: Vec<_> = (0..20)
        .map(|i| bus.connect(&format!("c{i}"), &["t.>"]))
        .collect();
    for c in &mut clients {
        barrier(c);
    }
    let ticks = || -> u64 {
        let stat = fs::read_to_string(format!("/proc/{}/stat", bus.pid())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        // utime and stime, fields 14 and 15 of stat(5), counted after the ')'.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let wakeups = || -> u64 {
        fs::read_dir(format!("/proc/{}/task", bus.pid()))
            .unwrap()
            .map(|t| {
                let status =
                    fs::read_to_string(t.unwrap().path().join("status")).unwrap_or_default();
                status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches"))
                    .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
                    .sum::<u64>()
            })
            .sum()
    };
    let (t0, w0) = (ticks(), wakeups());
    // A measurement window, not a synchronisation: nothing is awaited here.
    std::thread::sleep(Duration::from_secs(2));
    let (t1, w1) = (ticks(), wakeups());
    assert!(t1 - t0 <= 1, "idle broker used {} clock ticks", t1 - t0);
    assert!(w1 - w0 <= 4, "idle broker woke up {} times in 2 s", w1 - w0);
}

#[test]
fn sigterm_is_prompt_even_while_clients_flood_bad_lines() {
    let mut bus = TempBus::start();
    let mut floods = Vec::new();
    for i in 0..2 {
        let c = bus.connect(&format!("flood{i}"), &[]);
        let send = c.dir().join("send");
        drop(c);
        let script = format!(
            "while :; do printf 'x\\nx\\nx\\nx\\nx\\nx\\nx\\nx\\n'; done > '{}'",
            send.display()
        );
        floods.push(
            Command::new("bash")
                .arg("-c")
                .arg(script)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    // The flood is under way once the broker has refused some of it.
    assert!(bus.wait_log("refused a line"));
    // That shutdown meets its deadline is tested in-process under tokio's
    // paused time, not here against the wall clock.
    let status = bus.stop(Signal::SIGTERM);
    assert!(status.success(), "{status:?}");
    for mut f in floods {
        assert!(wait_child(&mut f, T).is_some(), "flooder ended (EPIPE)");
    }
}

#[test]
fn bye_from_a_client_that_never_reads_still_ends_it() {
    let bus = TempBus::start();
    let mut c = bus.connect("never-reads", &["t"]);
    let dir = c.dir().to_owned();
    // Fill its recv pipe (and some backlog), then say BYE without reading.
    let mut p = bus.connect("p", &[]);
    let payload = "y".repeat(1000);
    p.send_raw(&pub_lines((0..200).map(|_| ("t", &payload))))
        .unwrap();
    barrier(&mut p);
    // Not `bye()`, which would read: this client never reads.
    c.send(&fifobus::protocol::Command::Bye).unwrap();
    assert!(
        wait_gone(&dir, T),
        "the session ends after the grace period"
    );
    drop(c);
}

#[test]
fn lines_written_just_before_a_pid_client_exits_are_delivered() {
    let bus = TempBus::start();
    let mut sub = bus.connect("sub", &["last.words"]);
    let script = r#"
        for i in $(seq 1 40); do
            bash -c '
                r=$(mktemp -u); mkfifo -m 600 "$r"
                echo "HELLO reply=$r pid=$$" > "$DIR/hello"
                read -r _ id cdir < "$r"; rm -f "$r"
                echo "PUB last.words $1" > "$cdir/send"
            ' _ "$i" &
        done
        wait
    "#;
    let (status, _, err) = sh(script, &[("DIR", bus.dir.as_os_str())], T);
    assert!(status.success(), "{err}");
    let mut got: Vec<u32> = (0..40)
        .map(|_| {
            let line = sub.read_line(Some(T)).unwrap().expect("a message");
            let Reply::Msg { payload, .. } = Reply::parse(&line) else {
                panic!("not a MSG: {}", String::from_utf8_lossy(&line))
            };
            std::str::from_utf8(payload).unwrap().parse().unwrap()
        })
        .collect();
    got.sort_unstable();
    assert_eq!(got, (1..=40).collect::<Vec<_>>());
    assert!(
        wait_for(&bus.clients_dir(), T, || bus.client_dirs().len() == 1),
        "the 40 exited clients are gone"
    );
}
