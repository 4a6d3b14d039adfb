//! `fifobus-bridge` (`fifobus bridge`): joins a bus to NATS. Topics matching
//! `--export` go from the bus to NATS; subjects matching `--import` come
//! from NATS onto the bus. docs/scale-out.md describes the rules; here the
//! wiring: a bus thread ([`bus`]), a NATS task each way, bounded buffers
//! between them, and the counters ([`metrics`]).

mod bus;
mod mapping;
mod measure;
mod metrics;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;

use mapping::Mapping;
use metrics::Metrics;

/// The header naming the bus a message was exported from.
pub const ORIGIN: &str = "Fifobus-Origin";

#[derive(Debug, Parser)]
#[command(
    name = "fifobus-bridge",
    version,
    about = "Bridge fifobus topics to and from NATS (one bus, one NATS connection)",
    after_help = "Examples:\n  fifobus bridge --nats nats://hub:4222 --prefix site-a --export 'chat.>' --import 'site-b.chat.>' --import-strip site-b\n  fifobus bridge --export 'logs.>' --metrics 127.0.0.1:9466\n\nRules (loops, order, loss): docs/scale-out.md."
)]
struct Args {
    /// Bus directory [default: as fifobus: $FIFOBUS_DIR, $XDG_RUNTIME_DIR/fifobus, /run/fifobus for root, else /tmp/fifobus-UID]
    #[arg(long, value_name = "DIR", env = "FIFOBUS_DIR")]
    dir: Option<PathBuf>,
    /// NATS server URL(s), comma-separated
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Bus topic patterns published to NATS (fifobus pattern syntax; repeatable)
    #[arg(long, value_name = "PATTERN", num_args = 1..)]
    export: Vec<String>,
    /// NATS subject patterns published on the bus (repeatable); each subject must be a valid fifobus topic
    #[arg(long, value_name = "PATTERN", num_args = 1..)]
    import: Vec<String>,
    /// Exported topic T becomes subject PREFIX.T, so that several buses can share one NATS account
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Imported subject PREFIX.T becomes bus topic T (every --import must start with PREFIX.)
    #[arg(long, value_name = "PREFIX")]
    import_strip: Option<String>,
    /// This bus's id in the Fifobus-Origin header: imports carrying it are dropped (no loops) [default: HOSTNAME:DIR]
    #[arg(long, value_name = "ID")]
    bus_id: Option<String>,
    /// Bound of each direction's buffer, in messages; beyond it messages are dropped and counted
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    buffer: usize,
    /// Bound of each direction's buffer, in payload bytes
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20)]
    buffer_bytes: usize,
    /// Serve /metrics here (loopback by default; 'off' for none)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9466")]
    metrics: String,
    /// Client name on the bus (for logs, `fifobus ls`)
    #[arg(long, value_name = "NAME", default_value = "bridge")]
    name: String,
    /// Measure A -> NATS -> B beside a direct NATS client, then exit (docs/scale-out.md)
    #[arg(long, hide = true)]
    measure: bool,
    /// --measure: messages per run
    #[arg(long, hide = true, default_value_t = 100_000)]
    count: usize,
    /// --measure: payload bytes
    #[arg(long, hide = true, default_value_t = 100)]
    size: usize,
}

/// A log line on stderr, with the time (the broker's log style, without
/// its tracing stack).
pub fn log(line: std::fmt::Arguments) {
    use std::io::Write;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let _ = writeln!(
        std::io::stderr(),
        "{}.{:03} fifobus-bridge: {line}",
        now.as_secs(),
        now.subsec_millis()
    );
}

/// Time since the process started (for timestamps shared through atomics).
fn since_start() -> Duration {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

/// The occupancy of one bounded buffer: messages and payload bytes.
pub struct Bounds {
    way: &'static str,
    metrics: Arc<Metrics>,
    max_bytes: u64,
    bytes: AtomicU64,
}

impl Bounds {
    fn way(&self) -> &metrics::Way {
        if self.way == "export" {
            &self.metrics.export
        } else {
            &self.metrics.import
        }
    }

    /// Room for `len` more bytes? Counted in when so.
    fn admit(&self, len: usize) -> bool {
        let len = len as u64;
        let now = self.bytes.fetch_add(len, Relaxed);
        // One message is always let in (a payload larger than the bound
        // would otherwise never pass).
        if now > 0 && now + len > self.max_bytes {
            self.bytes.fetch_sub(len, Relaxed);
            return false;
        }
        let w = self.way();
        w.buffered.fetch_add(1, Relaxed);
        w.buffered_bytes.store(now + len, Relaxed);
        true
    }

    /// A message of `len` bytes left the buffer.
    pub fn take(&self, len: usize) {
        let now = self.bytes.fetch_sub(len as u64, Relaxed) - len as u64;
        let w = self.way();
        w.buffered.fetch_sub(1, Relaxed);
        w.buffered_bytes.store(now, Relaxed);
    }

    fn dropped(&self) {
        self.way().dropped_buffer.fetch_add(1, Relaxed);
    }
}

/// The bus-to-NATS buffer, pushed into from the bus thread.
pub struct Buffer<T> {
    tx: tokio::sync::mpsc::Sender<T>,
    bounds: Arc<Bounds>,
}

impl<T> Buffer<T> {
    /// Queues `item`, or drops and counts it when the buffer is full.
    pub fn push(&self, item: T, len: fn(&T) -> usize) {
        let n = len(&item);
        if !self.bounds.admit(n) {
            self.bounds.dropped();
            return;
        }
        if self.tx.try_send(item).is_err() {
            self.bounds.take(n);
            self.bounds.dropped();
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    since_start();
    if args.measure {
        return measure::run(&args.nats, args.count, args.size);
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(fifobus::busdir::default_path);
    let map = match Mapping::new(
        args.prefix.clone(),
        args.import_strip.clone(),
        &args.export,
        &args.import,
    ) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("fifobus-bridge: {e}");
            return ExitCode::from(2);
        }
    };
    if map.exports.is_empty() && map.imports.is_empty() {
        eprintln!(
            "fifobus-bridge: nothing to bridge: give --export PATTERN and/or --import PATTERN"
        );
        return ExitCode::from(2);
    }
    if args.buffer == 0 || args.buffer_bytes == 0 {
        eprintln!("fifobus-bridge: --buffer and --buffer-bytes must be at least 1");
        return ExitCode::from(2);
    }
    let bus_id = match args.bus_id.clone() {
        Some(id) => id,
        None => {
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "localhost".into());
            let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
            format!("{host}:{}", dir.display())
        }
    };
    if bus_id.is_empty()
        || bus_id
            .bytes()
            .any(|b| b.is_ascii_control() || !b.is_ascii())
    {
        eprintln!("fifobus-bridge: --bus-id '{bus_id}' must be printable ASCII (it goes in a NATS header)");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fifobus-bridge: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, dir, map, bus_id))
}

async fn run(args: Args, dir: PathBuf, map: Mapping, bus_id: String) -> ExitCode {
    let metrics = Arc::new(Metrics::default());
    metrics
        .buffer_limit_messages
        .store(args.buffer as u64, Relaxed);
    metrics
        .buffer_limit_bytes
        .store(args.buffer_bytes as u64, Relaxed);
    if args.metrics != "off" {
        match tokio::net::TcpListener::bind(&args.metrics).await {
            Ok(l) => {
                let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                log(format_args!("metrics on http://{addr}/metrics"));
                tokio::spawn(metrics::serve(l, metrics.clone()));
            }
            Err(e) => {
                eprintln!(
                    "fifobus-bridge: cannot serve metrics on {}: {e}; give another --metrics ADDR (or --metrics off)",
                    args.metrics
                );
                return ExitCode::FAILURE;
            }
        }
    }
    log(format_args!(
        "bus id '{bus_id}', bus {}, NATS {}, export [{}]{}, import [{}]{}",
        dir.display(),
        args.nats,
        args.export.join(" "),
        map.prefix
            .as_deref()
            .map(|p| format!(" as {p}.<topic>"))
            .unwrap_or_default(),
        args.import.join(" "),
        map.strip
            .as_deref()
            .map(|p| format!(" without {p}."))
            .unwrap_or_default(),
    ));

    // NATS: no echo (its own exports never come back on this connection),
    // reconnecting for ever. Its own buffer is kept small and explicit:
    // while disconnected, publishes wait in at most `client_capacity`
    // commands, then the bridge's own bounded buffer takes over (counted).
    let nats_metrics = metrics.clone();
    let disconnects = Arc::new(AtomicU64::new(0));
    let gen = disconnects.clone();
    let was_connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // When the last reconnect happened ([`since_start`], ms; 0: never).
    let reconnected_at = Arc::new(AtomicU64::new(0));
    let reconnected = reconnected_at.clone();
    let options = async_nats::ConnectOptions::new()
        .no_echo()
        .name(format!("fifobus-bridge {bus_id}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .client_capacity(256)
        .subscription_capacity(args.buffer.max(1024))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(2000))
        })
        .event_callback(move |event| {
            let m = nats_metrics.clone();
            let gen = gen.clone();
            let was = was_connected.clone();
            let reconnected = reconnected.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        m.nats_connected.store(1, Relaxed);
                        m.nats_error_said.store(false, Relaxed);
                        if was.swap(true, Relaxed) {
                            reconnected.store(since_start().as_millis().max(1) as u64, Relaxed);
                            m.reconnects_nats.fetch_add(1, Relaxed);
                            log(format_args!("nats: reconnected"));
                        } else {
                            log(format_args!("nats: connected"));
                        }
                    }
                    async_nats::Event::Disconnected => {
                        m.nats_connected.store(0, Relaxed);
                        gen.fetch_add(1, Relaxed);
                        log(format_args!(
                            "nats: disconnected; reconnecting (exports wait in the buffer, up to --buffer)"
                        ));
                    }
                    async_nats::Event::SlowConsumer(_) => {
                        m.import.dropped_unconfirmed.fetch_add(1, Relaxed);
                    }
                    // While unreachable, async-nats reports every failed
                    // attempt: said once per outage.
                    async_nats::Event::ClientError(e) => {
                        if !m.nats_error_said.swap(true, Relaxed) {
                            log(format_args!("nats: {e} (retrying; said once until connected)"));
                        }
                    }
                    other => log(format_args!("nats: {other}")),
                }
            }
        });
    let nats = match options.connect(args.nats.as_str()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fifobus-bridge: cannot use NATS at {}: {e}", args.nats);
            return ExitCode::FAILURE;
        }
    };
    if nats.connection_state() != async_nats::connection::State::Connected {
        log(format_args!(
            "nats: connecting to {} (retrying until it answers; exports wait in the buffer meanwhile)",
            args.nats
        ));
    }

    let export_bounds = Arc::new(Bounds {
        way: "export",
        metrics: metrics.clone(),
        max_bytes: args.buffer_bytes as u64,
        bytes: AtomicU64::new(0),
    });
    let import_bounds = Arc::new(Bounds {
        way: "import",
        metrics: metrics.clone(),
        max_bytes: args.buffer_bytes as u64,
        bytes: AtomicU64::new(0),
    });
    let (export_tx, export_rx) = tokio::sync::mpsc::channel(args.buffer);
    let (import_tx, import_rx) = std::sync::mpsc::sync_channel(args.buffer);
    let (wake_rd, wake_wr) =
        match nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("fifobus-bridge: cannot make a pipe: {e}");
                return ExitCode::FAILURE;
            }
        };

    // Imports: subscribe before the bus side starts publishing anything.
    let mut subscribers = Vec::new();
    for subject in &map.imports {
        match nats.subscribe(subject.clone()).await {
            Ok(s) => subscribers.push(s),
            Err(e) => {
                eprintln!("fifobus-bridge: cannot subscribe to '{subject}' on NATS: {e}");
                return ExitCode::FAILURE;
            }
        }
    }

    let side = bus::BusSide {
        dir,
        name: args.name.clone(),
        exports: map.exports.clone(),
        metrics: metrics.clone(),
        export: Buffer {
            tx: export_tx,
            bounds: export_bounds.clone(),
        },
        import: import_rx,
        import_buffer: import_bounds.clone(),
        wake: wake_rd,
        imports_ended: false,
    };
    let (bus_done_tx, bus_done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bus".into())
        .spawn(move || {
            let _ = bus_done_tx.send(side.run());
        })
        .expect("spawn the bus thread");

    tokio::spawn(export(
        nats.clone(),
        export_rx,
        export_bounds,
        map.clone(),
        bus_id.clone(),
        metrics.clone(),
        Link {
            disconnects,
            reconnected_at,
        },
    ));
    tokio::spawn(import(
        futures_util::stream::select_all(subscribers),
        import_tx,
        import_bounds,
        wake_wr,
        map,
        bus_id,
        metrics.clone(),
    ));
    tokio::spawn(report_drops(metrics.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        r = bus_done => {
            let why = r.unwrap_or_else(|_| "the bus thread ended".into());
            eprintln!("fifobus-bridge: {why}");
            ExitCode::FAILURE
        }
        _ = tokio::signal::ctrl_c() => stop(&nats).await,
        _ = term.recv() => stop(&nats).await,
    }
}

/// SIGINT/SIGTERM: what was handed to NATS is flushed (bounded), then exit.
async fn stop(nats: &async_nats::Client) -> ExitCode {
    let _ = tokio::time::timeout(Duration::from_secs(2), nats.flush()).await;
    log(format_args!("stopped"));
    ExitCode::SUCCESS
}

/// What the NATS connection's events tell the export pipeline.
struct Link {
    /// Disconnections so far: a batch during which it changed is unconfirmed.
    disconnects: Arc<AtomicU64>,
    /// When the last reconnect happened ([`since_start`], ms; 0: never).
    reconnected_at: Arc<AtomicU64>,
}

/// Largest batch published before one flush confirms it.
const BATCH: usize = 1024;
/// A flush slower than this counts its batch as unconfirmed.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// After a reconnect, how long exports still count as unconfirmed: the
/// other bridges' subscriptions come back with their own reconnects (at
/// most 2 s apart with the reconnect delay used here), and NATS core drops
/// a message that has no subscriber without telling the publisher.
const RESUBSCRIBE_GRACE: Duration = Duration::from_secs(5);

/// Bus -> NATS, one ordered pipeline: a batch is published, then one
/// flush (PING/PONG with the server) confirms it. A batch during which the
/// connection dropped may have been lost in the dead socket, and one sent
/// within [`RESUBSCRIBE_GRACE`] of a reconnect may have found the other
/// side not yet subscribed again: both are counted as dropped
/// (`reason="unconfirmed"`, an upper bound), never sent again, so nothing
/// arrives twice and order holds.
async fn export(
    nats: async_nats::Client,
    mut rx: tokio::sync::mpsc::Receiver<bus::Export>,
    bounds: Arc<Bounds>,
    map: Mapping,
    bus_id: String,
    metrics: Arc<Metrics>,
    link: Link,
) {
    let Link {
        disconnects,
        reconnected_at,
    } = link;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(ORIGIN, bus_id.as_str());
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let before = disconnects.load(Relaxed);
        let n = batch.len() as u64;
        let mut bytes = 0u64;
        let mut ok = true;
        for (topic, payload) in batch.drain(..) {
            bounds.take(payload.len());
            if !ok {
                continue;
            }
            bytes += payload.len() as u64;
            let subject = map.subject(&topic);
            if nats
                .publish_with_headers(subject, headers.clone(), payload)
                .await
                .is_err()
            {
                ok = false;
            }
        }
        let confirmed =
            ok && matches!(
                tokio::time::timeout(FLUSH_WAIT, nats.flush()).await,
                Ok(Ok(()))
            ) && disconnects.load(Relaxed) == before;
        let settled = since_start()
            .saturating_sub(Duration::from_millis(reconnected_at.load(Relaxed)))
            >= RESUBSCRIBE_GRACE
            || reconnected_at.load(Relaxed) == 0;
        if confirmed && settled {
            metrics.export.messages.fetch_add(n, Relaxed);
            metrics.export.bytes.fetch_add(bytes, Relaxed);
        } else {
            metrics.export.dropped_unconfirmed.fetch_add(n, Relaxed);
        }
    }
}

/// NATS -> bus: in arrival order, into the bus thread's buffer.
async fn import(
    mut subs: futures_util::stream::SelectAll<async_nats::Subscriber>,
    tx: std::sync::mpsc::SyncSender<bus::Import>,
    bounds: Arc<Bounds>,
    wake: std::os::fd::OwnedFd,
    map: Mapping,
    bus_id: String,
    metrics: Arc<Metrics>,
) {
    while let Some(msg) = subs.next().await {
        let own = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(ORIGIN))
            .is_some_and(|v| v.as_str() == bus_id);
        if own {
            metrics.looped.fetch_add(1, Relaxed);
            continue;
        }
        let topic = match map.topic(msg.subject.as_str()) {
            Ok(t) => t,
            Err(e) => {
                let n = metrics.invalid.fetch_add(1, Relaxed);
                // The first few, then every thousandth: a flood of bad
                // subjects must not flood the log.
                if n < 10 || n % 1000 == 0 {
                    log(format_args!("import: {e}; not published (counted in fifobus_bridge_invalid_subjects_total)"));
                }
                continue;
            }
        };
        let len = msg.payload.len();
        if !bounds.admit(len) {
            bounds.dropped();
            continue;
        }
        match tx.try_send((topic, msg.payload)) {
            Ok(()) => {
                let _ = nix::unistd::write(&wake, b"x");
            }
            Err(_) => {
                bounds.take(len);
                bounds.dropped();
            }
        }
    }
}

/// Once a second, a `DROPPED <n>` line per direction that lost messages.
async fn report_drops(metrics: Arc<Metrics>) {
    let mut last = [0u64; 2];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        for (i, (way, w)) in [("export", &metrics.export), ("import", &metrics.import)]
            .into_iter()
            .enumerate()
        {
            let now = w.dropped_buffer.load(Relaxed) + w.dropped_unconfirmed.load(Relaxed);
            if now > last[i] {
                log(format_args!(
                    "DROPPED {} {way} (total {now}): {}",
                    now - last[i],
                    if way == "export" {
                        "NATS unreachable or slow, the buffer full or a batch unconfirmed"
                    } else {
                        "the bus slow or away, the buffer full"
                    }
                ));
                last[i] = now;
            }
        }
    }
}
