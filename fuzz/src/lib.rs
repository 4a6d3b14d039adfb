//! What the fuzz targets check, one function per target.
//!
//! Each function takes the fuzzer's bytes and panics when an invariant the
//! protocol module documents does not hold, so AFL++ reports logic bugs as
//! crashes, not only panics inside the parsers. The same functions replay a
//! crashing input without AFL++ (the binaries built by plain `cargo build`)
//! and check the seed corpus under `cargo test`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::{Bytes, BytesMut};
use fifobus::protocol::{Command, Hello, Line, LineSplitter};

/// `Command::parse` on one line: never panics; a refusal is one line of
/// text a terminal shows harmlessly; an accepted command, encoded as a client
/// encodes it and read back as the broker reads it, is the same command.
pub fn check_command(data: &[u8]) {
    let parsed = Command::parse(Bytes::copy_from_slice(data));
    let cmd = match parsed {
        Err(e) => return check_error_text(&e.text, data),
        Ok(None) => {
            assert!(
                data.iter().all(|&b| b == b' '),
                "only an empty or all-space line is ignored: {data:?}"
            );
            return;
        }
        Ok(Some(cmd)) => cmd,
    };
    // The broker never hands parse a line holding '\n' (the splitter cut
    // there), and a payload holding one cannot be encoded: no round trip then.
    if data.contains(&b'\n') {
        return;
    }
    let mut wire = Vec::new();
    cmd.encode(&mut wire)
        .unwrap_or_else(|e| panic!("{cmd:?}, parsed from {data:?}, cannot be encoded: {e}"));
    assert_eq!(
        read_back(&wire),
        vec![cmd],
        "encode then parse changed the command; wire {wire:?}"
    );
}

/// What the broker makes of bytes a client wrote: lines split as a session
/// splits them, each parsed.
fn read_back(wire: &[u8]) -> Vec<Command> {
    let mut splitter = LineSplitter::new(usize::MAX);
    let mut buf = BytesMut::from(wire);
    let mut out = Vec::new();
    while let Some(line) = splitter.next_line(&mut buf) {
        let Line::Complete(line) = line else {
            unreachable!("no cap")
        };
        match Command::parse(line) {
            Ok(Some(c)) => out.push(c),
            other => panic!("an encoded command reads back as {other:?}; wire {wire:?}"),
        }
    }
    assert!(
        buf.is_empty(),
        "encoded bytes left after the last newline: {wire:?}"
    );
    out
}

/// `Hello::parse` on one line: never panics; a refusal names a reply path
/// only when it is one the broker may answer on (absolute, no NUL); an
/// accepted HELLO holds only valid fields, and encodes to one line that
/// parses back to the same HELLO (or is refused by `encode` exactly when its
/// reply path holds a control byte, which `encode` will not put on the wire).
pub fn check_hello(data: &[u8]) {
    let hello = match Hello::parse(data) {
        Err(r) => {
            if let Some(reply) = &r.reply {
                check_reply_path(reply);
            }
            return check_error_text(&r.error.text, data);
        }
        Ok(h) => h,
    };
    check_reply_path(&hello.reply);
    if let Some(pid) = hello.pid {
        assert!(pid > 0, "pid= {pid} accepted");
    }
    if let Some(name) = &hello.name {
        assert!(
            (1..=fifobus::protocol::hello::MAX_NAME_LEN).contains(&name.len()),
            "name= of {} bytes accepted",
            name.len()
        );
        assert!(
            !name
                .chars()
                .any(|c| c.is_control() || " \"\\,={}".contains(c)),
            "name= {name:?} would break a log line or a metric label"
        );
    }
    for (i, p) in hello.subs.iter().enumerate() {
        assert!(!hello.subs[..i].contains(p), "sub= {p:?} kept twice");
    }
    use std::os::unix::ffi::OsStrExt;
    let reply = hello.reply.as_os_str().as_bytes();
    match hello.encode() {
        Ok(line) => {
            assert_eq!(
                line.iter().position(|&b| b == b'\n'),
                Some(line.len() - 1),
                "an encoded HELLO is exactly one line: {line:?}"
            );
            let again = Hello::parse(&line[..line.len() - 1]);
            assert_eq!(
                again,
                Ok(hello),
                "HELLO changed in a round trip; wire {line:?}"
            );
        }
        Err(e) => assert!(
            reply.iter().any(u8::is_ascii_control),
            "encode refused a HELLO parse accepted ({e}): {hello:?}"
        ),
    }
}

fn check_reply_path(reply: &Path) {
    use std::os::unix::ffi::OsStrExt;
    assert!(reply.is_absolute(), "relative reply path {reply:?}");
    assert!(
        !reply.as_os_str().as_bytes().contains(&0),
        "reply path with NUL {reply:?}"
    );
}

/// Error texts go into `ERR` lines and logs: wire bytes must reach them
/// escaped, so no control character (a newline would end the `ERR` line and
/// start a line of the client's choosing) and nothing non-ASCII but the `…`
/// that marks a cut.
fn check_error_text(text: &str, input: &[u8]) {
    assert!(
        text.chars()
            .all(|c| c == '…' || (c.is_ascii() && !c.is_ascii_control())),
        "error text {text:?} carries raw input; input {input:?}"
    );
}

/// Splits `data` as described below and checks what `LineSplitter`
/// documents: however the stream is cut into reads, the same lines come out;
/// a line over the cap turns into exactly one `TooLong` and later lines still
/// work; no line given out is longer than the cap; and between reads the
/// buffer never holds more than the cap (bounded memory).
///
/// Layout of `data`: byte 0 is the cap (0..=63, small so that the fuzzer
/// reaches it); byte 1 is how many chunk sizes follow (0..=15); each chunk
/// size is 1..=32, used in turn; the rest is the stream.
pub fn check_lines(data: &[u8]) {
    let [cap, n, rest @ ..] = data else { return };
    let max_line = usize::from(cap % 64);
    let n = usize::from(n % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let sizes: Vec<usize> = sizes.iter().map(|&s| usize::from(s % 32) + 1).collect();

    let expected = model(max_line, stream);
    // As the reader splits: runs of `PUB` lines taken whole first, or not.
    for runs in [false, true] {
        let whole = split(max_line, stream, &[stream.len().max(1)], runs);
        assert_eq!(
            whole, expected,
            "one read, cap {max_line}, runs {runs}, stream {stream:?}"
        );
        let bytewise = split(max_line, stream, &[1], runs);
        assert_eq!(
            bytewise, expected,
            "byte by byte, cap {max_line}, runs {runs}, stream {stream:?}"
        );
        if !sizes.is_empty() {
            let chunked = split(max_line, stream, &sizes, runs);
            assert_eq!(
                chunked, expected,
                "reads of {sizes:?}, cap {max_line}, runs {runs}, stream {stream:?}"
            );
        }
    }
}

/// Lines given out, then what is left in the buffer.
type Split = (Vec<Line>, Vec<u8>);

/// The splitter's contract written the obvious way, over the whole stream.
fn model(max_line: usize, stream: &[u8]) -> Split {
    let mut lines = Vec::new();
    let mut pieces = stream.split(|&b| b == b'\n');
    let tail = pieces.next_back().unwrap_or_default();
    for raw in pieces {
        if raw.len() > max_line {
            lines.push(Line::TooLong);
        } else {
            let content = raw.strip_suffix(b"\r").unwrap_or(raw);
            lines.push(Line::Complete(Bytes::copy_from_slice(content)));
        }
    }
    // An unterminated tail over the cap is reported at once and dropped;
    // one within it waits in the buffer for the rest of its line.
    let left = if tail.len() > max_line {
        lines.push(Line::TooLong);
        Vec::new()
    } else {
        tail.to_vec()
    };
    (lines, left)
}

/// The stream cut into reads of `sizes` in turn; with `runs`, each run of
/// `PUB` lines the splitter takes whole is given out as the lines it was
/// (`MSG` back to `PUB`, newline off), so it compares with the model.
fn split(max_line: usize, stream: &[u8], sizes: &[usize], runs: bool) -> Split {
    let mut splitter = LineSplitter::new(max_line);
    assert_eq!(splitter.max_line(), max_line);
    let mut buf = BytesMut::new();
    let mut lines = Vec::new();
    let mut rest = stream;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (read, after) = rest.split_at(size.min(rest.len()));
        rest = after;
        buf.extend_from_slice(read);
        loop {
            if runs {
                if let Some(run) = splitter.take_pub_run(&mut buf, 1024) {
                    assert!(run.count >= 1, "an empty run");
                    for msg in run.msg_lines() {
                        let line = [&b"PUB"[..], &msg[3..msg.len() - 1]].concat();
                        assert!(msg.starts_with(b"MSG "), "{msg:?}");
                        assert!(line.len() <= max_line, "run line over cap {max_line}");
                        lines.push(Line::Complete(Bytes::from(line)));
                    }
                    continue;
                }
            }
            let Some(line) = splitter.next_line(&mut buf) else {
                break;
            };
            if let Line::Complete(l) = &line {
                assert!(
                    l.len() <= max_line,
                    "line of {} bytes over cap {max_line}",
                    l.len()
                );
                assert!(!l.contains(&b'\n'), "newline inside a line {l:?}");
            }
            lines.push(line);
        }
        assert!(
            buf.len() <= max_line,
            "{} bytes held between reads, cap {max_line}",
            buf.len()
        );
    }
    (lines, buf.to_vec())
}

/// The replayers' `main`: runs `check` on every file named on the command
/// line (a directory: on every file in it), naming each before it runs so
/// that a panic says which input it was.
pub fn replay_args(check: fn(&[u8])) -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if args.is_empty() {
        eprintln!("usage: {} FILE|DIR... (replays inputs through the fuzz check; build with `cargo afl build` to fuzz)",
            std::env::args().next().unwrap_or_default());
        return ExitCode::from(2);
    }
    let mut n = 0;
    for arg in args {
        for file in inputs(&arg) {
            let data = std::fs::read(&file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
            eprintln!("replaying {}", file.display());
            check(&data);
            n += 1;
        }
    }
    eprintln!("{n} inputs passed");
    ExitCode::SUCCESS
}

/// `path` itself, or the files in it (sorted) when it is a directory.
pub fn inputs(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", path.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(target: &str) -> Vec<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        let files = inputs(&dir);
        assert!(
            files.len() >= 10,
            "{}: a seed corpus of {} files",
            dir.display(),
            files.len()
        );
        files
    }

    fn replay(target: &str, check: fn(&[u8])) {
        for f in corpus(target) {
            let data = std::fs::read(&f).unwrap();
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                panic!("seed {} fails its check", f.display());
            }
        }
    }

    #[test]
    fn command_seeds_pass() {
        replay("command", check_command);
    }

    #[test]
    fn hello_seeds_pass() {
        replay("hello", check_hello);
    }

    #[test]
    fn lines_seeds_pass() {
        replay("lines", check_lines);
    }

    /// The model agrees with the splitter's own unit tests, so that a
    /// mismatch the fuzzer reports is the splitter's fault, not the model's.
    #[test]
    fn model_matches_the_documented_examples() {
        let c = |s: &'static [u8]| Line::Complete(Bytes::from_static(s));
        assert_eq!(
            model(4, b"abcd\nabcde\nok\n"),
            (vec![c(b"abcd"), Line::TooLong, c(b"ok")], vec![])
        );
        assert_eq!(
            model(100, b"a\r\r\n\r\nPU"),
            (vec![c(b"a\r"), c(b"")], b"PU".to_vec())
        );
        assert_eq!(
            model(2, b"ok\nabc"),
            (vec![c(b"ok"), Line::TooLong], vec![])
        );
    }

    #[test]
    #[should_panic(expected = "carries raw input")]
    fn error_text_check_refuses_a_newline() {
        check_error_text("bad\nOK", b"");
    }

    #[test]
    fn seeds_reach_every_command_and_hello_field() {
        let mut kinds = std::collections::BTreeSet::new();
        for f in corpus("command") {
            let data = std::fs::read(&f).unwrap();
            let kind = match Command::parse(Bytes::from(data)) {
                Ok(Some(Command::Sub(_))) => "sub",
                Ok(Some(Command::Unsub(_))) => "unsub",
                Ok(Some(Command::Pub { .. })) => "pub",
                Ok(Some(Command::Ping(_))) => "ping",
                Ok(Some(Command::Bye)) => "bye",
                Ok(Some(Command::SubWith(..))) => "sub-with",
                Ok(Some(Command::UnsubWith(..))) => "unsub-with",
                Ok(Some(Command::Retain { .. })) => "retain",
                Ok(Some(Command::Req { .. })) => "req",
                Ok(Some(Command::Serve(_))) => "serve",
                Ok(Some(Command::Unserve(_))) => "unserve",
                Ok(Some(Command::Respond { .. })) => "reply",
                Ok(None) => "empty",
                Err(_) => "error",
            };
            kinds.insert(kind);
        }
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            [
                "bye",
                "empty",
                "error",
                "ping",
                "pub",
                "reply",
                "req",
                "retain",
                "serve",
                "sub",
                "sub-with",
                "unserve",
                "unsub",
                "unsub-with"
            ]
        );
        let full = corpus("hello").into_iter().any(|f| {
            let h = Hello::parse(&std::fs::read(&f).unwrap());
            h.is_ok_and(|h| h.name.is_some() && h.pid.is_some() && h.subs.len() > 1)
        });
        assert!(full, "a seed HELLO with every field");
    }
}
