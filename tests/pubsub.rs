//! Publishing and subscribing through the real broker and real FIFOs.

mod common;

use std::collections::HashMap;

use common::*;
use fifobus::protocol::{encode_pub, Reply};

#[test]
fn message_reaches_a_subscriber_and_its_publisher() {
    let bus = TempBus::start();
    let mut alice = bus.connect("alice", &["chat.>"]);
    let mut bob = bus.connect("bob", &[]);
    bob.subscribe(&pattern("chat.*")).unwrap();
    bob.publish(&topic("chat.room"), b"hello  there ").unwrap();
    assert_eq!(barrier(&mut bob), ["MSG chat.room hello  there "]);
    assert_eq!(barrier(&mut alice), ["MSG chat.room hello  there "]);
}

#[test]
fn overlapping_patterns_deliver_once() {
    let bus = TempBus::start();
    let mut sub = bus.connect("sub", &["a.>", "a.*", "a.b", "*.b", ">"]);
    let mut publ = bus.connect("pub", &[]);
    publ.send_raw(&pub_lines([("a.b", "1"), ("x.y", "2"), ("a", "3")]))
        .unwrap();
    barrier(&mut publ);
    assert_eq!(barrier(&mut sub), ["MSG a.b 1", "MSG x.y 2", "MSG a 3"]);
}

#[test]
fn unsub_stops_delivery_and_wildcards_follow_nats_rules() {
    let bus = TempBus::start();
    let mut sub = bus.connect("sub", &[]);
    sub.subscribe(&pattern("a.*")).unwrap();
    sub.subscribe(&pattern("b.>")).unwrap();
    barrier(&mut sub);
    let mut publ = bus.connect("pub", &[]);
    publ.send_raw(&pub_lines([
        ("a.x", "1"),
        ("a.x.y", "no"),
        ("a", "no"),
        ("b.c.d", "2"),
        ("b", "no"),
    ]))
    .unwrap();
    barrier(&mut publ);
    assert_eq!(barrier(&mut sub), ["MSG a.x 1", "MSG b.c.d 2"]);
    sub.unsubscribe(&pattern("a.*")).unwrap();
    barrier(&mut sub);
    publ.send_raw(&pub_lines([("a.x", "3"), ("b.q", "4")]))
        .unwrap();
    barrier(&mut publ);
    assert_eq!(barrier(&mut sub), ["MSG b.q 4"]);
}

#[test]
fn payload_bytes_pass_through_unchanged() {
    let bus = TempBus::start();
    let mut sub = bus.connect("sub", &["t"]);
    let mut publ = bus.connect("pub", &[]);
    // Raw on purpose: a CRLF line, and a PUB with no space before its payload.
    publ.send_raw(b"PUB t \xff\xfe\x00 raw\r\nPUB t\n").unwrap();
    barrier(&mut publ);
    assert_eq!(
        sub.read_line(Some(T)).unwrap().unwrap(),
        b"MSG t \xff\xfe\x00 raw"
    );
    assert_eq!(sub.read_line(Some(T)).unwrap().unwrap(), b"MSG t ");
}

/// 100 publishers, 1,000 messages each, one subscriber: all 100,000 arrive
/// and each publisher's messages arrive in the order they were sent.
#[test]
fn hundred_publishers_keep_their_order() {
    const PUBLISHERS: usize = 100;
    const EACH: usize = 1000;
    let bus = TempBus::start();
    let mut sub = bus.connect("sub", &["load.>"]);
    let dir = bus.dir.clone();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let opts = fifobus::client::ConnectOptions {
                    name: Some(format!("p{p}")),
                    ..Default::default()
                };
                let mut c = fifobus::client::Client::connect(&dir, &opts, T).unwrap();
                let topic = topic(&format!("load.p{p}"));
                let mut batch = Vec::new();
                for i in 0..EACH {
                    encode_pub(&mut batch, &topic, i.to_string().as_bytes()).unwrap();
                    if batch.len() > 4000 {
                        c.send_raw(&batch).unwrap();
                        batch.clear();
                    }
                }
                c.send_raw(&batch).unwrap();
                c.ping("done", T).unwrap();
                c.bye(T).unwrap();
            })
        })
        .collect();
    let mut next: HashMap<String, usize> = HashMap::new();
    for n in 0..PUBLISHERS * EACH {
        let line = sub
            .read_line(Some(T))
            .unwrap()
            .unwrap_or_else(|| panic!("EOF after {n}"));
        let Reply::Msg { topic, payload } = Reply::parse(&line) else {
            panic!("not a MSG: {}", String::from_utf8_lossy(&line))
        };
        let topic = topic.to_owned();
        let i: usize = std::str::from_utf8(payload).unwrap().parse().unwrap();
        let expected = next.entry(topic.clone()).or_default();
        assert_eq!(i, *expected, "out of order on {topic}");
        *expected += 1;
    }
    for p in publishers {
        p.join().unwrap();
    }
    assert_eq!(next.len(), PUBLISHERS);
    assert!(next.values().all(|&n| n == EACH));
    assert!(barrier(&mut sub).is_empty(), "nothing extra, no DROPPED");
}

/// The shell idioms from the docs: open `send` for every line, reopen `recv`
/// for every line. Nothing is lost and the client is never disconnected.
#[test]
fn shell_client_reopening_fifos_per_line_loses_nothing() {
    let bus = TempBus::start();
    let script = r#"
        set -eu
        r=$(mktemp -u); mkfifo -m 600 "$r"
        echo "HELLO reply=$r name=shell sub=sh.>" > "$BUS/hello"
        read -r _ id cdir < "$r"; rm -f "$r"
        for i in $(seq 1 200); do echo "PUB sh.t $i" > "$cdir/send"; done
        echo "PING end" > "$cdir/send"
        n=0
        while :; do
            read -r line < "$cdir/recv"
            [ "$line" = "PONG end" ] && break
            n=$((n+1))
            [ "$line" = "MSG sh.t $n" ] || { echo "bad line $n: $line"; exit 1; }
        done
        echo "got $n"
        echo BYE > "$cdir/send"
        read -r line < "$cdir/recv"; echo "$line"
    "#;
    let (status, out, err) = sh(script, &[("BUS", bus.dir.as_os_str())], T);
    assert!(status.success(), "stdout: {out}\nstderr: {err}");
    assert_eq!(out, "got 200\nBYE\n");
    assert!(
        wait_for(&bus.clients_dir(), T, || bus.client_dirs().is_empty()),
        "BYE removes the client directory"
    );
}

#[test]
fn many_topics_many_subscribers_fan_out() {
    let bus = TempBus::start();
    let mut subs: Vec<_> = (0..10)
        .map(|i| bus.connect(&format!("s{i}"), &[&format!("room.{}", i % 2), "room.all"]))
        .collect();
    let mut publ = bus.connect("pub", &[]);
    publ.send_raw(&pub_lines([
        ("room.0", "even"),
        ("room.1", "odd"),
        ("room.all", "all"),
    ]))
    .unwrap();
    barrier(&mut publ);
    for (i, s) in subs.iter_mut().enumerate() {
        let want = if i % 2 == 0 {
            "MSG room.0 even"
        } else {
            "MSG room.1 odd"
        };
        assert_eq!(barrier(s), [want, "MSG room.all all"]);
    }
}
