//! Command-line types (clap derive). No logic beyond parsing values.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::MetricsEndpoint;
use crate::router::OverflowPolicy;

const EXAMPLES: &str = "\
Examples:
  fifobus serve &                          # start a broker on the default directory
  fifobus sub 'chat.>' -v                  # print every chat message with its topic
  fifobus pub chat.room 'hello, world'     # publish one message
  tail -f app.log | fifobus pub logs.app   # publish one message per line
  cdir=$(fifobus connect --sub 'chat.>')   # a raw client: $cdir/send, $cdir/recv

Quote patterns: an unquoted > is a shell redirection.
The bus directory is --dir, else $FIFOBUS_DIR, else $XDG_RUNTIME_DIR/fifobus,
else /run/fifobus for root, else /tmp/fifobus-<uid>.
Durations take a unit (5s, 500ms, 1h) or are seconds (5, 0.5).
Clients in any language speak a line protocol on the FIFOs: docs/protocol.md in
the fifobus source (its README.md lists the rest of the documentation).";

#[derive(Debug, Parser)]
#[command(name = "fifobus", version, about = "A message broker for local processes over named pipes", after_help = EXAMPLES, args_override_self = true)]
pub struct Cli {
    /// Bus directory [default: $XDG_RUNTIME_DIR/fifobus, else /run/fifobus for root, else /tmp/fifobus-UID]
    #[arg(long, global = true, value_name = "DIR", env = "FIFOBUS_DIR")]
    pub dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker
    #[command(
        after_help = "Example:\n  fifobus serve --dir /run/user/1000/fifobus --overflow drop-newest\n\nStops on SIGINT or SIGTERM, saying BYE to every client and removing its FIFOs."
    )]
    Serve(ServeArgs),
    /// Connect a client and print its directory (holding the send and recv FIFOs)
    #[command(
        after_help = "Example:\n  cdir=$(fifobus connect --name logger --sub 'logs.>')\n  echo 'PUB logs.app started' > \"$cdir/send\"\n  read -r line < \"$cdir/recv\"\n\nWhat keeps the client alive:\n  By default the client ends when the process that ran fifobus connect exits (in\n  cdir=$(fifobus connect) that is the script, not the subshell of $(...): a parent\n  that is a forked copy of its own parent, same program and arguments, is skipped;\n  a calling process of another user, as under sudo -u, cannot be named: then none is).\n  --pid N ties it to process N instead. With --no-pid nothing does: say BYE when\n  done; the broker ends the client after --orphan-timeout (default 1h) without a\n  command on send or a read from recv, or sooner if the broker is full and it is\n  the idle-longest such client. See docs/protocol.md, \"Lifecycle\"."
    )]
    Connect(ConnectArgs),
    /// Publish one message, or one message per line of stdin
    #[command(
        after_help = "Examples:\n  fifobus pub chat.room 'hello'\n  printf 'a\\nb\\n' | fifobus pub chat.room\n  fifobus pub --retain sensors.temp 21.5   # later subscribers get it first\n  fifobus pub --retain sensors.temp ''     # clears it\n  printf 'temp.kitchen 21.5\\ntemp.cellar 12\\n' | fifobus pub --pairs\n\nExit status: 0 when the broker took every message; 1 when it refused one, when no broker\nruns or it went away, or on other errors; 2 on a bad command line."
    )]
    Pub(PubArgs),
    /// Print messages matching patterns until COUNT messages, a time limit, or SIGINT
    #[command(
        after_help = "Examples:\n  fifobus sub 'chat.>' -v\n  fifobus sub 'jobs.>' --queue workers        # share the jobs with the other workers\n  fifobus sub --lossless logs.app | slow-tool  # every line, in order, at its pace\n  reply=$(fifobus sub 'rpc.reply.42' -n 1 --timeout 5s) || echo 'no answer'\n  fifobus sub 'logs.>' --idle 30s   # until the logs go quiet for 30 s\n\nExit status: 0 after COUNT messages, or when the reader of stdout goes away; 124 when\n--timeout or --idle ends it first (as timeout(1)); 1 when no broker runs, the broker\nstops or goes away, or on other errors; 2 on a bad command line."
    )]
    Sub(SubArgs),
    /// Show the broker's throughput, backlogs, drops and errors (from its /metrics)
    #[command(
        after_help = "Example:\n  fifobus stats --interval 5s\n\nReads the endpoint from metrics.addr in the bus directory; needs the broker's metrics on."
    )]
    Stats(StatsArgs),
    /// Measure the broker against the bare FIFO ceiling: runs fifobus-bench (`fifobus bench --help` for its options)
    #[command(
        disable_help_flag = true,
        after_help = "Examples:\n  fifobus bench                # the full run, a few minutes\n  fifobus bench --quick --json # a smoke run, machine-readable\n\nRuns the fifobus-bench program next to this one (else the one on PATH) with these arguments,\nmeasuring this fifobus unless FIFOBUS_BENCH_BROKER names another. Build it with\n`cargo build --release -p fifobus-bench` (or `cargo build --release --workspace`)."
    )]
    Bench(BenchArgs),
    /// Bridge topics to and from other buses through NATS: runs fifobus-bridge (`fifobus bridge --help` for its options)
    #[command(
        disable_help_flag = true,
        after_help = "Example:\n  fifobus bridge --nats nats://hub:4222 --prefix site-a --export 'chat.>' --import 'site-b.chat.>' --import-strip site-b\n\nRuns the fifobus-bridge program next to this one (else the one on PATH) with these arguments,\non this bus (--dir). Build it with `cargo build --release -p fifobus-bridge`. See docs/scale-out.md."
    )]
    Bridge(BridgeArgs),
    /// Send a request and print the first answer
    #[command(
        after_help = "Examples:\n  fifobus req svc.echo 'hello'\n  now=$(fifobus req --timeout 500ms clock.now '') || echo \"no clock ($?)\"\n\nExit status: 0 with an answer, 3 when nobody serves the topic (at once),\n124 when no answer comes within --timeout, 1 on other errors."
    )]
    Req(ReqArgs),
    /// Answer requests on a topic, with a fixed text or a command's output
    #[command(
        after_help = "Examples:\n  fifobus reply svc.ping pong\n  fifobus reply svc.upper --command 'tr a-z A-Z'\n\nThe command runs once per request (sh -c), the payload on its stdin and the topic in\n$FIFOBUS_TOPIC; the first line of its output is the answer. Says 'serving PATTERN' on\nstderr once requests reach it."
    )]
    Reply(ReplyArgs),
    /// List the clients on the bus, or its topics (`fifobus ls topics`)
    #[command(
        after_help = "Examples:\n  fifobus ls\n  fifobus ls topics --json\n\nAsks the broker on the bus itself (a request on _bus.ls.clients or _bus.ls.topics),\nso it needs no metrics endpoint."
    )]
    Ls(LsArgs),
}

#[derive(Debug, Args)]
pub struct ReqArgs {
    pub topic: String,
    /// The request's payload (one line)
    pub payload: String,
    /// How long to wait for an answer (e.g. 5s, 500ms); then exit 124
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// A label for the broker's logs
    #[arg(long, default_value = "fifobus-req")]
    pub name: String,
    /// Also trust a bus directory and hello owned by this user (name or uid); by default only your own or root's are
    #[arg(long, env = "FIFOBUS_OWNER", value_name = "USER|UID", value_parser = parse_owner)]
    pub bus_owner: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ReplyArgs {
    /// Topic pattern to serve: `*` matches one segment, `>` the rest
    #[arg(value_name = "PATTERN")]
    pub pattern: String,
    /// The fixed answer
    #[arg(required_unless_present = "command", conflicts_with = "command")]
    pub text: Option<String>,
    /// Answer with the first line this shell command prints, given the payload on stdin
    #[arg(long, value_name = "CMD")]
    pub command: Option<String>,
    /// Exit after answering this many requests
    #[arg(short = 'n', long)]
    pub count: Option<u64>,
    /// A label for the broker's logs
    #[arg(long, default_value = "fifobus-reply")]
    pub name: String,
    /// Also trust a bus directory and hello owned by this user (name or uid); by default only your own or root's are
    #[arg(long, env = "FIFOBUS_OWNER", value_name = "USER|UID", value_parser = parse_owner)]
    pub bus_owner: Option<u32>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// What to list
    #[arg(value_parser = ["clients", "topics"], default_value = "clients")]
    pub what: String,
    /// Print the broker's answer as JSON
    #[arg(long)]
    pub json: bool,
    /// Also trust a bus directory and hello owned by this user (name or uid); by default only your own or root's are
    #[arg(long, env = "FIFOBUS_OWNER", value_name = "USER|UID", value_parser = parse_owner)]
    pub bus_owner: Option<u32>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Mode of the bus directory when the broker creates it (octal) [default: 700, or 755 with --shared]
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
    /// A bus for every local user (run as root, normally on /run/fifobus): anyone may write hello, each client's directory belongs to its user
    #[arg(long)]
    pub shared: bool,
    /// Take over from the broker running on this bus directory with nothing lost: it pauses, flushes, hands over its clients and exits without BYE (the systemd reload/upgrade path; SIGTERM still means stop and say BYE)
    #[arg(long)]
    pub replace: bool,
    /// With --replace: the new broker runs in the background and this command exits once it serves (0), or with its error; for systemd's ExecReload=, which must exit while the new broker becomes the service's main process (NotifyAccess=all)
    #[arg(long, requires = "replace")]
    pub detach: bool,
    /// Internal (set by --detach for the background broker): write "READY" on this inherited pipe once serving
    #[arg(long, hide = true)]
    pub ready_fd: Option<i32>,
    /// Longest accepted line on a client's send FIFO (e.g. 1MiB, 65536)
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    pub max_line: usize,
    /// Lines queued per client before the overflow policy applies (a bound on tiny lines; --backlog-bytes binds first for lines over 67 bytes)
    #[arg(long, default_value_t = 1_000_000)]
    pub backlog_messages: usize,
    /// Bytes queued per client before the overflow policy applies, counting the batch its writer holds
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub backlog_bytes: usize,
    /// What all clients together may hold in the broker: backlogs, batches being written, partial lines, subscriptions (e.g. 128MiB, 2GiB). When reached, the overflow policy applies to the largest backlogs first; subscriptions may take at most half of it (then SUB gets ERR too-many-subscriptions) [default: a quarter of the machine's memory (MemTotal in /proc/meminfo, or the cgroup's memory.max when lower), at least 64MiB]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<usize>,
    /// Subscriptions one client may hold; beyond it SUB gets ERR too-many-subscriptions and the client stays connected
    #[arg(long, default_value_t = 10_000)]
    pub max_subscriptions: usize,
    /// Topics that may have a retained message (RETAIN) at once; beyond it RETAIN on a new topic gets ERR retained-full
    #[arg(long, default_value_t = 10_000)]
    pub max_retained: usize,
    /// Bytes all retained messages may take (topic, payload and 64 bytes each; also counted in --max-memory)
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub max_retained_bytes: usize,
    /// What to do when a client's backlog is full
    #[arg(long, default_value = "drop-oldest", value_parser = overflow_parser())]
    pub overflow: OverflowPolicy,
    /// How long a client has to open its reply FIFO (e.g. 5s, 500ms)
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Largest pipe buffer a client FIFO grows to (F_SETPIPE_SZ). A quiet client's FIFOs have one page each; they double while traffic fills them, up to this
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub pipe_size: usize,
    /// How long a grown client FIFO must go without filling up before it shrinks back to one page (e.g. 1s, 200ms)
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub pipe_idle: Duration,
    /// Most clients at once [default: what the open-file limit allows]. When full, the client without pid= idle longest is ended to admit a new one
    #[arg(long)]
    pub max_clients: Option<usize>,
    /// End a client without pid= after this long with no command on its send and nothing read from its recv (e.g. 1h, 10m), or 'off'
    #[arg(long, default_value = "1h", value_name = "DURATION|off", value_parser = parse_timeout)]
    // Spelt out so clap takes the whole Option from the parser (`off`: None).
    pub orphan_timeout: ::std::option::Option<Duration>,
    /// Serve Prometheus /metrics and /healthz here (HOST:PORT; taken: an error at start), or 'off' [default: 127.0.0.1:9478, or, if that is taken, a free loopback port, logged and written to DIR/metrics.addr]
    #[arg(long, default_value = "default", hide_default_value = true)]
    pub metrics_addr: MetricsEndpoint,
    /// Topics with their own metric series; the rest are summed under topic="_other"
    #[arg(long, default_value_t = 1000)]
    pub metrics_topic_limit: usize,
    /// Client labels with their own metric series; the rest are summed under client="_other"
    #[arg(long, default_value_t = 1000)]
    pub metrics_client_limit: usize,
    /// Label metric series with topic names ('on'), or sum every topic into topic="_all" ('off') so /metrics names no topic
    #[arg(long, default_value = "on", value_name = "on|off", value_parser = on_off(), action = clap::ArgAction::Set)]
    pub metrics_topic_labels: bool,
    /// Label metric series with client names ('on'), or sum every client into client="_all" ('off') so /metrics names no client
    #[arg(long, default_value = "on", value_name = "on|off", value_parser = on_off(), action = clap::ArgAction::Set)]
    pub metrics_client_labels: bool,
    /// Require 'Authorization: Bearer <token>' on /metrics, the token being this file's content; the file must be the broker user's (or root's) and mode 600 (/healthz stays open)
    #[arg(long, value_name = "FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// Access control for a shared bus: who may publish and subscribe where, per-user limits (format: docs/acl.md). Reread on SIGHUP [default: none, everything allowed]
    #[arg(long, value_name = "FILE")]
    pub acl: Option<PathBuf>,
}

/// `fifobus bench ARGS...`: the arguments of `fifobus-bench`, passed on unparsed.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

/// `fifobus bridge ARGS...`: the arguments of `fifobus-bridge`, passed on unparsed.
#[derive(Debug, Args)]
pub struct BridgeArgs {
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Time between the two scrapes that rates are computed from (e.g. 5s, 500ms)
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Rows per table
    #[arg(long, default_value_t = 20)]
    pub rows: usize,
    /// Scrape this URL instead of the one recorded in the bus directory
    #[arg(long)]
    pub url: Option<String>,
    /// Send the bearer token in this file (the broker's --metrics-token-file, or a copy)
    #[arg(long, value_name = "FILE", env = "FIFOBUS_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// A label for logs
    #[arg(long)]
    pub name: Option<String>,
    /// Subscribe to this pattern before the client starts (repeatable)
    #[arg(long = "sub", value_name = "PATTERN")]
    pub subs: Vec<String>,
    /// End the client when process N exits [default: the process that ran fifobus connect, i.e. your script]
    #[arg(long, value_name = "N", conflicts_with = "no_pid")]
    pub pid: Option<i32>,
    /// Tie the client to no process: it lives until BYE, or until idle for the broker's --orphan-timeout (or idle longest when the broker is full)
    #[arg(long)]
    pub no_pid: bool,
    /// How long to wait for the broker's answer (e.g. 5s, 500ms)
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Also trust a bus directory and hello owned by this user (name or uid); by default only your own or root's are
    #[arg(long, env = "FIFOBUS_OWNER", value_name = "USER|UID", value_parser = parse_owner)]
    pub bus_owner: Option<u32>,
}

#[derive(Debug, Args)]
pub struct PubArgs {
    /// The topic to publish on: dot-separated segments, no wildcards (e.g. chat.room)
    #[arg(required_unless_present = "pairs")]
    pub topic: Option<String>,
    /// The message; without it, every line of stdin is one message
    pub message: Option<String>,
    /// Keep the message as the topic's retained one: every later subscription matching it gets it first. An empty MESSAGE clears it
    #[arg(long)]
    pub retain: bool,
    /// Read `TOPIC PAYLOAD` lines from stdin, each published on its own topic (one connection)
    #[arg(long, conflicts_with_all = ["topic", "message", "retain"])]
    pub pairs: bool,
    /// A label for the broker's logs
    #[arg(long, default_value = "fifobus-pub")]
    pub name: String,
    /// When the broker goes away (crash, restart), wait this long for it to come back and take this client over, then carry on; 0: exit at once
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    pub reconnect_timeout: Duration,
    /// Also trust a bus directory and hello owned by this user (name or uid); by default only your own or root's are
    #[arg(long, env = "FIFOBUS_OWNER", value_name = "USER|UID", value_parser = parse_owner)]
    pub bus_owner: Option<u32>,
}

#[derive(Debug, Args)]
pub struct SubArgs {
    /// Topic patterns: `*` matches one segment, `>` the rest
    #[arg(required = true, value_name = "PATTERN")]
    pub patterns: Vec<String>,
    /// Exit after this many messages
    #[arg(short = 'n', long)]
    pub count: Option<u64>,
    /// Print `topic payload` instead of the payload alone
    #[arg(short, long)]
    pub verbose: bool,
    /// Stop after this long in all, with status 124, as timeout(1) and mosquitto_sub -W do (e.g. 5s, 500ms, 5)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Stop with status 124 when no message arrives for this long (e.g. 30s)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub idle: Option<Duration>,
    /// Join the queue group NAME with these patterns: each message goes to one member of the group (round robin, passing over members that are behind)
    #[arg(long, value_name = "NAME")]
    pub queue: Option<String>,
    /// Never drop a message: when this reader falls behind by a full backlog, the broker stops reading the publishers of these topics until it catches up (their writes block, as on a pipe)
    #[arg(long, conflicts_with = "queue")]
    pub lossless: bool,
    /// Print each message as JSON ('json': topic, payload, time, ts) or by a template like mosquitto_sub -F: %t topic, %p payload, %I ISO time, %U Unix time, %% percent
    #[arg(short = 'F', long, value_name = "json|TEMPLATE", value_parser = crate::format::Format::parse, conflicts_with = "verbose")]
    pub format: Option<crate::format::Format>,
    /// A label for the broker's logs
    #[arg(long, default_value = "fifobus-sub")]
    pub name: String,
    /// When the broker goes away (crash, restart), wait this long for it to come back and take this client over, then carry on; 0: exit at once
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration)]
    pub reconnect_timeout: Duration,
    /// Also trust a bus directory and hello owned by this user (name or uid); by default only your own or root's are
    #[arg(long, env = "FIFOBUS_OWNER", value_name = "USER|UID", value_parser = parse_owner)]
    pub bus_owner: Option<u32>,
}

/// `on`/`off` switches (`--metrics-topic-labels off`).
fn on_off() -> impl clap::builder::TypedValueParser<Value = bool> {
    use clap::builder::{PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(["on", "off"]).map(|s| s == "on")
}

/// A duration such as `1h` or `90s`, or `off` (`None`).
fn parse_timeout(s: &str) -> Result<Option<Duration>, String> {
    if s == "off" || s == "none" {
        return Ok(None);
    }
    match parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(Some(d)),
        Ok(_) => Err(
            "a zero timeout would end every client at once; give a duration such as 1h, or 'off'"
                .into(),
        ),
        Err(e) => Err(format!("{e}, or 'off'")),
    }
}

/// Every duration flag: `5s`, `500ms`, `1h30m` (humantime's units), or bare
/// seconds (`5`, `0.5`), so that no flag takes one form and not the other.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bare = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let parsed = if bare {
        t.parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| "not a number of seconds".to_owned())
    } else {
        humantime::parse_duration(t).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| {
        format!("'{s}': {e} (give a duration such as 5s, 500ms or 1h, or a number of seconds)")
    })
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("'{s}' is not an octal mode such as 700 or 750"))
}

/// `--bus-owner`: a uid, or the name of an existing user.
fn parse_owner(s: &str) -> Result<u32, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map_err(|_| format!("'{s}' is not a uid (out of range)"));
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        Ok(None) => Err(format!("no user named '{s}' (give a user name or a uid)")),
        Err(e) => Err(format!("cannot look up user '{s}': {e}")),
    }
}

/// Parses `65536`, `64K`, `64KiB`, `1M`, `1MiB`, `1G` (binary multiples).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("'{s}': unknown unit (use K, M or G, e.g. 1MiB)")),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size such as 65536 or 1MiB"))?;
    n.checked_mul(1 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("'{s}' is out of range"))
}

/// `--overflow`: the policy names with their meaning, listed in `--help`.
/// (The router's policy type stays free of clap.)
fn overflow_parser() -> impl clap::builder::TypedValueParser<Value = OverflowPolicy> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new([
        PossibleValue::new("drop-oldest")
            .help("Discard the oldest queued lines to make room (the client sees the newest)"),
        PossibleValue::new("drop-newest").help("Discard the new line (the client sees the oldest)"),
        PossibleValue::new("disconnect")
            .help("End the client: its directory is removed and its reader sees EOF"),
    ])
    .map(|s| {
        s.parse::<OverflowPolicy>()
            .expect("every listed name parses")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_modes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("1TB").is_err());
        assert!(parse_size("0").is_err());
        assert_eq!(parse_mode("750"), Ok(0o750));
        assert!(parse_mode("9").is_err());
    }

    #[test]
    fn durations_take_units_and_bare_seconds() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "-1", "1e30", "nan", "5 parsecs", "1.2.3"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_timeout("off"), Ok(None));
        assert_eq!(parse_timeout("90"), Ok(Some(Duration::from_secs(90))));
        assert!(parse_timeout("0").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
