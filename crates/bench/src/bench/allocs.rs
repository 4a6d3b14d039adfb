//! `--only allocs`: allocations the broker makes per delivery (issue 14,
//! item 1). The broker runs in this process, on a tokio runtime of its own
//! whose threads are marked for the counting allocator
//! ([`crate::alloc_count`]); the clients are the same FIFO clients as in the
//! throughput scenarios, in unmarked threads, so only the broker's own
//! allocations count.
//!
//! In-process means the broker measured is the `fifobus` library this bench
//! was built with: `FIFOBUS_BENCH_BROKER` does not apply here.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fifobus::client::{Client, ConnectOptions};

use super::{write_lines, BenchError, Result, SCENARIO_LIMIT};
use crate::alloc_count::{self, Snapshot};

/// What one in-process 1 -> N run counted over its measured stream.
pub(super) struct Counted {
    pub messages: u64,
    pub deliveries: u64,
    pub warmup: u64,
    pub allocs: Snapshot,
    pub rate: f64,
}

/// Runs a broker in this process and streams `warmup` then `n` messages
/// from one publisher to `subscribers` subscribers of one topic, counting
/// the broker threads' allocations over the second stream only.
pub(super) fn one_to_n(subscribers: usize, warmup: u64, n: u64, payload: usize) -> Result<Counted> {
    let tmp = super::scratch_dir()?;
    let dir = tmp.path().join("bus");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-broker")
        .on_thread_start(alloc_count::mark_this_thread)
        .build()?;
    let mut config = fifobus::config::BrokerConfig::new(dir.clone());
    // As the out-of-process scenarios: metrics on (on a free port), and a
    // backlog that never drops, so a slow moment costs memory, not messages.
    config.metrics = fifobus::config::MetricsEndpoint::At(([127, 0, 0, 1], 0).into());
    config.backlog.messages = 100_000_000;
    config.backlog.bytes = 8 << 30;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let broker = runtime.spawn(fifobus::broker::run(config, async {
        let _ = stopped.await;
    }));
    let result = stream(&dir, subscribers, warmup, n, payload);
    let _ = stop.send(());
    let ended =
        runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), broker).await });
    runtime.shutdown_timeout(Duration::from_secs(5));
    match ended {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(BenchError::Failed(format!("the in-process broker: {e}"))),
        Ok(Err(e)) => {
            return Err(BenchError::Failed(format!(
                "the in-process broker panicked: {e}"
            )))
        }
        Err(_) => {
            return Err(BenchError::Failed(
                "the in-process broker did not stop within 10 s of its shutdown".into(),
            ))
        }
    }
    result
}

fn stream(dir: &Path, subscribers: usize, warmup: u64, n: u64, payload: usize) -> Result<Counted> {
    wait_for_hello(dir)?;
    let connect = |subs: &[&str]| -> Result<Client> {
        let opts = ConnectOptions {
            name: None,
            pid: None,
            subs: subs
                .iter()
                .map(|s| s.parse().expect("a valid pattern"))
                .collect(),
        };
        Ok(Client::connect(dir, &opts, Duration::from_secs(10))?)
    };
    let topics = vec!["bench.t0".to_owned()];
    let (tx, rx) = mpsc::channel();
    for _ in 0..subscribers {
        let (_, recv) = connect(&["bench.t0"])?.into_files()?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut recv = recv;
            for expected in [warmup, n] {
                let r = count_exactly(&mut recv, expected);
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
    }
    let (mut publisher, _) = connect(&[])?.into_files()?;
    let mut phase = |count: u64| -> Result<Duration> {
        let start = Instant::now();
        write_lines(&mut publisher, &topics, payload, count)?;
        for _ in 0..subscribers {
            match rx.recv_timeout(SCENARIO_LIMIT) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(BenchError::Failed(format!("a subscriber failed: {e}"))),
                Err(_) => {
                    return Err(BenchError::Failed(format!(
                        "deliveries incomplete after {SCENARIO_LIMIT:?}"
                    )))
                }
            }
        }
        Ok(start.elapsed())
    };
    // The warm-up grows the outboxes, pipes and buffers to their working
    // size; the publisher then waits until every subscriber has every
    // line, so no warm-up work spills into the measured stream.
    phase(warmup)?;
    let before = alloc_count::snapshot();
    let took = phase(n)?;
    let allocs = alloc_count::snapshot() - before;
    let deliveries = n * subscribers as u64;
    Ok(Counted {
        messages: n,
        deliveries,
        warmup,
        allocs,
        rate: deliveries as f64 / took.as_secs_f64(),
    })
}

/// Reads until `expected` more lines have come: the publisher writes no
/// more until every subscriber has reported, so no read crosses a phase.
fn count_exactly(r: &mut File, expected: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut seen = 0u64;
    while seen < expected {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF after {seen} of {expected} lines"),
            ));
        }
        seen += memchr::memchr_iter(b'\n', &buf[..k]).count() as u64;
    }
    if seen > expected {
        return Err(io::Error::other(format!(
            "{seen} lines where {expected} were published"
        )));
    }
    Ok(())
}

/// The broker announces itself by creating `hello`; until then a client
/// has nothing to open.
fn wait_for_hello(dir: &Path) -> Result<()> {
    let hello = dir.join("hello");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hello.exists() {
        if Instant::now() > deadline {
            return Err(BenchError::Failed(format!(
                "the in-process broker did not create {} within 10 s",
                hello.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}
