//! Budgets: what all clients together may make the broker hold
//! (`--max-memory`), the defaults that absorb an ordinary burst, and the
//! per-client subscription limit (`--max-subscriptions`).

mod common;

use std::sync::mpsc;
use std::thread;

use common::*;
use fifobus::client::{Client, ConnectOptions};
use fifobus::protocol::Reply;

/// A field of `/proc/<pid>/status`, in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(pid: i32, field: &str) -> usize {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: usize = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kb * 1024
}

/// Walks one subscriber's lines for topic `t`: each `MSG t n` is the next
/// number and each `DROPPED k` skips exactly k. Returns (delivered, dropped).
fn account(lines: &[String], sent: usize) -> (usize, u64) {
    let (mut next, mut delivered, mut dropped) = (0u64, 0, 0);
    for line in lines {
        match Reply::parse(line.as_bytes()) {
            Reply::Msg {
                topic: "t",
                payload,
            } => {
                let n: u64 = std::str::from_utf8(&payload[..8]).unwrap().parse().unwrap();
                assert_eq!(n, next, "a loss not reported where it happened");
                next += 1;
                delivered += 1;
            }
            Reply::Dropped(k) => {
                next += k;
                dropped += k;
            }
            _ => panic!("unexpected line {line:?}"),
        }
    }
    assert_eq!(next, sent as u64, "every message delivered or counted");
    (delivered, dropped)
}

const BUDGET: usize = 8 << 20;
/// Messages of about 1 KiB: 60 MB per subscriber, 240 MB for the four that
/// never read, were nothing bounding them but the default per-client caps.
const FLOOD: usize = 60_000;
const PAYLOAD: usize = 1000;
/// The publisher lets the reading client catch up every CHUNK messages (a
/// few hundred KiB): without it a debug-build reader could fall so far
/// behind that its own backlog, not a stuck one, is the largest.
const CHUNK: usize = 250;
/// What the broker may grow by beyond the budget itself: the lines being
/// published (one chunk in the reader's buffer and the router channel,
/// 250 KiB), the 16 KiB encoding arena and up to 64 arena chunks pinned per
/// backlog (5 × 1 MiB), the writers' batches (counted in the budget but
/// not sheddable: up to 64 KiB each), and what the allocator keeps from
/// freed lines (glibc's per-thread arenas, a few MiB). Measured (debug
/// build, 4 runs): the broker grew by 16.0 to 16.2 MiB on this budget of
/// 8 MiB, so about 8 MiB beyond it; with `--max-memory 4GiB` instead it grew
/// by 246 MiB and this test fails.
const OVERHEAD: usize = 16 << 20;

#[test]
fn the_memory_budget_bounds_the_broker_and_a_reader_keeps_being_served() {
    let bus = TempBus::start_with(&["--max-memory", "8MiB"]);
    let mut stuck: Vec<Client> = (0..4)
        .map(|i| bus.connect(&format!("stuck{i}"), &["t"]))
        .collect();
    let mut reader = bus.connect("reader", &["t"]);
    let mut publisher = bus.connect("pub", &[]);
    barrier(&mut publisher);
    let baseline = status_bytes(bus.pid(), "VmRSS");

    // The reader reads everything, in order, and says how far it got.
    let (progress, reached) = mpsc::channel::<usize>();
    let reading = thread::spawn(move || {
        for i in 0..FLOOD {
            let line = reader.read_line(Some(T)).unwrap().expect("EOF");
            let want = format!("MSG t {i:08} ");
            assert!(
                line.starts_with(want.as_bytes()),
                "message {i}: got {:?}",
                String::from_utf8_lossy(&line[..line.len().min(40)])
            );
            if (i + 1) % CHUNK == 0 {
                progress.send(i + 1).unwrap();
            }
        }
        reader
    });
    let filler = "x".repeat(PAYLOAD - 9);
    for chunk in 0..FLOOD / CHUNK {
        let lines = pub_lines(
            (chunk * CHUNK..(chunk + 1) * CHUNK).map(|i| ("t", format!("{i:08} {filler}"))),
        );
        publisher.send_raw(&lines).unwrap();
        assert_eq!(reached.recv_timeout(T).unwrap(), (chunk + 1) * CHUNK);
    }
    let mut reader = reading.join().unwrap();
    assert!(barrier(&mut reader).is_empty(), "nothing after the flood");

    let peak = status_bytes(bus.pid(), "VmHWM");
    let grown = peak.saturating_sub(baseline);
    assert!(
        grown < BUDGET + OVERHEAD,
        "the broker grew by {} KiB under a budget of {} KiB (baseline {} KiB)",
        grown >> 10,
        BUDGET >> 10,
        baseline >> 10
    );

    // The stuck clients lost their oldest lines, each gap reported in place.
    for c in &mut stuck {
        let (delivered, dropped) = account(&barrier(c), FLOOD);
        assert!(dropped > 0, "a stuck client kept {delivered} of {FLOOD}");
        assert!(delivered * (PAYLOAD + 8) < BUDGET, "{delivered} kept");
    }
    assert!(
        bus.log_text().contains("--max-memory"),
        "the budget is stated at start"
    );
}

#[test]
fn max_subscriptions_refuses_the_next_sub_and_the_client_carries_on() {
    let bus = TempBus::start_with(&["--max-subscriptions", "3"]);
    let mut c = bus.connect("many", &["a"]);
    for p in ["b", "c", "a", "d"] {
        c.send_raw(format!("SUB {p}\n").as_bytes()).unwrap();
    }
    let got = barrier(&mut c);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("ERR too-many-subscriptions "), "{got:?}");
    c.send_raw(b"PUB c still-here\nPUB d not-subscribed\n")
        .unwrap();
    assert_eq!(barrier(&mut c), ["MSG c still-here"]);
    // Room again after an UNSUB.
    c.send_raw(b"UNSUB a\nSUB d\nPUB d now\n").unwrap();
    assert_eq!(barrier(&mut c), ["MSG d now"]);
}

/// Subscriptions count in `--max-memory` and may take half of it: with a
/// 1 MiB budget, about 1,300 short patterns fit in all. Past that, SUB is
/// refused (the client carries on), for every client, and room comes back
/// when a client leaves.
#[test]
fn subscriptions_are_bounded_by_half_the_memory_budget() {
    let bus = TempBus::start_with(&["--max-memory", "1MiB"]);
    let mut a = bus.connect("a", &[]);
    let mut subs = String::new();
    for i in 0..2000 {
        subs.push_str(&format!("SUB s.{i}\n"));
    }
    a.send_raw(subs.as_bytes()).unwrap();
    let got = barrier(&mut a);
    assert!(
        got.iter().all(|l| l.starts_with(
            "ERR too-many-subscriptions the broker's subscriptions use half its memory budget"
        )),
        "{:?}",
        &got[..got.len().min(3)]
    );
    let accepted = 2000 - got.len();
    // 512 KiB at 400 bytes plus the pattern (3 to 6 bytes) each.
    assert!((1280..=1310).contains(&accepted), "{accepted} accepted");
    a.send_raw(b"PUB s.0 first\n").unwrap();
    assert_eq!(barrier(&mut a), ["MSG s.0 first"]);
    // The budget is the broker's: another client is refused too.
    let mut b = bus.connect("b", &[]);
    b.send_raw(b"SUB other\n").unwrap();
    let got = barrier(&mut b);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("ERR too-many-subscriptions "), "{got:?}");
    // Once a leaves, its room is back.
    a.bye(T).unwrap();
    b.send_raw(b"SUB other\nPUB other back\n").unwrap();
    assert_eq!(barrier(&mut b), ["MSG other back"]);
}

/// Ten publishers send 200,000 64-byte messages at once to one subscriber
/// reading as fast as it can. The old default of 100,000 lines per backlog
/// dropped about 2,000 of them; with bytes as the binding cap (64 MiB; the
/// burst is about 16 MB) the default settings lose nothing.
#[test]
fn default_caps_absorb_a_ten_to_one_burst() {
    const PUBLISHERS: usize = 10;
    const EACH: usize = 20_000;
    let bus = TempBus::start();
    let mut sub = bus.connect("sink", &["burst"]);
    let start = std::sync::Arc::new(std::sync::Barrier::new(PUBLISHERS));
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let dir = bus.dir.clone();
            let start = start.clone();
            thread::spawn(move || {
                let mut c = Client::connect(&dir, &ConnectOptions::default(), T).unwrap();
                let lines = pub_lines(
                    (0..EACH).map(|i| ("burst", format!("{p:02} {i:06} {}", "x".repeat(54)))),
                );
                start.wait();
                c.send_raw(&lines).unwrap();
                c.ping("done", T).unwrap();
            })
        })
        .collect();
    let mut next = [0usize; PUBLISHERS];
    for _ in 0..PUBLISHERS * EACH {
        let line = sub.read_line(Some(T)).unwrap().expect("EOF");
        let line = String::from_utf8(line).unwrap();
        let rest = line
            .strip_prefix("MSG burst ")
            .unwrap_or_else(|| panic!("not a message: {line:?}"));
        let p: usize = rest[..2].parse().unwrap();
        let i: usize = rest[3..9].parse().unwrap();
        assert_eq!(i, next[p], "publisher {p}'s messages in order, none lost");
        next[p] += 1;
    }
    for p in publishers {
        p.join().unwrap();
    }
    assert!(barrier(&mut sub).is_empty(), "no DROPPED, nothing else");
}
