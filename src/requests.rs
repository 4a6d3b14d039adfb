//! `fifobus req`, `fifobus reply` and `fifobus ls`: the command-line sides
//! of request/reply (docs/protocol.md, "Requests"). Like `pub` and `sub`,
//! they are plain clients of the FIFOs.

use std::io::{self, Write};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{LsArgs, ReplyArgs, ReqArgs};
use crate::client::{Client, ClientError, ConnectOptions, Handshake};
use crate::commands::{CommandError, EXIT_TIMEOUT};
use crate::protocol::{encode_req, encode_respond, Command, EncodeError, ErrorCode, Reply};
use crate::topic::{Pattern, Topic};

/// Exit status of `fifobus req` when nobody serves the topic: its own, so
/// that a script tells "nobody there" from "too slow" (124) and errors (1).
pub const EXIT_NO_RESPONDERS: u8 = 3;
/// How long to wait for the broker's handshake and barriers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The id `fifobus req` and `fifobus ls` give their one request.
const ID: &str = "1";

fn handshake(bus_owner: Option<u32>) -> Handshake {
    Handshake {
        bus_owner,
        catch_signals: true,
        no_echo: false,
    }
}

fn connect(dir: &Path, name: &str, bus_owner: Option<u32>) -> Result<Client, CommandError> {
    let opts = ConnectOptions {
        name: Some(name.to_owned()),
        pid: Some(std::process::id() as i32),
        subs: Vec::new(),
    };
    Ok(Client::connect_with(
        dir,
        &opts,
        ANSWER_TIMEOUT,
        &handshake(bus_owner),
    )?)
}

/// How one request ended.
enum Outcome {
    Answer(Vec<u8>),
    NoResponders,
    TimedOut,
}

/// Sends `REQ 1 <topic> <payload>` and waits for its answer.
fn ask(
    client: &mut Client,
    topic: &Topic,
    payload: &[u8],
    timeout: Duration,
) -> Result<Outcome, CommandError> {
    let mut line = Vec::new();
    encode_req(&mut line, ID.as_bytes(), topic, payload).map_err(|e| match e {
        EncodeError::Newline { .. } => {
            CommandError::Usage("the payload contains a newline; a request is one line".into())
        }
        e => CommandError::Usage(e.to_string()),
    })?;
    client.send_raw(&line)?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match client.read_line(Some(left)) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(ClientError::Closed.into()),
            Err(ClientError::Timeout(_)) => return Ok(Outcome::TimedOut),
            Err(e) => return Err(e.into()),
        };
        match Reply::parse(&line) {
            Reply::Answer { id, payload } if id == ID => {
                return Ok(Outcome::Answer(payload.to_vec()))
            }
            r @ Reply::Err { code, text } => {
                if r.error_code() == Some(ErrorCode::NoResponders) && text == ID {
                    return Ok(Outcome::NoResponders);
                }
                return Err(CommandError::Usage(format!(
                    "the broker refused the request: {code} {text}"
                )));
            }
            Reply::Bye => return Err(ClientError::Closed.into()),
            _ => {}
        }
    }
}

pub fn request(dir: &Path, args: &ReqArgs) -> Result<ExitCode, CommandError> {
    let topic = Topic::parse(args.topic.as_bytes())
        .map_err(|e| CommandError::Usage(format!("invalid topic '{}': {e}", args.topic)))?;
    if args.payload.contains('\n') {
        return Err(CommandError::Usage(
            "the payload contains a newline; a request is one line".into(),
        ));
    }
    let mut client = connect(dir, &args.name, args.bus_owner)?;
    let outcome = ask(&mut client, &topic, args.payload.as_bytes(), args.timeout)?;
    let _ = client.bye(Duration::from_secs(1));
    match outcome {
        Outcome::Answer(payload) => {
            let mut out = io::stdout().lock();
            match out
                .write_all(&payload)
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| out.flush())
            {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
            Ok(ExitCode::SUCCESS)
        }
        Outcome::NoResponders => {
            eprintln!("fifobus req: no responders on {topic} (nobody serves it: start one with fifobus reply {topic} ...)");
            Ok(ExitCode::from(EXIT_NO_RESPONDERS))
        }
        Outcome::TimedOut => {
            eprintln!(
                "fifobus req: no answer on {topic} within {}",
                humantime::format_duration(args.timeout)
            );
            Ok(ExitCode::from(EXIT_TIMEOUT))
        }
    }
}

pub fn reply(dir: &Path, args: &ReplyArgs) -> Result<ExitCode, CommandError> {
    let pattern = Pattern::parse(args.pattern.as_bytes())
        .map_err(|e| CommandError::Usage(format!("invalid pattern '{}': {e}", args.pattern)))?;
    if let Some(t) = &args.text {
        if t.contains('\n') {
            return Err(CommandError::Usage(
                "the answer contains a newline; an answer is one line".into(),
            ));
        }
    }
    let mut client = connect(dir, &args.name, args.bus_owner)?;
    client.send(&Command::Serve(pattern.clone()))?;
    for line in client.ping("serving", ANSWER_TIMEOUT)? {
        if let Reply::Err { code, text } = Reply::parse(&line) {
            return Err(CommandError::Usage(format!(
                "the broker refused to serve {pattern}: {code} {text}"
            )));
        }
    }
    eprintln!("fifobus reply: serving {pattern}");
    let mut answered = 0u64;
    if args.count == Some(0) {
        let _ = client.bye(Duration::from_secs(1));
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        let Some(line) = client.read_line(None)? else {
            eprintln!("fifobus reply: the broker closed the connection");
            return Ok(ExitCode::FAILURE);
        };
        match Reply::parse(&line) {
            Reply::Request {
                handle,
                topic,
                payload,
            } => {
                let answer = match (&args.text, &args.command) {
                    (Some(t), _) => t.as_bytes().to_vec(),
                    (None, Some(cmd)) => run(cmd, topic, payload)?,
                    (None, None) => unreachable!("clap requires TEXT or --command"),
                };
                let mut out = Vec::new();
                encode_respond(&mut out, handle.as_bytes(), &answer)
                    .expect("a first line holds no newline; the handle came from the broker");
                client.send_raw(&out)?;
                answered += 1;
                if Some(answered) == args.count {
                    let _ = client.bye(Duration::from_secs(1));
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Reply::Err { code, text } => eprintln!("fifobus reply: broker error: {code} {text}"),
            Reply::Dropped(n) => {
                eprintln!(
                    "fifobus reply: the broker dropped {n} requests (this responder fell behind)"
                )
            }
            Reply::Bye => {
                eprintln!("fifobus reply: the broker is shutting down");
                return Ok(ExitCode::FAILURE);
            }
            _ => {}
        }
    }
}

/// Runs `sh -c cmd` with `payload` and a newline on its stdin and the
/// topic in `$FIFOBUS_TOPIC`; returns the first line of its output (empty
/// if it printed none). A failing command still answers with what it
/// printed, its status reported on stderr: the requester should not wait
/// for a timeout because a script exited non-zero.
fn run(cmd: &str, topic: &str, payload: &[u8]) -> Result<Vec<u8>, CommandError> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("FIFOBUS_TOPIC", topic)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CommandError::Usage(format!("cannot run sh -c '{cmd}': {e}")))?;
    // Written from a thread: a command that prints much before reading
    // (or never reads) must not deadlock against us.
    let mut stdin = child.stdin.take().expect("piped");
    let input = [payload, b"\n"].concat();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let output = child.wait_with_output()?;
    let _ = writer.join();
    if !output.status.success() {
        eprintln!("fifobus reply: '{cmd}' ended with {}", output.status);
    }
    let first = output
        .stdout
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default();
    Ok(first.strip_suffix(b"\r").unwrap_or(first).to_vec())
}

pub fn ls(dir: &Path, args: &LsArgs) -> Result<ExitCode, CommandError> {
    let topic = Topic::parse(format!("_bus.ls.{}", args.what).as_bytes()).expect("a valid topic");
    let mut client = connect(dir, "fifobus-ls", args.bus_owner)?;
    let me = client.id().to_owned();
    let outcome = ask(&mut client, &topic, b"", ANSWER_TIMEOUT)?;
    let _ = client.bye(Duration::from_secs(1));
    let Outcome::Answer(body) = outcome else {
        return Err(CommandError::Usage(format!(
            "the broker did not answer {topic}: is it an older version?"
        )));
    };
    let mut value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| CommandError::Usage(format!("the broker's answer is not JSON: {e}")))?;
    if let serde_json::Value::Array(rows) = &mut value {
        // Not ourselves: we exist only to ask.
        rows.retain(|r| r["uuid"] != me.as_str());
    }
    let text = if args.json {
        format!("{value}\n")
    } else if args.what == "clients" {
        clients_table(&value)
    } else {
        topics_table(&value)
    };
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) if a.is_empty() => "-".into(),
        serde_json::Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        v => v.to_string(),
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for r in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn clients_table(v: &serde_json::Value) -> String {
    let rows = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                cell(&c["name"]),
                cell(&c["uuid"]),
                cell(&c["pid"]),
                cell(&c["subscriptions"]),
                cell(&c["serves"]),
                format!(
                    "{}/{}B",
                    cell(&c["backlog_lines"]),
                    cell(&c["backlog_bytes"])
                ),
                format!("{}s", cell(&c["age_secs"])),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "UUID",
            "PID",
            "SUBSCRIPTIONS",
            "SERVES",
            "BACKLOG",
            "AGE",
        ],
        rows,
    )
}

fn topics_table(v: &serde_json::Value) -> String {
    let mut rows: Vec<Vec<String>> = v["topics"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            vec![
                cell(&t["topic"]),
                cell(&t["subscribers"]),
                cell(&t["published"]),
                cell(&t["responders"]),
            ]
        })
        .collect();
    let mut out = table(
        &["TOPIC", "SUBSCRIBERS", "PUBLISHED", "RESPONDERS"],
        std::mem::take(&mut rows),
    );
    let patterns = v["patterns"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            vec![
                cell(&p["pattern"]),
                cell(&p["subscribers"]),
                cell(&p["responders"]),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(&["PATTERN", "SUBSCRIBERS", "RESPONDERS"], patterns));
    out
}
