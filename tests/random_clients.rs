//! A storm of random input against a live broker: several clients at once
//! write random bytes and random HELLOs to `hello`, and random command lines
//! (valid ones mixed with garbage and lines over `--max-line`) to their
//! `send`; some say `BYE`, others vanish with the process their `pid=` names.
//! Afterwards the broker must be alive, serve a well-behaved client exactly,
//! and be back to its idle client count and (near) its idle memory.
//!
//! The storm is seeded: the seed is printed, and `FIFOBUS_RANDOM_SEED=N`
//! replays the same choices (the interleaving of the threads still varies).
//! It is bounded by a count of operations and by wall time, whichever comes
//! first, and every wait in it has a deadline, so a loaded machine makes it
//! do less, not take much longer.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fifobus::client::{Client, ConnectOptions};
use fifobus::protocol::Reply;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};

/// Storm threads; with the broker's own threads, more than the 2 cores CI has.
const THREADS: u64 = 4;
/// Operations (a burst of garbage, a HELLO, a client's life) per thread:
/// what normally ends the storm, after 5 to 8 s here.
const OPS_PER_THREAD: u64 = 100;
/// How long the storm runs at most, however slow the machine: a HELLO that
/// another thread's fragment spoiled costs its thread a full [`OP_TIMEOUT`],
/// so a loaded machine would otherwise end the storm with little done.
const STORM: Duration = Duration::from_secs(20);
/// The broker's `--max-line`: small, so that lines beyond it are cheap to send.
const MAX_LINE: usize = 4096;
/// Longest any single wait in the storm may take.
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// What one storm did, summed over its threads.
#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    /// Lines and HELLOs written: the unit of the leak bound below.
    lines: AtomicU64,
    garbage_bytes: AtomicU64,
    hellos: AtomicU64,
    welcomes: AtomicU64,
    refusals: AtomicU64,
    sessions: AtomicU64,
    vanished: AtomicU64,
}

impl Tally {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    fn summary(&self) -> String {
        format!(
            "{} ops, {} lines, {} garbage bytes on hello, {} raw HELLOs ({} welcomed, {} refused), {} sessions, {} vanished without BYE",
            Self::get(&self.ops),
            Self::get(&self.lines),
            Self::get(&self.garbage_bytes),
            Self::get(&self.hellos),
            Self::get(&self.welcomes),
            Self::get(&self.refusals),
            Self::get(&self.sessions),
            Self::get(&self.vanished),
        )
    }
}

/// The seed: `FIFOBUS_RANDOM_SEED`, else the clock.
fn seed() -> u64 {
    match std::env::var("FIFOBUS_RANDOM_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("FIFOBUS_RANDOM_SEED={s:?} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

fn rng(seed: u64, stream: u64) -> TestRng {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..].copy_from_slice(&(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 1).to_le_bytes());
    TestRng::from_seed(RngAlgorithm::XorShift, &bytes)
}

/// A process whose pid a client names in `pid=`: killed and reaped on drop,
/// which is how such a client vanishes without `BYE`.
struct Mortal(Child);

impl Mortal {
    fn spawn() -> Mortal {
        Mortal(
            Command::new("sleep")
                .arg("60")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn sleep"),
        )
    }
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Mortal {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn set_nonblocking(f: &impl AsFd) {
    let fd = f.as_fd().as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
}

/// Writes as much of `data` as the pipe takes before `deadline`; returns
/// false when the reader has gone (EPIPE) or the deadline passed.
fn write_until(f: &mut File, mut data: &[u8], deadline: Instant) -> bool {
    while !data.is_empty() {
        match f.write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLOUT)];
                let ms = left.as_millis().min(100) as u16;
                let _ = poll(&mut fds, PollTimeout::from(ms));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads whatever is there without waiting; false at EOF or error.
fn drain(f: &mut File) -> bool {
    let mut buf = [0u8; 65536];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Reads one line from a non-blocking `f` before `deadline`.
fn read_line_until(f: &mut File, deadline: Instant) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match f.read(&mut byte) {
            Ok(0) => {
                // No writer (yet, or any more): wait for one, within the deadline.
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::yield_now();
                let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(10u16));
            }
            Ok(_) if byte[0] == b'\n' => return Some(line),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
                let _ = poll(
                    &mut fds,
                    PollTimeout::from(left.as_millis().min(100) as u16),
                );
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

fn pick<T: Copy>(rng: &mut TestRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

fn random_bytes(rng: &mut TestRng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.random::<u8>()).collect()
}

/// Bytes without `\n`, so that they stay inside one line.
fn random_word(rng: &mut TestRng, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| match rng.random::<u8>() {
            b'\n' => b'x',
            b => b,
        })
        .collect()
}

/// Topics and patterns of the storm: never under `check`, the well-behaved
/// client's topic, so that nothing of the storm can reach it.
const TOPICS: &[&str] = &["a", "b", "a.b", "a.c", "b.c.d", "x.y", "t"];
const PATTERNS: &[&str] = &["a", "a.*", "a.>", ">", "*.c", "b.c.*", "x.y", "t", "*"];
const BAD_PATTERNS: &[&[u8]] = &[b"a..b", b"a.>.b", b"", b"\xff", b"a b", b".a", b"a.", b"**"];

/// One random command line, newline included (or sometimes CRLF).
fn random_command(rng: &mut TestRng) -> Vec<u8> {
    let mut line = match rng.random_range(0..100u32) {
        0..=14 => format!("SUB {}", pick(rng, PATTERNS)).into_bytes(),
        15..=22 => format!("UNSUB {}", pick(rng, PATTERNS)).into_bytes(),
        23..=52 => {
            let mut l = format!("PUB {} ", pick(rng, TOPICS)).into_bytes();
            let n = rng.random_range(0..200);
            l.extend(random_word(rng, n));
            l
        }
        53..=60 => {
            let mut l = b"PING ".to_vec();
            let n = rng.random_range(0..20);
            l.extend(random_word(rng, n));
            l
        }
        61..=62 => b"BYE".to_vec(),
        63..=70 => {
            let kws: [&[u8]; 3] = [b"SUB ", b"UNSUB ", b"PUB "];
            let kw = pick(rng, &kws);
            [kw, pick(rng, BAD_PATTERNS)].concat()
        }
        71..=85 => {
            let n = rng.random_range(0..100);
            random_word(rng, n)
        }
        86..=92 => {
            // Beyond --max-line: refused with line-too-long, and skipped.
            let n = rng.random_range(MAX_LINE + 1..3 * MAX_LINE);
            let mut l = b"PUB a ".to_vec();
            l.extend(std::iter::repeat_n(b'y', n));
            l
        }
        93..=95 => Vec::new(),
        _ => {
            let kws: [&[u8]; 6] = [b"pub", b"Sub", b"ping", b"bye now", b"PUB", b"SUB a b"];
            pick(rng, &kws).to_vec()
        }
    };
    if rng.random_bool(0.1) {
        line.push(b'\r');
    }
    line.push(b'\n');
    line
}

/// Shared by a storm's threads.
struct Storm {
    hello: PathBuf,
    /// Where reply FIFOs and other reply targets are made.
    scratch: PathBuf,
    deadline: Instant,
    tally: Tally,
}

impl Storm {
    fn open_hello(&self) -> Option<File> {
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.hello)
            .ok()
    }

    /// Random bytes on `hello`: short and huge, binary and text-like, with
    /// and without a final newline.
    fn garbage(&self, rng: &mut TestRng) {
        let mut data = match rng.random_range(0..100u32) {
            0..=39 => {
                let n = rng.random_range(0..200);
                random_bytes(rng, n)
            }
            40..=59 => {
                let mut l = b"HELLO ".to_vec();
                let n = rng.random_range(0..100);
                l.extend(random_word(rng, n));
                l
            }
            60..=79 => {
                // Over PIPE_BUF: refused as too long (and not atomic).
                let n = rng.random_range(4096..20_000);
                random_bytes(rng, n)
            }
            _ => {
                let n = rng.random_range(0..40);
                let mut l = random_word(rng, n);
                l.push(b' ');
                l
            }
        };
        // Nine in ten end their line; the tenth leaves a fragment behind.
        if rng.random_bool(0.9) {
            data.push(b'\n');
        }
        self.write_hello(&data);
        Tally::add(&self.tally.garbage_bytes, data.len() as u64);
    }

    fn write_hello(&self, data: &[u8]) {
        if let Some(mut f) = self.open_hello() {
            write_until(&mut f, data, Instant::now() + OP_TIMEOUT);
        }
    }

    /// A HELLO line of random fields, written as clients write it: in one
    /// write. Those whose reply FIFO is read and which name a live pid may
    /// be welcomed: they then say `BYE` or vanish with their process.
    fn raw_hello(&self, rng: &mut TestRng, n: u64) {
        Tally::add(&self.tally.hellos, 1);
        Tally::add(&self.tally.lines, 1);
        let mortal = Mortal::spawn();
        let dead_pid = {
            let m = Mortal::spawn();
            let pid = m.pid();
            drop(m);
            pid
        };
        let path = self.scratch.join(format!("r{n}"));
        enum R {
            Read(File),
            Unread,
            Missing,
            Plain,
            Relative,
        }
        let reply = match rng.random_range(0..100u32) {
            0..=49 => {
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .unwrap();
                let f = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path)
                    .unwrap();
                R::Read(f)
            }
            50..=64 => {
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .unwrap();
                R::Unread
            }
            65..=79 => R::Missing,
            80..=89 => {
                fs::write(&path, b"").unwrap();
                R::Plain
            }
            _ => R::Relative,
        };
        let mut line = b"HELLO".to_vec();
        let mut fields: Vec<Vec<u8>> = Vec::new();
        match reply {
            R::Relative => fields.push(b"reply=relative/path".to_vec()),
            _ => fields.push([&b"reply="[..], path.as_os_str().as_bytes()].concat()),
        }
        // pid=: the live mortal (mostly, so that welcomed clients end), or
        // something refused. Without a live pid, a welcome gets BYE at once.
        let pid_field: Option<Vec<u8>> = match rng.random_range(0..100u32) {
            0..=69 => Some(format!("pid={}", mortal.pid()).into_bytes()),
            70..=74 => Some(format!("pid={dead_pid}").into_bytes()),
            75..=79 => {
                let bad: [&[u8]; 5] =
                    [b"pid=0", b"pid=-3", b"pid=abc", b"pid=99999999999", b"pid="];
                Some(pick(rng, &bad).to_vec())
            }
            _ => None,
        };
        let live_pid = pid_field.as_deref() == Some(format!("pid={}", mortal.pid()).as_bytes());
        fields.extend(pid_field);
        match rng.random_range(0..100u32) {
            0..=59 => fields.push(format!("name=storm-{n}").into_bytes()),
            60..=69 => {
                let n = rng.random_range(0..200);
                fields.push([&b"name="[..], &random_word(rng, n)].concat())
            }
            _ => {}
        }
        match rng.random_range(0..100u32) {
            0..=49 => {
                let k = rng.random_range(1..4);
                let subs: Vec<&str> = (0..k).map(|_| pick(rng, PATTERNS)).collect();
                fields.push(format!("sub={}", subs.join(",")).into_bytes());
            }
            50..=59 => fields.push([&b"sub="[..], pick(rng, BAD_PATTERNS)].concat()),
            60..=64 => fields.push(b"subs=a".to_vec()),
            65..=69 => fields.push(b"reply=/twice".to_vec()),
            _ => {}
        }
        // Fields in random order: reply= need not come first.
        for i in (1..fields.len()).rev() {
            fields.swap(i, rng.random_range(0..=i));
        }
        for f in &fields {
            line.push(b' ');
            line.extend_from_slice(f);
        }
        line.push(b'\n');
        self.write_hello(&line);

        if let R::Read(mut f) = reply {
            // The broker answers a HELLO it can read within its handshake
            // timeout; one glued to another writer's fragment gets no answer.
            let answer = read_line_until(&mut f, Instant::now() + OP_TIMEOUT);
            match answer.as_deref().map(Reply::parse) {
                Some(Reply::Welcome { dir, .. }) => {
                    Tally::add(&self.tally.welcomes, 1);
                    let send = dir.join("send");
                    if live_pid && rng.random_bool(0.5) {
                        Tally::add(&self.tally.vanished, 1);
                    } else if let Ok(mut s) = OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&send)
                    {
                        let mut cmds = Vec::new();
                        for _ in 0..rng.random_range(0..5) {
                            cmds.extend(random_command(rng));
                        }
                        cmds.extend_from_slice(b"BYE\n");
                        write_until(&mut s, &cmds, Instant::now() + OP_TIMEOUT);
                    }
                }
                Some(Reply::Err { .. }) => Tally::add(&self.tally.refusals, 1),
                _ => {}
            }
        }
        drop(mortal);
        let _ = fs::remove_file(&path);
    }

    /// A client's life through the library: connect (with or without the
    /// pid of a process that will die), random command lines in random
    /// writes, reading its `recv` now and then; then `BYE`, or vanish.
    fn session(&self, rng: &mut TestRng, bus_dir: &Path) {
        let mortal = rng.random_bool(0.6).then(Mortal::spawn);
        let subs = (0..rng.random_range(0..3))
            .map(|_| pattern(pick(rng, PATTERNS)))
            .collect();
        let opts = ConnectOptions {
            name: Some("storm".into()),
            pid: mortal.as_ref().map(Mortal::pid),
            subs,
        };
        // A HELLO glued to a fragment another thread left gets no answer.
        let Ok(client) = Client::connect(bus_dir, &opts, OP_TIMEOUT) else {
            return;
        };
        Tally::add(&self.tally.sessions, 1);
        let (mut send, mut recv) = client.into_files().unwrap();
        set_nonblocking(&send);
        set_nonblocking(&recv);
        let deadline = Instant::now() + OP_TIMEOUT;
        let mut alive = true;
        for _ in 0..rng.random_range(1..40) {
            let mut burst = Vec::new();
            for _ in 0..rng.random_range(1..8) {
                burst.extend(random_command(rng));
                Tally::add(&self.tally.lines, 1);
            }
            if rng.random_bool(0.05) {
                // A line cut in the middle, finished by the next write.
                let cut = rng.random_range(0..burst.len());
                alive = write_until(&mut send, &burst[..cut], deadline);
                burst.drain(..cut);
            }
            alive = alive && write_until(&mut send, &burst, deadline);
            if rng.random_bool(0.5) {
                alive = alive && drain(&mut recv);
            }
            if !alive || Instant::now() >= self.deadline {
                break;
            }
        }
        match mortal {
            Some(m) if rng.random_bool(0.5) => {
                Tally::add(&self.tally.vanished, 1);
                drop(m);
            }
            m => {
                write_until(&mut send, b"BYE\n", deadline);
                drop(m);
            }
        }
    }
}

/// Runs a storm for at most `time`, `ops` operations per thread.
fn storm(bus: &TempBus, seed: u64, time: Duration, ops: u64) -> Arc<Storm> {
    let scratch = bus.tmp.path().join(format!("storm-{seed}-{}", ops));
    fs::create_dir(&scratch).unwrap();
    let storm = Arc::new(Storm {
        hello: bus.dir.join("hello"),
        scratch,
        deadline: Instant::now() + time,
        tally: Tally::default(),
    });
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let storm = storm.clone();
            let bus_dir = bus.dir.clone();
            std::thread::spawn(move || {
                let mut rng = rng(seed, t);
                for n in 0..ops {
                    if Instant::now() >= storm.deadline {
                        break;
                    }
                    Tally::add(&storm.tally.ops, 1);
                    match rng.random_range(0..100u32) {
                        0..=29 => storm.garbage(&mut rng),
                        30..=59 => storm.raw_hello(&mut rng, t * 1_000_000 + n),
                        _ => storm.session(&mut rng, &bus_dir),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a storm thread panicked");
    }
    storm
}

fn vm_rss_kib(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Bytes written to a pipe and not yet read, seen from its write end.
fn unread_bytes(f: &File) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points
    // at `n`, alive for the call; the descriptor is open (borrowed from `f`).
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", io::Error::last_os_error());
    n
}

fn open_fds(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn metrics_clients(bus: &TempBus) -> Option<f64> {
    let url = fifobus::stats::metrics_url(&bus.dir).ok()?;
    fifobus::stats::scrape(&url, None).ok().map(|s| s.clients)
}

/// Waits (event-driven, bounded) until the broker has exactly `n` clients,
/// by its `clients/` directory and by `/metrics`.
fn wait_clients(bus: &TempBus, n: usize) -> bool {
    wait_for(&bus.clients_dir(), Duration::from_secs(30), || {
        bus.client_dirs().len() == n && metrics_clients(bus) == Some(n as f64)
    })
}

fn assert_alive(bus: &mut TempBus) {
    let status = bus.child.as_mut().unwrap().try_wait().unwrap();
    assert!(
        status.is_none(),
        "the broker died in the storm: {status:?}; log:\n{}",
        bus.log_text()
    );
}

/// A well-behaved client: everything it publishes to itself comes back, in
/// order, before its PONG.
fn well_behaved(bus: &TempBus) -> Client {
    let mut c = bus.connect("well-behaved", &["check.>"]);
    let lines = pub_lines((0..1000).map(|i| ("check.order", format!("m{i}"))));
    c.send_raw(&lines).unwrap();
    let got = barrier(&mut c);
    let want: Vec<String> = (0..1000).map(|i| format!("MSG check.order m{i}")).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "first lines: {:?}",
        &got[..got.len().min(5)]
    );
    assert_eq!(got, want);
    c
}

#[test]
fn a_storm_of_random_clients_leaves_the_broker_serving_and_idle() {
    raise_open_file_limit();
    let seed = seed();
    eprintln!("random storm seed {seed} (replay with FIFOBUS_RANDOM_SEED={seed})");
    let mut bus = TempBus::start_with(&[
        "--max-line",
        &MAX_LINE.to_string(),
        "--handshake-timeout",
        "1s",
    ]);

    // Warm-up: a smaller storm of the same kind, so that the broker's thread
    // pools and its allocator's arenas have grown to what storms need; what
    // is measured after is what a second storm leaves on top of the first.
    let warm = storm(&bus, seed ^ 0x5a5a, STORM / 2, OPS_PER_THREAD / 4);
    eprintln!("warm-up: {}", warm.tally.summary());
    assert!(
        wait_clients(&bus, 0),
        "warm-up clients never all ended: {:?}",
        bus.client_dirs()
    );
    drop(well_behaved(&bus).bye(T).unwrap());
    assert!(wait_clients(&bus, 0));
    let before = vm_rss_kib(bus.pid());
    let fds_before = open_fds(bus.pid());

    let started = Instant::now();
    let s = storm(&bus, seed, STORM, OPS_PER_THREAD);
    let took = started.elapsed();
    eprintln!("storm ({took:.1?}): {}", s.tally.summary());
    assert!(
        took < STORM + 3 * OP_TIMEOUT,
        "the storm overran its bound: {took:?}"
    );
    assert!(
        Tally::get(&s.tally.sessions) > 0 && Tally::get(&s.tally.welcomes) > 0,
        "the storm never got a client connected: {}",
        s.tally.summary()
    );

    assert_alive(&mut bus);
    // Sub-case: a HELLO fragment without its newline, left on hello just
    // before a real client says HELLO (the storm leaves such fragments at
    // random; this one makes it certain). Issue 9 item 5 says the broker
    // drops a fragment when it has drained the pipe, so the next client is
    // unaffected. Until that is done the fragment is glued to the
    // well-behaved client's HELLO, which then gets no answer and
    // `well_behaved` fails with "the broker did not answer".
    let mut f = s.open_hello().expect("open hello");
    assert!(write_until(
        &mut f,
        b"HELLO reply=/no/newline",
        Instant::now() + T
    ));
    // Item 5 is about a fragment left once the broker has drained the pipe
    // (one landing in the same read as the next HELLO cannot be told apart):
    // wait until it has read it (inotify sees the read, FIONREAD the rest).
    assert!(
        wait_for(&s.hello, T, || unread_bytes(&f) == 0),
        "the broker did not read hello within {T:?}"
    );
    drop(f);
    let good = well_behaved(&bus);
    assert!(
        wait_clients(&bus, 1),
        "random clients are left: {:?} (metrics: {:?}); log:\n{}",
        bus.client_dirs(),
        metrics_clients(&bus),
        bus.log_text()
    );
    assert_alive(&mut bus);

    let after = vm_rss_kib(bus.pid());
    // One client (the well-behaved one) holds its two FIFOs, both ends each.
    // The state writer may hold a temporary file for a moment (it writes
    // client files on its own schedule): wait, bounded, for the count to
    // settle rather than read it once.
    let fd_bound = fds_before + 4;
    let settle = Instant::now() + T;
    let mut fds_after = open_fds(bus.pid());
    while fds_after > fd_bound && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(10));
        fds_after = open_fds(bus.pid());
    }
    let lines = Tally::get(&s.tally.lines);
    eprintln!(
        "broker VmRSS: {before} KiB after warm-up, {after} KiB after the storm ({:+} KiB over {lines} lines); open files: {fds_before} then {fds_after}",
        after as i64 - before as i64
    );
    // The bound, 1 MiB + 256 bytes per line sent: after a warm-up storm of
    // the same kind, a second storm left 68 to 136 KiB more RSS here (5,000
    // to 12,000 lines; allocator retention, not growth), far under it. A leak
    // of 1 KiB per line would exceed it once the storm sent more than 1,366
    // lines, so the storm must have sent at least twice that (asserted, so
    // that a starved run fails rather than passing vacuously).
    assert!(
        lines > 2 * 1366,
        "the storm sent only {lines} lines, too few for the leak bound to catch 1 KiB per line: {}",
        s.tally.summary()
    );
    let bound = 1024 + lines / 4;
    assert!(
        after <= before + bound,
        "broker memory grew by {} KiB (bound {bound} KiB) over a storm of {lines} lines ({before} KiB before): a leak?",
        after - before,
    );
    assert!(
        fds_after <= fd_bound,
        "the broker holds {fds_after} files after the storm, {fds_before} before with no client: a descriptor leak?"
    );
    drop(good.bye(T).unwrap());
    assert!(wait_clients(&bus, 0));
}
