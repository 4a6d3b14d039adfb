//! Lossless subscribers (`SUB <pattern> lossless`, `fifobus sub --lossless`)
//! through the real broker: when one falls behind by a full backlog, the
//! broker stops reading the publishers of its topics instead of dropping,
//! so a slow pipeline gets every line in order; publishers of other topics
//! go on; the stall shows in `/metrics`; the backlog stays bounded.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use common::*;
use fifobus::protocol::Reply;

/// The value of a series in `/metrics`: `name` followed by a space (an
/// unlabelled one) or by `{labels}` exactly as given.
fn metric(bus: &TempBus, series: &str) -> Option<f64> {
    let url = fifobus::stats::metrics_url(&bus.dir).ok()?;
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()?
        .to_owned();
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(T)).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let text = std::io::read_to_string(s).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn wait_metric(bus: &TempBus, series: &str, want: impl Fn(f64) -> bool) {
    assert!(
        wait_for(&bus.clients_dir(), T, || metric(bus, series)
            .is_some_and(&want)),
        "{series} is {:?}",
        metric(bus, series)
    );
}

/// `fifobus sub --lossless t | slow reader`: every line, in order, although
/// the publisher sends far more than pipes and backlog hold.
#[test]
fn a_slow_pipeline_gets_every_line_in_order() {
    let bus = TempBus::start_with(&["--backlog-bytes", "16KiB"]);
    const N: usize = 3000;
    // A reader much slower than the publisher: bash reads a byte at a time,
    // and pauses every 200 lines.
    let script = format!(
        r#""$B" --dir "$D" sub --lossless t -n {N} | {{ i=0; while IFS= read -r l; do printf '%s\n' "$l"; i=$((i+1)); [ $((i % 200)) = 0 ] && sleep 0.05; done; }}"#
    );
    let mut sub = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("B", bin())
        .env("D", &bus.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = sub.stdout.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(out).unwrap());
    wait_metric(&bus, "fifobus_subscriptions", |v| v == 1.0);
    let lines: String = (0..N)
        .map(|i| format!("{i:06} {}\n", "x".repeat(100)))
        .collect();
    let mut publ = Command::new(bin())
        .arg("--dir")
        .arg(&bus.dir)
        .args(["pub", "t"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = publ.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(lines.as_bytes()));
    let status = wait_child(&mut sub, 6 * T).expect("the pipeline ends");
    let got = out.join().unwrap();
    let err = std::io::read_to_string(sub.stderr.take().unwrap()).unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert!(!err.contains("dropped"), "{err}");
    let got: Vec<&str> = got.lines().collect();
    assert_eq!(got.len(), N, "{err}");
    for (i, l) in got.iter().enumerate() {
        assert!(l.starts_with(&format!("{i:06} ")), "line {i} is {l:?}");
    }
    writer.join().unwrap().unwrap();
    let pstatus = wait_child(&mut publ, T).expect("the publisher ends");
    assert!(pstatus.success());
    assert!(
        metric(&bus, "fifobus_lossless_stalls_total").unwrap() > 0.0,
        "the publisher was held back, not dropped"
    );
    assert_eq!(
        metric(
            &bus,
            r#"fifobus_messages_dropped_total{reason="backlog-drop-oldest"}"#
        ),
        Some(0.0)
    );
}

/// A stuck lossless reader stalls the publisher of its topic and shows in
/// `/metrics`, holds a bounded backlog, and stalls nobody else; once it
/// reads, everything arrives.
#[test]
fn a_stuck_lossless_reader_stalls_only_its_publishers_and_shows_in_metrics() {
    let bus = TempBus::start_with(&["--backlog-bytes", "16KiB"]);
    let mut l = bus.connect("stuck", &[]);
    l.send_raw(b"SUB t lossless\n").unwrap();
    assert_eq!(barrier(&mut l), Vec::<String>::new());
    let mut other_sub = bus.connect("other-sub", &["u"]);
    let mut other_pub = bus.connect("other-pub", &[]);
    // 4 MB for t: far beyond pipes, backlog and the router's channel.
    const N: usize = 20_000;
    let mut a = bus.connect("publisher", &[]);
    let (done_tx, done_rx) = mpsc::channel();
    let publisher = std::thread::spawn(move || {
        let msgs: Vec<(&str, String)> = (0..N)
            .map(|i| ("t", format!("{i:06}{}", "x".repeat(200))))
            .collect();
        a.send_raw(&pub_lines(msgs)).unwrap();
        let after = barrier(&mut a);
        done_tx.send(()).unwrap();
        after
    });
    wait_metric(&bus, "fifobus_publishers_stalled", |v| v == 1.0);
    wait_metric(
        &bus,
        r#"fifobus_client_lossless_full{client="stuck"}"#,
        |v| v == 1.0,
    );
    assert!(done_rx.try_recv().is_err(), "the publisher is held back");
    // Others go on meanwhile.
    other_pub.publish(&topic("u"), b"still flowing").unwrap();
    assert_eq!(barrier(&mut other_pub), Vec::<String>::new());
    assert_eq!(barrier(&mut other_sub), ["MSG u still flowing"]);
    // Bounded: the cap plus what was in flight, not the 4 MB.
    let held = metric(&bus, r#"fifobus_client_backlog_bytes{client="stuck"}"#).unwrap();
    assert!(held < 1_000_000.0, "the stuck reader holds {held} bytes");
    // Now it reads: everything, in order, nothing dropped.
    let mut next = 0;
    while next < N {
        let line = l.read_line(Some(T)).unwrap().expect("not closed");
        match Reply::parse(&line) {
            Reply::Msg { payload, .. } => {
                let n: usize = std::str::from_utf8(&payload[..6]).unwrap().parse().unwrap();
                assert_eq!(n, next, "in order, none lost");
                next += 1;
            }
            _ => panic!("unexpected {:?}", String::from_utf8_lossy(&line)),
        }
    }
    done_rx.recv_timeout(T).expect("the publisher went on");
    assert_eq!(publisher.join().unwrap(), Vec::<String>::new());
    wait_metric(&bus, "fifobus_publishers_stalled", |v| v == 0.0);
}

/// A lossless subscriber that leaves releases its publishers at once.
#[test]
fn a_lossless_reader_that_leaves_releases_its_publishers() {
    let bus = TempBus::start_with(&["--backlog-bytes", "16KiB"]);
    let mut l = bus.connect("leaver", &[]);
    l.send_raw(b"SUB t lossless\n").unwrap();
    assert_eq!(barrier(&mut l), Vec::<String>::new());
    let mut a = bus.connect("publisher", &[]);
    let publisher = std::thread::spawn(move || {
        let msgs: Vec<(&str, String)> = (0..5000)
            .map(|i| ("t", format!("{i:06}{}", "x".repeat(200))))
            .collect();
        a.send_raw(&pub_lines(msgs)).unwrap();
        barrier(&mut a)
    });
    wait_metric(&bus, "fifobus_publishers_stalled", |v| v == 1.0);
    // It leaves without reading what is queued for it.
    l.send_raw(b"BYE\n").unwrap();
    wait_metric(&bus, "fifobus_publishers_stalled", |v| v == 0.0);
    assert_eq!(publisher.join().unwrap(), Vec::<String>::new());
}

/// On a shared bus a lossless reader holds back only its own user's
/// publishers: another user's publisher is never stalled by it (its lines
/// are dropped for that reader, reported as `DROPPED`), so one user cannot
/// stop another's publishing by subscribing losslessly and not reading.
#[test]
#[ignore = "needs root: creates throwaway users"]
fn a_lossless_reader_cannot_stall_another_users_publishers() {
    use fifobus_testkit::users::User;
    use std::os::unix::fs::PermissionsExt;
    let (alice, bob) = (User::create("alice"), User::create("bob"));
    let mut bus = TempBus::new(BusOptions::default()).unwrap();
    std::fs::set_permissions(bus.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    bus.spawn(&["--shared", "--backlog-bytes", "16KiB"]);
    let as_user = |u: &User, args: &[&str]| {
        let mut c = u.command(bin());
        c.arg("--dir")
            .arg(&bus.dir)
            .args(args)
            .current_dir("/")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    // Alice subscribes losslessly and never reads (its stdout is a pipe
    // nobody reads).
    let mut stuck = as_user(&alice, &["sub", "--lossless", "t"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_metric(&bus, "fifobus_subscriptions", |v| v == 1.0);
    let lines: String = (0..3000)
        .map(|i| format!("{i:06} {}\n", "x".repeat(200)))
        .collect();
    let publish = |u: &User| {
        let mut p = as_user(u, &["pub", "t"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = p.stdin.take().unwrap();
        let data = lines.clone();
        std::thread::spawn(move || {
            let _ = stdin.write_all(data.as_bytes());
        });
        p
    };
    // Bob's 600 KB go through, far more than alice's pipes and backlog hold.
    let mut bob_pub = publish(&bob);
    let status = wait_child(&mut bob_pub, T).expect("bob's publisher is not held back");
    let err = std::io::read_to_string(bob_pub.stderr.take().unwrap()).unwrap();
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(metric(&bus, "fifobus_lossless_stalls_total"), Some(0.0));
    // Alice's own publisher is held back by her reader, as she asked.
    let mut alice_pub = publish(&alice);
    wait_metric(&bus, "fifobus_publishers_stalled", |v| v == 1.0);
    assert!(
        alice_pub.try_wait().unwrap().is_none(),
        "alice's publisher waits"
    );
    // Her reader goes: her publisher finishes.
    stuck.kill().unwrap();
    stuck.wait().unwrap();
    let status = wait_child(&mut alice_pub, T).expect("released when the reader left");
    assert!(status.success(), "{status:?}");
}
