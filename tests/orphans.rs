//! Vanished clients cannot lock others out (issue 9, item 1): what ties a
//! client to a process, and how the broker ends pid-less clients that went
//! quiet: the longest idle one when the table is full, any of them after
//! `--orphan-timeout` (that rule runs on the paused clock in tests/timing.rs).

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::*;
use fifobus::client::{Client, ClientError, ConnectOptions};
use fifobus::protocol::Reply;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

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
