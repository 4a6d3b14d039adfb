//! Retained messages (`RETAIN <topic> <payload>`, `fifobus pub --retain`)
//! through the real broker: the last one per topic reaches every new
//! matching subscription first, an empty one clears, and what clients can
//! make the broker keep is bounded in count and bytes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn fifobus(dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut child = Command::new(bin())
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || std::io::read_to_string(out).unwrap());
    let err = std::thread::spawn(move || std::io::read_to_string(err).unwrap());
    let status = wait_child(&mut child, T).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("fifobus {args:?} did not exit within {T:?}")
    });
    (status, out.join().unwrap(), err.join().unwrap())
}

fn scrape(bus: &TempBus) -> String {
    let url = fifobus::stats::metrics_url(&bus.dir).unwrap();
    let mut s =
        std::net::TcpStream::connect(url.trim_start_matches("http://").split('/').next().unwrap())
            .unwrap();
    use std::io::{Read, Write};
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The value of an unlabelled gauge in `/metrics`.
fn gauge(bus: &TempBus, name: &str) -> u64 {
    let text = scrape(bus);
    let line = text
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics"));
    line[name.len() + 1..].trim().parse::<f64>().unwrap() as u64
}

#[test]
fn a_new_subscription_gets_the_last_retained_message_first() {
    let bus = TempBus::start();
    let mut p = bus.connect("pub", &[]);
    p.send_raw(b"RETAIN sensors.kitchen 20\nRETAIN sensors.kitchen 21\nRETAIN sensors.hall 18\nPUB sensors.attic not-retained\n")
        .unwrap();
    assert_eq!(barrier(&mut p), Vec::<String>::new());
    // Subscribed at HELLO: the retained messages are there before anything live.
    let mut late = bus.connect("late", &["sensors.>"]);
    p.publish(&topic("sensors.kitchen"), b"22").unwrap();
    barrier(&mut p);
    assert_eq!(
        barrier(&mut late),
        [
            "MSG sensors.hall 18",
            "MSG sensors.kitchen 21",
            "MSG sensors.kitchen 22"
        ]
    );
    // A SUB later, likewise; each new subscription gets them again.
    late.subscribe(&pattern("sensors.kitchen")).unwrap();
    assert_eq!(barrier(&mut late), ["MSG sensors.kitchen 21"]);
    // An empty payload clears it, and is not published.
    p.send_raw(b"RETAIN sensors.kitchen\n").unwrap();
    assert_eq!(barrier(&mut p), Vec::<String>::new());
    assert_eq!(barrier(&mut late), Vec::<String>::new());
    let mut later = bus.connect("later", &["sensors.*"]);
    assert_eq!(barrier(&mut later), ["MSG sensors.hall 18"]);
}

#[test]
fn cli_pub_retain_then_sub_prints_it_and_an_empty_one_clears_it() {
    let bus = TempBus::start();
    let (status, _, err) = fifobus(&bus.dir, &["pub", "--retain", "cfg.mode", "eco"]);
    assert!(status.success(), "{status:?}: {err}");
    // Nobody publishes any more: the subscriber gets the retained one.
    let (status, out, err) = fifobus(&bus.dir, &["sub", "cfg.>", "-n", "1", "--timeout", "5"]);
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(out, "eco\n");
    let (status, _, err) = fifobus(&bus.dir, &["pub", "--retain", "cfg.mode", ""]);
    assert!(status.success(), "{status:?}: {err}");
    let (status, out, _) = fifobus(&bus.dir, &["sub", "cfg.>", "-n", "1", "--timeout", "0.3"]);
    assert_eq!(
        status.code(),
        Some(124),
        "cleared: nothing to print, got {out:?}"
    );
}

#[test]
fn retained_messages_are_bounded_in_count_and_bytes() {
    let bus = TempBus::start_with(&["--max-retained", "2", "--max-retained-bytes", "1KiB"]);
    let mut p = bus.connect("pub", &[]);
    let mut sub = bus.connect("sub", &["t.>"]);
    p.send_raw(b"RETAIN t.a 1\nRETAIN t.b 2\nRETAIN t.c 3\nRETAIN t.a 4\n")
        .unwrap();
    let got = barrier(&mut p);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("ERR retained-full 2 topics already have a retained message (the broker's --max-retained)"),
        "{got:?}"
    );
    // Replacing one is fine; a refused one is not published either.
    assert_eq!(barrier(&mut sub), ["MSG t.a 1", "MSG t.b 2", "MSG t.a 4"]);
    let big = "x".repeat(1000);
    p.send_raw(format!("RETAIN t.a {big}\n").as_bytes())
        .unwrap();
    let got = barrier(&mut p);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].contains("--max-retained-bytes 1024"), "{got:?}");
    assert_eq!(gauge(&bus, "fifobus_retained_messages"), 2);
    // "t.a" + "4" + 64, "t.b" + "2" + 64.
    assert_eq!(gauge(&bus, "fifobus_retained_bytes"), 2 * (3 + 1 + 64));
    assert!(gauge(&bus, "fifobus_memory_held_bytes") >= 2 * (3 + 1 + 64));
    // The CLI says so and fails.
    let (status, _, err) = fifobus(&bus.dir, &["pub", "--retain", "t.z", "x"]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("retained-full"), "{err}");
    // Clearing makes room again.
    p.send_raw(b"RETAIN t.b\nRETAIN t.z 5\n").unwrap();
    assert_eq!(barrier(&mut p), Vec::<String>::new());
    assert_eq!(gauge(&bus, "fifobus_retained_messages"), 2);
}
