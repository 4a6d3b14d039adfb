//! The publish side of the line protocol: split a read from a `send` FIFO
//! into lines, then parse each line into a `Command`.
//!
//! Run with `cargo bench --bench parser`. Throughput is reported in lines.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fifobus::protocol::{Command, Line, LineSplitter};

/// The broker's default `--max-line` (1 MiB).
const MAX_LINE: usize = 1 << 20;

/// Size of the simulated read.
const READ_BYTES: usize = 256 * 1024;

/// A 64-byte payload of printable bytes.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// As many whole `PUB chat.room.42 <64-byte payload>\n` lines as fit in
/// [`READ_BYTES`] (82 bytes each: 3196 lines), and that line count.
fn pub_stream() -> (Vec<u8>, u64) {
    let mut line = b"PUB chat.room.42 ".to_vec();
    line.extend_from_slice(&payload(64));
    line.push(b'\n');
    let n = READ_BYTES / line.len();
    (line.repeat(n), n as u64)
}

fn split(c: &mut Criterion) {
    let (stream, lines) = pub_stream();
    let mut g = c.benchmark_group("parser/read_256k");
    g.throughput(Throughput::Elements(lines));

    // Only the splitting is timed: copying the read into a fresh BytesMut is
    // setup (the session reads straight into its buffer).
    g.bench_function("split", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&stream[..]),
            |buf| {
                let mut splitter = LineSplitter::new(MAX_LINE);
                let mut n = 0u64;
                while let Some(line) = splitter.next_line(buf) {
                    black_box(line);
                    n += 1;
                }
                debug_assert_eq!(n, lines);
                n
            },
            BatchSize::LargeInput,
        )
    });

    g.bench_function("split_and_parse", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&stream[..]),
            |buf| {
                let mut splitter = LineSplitter::new(MAX_LINE);
                let mut n = 0u64;
                while let Some(line) = splitter.next_line(buf) {
                    if let Line::Complete(bytes) = line {
                        let cmd = Command::parse(bytes);
                        debug_assert!(matches!(cmd, Ok(Some(Command::Pub { .. }))));
                        let _ = black_box(cmd);
                    }
                    n += 1;
                }
                debug_assert_eq!(n, lines);
                n
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn parse_one(c: &mut Criterion) {
    let mut big = b"PUB chat.room.42 ".to_vec();
    big.extend_from_slice(&payload(1024));
    // Lines as the splitter hands them out: shared `Bytes`, no newline.
    // Cloning one per iteration is a refcount bump, as in the session.
    let cases: [(&str, Bytes); 5] = [
        (
            "pub_short",
            Bytes::from(&b"PUB chat.room.42 hello world"[..]),
        ),
        ("pub_1k", Bytes::from(big)),
        ("sub_wildcards", Bytes::from(&b"SUB sensors.*.temp.>"[..])),
        ("ping", Bytes::from(&b"PING 42"[..])),
        // Unknown keyword: builds the ERR text, the costliest error path.
        ("invalid", Bytes::from(&b"PUBLISH chat.room.42 hi"[..])),
    ];

    let mut g = c.benchmark_group("parser/parse");
    g.throughput(Throughput::Elements(1));
    for (name, line) in &cases {
        let expect_ok = *name != "invalid";
        assert_eq!(Command::parse(line.clone()).is_ok(), expect_ok, "{name}");
        g.bench_function(*name, |b| {
            b.iter(|| Command::parse(black_box(line.clone())))
        });
    }
    g.finish();
}

criterion_group!(benches, split, parse_one);
criterion_main!(benches);
