//! Bad input gets an `ERR` line and costs nothing else.

mod common;

use common::*;

fn errs(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .map(|l| l.split(' ').take(2).last().unwrap_or(""))
        .collect()
}

#[test]
fn each_bad_line_gets_its_code_and_later_lines_work() {
    let bus = TempBus::start();
    let mut sub = bus.connect("sub", &["ok"]);
    let mut c = bus.connect("c", &[]);
    c.send_raw(b"FROB x\nPUB\nPUB a..b x\nPUB \xff\xfe x\nSUB a.>.b\nUNSUB\nBYE now\n\xc3\x28\nPUB ok fine\n").unwrap();
    let lines = barrier(&mut c);
    assert_eq!(
        errs(&lines),
        [
            "unknown-command",
            "bad-syntax",
            "bad-topic",
            "bad-topic",
            "bad-pattern",
            "bad-syntax",
            "bad-syntax",
            "unknown-command"
        ],
        "{lines:?}"
    );
    assert!(
        lines.iter().all(|l| l.starts_with("ERR ") && l.is_ascii()),
        "{lines:?}"
    );
    assert_eq!(barrier(&mut sub), ["MSG ok fine"]);
}

#[test]
fn overlong_line_is_skipped_with_err_and_the_client_goes_on() {
    let bus = TempBus::start_with(&["--max-line", "1KiB"]);
    let mut sub = bus.connect("sub", &["t"]);
    let mut c = bus.connect("c", &["t"]);
    let mut big = b"PUB t ".to_vec();
    big.extend(std::iter::repeat_n(b'x', 300_000));
    big.extend_from_slice(b"\nPUB t after\n");
    c.send_raw(&big).unwrap();
    let lines = barrier(&mut c);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("ERR line-too-long "), "{lines:?}");
    assert_eq!(lines[1], "MSG t after");
    assert_eq!(barrier(&mut sub), ["MSG t after"], "others lose nothing");
}

#[test]
fn default_max_line_accepts_large_payloads() {
    let bus = TempBus::start();
    let mut c = bus.connect("c", &["t"]);
    let payload = "y".repeat(512 * 1024);
    c.publish(&topic("t"), payload.as_bytes()).unwrap();
    let lines = barrier(&mut c);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].len(), 6 + payload.len());
}

#[test]
fn refusals_are_logged_without_flooding() {
    let bus = TempBus::start();
    let mut c = bus.connect("noisy", &[]);
    c.send_raw("NOPE\n".repeat(5000).as_bytes()).unwrap();
    let lines = barrier(&mut c);
    assert_eq!(lines.len(), 5000, "every bad line is answered");
    let log = bus.log_text();
    let refusals = log.lines().filter(|l| l.contains("refused a line"));
    let (warned, debug): (Vec<&str>, Vec<&str>) = refusals.partition(|l| l.contains("WARN"));
    assert!(
        (1..=5).contains(&warned.len()),
        "{} warnings for 5000 bad lines",
        warned.len()
    );
    assert_eq!(
        warned.len() + debug.len(),
        5000,
        "each refusal is logged once"
    );
}
