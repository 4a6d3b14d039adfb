//! Pattern matching against 10,000 subscriptions from 10,000 clients.
//!
//! Run with `cargo bench --bench matcher`. Throughput is reported in
//! lookups (or subscribe+unsubscribe pairs for the churn group).
//!
//! The index is built deterministically (a fixed-seed LCG, no `rand`): one
//! pattern per client key `0..10_000`, with service and event numbers skewed
//! towards 0 the way real traffic concentrates on a few hot services:
//!
//! | target | keys  | pattern             |
//! |--------|-------|---------------------|
//! | 70 %   | 7,102 | `app.<svc>.<event>` |
//! | 20 %   | 1,904 | `app.<svc>.*`       |
//! |  7 %   |   697 | `app.<svc>.>`       |
//! |  3 %   |   292 | `*.*.<event>`       |
//! |  -     |     5 | `app.>`             |
//!
//! with `svc`, `event` in `0..100` (`svc = ⌊100·u³⌋`, `event = ⌊100·u²⌋`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fifobus::topic::{Pattern, PatternIndex, Topic};

const CLIENTS: u64 = 10_000;

/// Knuth's MMIX LCG; the top 53 bits give a uniform `f64` in `[0, 1)`.
struct Lcg(u64);

impl Lcg {
    fn unit(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        (self.unit() * n as f64) as u64
    }
}

fn pattern(s: &str) -> Pattern {
    s.parse().expect("valid pattern")
}

fn topic(s: &str) -> Topic {
    s.parse().expect("valid topic")
}

fn build_index() -> PatternIndex<u64> {
    let mut rng = Lcg(0x5eed_f1f0_b005);
    let mut idx = PatternIndex::new();
    for key in 0..CLIENTS {
        let kind = rng.below(100);
        let svc = (rng.unit().powi(3) * 100.0) as u64;
        let event = (rng.unit().powi(2) * 100.0) as u64;
        let p = if key % 2000 == 1999 {
            "app.>".to_string()
        } else {
            match kind {
                0..=69 => format!("app.{svc}.{event}"),
                70..=89 => format!("app.{svc}.*"),
                90..=96 => format!("app.{svc}.>"),
                _ => format!("*.*.{event}"),
            }
        };
        assert!(idx.insert(&pattern(&p), key));
    }
    assert_eq!(idx.len(), CLIENTS as usize);
    idx
}

fn matches(c: &mut Criterion) {
    let idx = build_index();
    // (name, topic, out.len() it yields: the fan-out of that publish)
    let cases = [
        // The hottest service and event: out.len() = 772, from five nodes
        // (app.0.* 404, app.0.0 181, app.0.> 152, *.*.0 30, app.> 5), so the
        // result is merged with sort + dedup.
        ("many", "app.0.0", 772),
        // A cold service and event: out.len() = 22 (app.57.* 13, app.> 5,
        // app.57.> 3, *.*.83 1; no literal app.57.83).
        ("few", "app.57.83", 22),
        // Another namespace: out.len() = 0, but the walk still probes the `*.*`
        // branch before missing.
        ("none", "metrics.host1.cpu", 0),
    ];

    let mut g = c.benchmark_group("matcher/10k_subs");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(CLIENTS as usize);
    for (name, t, fanout) in cases {
        let t = topic(t);
        idx.matches(&t, &mut out);
        assert_eq!(
            out.len(),
            fanout,
            "fan-out of {t} changed; update the comment"
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                idx.matches(black_box(&t), &mut out);
                out.len()
            })
        });
    }
    g.finish();
}

fn churn(c: &mut Criterion) {
    let mut idx = build_index();
    // A newly attached client: its key is above every existing one.
    let key = CLIENTS;
    let cases = [
        // Joins app.0.*, which already holds 404 keys: no trie nodes created,
        // one binary search and an append (then a removal) in its key list.
        ("existing_node", pattern("app.0.*")),
        // A fresh path: creates three nodes, then prunes them again.
        ("new_path", pattern("room.1234.>")),
    ];

    let mut g = c.benchmark_group("matcher/churn_10k");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(3));
    for (name, p) in &cases {
        let nodes = idx.node_count();
        g.bench_function(*name, |b| {
            b.iter(|| {
                let added = idx.insert(black_box(p), key);
                let removed = idx.remove(black_box(p), key);
                added & removed
            })
        });
        assert_eq!(idx.len(), CLIENTS as usize);
        assert_eq!(idx.node_count(), nodes);
    }
    g.finish();
}

criterion_group!(benches, matches, churn);
criterion_main!(benches);
