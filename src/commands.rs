//! The client subcommands: `connect`, `pub`, `sub`. They are ordinary
//! clients of the bus and talk to the broker only through its FIFOs.

use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::cli::{ConnectArgs, PubArgs, SubArgs};
use crate::client::{Client, ClientError, ConnectOptions, Handshake};
use crate::protocol::{
    encode_pub, encode_retain, Command, EncodeError, QueueName, Reply, SubOptions,
};
use crate::topic::{Pattern, Topic};

/// How long to wait for the broker's answer to a handshake or a barrier.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The `PING` token after `sub --queue`'s SUB lines.
const READY: &[u8] = b"fifobus-sub-ready";
/// Exit status when `sub --timeout` or `--idle` ends it, as timeout(1) uses.
pub const EXIT_TIMEOUT: u8 = 124;

/// A broker that went away (crashed, killed, restarting) may come back and
/// take this client over: `pub` and `sub` wait for it, for at most
/// `--reconnect-timeout`. With a zero timeout they exit at once, as before.
/// `who` names the command in the messages on stderr; `cause` (EOF,
/// `EPIPE`) is the error when it does not wait.
fn ride_out(
    client: &mut Client,
    timeout: Duration,
    who: &str,
    cause: impl Into<CommandError>,
) -> Result<(), CommandError> {
    if timeout.is_zero() {
        return Err(cause.into());
    }
    if !client.broker_away() {
        return Err(ClientError::Gone(client.dir().to_owned()).into());
    }
    eprintln!(
        "fifobus {who}: the broker went away; waiting up to {} for it to come back (--reconnect-timeout)",
        humantime::format_duration(timeout)
    );
    client.wait_for_broker(timeout)?;
    eprintln!(
        "fifobus {who}: the broker is back; carrying on in {}",
        client.dir().display()
    );
    Ok(())
}

/// A failure to report in one line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn patterns(raw: &[String]) -> Result<Vec<Pattern>, CommandError> {
    raw.iter()
        .map(|p| {
            Pattern::parse(p.as_bytes()).map_err(|e| {
                // `fifobus sub chat.> -v`: the shell took `>` as a redirection.
                let hint = if p.ends_with('.') {
                    format!(
                        "; the shell probably took an unquoted '>' as a redirection (and wrote a file named after the next word): quote the pattern, '{p}>'"
                    )
                } else {
                    String::new()
                };
                CommandError::Usage(format!("invalid pattern '{p}': {e}{hint}"))
            })
        })
        .collect()
}

/// The commands' handshake: a bus of the user's own, root's or the owner
/// named with `--bus-owner`; killed by SIGINT/SIGTERM meanwhile, they
/// remove their reply directory first (these commands are single-threaded,
/// as catching signals with a signalfd requires).
fn handshake(bus_owner: Option<u32>) -> Handshake {
    Handshake {
        bus_owner,
        catch_signals: true,
        no_echo: false,
    }
}

pub fn connect(dir: &Path, args: &ConnectArgs) -> Result<ExitCode, CommandError> {
    let pid = match (args.pid, args.no_pid) {
        (_, true) => None,
        (Some(p), false) => Some(p),
        (None, false) => Some(calling_process()).filter(|&p| runs_as_us(p)),
    };
    let opts = ConnectOptions {
        name: args.name.clone(),
        pid,
        subs: patterns(&args.subs)?,
    };
    let client = Client::connect_with(dir, &opts, args.timeout, &handshake(args.bus_owner))?;
    let (_, cdir) = client.into_parts();
    println!("{}", cdir.display());
    Ok(ExitCode::SUCCESS)
}

/// How many forked copies of a shell [`calling_process`] looks past.
const MAX_SUBSHELLS: usize = 8;

/// The process `fifobus connect` ties its client to by default: the one
/// that ran it, as the user means it: the script.
///
/// That is our parent, except when the parent is a subshell: in
/// `cdir=$(fifobus connect; ...)`, `$(a | b)`, or a dash function called in
/// `$(...)`, the shell forks a copy of itself to run the substitution, and
/// that copy exits as soon as we print the directory, which would end the
/// client at once. (For a plain `cdir=$(fifobus connect ...)` bash and dash
/// exec us from that fork, so our parent is the script itself.) A subshell
/// is a fork that did not exec: the same program with the same arguments as
/// its own parent. So while the parent and its parent are the same
/// executable with the same command line, look one level up.
///
/// The cost of a wrong guess is bounded and one-sided: the only other
/// processes that look like that are a shell started with no arguments from
/// the same shell (`bash` typed in `bash`), and then the client is tied to
/// the outer one and lives longer than the inner, as a pid-less client would.
fn calling_process() -> i32 {
    let mut pid = std::os::unix::process::parent_id() as i32;
    for _ in 0..MAX_SUBSHELLS {
        match parent_of(pid) {
            Some(up) if up > 1 && same_image(pid, up) => pid = up,
            _ => break,
        }
    }
    pid
}

/// Whether `pid` runs as our own (effective) user, or we are root. The
/// broker accepts `pid=` only for a process of the client's user, so a
/// calling process of another user (`sudo -u alice fifobus connect`, a
/// root test harness) cannot be the default: the client is then tied to
/// nothing and lives by the orphan rules, as with `--no-pid`.
fn runs_as_us(pid: i32) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    me == 0
        || std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
            })
            .is_some_and(|uid| uid == me)
}

/// The parent of `pid`, from `/proc/<pid>/stat` (the field after the
/// command name, which may itself hold spaces and parentheses).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Whether two processes run the same executable with the same command
/// line: one is a fork of the other that did not exec. `false` when either
/// cannot be read (another user's process, or gone).
fn same_image(a: i32, b: i32) -> bool {
    let exe = |p: i32| std::fs::read_link(format!("/proc/{p}/exe")).ok();
    let cmdline = |p: i32| std::fs::read(format!("/proc/{p}/cmdline")).ok();
    matches!((exe(a), exe(b)), (Some(x), Some(y)) if x == y)
        && matches!((cmdline(a), cmdline(b)), (Some(x), Some(y)) if x == y)
}

pub fn publish(dir: &Path, args: &PubArgs) -> Result<ExitCode, CommandError> {
    let Some(topic) = &args.topic else {
        return publish_pairs(dir, args);
    };
    let topic = Topic::parse(topic.as_bytes())
        .map_err(|e| CommandError::Usage(format!("invalid topic '{topic}': {e}")))?;
    // Encoded before connecting, so that bad input fails on its own.
    let mut message_line = Vec::new();
    if let Some(m) = &args.message {
        let encode = if args.retain {
            encode_retain
        } else {
            encode_pub
        };
        encode(&mut message_line, &topic, m.as_bytes()).map_err(|e| match e {
            EncodeError::Newline { .. } => CommandError::Usage(
                "the message contains a newline; to send one message per line, pipe them to stdin"
                    .into(),
            ),
            e => CommandError::Usage(e.to_string()),
        })?;
    }
    let opts = ConnectOptions {
        name: Some(args.name.clone()),
        pid: Some(std::process::id() as i32),
        subs: Vec::new(),
    };
    let mut client = Client::connect_with(dir, &opts, ANSWER_TIMEOUT, &handshake(args.bus_owner))?;
    let mut refusals = Refusals::default();
    let reconnect = args.reconnect_timeout;
    // Said when the broker went away for good (or at once, with
    // --reconnect-timeout 0), instead of "Broken pipe".
    let gone = |e| broker_left(dir, e);
    if args.message.is_some() {
        send_riding(&mut client, &message_line, reconnect).map_err(gone)?;
    } else {
        publish_lines(&mut client, &topic, args.retain, &mut refusals, reconnect).map_err(gone)?;
    }
    // The barrier: once PONG is back, every message was routed. A broker
    // that went away meanwhile may have taken the PING with it: ask again.
    let before = loop {
        match client.ping("pub-done", ANSWER_TIMEOUT) {
            Ok(lines) => break lines,
            Err(e @ ClientError::Closed) => ride_out(&mut client, reconnect, "pub", e)?,
            Err(ClientError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                ride_out(&mut client, reconnect, "pub", e).map_err(gone)?
            }
            Err(e) => return Err(e.into()),
        }
    };
    for line in before {
        refusals.note(&line);
    }
    for line in client.bye(ANSWER_TIMEOUT)? {
        refusals.note(&line);
    }
    Ok(if refusals.count == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What `pub` says when the broker went away for good (or at once, with
/// `--reconnect-timeout 0`): a stopped broker removed our directory, or
/// nobody reads our `send` any more. Instead of "Broken pipe".
fn broker_left(dir: &Path, e: CommandError) -> CommandError {
    let left = match &e {
        CommandError::Io(io) => io.kind() == io::ErrorKind::BrokenPipe,
        CommandError::Client(ClientError::Gone(_)) => true,
        _ => false,
    };
    if !left {
        return e;
    }
    CommandError::Usage(format!(
        "the broker on {} went away (our client is gone or nobody reads our send FIFO any more): has it stopped? Start one with: fifobus serve --dir {}",
        dir.display(),
        dir.display()
    ))
}

/// Remembers refusals from the broker, reporting the first one at once.
#[derive(Default)]
struct Refusals {
    count: u64,
}

impl Refusals {
    fn note(&mut self, line: &[u8]) {
        let first = self.count == 0;
        match Reply::parse(line) {
            Reply::Err { code, text } => {
                self.count += 1;
                if first {
                    eprintln!("fifobus pub: the broker refused a message: {code} {text}");
                }
            }
            Reply::Dropped(n) => {
                eprintln!("fifobus pub: the broker dropped {n} of its replies to us")
            }
            Reply::Restarted => eprintln!(
                "fifobus pub: the broker restarted after a crash; replies queued for us then may be lost"
            ),
            _ => {}
        }
    }
}

/// One connection for all of stdin. Each `read` of stdin becomes one write
/// to `send`: bulk input goes out in large batches, and a line typed (or
/// tailed) alone goes out at once.
fn publish_lines(
    client: &mut Client,
    topic: &Topic,
    retain: bool,
    refusals: &mut Refusals,
    reconnect: Duration,
) -> Result<(), CommandError> {
    use std::io::Read;
    let mut input = io::stdin().lock();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    let mut out = Vec::with_capacity(128 * 1024);
    loop {
        let n = match input.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        pending.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(i) = memchr::memchr(b'\n', &pending[start..]) {
            push_pub(&mut out, topic, &pending[start..start + i], retain);
            start += i + 1;
        }
        pending.drain(..start);
        if n == 0 && !pending.is_empty() {
            // A last line without its newline is still a message.
            push_pub(&mut out, topic, &pending, retain);
            pending.clear();
        }
        if !out.is_empty() {
            send_riding(client, &out, reconnect)?;
            out.clear();
            // Refusals arrive on recv; report them as they come.
            client.fill()?;
            while let Some(reply) = client.buffered_line() {
                refusals.note(&reply);
            }
        }
        if n == 0 {
            return Ok(());
        }
    }
}

/// Writes all of `bytes` to `send`; when the broker goes away (`EPIPE`),
/// waits for it to come back and writes the rest. Bytes already in the FIFO
/// stay there for the broker that comes back (this process holds it open);
/// what the old broker had read but not routed is lost with it.
fn send_riding(
    client: &mut Client,
    mut bytes: &[u8],
    reconnect: Duration,
) -> Result<(), CommandError> {
    while !bytes.is_empty() {
        match client.write_some(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                ride_out(client, reconnect, "pub", e)?
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `pub --pairs`: each stdin line is `TOPIC PAYLOAD` (the payload is what
/// follows the first space, as in `PUB`), all over one connection. A line
/// with an invalid topic is reported with its number and skipped; the
/// others are still published, and the exit status is then 1.
fn publish_pairs(dir: &Path, args: &PubArgs) -> Result<ExitCode, CommandError> {
    use std::io::BufRead;
    let opts = ConnectOptions {
        name: Some(args.name.clone()),
        pid: Some(std::process::id() as i32),
        subs: Vec::new(),
    };
    let mut client = Client::connect_with(dir, &opts, ANSWER_TIMEOUT, &handshake(args.bus_owner))?;
    let mut refusals = Refusals::default();
    let mut bad = 0u64;
    let mut out = Vec::new();
    let mut input = io::BufReader::with_capacity(64 * 1024, io::stdin().lock());
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let l = line.strip_suffix(b"\n").unwrap_or(&line);
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        if l.is_empty() {
            continue;
        }
        let (t, payload) = match memchr::memchr(b' ', l) {
            Some(i) => (&l[..i], &l[i + 1..]),
            None => (l, &b""[..]),
        };
        match Topic::parse(t) {
            Ok(topic) => encode_pub(&mut out, &topic, payload).expect("a line holds no newline"),
            Err(e) => {
                bad += 1;
                eprintln!(
                    "fifobus pub: line {number}: invalid topic '{}': {e}; line skipped",
                    String::from_utf8_lossy(t)
                );
            }
        }
        // Flushed when stdin has nothing more at hand, so a line typed alone goes out at once.
        if out.len() >= 64 * 1024 || input.buffer().is_empty() {
            client.send_raw(&out)?;
            out.clear();
        }
    }
    client.send_raw(&out)?;
    for line in client.ping("pub-done", ANSWER_TIMEOUT)? {
        refusals.note(&line);
    }
    for line in client.bye(ANSWER_TIMEOUT)? {
        refusals.note(&line);
    }
    Ok(if refusals.count == 0 && bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One stdin line as a `PUB`. One trailing `\r` is dropped, as the broker
/// drops it from the lines it reads, so that CRLF input publishes the same
/// payloads as LF input. With `--retain`, a `RETAIN` (the last line stays).
fn push_pub(out: &mut Vec<u8>, topic: &Topic, line: &[u8], retain: bool) {
    let payload = line.strip_suffix(b"\r").unwrap_or(line);
    let encode = if retain { encode_retain } else { encode_pub };
    encode(out, topic, payload).expect("a line split at newlines holds none");
}

pub fn subscribe(dir: &Path, args: &SubArgs) -> Result<ExitCode, CommandError> {
    // --timeout is a total limit, counted from the start as timeout(1)
    // does; --idle restarts with every message.
    let start = Instant::now();
    let deadline = args.timeout.map(|t| start + t);
    let patterns = patterns(&args.patterns)?;
    let queue = match &args.queue {
        Some(q) => Some(
            QueueName::parse(q.as_bytes())
                .map_err(|e| CommandError::Usage(format!("--queue: {e}")))?,
        ),
        None => None,
    };
    // Subscriptions with options are SUB lines after the handshake (sub= in
    // HELLO takes plain patterns); the PONG after them says they are in force.
    let opts = SubOptions {
        queue,
        lossless: args.lossless,
    };
    let (subs, queued) = match opts.is_plain() {
        true => (patterns, Vec::new()),
        false => {
            let lines = patterns
                .into_iter()
                .map(|p| Command::SubWith(p, opts.clone()))
                .collect();
            (Vec::new(), lines)
        }
    };
    let opts = ConnectOptions {
        name: Some(args.name.clone()),
        pid: Some(std::process::id() as i32),
        subs,
    };
    let answer = args
        .timeout
        .map_or(ANSWER_TIMEOUT, |t| t.min(ANSWER_TIMEOUT));
    let mut client = Client::connect_with(dir, &opts, answer, &handshake(args.bus_owner))?;
    let mut last_message = Instant::now();
    let mut ready = queued.is_empty();
    if !ready {
        let mut lines = Vec::new();
        for c in &queued {
            c.encode(&mut lines).expect("validated words");
        }
        Command::Ping(Some(READY.into()))
            .encode(&mut lines)
            .expect("a valid token");
        client.send_raw(&lines)?;
    }
    // Buffered: a burst of messages becomes one write(2); it is flushed
    // before every wait, so each line still shows as soon as it arrives.
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut seen = 0u64;
    if args.count == Some(0) {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        while let Some(line) = client.buffered_line() {
            match Reply::parse(&line) {
                Reply::Msg { topic, payload } => {
                    let written = if let Some(f) = &args.format {
                        let mut line = Vec::new();
                        f.render(&mut line, topic, payload, std::time::SystemTime::now());
                        out.write_all(&line)
                    } else {
                        write_plain(&mut out, args.verbose, topic, payload)
                    };
                    if let Err(e) = written {
                        return reader_gone(e, client);
                    }
                    seen += 1;
                    last_message = Instant::now();
                    if Some(seen) == args.count {
                        if let Err(e) = out.flush() {
                            return reader_gone(e, client);
                        }
                        leave(client);
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                Reply::Dropped(n) => {
                    // Flush first, so the notice stands where the gap is.
                    let _ = out.flush();
                    eprintln!(
                        "fifobus sub: the broker dropped {n} messages (this reader fell behind)"
                    )
                }
                Reply::Restarted => {
                    let _ = out.flush();
                    eprintln!("fifobus sub: the broker restarted after a crash; messages queued for this reader then may be lost (the subscription goes on)")
                }
                Reply::Err { code, text } => {
                    let _ = out.flush();
                    eprintln!("fifobus sub: broker error: {code} {text}");
                    if !ready {
                        // A SUB of ours was refused.
                        leave(client);
                        return Ok(ExitCode::FAILURE);
                    }
                }
                Reply::Pong(Some(READY)) => ready = true,
                Reply::Bye => {
                    let _ = out.flush();
                    eprintln!("fifobus sub: the broker is shutting down");
                    return Ok(ExitCode::FAILURE);
                }
                Reply::Pong(_)
                | Reply::Welcome { .. }
                | Reply::Request { .. }
                | Reply::Answer { .. }
                | Reply::Unknown(_) => {}
            }
        }
        if let Err(e) = out.flush() {
            return reader_gone(e, client);
        }
        // Every complete line has been handled; only now does EOF end us,
        // unless the broker only went away (its directory is still here)
        // and comes back in time.
        if client.at_eof() && args.reconnect_timeout > Duration::ZERO && client.broker_away() {
            ride_out(
                &mut client,
                args.reconnect_timeout,
                "sub",
                ClientError::Closed,
            )?;
            continue;
        }
        if client.at_eof() {
            if !client.partial_line().is_empty() {
                eprintln!(
                    "fifobus sub: incomplete last line: {}",
                    String::from_utf8_lossy(client.partial_line())
                );
            }
            eprintln!("fifobus sub: the broker closed the connection");
            return Ok(ExitCode::FAILURE);
        }
        let idle_end = args.idle.map(|d| last_message + d);
        let wake_at = match (deadline, idle_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let wait = wake_at.map(|t| t.saturating_duration_since(Instant::now()));
        match wait_for_input(&client, wait)? {
            Wake::Input => client.fill()?,
            Wake::ReaderGone => {
                leave(client);
                return Ok(ExitCode::SUCCESS);
            }
            Wake::TimedOut => {
                // poll may wake a little early; only a limit that has
                // passed ends us.
                let now = Instant::now();
                let why = if deadline.is_some_and(|d| now >= d) {
                    let t = args.timeout.unwrap_or_default();
                    format!("--timeout {} passed", humantime::format_duration(t))
                } else if idle_end.is_some_and(|d| now >= d) {
                    let t = args.idle.unwrap_or_default();
                    format!(
                        "no message within {} (--idle)",
                        humantime::format_duration(t)
                    )
                } else {
                    continue;
                };
                leave(client);
                let _ = out.flush();
                eprintln!("fifobus sub: {why} after {seen} messages");
                return Ok(ExitCode::from(EXIT_TIMEOUT));
            }
        }
    }
}

/// A message as `sub` prints it without `--format`: the payload, after
/// its topic and a space with `-v`.
fn write_plain(out: &mut impl Write, verbose: bool, topic: &str, payload: &[u8]) -> io::Result<()> {
    if verbose {
        out.write_all(topic.as_bytes())?;
        out.write_all(b" ")?;
    }
    out.write_all(payload)?;
    out.write_all(b"\n")
}

/// Writing to stdout failed: a closed pipe (`| head -1`) is a normal end.
fn reader_gone(e: io::Error, client: Client) -> Result<ExitCode, CommandError> {
    leave(client);
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(e.into())
    }
}

/// Says BYE and waits briefly for the broker's answer, so the client ends
/// cleanly rather than by its pid disappearing. Failures do not matter here:
/// the broker removes the client when this process exits anyway.
fn leave(client: Client) {
    let _ = client.bye(Duration::from_secs(1));
}

enum Wake {
    Input,
    ReaderGone,
    TimedOut,
}

/// Waits for `recv` to have data, for stdout's reader to go away (a pipe
/// with no reader polls as `POLLERR` even when we are not writing), or for
/// the timeout.
fn wait_for_input(client: &Client, timeout: Option<Duration>) -> io::Result<Wake> {
    let stdout = io::stdout();
    let poll_timeout = match timeout {
        None => PollTimeout::NONE,
        Some(t) => PollTimeout::try_from(t.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX),
    };
    loop {
        let mut fds = [
            PollFd::new(client.recv_fd(), PollFlags::POLLIN),
            PollFd::new(stdout.as_fd(), PollFlags::empty()),
        ];
        match poll(&mut fds, poll_timeout) {
            Ok(0) => return Ok(Wake::TimedOut),
            Ok(_) => {
                let gone = PollFlags::POLLERR | PollFlags::POLLHUP;
                if fds[1].revents().is_some_and(|r| r.intersects(gone)) {
                    return Ok(Wake::ReaderGone);
                }
                return Ok(Wake::Input);
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
