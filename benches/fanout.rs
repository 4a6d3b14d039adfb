//! The delivery side: encoding one `MSG` line, `RouterCore::publish`
//! queueing it into every subscriber's outbox one line at a time, and the
//! router's whole batch path (`RouterCore::apply_batch` of a reader's
//! 1024-line batch: parse result in, lines queued per subscriber at once).
//! All with metrics on: the real `Counters`, the topic's counters
//! registered as the broker does.
//!
//! Run with `cargo bench --bench fanout`. Throughput is reported in messages
//! for encoding and in deliveries (messages × subscribers) for publishing.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fifobus::acl::Identity;
use fifobus::protocol::encode;
use fifobus::protocol::{Command, Input, Line, LineSplitter};
use fifobus::router::{BacklogLimits, Batch, Outbox, RouterCore};
use fifobus::topic::{Pattern, Topic};

/// Publishes timed back to back before the outboxes are drained (untimed).
const DRAIN_EVERY: u64 = 1024;

fn payload(len: usize) -> Bytes {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

fn encode_msg(c: &mut Criterion) {
    let topic: Topic = "chat.room.42".parse().expect("valid topic");
    let mut g = c.benchmark_group("fanout/encode_msg");
    g.throughput(Throughput::Elements(1));
    for (name, len) in [("64B", 64), ("1KiB", 1024)] {
        let p = payload(len);
        g.bench_function(name, |b| {
            b.iter(|| encode::msg(black_box(&topic), black_box(&p)))
        });
    }
    g.finish();
}

fn publish(c: &mut Criterion) {
    let topic: Topic = "chat.room.42".parse().expect("valid topic");
    let sub: Pattern = topic.clone().into();
    let p = payload(64);
    // Never reached: DRAIN_EVERY lines per outbox between drains.
    let limits = BacklogLimits {
        messages: 1 << 20,
        bytes: 1 << 30,
        ..BacklogLimits::default()
    };

    let mut g = c.benchmark_group("fanout/publish_64B");
    g.measurement_time(Duration::from_secs(3));
    // `_acl`: the same under an access-control policy, published on behalf
    // of a client (`publish_as`), as the router does with `--acl`: the
    // per-topic route also holds the publisher's decision.
    for (acl, subscribers) in [
        (false, 1u64),
        (false, 10),
        (false, 100),
        (true, 1),
        (true, 10),
        (true, 100),
    ] {
        let mut core = RouterCore::new(fifobus::counters::Counters::new(1000));
        let publisher = u64::MAX;
        if acl {
            let policy = fifobus::acl::parse(
                std::path::Path::new("bench.acl"),
                "default deny\nallow pubsub chat.> all",
                &fifobus::acl::SystemNames,
            )
            .expect("valid ACL");
            core.set_policy(Arc::new(policy));
            let o = Arc::new(Outbox::new(limits));
            core.attach_as(publisher, o, Identity::new(1000, vec![]), vec![])
                .expect("allowed");
        }
        let outboxes: Vec<Arc<Outbox>> = (0..subscribers)
            .map(|key| {
                let o = Arc::new(Outbox::new(limits));
                core.attach_as(
                    key,
                    o.clone(),
                    Identity::new(1000, vec![]),
                    vec![sub.clone()],
                )
                .expect("allowed");
                o
            })
            .collect();
        let mut drained = Batch::default();
        let read_at = Instant::now();

        g.throughput(Throughput::Elements(subscribers));
        let name = format!("{subscribers}_subs{}", if acl { "_acl" } else { "" });
        g.bench_function(name, |b| {
            // Steady state: the topic's route is cached after the first
            // publish, so this is encode once + one push per subscriber.
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(DRAIN_EVERY);
                    let start = Instant::now();
                    for _ in 0..n {
                        let d = if acl {
                            core.publish_as(publisher, black_box(&topic), black_box(&p), read_at)
                        } else {
                            core.publish(black_box(&topic), black_box(&p), read_at)
                        };
                        debug_assert_eq!(d.delivered as u64, subscribers);
                        black_box(d);
                    }
                    elapsed += start.elapsed();
                    left -= n;
                    // Untimed: what each client's writer would do.
                    for o in &outboxes {
                        drain(o, &mut drained);
                    }
                }
                elapsed
            })
        });
    }
    g.finish();
}

/// What a client's writer does, untimed: takes everything and reports it
/// written.
fn drain(o: &Outbox, hand: &mut Batch) {
    loop {
        o.take(hand);
        if hand.is_empty() {
            return;
        }
        let (bytes, lines) = hand.clear();
        o.written(bytes, lines);
    }
}

/// A router with `subscribers` clients on `chat.room.42` and a publisher
/// (the last value) subscribed to nothing.
fn room(subscribers: u64, limits: BacklogLimits) -> (RouterCore, Vec<Arc<Outbox>>, u64) {
    let mut core = RouterCore::new(fifobus::counters::Counters::new(1000));
    let outboxes = (0..subscribers)
        .map(|key| {
            let o = Arc::new(Outbox::new(limits));
            core.attach(key, o.clone(), vec!["chat.room.42".parse().expect("valid")]);
            o
        })
        .collect();
    let publisher = u64::MAX;
    core.attach(publisher, Arc::new(Outbox::new(limits)), vec![]);
    (core, outboxes, publisher)
}

/// `RouterCore::apply_batch` of one reader batch: 1024 `PUB`s of 64 bytes
/// on one topic, to 1 and to 10 subscribers, the outboxes drained (untimed)
/// after each batch as their writers would.
fn apply_batch(c: &mut Criterion) {
    const LINES: usize = 1024;
    let limits = BacklogLimits::default();
    let p = payload(64);
    let line = format!("PUB chat.room.42 {}", String::from_utf8_lossy(&p));
    let mut g = c.benchmark_group("fanout/apply_batch_1024x64B");
    g.measurement_time(Duration::from_secs(3));
    for subscribers in [1u64, 10] {
        let (mut core, outboxes, publisher) = room(subscribers, limits);
        let batch = || -> Vec<Input> {
            (0..LINES)
                .map(|_| {
                    Command::parse(Bytes::copy_from_slice(line.as_bytes()))
                        .map(|c| c.expect("not blank"))
                        .into()
                })
                .collect()
        };
        let mut hand = Batch::default();
        g.throughput(Throughput::Elements(LINES as u64 * subscribers));
        g.bench_function(format!("1_to_{subscribers}"), |b| {
            b.iter_custom(|iters| {
                batches(iters, &outboxes, &mut hand, || {
                    let items = batch();
                    let start = Instant::now();
                    black_box(core.apply_batch(publisher, items, start));
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

/// What a reader does with one 64 KiB read of 1024 `PUB` lines, and the
/// router with the batch, timed together: line by line (split, parse, a
/// `Command` each) against runs taken whole (`protocol::run`), to 1 and to
/// 10 subscribers.
fn read_and_apply(c: &mut Criterion) {
    const LINES: usize = 1024;
    let limits = BacklogLimits::default();
    let p = payload(64);
    let mut raw = Vec::new();
    for _ in 0..LINES {
        raw.extend_from_slice(b"PUB chat.room.42 ");
        raw.extend_from_slice(&p);
        raw.push(b'\n');
    }
    let mut g = c.benchmark_group("fanout/read_and_apply_1024x64B");
    g.measurement_time(Duration::from_secs(3));
    for subscribers in [1u64, 10] {
        let (mut core, outboxes, publisher) = room(subscribers, limits);
        let mut hand = Batch::default();
        g.throughput(Throughput::Elements(LINES as u64 * subscribers));
        for runs in [false, true] {
            let name = format!("{}/1_to_{subscribers}", if runs { "runs" } else { "lines" });
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    batches(iters, &outboxes, &mut hand, || {
                        let mut buf = BytesMut::from(&raw[..]);
                        let start = Instant::now();
                        let items = read(&mut buf, runs);
                        black_box(core.apply_batch(publisher, items, start));
                        start.elapsed()
                    })
                })
            });
        }
    }
    g.finish();
}

/// `iters` times `batch` (which returns the time it measured), the
/// outboxes drained after each, untimed, as their writers would.
fn batches(
    iters: u64,
    outboxes: &[Arc<Outbox>],
    hand: &mut Batch,
    mut batch: impl FnMut() -> Duration,
) -> Duration {
    let mut elapsed = Duration::ZERO;
    for _ in 0..iters {
        elapsed += batch();
        for o in outboxes {
            drain(o, hand);
        }
    }
    elapsed
}

/// The reader's part: `buf` into a batch, with or without runs.
fn read(buf: &mut BytesMut, runs: bool) -> Vec<Input> {
    let mut splitter = LineSplitter::new(1 << 20);
    let mut items = Vec::new();
    loop {
        if runs {
            if let Some(run) = splitter.take_pub_run(buf, 1024) {
                items.push(Input::Pubs(run));
                continue;
            }
        }
        match splitter.next_line(buf) {
            Some(Line::Complete(l)) => {
                if let Some(c) = Command::parse(l).transpose() {
                    items.push(c.into());
                }
            }
            Some(Line::TooLong) | None => return items,
        }
    }
}

criterion_group!(benches, encode_msg, publish, apply_batch, read_and_apply);
criterion_main!(benches);
