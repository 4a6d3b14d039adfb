//! `HELLO ... echo=no` (issue 12, item 2): the broker does not deliver a
//! client's own messages back to it, however its subscriptions overlap
//! them, and keeps that across a broker restart and `serve --replace`.
//! The bridge (crates/bridge) relies on it to publish what it imports
//! without reading it back as something to export.

mod common;

use std::time::Duration;

use common::*;
use fifobus::client::{Client, ConnectOptions, Handshake};
use nix::sys::signal::Signal;

fn no_echo(bus: &TempBus, name: &str, subs: &[&str]) -> Client {
    let opts = ConnectOptions {
        name: Some(name.into()),
        // Tied to this process, so a restarted broker adopts it.
        pid: Some(std::process::id() as i32),
        subs: subs.iter().map(|s| pattern(s)).collect(),
    };
    let guard = Handshake {
        no_echo: true,
        ..Handshake::default()
    };
    Client::connect_with(&bus.dir, &opts, T, &guard)
        .unwrap_or_else(|e| panic!("connect failed: {e}\nlog:\n{}", bus.log_text()))
}

/// Publishes `mine` from the echo=no client and one message from `other`,
/// then returns what each of the echo=no client and the watcher got.
fn round(
    me: &mut Client,
    other: &mut Client,
    watcher: &mut Client,
    tag: &str,
) -> (Vec<String>, Vec<String>) {
    for i in 0..3 {
        me.publish(&topic("t.a"), format!("{tag}-mine-{i}").as_bytes())
            .unwrap();
    }
    // Its own barrier first: every one of its PUBs has been routed.
    // (After a restart the broker's notice comes first: not an echo.)
    let own: Vec<String> = barrier(me)
        .into_iter()
        .filter(|l| l != "DROPPED ? restart")
        .collect();
    assert!(own.is_empty(), "echoed before its PONG: {own:?}");
    other
        .publish(&topic("t.a"), format!("{tag}-other").as_bytes())
        .unwrap();
    barrier(other);
    (barrier(me), barrier(watcher))
}

fn expect(tag: &str, me: &[String], watcher: &[String]) {
    // Others' messages reach it as before: once by its plain (and
    // lossless) subscriptions, once more as the only member of its queue
    // group; its own never.
    assert_eq!(
        me,
        [
            format!("MSG t.a {tag}-other"),
            format!("MSG t.a {tag}-other")
        ],
        "the echo=no client gets others' messages, its own never"
    );
    let want: Vec<String> = (0..3)
        .map(|i| format!("MSG t.a {tag}-mine-{i}"))
        .chain([format!("MSG t.a {tag}-other")])
        .collect();
    assert_eq!(watcher, want, "everyone else gets everything, in order");
}

#[test]
fn echo_no_withholds_own_messages_across_restart_and_replace() {
    let mut bus = TempBus::start();
    // Overlapping plain patterns, a lossless one and a queue group it
    // shares with nobody: none of them may bring its own messages back.
    let mut me = no_echo(&bus, "bridge", &["t.>", "t.*"]);
    me.send_raw(b"SUB t.a lossless\nSUB t.> queue=g\n").unwrap();
    let mut other = bus.connect("other", &[]);
    let mut watcher = bus.connect_opts(ConnectOptions {
        name: Some("watcher".into()),
        pid: Some(std::process::id() as i32),
        subs: vec![pattern("t.a")],
    });
    let (m, w) = round(&mut me, &mut other, &mut watcher, "first");
    expect("first", &m, &w);
    // Written coalesced, after the SUB: wait for the record to hold it.
    let state = bus.dir.join("state");
    let record = state.join(me.id());
    let text = || std::fs::read_to_string(&record).unwrap_or_default();
    assert!(
        wait_for(&state, T, || text().contains("\nsub t.> queue=g\n")
            && text().contains("\nsub t.a lossless\n")),
        "{}",
        text()
    );
    assert!(
        text().contains("\necho no\n"),
        "not kept durably: {}",
        text()
    );

    // kill -9, a new broker adopts it: still echo=no.
    bus.stop(Signal::SIGKILL);
    bus.spawn(&[]);
    me.wait_for_broker(T).unwrap();
    watcher.wait_for_broker(T).unwrap();
    let mut other = bus.connect("other2", &[]);
    let (m, w) = round(&mut me, &mut other, &mut watcher, "restart");
    assert_eq!(w.first().map(String::as_str), Some("DROPPED ? restart"));
    expect("restart", &m, &w[1..]);

    // serve --replace hands it over: still echo=no.
    let mut old = bus.child.take().expect("a broker runs");
    let new = bus.spawn_raw(&["--replace"]);
    let log = bus.log.clone();
    let took_over = wait_for(&log, T, || {
        bus.log_text()
            .contains(" from the previous broker, removed")
    });
    bus.child = Some(new);
    let old_status = wait_child(&mut old, T);
    if old_status.is_none() {
        let _ = old.kill();
        let _ = old.wait();
    }
    assert!(took_over, "no takeover:\n{}", bus.log_text());
    assert!(old_status.is_some_and(|s| s.success()));
    me.wait_for_broker(T).unwrap();
    watcher.wait_for_broker(T).unwrap();
    let mut other = bus.connect("other3", &[]);
    let (m, w) = round(&mut me, &mut other, &mut watcher, "replace");
    expect("replace", &m, &w);
}

#[test]
fn echo_is_yes_by_default_and_a_bad_value_is_refused() {
    let bus = TempBus::start();
    let mut plain = bus.connect("plain", &["t.a"]);
    plain.publish(&topic("t.a"), b"mine").unwrap();
    assert_eq!(barrier(&mut plain), ["MSG t.a mine"]);

    let reply_dir = temp_dir("echo-reply").unwrap();
    let reply = reply_dir.path().join("r");
    nix::unistd::mkfifo(&reply, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let line = format!("HELLO reply={} echo=maybe\n", reply.display());
    let script = format!(
        "exec 3<>'{r}'; printf '%s' \"$LINE\" > '{h}'; IFS= read -r -t 5 a <&3; printf '%s' \"$a\"",
        r = reply.display(),
        h = bus.dir.join("hello").display()
    );
    let (status, out, err) = sh(
        &script,
        &[("LINE", std::ffi::OsStr::new(&line))],
        Duration::from_secs(10),
    );
    assert!(status.success(), "{err}");
    assert!(
        out.starts_with("ERR bad-hello echo= must be 'yes' or 'no'"),
        "{out}"
    );
}
