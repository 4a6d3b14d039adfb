//! The rendezvous line: `HELLO reply=<fifo> [name=<label>] [pid=<pid>] [sub=<p>[,<p>...]] [echo=no]`.
//!
//! Parsing is strict about field names (a typo such as `subs=` is an error,
//! not a silently ignored field) and keeps the reply path even when another
//! field is bad, so the broker can still send the client its `ERR` line.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::error::{ErrorCode, ProtocolError};
use super::escape_for_display;
use crate::topic::Pattern;

/// HELLO lines must fit in one atomic pipe write (PIPE_BUF on Linux), or
/// concurrent writers on `hello` could interleave.
pub const MAX_HELLO_LINE: usize = 4096;
/// Labels are for logs and metrics, never paths; keep them short.
pub const MAX_NAME_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub reply: PathBuf,
    pub name: Option<String>,
    pub pid: Option<i32>,
    pub subs: Vec<Pattern>,
    /// `echo=no`: the client's own `PUB`s are not delivered back to it,
    /// however its subscriptions overlap them. A bridge needs this: what it
    /// publishes on the bus came from elsewhere and must not go back out.
    /// `false` (the default, `echo=yes`) keeps pub/sub's plain rule.
    pub no_echo: bool,
}

/// A refused HELLO. `reply` is set when the line named a usable reply path,
/// so the refusal can be answered there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRejected {
    pub reply: Option<PathBuf>,
    pub error: ProtocolError,
}

impl Hello {
    /// # Errors
    /// [`HelloRejected`] with `bad-hello`, `bad-reply`, `bad-pattern` or `bad-pid`.
    pub fn parse(line: &[u8]) -> Result<Hello, HelloRejected> {
        let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let reject = |reply: Option<PathBuf>, code, text: String| HelloRejected {
            reply,
            error: ProtocolError::new(code, text),
        };
        match words.next() {
            Some(w) if w.eq_ignore_ascii_case(b"HELLO") => {}
            _ => {
                return Err(reject(
                    None,
                    ErrorCode::BadHello,
                    format!(
                        "expected 'HELLO reply=<fifo> ...', got '{}'",
                        escape_for_display(line, 40)
                    ),
                ))
            }
        }
        let fields: Vec<&[u8]> = words.collect();
        // Find reply= first, so every later refusal can be answered.
        let mut reply = None;
        for f in &fields {
            if let Some(v) = f.strip_prefix(b"reply=") {
                if reply.is_some() {
                    return Err(reject(
                        None,
                        ErrorCode::BadHello,
                        "reply= given twice".into(),
                    ));
                }
                reply = Some(v);
            }
        }
        let Some(raw_reply) = reply else {
            return Err(reject(
                None,
                ErrorCode::BadHello,
                "missing reply=<absolute path of a FIFO>".into(),
            ));
        };
        let reply_path = PathBuf::from(OsStr::from_bytes(raw_reply));
        if !reply_path.is_absolute() || raw_reply.contains(&0) {
            return Err(reject(
                None,
                ErrorCode::BadReply,
                format!(
                    "reply= must be an absolute path, got '{}'",
                    escape_for_display(raw_reply, 80)
                ),
            ));
        }
        let answerable = Some(reply_path.clone());
        let mut hello = Hello {
            reply: reply_path,
            name: None,
            pid: None,
            subs: Vec::new(),
            no_echo: false,
        };
        let mut echo_seen = false;
        for f in fields {
            let (key, value) = match memchr::memchr(b'=', f) {
                Some(i) => (&f[..i], &f[i + 1..]),
                None => (f, &b""[..]),
            };
            match key {
                b"reply" => {}
                b"name" => {
                    if hello.name.is_some() {
                        return Err(reject(
                            answerable,
                            ErrorCode::BadHello,
                            "name= given twice".into(),
                        ));
                    }
                    hello.name = Some(
                        parse_name(value)
                            .map_err(|t| reject(answerable.clone(), ErrorCode::BadHello, t))?,
                    );
                }
                b"pid" => {
                    if hello.pid.is_some() {
                        return Err(reject(
                            answerable,
                            ErrorCode::BadHello,
                            "pid= given twice".into(),
                        ));
                    }
                    hello.pid = Some(
                        parse_pid(value)
                            .map_err(|t| reject(answerable.clone(), ErrorCode::BadPid, t))?,
                    );
                }
                b"sub" => {
                    for p in value.split(|&b| b == b',') {
                        let pattern = Pattern::parse(p).map_err(|e| {
                            reject(
                                answerable.clone(),
                                ErrorCode::BadPattern,
                                format!("sub= pattern '{}': {e}", escape_for_display(p, 64)),
                            )
                        })?;
                        if !hello.subs.contains(&pattern) {
                            hello.subs.push(pattern);
                        }
                    }
                }
                b"echo" => {
                    if echo_seen {
                        return Err(reject(
                            answerable,
                            ErrorCode::BadHello,
                            "echo= given twice".into(),
                        ));
                    }
                    echo_seen = true;
                    hello.no_echo = match value {
                        b"yes" => false,
                        b"no" => true,
                        _ => {
                            return Err(reject(
                                answerable,
                                ErrorCode::BadHello,
                                format!(
                                    "echo= must be 'yes' or 'no', got '{}'",
                                    escape_for_display(value, 20)
                                ),
                            ))
                        }
                    };
                }
                _ => {
                    return Err(reject(
                        answerable,
                        ErrorCode::BadHello,
                        format!(
                            "unknown field '{}' (known: reply= name= pid= sub= echo=)",
                            escape_for_display(key, 32)
                        ),
                    ))
                }
            }
        }
        Ok(hello)
    }

    /// Encodes this HELLO as a line (with its newline), as a client sends it.
    ///
    /// # Errors
    /// When a field would break the line: a reply path that is relative or
    /// holds a space or a control byte, or a name [`Hello::parse`] would
    /// refuse. Checked here so that a client cannot inject a second line.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let reply = self.reply.as_os_str().as_bytes();
        if !self.reply.is_absolute() || reply.iter().any(|&b| b == b' ' || b.is_ascii_control()) {
            return Err(format!(
                "reply path '{}' must be absolute, without spaces or control characters",
                escape_for_display(reply, 80)
            ));
        }
        if let Some(n) = &self.name {
            parse_name(n.as_bytes())?;
        }
        let mut line = b"HELLO reply=".to_vec();
        line.extend_from_slice(self.reply.as_os_str().as_bytes());
        if let Some(n) = &self.name {
            line.extend_from_slice(b" name=");
            line.extend_from_slice(n.as_bytes());
        }
        if let Some(p) = self.pid {
            line.extend_from_slice(format!(" pid={p}").as_bytes());
        }
        if !self.subs.is_empty() {
            line.extend_from_slice(b" sub=");
            let subs: Vec<&str> = self.subs.iter().map(|p| p.as_str()).collect();
            line.extend_from_slice(subs.join(",").as_bytes());
        }
        if self.no_echo {
            line.extend_from_slice(b" echo=no");
        }
        line.push(b'\n');
        Ok(line)
    }
}

fn parse_name(v: &[u8]) -> Result<String, String> {
    if v.is_empty() || v.len() > MAX_NAME_LEN {
        return Err(format!("name= must be 1 to {MAX_NAME_LEN} bytes"));
    }
    // Names become metric labels and log fields: besides spaces and control
    // characters, keep out what the label syntax uses (" \\ , = { }).
    let label_safe =
        |c: char| !(c.is_control() || matches!(c, ' ' | '"' | '\\' | ',' | '=' | '{' | '}'));
    match std::str::from_utf8(v) {
        Ok(s) if s.chars().all(label_safe) => Ok(s.to_owned()),
        _ => Err(format!(
            "name= must be printable UTF-8 without spaces or \" \\ , = {{ }}, got '{}'",
            escape_for_display(v, 40)
        )),
    }
}

fn parse_pid(v: &[u8]) -> Result<i32, String> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .filter(|&p| p > 0)
        .ok_or_else(|| {
            format!(
                "pid= must be a positive process id, got '{}'",
                escape_for_display(v, 20)
            )
        })
}

/// Takes the next HELLO line (without its newline) out of `buf`, bytes read
/// from `hello`; `None` until a newline has arrived.
///
/// Written to survive writers that leave fragments behind (`echo -n`, or a
/// hostile loop writing pieces without a newline): every valid HELLO is one
/// `write()` of at most `PIPE_BUF` bytes that starts with `HELLO ` and ends
/// in `\n`, and the kernel never interleaves such a write with another. So
/// the bytes up to a newline end with one whole write, which began at one of
/// the `HELLO ` keywords (any case) within the last [`MAX_HELLO_LINE`] bytes.
/// The keywords are tried from the right, and the first from which the rest
/// reads as a HELLO with a usable `reply=` is taken. A valid write parses
/// from its own start, and any keyword further right lies inside that same
/// write, so the line taken never holds a byte of anyone else's fragments:
/// a fragment writer can make itself refused, not steer a real client's
/// line. Returns the line and how many bytes were skipped before it.
pub fn take_line(buf: &mut bytes::BytesMut) -> Option<(bytes::Bytes, usize)> {
    let nl = memchr::memchr(b'\n', buf)?;
    let line = buf.split_to(nl + 1).freeze();
    let mut end = nl;
    if end > 0 && line[end - 1] == b'\r' {
        end -= 1;
    }
    let window = end.saturating_sub(MAX_HELLO_LINE - 1);
    let usable = |start: usize| match Hello::parse(&line[start..end]) {
        Ok(_) => true,
        Err(r) => r.reply.is_some(),
    };
    let start = keywords(&line[window..end])
        .map(|i| window + i)
        .find(|&i| usable(i))
        .unwrap_or(window);
    Some((line.slice(start..end), start))
}

/// Bytes kept of a line that has no newline yet: a valid HELLO is at most
/// [`MAX_HELLO_LINE`] bytes, so older bytes are fragments. Drops them from
/// the front of `buf` when it holds no newline, and returns how many.
pub fn trim_partial(buf: &mut bytes::BytesMut) -> usize {
    if buf.len() <= MAX_HELLO_LINE || memchr::memchr(b'\n', buf).is_some() {
        return 0;
    }
    let drop = buf.len() - MAX_HELLO_LINE;
    let _ = buf.split_to(drop);
    drop
}

/// Where each `HELLO ` (any case) starts in `b`, from the right.
fn keywords(b: &[u8]) -> impl Iterator<Item = usize> + '_ {
    const KW: &[u8] = b"HELLO ";
    (0..=b.len().saturating_sub(KW.len()))
        .rev()
        .filter(move |&i| b.len() >= KW.len() && b[i..i + KW.len()].eq_ignore_ascii_case(KW))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::strategies::pattern;
    use proptest::prelude::*;

    /// Valid HELLOs: reply paths with the separators HELLO itself uses (`=`,
    /// `,`), label-safe names of up to 128 bytes (multi-byte characters
    /// included), and distinct patterns (parsing drops repeats).
    fn hello() -> impl Strategy<Value = Hello> {
        (
            "(/[A-Za-z0-9._=,:-]{1,16}){1,4}",
            proptest::option::of("[^ \"\\\\,={}\\p{Cc}]{1,32}"),
            proptest::option::of(1..=i32::MAX),
            proptest::collection::vec(pattern(), 0..5),
            any::<bool>(),
        )
            .prop_map(|(reply, name, pid, mut subs, no_echo)| {
                let mut seen = std::collections::HashSet::new();
                subs.retain(|p| seen.insert(p.clone()));
                Hello {
                    reply: PathBuf::from(reply),
                    name,
                    pid,
                    subs,
                    no_echo,
                }
            })
    }

    #[test]
    fn full_hello_parses() {
        let h = Hello::parse(b"HELLO reply=/tmp/r name=alice pid=42 sub=chat.>,news.*").unwrap();
        assert_eq!(h.reply, PathBuf::from("/tmp/r"));
        assert_eq!(h.name.as_deref(), Some("alice"));
        assert_eq!(h.pid, Some(42));
        let subs: Vec<&str> = h.subs.iter().map(|p| p.as_str()).collect();
        assert_eq!(subs, ["chat.>", "news.*"]);
        let line = h.encode().unwrap();
        assert_eq!(Hello::parse(&line[..line.len() - 1]).unwrap(), h);
    }

    #[test]
    fn echo_is_yes_unless_no() {
        assert!(!Hello::parse(b"HELLO reply=/r").unwrap().no_echo);
        assert!(!Hello::parse(b"HELLO reply=/r echo=yes").unwrap().no_echo);
        let h = Hello::parse(b"HELLO reply=/r echo=no").unwrap();
        assert!(h.no_echo);
        assert!(h.encode().unwrap().ends_with(b" echo=no\n"));
        for bad in [
            &b"HELLO reply=/r echo=off"[..],
            b"HELLO reply=/r echo=no echo=no",
            b"HELLO reply=/r echo",
        ] {
            let r = Hello::parse(bad).unwrap_err();
            assert_eq!(r.error.code, ErrorCode::BadHello);
            assert!(r.reply.is_some(), "answerable");
        }
    }

    #[test]
    fn missing_or_relative_reply_cannot_be_answered() {
        for line in [
            &b"HELLO name=x"[..],
            b"HELLO reply=rel/path",
            b"HELLO",
            b"HI reply=/x",
        ] {
            let r = Hello::parse(line).unwrap_err();
            assert_eq!(r.reply, None, "{}", escape_for_display(line, 99));
        }
    }

    #[test]
    fn refusals_after_reply_are_answerable() {
        let cases: [(&[u8], ErrorCode); 5] = [
            (b"HELLO reply=/r sub=a..b", ErrorCode::BadPattern),
            (b"HELLO reply=/r pid=-3", ErrorCode::BadPid),
            (b"HELLO reply=/r pid=abc", ErrorCode::BadPid),
            (b"HELLO reply=/r subs=a", ErrorCode::BadHello),
            (b"HELLO reply=/r name=\x01", ErrorCode::BadHello),
        ];
        for (line, code) in cases {
            let r = Hello::parse(line).unwrap_err();
            assert_eq!(r.reply.as_deref(), Some(std::path::Path::new("/r")));
            assert_eq!(r.error.code, code);
        }
    }

    #[test]
    fn a_line_is_taken_from_its_last_hello_keyword() {
        use bytes::BytesMut;
        let mut buf = BytesMut::from(
            &b"HELLO reply=/evil name=fragHELLO reply=/tmp/r name=real\nHELLO reply=/b\r\n"[..],
        );
        let (line, skipped) = take_line(&mut buf).unwrap();
        assert_eq!(&line[..], b"HELLO reply=/tmp/r name=real");
        assert_eq!(skipped, 27, "the fragment before it");
        let (line, skipped) = take_line(&mut buf).unwrap();
        assert_eq!((&line[..], skipped), (&b"HELLO reply=/b"[..], 0));
        assert!(take_line(&mut buf).is_none());
        // A keyword inside the client's own line (a reply path ending in
        // /hello) does not cut it short.
        let mut own = BytesMut::from(&b"fragHELLO reply=/run/x/hello name=hello sub=a\n"[..]);
        let (line, skipped) = take_line(&mut own).unwrap();
        assert_eq!(&line[..], b"HELLO reply=/run/x/hello name=hello sub=a");
        assert_eq!(skipped, 4);
        // Megabytes of fragments before a real line: only its write is taken.
        let mut flood = BytesMut::from(&b"HELLO reply=/x name=frag".repeat(100_000)[..]);
        flood.extend_from_slice(b"HELLO reply=/tmp/r\n");
        let (line, _) = take_line(&mut flood).unwrap();
        assert_eq!(&line[..], b"HELLO reply=/tmp/r");
        assert!(Hello::parse(&line).is_ok());
    }

    #[test]
    fn a_partial_line_keeps_at_most_one_hello_worth_of_bytes() {
        use bytes::BytesMut;
        let mut buf = BytesMut::from(&vec![b'x'; 3 * MAX_HELLO_LINE][..]);
        assert_eq!(trim_partial(&mut buf), 2 * MAX_HELLO_LINE);
        assert_eq!(buf.len(), MAX_HELLO_LINE);
        buf.extend_from_slice(b"\n");
        assert_eq!(
            trim_partial(&mut buf),
            0,
            "a newline: lines are taken first"
        );
    }

    #[test]
    fn encode_refuses_fields_that_would_break_the_line() {
        let mut h = Hello::parse(b"HELLO reply=/r").unwrap();
        h.name = Some("a\nHELLO reply=/x".into());
        assert!(h.encode().is_err());
        h.name = Some("a b".into());
        assert!(h.encode().is_err());
        h.name = None;
        h.reply = PathBuf::from("/tmp/sp ace/r");
        assert!(h.encode().is_err());
    }

    #[test]
    fn names_must_be_label_safe() {
        for bad in [&b"a=b"[..], b"c,d", b"x}y", b"q\"r", b"b\\s"] {
            let mut line = b"HELLO reply=/r name=".to_vec();
            line.extend_from_slice(bad);
            assert_eq!(
                Hello::parse(&line).unwrap_err().error.code,
                ErrorCode::BadHello
            );
        }
    }

    #[test]
    fn names_stay_labels() {
        let h = Hello::parse(b"HELLO reply=/r name=../../etc/passwd").unwrap();
        assert_eq!(h.name.as_deref(), Some("../../etc/passwd"));
    }

    proptest! {
        #[test]
        fn hello_round_trips(h in hello()) {
            let line = h.encode().unwrap();
            prop_assert_eq!(line.last(), Some(&b'\n'));
            prop_assert_eq!(Hello::parse(&line[..line.len() - 1]).unwrap(), h);
        }

        #[test]
        fn never_panics(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Hello::parse(&line);
        }
    }
}
