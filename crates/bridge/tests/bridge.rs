//! The NATS bridge (issue 12) against a real nats-server, real brokers and
//! the real `fifobus-bridge`: two buses on this machine joined through one
//! nats-server on a free loopback port.
//!
//! Every test needs Debian's nats-server (`apt-get install nats-server`;
//! .ci/run installs it) and fails, saying so, without it. They are ignored
//! in a plain `cargo test`; CI runs them (`--include-ignored`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fifobus::client::Client;
use fifobus_testkit::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BRIDGE: &str = env!("CARGO_BIN_EXE_fifobus-bridge");

/// A nats-server on a loopback port, killed by pid and reaped on drop.
struct Nats {
    port: u16,
    child: Option<Child>,
}

impl Nats {
    fn start() -> Nats {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut n = Nats { port, child: None };
        n.spawn();
        n
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server on its port; returns once it says it is ready.
    fn spawn(&mut self) {
        let program = sibling_or_on_path("nats-server").unwrap_or_else(|| {
            panic!("nats-server is not on PATH; these tests need it: apt-get install nats-server")
        });
        let mut child = Command::new(program)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nats-server");
        let err = child.stderr.take().unwrap();
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(err).lines();
            let mut seen = Vec::new();
            for line in lines.by_ref().map_while(Result::ok) {
                let ready = line.contains("Server is ready");
                seen.push(line);
                if ready {
                    let _ = tx.send(Ok(()));
                    // Keep draining, so the server never blocks on stderr.
                    for _ in lines.by_ref() {}
                    return;
                }
            }
            let _ = tx.send(Err(seen.join("\n")));
        });
        match rx.recv_timeout(T) {
            Ok(Ok(())) => {}
            Ok(Err(log)) => panic!("nats-server exited at start:\n{log}"),
            Err(_) => panic!("nats-server not ready within {T:?}"),
        }
    }

    /// SIGTERM by pid, reaped.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            if wait_child(&mut c, T).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `fifobus-bridge`, its stderr in a log file; killed and
/// reaped on drop.
struct Bridge {
    child: Child,
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Bridge {
    fn start(dir: &Path, nats: &str, args: &[&str]) -> Bridge {
        let tmp = temp_dir("fifobus-bridge-test-").unwrap();
        let log = tmp.path().join("bridge.log");
        let child = Command::new(BRIDGE)
            .arg("--dir")
            .arg(dir)
            .args(["--nats", nats, "--metrics", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start fifobus-bridge");
        Bridge {
            child,
            log,
            _tmp: tmp,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has `n` lines containing `needle`.
    fn wait_log_n(&self, needle: &str, n: usize) {
        assert!(
            wait_for(&self.log, T, || self.log_text().matches(needle).count()
                >= n),
            "the bridge did not log {needle:?} ({n}x) within {T:?}:\n{}",
            self.log_text()
        );
    }

    fn wait_log(&self, needle: &str) {
        self.wait_log_n(needle, 1);
    }

    /// Waits until both sides are connected.
    fn wait_ready(&self) {
        self.wait_log("nats: connected");
        self.wait_log("bus: connected");
    }

    fn metrics(&self) -> String {
        let out = self.get("/metrics");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    /// The whole answer (head and body) to `GET path` on the metrics
    /// address; read to its end, so the server must close the connection.
    fn get(&self, path: &str) -> String {
        self.wait_log("metrics on http://");
        let text = self.log_text();
        let addr = text
            .split("metrics on http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap()
            .to_owned();
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// A sample's value: `name{labels}` exactly as exposed.
    fn metric(&self, series: &str) -> u64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    fn dropped(&self, direction: &str) -> u64 {
        ["buffer", "unconfirmed", "broker"]
            .iter()
            .map(|r| {
                self.metric(&format!(
                    "fifobus_bridge_dropped_total{{direction=\"{direction}\",reason=\"{r}\"}}"
                ))
            })
            .sum()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes `topic` on `from` until `to` (subscribed to it) sees it:
/// the path through both bridges and NATS is up. Probes still in flight
/// arrive later: the caller drains them with a marker.
fn probe(from: &mut Client, to: &mut Client, topic_name: &str) {
    let t = topic(topic_name);
    let deadline = Instant::now() + T;
    loop {
        from.publish(&t, b"probe").unwrap();
        match to.read_line(Some(Duration::from_millis(200))) {
            Ok(Some(l)) => {
                assert_eq!(
                    String::from_utf8_lossy(&l),
                    format!("MSG {topic_name} probe")
                );
                break;
            }
            _ if Instant::now() < deadline => {}
            _ => panic!("nothing went through the bridges on {topic_name} within {T:?}"),
        }
    }
}

/// Reads lines until `want`, returning those before it (bounded).
fn until(c: &mut Client, want: &str) -> Vec<String> {
    let mut before = Vec::new();
    loop {
        let line = c
            .read_line(Some(T))
            .unwrap_or_else(|e| {
                panic!("no {want:?} within {T:?} ({e}); got {} lines", before.len())
            })
            .expect("EOF");
        let line = String::from_utf8_lossy(&line).into_owned();
        if line == want {
            return before;
        }
        before.push(line);
    }
}

fn numbers(lines: &[String], prefix: &str) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|n| n.parse().unwrap())
        .collect()
}

#[test]
#[ignore = "needs nats-server: apt-get install nats-server"]
fn a_to_b_5000_arrive_once_in_order_while_b_to_a_flows_and_nothing_echoes() {
    let nats = Nats::start();
    let a = TempBus::start();
    let b = TempBus::start();
    // Patterns that overlap every way: each bridge exports what it imports
    // and imports what it exports. Only the three rules (echo=no on the bus,
    // no_echo on NATS, the origin header) keep messages from looping.
    let both = ["--export", "a.>", "--export", "b.>", "--import", ">"];
    let ba = Bridge::start(
        &a.dir,
        &nats.url(),
        &[&both[..], &["--bus-id", "A"]].concat(),
    );
    let bb = Bridge::start(
        &b.dir,
        &nats.url(),
        &[&both[..], &["--bus-id", "B"]].concat(),
    );
    ba.wait_ready();
    bb.wait_ready();
    // Subscribers on the data and the probe topics.
    let mut sub_a = a.connect("sub-a", &["a.n", "b.n", "b.p", "b.fence"]);
    let mut sub_b = b.connect("sub-b", &["a.n", "a.p", "a.end"]);
    let mut pub_a = a.connect("pub-a", &[]);
    let mut pub_b = b.connect("pub-b", &[]);
    probe(&mut pub_a, &mut sub_b, "a.p");
    probe(&mut pub_b, &mut sub_a, "b.p");
    // Drain late probes on both sides with a marker each way.
    pub_a.publish(&topic("a.end"), b"probes").unwrap();
    until(&mut sub_b, "MSG a.end probes");
    pub_b.publish(&topic("b.fence"), b"probes").unwrap();
    until(&mut sub_a, "MSG b.fence probes");

    const N: u64 = 5000;
    const BACK: u64 = 1000;
    let b_thread = std::thread::spawn(move || {
        for i in 0..BACK {
            pub_b
                .publish(&topic("b.n"), i.to_string().as_bytes())
                .unwrap();
        }
        pub_b
    });
    for i in 0..N {
        pub_a
            .publish(&topic("a.n"), i.to_string().as_bytes())
            .unwrap();
    }
    pub_a.publish(&topic("a.end"), b"stream").unwrap();
    let got_b = until(&mut sub_b, "MSG a.end stream");
    let mut pub_b = b_thread.join().unwrap();
    assert_eq!(
        numbers(&got_b, "MSG a.n "),
        (0..N).collect::<Vec<_>>(),
        "A -> B: each once, in order"
    );
    let other: Vec<&String> = got_b
        .iter()
        .filter(|l| !l.starts_with("MSG a.n "))
        .collect();
    assert!(
        other.is_empty(),
        "nothing else: {other:?}\nA:\n{}\nB:\n{}",
        ba.metrics(),
        bb.metrics()
    );
    // A's exports would come back, if at all, before B's fence: NATS
    // delivered them to bridge A before B saw a.end.
    pub_b.publish(&topic("b.fence"), b"stream").unwrap();
    let got_a = until(&mut sub_a, "MSG b.fence stream");
    assert_eq!(
        numbers(&got_a, "MSG a.n "),
        (0..N).collect::<Vec<_>>(),
        "A's subscriber gets A's messages once (locally), none echoed back"
    );
    assert_eq!(
        numbers(&got_a, "MSG b.n "),
        (0..BACK).collect::<Vec<_>>(),
        "B -> A flowed meanwhile, once, in order"
    );
    assert_eq!(got_a.len() as u64, N + BACK);
    assert_eq!(ba.dropped("export") + bb.dropped("import"), 0);
    assert!(ba.metric("fifobus_bridge_messages_total{direction=\"export\"}") >= N);
    assert!(bb.metric("fifobus_bridge_messages_total{direction=\"import\"}") >= N);
    assert!(bb.metric("fifobus_bridge_messages_total{direction=\"export\"}") >= BACK);
    // NATS never sent a bridge its own exports (no_echo), so the origin
    // header had nothing to catch.
    for bridge in [&ba, &bb] {
        assert_eq!(
            bridge.metric("fifobus_bridge_looped_total"),
            0,
            "no_echo on NATS"
        );
    }
}

#[test]
#[ignore = "needs nats-server: apt-get install nats-server"]
fn two_bridges_of_one_bus_do_not_import_each_others_exports() {
    let nats = Nats::start();
    let a = TempBus::start();
    // One exports x.>, the other imports x.>: without the origin header the
    // second would publish the first's exports on A again.
    let out = Bridge::start(&a.dir, &nats.url(), &["--export", "x.>", "--name", "out"]);
    let inn = Bridge::start(&a.dir, &nats.url(), &["--import", "x.>", "--name", "in"]);
    out.wait_ready();
    inn.wait_ready();
    // A third bus sees the exports, so the path is known to be up.
    let c = TempBus::start();
    let bc = Bridge::start(&c.dir, &nats.url(), &["--import", "x.>", "--bus-id", "C"]);
    bc.wait_ready();
    let mut sub_c = c.connect("sub-c", &["x.>"]);
    let mut sub_a = a.connect("sub-a", &["x.>"]);
    let mut pub_a = a.connect("pub-a", &[]);
    probe(&mut pub_a, &mut sub_c, "x.p");
    pub_a.publish(&topic("x.end"), b"1").unwrap();
    until(&mut sub_c, "MSG x.end 1");
    // Everything A's own subscriber got up to now: probes, each once.
    let seen = until(&mut sub_a, "MSG x.end 1");
    assert!(seen.iter().all(|l| l == "MSG x.p probe"), "{seen:?}");
    let looped_before = inn.metric("fifobus_bridge_looped_total");
    for i in 0..100 {
        pub_a
            .publish(&topic("x.n"), i.to_string().as_bytes())
            .unwrap();
    }
    pub_a.publish(&topic("x.end"), b"2").unwrap();
    until(&mut sub_c, "MSG x.end 2");
    // The importing bridge received all of them from NATS and published
    // none: the looped counter says it saw them (so the fence below is
    // past them).
    assert!(
        wait_for(&inn.log, T, || inn.metric("fifobus_bridge_looped_total")
            >= looped_before + 101),
        "{}",
        inn.metrics()
    );
    let got = until(&mut sub_a, "MSG x.end 2");
    assert_eq!(
        numbers(&got, "MSG x.n "),
        (0..100).collect::<Vec<_>>(),
        "each once"
    );
    assert_eq!(
        inn.metric("fifobus_bridge_messages_total{direction=\"import\"}"),
        0
    );
}

#[test]
#[ignore = "needs nats-server: apt-get install nats-server"]
fn killing_and_restarting_nats_mid_stream_loses_at_most_what_is_reported() {
    let mut nats = Nats::start();
    let a = TempBus::start();
    let b = TempBus::start();
    let ba = Bridge::start(&a.dir, &nats.url(), &["--export", "k.>", "--bus-id", "A"]);
    let bb = Bridge::start(&b.dir, &nats.url(), &["--import", "k.>", "--bus-id", "B"]);
    ba.wait_ready();
    bb.wait_ready();
    let mut sub_b = b.connect("sub-b", &["k.n", "k.p", "k.end"]);
    let mut pub_a = a.connect("pub-a", &[]);
    probe(&mut pub_a, &mut sub_b, "k.p");
    pub_a.publish(&topic("k.end"), b"probes").unwrap();
    until(&mut sub_b, "MSG k.end probes");

    const N: u64 = 5000;
    let mut got = Vec::new();
    let read_n = |sub: &mut Client, got: &mut Vec<u64>, n: usize| {
        while got.len() < n {
            let l = sub.read_line(Some(T)).unwrap().expect("EOF");
            let l = String::from_utf8_lossy(&l).into_owned();
            got.push(l.strip_prefix("MSG k.n ").unwrap().parse().unwrap());
        }
    };
    for i in 0..N / 2 {
        pub_a
            .publish(&topic("k.n"), i.to_string().as_bytes())
            .unwrap();
    }
    // Mid-stream: part of it has arrived.
    read_n(&mut sub_b, &mut got, 500);
    nats.stop();
    ba.wait_log("nats: disconnected");
    for i in N / 2..N {
        pub_a
            .publish(&topic("k.n"), i.to_string().as_bytes())
            .unwrap();
    }
    nats.spawn();
    ba.wait_log("nats: reconnected");
    bb.wait_log("nats: reconnected");
    // The end marker, until it arrives (the first ones may be dropped
    // while the bridges settle, and are counted so).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut k = 0;
    'outer: loop {
        pub_a
            .publish(&topic("k.end"), format!("{k}").as_bytes())
            .unwrap();
        k += 1;
        // A bounded wait per marker: the line read is the event.
        while let Ok(Some(l)) = sub_b.read_line(Some(Duration::from_millis(300))) {
            let l = String::from_utf8_lossy(&l).into_owned();
            if l.starts_with("MSG k.end ") {
                break 'outer;
            }
            got.push(l.strip_prefix("MSG k.n ").unwrap().parse().unwrap());
        }
        assert!(Instant::now() < deadline, "no end marker after the restart");
    }
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "order and no duplicates"
    );
    let lost = N - got.len() as u64;
    let reported = ba.dropped("export") + bb.dropped("import");
    eprintln!(
        "nats restart: {} of {N} arrived, {lost} lost, {reported} reported dropped",
        got.len()
    );
    assert!(
        lost <= reported,
        "lost {lost} of {N}, the bridges reported {reported} dropped\nA:\n{}\nB:\n{}",
        ba.log_text(),
        bb.log_text()
    );
    assert_eq!(
        ba.metric("fifobus_bridge_reconnects_total{side=\"nats\"}"),
        1
    );
    // The log says so too (a line a second at most, so it may follow).
    if reported > 0 {
        assert!(
            wait_for(&ba.log, T, || ba.log_text().contains("DROPPED ")
                || bb.log_text().contains("DROPPED ")),
            "no DROPPED line:\n{}\n{}",
            ba.log_text(),
            bb.log_text()
        );
    }
}

#[test]
#[ignore = "needs nats-server: apt-get install nats-server"]
fn a_bridge_started_before_its_broker_waits_then_works_and_follows_a_restart() {
    let nats = Nats::start();
    let mut a = TempBus::new(BusOptions::default()).unwrap();
    let b = TempBus::start();
    let ba = Bridge::start(&a.dir, &nats.url(), &["--export", "l.>", "--bus-id", "A"]);
    ba.wait_log("bus: waiting for a broker on");
    let bb = Bridge::start(&b.dir, &nats.url(), &["--import", "l.>", "--bus-id", "B"]);
    bb.wait_ready();
    a.spawn(&[]);
    ba.wait_ready();
    let mut sub_b = b.connect("sub-b", &["l.>"]);
    let mut pub_a = a.connect("pub-a", &[]);
    probe(&mut pub_a, &mut sub_b, "l.p");
    assert_eq!(
        ba.metric("fifobus_bridge_reconnects_total{side=\"bus\"}"),
        0
    );

    // kill -9 the broker: the bridge waits, and resumes with the new one.
    drop(pub_a);
    a.stop(Signal::SIGKILL);
    ba.wait_log("went away");
    a.spawn(&[]);
    ba.wait_log("is back");
    let mut pub_a = a.connect("pub-a2", &[]);
    pub_a.publish(&topic("l.end"), b"probes").unwrap();
    until(&mut sub_b, "MSG l.end probes");
    assert_eq!(
        ba.metric("fifobus_bridge_reconnects_total{side=\"bus\"}"),
        1
    );
}

/// With NATS unreachable, exports wait in the bridge's buffer up to
/// `--buffer` and the rest is dropped and counted: what the bridge holds
/// stays bounded however much the bus publishes. (Beyond the buffer it may
/// hold one batch taken by its NATS task and async-nats' own queue: 1,024 +
/// 256 messages, docs/scale-out.md; the assertion allows for them.)
#[test]
#[ignore = "needs nats-server: apt-get install nats-server"]
fn exports_beyond_the_buffer_are_dropped_and_counted_while_nats_is_unreachable() {
    // A loopback port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let a = TempBus::start();
    let ba = Bridge::start(
        &a.dir,
        &format!("nats://127.0.0.1:{port}"),
        &["--export", "f.>", "--buffer", "10", "--bus-id", "A"],
    );
    ba.wait_log("bus: connected");
    const N: u64 = 3_000;
    let mut pub_a = a.connect("pub-a", &[]);
    let payload = [b'x'; 64];
    for _ in 0..N {
        pub_a.publish(&topic("f.x"), &payload).unwrap();
    }
    // The broker has read every PUB once its PONG comes back.
    pub_a.ping("sent", T).unwrap();
    let least = N - 10 - 1_024 - 256;
    let dropped = |b: &Bridge| {
        b.metric("fifobus_bridge_dropped_total{direction=\"export\",reason=\"buffer\"}")
    };
    // Each second with drops logs a DROPPED line: re-checked on each.
    assert!(
        wait_for(&ba.log, T, || dropped(&ba) >= least),
        "dropped {} of {N}, expected at least {least}:\n{}",
        dropped(&ba),
        ba.log_text()
    );
    let buffered = ba.metric("fifobus_bridge_buffered_messages{direction=\"export\"}");
    assert!(buffered <= 10, "{buffered} buffered, --buffer 10");
    assert!(dropped(&ba) <= N);
    assert_eq!(
        ba.metric("fifobus_bridge_messages_total{direction=\"export\"}"),
        0
    );
    ba.wait_log("DROPPED ");
    assert!(
        ba.log_text().contains(" export (total "),
        "{}",
        ba.log_text()
    );
}

/// Clock ticks (utime + stime) `pid` has used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime, fields 14 and 15 of stat(5), counted after the ')'.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// An export-only bridge has no import task, so nobody holds its wake
/// pipe's write end: polling it anyway reported POLLHUP at once, every
/// time, and the bus thread spun (91 of 100 ticks a second). Idle, it uses
/// next to nothing. (A one-sided window: a spin shows ~100 ticks a second.)
#[test]
#[ignore = "needs nats-server: apt-get install nats-server"]
fn an_idle_export_only_bridge_uses_no_cpu() {
    let nats = Nats::start();
    let a = TempBus::start();
    let b = Bridge::start(&a.dir, &nats.url(), &["--export", "e.>", "--bus-id", "A"]);
    b.wait_ready();
    let t0 = cpu_ticks(b.child.id());
    // A measurement window, not a synchronisation: nothing is awaited here.
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(b.child.id()) - t0;
    assert!(used <= 10, "an idle bridge used {used} clock ticks in 2 s");
}

#[test]
fn subjects_that_are_no_fifobus_topics_are_refused_at_start() {
    let out = Command::new(BRIDGE)
        .args([
            "--dir",
            "/nonexistent",
            "--metrics",
            "off",
            "--import",
            "a.b c",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--import 'a.b c'") && err.contains("not a valid fifobus pattern"),
        "{err}"
    );
    let out = Command::new(BRIDGE)
        .args(["--dir", "/nonexistent", "--metrics", "off"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to bridge"));
}

/// The bridge's /metrics is valid exposition (promtool) on the broker's
/// conventions, and holds every `fifobus_bridge_` series the Grafana
/// dashboard queries. No NATS and no broker are needed for that.
#[test]
#[ignore = "needs promtool: apt-get install prometheus"]
fn metrics_are_valid_and_cover_the_dashboard() {
    let promtool = sibling_or_on_path("promtool").unwrap_or_else(|| {
        panic!("promtool is not on PATH; this test needs Debian's prometheus package: apt-get install prometheus")
    });
    let unused = TcpListener::bind("127.0.0.1:0").unwrap();
    let nats = format!("nats://{}", unused.local_addr().unwrap());
    let nobus = temp_dir("fifobus-bridge-nobus-").unwrap();
    let bridge = Bridge::start(&nobus.path().join("bus"), &nats, &["--export", "a.>"]);
    bridge.wait_log("bus: waiting for a broker");
    let text = bridge.metrics();
    let body = text.split("\r\n\r\n").nth(1).unwrap().to_owned();
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(bridge.metric("fifobus_bridge_connected{side=\"bus\"}"), 0);
    assert_eq!(
        bridge.metric("fifobus_bridge_buffer_limit_messages"),
        10_000
    );

    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../grafana/dashboards/fifobus.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut used = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("fifobus_bridge_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                used.push(name);
            }
        }
    }
    assert!(used.len() >= 5, "the dashboard has bridge panels: {used:?}");
    for name in used {
        assert!(
            body.lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "the dashboard queries {name}, which the bridge does not expose:\n{body}"
        );
    }
}

/// Every series the bridge exposes, without its value, and every family's
/// HELP and TYPE: what dashboards and alerts depend on. Pinned so a change
/// of how /metrics is produced cannot rename, relabel or re-describe one.
const EXPOSITION: &[&str] = &[
    "# HELP fifobus_bridge_buffer_limit_bytes --buffer-bytes: the bound of each direction's buffer, in payload bytes.",
    "# TYPE fifobus_bridge_buffer_limit_bytes gauge",
    "fifobus_bridge_buffer_limit_bytes",
    "# HELP fifobus_bridge_buffer_limit_messages --buffer: the bound of each direction's buffer, in messages.",
    "# TYPE fifobus_bridge_buffer_limit_messages gauge",
    "fifobus_bridge_buffer_limit_messages",
    "# HELP fifobus_bridge_buffered_bytes Payload bytes waiting in the bridge's buffer.",
    "# TYPE fifobus_bridge_buffered_bytes gauge",
    "fifobus_bridge_buffered_bytes{direction=\"export\"}",
    "fifobus_bridge_buffered_bytes{direction=\"import\"}",
    "# HELP fifobus_bridge_buffered_messages Messages waiting in the bridge's buffer.",
    "# TYPE fifobus_bridge_buffered_messages gauge",
    "fifobus_bridge_buffered_messages{direction=\"export\"}",
    "fifobus_bridge_buffered_messages{direction=\"import\"}",
    "# HELP fifobus_bridge_bytes_total Payload bytes of the messages bridged.",
    "# TYPE fifobus_bridge_bytes_total counter",
    "fifobus_bridge_bytes_total{direction=\"export\"}",
    "fifobus_bridge_bytes_total{direction=\"import\"}",
    "# HELP fifobus_bridge_connected 1 while connected on that side.",
    "# TYPE fifobus_bridge_connected gauge",
    "fifobus_bridge_connected{side=\"bus\"}",
    "fifobus_bridge_connected{side=\"nats\"}",
    "# HELP fifobus_bridge_dropped_total Messages lost or possibly lost: buffer = the bound was reached (NATS unreachable or the bus slow), unconfirmed = sent to NATS but the connection dropped before a flush confirmed them (export) or the NATS client had no room (import), broker = the broker's DROPPED for the bridge.",
    "# TYPE fifobus_bridge_dropped_total counter",
    "fifobus_bridge_dropped_total{direction=\"export\",reason=\"broker\"}",
    "fifobus_bridge_dropped_total{direction=\"export\",reason=\"buffer\"}",
    "fifobus_bridge_dropped_total{direction=\"export\",reason=\"unconfirmed\"}",
    "fifobus_bridge_dropped_total{direction=\"import\",reason=\"broker\"}",
    "fifobus_bridge_dropped_total{direction=\"import\",reason=\"buffer\"}",
    "fifobus_bridge_dropped_total{direction=\"import\",reason=\"unconfirmed\"}",
    "# HELP fifobus_bridge_invalid_subjects_total Imported messages whose subject is not a fifobus topic, not published.",
    "# TYPE fifobus_bridge_invalid_subjects_total counter",
    "fifobus_bridge_invalid_subjects_total",
    "# HELP fifobus_bridge_looped_total Imported messages that came from this bus (Fifobus-Origin), not published again.",
    "# TYPE fifobus_bridge_looped_total counter",
    "fifobus_bridge_looped_total",
    "# HELP fifobus_bridge_messages_total Messages bridged: export = bus to NATS (confirmed by a flush), import = NATS to bus.",
    "# TYPE fifobus_bridge_messages_total counter",
    "fifobus_bridge_messages_total{direction=\"export\"}",
    "fifobus_bridge_messages_total{direction=\"import\"}",
    "# HELP fifobus_bridge_reconnects_total Reconnections after a loss: to NATS, or to a restarted broker (bus).",
    "# TYPE fifobus_bridge_reconnects_total counter",
    "fifobus_bridge_reconnects_total{side=\"bus\"}",
    "fifobus_bridge_reconnects_total{side=\"nats\"}",
];

/// /metrics exposes exactly the pinned series, help texts and types (in
/// any order), as text/plain version 0.0.4; /healthz says "ok"; another
/// path is a 404 pointing at /metrics. Each answer ends the connection
/// (`get` reads to the end). No NATS and no broker are needed for that.
#[test]
fn the_endpoint_keeps_its_series_and_answers_healthz_and_unknown_paths() {
    let unused = TcpListener::bind("127.0.0.1:0").unwrap();
    let nats = format!("nats://{}", unused.local_addr().unwrap());
    let nobus = temp_dir("fifobus-bridge-nobus-").unwrap();
    let bridge = Bridge::start(&nobus.path().join("bus"), &nats, &["--export", "a.>"]);
    bridge.wait_log("bus: waiting for a broker");

    let out = bridge.metrics();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let mut got: Vec<&str> = body
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            if l.starts_with('#') {
                l
            } else {
                l.rsplit_once(' ').unwrap().0
            }
        })
        .collect();
    got.sort_unstable();
    let mut want = EXPOSITION.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "{body}");

    let health = bridge.get("/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert_eq!(health.split_once("\r\n\r\n").unwrap().1, "ok\n");

    let missing = bridge.get("/nope");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert!(missing.contains("try /metrics"), "{missing}");
}
