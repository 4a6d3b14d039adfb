//! The scenarios: the broker measured against the bare FIFO ceiling, in the
//! same run, on the same machine.
//!
//! Absolute figures on a shared machine drift from run to run; a ratio to a
//! ceiling measured minutes apart does not drift much. So every broker
//! figure is printed beside what bare pipes do for the same work:
//! - throughput: a relay thread copying FIFO A to FIFO B in 64 KiB blocks,
//!   or a tee copying A to N FIFOs, or (100 topics) a relay sorting each
//!   block's lines by topic into each topic's FIFOs, with the same lines and
//!   line counts;
//! - latency: the path of a broker round trip (A → relay → B → relay → A,
//!   through four FIFOs), against A → broker → B → broker → A.
//!
//! The brokers are real `fifobus serve` processes, started by the shared
//! harness (`fifobus_testkit::TempBus`) on a temporary directory (on tmpfs
//! when `/dev/shm` exists, as `$XDG_RUNTIME_DIR` is), and the clients are
//! real FIFO clients (`fifobus::client`) in threads of this process. The
//! broker binary: `$FIFOBUS_BENCH_BROKER`, else the `fifobus` next to this
//! executable, else the one on `PATH` (see [`broker_program`]). Nothing here
//! is a test: nothing asserts on a time.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use fifobus::client::{Client, ConnectOptions};
use fifobus_testkit::{BusOptions, TempBus};

use fifobus::protocol::Reply;
use fifobus::topic::Topic;

use crate::wire::{encode_pub, parse_msg, pub_line_len};

mod allocs;
mod floods;
mod redis;

/// A topic the bench names itself.
fn topic(name: &str) -> Topic {
    name.parse().expect("the bench's topics are valid")
}

/// What to run, and how much of it.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub payload: usize,
    /// Messages published in the 1 → 1 scenario; the others scale from it.
    pub messages: u64,
    pub latency_messages: u64,
    /// Offered rate for the fixed-rate latency figures.
    pub rate: u64,
    pub idle_clients: usize,
    pub idle_seconds: u64,
    pub handshakes: usize,
    /// Real handshakes timed with and without a flood of unanswered HELLOs.
    pub flood_handshakes: usize,
    pub progress: bool,
    pub only: Option<String>,
    /// Bytes published in the memory flood (issue 9: 180 MB).
    pub flood_bytes: u64,
    /// Throughput figures are the median of this many runs.
    pub runs: usize,
}

impl BenchOptions {
    pub fn full() -> Self {
        BenchOptions {
            payload: 64,
            messages: 2_000_000,
            latency_messages: 20_000,
            rate: 10_000,
            idle_clients: 10_000,
            idle_seconds: 10,
            handshakes: 5_000,
            flood_handshakes: 200,
            progress: true,
            only: None,
            flood_bytes: 180_000_000,
            runs: 3,
        }
    }

    /// A smoke run (seconds, not minutes): same scenarios, small counts.
    pub fn quick() -> Self {
        BenchOptions {
            messages: 20_000,
            latency_messages: 500,
            idle_clients: 200,
            idle_seconds: 1,
            handshakes: 200,
            flood_bytes: 8_000_000,
            flood_handshakes: 20,
            runs: 1,
            ..Self::full()
        }
    }
}

/// A goal from the performance issue, checked against a measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// fifobus / ceiling must be at least this.
    RatioAtLeast(f64),
    /// fifobus / ceiling must be at most this.
    RatioAtMost(f64),
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(self, value: f64, ratio: Option<f64>) -> Option<bool> {
        match self {
            Target::RatioAtLeast(t) => ratio.map(|r| r >= t),
            Target::RatioAtMost(t) => ratio.map(|r| r <= t),
            Target::AtLeast(t) => Some(value >= t),
            Target::AtMost(t) => Some(value <= t),
        }
    }

    fn describe(self) -> String {
        match self {
            Target::RatioAtLeast(t) => format!("ratio >= {t}"),
            Target::RatioAtMost(t) => format!("ratio <= {t}"),
            Target::AtLeast(t) => format!(">= {}", human(t)),
            Target::AtMost(t) => format!("<= {}", human(t)),
        }
    }
}

/// One row of the results.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub scenario: String,
    pub unit: &'static str,
    pub fifobus: f64,
    pub ceiling: Option<f64>,
    pub target: Option<Target>,
    pub note: String,
}

impl Measurement {
    fn new(scenario: impl Into<String>, unit: &'static str, fifobus: f64) -> Self {
        Measurement {
            scenario: scenario.into(),
            unit,
            fifobus,
            ceiling: None,
            target: None,
            note: String::new(),
        }
    }

    fn ceiling(mut self, c: f64) -> Self {
        self.ceiling = Some(c);
        self
    }

    fn target(mut self, t: Target) -> Self {
        self.target = Some(t);
        self
    }

    fn note(mut self, n: impl Into<String>) -> Self {
        self.note = n.into();
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        self.ceiling.filter(|c| *c > 0.0).map(|c| self.fifobus / c)
    }

    pub fn met(&self) -> Option<bool> {
        self.target.and_then(|t| t.met(self.fifobus, self.ratio()))
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "scenario": self.scenario,
            "unit": self.unit,
            "fifobus": self.fifobus,
            "ceiling": self.ceiling,
            "ratio": self.ratio(),
            "target": self.target.map(Target::describe),
            "met": self.met(),
            "note": self.note,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("cannot connect a benchmark client: {0}")]
    Client(#[from] fifobus::client::ClientError),
    #[error("{0}")]
    Failed(String),
}

type Result<T> = std::result::Result<T, BenchError>;

/// Upper bound for any one scenario; a broker that stalls is reported, not waited on forever.
const SCENARIO_LIMIT: Duration = Duration::from_secs(120);

/// The scenario groups, as `--only` names them (a group runs when its name
/// contains the `--only` text; "floods", "allocs" and "redis" only when
/// named).
pub const GROUPS: [&str; 12] = [
    "1 -> 1",
    "1 -> 10",
    "10 -> 1",
    "100 topics",
    "latency",
    "saturation",
    "clients",
    "memory",
    "handshake flood",
    "floods",
    "allocs",
    "redis",
];

/// Whether `--only NAME` selects at least one group.
pub fn only_matches(name: &str) -> bool {
    GROUPS.iter().any(|g| g.contains(name))
}

/// Runs every scenario and returns the rows in order.
///
/// # Errors
/// When a broker cannot be started or a scenario cannot complete.
pub fn run(opts: &BenchOptions) -> Result<Vec<Measurement>> {
    // This process holds a FIFO per subscriber, as the broker holds two per
    // client: give it the same room the broker gives itself.
    fifobus_testkit::raise_open_file_limit();
    let steps: u64 = 12;
    let bar = progress(opts.progress, steps);
    let mut rows = Vec::new();
    let step = |name: &str| {
        bar.set_message(name.to_owned());
    };
    // --only NAME runs the scenarios whose group name contains NAME
    // ("1 -> 1", "1 -> 10", "10 -> 1", "100 topics", "latency",
    // "saturation", "clients", "handshake flood", "floods"), e.g. to profile one of them.
    let wanted = |group: &str| opts.only.as_deref().is_none_or(|o| group.contains(o));

    if wanted("1 -> 1") {
        step("1 -> 1");
        let runs = opts.runs;
        let relay = median_of(runs, || relay_ceiling(1, 1, opts.messages, opts.payload))?;
        let on = median_fan(runs, || fresh_fan(ON, 1, 1, opts.messages, opts.payload))?;
        let one = on.rate;
        rows.push(
            Measurement::new("1 -> 1, msg/s", "msg/s", one)
                .ceiling(relay)
                .target(Target::RatioAtLeast(0.5))
                .note("ceiling: bare relay FIFO A -> FIFO B in 64 KiB blocks"),
        );
        rows.push(cpu_row("1 -> 1", on));
        let off = median_fan(runs, || fresh_fan(OFF, 1, 1, opts.messages, opts.payload))?.rate;
        rows.push(
            Measurement::new("1 -> 1, metrics off, msg/s", "msg/s", off)
                .ceiling(relay)
                .note(format!("metrics on / off = {:.2}", one / off)),
        );
        bar.inc(1);
    }
    if wanted("1 -> 10") {
        step("1 -> 10");
        let n = (opts.messages / 5).max(1);
        let tee = median_of(opts.runs, || relay_ceiling(1, 10, n, opts.payload))?;
        let f = median_fan(opts.runs, || fresh_fan(ON, 1, 10, n, opts.payload))?;
        rows.push(
            Measurement::new("1 -> 10, deliveries/s", "deliveries/s", f.rate)
                .ceiling(tee)
                .target(Target::RatioAtLeast(0.30))
                .note("ceiling: bare tee FIFO A -> 10 FIFOs"),
        );
        // Issue 14: below what redis-server spends on this machine
        // (`--only redis` measures that in the same run).
        rows.push(cpu_row("1 -> 10", f).target(Target::AtMost(REDIS_CPU_NS)));
        bar.inc(1);
    }
    if wanted("10 -> 1") {
        step("10 -> 1");
        let n = (opts.messages / 10).max(1);
        let relay10 = median_of(opts.runs, || relay_ceiling(10, 1, n, opts.payload))?;
        let f = median_fan(opts.runs, || fresh_fan(ON, 10, 1, n, opts.payload))?;
        rows.push(
            Measurement::new("10 -> 1, msg/s", "msg/s", f.rate)
                .ceiling(relay10)
                .note("ceiling: 10 writers into one bare relay"),
        );
        rows.push(cpu_row("10 -> 1", f));
        bar.inc(1);
    }
    if wanted("100 topics") {
        step("100 topics x 100 subscribers");
        let broker = Broker::start(&["--metrics-addr", "127.0.0.1:0"])?;
        let per_topic = 100.min(client_budget().saturating_sub(10) / 100).max(1);
        let n = (opts.messages / 50).max(100);
        let f = fan(&broker, 1, 100 * per_topic, 100, n, opts.payload)?;
        let v = f.rate;
        drop(broker);
        let outputs = 100 * per_topic;
        let fair = topic_relay_ceiling(100, per_topic, n, opts.payload)?;
        let tee = relay_ceiling(1, per_topic, n, opts.payload)?;
        let mut m = Measurement::new(
            format!("100 topics x {per_topic} subscribers, deliveries/s"),
            "deliveries/s",
            v,
        )
        .ceiling(fair)
        .target(Target::RatioAtLeast(0.20))
        .note(format!(
            "ceiling: a bare relay sorting each 64 KiB block's lines by topic and writing each \
             topic's lines to its {per_topic} FIFOs, {outputs} FIFOs in all, one write per FIFO \
             per block: the broker's lines, pipes and writes. The ceiling before (next row): a \
             tee of whole blocks to {per_topic} FIFOs, about 100 times fewer writes and reader \
             wake-ups per delivery"
        ));
        if per_topic < 100 {
            m.note += &format!(
                "; {per_topic} subscribers per topic, not 100: the open-file limit allows {outputs} clients"
            );
        }
        rows.push(m);
        rows.push(
            Measurement::new(
                format!("100 topics x {per_topic}, against the old ceiling (tee to {per_topic})"),
                "deliveries/s",
                v,
            )
            .ceiling(tee)
            .note(format!(
                "the yardstick before issue 14's fair ceiling, kept for comparison: a bare tee of \
                 whole 64 KiB blocks to {per_topic} FIFOs (the same fan-out per message, over \
                 {per_topic} pipes rather than {outputs}); no target"
            )),
        );
        rows.push(cpu_row(&format!("100 topics x {per_topic}"), f));
        bar.inc(1);
    }
    if wanted("latency") {
        step("latency at a fixed rate");
        let (relay_rtt, broker_rtt) =
            rtt_pair(opts.latency_messages, Some(opts.rate), opts.payload)?;
        push_latency(
            &mut rows,
            &format!("round trip at {} msg/s", opts.rate),
            &broker_rtt,
            &relay_rtt,
            true,
        );
        // Issue 14: the low-load round trip moves with what else runs on
        // the machine, the bare relay's as much as the broker's (see
        // docs/performance.md, "Issue 14: measuring"); a run is read
        // beside the CPU pressure it ran under.
        if let Some(busy) = cpu_pressure() {
            rows.push(
                Measurement::new("CPU pressure during the latency runs, %", "%", busy).note(format!(
                    "/proc/pressure/cpu 'some avg10' after the runs: the share of the last 10 s in which \
                     a runnable task waited for a CPU; load average {}. Above a few % the round trips \
                     (relay and broker alike) wait for other processes and p50 grows several-fold",
                    load_average().unwrap_or_else(|| "unknown".into())
                )),
            );
        }
        bar.inc(1);
    }
    if wanted("saturation") {
        step("latency at saturation");
        let (relay_rtt, broker_rtt) = rtt_pair(opts.latency_messages * 5, None, opts.payload)?;
        push_latency(
            &mut rows,
            "round trip at saturation",
            &broker_rtt,
            &relay_rtt,
            false,
        );
        bar.inc(1);
    }
    if wanted("clients") {
        step("handshakes");
        let broker = Broker::start(&["--metrics-addr", "127.0.0.1:0"])?;
        let budget = client_budget();
        let hs = opts.handshakes.min(budget);
        if hs == 0 {
            return Err(BenchError::Failed(
                "the open-file limit leaves room for no client; raise it (ulimit -n)".into(),
            ));
        }
        let rss_empty = rss_bytes(broker.pid())?;
        let rate = handshakes(&broker, hs)?;
        rows.push(
            Measurement::new("handshakes/s", "handshakes/s", rate)
                .target(Target::AtLeast(5000.0))
                .note(format!(
                    "{hs} HELLOs written by 4 threads (one write each), answered on 4 reply FIFOs; bus directory on {}",
                    broker.fs_kind()
                )),
        );
        bar.inc(1);

        step("idle clients");
        let want = opts.idle_clients.min(budget);
        let before = rss_empty;
        let have = hs + connect_idle(&broker, want.saturating_sub(hs))?;
        let after = rss_bytes(broker.pid())?;
        let mut m = Measurement::new(
            format!("resident memory, {have} idle clients, MiB"),
            "MiB",
            after as f64 / (1 << 20) as f64,
        )
        .note(format!(
            "{:.1} KiB per client",
            (after.saturating_sub(before)) as f64 / 1024.0 / have.max(1) as f64
        ));
        if have >= 10_000 {
            m = m.target(Target::AtMost(256.0));
        } else if have < opts.idle_clients {
            let per = after.saturating_sub(before) as f64 / have.max(1) as f64;
            let projected = (before as f64 + per * 10_000.0) / (1 << 20) as f64;
            m.note += &format!(
                "; only {have} clients fit the open-file limit here (3 fds each); 10,000 would be about {projected:.0} MiB"
            );
        }
        rows.push(m);
        bar.inc(1);

        step("idle CPU");
        let cpu = idle_cpu(broker.pid(), Duration::from_secs(opts.idle_seconds))?;
        rows.push(
            Measurement::new(
                format!("CPU of an idle broker over {} s, s", opts.idle_seconds),
                "s",
                cpu,
            )
            .target(Target::AtMost(0.0))
            .note(format!(
                "with {have} idle clients connected; /proc/PID/stat, 10 ms resolution"
            )),
        );
        bar.inc(1);
    }
    if wanted("memory") {
        step("memory under a flood");
        for (label, extra) in [
            ("default settings", &[][..]),
            ("--max-memory 128MiB", &["--max-memory", "128MiB"][..]),
        ] {
            let f = memory_flood(extra, opts.flood_bytes)?;
            rows.push(
                Measurement::new(
                    format!("peak RSS, 10 stuck subscribers, {} MB flood, {label}, MiB", opts.flood_bytes / 1_000_000),
                    "MiB",
                    f.peak_rss as f64 / (1 << 20) as f64,
                )
                .note(format!(
                    "a reading subscriber got {} of {} in order{}; {} MiB before the flood; fifobus bench --only memory",
                    f.reader_got,
                    f.sent,
                    if f.reader_gap { ", with a DROPPED" } else { ", no DROPPED" },
                    f.rss_before >> 20,
                )),
            );
        }
        let (n, len) = (1000, 1000);
        let per = partial_line_cost(n, len)?;
        rows.push(
            Measurement::new(
                format!("resident memory per partial line of {len} bytes, bytes"),
                "B",
                per,
            )
            .note(format!(
                "{n} clients each leave a partial line in the broker; RSS delta / {n}"
            )),
        );
        let n = 100_000;
        let per = subscription_cost(n)?;
        rows.push(
            Measurement::new("resident memory per subscription, bytes", "B", per).note(format!(
                "one client subscribes {n} distinct patterns (--max-subscriptions raised); RSS delta / {n}"
            )),
        );
        bar.inc(1);
    }
    if wanted("handshake flood") {
        step("handshakes during a flood of unanswered HELLOs");
        let n = opts.flood_handshakes;
        let broker = Broker::start(ON)?;
        let quiet = timed_connects(&broker, n, false)?;
        drop(broker);
        let broker = Broker::start(ON)?;
        let flooded = timed_connects(&broker, n, true)?;
        drop(broker);
        for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
            let ms = |s: &[u64]| percentile(s, q) as f64 / 1e6;
            rows.push(
                Measurement::new(
                    format!("handshake during a HELLO flood, {name}, ms"),
                    "ms",
                    ms(&flooded),
                )
                .target(Target::AtMost(500.0))
                .note(format!(
                    "{n} Client::connect one after another; without the flood {:.2} ms; flood: one thread writing HELLOs naming {FLOOD_FIFOS} FIFOs nobody opens and {FLOOD_SHARED} naming one, round after round",
                    ms(&quiet)
                )),
            );
        }
        bar.inc(1);
    }
    // The floods take minutes (each runs up to 40 s, twice): only on request.
    if opts.only.is_some() && wanted("floods") {
        step("the floods of issue 9");
        for (label, extra) in [
            ("default settings", &[][..]),
            ("--max-memory 64MiB", &["--max-memory", "64MiB"][..]),
        ] {
            for (kind, name) in [
                ("vanishing", "vanishing pid-less clients, --max-clients 200"),
                ("fragments", "HELLO fragments without a newline"),
                ("subscriptions", "20 clients x 10,000 SUB"),
            ] {
                let f = floods::flood(extra, kind)?;
                let ms = |q| percentile(&f.connects, q) as f64 / 1e6;
                let (p50, p99) = if f.connects.is_empty() {
                    (f64::NAN, f64::NAN)
                } else {
                    (ms(0.5), ms(0.99))
                };
                rows.push(
                    Measurement::new(
                        format!("flood: {name}, {label}: peak RSS, MiB"),
                        "MiB",
                        f.peak_rss as f64 / (1 << 20) as f64,
                    )
                    .note(format!(
                        "handshake p50 {p50:.2} ms, p99 {p99:.2} ms, {} of 50 completed within 2 s, {} failed; flood: {}",
                        f.connects.len(),
                        f.failed,
                        f.what
                    )),
                );
            }
            let f = floods::burst(extra, 20_000)?;
            rows.push(
                Measurement::new(
                    format!("flood: 10 -> 1 burst of 64-byte messages, {label}: peak RSS, MiB"),
                    "MiB",
                    f.peak_rss as f64 / (1 << 20) as f64,
                )
                .note(f.what),
            );
        }
        bar.inc(1);
    }
    // Issue 14's measuring groups: only on request, like the floods.
    if opts.only.is_some() && wanted("allocs") {
        step("allocations per delivery, in-process broker");
        // 1 M messages in the full run, as issue 14 asks.
        let n = (opts.messages / 2).max(1000);
        let warmup = (n / 10).max(1000);
        let c = allocs::one_to_n(10, warmup, n, opts.payload)?;
        let note = format!(
            "in-process broker: the fifobus library this bench was built with (FIFOBUS_BENCH_BROKER does not apply); \
             1 -> 10, {} messages after a warm-up of {}; allocations (and reallocs) on the broker's tokio threads only; \
             {} bytes per delivery; {} deliveries/s",
            c.messages,
            c.warmup,
            human(c.allocs.bytes as f64 / c.deliveries as f64),
            human(c.rate),
        );
        rows.push(
            Measurement::new(
                "allocs: 1 -> 10, broker allocations per delivery",
                "allocs",
                c.allocs.allocations as f64 / c.deliveries as f64,
            )
            .target(Target::AtMost(0.01))
            .note(note.clone()),
        );
        rows.push(
            Measurement::new(
                "allocs: 1 -> 10, broker allocations per message",
                "allocs",
                c.allocs.allocations as f64 / c.messages as f64,
            )
            .note(note),
        );
        bar.inc(1);
    }
    if opts.only.is_some() && wanted("redis") {
        step("1 -> 10 through redis-server");
        match redis::RedisServer::start()? {
            None => rows.push(
                Measurement::new("redis: skipped, no redis-server on PATH", "-", f64::NAN).note(
                    "install it (Debian: apt-get install redis-server) to measure it beside fifobus",
                ),
            ),
            Some(server) => {
                let n = (opts.messages / 5).max(1);
                // Interleaved: a quiet or busy moment on this shared
                // machine falls on both, not on one.
                let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                for _ in 0..opts.runs.max(1) {
                    ours.push(fresh_fan(ON, 1, 10, n, opts.payload)?);
                    theirs.push(redis::one_to_n(&server, 10, n, opts.payload)?);
                }
                let ours = median_fan(ours.len(), || Ok(ours.remove(0)))?;
                let theirs = median_fan(theirs.len(), || Ok(theirs.remove(0)))?;
                let note = format!(
                    "ceiling column: redis-server (pid {}, unix socket, no persistence) in the same run; \
                     {n} messages of {} bytes, 1 publisher pipelining PUBLISH, 10 SUBSCRIBE readers (std RESP clients); \
                     fifobus: FIFO clients, metrics on",
                    server.pid(),
                    opts.payload
                );
                rows.push(
                    Measurement::new("redis: 1 -> 10, deliveries/s, vs redis-server", "deliveries/s", ours.rate)
                        .ceiling(theirs.rate)
                        .note(note.clone()),
                );
                rows.push(
                    Measurement::new(
                        "redis: 1 -> 10, server CPU per delivery, ns, vs redis-server",
                        "ns",
                        ours.cpu_ns,
                    )
                    .ceiling(theirs.cpu_ns)
                    .target(Target::RatioAtMost(1.0))
                    .note(note + "; utime + stime of each server process (/proc/PID/stat) over the stream, / deliveries"),
                );
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(rows)
}

/// What [`memory_flood`] saw.
struct Flood {
    peak_rss: u64,
    rss_before: u64,
    sent: u64,
    reader_got: u64,
    reader_gap: bool,
}

/// Ten subscribers that never read and one that reads as fast as it can,
/// under a flood of `bytes` of 1000-byte messages on their topic (the
/// scenario of issue 9): the broker's peak RSS (`VmHWM`), and whether the
/// reader got everything in order.
fn memory_flood(extra: &[&str], bytes: u64) -> Result<Flood> {
    const PAYLOAD: usize = 1000;
    let mut opts = BusOptions::new(broker_program()?);
    opts.rust_log = "warn".into();
    opts.log_to_file = false;
    opts.graceful_stop = Some(Duration::from_secs(5));
    opts.prefix = "fifobus-bench-";
    let bus = TempBus::try_start(opts, extra)
        .map_err(|e| BenchError::Failed(format!("the benchmark broker: {e}")))?;
    let broker = Broker { bus };
    let subs = ["flood".to_owned()];
    let _stuck: Vec<Client> = (0..10)
        .map(|_| broker.connect(&subs))
        .collect::<Result<_>>()?;
    let reader = broker.connect(&subs)?;
    let mut publisher = broker.connect(&[])?;
    let sent = bytes / PAYLOAD as u64;
    let rss_before = rss_bytes(broker.pid())?;
    let reading = std::thread::spawn(move || {
        let mut reader = reader;
        let (mut got, mut gap) = (0u64, false);
        while got < sent {
            match reader.read_line(Some(Duration::from_secs(10))) {
                Ok(Some(line)) => match Reply::parse(&line) {
                    Reply::Msg { .. } => got += 1,
                    Reply::Dropped(_) => gap = true,
                    _ => {}
                },
                _ => break,
            }
        }
        (got, gap)
    });
    let filler = "x".repeat(PAYLOAD);
    let chunk: Vec<u8> = {
        let mut out = Vec::new();
        for _ in 0..64 {
            encode_pub(&mut out, &topic("flood"), filler.as_bytes());
        }
        out
    };
    for _ in 0..sent / 64 {
        publisher.send_raw(&chunk)?;
    }
    publisher.ping("done", Duration::from_secs(60))?;
    let (reader_got, reader_gap) = reading
        .join()
        .map_err(|_| BenchError::Failed("the reading subscriber panicked".into()))?;
    let peak_rss = status_kib(broker.pid(), "VmHWM:")? * 1024;
    Ok(Flood {
        peak_rss,
        rss_before,
        sent: sent / 64 * 64,
        reader_got,
        reader_gap,
    })
}

/// Resident bytes per client holding a partial line of `len` bytes: `n`
/// clients each write one (no newline), and once the broker has read them
/// all (their `send` FIFOs empty) the RSS growth is divided by `n`.
fn partial_line_cost(n: usize, len: usize) -> Result<f64> {
    let broker = Broker::start(&[])?;
    let n = n.min(client_budget().saturating_sub(10));
    let mut clients: Vec<Client> = (0..n).map(|_| broker.connect(&[])).collect::<Result<_>>()?;
    let before = rss_bytes(broker.pid())?;
    // A PUB line without its newline: it stays in the broker, waiting.
    let mut partial = Vec::new();
    encode_pub(
        &mut partial,
        &topic("t"),
        "x".repeat(len.saturating_sub(7)).as_bytes(),
    );
    partial.pop();
    for c in &mut clients {
        c.send_raw(&partial)?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in &clients {
        let send = std::fs::OpenOptions::new()
            .write(true)
            .open(c.dir().join("send"))?;
        use std::os::fd::AsRawFd;
        while fifobus::fifo::unread_bytes(send.as_raw_fd())? > 0 {
            if Instant::now() > deadline {
                return Err(BenchError::Failed(
                    "the broker did not read the partial lines".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let after = rss_bytes(broker.pid())?;
    Ok(after.saturating_sub(before) as f64 / n.max(1) as f64)
}

/// What `n` subscriptions of one client cost the broker: RSS before and
/// after a client subscribes `n` distinct patterns, synchronised with a
/// PING/PONG barrier, divided by `n`.
fn subscription_cost(n: usize) -> Result<f64> {
    let limit = (n + 10).to_string();
    let broker = Broker::start(&["--max-subscriptions", &limit])?;
    let mut c = broker.connect(&[])?;
    c.ping("warm", Duration::from_secs(10))?;
    let before = rss_bytes(broker.pid())?;
    let mut out = Vec::new();
    for i in 0..n {
        let p: fifobus::topic::Pattern =
            format!("sub.cost.{i}.>").parse().expect("a valid pattern");
        fifobus::protocol::Command::Sub(p)
            .encode(&mut out)
            .map_err(|e| BenchError::Failed(format!("cannot encode SUB: {e}")))?;
        if out.len() > 60 * 1024 {
            c.send_raw(&out)?;
            out.clear();
        }
    }
    c.send_raw(&out)?;
    let refused = c
        .ping("subs-done", Duration::from_secs(60))?
        .iter()
        .filter(|l| matches!(Reply::parse(l), Reply::Err { .. }))
        .count();
    if refused > 0 {
        return Err(BenchError::Failed(format!(
            "{refused} of {n} subscriptions were refused"
        )));
    }
    let after = rss_bytes(broker.pid())?;
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

fn status_kib(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| BenchError::Failed(format!("no {field} in /proc/PID/status")))
}

/// Distinct reply FIFOs the flood names: more than the broker's table of
/// waiting handshakes holds.
const FLOOD_FIFOS: usize = 1500;
/// HELLOs per round naming one and the same reply FIFO.
const FLOOD_SHARED: usize = 200;

/// The time each of `n` real handshakes takes (`Client::connect`, one after
/// another), in nanoseconds; with `flood`, while a thread writes HELLOs
/// whose reply FIFOs nobody opens, as fast as the broker takes them.
fn timed_connects(broker: &Broker, n: usize, flood: bool) -> Result<Vec<u64>> {
    let tmp = scratch_dir()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = if flood {
        let hello_to = |reply: PathBuf| -> Result<Vec<u8>> {
            fifobus::protocol::Hello {
                reply,
                name: Some("flood".into()),
                pid: None,
                subs: Vec::new(),
                no_echo: false,
            }
            .encode()
            .map_err(|e| BenchError::Failed(format!("cannot encode a HELLO: {e}")))
        };
        let mut lines = Vec::new();
        let shared = tmp.path().join("shared");
        mkfifo(&shared)?;
        for _ in 0..FLOOD_SHARED {
            lines.push(hello_to(shared.clone())?);
        }
        for i in 0..FLOOD_FIFOS {
            let p = tmp.path().join(format!("r{i}"));
            mkfifo(&p)?;
            lines.push(hello_to(p)?);
        }
        let hello = broker.dir().join("hello");
        let stop = stop.clone();
        Some(std::thread::spawn(move || -> io::Result<u64> {
            let mut h = std::fs::OpenOptions::new().write(true).open(hello)?;
            let mut written = 0;
            while !stop.load(Ordering::Relaxed) {
                for l in &lines {
                    h.write_all(l)?;
                    written += 1;
                }
            }
            Ok(written)
        }))
    } else {
        None
    };
    if flood {
        // Let the flood fill the broker's table first.
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut took = Vec::with_capacity(n);
    let mut result = Ok(());
    for _ in 0..n {
        let start = Instant::now();
        match broker.connect(&[]) {
            Ok(c) => {
                took.push(start.elapsed().as_nanos() as u64);
                drop(c);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(f) = flooder {
        f.join()
            .map_err(|_| BenchError::Failed("the flood thread panicked".into()))??;
    }
    result.map(|()| took)
}

const ON: &[&str] = &["--metrics-addr", "127.0.0.1:0"];
const OFF: &[&str] = &["--metrics-addr", "off"];

/// redis-server's CPU per delivery in 1 -> 10 on this machine (issue 14's
/// profile, 64-byte payloads): the figure fifobus' broker is to beat.
/// `--only redis` measures it afresh beside fifobus'.
const REDIS_CPU_NS: f64 = 160.0;

/// The median of `runs` measurements: one run on a shared 2-core machine
/// can be off by a quarter; the median of three rarely is.
fn median_of(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut v = (0..runs.max(1))
        .map(|_| f())
        .collect::<Result<Vec<f64>>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// `fan` on a broker of its own, so repeated runs do not share clients.
fn fresh_fan(
    args: &[&str],
    publishers: usize,
    subscribers: usize,
    n: u64,
    payload: usize,
) -> Result<Fanned> {
    let broker = Broker::start(args)?;
    fan(&broker, publishers, subscribers, 1, n, payload)
}

/// The median rate and the median CPU per delivery of `runs` runs (each
/// its own median: the two need not come from the same run).
fn median_fan(runs: usize, mut f: impl FnMut() -> Result<Fanned>) -> Result<Fanned> {
    let v = (0..runs.max(1))
        .map(|_| f())
        .collect::<Result<Vec<Fanned>>>()?;
    let median = |mut x: Vec<f64>| {
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    Ok(Fanned {
        rate: median(v.iter().map(|r| r.rate).collect()),
        cpu_ns: median(v.iter().map(|r| r.cpu_ns).collect()),
    })
}

/// The row "`what`, broker CPU per delivery, ns" of a throughput scenario.
fn cpu_row(what: &str, f: Fanned) -> Measurement {
    Measurement::new(format!("{what}, broker CPU per delivery, ns"), "ns", f.cpu_ns).note(
        "utime + stime of the broker process (/proc/PID/stat, 10 ms ticks) over the measured stream, / deliveries",
    )
}

fn push_latency(
    rows: &mut Vec<Measurement>,
    what: &str,
    broker: &[u64],
    relay: &[u64],
    targets: bool,
) {
    for (q, label, target) in [
        (0.50, "p50", 2.0),
        (0.99, "p99", 5.0),
        (0.999, "p99.9", f64::NAN),
    ] {
        let b = percentile(broker, q) as f64 / 1000.0;
        let r = percentile(relay, q) as f64 / 1000.0;
        let mut m = Measurement::new(format!("{what}, {label}, µs"), "µs", b)
            .ceiling(r)
            .note("ceiling: A -> relay -> B -> relay -> A through four FIFOs");
        if targets && !target.is_nan() {
            m = m.target(Target::RatioAtMost(target));
        }
        rows.push(m);
    }
}

/// Scenario names longer than this wrap onto the next lines.
const SCENARIO_WIDTH: usize = 46;

/// Prints the rows as a table, each figure beside its ceiling, in at most
/// 100 columns; the notes (how each ceiling was measured, what
/// a figure includes) are in `--json`, so they do not widen the table.
pub fn render(rows: &[Measurement]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<SCENARIO_WIDTH$} {:>9} {:>9} {:>6}  target",
        "scenario", "fifobus", "ceiling", "ratio"
    );
    let mut missed = false;
    for m in rows {
        let verdict = match m.met() {
            Some(true) => " ok",
            Some(false) => {
                missed = true;
                " MISSED"
            }
            None => "",
        };
        let mut name = wrap(&m.scenario, SCENARIO_WIDTH).into_iter();
        let _ = writeln!(
            out,
            "{:<SCENARIO_WIDTH$} {:>9} {:>9} {:>6}  {}",
            name.next().unwrap_or_default(),
            human(m.fifobus),
            m.ceiling.map(human).unwrap_or_else(|| "-".into()),
            m.ratio()
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "-".into()),
            m.target
                .map(|t| format!("{}{verdict}", t.describe()))
                .unwrap_or_default(),
        );
        for more in name {
            let _ = writeln!(out, "  {more}");
        }
    }
    let _ = writeln!(
        out,
        "\nratio: fifobus / ceiling, the same work on bare FIFOs on this machine. Notes: --json."
    );
    if missed {
        let _ = writeln!(
            out,
            "MISSED: the ratio is outside its target. On a small or busy machine, rerun it alone first."
        );
    }
    out
}

/// Splits `text` at spaces into lines of at most `width` characters (a
/// word longer than that stands alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines
}

fn human(v: f64) -> String {
    if !v.is_finite() {
        // No figure (a group that was skipped): the row says why.
        "-".into()
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn progress(show: bool, steps: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !show || !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// A directory for FIFOs: tmpfs when available, as a real bus directory is.
fn scratch_dir() -> io::Result<tempfile::TempDir> {
    fifobus_testkit::temp_dir("fifobus-bench-")
}

/// The broker binary to measure. `FIFOBUS_BENCH_BROKER=/path/to/other/fifobus`
/// measures another build's broker with the same clients: an A/B in one
/// session. Else the `fifobus` beside this executable (the same cargo target
/// directory; `fifobus bench` also sets `FIFOBUS_BENCH_BROKER` to itself
/// when unset), else the one on `PATH`.
pub fn broker_program() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FIFOBUS_BENCH_BROKER") {
        return Ok(PathBuf::from(p));
    }
    fifobus_testkit::sibling_or_on_path("fifobus").ok_or_else(|| {
        BenchError::Failed(
            "no fifobus binary next to this one or on PATH: build it (cargo build --release), \
             or set FIFOBUS_BENCH_BROKER=/path/to/fifobus"
                .into(),
        )
    })
}

/// Clients a broker accepts under the open-file limit this process runs
/// under (its brokers inherit it): the broker's own rule, (limit - 1088) / 3,
/// from docs/architecture.md ("Limits"); this process holds a FIFO per
/// subscriber under the same limit.
fn client_budget() -> usize {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    (soft.saturating_sub(1088) / 3) as usize
}

/// A `fifobus serve` child on a scratch directory (the shared harness);
/// stopped on drop (`SIGTERM`, then `SIGKILL` after 5 s).
struct Broker {
    bus: TempBus,
}

impl Broker {
    fn start(extra: &[&str]) -> Result<Broker> {
        let mut opts = BusOptions::new(broker_program()?);
        // Throughput runs must not drop: a reader that falls behind
        // for a moment should cost memory, not messages.
        opts.args = ["--backlog-messages", "100000000", "--backlog-bytes", "8GiB"]
            .map(Into::into)
            .to_vec();
        // FIFOBUS_BENCH_LOG=debug shows the brokers' logs when a run fails.
        opts.rust_log = std::env::var("FIFOBUS_BENCH_LOG").unwrap_or_else(|_| "warn".into());
        opts.log_to_file = false;
        opts.graceful_stop = Some(Duration::from_secs(5));
        opts.prefix = "fifobus-bench-";
        let bus = TempBus::try_start(opts, extra)
            .map_err(|e| BenchError::Failed(format!("the benchmark broker: {e}")))?;
        Ok(Broker { bus })
    }

    fn dir(&self) -> &Path {
        &self.bus.dir
    }

    fn pid(&self) -> i32 {
        self.bus.pid()
    }

    fn connect(&self, subs: &[String]) -> Result<Client> {
        let opts = ConnectOptions {
            name: None,
            pid: None,
            subs: subs
                .iter()
                .map(|s| s.parse())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| BenchError::Failed(format!("{e}")))?,
        };
        Ok(Client::connect(self.dir(), &opts, Duration::from_secs(10))?)
    }

    fn fs_kind(&self) -> &'static str {
        if self.dir().starts_with("/dev/shm") {
            "tmpfs"
        } else {
            "the default temp directory"
        }
    }
}

/// `lines` lines of `PUB <topic> <payload>` cycling over `topics`, as one
/// buffer of about 64 KiB to write repeatedly.
fn pub_chunk(topics: &[String], payload: usize, lines: usize) -> Vec<u8> {
    let body = vec![b'x'; payload];
    let topics: Vec<Topic> = topics.iter().map(|t| topic(t)).collect();
    let mut out = Vec::new();
    for i in 0..lines {
        encode_pub(&mut out, &topics[i % topics.len()], &body);
    }
    out
}

/// Writes `n` lines (in chunks from `pub_chunk`) to `w`.
fn write_lines(w: &mut File, topics: &[String], payload: usize, n: u64) -> io::Result<()> {
    let line_len = pub_line_len(&topic(&topics[0]), payload);
    let per_chunk = ((64 * 1024 / line_len).max(1) / topics.len()).max(1) * topics.len();
    let chunk = pub_chunk(topics, payload, per_chunk);
    let mut left = n;
    while left > 0 {
        let k = left.min(per_chunk as u64) as usize;
        let end = if k == per_chunk {
            chunk.len()
        } else {
            chunk
                .iter()
                .enumerate()
                .filter(|(_, &b)| b == b'\n')
                .nth(k - 1)
                .map(|(i, _)| i + 1)
                .unwrap_or(chunk.len())
        };
        w.write_all(&chunk[..end])?;
        left -= k as u64;
    }
    Ok(())
}

/// Reads each of `readers` until it has seen `expected` lines. One thread
/// per reader (blocking reads, 256 KiB at a time), or two polling threads
/// for many readers. Returns the channel each thread reports on, and how
/// many threads report.
fn count_lines(readers: Vec<File>, expected: u64) -> (mpsc::Receiver<io::Result<u64>>, usize) {
    let (tx, rx) = mpsc::channel();
    // Many readers: a few threads polling many descriptors each.
    let groups = if readers.len() > 16 { 2 } else { readers.len() };
    let mut buckets: Vec<Vec<File>> = (0..groups).map(|_| Vec::new()).collect();
    for (i, r) in readers.into_iter().enumerate() {
        buckets[i % groups].push(r);
    }
    for bucket in buckets {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let r = if bucket.len() == 1 {
                count_one(bucket.into_iter().next().expect("one"), expected)
            } else {
                count_many(bucket, expected)
            };
            let _ = tx.send(r);
        });
    }
    (rx, groups)
}

fn count_one(mut r: File, expected: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut seen = 0u64;
    while seen < expected {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF after {seen} of {expected} lines"),
            ));
        }
        seen += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
    }
    Ok(seen)
}

fn count_many(files: Vec<File>, expected: u64) -> io::Result<u64> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsRawFd;
    for f in &files {
        let flags = OFlag::from_bits_truncate(fcntl(f.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(f.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    let mut seen = vec![0u64; files.len()];
    let mut buf = vec![0u8; 256 * 1024];
    let mut open: Vec<usize> = (0..files.len()).collect();
    while !open.is_empty() {
        let mut fds: Vec<PollFd> = open
            .iter()
            .map(|&i| PollFd::new(files[i].as_fd(), PollFlags::POLLIN))
            .collect();
        poll(&mut fds, PollTimeout::NONE)?;
        let ready: Vec<usize> = fds
            .iter()
            .zip(&open)
            .filter(|(p, _)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, &i)| i)
            .collect();
        drop(fds);
        for i in ready {
            while seen[i] < expected {
                match (&files[i]).read(&mut buf) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "EOF on subscriber {i} of {} after {} of {expected} lines",
                                files.len(),
                                seen[i]
                            ),
                        ))
                    }
                    Ok(n) => seen[i] += memchr::memchr_iter(b'\n', &buf[..n]).count() as u64,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        open.retain(|&i| seen[i] < expected);
    }
    Ok(seen.iter().sum())
}

/// Waits for every reader group; returns the elapsed time since `start`.
fn await_readers(
    rx: &mpsc::Receiver<io::Result<u64>>,
    groups: usize,
    start: Instant,
) -> Result<Duration> {
    for _ in 0..groups {
        match rx.recv_timeout(SCENARIO_LIMIT) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(BenchError::Failed(format!("a subscriber failed: {e}"))),
            Err(_) => {
                return Err(BenchError::Failed(format!(
                    "deliveries incomplete after {SCENARIO_LIMIT:?}"
                )))
            }
        }
    }
    Ok(start.elapsed())
}

/// What one throughput run measured.
#[derive(Debug, Clone, Copy)]
struct Fanned {
    /// Deliveries per second.
    rate: f64,
    /// Nanoseconds of broker CPU (user + system, all threads) per
    /// delivery, over the measured stream only (not the handshakes).
    cpu_ns: f64,
}

/// `publishers` clients each publish `n` messages spread over `topics`
/// topics; `subscribers` clients split evenly over the topics. Returns
/// deliveries per second and the broker's CPU per delivery.
fn fan(
    broker: &Broker,
    publishers: usize,
    subscribers: usize,
    topics: usize,
    n: u64,
    payload: usize,
) -> Result<Fanned> {
    let names: Vec<String> = (0..topics).map(|t| format!("bench.t{t}")).collect();
    let mut readers = Vec::new();
    for s in 0..subscribers {
        let (_, recv) = broker.connect(&[names[s % topics].clone()])?.into_files()?;
        readers.push(recv);
    }
    // Whole rounds over the topics, so every subscriber expects the same count.
    let n = (n / topics as u64).max(1) * topics as u64;
    let per_sub = n * publishers as u64 / topics as u64;
    let mut writers = Vec::new();
    for _ in 0..publishers {
        writers.push(broker.connect(&[])?.into_files()?.0);
    }
    let (rx, groups) = count_lines(readers, per_sub);
    let cpu_before = cpu_ns(broker.pid())?;
    let start = Instant::now();
    for mut w in writers {
        let names = names.clone();
        std::thread::spawn(move || write_lines(&mut w, &names, payload, n));
    }
    let took = await_readers(&rx, groups, start)?;
    let cpu = cpu_ns(broker.pid())?.saturating_sub(cpu_before);
    let deliveries = (per_sub * subscribers as u64) as f64;
    Ok(Fanned {
        rate: deliveries / took.as_secs_f64(),
        cpu_ns: cpu as f64 / deliveries,
    })
}

fn mkfifo(path: &Path) -> io::Result<()> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(io::Error::from)
}

fn open_rw(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// The bare-pipe ceiling: `writers` threads write `n` lines each into FIFO
/// A, a relay copies A to `outputs` FIFOs in 64 KiB blocks, and a reader per
/// output counts lines. Returns deliveries per second.
fn relay_ceiling(writers: usize, outputs: usize, n: u64, payload: usize) -> Result<f64> {
    let tmp = scratch_dir()?;
    let input = tmp.path().join("in");
    mkfifo(&input)?;
    let (mut outs, readers) = bare_outputs(tmp.path(), outputs)?;
    let topic = vec!["bench.t0".to_owned()];
    let line_len = pub_line_len(&self::topic(&topic[0]), payload) as u64;
    let total = line_len * n * writers as u64;
    let mut relay_in = open_rw(&input)?;
    std::thread::spawn(move || -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut copied = 0u64;
        while copied < total {
            let k = relay_in.read(&mut buf)?;
            for o in &mut outs {
                o.write_all(&buf[..k])?;
            }
            copied += k as u64;
        }
        Ok(())
    });
    let (rx, groups) = count_lines(readers, n * writers as u64);
    let start = Instant::now();
    for _ in 0..writers {
        let mut w = std::fs::OpenOptions::new().write(true).open(&input)?;
        let topic = topic.clone();
        std::thread::spawn(move || write_lines(&mut w, &topic, payload, n));
    }
    let took = await_readers(&rx, groups, start)?;
    Ok((n * writers as u64 * outputs as u64) as f64 / took.as_secs_f64())
}

/// `count` FIFOs `out0`, `out1`, … in `dir`: each one's write end and
/// read end, in that order.
fn bare_outputs(dir: &Path, count: usize) -> io::Result<(Vec<File>, Vec<File>)> {
    let mut outs = Vec::new();
    let mut readers = Vec::new();
    for i in 0..count {
        let p = dir.join(format!("out{i}"));
        mkfifo(&p)?;
        // O_RDWR: opens never block, and the relay never sees EOF.
        outs.push(open_rw(&p)?);
        readers.push(File::open(&p)?);
    }
    Ok((outs, readers))
}

/// The fair ceiling of "100 topics" (issue 14): the broker's work there on
/// bare FIFOs. One writer publishes `n` lines spread over `topics` topics
/// exactly as `fan` does (`write_lines`, rounds over the topics); a relay
/// thread reads FIFO A in 64 KiB blocks, sorts each block's whole lines by
/// topic ([`ByTopic`]) and writes each topic's run to each of that topic's
/// `per_topic` FIFOs, one write per FIFO per block as the broker writes once
/// per batch. FIFO `i` carries topic `i % topics`, as `fan`'s subscriber `i`
/// subscribes. The readers are `fan`'s (`count_lines`: a few polling threads
/// for many FIFOs), so both sides pay the same for reading. Returns
/// deliveries per second.
///
/// It holds two descriptors per output FIFO (`topics * per_topic * 2`), so
/// the caller sizes `per_topic` by the open-file limit ([`client_budget`]).
fn topic_relay_ceiling(topics: usize, per_topic: usize, n: u64, payload: usize) -> Result<f64> {
    let names: Vec<String> = (0..topics).map(|t| format!("bench.t{t}")).collect();
    // Whole rounds over the topics, as `fan` publishes them.
    let rounds = (n / topics as u64).max(1);
    let n = rounds * topics as u64;
    let total: u64 = names
        .iter()
        .map(|t| rounds * pub_line_len(&topic(t), payload) as u64)
        .sum();
    let tmp = scratch_dir()?;
    let input = tmp.path().join("in");
    mkfifo(&input)?;
    let (outs, readers) = bare_outputs(tmp.path(), topics * per_topic)?;
    let mut by_topic_outs: Vec<Vec<File>> = (0..topics).map(|_| Vec::new()).collect();
    for (i, o) in outs.into_iter().enumerate() {
        by_topic_outs[i % topics].push(o);
    }
    let mut relay_in = open_rw(&input)?;
    let mut split = ByTopic::new(&names);
    std::thread::spawn(move || {
        let mut relay = || -> io::Result<()> {
            let mut buf = vec![0u8; 64 * 1024];
            let mut copied = 0u64;
            while copied < total {
                let k = relay_in.read(&mut buf)?;
                split
                    .split(&buf[..k])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                for (run, outs) in split.runs.iter_mut().zip(&mut by_topic_outs) {
                    if run.is_empty() {
                        continue;
                    }
                    for o in outs.iter_mut() {
                        o.write_all(run)?;
                    }
                    run.clear();
                }
                copied += k as u64;
            }
            Ok(())
        };
        if let Err(e) = relay() {
            // The readers then time out; this says why.
            eprintln!("the by-topic relay of the \"100 topics\" ceiling failed: {e}");
        }
    });
    let per_output = rounds;
    let (rx, groups) = count_lines(readers, per_output);
    let start = Instant::now();
    let mut w = std::fs::OpenOptions::new().write(true).open(&input)?;
    std::thread::spawn(move || write_lines(&mut w, &names, payload, n));
    let took = await_readers(&rx, groups, start)?;
    Ok((per_output * (topics * per_topic) as u64) as f64 / took.as_secs_f64())
}

/// The whole lines of a stream of `PUB` lines, sorted by topic block by
/// block: what a broker's fan-out to per-topic subscribers does with a
/// batch, minus everything else a broker does. A line may straddle two
/// blocks; its first part waits in `tail`.
struct ByTopic {
    /// Topic name to its index in `runs`.
    index: std::collections::HashMap<Vec<u8>, usize>,
    /// The unfinished last line of the blocks so far.
    tail: Vec<u8>,
    /// Per topic, the whole lines (with their newlines) completed by the
    /// blocks since the caller last cleared it, in stream order.
    runs: Vec<Vec<u8>>,
}

impl ByTopic {
    fn new(topics: &[String]) -> Self {
        ByTopic {
            index: topics
                .iter()
                .enumerate()
                .map(|(i, t)| (t.as_bytes().to_vec(), i))
                .collect(),
            tail: Vec::new(),
            runs: vec![Vec::new(); topics.len()],
        }
    }

    /// Appends every line `block` completes to its topic's run.
    ///
    /// # Errors
    /// A complete line that is not `PUB` to one of the topics (the bench
    /// publishes nothing else): the ceiling would otherwise miss deliveries.
    fn split(&mut self, block: &[u8]) -> std::result::Result<(), String> {
        let ByTopic { index, tail, runs } = self;
        let mut rest = block;
        if !tail.is_empty() {
            let Some(end) = memchr::memchr(b'\n', rest) else {
                tail.extend_from_slice(rest);
                return Ok(());
            };
            tail.extend_from_slice(&rest[..=end]);
            Self::file(index, runs, tail)?;
            tail.clear();
            rest = &rest[end + 1..];
        }
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', rest) {
            Self::file(index, runs, &rest[start..=end])?;
            start = end + 1;
        }
        tail.extend_from_slice(&rest[start..]);
        Ok(())
    }

    /// Appends `line` (with its newline) to its topic's run.
    fn file(
        index: &std::collections::HashMap<Vec<u8>, usize>,
        runs: &mut [Vec<u8>],
        line: &[u8],
    ) -> std::result::Result<(), String> {
        let t = fifobus::protocol::command::pub_parts(&line[..line.len() - 1])
            .and_then(|(topic, _)| index.get(topic))
            .ok_or_else(|| {
                format!(
                    "not a PUB to a bench topic: {:?}",
                    String::from_utf8_lossy(line)
                )
            })?;
        runs[*t].extend_from_slice(line);
        Ok(())
    }
}

/// Complete lines out of a byte stream, with the broker's own splitter.
struct Lines {
    buf: bytes::BytesMut,
    splitter: fifobus::protocol::LineSplitter,
}

impl Default for Lines {
    fn default() -> Self {
        Lines {
            buf: bytes::BytesMut::new(),
            splitter: fifobus::protocol::LineSplitter::new(1 << 20),
        }
    }
}

impl Lines {
    /// Appends `data` and calls `each` for every line it completes.
    fn feed(&mut self, data: &[u8], mut each: impl FnMut(&[u8])) {
        self.buf.extend_from_slice(data);
        while let Some(line) = self.splitter.next_line(&mut self.buf) {
            if let fifobus::protocol::Line::Complete(l) = line {
                each(&l);
            }
        }
    }
}

/// Nanoseconds since a fixed origin, comparable across threads.
fn now_ns(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

/// Whose turn it is: the round trips over the bare relays and over the
/// broker are sent in alternating slices, one path at a time, so a change
/// in the machine's load during the run falls on both (issue 14: a run of
/// the relay followed by a run of the broker compared two different loads).
struct Turn {
    /// A token arrives here when this path may send its next slice.
    mine: mpsc::Receiver<()>,
    /// Handed on when all of this path's slice has come back.
    next: mpsc::Sender<()>,
    /// Messages per slice (the last slice takes the remainder).
    slice: u64,
}

/// Slices the round trips of each path are sent in, alternating.
const LATENCY_SLICES: u64 = 5;

/// Starts round trips of `n` messages: A writes `PUB lat.out <seq> <pad>`
/// into `a_send`, the echo reads them from `b_recv` and writes
/// `PUB lat.back <seq> <pad>` into `b_send`, and A reads them back from
/// `a_recv`. `rate`: messages per second, or None for as fast as possible.
/// Sends slice by slice as `turn` allows. The round-trip times, in
/// nanoseconds, come on the returned channel.
#[allow(clippy::too_many_arguments)]
fn rtt(
    a_send: File,
    a_recv: File,
    b_recv: File,
    b_send: File,
    n: u64,
    rate: Option<u64>,
    payload: usize,
    turn: Turn,
) -> mpsc::Receiver<io::Result<Vec<u64>>> {
    let origin = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    // Echo: every complete line "<KW> lat.out <rest>" becomes "PUB lat.back <rest>".
    std::thread::spawn(move || echo(b_recv, b_send));
    let Turn { mine, next, slice } = turn;
    // Receiver on A.
    let (tx, rx) = mpsc::channel();
    let sent2 = sent.clone();
    std::thread::spawn(move || {
        let _ = tx.send(collect_rtts(a_recv, &sent2, n, origin, slice, &next));
    });
    // Sender on A.
    let pad = "x".repeat(payload.saturating_sub(12));
    std::thread::spawn(move || send_paced(a_send, &sent, n, rate, &pad, origin, slice, &mine));
    rx
}

/// The round-trip times [`rtt`] sends, or why there are none.
fn rtt_result(rx: &mpsc::Receiver<io::Result<Vec<u64>>>) -> Result<Vec<u64>> {
    match rx.recv_timeout(SCENARIO_LIMIT) {
        Ok(r) => r.map_err(|e| BenchError::Failed(format!("round trips failed: {e}"))),
        Err(_) => Err(BenchError::Failed(format!(
            "round trips incomplete after {SCENARIO_LIMIT:?}"
        ))),
    }
}

fn echo(mut from: File, mut to: File) -> io::Result<()> {
    let back = topic("lat.back");
    let mut buf = vec![0u8; 256 * 1024];
    let mut lines = Lines::default();
    let mut out = Vec::new();
    loop {
        let k = from.read(&mut buf)?;
        if k == 0 {
            return Ok(());
        }
        lines.feed(&buf[..k], |line| {
            // Skip the keyword and the topic; keep "<seq> <pad>".
            let rest = parse_msg(line).map(|(_, p)| p).unwrap_or_default();
            encode_pub(&mut out, &back, rest);
        });
        to.write_all(&out)?;
        out.clear();
    }
}

fn collect_rtts(
    mut from: File,
    sent: &[AtomicU64],
    n: u64,
    origin: Instant,
    slice: u64,
    next: &mpsc::Sender<()>,
) -> io::Result<Vec<u64>> {
    let mut rtts = Vec::with_capacity(n as usize);
    let mut buf = vec![0u8; 256 * 1024];
    let mut lines = Lines::default();
    while (rtts.len() as u64) < n {
        let k = from.read(&mut buf)?;
        if k == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF during round trips",
            ));
        }
        let now = now_ns(origin);
        lines.feed(&buf[..k], |line| {
            let seq = parse_msg(line)
                .and_then(|(_, payload)| payload.split(|&b| b == b' ').next())
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse::<usize>().ok());
            if let Some(seq) = seq.filter(|&s| s < sent.len()) {
                rtts.push(now.saturating_sub(sent[seq].load(Ordering::Acquire)));
                // The slice is back: the other path's turn. (Its sender
                // may be done already; then nobody is waiting.)
                if rtts.len() as u64 % slice.max(1) == 0 || rtts.len() as u64 == n {
                    let _ = next.send(());
                }
            }
        });
    }
    Ok(rtts)
}

#[allow(clippy::too_many_arguments)]
fn send_paced(
    mut to: File,
    sent: &[AtomicU64],
    n: u64,
    rate: Option<u64>,
    pad: &str,
    origin: Instant,
    slice: u64,
    mine: &mpsc::Receiver<()>,
) -> io::Result<()> {
    let slice = slice.max(1);
    let mut first = 0;
    while first < n {
        mine.recv_timeout(SCENARIO_LIMIT)
            .map_err(|_| io::Error::other("the other path's round trips never came back"))?;
        let end = (first + slice).min(n);
        send_slice(&mut to, sent, first..end, rate, pad, origin)?;
        first = end;
    }
    Ok(())
}

/// Sends messages `range` of a round-trip run, paced at `rate` from now.
fn send_slice(
    to: &mut File,
    sent: &[AtomicU64],
    range: std::ops::Range<u64>,
    rate: Option<u64>,
    pad: &str,
    origin: Instant,
) -> io::Result<()> {
    let lat_out = topic("lat.out");
    let (first, n) = (range.start, range.end);
    match rate {
        Some(rate) => {
            // Fine-grained sleeps: the default 50 µs timer slack would make a
            // 100 µs period bursty.
            // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and changes
            // only this thread's timer slack.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
            let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
            let start = Instant::now();
            let mut line = Vec::new();
            let mut body = Vec::new();
            for i in first..n {
                let due = start + period * (i - first) as u32;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                line.clear();
                body.clear();
                write!(body, "{i} {pad}")?;
                encode_pub(&mut line, &lat_out, &body);
                // Stamp the scheduled time, not the actual one: if this
                // thread was held up, that delay is part of what a client at
                // this rate would see (no coordinated omission).
                let scheduled = due.saturating_duration_since(origin).as_nanos() as u64;
                sent[i as usize].store(scheduled, Ordering::Release);
                to.write_all(&line)?;
            }
        }
        None => {
            let mut chunk = Vec::new();
            let mut body = Vec::new();
            let mut i = first;
            while i < n {
                chunk.clear();
                let end = (i + 64).min(n);
                let stamp = now_ns(origin);
                for j in i..end {
                    body.clear();
                    write!(body, "{j} {pad}")?;
                    encode_pub(&mut chunk, &lat_out, &body);
                    sent[j as usize].store(stamp, Ordering::Release);
                }
                to.write_all(&chunk)?;
                i = end;
            }
        }
    }
    Ok(())
}

/// Round-trip times over bare relays and over a broker, for the same load.
fn rtt_pair(n: u64, rate: Option<u64>, payload: usize) -> Result<(Vec<u64>, Vec<u64>)> {
    // Bare: A -> F1 -relay-> F2 -> B -> F3 -relay-> F4 -> A.
    let tmp = scratch_dir()?;
    let f: Vec<PathBuf> = (1..=4).map(|i| tmp.path().join(format!("f{i}"))).collect();
    for p in &f {
        mkfifo(p)?;
    }
    for (from, to) in [(0, 1), (2, 3)] {
        let mut r = open_rw(&f[from])?;
        let mut w = open_rw(&f[to])?;
        std::thread::spawn(move || -> io::Result<()> {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let k = r.read(&mut buf)?;
                w.write_all(&buf[..k])?;
            }
        });
    }
    let broker = Broker::start(&["--metrics-addr", "127.0.0.1:0"])?;
    let (a_send, a_recv) = broker.connect(&["lat.back".into()])?.into_files()?;
    let (b_send, b_recv) = broker.connect(&["lat.out".into()])?.into_files()?;
    // The relay's turn first, then the broker's, slice by slice.
    let slice = n.div_ceil(LATENCY_SLICES);
    let (to_relay, relay_turn) = mpsc::channel();
    let (to_broker, broker_turn) = mpsc::channel();
    to_relay.send(()).expect("the receiver is held right here");
    let relay = rtt(
        std::fs::OpenOptions::new().write(true).open(&f[0])?,
        File::open(&f[3])?,
        File::open(&f[1])?,
        std::fs::OpenOptions::new().write(true).open(&f[2])?,
        n,
        rate,
        payload,
        Turn {
            mine: relay_turn,
            next: to_broker,
            slice,
        },
    );
    let through = rtt(
        a_send,
        a_recv,
        b_recv,
        b_send,
        n,
        rate,
        payload,
        Turn {
            mine: broker_turn,
            next: to_relay,
            slice,
        },
    );
    Ok((rtt_result(&relay)?, rtt_result(&through)?))
}

fn percentile(samples: &[u64], q: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    let mut s = samples.to_vec();
    s.sort_unstable();
    let i = ((s.len() as f64 - 1.0) * q).round() as usize;
    s[i.min(s.len() - 1)]
}

/// Handshake capacity: 4 threads each write their share of `n` HELLO lines
/// (one `write` per line, as separate clients would) naming the thread's
/// own reply FIFO, then read the answers. Returns WELCOMEs per second, from
/// the first HELLO to the last answer. The clients stay connected, idle.
fn handshakes(broker: &Broker, n: usize) -> Result<f64> {
    let threads = 4;
    let tmp = scratch_dir()?;
    let mut replies = Vec::new();
    for t in 0..threads {
        let path = tmp.path().join(format!("reply{t}"));
        mkfifo(&path)?;
        // Open our end first so the broker's open for writing succeeds at once.
        replies.push((path.clone(), open_rw(&path)?));
    }
    let start = Instant::now();
    let workers: Vec<_> = replies
        .into_iter()
        .enumerate()
        .map(|(t, (path, mut reply))| {
            let hello = broker.dir().join("hello");
            let count = n / threads + usize::from(t < n % threads);
            std::thread::spawn(move || -> io::Result<usize> {
                let writer = std::thread::spawn(move || -> io::Result<()> {
                    let mut h = std::fs::OpenOptions::new().write(true).open(hello)?;
                    let line = format!("HELLO reply={}\n", path.display());
                    for _ in 0..count {
                        h.write_all(line.as_bytes())?;
                    }
                    Ok(())
                });
                let mut welcomed = 0;
                let mut answers = 0;
                let mut buf = vec![0u8; 64 * 1024];
                let mut lines = Lines::default();
                while answers < count {
                    let k = reply.read(&mut buf)?;
                    lines.feed(&buf[..k], |line| {
                        welcomed +=
                            usize::from(matches!(Reply::parse(line), Reply::Welcome { .. }));
                        answers += 1;
                    });
                }
                writer
                    .join()
                    .map_err(|_| io::Error::other("HELLO writer panicked"))??;
                Ok(welcomed)
            })
        })
        .collect();
    let mut welcomed = 0;
    for w in workers {
        welcomed += w
            .join()
            .map_err(|_| BenchError::Failed("a handshake thread panicked".into()))??;
    }
    let took = start.elapsed();
    if welcomed < n {
        return Err(BenchError::Failed(format!(
            "only {welcomed} of {n} handshakes were welcomed"
        )));
    }
    Ok(n as f64 / took.as_secs_f64())
}

/// Connects `n` more idle clients (untimed). Returns how many it connected.
fn connect_idle(broker: &Broker, n: usize) -> Result<usize> {
    let threads = 4;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let dir = broker.dir().to_owned();
            let count = n / threads + usize::from(t < n % threads);
            std::thread::spawn(move || {
                let mut ok = 0;
                for _ in 0..count {
                    match Client::connect(&dir, &ConnectOptions::default(), Duration::from_secs(10))
                    {
                        Ok(c) => {
                            c.into_parts();
                            ok += 1;
                        }
                        Err(_) => break,
                    }
                }
                ok
            })
        })
        .collect();
    Ok(workers.into_iter().map(|w| w.join().unwrap_or(0)).sum())
}

fn rss_bytes(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| BenchError::Failed("no VmRSS in /proc/PID/status".into()))
}

/// CPU seconds (user + system) the process spends over `window`.
fn idle_cpu(pid: i32, window: Duration) -> Result<f64> {
    let before = cpu_ns(pid)?;
    std::thread::sleep(window);
    let after = cpu_ns(pid)?;
    Ok(after.saturating_sub(before) as f64 / 1e9)
}

/// `some avg10` of `/proc/pressure/cpu`: the percentage of the last 10 s
/// in which some runnable task waited for a CPU (None without PSI).
fn cpu_pressure() -> Option<f64> {
    parse_pressure(&std::fs::read_to_string("/proc/pressure/cpu").ok()?)
}

fn parse_pressure(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// The 1-minute load average, as `/proc/loadavg` writes it.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

/// utime + stime of a process, all its threads, from a `/proc/PID/stat`
/// line, in clock ticks. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // utime and stime: fields 14 and 15 of proc(5), the 12th and 13th after ')'.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time (user + system, all threads) process `pid` has used, in
/// nanoseconds, at the kernel's clock-tick resolution (10 ms at 100 Hz):
/// a figure per delivery needs a window of many ticks, which every
/// throughput scenario is.
pub(crate) fn cpu_ns(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| {
        BenchError::Failed(format!("cannot read {path}: {e} (has the process exited?)"))
    })?;
    let ticks = parse_cpu_ticks(&stat)
        .ok_or_else(|| BenchError::Failed(format!("{path} has no utime/stime fields: {stat:?}")))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(ticks * 1_000_000_000 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_targets() {
        let s: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&s, 0.5), 501);
        assert_eq!(percentile(&s, 0.99), 990);
        assert_eq!(percentile(&[], 0.5), 0);
        let m = Measurement::new("x", "msg/s", 3.0)
            .ceiling(10.0)
            .target(Target::RatioAtLeast(0.30));
        assert_eq!(m.met(), Some(true));
        let m = Measurement::new("x", "µs", 30.0)
            .ceiling(10.0)
            .target(Target::RatioAtMost(2.0));
        assert_eq!(m.met(), Some(false));
        let long = Measurement::new(
            "peak RSS, 10 stuck subscribers, 100 MB flood, drop-oldest, MiB",
            "MiB",
            123456.0,
        )
        .ceiling(1.0)
        .target(Target::RatioAtLeast(0.30))
        .note("a long note that goes only to --json, never into the table's width");
        let table = render(&[m, long]);
        assert!(table.contains("MISSED"));
        assert!(
            table.lines().any(|l| l.starts_with("MISSED: ")),
            "MISSED is explained: {table}"
        );
        for line in table.lines() {
            assert!(line.chars().count() <= 100, "{line:?}");
        }
        assert!(!table.contains("a long note"));
        assert!(only_matches("latency") && only_matches("1 -> 1") && only_matches("floods"));
        assert!(!only_matches("nosuch"));
    }

    /// utime and stime are fields 14 and 15, counted after the last `)`:
    /// a command name with spaces and parentheses does not shift them.
    #[test]
    fn cpu_ticks_from_proc_stat() {
        let stat = "4242 (a) b (c d) S 1 4242 4242 0 -1 4194560 1061 0 0 0 \
                    150 25 0 0 20 0 3 0 123 456 789\n";
        assert_eq!(parse_cpu_ticks(stat), Some(175));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1 2 3"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis at all"), None);
        // This process's own line parses, and time only goes forward.
        let me = std::process::id() as i32;
        let a = cpu_ns(me).unwrap();
        assert!(cpu_ns(me).unwrap() >= a);
        assert!(only_matches("allocs") && only_matches("redis"));
    }

    #[test]
    fn cpu_pressure_line() {
        let psi = "some avg10=27.66 avg60=21.24 avg300=10.30 total=10773558942\n\
                   full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_pressure(psi), Some(27.66));
        assert_eq!(parse_pressure("full avg10=1.00\n"), None);
    }

    /// The fair "100 topics" ceiling's relay: lines sorted by topic in
    /// stream order, a line split across blocks (even across three, and at
    /// its newline) filed once whole, and anything but a bench PUB refused.
    #[test]
    fn blocks_split_by_topic_with_the_partial_line_carried() {
        let topics = vec!["a".to_owned(), "bb".to_owned(), "c".to_owned()];
        let mut s = ByTopic::new(&topics);
        s.split(b"PUB a 1\nPUB bb 2\nPUB a 3\nPUB b").unwrap();
        assert_eq!(s.runs[0], b"PUB a 1\nPUB a 3\n");
        assert_eq!(s.runs[1], b"PUB bb 2\n");
        assert!(s.runs[2].is_empty());
        assert_eq!(s.tail, b"PUB b");
        for r in &mut s.runs {
            r.clear();
        }
        // The straddling line continues over two more blocks.
        s.split(b"b 4").unwrap();
        assert!(s.runs.iter().all(Vec::is_empty), "no line is complete yet");
        s.split(b"4\nPUB c 5\nPUB a 6").unwrap();
        assert_eq!(s.runs[1], b"PUB bb 44\n");
        assert_eq!(s.runs[2], b"PUB c 5\n");
        assert!(s.runs[0].is_empty());
        // A block that is exactly the rest of a line, newline last.
        s.split(b"\n").unwrap();
        assert_eq!(s.runs[0], b"PUB a 6\n");
        assert!(s.tail.is_empty());
        // The bench's own stream, cut into odd blocks, comes out whole.
        let chunk = pub_chunk(&topics, 5, 300);
        let mut s = ByTopic::new(&topics);
        for block in chunk.chunks(7) {
            s.split(block).unwrap();
        }
        assert!(s.tail.is_empty());
        assert_eq!(s.runs.concat().len(), chunk.len());
        assert_eq!(s.runs[2], b"PUB c xxxxx\n".repeat(100));
        // Only PUBs to known topics.
        assert!(ByTopic::new(&topics).split(b"PUB zz 1\n").is_err());
        assert!(ByTopic::new(&topics).split(b"PING\n").is_err());
        assert!(
            ByTopic::new(&topics).split(b"PUB zz").is_ok(),
            "not whole yet"
        );
    }

    #[test]
    fn publish_chunks_hold_whole_lines() {
        let topics = vec!["a".to_owned(), "b".to_owned()];
        let c = pub_chunk(&topics, 3, 4);
        assert_eq!(c, b"PUB a xxx\nPUB b xxx\nPUB a xxx\nPUB b xxx\n");
    }
}
