//! Slow and absent readers: bounded backlogs, the overflow policies, and
//! `DROPPED` at the place of the gap. Loss is never silent, and one slow
//! client never holds up the others.

mod common;

use common::*;

/// Publishes `n` numbered messages on `t` and waits until the broker has
/// queued them all (the publisher's PONG comes after every push).
fn publish(bus: &TempBus, n: usize) {
    let mut p = bus.connect("pub", &[]);
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(format!("PUB t {i}\n").as_bytes());
    }
    p.send_raw(&batch).unwrap();
    barrier(&mut p);
}

/// Reads everything up to the barrier and returns it.
fn drain(c: &mut fifobus::client::Client) -> Vec<String> {
    barrier(c)
}

fn numbers(lines: &[String]) -> Vec<usize> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("MSG t ").map(|n| n.parse().unwrap()))
        .collect()
}

fn dropped(lines: &[String]) -> Vec<(usize, u64)> {
    lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.strip_prefix("DROPPED ").map(|n| (i, n.parse().unwrap())))
        .collect()
}

/// Messages that fit in the recv pipe never reach the outbox, so the tests
/// publish far more than a pipe holds (64 KiB, or 4 KiB once the user's
/// pipe budget is spent) and use a small outbox.
const SENT: usize = 20_000;
const CAP: &str = "100";

#[test]
fn drop_oldest_keeps_the_newest_and_reports_the_gap_before_them() {
    let bus = TempBus::start_with(&["--backlog-messages", CAP, "--overflow", "drop-oldest"]);
    let mut slow = bus.connect("slow", &["t"]);
    publish(&bus, SENT);
    let lines = drain(&mut slow);
    let got = numbers(&lines);
    let gaps = dropped(&lines);
    assert_eq!(gaps.len(), 1, "one gap, reported once: {gaps:?}");
    let (at, n) = gaps[0];
    assert_eq!(got.len() as u64 + n, SENT as u64, "every message is delivered or counted");
    // Before the gap (what had reached the pipe): the oldest, from 0. After
    // it: the newest, contiguous up to the last. DROPPED sits exactly there.
    let (before, after) = got.split_at(at);
    assert_eq!(before, (0..at).collect::<Vec<_>>());
    let first_after = at + n as usize;
    assert_eq!(after, (first_after..SENT).collect::<Vec<_>>());
    assert!(after.len() <= 100, "what follows the gap fits the backlog");
}

#[test]
fn drop_newest_keeps_the_oldest_and_reports_the_gap_after_them() {
    let bus = TempBus::start_with(&["--backlog-messages", CAP, "--overflow", "drop-newest"]);
    let mut slow = bus.connect("slow", &["t"]);
    publish(&bus, SENT);
    let lines = drain(&mut slow);
    let got = numbers(&lines);
    let gaps = dropped(&lines);
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let (at, n) = gaps[0];
    assert_eq!(got.len() as u64 + n, SENT as u64);
    assert_eq!(got, (0..got.len()).collect::<Vec<_>>(), "a prefix, in order");
    assert_eq!(at, lines.len() - 1, "the gap is at the end (only PONG follows)");
}

#[test]
fn byte_cap_applies_too() {
    let bus = TempBus::start_with(&["--backlog-bytes", "2KiB"]);
    let mut slow = bus.connect("slow", &["t"]);
    publish(&bus, SENT);
    let lines = drain(&mut slow);
    let n: u64 = dropped(&lines).iter().map(|d| d.1).sum();
    assert!(n > 0);
    assert_eq!(numbers(&lines).len() as u64 + n, SENT as u64);
}

#[test]
fn disconnect_policy_ends_only_the_slow_client() {
    let bus = TempBus::start_with(&["--backlog-messages", CAP, "--overflow", "disconnect"]);
    let mut slow = bus.connect("slow", &["t"]);
    let dir = slow.dir().to_owned();
    let mut fast = bus.connect("fast", &[]);
    publish(&bus, SENT);
    // The slow client reads what reached its pipe, then EOF: it was ended.
    let mut n = 0;
    while let Some(line) = slow.read_line(Some(T)).unwrap() {
        assert!(line.starts_with(b"MSG t "));
        n += 1;
    }
    assert!(n < SENT);
    assert!(wait_gone(&dir, T));
    assert!(bus.wait_log("backlog overflowed"));
    barrier(&mut fast);
}

#[test]
fn a_slow_client_does_not_hold_up_a_fast_one() {
    // Default caps: the stuck client's pipe fills and its writer waits,
    // while the publisher and the fast reader carry on.
    let bus = TempBus::start();
    let _never_reads = bus.connect("stuck", &["t"]);
    let mut fast = bus.connect("fast", &["t"]);
    let dir = bus.dir.clone();
    let publisher = std::thread::spawn(move || {
        let opts = fifobus::client::ConnectOptions::default();
        let mut p = fifobus::client::Client::connect(&dir, &opts, T).unwrap();
        for chunk in 0..20 {
            let mut batch = Vec::new();
            for i in 0..1000 {
                batch.extend_from_slice(format!("PUB t {}\n", chunk * 1000 + i).as_bytes());
            }
            p.send_raw(&batch).unwrap();
        }
        p.ping("done", T).unwrap();
    });
    // The fast reader gets every message, in order, with no DROPPED, while
    // the stuck client's backlog overflows.
    for i in 0..20_000 {
        let line = fast.read_line(Some(T)).unwrap().unwrap();
        assert_eq!(line, format!("MSG t {i}").as_bytes());
    }
    publisher.join().unwrap();
    assert!(barrier(&mut fast).is_empty());
}
