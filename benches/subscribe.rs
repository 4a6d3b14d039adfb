//! The cost of durable state on the subscribe path (issue 10, item 1):
//! `SUB` and `UNSUB` applied by `RouterCore`, with and without the state
//! tracking (`RouterCore::track_changes`) that marks the client for the
//! coalescing state writer. Same run, same build: the only difference is
//! whether the router tracks changes. The writer's file writes are not on
//! this path (one per client per 50 ms, off the async threads).
//!
//! Run with `cargo bench --bench subscribe`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fifobus::counters::Counters;
use fifobus::protocol::Command;
use fifobus::router::{BacklogLimits, Outbox, RouterCore};

const SUBS: usize = 10_000;

fn commands(verb: &str) -> Vec<Command> {
    (0..SUBS)
        .map(|i| {
            let line = format!("{verb} sensors.room{}.temp{}", i % 100, i / 100);
            Command::parse(Bytes::from(line)).unwrap().unwrap()
        })
        .collect()
}

fn subscribe(c: &mut Criterion) {
    let subs = commands("SUB");
    let unsubs = commands("UNSUB");
    let mut g = c.benchmark_group("subscribe/sub_then_unsub_10k");
    g.measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(2 * SUBS as u64));
    for tracked in [false, true] {
        let name = if tracked {
            "with_state"
        } else {
            "without_state"
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut core = RouterCore::new(Counters::new(16));
                    core.set_max_subscriptions(2 * SUBS);
                    let changed = Arc::new(tokio::sync::Notify::new());
                    if tracked {
                        core.track_changes(changed.clone());
                    }
                    let outbox = Arc::new(Outbox::new(BacklogLimits::default()));
                    core.attach(1, outbox, Vec::new());
                    let now = Instant::now();
                    let start = Instant::now();
                    for cmd in subs.iter().chain(unsubs.iter()) {
                        black_box(core.apply(1, Ok(cmd.clone()), now));
                    }
                    total += start.elapsed();
                    // What the writer takes (untimed): one client.
                    assert_eq!(core.take_dirty().clients.len(), usize::from(tracked));
                }
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, subscribe);
criterion_main!(benches);
