//! `fifobus serve --replace` (issue 10, item 3): a new broker takes over a
//! running one with nothing lost, nothing reordered, and no client noticing;
//! when the old one cannot hand over, the new one fails and the old serves on.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use fifobus::client::ConnectOptions;

fn with_pid(name: &str, subs: &[&str]) -> ConnectOptions {
    ConnectOptions {
        name: Some(name.into()),
        pid: Some(std::process::id() as i32),
        subs: subs.iter().map(|s| pattern(s)).collect(),
    }
}

/// How many times the log says a replacement took over (logged once its
/// clients are adopted and its control socket exists).
fn takeovers(bus: &TempBus) -> usize {
    bus.log_text()
        .matches(" from the previous broker, removed")
        .count()
}

/// Starts `serve --replace` on `bus`, waits until it has taken over
/// (the `n`-th takeover in the log), reaps the old broker (which must exit
/// 0, without BYE) and makes the new one the bus's broker.
fn replace(bus: &mut TempBus, n: usize) {
    let mut old = bus.child.take().expect("a broker runs");
    let new = bus.spawn_raw(&["--replace"]);
    let log = bus.log.clone();
    let ok = wait_for(&log, T, || takeovers(bus) >= n);
    bus.child = Some(new);
    if !ok {
        // Reaped here: the bus only kills the broker it holds.
        let _ = old.kill();
        let _ = old.wait();
        panic!("replacement {n} did not take over:\n{}", bus.log_text());
    }
    let status = wait_child(&mut old, T).expect("the old broker did not exit");
    assert!(status.success(), "the old broker exited {status}");
}

#[test]
fn replace_during_a_stream_of_300k_loses_nothing_and_keeps_order() {
    const N: usize = 300_000;
    let mut bus = TempBus::start();
    // The subscriber: fifobus sub -n N, its output counted.
    let mut sub: Child = Command::new(bin())
        .args(["sub", "t.n", "-n", &N.to_string(), "--timeout", "120"])
        .env("FIFOBUS_DIR", &bus.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        bus.wait_log("client joined client=fifobus-sub"),
        "{}",
        bus.log_text()
    );
    let out = sub.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut next = 0usize;
        for line in BufReader::new(out).lines() {
            let line = line.unwrap();
            let i: usize = line.parse().unwrap_or_else(|_| panic!("odd line {line:?}"));
            assert_eq!(
                i, next,
                "message {i} where {next} was due: lost or reordered"
            );
            next += 1;
        }
        next
    });
    // The publisher, in a thread, tells when it is a third of the way.
    let publisher = bus.connect_opts(with_pid("publisher", &[]));
    let (third_tx, third_rx) = mpsc::channel();
    let pubber = std::thread::spawn(move || {
        let mut c = publisher;
        let mut chunk = Vec::new();
        for i in 0..N {
            chunk.extend_from_slice(format!("PUB t.n {i}\n").as_bytes());
            if chunk.len() > 16 * 1024 || i + 1 == N {
                c.send_raw(&chunk).unwrap();
                chunk.clear();
            }
            if i == N / 3 {
                third_tx.send(()).unwrap();
            }
        }
        // Neither client notices: no DROPPED ? restart, just the PONG.
        c.ping("end", T).unwrap()
    });
    third_rx
        .recv_timeout(T * 6)
        .expect("the publisher did not get far");
    replace(&mut bus, 1);
    let before_pong = pubber.join().unwrap();
    assert!(before_pong.is_empty(), "the publisher saw {before_pong:?}");
    let status =
        wait_child(&mut sub, Duration::from_secs(120)).expect("fifobus sub did not finish");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut sub.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "fifobus sub: {status}: {err}");
    assert!(err.is_empty(), "fifobus sub noticed something: {err}");
    assert_eq!(reader.join().unwrap(), N);
    assert!(
        bus.log_text().contains("took over 2 clients"),
        "{}",
        bus.log_text()
    );
}

#[test]
fn a_hundred_replacements_under_load_keep_clients_and_subscriptions() {
    const ROUNDS: usize = 100;
    const CLIENTS: usize = 10;
    let mut bus = TempBus::start();
    let mut clients: Vec<_> = (0..CLIENTS)
        .map(|i| bus.connect_opts(with_pid(&format!("c{i}"), &[&format!("own.{i}"), "all.>"])))
        .collect();
    for c in &mut clients {
        barrier(c);
    }
    // Load: a publisher thread sending to all.x until told to stop; every
    // client reads it (checked in order below).
    let load = bus.connect_opts(with_pid("load", &[]));
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let loader = std::thread::spawn(move || {
        let mut c = load;
        let mut i = 0u64;
        while stop_rx.try_recv().is_err() {
            let mut chunk = Vec::new();
            for _ in 0..50 {
                chunk.extend_from_slice(format!("PUB all.x {i}\n").as_bytes());
                i += 1;
            }
            c.send_raw(&chunk).unwrap();
            let _ = c.ping("l", T).unwrap();
        }
        i
    });
    // Readers: each client's lines in order, in a thread.
    let mut readers = Vec::new();
    let mut sends = Vec::new();
    for c in clients {
        let (send, recv) = c.into_files().unwrap();
        sends.push(send);
        readers.push(std::thread::spawn(move || {
            let mut next = 0u64;
            let mut own = 0;
            for line in BufReader::new(recv).lines() {
                let line = line.unwrap();
                if let Some(i) = line.strip_prefix("MSG all.x ") {
                    let i: u64 = i.parse().unwrap();
                    assert_eq!(i, next, "lost or reordered");
                    next += 1;
                } else if line.starts_with("MSG own.") {
                    own += 1;
                } else if line == "PONG done" {
                    return (next, own);
                } else {
                    panic!("unexpected line {line:?}");
                }
            }
            panic!("EOF")
        }));
    }
    for n in 1..=ROUNDS {
        replace(&mut bus, n);
    }
    stop_tx.send(()).unwrap();
    let published = loader.join().unwrap();
    let log = bus.log_text();
    assert_eq!(
        log.matches(&format!("took over {} clients", CLIENTS + 1))
            .count(),
        ROUNDS,
        "the client count changed across replacements"
    );
    // Subscriptions intact: each client still gets its own topic.
    let mut p = bus.connect("p", &[]);
    for i in 0..CLIENTS {
        p.send_raw(format!("PUB own.{i} hi\n").as_bytes()).unwrap();
    }
    barrier(&mut p);
    for s in &mut sends {
        s.write_all(b"PING done\n").unwrap();
    }
    for r in readers {
        let (got, own) = r.join().unwrap();
        assert_eq!(got, published, "a client missed load messages");
        assert_eq!(own, 1, "a client lost its own subscription");
    }
    assert!(!log.contains("DROPPED ? restart"));
}

#[test]
fn replace_is_refused_when_a_client_does_not_read_and_the_old_broker_serves_on() {
    let mut bus = TempBus::start();
    let mut stuck = bus.connect_opts(with_pid("stuck", &["t"]));
    let mut p = bus.connect("p", &[]);
    // More than its recv holds: the rest waits in the broker.
    let big = "x".repeat(60_000);
    for _ in 0..8 {
        p.send_raw(format!("PUB t {big}\n").as_bytes()).unwrap();
    }
    barrier(&mut p);
    let out = Command::new(bin())
        .args(["serve", "--replace", "--metrics-addr", "off", "--dir"])
        .arg(&bus.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--replace succeeded: {err}");
    assert!(
        err.contains("refused the handover")
            && err.contains("stuck")
            && err.contains("keeps serving"),
        "{err}"
    );
    // The old broker serves on, nothing lost: the stuck client reads all.
    assert!(bus.child.as_mut().unwrap().try_wait().unwrap().is_none());
    let lines = barrier(&mut stuck);
    assert_eq!(lines.len(), 8, "{}", lines.len());
    p.send_raw(b"PUB t after\n").unwrap();
    barrier(&mut p);
    assert_eq!(barrier(&mut stuck), vec!["MSG t after"]);
}

#[test]
fn replace_without_a_running_broker_says_so() {
    let dir = temp_root();
    let out = Command::new(bin())
        .args(["serve", "--replace", "--metrics-addr", "off", "--dir"])
        .arg(dir.path().join("bus"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no broker to replace") && err.contains("start without --replace"),
        "{err}"
    );
    let _ = fs::remove_dir_all(dir.path());
}

/// What survives a restart survives a replacement: queue memberships,
/// lossless subscriptions and retained messages are handed over too (the
/// old broker writes them before READY), and an adopted subscription gets
/// no second copy of a retained message.
#[test]
fn replace_hands_over_queue_groups_lossless_subscriptions_and_retained_messages() {
    let mut bus = TempBus::start();
    let mut worker = bus.connect_opts(with_pid("worker", &[]));
    worker
        .send_raw(b"SUB jobs queue=w\nSUB cfg.> lossless\n")
        .unwrap();
    assert_eq!(barrier(&mut worker), Vec::<String>::new());
    let mut r = bus.connect("retainer", &[]);
    r.send_raw(b"RETAIN cfg.mode on duty\n").unwrap();
    assert_eq!(barrier(&mut r), Vec::<String>::new());
    assert_eq!(barrier(&mut worker), ["MSG cfg.mode on duty"]);
    let id = worker.id().to_owned();

    replace(&mut bus, 1);
    let state = fs::read_to_string(bus.dir.join("state").join(&id)).unwrap();
    for want in ["\nsub jobs queue=w\n", "\nsub cfg.> lossless\n"] {
        assert!(state.contains(want), "{want:?} not in {state}");
    }
    // A new subscriber gets the retained message first.
    let out = Command::new(bin())
        .args(["sub", "cfg.>", "-n", "1", "--timeout", "10"])
        .env("FIFOBUS_DIR", &bus.dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "on duty\n");
    // Still the group's member; no second copy of what it already had.
    r.send_raw(b"PUB jobs one\n").unwrap();
    assert_eq!(barrier(&mut r), Vec::<String>::new());
    assert_eq!(barrier(&mut worker), ["MSG jobs one"]);
}
