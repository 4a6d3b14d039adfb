//! `fifobus-bridge --measure --nats URL`: the figures of docs/scale-out.md,
//! measured in one run on one machine against one nats-server:
//!
//! - direct: an async-nats publisher to an async-nats subscriber;
//! - bridged: a fifobus client on bus A -> bridge A -> NATS -> bridge B ->
//!   a fifobus client on bus B (two brokers, the `fifobus` next to this
//!   program, and two bridges, this program, all started here).
//!
//! Each path is measured twice: throughput (COUNT messages as fast as the
//! publisher can, timed from the first send to the last arrival) and
//! latency (1,000 messages one at a time, each sent once the previous one
//! arrived; the one-way times' median and 99th percentile).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use fifobus::client::{Client, ConnectOptions};
use futures_util::StreamExt;

const LATENCY_SAMPLES: usize = 1000;
const T: Duration = Duration::from_secs(30);

struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

fn payload(size: usize, i: usize) -> Vec<u8> {
    let mut p = format!("{i} ").into_bytes();
    p.resize(size.max(p.len()), b'x');
    p
}

fn percentile(mut v: Vec<Duration>, q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

pub fn run(nats: &str, count: usize, size: usize) -> ExitCode {
    let direct = match direct(nats, count, size) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fifobus-bridge --measure: direct NATS: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bridged = match bridged(nats, count, size) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fifobus-bridge --measure: bridged: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{count} messages of {size} bytes; latency: {LATENCY_SAMPLES} messages one at a time");
    println!("| path | msg/s | latency p50 | latency p99 |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, f) in [
        ("direct NATS client (async-nats pub -> sub)", direct),
        ("bus A -> bridge -> NATS -> bridge -> bus B", bridged),
    ] {
        println!(
            "| {name} | {:.0} | {:.0} µs | {:.0} µs |",
            f.rate,
            f.p50.as_secs_f64() * 1e6,
            f.p99.as_secs_f64() * 1e6
        );
    }
    ExitCode::SUCCESS
}

fn direct(url: &str, count: usize, size: usize) -> Result<Figures, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let publisher = async_nats::connect(url).await.map_err(|x| e(&x))?;
        let subscriber = async_nats::ConnectOptions::new()
            .subscription_capacity(count + 16)
            .connect(url)
            .await
            .map_err(|x| e(&x))?;
        let mut sub = subscriber
            .subscribe("measure.direct")
            .await
            .map_err(|x| e(&x))?;
        subscriber.flush().await.map_err(|x| e(&x))?;
        let start = Instant::now();
        for i in 0..count {
            publisher
                .publish("measure.direct", payload(size, i).into())
                .await
                .map_err(|x| e(&x))?;
        }
        publisher.flush().await.map_err(|x| e(&x))?;
        for _ in 0..count {
            tokio::time::timeout(T, sub.next())
                .await
                .map_err(|_| "no message within 30 s".to_owned())?;
        }
        let rate = count as f64 / start.elapsed().as_secs_f64();
        let mut lat = Vec::with_capacity(LATENCY_SAMPLES);
        for i in 0..LATENCY_SAMPLES {
            let sent = Instant::now();
            publisher
                .publish("measure.direct", payload(size, i).into())
                .await
                .map_err(|x| e(&x))?;
            publisher.flush().await.map_err(|x| e(&x))?;
            tokio::time::timeout(T, sub.next())
                .await
                .map_err(|_| "no message within 30 s".to_owned())?;
            lat.push(sent.elapsed());
        }
        Ok(Figures {
            rate,
            p50: percentile(lat.clone(), 0.5),
            p99: percentile(lat, 0.99),
        })
    })
}

/// Kills and reaps its children when dropped.
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn beside(name: &str) -> Result<PathBuf, String> {
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join(name)))
        .filter(|p| p.is_file())
        .ok_or_else(|| format!("{name} not found next to this program; build it: cargo build --release -p fifobus -p fifobus-bridge"))
}

/// Starts a program with stderr piped, and returns once a stderr line
/// contains `ready`.
fn start(cmd: &mut Command, ready: &str, kids: &mut Kids) -> Result<(), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let err = child.stderr.take().expect("piped");
    kids.0.push(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = ready.to_owned();
    std::thread::spawn(move || {
        let mut said = false;
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if !said && line.contains(&ready) {
                let _ = tx.send(());
                said = true;
            }
        }
    });
    rx.recv_timeout(T)
        .map_err(|_| format!("{cmd:?} did not say it is ready within {T:?}"))
}

fn serve(broker: &Path, dir: &Path, kids: &mut Kids) -> Result<(), String> {
    let child = Command::new(broker)
        .args(["serve", "--metrics-addr", "off", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", broker.display()))?;
    kids.0.push(child);
    // `hello` is published last: then the broker serves.
    let deadline = Instant::now() + T;
    while !dir.join("hello").exists() {
        if Instant::now() > deadline {
            return Err(format!("no broker on {} within {T:?}", dir.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn bridged(url: &str, count: usize, size: usize) -> Result<Figures, String> {
    let broker = beside("fifobus")?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let tmp = tempdir()?;
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    let mut kids = Kids(Vec::new());
    serve(&broker, &a, &mut kids)?;
    serve(&broker, &b, &mut kids)?;
    let buffer = (count + 16).to_string();
    for (dir, way, id) in [(&a, "--export", "measure-a"), (&b, "--import", "measure-b")] {
        start(
            Command::new(&me)
                .arg("--dir")
                .arg(dir)
                .args([
                    "--nats",
                    url,
                    way,
                    "m.>",
                    "--bus-id",
                    id,
                    "--metrics",
                    "off",
                ])
                .args([
                    "--buffer",
                    &buffer,
                    "--buffer-bytes",
                    &(count * (size + 64) + 1024).to_string(),
                ]),
            "bus: connected",
            &mut kids,
        )?;
    }
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut publisher = Client::connect(&a, &ConnectOptions::default(), T).map_err(|x| e(&x))?;
    let mut subscriber = Client::connect(
        &b,
        &ConnectOptions {
            subs: vec!["m.>".parse().map_err(|x| e(&x))?],
            ..ConnectOptions::default()
        },
        T,
    )
    .map_err(|x| e(&x))?;
    let topic: fifobus::topic::Topic = "m.x".parse().map_err(|x| e(&x))?;
    // Warm up: until one message makes it through both bridges.
    let deadline = Instant::now() + T;
    loop {
        publisher.publish(&topic, b"warm-up").map_err(|x| e(&x))?;
        match subscriber.read_line(Some(Duration::from_millis(200))) {
            Ok(Some(_)) => break,
            _ if Instant::now() < deadline => continue,
            _ => return Err("nothing went through the bridges within 30 s".into()),
        }
    }
    // Drain the other warm-ups.
    while let Ok(Some(_)) = subscriber.read_line(Some(Duration::from_millis(500))) {}
    let reader = std::thread::spawn(move || -> Result<(Instant, Client), String> {
        for _ in 0..count {
            subscriber
                .read_line(Some(T))
                .map_err(|x| x.to_string())?
                .ok_or("the broker closed")?;
        }
        Ok((Instant::now(), subscriber))
    });
    let start = Instant::now();
    for i in 0..count {
        publisher
            .publish(&topic, &payload(size, i))
            .map_err(|x| e(&x))?;
    }
    let (end, mut subscriber) = reader.join().map_err(|_| "reader panicked")??;
    let rate = count as f64 / (end - start).as_secs_f64();
    let mut lat = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES {
        let sent = Instant::now();
        publisher
            .publish(&topic, &payload(size, i))
            .map_err(|x| e(&x))?;
        subscriber
            .read_line(Some(T))
            .map_err(|x| e(&x))?
            .ok_or("the broker closed")?;
        lat.push(sent.elapsed());
    }
    drop(kids);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(Figures {
        rate,
        p50: percentile(lat.clone(), 0.5),
        p99: percentile(lat, 0.99),
    })
}

fn tempdir() -> Result<PathBuf, String> {
    let base = std::env::temp_dir().join(format!("fifobus-bridge-measure-{}", std::process::id()));
    std::fs::create_dir(&base).map_err(|e| format!("cannot make {}: {e}", base.display()))?;
    Ok(base)
}
