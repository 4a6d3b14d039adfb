//! Slow and absent readers: bounded backlogs, the overflow policies, and
//! `DROPPED` at the place of the gap. Loss is never silent, and one slow
//! client never holds up the others.

mod common;

use common::*;
use fifobus::protocol::Reply;

/// Publishes `n` numbered messages on `t` and waits until the broker has
/// queued them all (the publisher's PONG comes after every push).
fn publish(bus: &TempBus, n: usize) {
    let mut p = bus.connect("pub", &[]);
    p.send_raw(&pub_lines((0..n).map(|i| ("t", i.to_string()))))
        .unwrap();
    barrier(&mut p);
}

/// Reads everything up to the barrier and returns it.
fn drain(c: &mut fifobus::client::Client) -> Vec<String> {
    barrier(c)
}

/// Checks the stream accounts for every message exactly where it was lost:
/// walking the lines, each `MSG t k` is the next expected number and each
/// `DROPPED n` skips exactly n. Returns (delivered, dropped, gaps).
fn account(lines: &[String]) -> (usize, u64, usize) {
    let (mut expected, mut delivered, mut dropped, mut gaps) = (0u64, 0, 0, 0);
    for line in lines {
        match Reply::parse(line.as_bytes()) {
            Reply::Msg {
                topic: "t",
                payload,
            } => {
                assert_eq!(
                    std::str::from_utf8(payload)
                        .unwrap()
                        .parse::<u64>()
                        .unwrap(),
                    expected,
                    "a loss not reported where it happened"
                );
                expected += 1;
                delivered += 1;
            }
            Reply::Dropped(n) => {
                assert!(n > 0);
                expected += n;
                dropped += n;
                gaps += 1;
            }
            _ => panic!("unexpected line {line:?}"),
        }
    }
    assert_eq!(
        expected, SENT as u64,
        "every message is delivered or counted"
    );
    (delivered, dropped, gaps)
}

/// Messages that fit in the recv pipe never reach the outbox, so the tests
/// publish far more than a pipe holds (64 KiB, or 4 KiB once the user's
/// pipe budget is spent) and use a small outbox.
const SENT: usize = 20_000;
const CAP: &str = "100";

#[test]
fn drop_oldest_keeps_the_newest_and_reports_each_gap_in_place() {
    let bus = TempBus::start_with(&["--backlog-messages", CAP, "--overflow", "drop-oldest"]);
    let mut slow = bus.connect("slow", &["t"]);
    publish(&bus, SENT);
    let lines = drain(&mut slow);
    let (_, dropped, gaps) = account(&lines);
    assert!(dropped > 0 && gaps >= 1);
    // The newest survive: the stream ends with the last message published.
    assert_eq!(lines.last().unwrap(), &format!("MSG t {}", SENT - 1));
}

#[test]
fn drop_newest_keeps_the_oldest_and_reports_each_gap_in_place() {
    let bus = TempBus::start_with(&["--backlog-messages", CAP, "--overflow", "drop-newest"]);
    let mut slow = bus.connect("slow", &["t"]);
    publish(&bus, SENT);
    let lines = drain(&mut slow);
    let (_, dropped, gaps) = account(&lines);
    assert!(dropped > 0 && gaps >= 1);
    // The newest are the ones lost: the stream ends with the last gap.
    assert!(
        lines.last().unwrap().starts_with("DROPPED "),
        "{:?}",
        lines.last()
    );
}

#[test]
fn byte_cap_applies_too() {
    let bus = TempBus::start_with(&["--backlog-bytes", "2KiB"]);
    let mut slow = bus.connect("slow", &["t"]);
    publish(&bus, SENT);
    let (_, dropped, _) = account(&drain(&mut slow));
    assert!(dropped > 0);
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
            let batch = pub_lines((0..1000).map(|i| ("t", (chunk * 1000 + i).to_string())));
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
