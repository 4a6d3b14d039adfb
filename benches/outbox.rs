//! The outbox alone: queueing lines (one at a time, and a batch's run at
//! once), the writer's take, and drop-oldest on a full backlog with the
//! `DROPPED` line the next take starts with.
//!
//! Run with `cargo bench --bench outbox`. Throughput is in lines.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fifobus::router::{BacklogLimits, Batch, Outbox, OverflowPolicy};

/// Lines per measured round: one reader batch.
const LINES: usize = 1024;

/// A 64-byte payload's `MSG` line.
fn msg_line() -> Vec<u8> {
    let mut l = b"MSG chat.room.42 ".to_vec();
    l.extend((0..64).map(|i| b'a' + (i % 26) as u8));
    l.push(b'\n');
    l
}

fn drain(o: &Outbox, hand: &mut Batch) -> usize {
    let mut lines = 0;
    loop {
        o.take(hand);
        if hand.is_empty() {
            return lines;
        }
        let (bytes, n) = hand.clear();
        lines += n;
        o.written(bytes, n);
    }
}

fn push_and_take(c: &mut Criterion) {
    let line = msg_line();
    let o = Outbox::new(BacklogLimits::default());
    let mut hand = Batch::default();
    let mut g = c.benchmark_group("outbox");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(LINES as u64));
    let at = Instant::now();
    g.bench_function("push_line_1024", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                for _ in 0..LINES {
                    black_box(o.push_line(black_box(&line), Some(at)));
                }
                elapsed += start.elapsed();
                drain(&o, &mut hand);
            }
            elapsed
        })
    });
    let run: Vec<u8> = line.repeat(LINES);
    g.bench_function("push_run_1024", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                black_box(o.push_run([&run[..]], LINES, run.len(), at));
                elapsed += start.elapsed();
                drain(&o, &mut hand);
            }
            elapsed
        })
    });
    g.bench_function("take_1024", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                o.push_run([&run[..]], LINES, run.len(), at);
                let start = Instant::now();
                let n = drain(&o, &mut hand);
                elapsed += start.elapsed();
                assert_eq!(n, LINES);
            }
            elapsed
        })
    });
    g.finish();
}

/// A client that reads nothing: its backlog full at 1024 lines, every
/// push discards the oldest; then its writer takes, `DROPPED` first.
fn drop_oldest(c: &mut Criterion) {
    let line = msg_line();
    let o = Outbox::new(BacklogLimits {
        messages: LINES,
        bytes: 64 << 20,
        policy: OverflowPolicy::DropOldest,
    });
    let at = Instant::now();
    for _ in 0..LINES {
        o.push_line(&line, Some(at));
    }
    let mut hand = Batch::default();
    let mut g = c.benchmark_group("outbox");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(LINES as u64));
    g.bench_function("drop_oldest_1024_then_take", |b| {
        b.iter(|| {
            for _ in 0..LINES {
                black_box(o.push_line(black_box(&line), Some(at)));
            }
            o.take(&mut hand);
            assert!(hand.unwritten().starts_with(b"DROPPED 1024\n"));
            let (bytes, n) = hand.clear();
            o.written(bytes, n);
            // Fill it again to the cap for the next round.
            drain(&o, &mut hand);
            for _ in 0..LINES {
                o.push_line(&line, Some(at));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, push_and_take, drop_oldest);
criterion_main!(benches);
