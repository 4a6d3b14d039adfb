//! The floods of issue 9, each measured the same way: the broker's peak RSS
//! (`VmHWM`) while it runs, and the time real handshakes
//! (`Client::connect`) take meanwhile, with default settings and with a
//! memory budget. Every flood is bounded: its threads stop when the
//! handshakes are done, or at [`FLOOD_LIMIT`] at the latest.

use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::*;

/// The longest any flood thread runs: longer than the handshakes may take
/// ([`CONNECTS_LIMIT`] and one more), so every timed handshake meets the flood.
const FLOOD_LIMIT: Duration = Duration::from_secs(40);
/// The longest the timed handshakes go on; those not attempted by then are
/// reported as such.
const CONNECTS_LIMIT: Duration = Duration::from_secs(30);
/// Real handshakes timed during each flood.
const HANDSHAKES: usize = 50;
/// How long one real handshake may take before it counts as failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// What one flood cost the broker.
pub(super) struct FloodFigures {
    pub peak_rss: u64,
    /// Handshake times in nanoseconds (empty for the burst).
    pub connects: Vec<u64>,
    pub failed: usize,
    /// What the flood did: how many HELLOs, SUBs or messages, drops.
    pub what: String,
}

/// A flood thread: runs until `stop`, returns what it did.
type Flooder = JoinHandle<io::Result<String>>;

/// A broker with the broker's own defaults (not [`Broker::start`]'s
/// raised backlog caps), plus `extra`.
fn plain_broker(extra: &[&str]) -> Result<Broker> {
    let mut opts = BusOptions::new(broker_program()?);
    opts.rust_log = std::env::var("FIFOBUS_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    opts.log_to_file = false;
    opts.graceful_stop = Some(Duration::from_secs(5));
    opts.prefix = "fifobus-bench-";
    let bus = TempBus::try_start(opts, extra)
        .map_err(|e| BenchError::Failed(format!("the benchmark broker: {e}")))?;
    Ok(Broker { bus })
}

fn hello_line(reply: PathBuf, name: &str) -> Result<Vec<u8>> {
    fifobus::protocol::Hello {
        reply,
        name: Some(name.into()),
        pid: None,
        subs: Vec::new(),
        no_echo: false,
    }
    .encode()
    .map_err(|e| BenchError::Failed(format!("cannot encode a HELLO: {e}")))
}

fn should_stop(stop: &AtomicBool, start: Instant) -> bool {
    stop.load(Ordering::Relaxed) || start.elapsed() > FLOOD_LIMIT
}

/// Times [`HANDSHAKES`] real handshakes, one after another, while
/// `flooder` runs (after a second for the flood to build up); then stops
/// it. A handshake that fails or takes longer than [`HANDSHAKE_TIMEOUT`]
/// counts as failed, not as a time.
fn connects_during(
    broker: &Broker,
    flooder: Flooder,
    stop: &AtomicBool,
) -> Result<(Vec<u64>, usize, String)> {
    std::thread::sleep(Duration::from_secs(1));
    let (mut took, mut failed) = (Vec::with_capacity(HANDSHAKES), 0);
    let began = Instant::now();
    for _ in 0..HANDSHAKES {
        if began.elapsed() > CONNECTS_LIMIT {
            break;
        }
        let start = Instant::now();
        match Client::connect(broker.dir(), &ConnectOptions::default(), HANDSHAKE_TIMEOUT) {
            Ok(c) => {
                took.push(start.elapsed().as_nanos() as u64);
                // Say BYE so the timed clients do not pile up in the table.
                let _ = c.bye(Duration::from_secs(1));
            }
            Err(_) => failed += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    let what = flooder
        .join()
        .map_err(|_| BenchError::Failed("the flood thread panicked".into()))??;
    Ok((took, failed, what))
}

/// Clients that vanish: each writes a pid-less HELLO, reads its WELCOME on
/// a reply FIFO held open for the whole flood, and never says BYE nor
/// opens its FIFOs, as fast as the broker answers.
fn vanishing_clients(broker: &Broker, tmp: &Path, stop: Arc<AtomicBool>) -> Result<Flooder> {
    let reply = tmp.join("vanish");
    mkfifo(&reply)?;
    let mut answers = open_rw(&reply)?;
    let line = hello_line(reply, "vanish")?;
    let hello = broker.dir().join("hello");
    Ok(std::thread::spawn(move || -> io::Result<String> {
        let mut h = std::fs::OpenOptions::new().write(true).open(hello)?;
        let start = Instant::now();
        let (mut welcomed, mut refused, mut unanswered) = (0u64, 0u64, 0u64);
        let mut buf = vec![0u8; 4096];
        let mut lines = Lines::default();
        while !should_stop(&stop, start) {
            h.write_all(&line)?;
            let mut answered = false;
            while !answered {
                let mut fds = [PollFd::new(answers.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::from(2000u16)).map_err(io::Error::from)? == 0 {
                    unanswered += 1;
                    break;
                }
                let k = answers.read(&mut buf)?;
                lines.feed(&buf[..k], |l| {
                    answered = true;
                    match Reply::parse(l) {
                        Reply::Welcome { .. } => welcomed += 1,
                        _ => refused += 1,
                    }
                });
            }
        }
        Ok(format!(
            "{welcomed} welcomed, {refused} refused, {unanswered} unanswered in {:.1} s",
            start.elapsed().as_secs_f64()
        ))
    }))
}

/// HELLO fragments: a HELLO without its newline, written again and again.
fn hello_fragments(broker: &Broker, stop: Arc<AtomicBool>) -> Result<Flooder> {
    let mut fragment = hello_line(PathBuf::from("/x"), "frag")?;
    fragment.pop();
    let hello = broker.dir().join("hello");
    Ok(std::thread::spawn(move || -> io::Result<String> {
        let mut h = std::fs::OpenOptions::new().write(true).open(hello)?;
        let start = Instant::now();
        let mut written = 0u64;
        while !should_stop(&stop, start) {
            h.write_all(&fragment)?;
            written += 1;
        }
        Ok(format!(
            "{written} fragments in {:.1} s",
            start.elapsed().as_secs_f64()
        ))
    }))
}

/// 20 clients, each subscribing `per_client` distinct patterns, then
/// unsubscribing them, round after round.
fn subscription_flood(
    broker: &Broker,
    per_client: usize,
    stop: Arc<AtomicBool>,
) -> Result<Flooder> {
    let clients: Vec<Client> = (0..20)
        .map(|_| broker.connect(&[]))
        .collect::<Result<_>>()?;
    let encode = |sub: bool, c: usize| -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for i in 0..per_client {
            let p: fifobus::topic::Pattern = format!("flood.{c}.{i}.>")
                .parse()
                .map_err(|e| BenchError::Failed(format!("{e}")))?;
            let cmd = if sub {
                fifobus::protocol::Command::Sub(p)
            } else {
                fifobus::protocol::Command::Unsub(p)
            };
            cmd.encode(&mut out)
                .map_err(|e| BenchError::Failed(format!("cannot encode SUB: {e}")))?;
        }
        Ok(out)
    };
    let work: Vec<(Client, Vec<u8>, Vec<u8>)> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| Ok((c, encode(true, i)?, encode(false, i)?)))
        .collect::<Result<_>>()?;
    Ok(std::thread::spawn(move || -> io::Result<String> {
        let start = Instant::now();
        let threads: Vec<_> = work
            .into_iter()
            .map(|(mut c, subs, unsubs)| {
                let stop = stop.clone();
                std::thread::spawn(move || -> io::Result<(u64, usize)> {
                    let (mut rounds, mut refused) = (0u64, 0usize);
                    while !should_stop(&stop, start) {
                        c.send_raw(&subs)?;
                        let lines = c
                            .ping("subs", Duration::from_secs(30))
                            .map_err(io::Error::other)?;
                        refused += lines
                            .iter()
                            .filter(|l| matches!(Reply::parse(l), Reply::Err { .. }))
                            .count();
                        c.send_raw(&unsubs)?;
                        rounds += 1;
                    }
                    Ok((rounds, refused))
                })
            })
            .collect();
        let (mut rounds, mut refused) = (0, 0);
        for t in threads {
            let (r, e) = t
                .join()
                .map_err(|_| io::Error::other("a SUB thread panicked"))??;
            rounds += r;
            refused += e;
        }
        Ok(format!(
            "{rounds} rounds of {per_client} SUB + {per_client} UNSUB by 20 clients in {:.1} s, {refused} refused",
            start.elapsed().as_secs_f64()
        ))
    }))
}

/// One flood with handshakes timed meanwhile.
pub(super) fn flood(extra: &[&str], kind: &str) -> Result<FloodFigures> {
    let mut args = extra.to_vec();
    if kind == "vanishing" {
        args.extend(["--max-clients", "200"]);
    }
    let broker = plain_broker(&args)?;
    let tmp = scratch_dir()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = match kind {
        "vanishing" => vanishing_clients(&broker, tmp.path(), stop.clone())?,
        "fragments" => hello_fragments(&broker, stop.clone())?,
        "subscriptions" => subscription_flood(&broker, 10_000, stop.clone())?,
        other => return Err(BenchError::Failed(format!("no flood named {other}"))),
    };
    let (connects, failed, what) = connects_during(&broker, flooder, &stop)?;
    let peak_rss = status_kib(broker.pid(), "VmHWM:")? * 1024;
    Ok(FloodFigures {
        peak_rss,
        connects,
        failed,
        what,
    })
}

/// The 10 → 1 burst: 10 publishers send `per_publisher` 64-byte messages
/// each at once to one subscriber that reads as fast as it can.
pub(super) fn burst(extra: &[&str], per_publisher: u64) -> Result<FloodFigures> {
    let broker = plain_broker(extra)?;
    let subs = ["burst".to_owned()];
    let reader = broker.connect(&subs)?;
    let publishers: Vec<Client> = (0..10)
        .map(|_| broker.connect(&[]))
        .collect::<Result<_>>()?;
    let total = per_publisher * 10;
    let reading = std::thread::spawn(move || {
        let mut reader = reader;
        let (mut got, mut dropped) = (0u64, 0u64);
        while got + dropped < total {
            match reader.read_line(Some(Duration::from_secs(10))) {
                Ok(Some(line)) => match Reply::parse(&line) {
                    Reply::Msg { .. } => got += 1,
                    Reply::Dropped(n) => dropped += n,
                    _ => {}
                },
                _ => break,
            }
        }
        (got, dropped)
    });
    let start = Instant::now();
    let writers: Vec<_> = publishers
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || -> io::Result<()> {
                let (mut send, _recv) = c.into_files()?;
                write_lines(&mut send, &["burst".to_owned()], 64, per_publisher)
            })
        })
        .collect();
    for w in writers {
        w.join()
            .map_err(|_| BenchError::Failed("a publisher panicked".into()))??;
    }
    let (got, dropped) = reading
        .join()
        .map_err(|_| BenchError::Failed("the reader panicked".into()))?;
    let peak_rss = status_kib(broker.pid(), "VmHWM:")? * 1024;
    Ok(FloodFigures {
        peak_rss,
        connects: Vec::new(),
        failed: 0,
        what: format!(
            "{got} of {total} delivered, {dropped} reported DROPPED, in {:.1} s",
            start.elapsed().as_secs_f64()
        ),
    })
}
