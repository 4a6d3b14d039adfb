//! What bad input on `hello` may cost: a fragment without a newline is
//! dropped at once, and a flood of HELLOs whose reply FIFOs nobody opens
//! does not keep real clients out.

mod common;

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use fifobus::client::{Client, ConnectOptions};
use fifobus::rendezvous::MAX_PENDING_HANDSHAKES;
use fifobus::stats::Snapshot;
use nix::sys::stat::Mode;

fn scrape(bus: &TempBus) -> Snapshot {
    let url = fifobus::stats::metrics_url(&bus.dir).unwrap();
    fifobus::stats::scrape(&url, None).unwrap()
}

fn rejected(bus: &TempBus, reason: &str) -> u64 {
    scrape(bus)
        .handshakes_rejected
        .get(reason)
        .copied()
        .unwrap_or(0.0) as u64
}

/// Writes `bytes` to `hello` in one `write()`, then waits until the broker
/// has read everything in the pipe (`FIONREAD` is 0), so that whatever is
/// written next reaches it in a later read.
fn write_hello_and_wait_drained(bus: &TempBus, bytes: &[u8]) {
    let hello = bus.dir.join("hello");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&hello)
        .unwrap();
    assert_eq!(f.write(bytes).unwrap(), bytes.len(), "one whole write");
    assert!(
        wait_for(&hello, T, || fifobus::fifo::unread_bytes(f.as_raw_fd())
            .unwrap()
            == 0),
        "the broker did not read hello"
    );
}

fn fragment_log_lines(bus: &TempBus) -> usize {
    bus.log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("without a newline"))
        .count()
}

/// A HELLO written without its newline (`printf 'HELLO ...'`) is dropped
/// once `hello` is drained, counted and logged; the next client's HELLO is
/// not glued to it and gets WELCOME. Before the fix the fragment stayed in
/// the broker's buffer and this client's handshake timed out.
#[test]
fn a_hello_fragment_is_discarded_and_the_next_client_is_welcomed() {
    let bus = TempBus::start();
    write_hello_and_wait_drained(&bus, b"HELLO reply=/x name=a");
    let mut c = Client::connect(
        &bus.dir,
        &ConnectOptions {
            name: Some("next".to_owned()),
            pid: None,
            subs: Vec::new(),
        },
        T,
    )
    .unwrap_or_else(|e| panic!("the client after a fragment: {e}\n{}", bus.log_text()));
    barrier(&mut c);
    assert_eq!(rejected(&bus, "hello-fragment"), 1);
    assert_eq!(fragment_log_lines(&bus), 1, "{}", bus.log_text());
    assert_eq!(scrape(&bus).handshakes_accepted, 1.0);
}

/// Fragments are counted one by one but logged once, not once each (the
/// throttle allows one warning a second; fifty fragments written as fast as
/// the broker drains them take far less than the fifty seconds it would
/// take to log them all).
#[test]
fn many_fragments_are_counted_each_and_logged_once() {
    const N: u64 = 50;
    let bus = TempBus::start();
    for i in 0..N {
        write_hello_and_wait_drained(&bus, format!("HELLO reply=/x{i}").as_bytes());
        // The pipe being empty says the broker read the fragment, not that
        // its read turn is over: a fragment written now could still join
        // this one in the same read. Wait until it is counted.
        let counted = Instant::now() + T;
        while rejected(&bus, "hello-fragment") < i + 1 {
            assert!(Instant::now() < counted, "fragment {i} was not counted");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    assert_eq!(rejected(&bus, "hello-fragment"), N);
    let mut c = bus.connect("after", &[]);
    barrier(&mut c);
    let logged = fragment_log_lines(&bus);
    assert!(
        (1..N as usize).contains(&logged),
        "{logged} warnings for {N} fragments"
    );
}

/// A flood of HELLOs naming reply FIFOs nobody opens: more distinct FIFOs
/// than the table of pending handshakes holds, and bursts naming one FIFO.
/// With a handshake timeout of a minute, real clients connecting one after
/// another meanwhile all get WELCOME within the harness timeout, which
/// before the fix they could not (the table was full of one-minute waits
/// and the broker stopped reading `hello`). The counters show how: the
/// flood's waits were cut short long before the minute was up
/// (`reply-timeout`), and HELLOs naming a FIFO already waited on were
/// dropped (`reply-busy`).
#[test]
fn a_flood_of_unanswered_hellos_does_not_keep_real_clients_out() {
    const DISTINCT: usize = 1500;
    const SHARED_BURST: usize = 200;
    const REAL: usize = 10;
    raise_open_file_limit();
    let bus = TempBus::start_with(&["--handshake-timeout", "60s"]);
    let tmp = tempfile::tempdir().unwrap();
    let fifo = |name: String| {
        let p = tmp.path().join(name);
        nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o600)).unwrap();
        p
    };
    let shared = fifo("shared".to_owned());
    let distinct: Vec<PathBuf> = (0..DISTINCT).map(|i| fifo(format!("r{i}"))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let first_round = Arc::new(AtomicBool::new(false));
    let hello = bus.dir.join("hello");
    let flood = {
        let (stop, first_round) = (stop.clone(), first_round.clone());
        std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new().write(true).open(hello).unwrap();
            let mut rounds = 0;
            // At least two rounds, then on until the real clients are done.
            while rounds < 2 || !stop.load(Ordering::Relaxed) {
                for _ in 0..SHARED_BURST {
                    let line = hello_line(&shared, Some("flood"));
                    f.write_all(line.as_bytes()).unwrap();
                }
                for p in &distinct {
                    let line = hello_line(p, Some("flood"));
                    f.write_all(line.as_bytes()).unwrap();
                }
                rounds += 1;
                first_round.store(true, Ordering::Relaxed);
            }
            rounds
        })
    };
    // The flood is under way: a whole round is in the pipe or read.
    assert!(wait_for(&bus.log, T, || first_round.load(Ordering::Relaxed)));
    let mut welcomed = 0;
    for i in 0..REAL {
        let opts = ConnectOptions {
            name: Some(format!("real{i}")),
            pid: None,
            subs: Vec::new(),
        };
        match Client::connect(&bus.dir, &opts, T) {
            Ok(mut c) => {
                barrier(&mut c);
                welcomed += 1;
            }
            Err(e) => eprintln!("real client {i}: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = flood.join().unwrap();
    assert_eq!(
        welcomed, REAL,
        "every real client is welcomed during the flood"
    );
    // Every distinct FIFO was waited on at least once and at most
    // MAX_PENDING_HANDSHAKES waits can still be pending, so at least the
    // rest ended: by timing out, 59 s before the minute was up.
    let cut_short = (DISTINCT - MAX_PENDING_HANDSHAKES) as u64;
    assert!(
        wait_for(&bus.log, T, || rejected(&bus, "reply-timeout") >= cut_short),
        "only {} of at least {cut_short} flood handshakes were cut short",
        rejected(&bus, "reply-timeout")
    );
    let busy = rejected(&bus, "reply-busy");
    assert!(
        busy >= (SHARED_BURST as u64 - 1),
        "{busy} HELLOs refused as reply-busy ({rounds} rounds of {SHARED_BURST} naming one FIFO)"
    );
    assert_eq!(scrape(&bus).handshakes_accepted, REAL as f64);
}

/// A writer that never stops sending fragments without a newline keeps
/// `hello` from ever being read empty, so dropping fragments on an empty
/// pipe cannot help; each real HELLO is still recovered from behind the
/// fragments (from its own `HELLO ` keyword: `hello::take_line`).
#[test]
fn a_nonstop_fragment_writer_does_not_keep_real_clients_out() {
    let bus = TempBus::start();
    let hello = bus.dir.join("hello");
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = Arc::new(AtomicBool::new(false));
    let flood = {
        let (stop, flooding) = (stop.clone(), flooding.clone());
        std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new().write(true).open(hello).unwrap();
            let mut writes = 0u64;
            // Bounded: until the real clients are done, or 2 million writes.
            while !stop.load(Ordering::Relaxed) && writes < 2_000_000 {
                f.write_all(b"HELLO reply=/x name=frag").unwrap();
                writes += 1;
                flooding.store(true, Ordering::Relaxed);
            }
            writes
        })
    };
    while !flooding.load(Ordering::Relaxed) {
        std::thread::yield_now();
    }
    let mut welcomed = 0;
    for i in 0..10 {
        let opts = ConnectOptions {
            name: Some(format!("real{i}")),
            ..ConnectOptions::default()
        };
        let during = !stop.load(Ordering::Relaxed) && !flood.is_finished();
        let mut c = Client::connect(&bus.dir, &opts, T)
            .unwrap_or_else(|e| panic!("client {i}: {e}\nlog:\n{}", bus.log_text()));
        barrier(&mut c);
        if during {
            welcomed += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes = flood.join().unwrap();
    assert!(
        welcomed >= 1 && writes > 0,
        "at least one client connected while the flood ran ({welcomed}, {writes} writes)"
    );
    assert!(
        rejected(&bus, "hello-fragment") > 0,
        "fragments are counted"
    );
}
