//! Client commands: one line on `send` → one [`Command`].
//!
//! Keywords are case-insensitive and separated from their arguments by
//! spaces. `PUB`'s payload is everything after the single space that follows
//! the topic, so payloads keep their own leading spaces. Topics and patterns
//! are validated here, once, so nothing downstream re-checks them.
//!
//! The encoders beside the parser are what clients send: keeping both halves
//! of each command in one file keeps them in step, and the round-trip
//! property tests below hold them to it.

use bytes::Bytes;

use super::error::{EncodeError, ErrorCode, ProtocolError};
use super::escape_for_display;
use crate::topic::{Pattern, Topic};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Sub(Pattern),
    Unsub(Pattern),
    Pub {
        topic: Topic,
        payload: Bytes,
    },
    /// The token is echoed back verbatim in `PONG`.
    Ping(Option<Bytes>),
    Bye,
    /// `SUB <pattern> [queue=<name>] [lossless]`: a subscription with options. A `SUB`
    /// without options parses as [`Command::Sub`], so that code that only
    /// knows plain subscriptions keeps seeing them as before.
    SubWith(Pattern, SubOptions),
    /// `UNSUB <pattern> queue=<name>`: leaves that queue group.
    UnsubWith(Pattern, SubOptions),
    /// `RETAIN <topic> <payload>`: publish, and keep the message as the
    /// topic's retained one (an empty payload clears it instead).
    Retain {
        topic: Topic,
        payload: Bytes,
    },
    /// `REQ <id> <topic> <payload>`: a request, answered on this client's
    /// `recv` by `REPLY <id> <payload>` (or `ERR no-responders <id>`). The
    /// id is the client's own, any [`valid_id`] word.
    Req {
        id: Bytes,
        topic: Topic,
        payload: Bytes,
    },
    /// `SERVE <pattern>`: deliver requests on matching topics to this
    /// client, as `REQUEST <handle> <topic> <payload>`. Apart from `SUB`,
    /// so that no subscriber gets a line it did not ask for.
    Serve(Pattern),
    Unserve(Pattern),
    /// `REPLY <handle> <payload>`: the answer to the `REQUEST` that carried
    /// `handle`.
    Respond {
        handle: Bytes,
        payload: Bytes,
    },
}

/// What may follow a `SUB` or `UNSUB` pattern, as `key=value` words.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct SubOptions {
    /// `queue=<name>`: the subscription joins this queue group, whose
    /// members share the matching messages (one member gets each).
    pub queue: Option<QueueName>,
    /// `lossless`: when the client's backlog is full, the broker stops
    /// reading the publishers of matching messages instead of dropping.
    /// Not with `queue=`.
    pub lossless: bool,
}

impl SubOptions {
    pub fn is_plain(&self) -> bool {
        self.queue.is_none() && !self.lossless
    }
}

/// The name of a queue group: 1 to [`QueueName::MAX_LEN`] bytes of ASCII
/// letters, digits and `_ - . :`, so that it is one word on any line and
/// safe in a log or a metric label.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Bytes);

impl QueueName {
    pub const MAX_LEN: usize = 64;

    /// # Errors
    /// A text saying what is wrong with `raw`, for an `ERR` line.
    pub fn parse(raw: &[u8]) -> Result<QueueName, String> {
        Self::from_bytes(Bytes::copy_from_slice(raw))
    }

    fn from_bytes(raw: Bytes) -> Result<QueueName, String> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(format!(
                "a queue name has 1 to {} bytes, not {}",
                Self::MAX_LEN,
                raw.len()
            ));
        }
        if let Some(&b) = raw
            .iter()
            .find(|&&b| !(b.is_ascii_alphanumeric() || b"_-.:".contains(&b)))
        {
            return Err(format!(
                "queue name '{}': '{}' is not allowed (letters, digits and _ - . : are)",
                escape_for_display(&raw, 64),
                escape_for_display(&[b], 4)
            ));
        }
        Ok(QueueName(raw))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("validated ASCII")
    }

    /// A copy that does not keep the line it was parsed from alive.
    pub fn detached(&self) -> QueueName {
        QueueName(Bytes::copy_from_slice(&self.0))
    }
}

impl std::fmt::Display for QueueName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for QueueName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Longest request id or reply handle: enough for a uuid or a counter
/// with a prefix, small enough that a pending request costs little.
pub const MAX_ID_LEN: usize = 64;

/// A request id or reply handle: 1 to [`MAX_ID_LEN`] printable ASCII
/// bytes, no space, so that it is one word a shell `read` splits off.
pub fn valid_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.iter().all(|b| (0x21..=0x7e).contains(b))
}

impl Command {
    /// Parses one line (without its newline). Returns `Ok(None)` for an
    /// empty or all-space line, which clients may send freely.
    ///
    /// # Errors
    /// A [`ProtocolError`] whose code says what was wrong; the caller answers
    /// it with an `ERR` line and carries on with the next line.
    pub fn parse(line: Bytes) -> Result<Option<Command>, ProtocolError> {
        let start = skip_spaces(&line, 0);
        if start == line.len() {
            return Ok(None);
        }
        let kw_end = token_end(&line, start);
        let keyword = &line[start..kw_end];
        let args = skip_spaces(&line, kw_end);
        let is = |name: &str| keyword.eq_ignore_ascii_case(name.as_bytes());
        if is("PUB") {
            parse_pub(&line, args).map(Some)
        } else if is("SUB") {
            let (p, opts) = pattern_and_options(&line, args, "SUB")?;
            Ok(Some(if opts.is_plain() {
                Command::Sub(p)
            } else {
                Command::SubWith(p, opts)
            }))
        } else if is("UNSUB") {
            let (p, opts) = pattern_and_options(&line, args, "UNSUB")?;
            Ok(Some(if opts.is_plain() {
                Command::Unsub(p)
            } else {
                Command::UnsubWith(p, opts)
            }))
        } else if is("RETAIN") {
            let (topic, payload) = topic_and_payload(&line, args, "RETAIN")?;
            Ok(Some(Command::Retain { topic, payload }))
        } else if is("PING") {
            let token = (args < line.len()).then(|| line.slice(args..));
            Ok(Some(Command::Ping(token)))
        } else if is("REQ") {
            parse_req(&line, args).map(Some)
        } else if is("REPLY") {
            parse_respond(&line, args).map(Some)
        } else if is("SERVE") {
            one_pattern(&line, args, "SERVE").map(|p| Some(Command::Serve(p)))
        } else if is("UNSERVE") {
            one_pattern(&line, args, "UNSERVE").map(|p| Some(Command::Unserve(p)))
        } else if is("BYE") {
            if args < line.len() {
                return Err(ProtocolError::new(
                    ErrorCode::BadSyntax,
                    "BYE takes no arguments",
                ));
            }
            Ok(Some(Command::Bye))
        } else {
            Err(ProtocolError::new(
                ErrorCode::UnknownCommand,
                format!(
                    "unknown command '{}' (expected SUB, UNSUB, PUB, RETAIN, PING, BYE, REQ, REPLY, SERVE or UNSERVE)",
                    escape_for_display(keyword, 32)
                ),
            ))
        }
    }
}

impl Command {
    /// Appends this command as one line, newline included, as a client
    /// writes it to `send`. The broker reads back exactly this command.
    ///
    /// # Errors
    /// [`EncodeError`] for a payload or token the broker could not read back
    /// as given (see [`encode_pub`], [`encode_ping`]); `out` is then unchanged.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Command::Sub(p) => encode_word(out, b"SUB ", p.as_bytes()),
            Command::Unsub(p) => encode_word(out, b"UNSUB ", p.as_bytes()),
            Command::Pub { topic, payload } => return encode_pub(out, topic, payload),
            Command::Ping(token) => return encode_ping(out, token.as_deref()),
            Command::Bye => out.extend_from_slice(b"BYE\n"),
            Command::SubWith(p, opts) => encode_with_options(out, b"SUB ", p, opts),
            Command::UnsubWith(p, opts) => encode_with_options(out, b"UNSUB ", p, opts),
            Command::Retain { topic, payload } => {
                return encode_topic_payload(out, b"RETAIN ", topic, payload)
            }
            Command::Req { id, topic, payload } => return encode_req(out, id, topic, payload),
            Command::Serve(p) => encode_word(out, b"SERVE ", p.as_bytes()),
            Command::Unserve(p) => encode_word(out, b"UNSERVE ", p.as_bytes()),
            Command::Respond { handle, payload } => return encode_respond(out, handle, payload),
        }
        Ok(())
    }
}

/// Appends `PUB <topic> <payload>`: for publishers writing many lines into
/// one buffer, which should not build a [`Command`] (and copy the payload
/// into [`Bytes`]) per line.
///
/// # Errors
/// [`EncodeError::Newline`] when the payload holds `\n`: the broker would end
/// the message there and read the rest as a command of its own. `out` is then
/// unchanged.
pub fn encode_pub(out: &mut Vec<u8>, topic: &Topic, payload: &[u8]) -> Result<(), EncodeError> {
    encode_topic_payload(out, b"PUB ", topic, payload)
}

/// Appends `RETAIN <topic> <payload>`: published like `PUB`, and kept as the
/// topic's retained message; an empty payload clears it.
///
/// # Errors
/// As [`encode_pub`].
pub fn encode_retain(out: &mut Vec<u8>, topic: &Topic, payload: &[u8]) -> Result<(), EncodeError> {
    encode_topic_payload(out, b"RETAIN ", topic, payload)
}

/// `PUB`'s and `RETAIN`'s shape: keyword, topic, the payload as the rest of
/// the line.
fn encode_topic_payload(
    out: &mut Vec<u8>,
    keyword: &[u8],
    topic: &Topic,
    payload: &[u8],
) -> Result<(), EncodeError> {
    if memchr::memchr(b'\n', payload).is_some() {
        return Err(EncodeError::Newline { field: "payload" });
    }
    let topic = topic.as_bytes();
    out.reserve(keyword.len() + topic.len() + 1 + payload.len() + 2);
    out.extend_from_slice(keyword);
    out.extend_from_slice(topic);
    out.push(b' ');
    out.extend_from_slice(payload);
    end_line(out);
    Ok(())
}

/// Appends `REQ <id> <topic> <payload>`.
///
/// # Errors
/// For an id that is not [`valid_id`] or a payload holding `\n`; `out` is
/// then unchanged.
pub fn encode_req(
    out: &mut Vec<u8>,
    id: &[u8],
    topic: &Topic,
    payload: &[u8],
) -> Result<(), EncodeError> {
    check_id(id, "request id")?;
    if memchr::memchr(b'\n', payload).is_some() {
        return Err(EncodeError::Newline { field: "payload" });
    }
    out.extend_from_slice(b"REQ ");
    out.extend_from_slice(id);
    out.push(b' ');
    out.extend_from_slice(topic.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    end_line(out);
    Ok(())
}

/// Appends `REPLY <handle> <payload>`: a responder's answer.
///
/// # Errors
/// For a handle that is not [`valid_id`] or a payload holding `\n`; `out`
/// is then unchanged.
pub fn encode_respond(out: &mut Vec<u8>, handle: &[u8], payload: &[u8]) -> Result<(), EncodeError> {
    check_id(handle, "reply handle")?;
    if memchr::memchr(b'\n', payload).is_some() {
        return Err(EncodeError::Newline { field: "payload" });
    }
    out.extend_from_slice(b"REPLY ");
    out.extend_from_slice(handle);
    out.push(b' ');
    out.extend_from_slice(payload);
    end_line(out);
    Ok(())
}

/// Refuses what [`valid_id`] refuses, saying which rule it broke.
fn check_id(id: &[u8], field: &'static str) -> Result<(), EncodeError> {
    if id.is_empty() {
        return Err(EncodeError::Empty { field });
    }
    if memchr::memchr(b'\n', id).is_some() {
        return Err(EncodeError::Newline { field });
    }
    if memchr::memchr(b' ', id).is_some() {
        return Err(EncodeError::Space { field });
    }
    if !valid_id(id) {
        return Err(EncodeError::BadId { field });
    }
    Ok(())
}

/// Appends `PING` or `PING <token>`.
///
/// # Errors
/// For a token `PONG` could not echo as given, `out` being then unchanged:
/// an empty one or one starting with a space (the broker skips the spaces
/// after `PING`, so `PING ` is a bare `PING`), or one holding `\n`.
pub fn encode_ping(out: &mut Vec<u8>, token: Option<&[u8]>) -> Result<(), EncodeError> {
    const FIELD: &str = "PING token";
    let Some(token) = token else {
        out.extend_from_slice(b"PING\n");
        return Ok(());
    };
    match token.first() {
        None => return Err(EncodeError::Empty { field: FIELD }),
        Some(b' ') => return Err(EncodeError::Space { field: FIELD }),
        Some(_) if memchr::memchr(b'\n', token).is_some() => {
            return Err(EncodeError::Newline { field: FIELD })
        }
        Some(_) => {}
    }
    out.extend_from_slice(b"PING ");
    out.extend_from_slice(token);
    end_line(out);
    Ok(())
}

/// A keyword, a pattern and its options, all validated words.
fn encode_with_options(out: &mut Vec<u8>, keyword: &[u8], p: &Pattern, opts: &SubOptions) {
    out.extend_from_slice(keyword);
    out.extend_from_slice(p.as_bytes());
    if let Some(q) = &opts.queue {
        out.extend_from_slice(b" queue=");
        out.extend_from_slice(q.as_str().as_bytes());
    }
    if opts.lossless {
        out.extend_from_slice(b" lossless");
    }
    out.push(b'\n');
}

/// A keyword and one validated word (a pattern): nothing to refuse.
fn encode_word(out: &mut Vec<u8>, keyword: &[u8], word: &[u8]) {
    out.reserve(keyword.len() + word.len() + 1);
    out.extend_from_slice(keyword);
    out.extend_from_slice(word);
    out.push(b'\n');
}

/// Ends a line whose content may itself end in `\r`. The broker drops one
/// `\r` before every newline, so that CRLF input works; a second `\r` keeps
/// the content's own, and a payload such as `x\r` arrives byte for byte.
fn end_line(out: &mut Vec<u8>) {
    if out.last() == Some(&b'\r') {
        out.push(b'\r');
    }
    out.push(b'\n');
}

/// The topic and payload of a `PUB` line (without its newline), borrowed
/// and not validated: for tools that see `PUB` lines without a broker in
/// between, such as the benchmark's bare-FIFO ceilings. `None` for any other
/// line. The broker itself uses [`Command::parse`].
pub fn pub_parts(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let start = skip_spaces(line, 0);
    let kw_end = token_end(line, start);
    if !line[start..kw_end].eq_ignore_ascii_case(b"PUB") {
        return None;
    }
    let args = skip_spaces(line, kw_end);
    if args == line.len() {
        return None;
    }
    let topic_end = token_end(line, args);
    let payload = line.get(topic_end + 1..).unwrap_or_default();
    Some((&line[args..topic_end], payload))
}

fn parse_pub(line: &Bytes, args: usize) -> Result<Command, ProtocolError> {
    let (topic, payload) = topic_and_payload(line, args, "PUB")?;
    Ok(Command::Pub { topic, payload })
}

fn topic_and_payload(
    line: &Bytes,
    args: usize,
    keyword: &str,
) -> Result<(Topic, Bytes), ProtocolError> {
    if args == line.len() {
        return Err(ProtocolError::new(
            ErrorCode::BadSyntax,
            format!("{keyword} needs a topic: {keyword} <topic> <payload>"),
        ));
    }
    let topic_end = token_end(line, args);
    let topic = Topic::from_bytes(line.slice(args..topic_end))
        .map_err(|e| ProtocolError::new(ErrorCode::BadTopic, e.to_string()))?;
    let payload = if topic_end < line.len() {
        line.slice(topic_end + 1..)
    } else {
        Bytes::new()
    };
    Ok((topic, payload))
}

/// The id of `REQ` or the handle of `REPLY`: one [`valid_id`] word.
fn id_at(
    line: &Bytes,
    args: usize,
    what: &str,
    usage: &str,
) -> Result<(Bytes, usize), ProtocolError> {
    if args == line.len() {
        return Err(ProtocolError::new(
            ErrorCode::BadSyntax,
            format!("{what} missing: {usage}"),
        ));
    }
    let end = token_end(line, args);
    let id = line.slice(args..end);
    if !valid_id(&id) {
        return Err(ProtocolError::new(
            ErrorCode::BadSyntax,
            format!(
                "{what} '{}' is not 1 to {MAX_ID_LEN} printable ASCII characters: {usage}",
                escape_for_display(&id, 80)
            ),
        ));
    }
    Ok((id, end))
}

fn parse_req(line: &Bytes, args: usize) -> Result<Command, ProtocolError> {
    const USAGE: &str = "REQ <id> <topic> <payload>";
    let (id, end) = id_at(line, args, "request id", USAGE)?;
    let rest = skip_spaces(line, end);
    if rest == line.len() {
        return Err(ProtocolError::new(
            ErrorCode::BadSyntax,
            format!("REQ needs a topic: {USAGE}"),
        ));
    }
    let Command::Pub { topic, payload } = parse_pub(line, rest)? else {
        unreachable!("parse_pub makes a PUB")
    };
    Ok(Command::Req { id, topic, payload })
}

fn parse_respond(line: &Bytes, args: usize) -> Result<Command, ProtocolError> {
    let (handle, end) = id_at(line, args, "reply handle", "REPLY <handle> <payload>")?;
    let payload = if end < line.len() {
        line.slice(end + 1..)
    } else {
        Bytes::new()
    };
    Ok(Command::Respond { handle, payload })
}

fn one_pattern(line: &Bytes, args: usize, keyword: &str) -> Result<Pattern, ProtocolError> {
    if args == line.len() {
        return Err(ProtocolError::new(
            ErrorCode::BadSyntax,
            format!("{keyword} needs a pattern: {keyword} <pattern>"),
        ));
    }
    let end = token_end(line, args);
    if skip_spaces(line, end) != line.len() {
        return Err(ProtocolError::new(
            ErrorCode::BadSyntax,
            format!("{keyword} takes one pattern; send one {keyword} line per pattern"),
        ));
    }
    Pattern::from_bytes(line.slice(args..end))
        .map_err(|e| ProtocolError::new(ErrorCode::BadPattern, e.to_string()))
}

/// `<pattern> [queue=<name>]`: the pattern, then option words in any order,
/// each at most once.
fn pattern_and_options(
    line: &Bytes,
    args: usize,
    keyword: &str,
) -> Result<(Pattern, SubOptions), ProtocolError> {
    if args == line.len() {
        return Err(ProtocolError::new(
            ErrorCode::BadSyntax,
            format!("{keyword} needs a pattern: {keyword} <pattern> [queue=<name>] [lossless]"),
        ));
    }
    let end = token_end(line, args);
    let pattern = Pattern::from_bytes(line.slice(args..end))
        .map_err(|e| ProtocolError::new(ErrorCode::BadPattern, e.to_string()))?;
    let mut opts = SubOptions::default();
    let mut i = skip_spaces(line, end);
    while i < line.len() {
        let end = token_end(line, i);
        let word = &line[i..end];
        if word.starts_with(b"queue=") {
            if opts.queue.is_some() {
                return Err(ProtocolError::new(
                    ErrorCode::BadSyntax,
                    format!("{keyword} takes one queue= option"),
                ));
            }
            let name = QueueName::from_bytes(line.slice(i + 6..end))
                .map_err(|e| ProtocolError::new(ErrorCode::BadSyntax, e))?;
            opts.queue = Some(name);
        } else if word == b"lossless" {
            if opts.lossless {
                return Err(ProtocolError::new(
                    ErrorCode::BadSyntax,
                    format!("{keyword} takes lossless once"),
                ));
            }
            opts.lossless = true;
        } else {
            return Err(ProtocolError::new(
                ErrorCode::BadSyntax,
                format!(
                    "{keyword} takes one pattern and options (queue=<name>, lossless), not '{}'; send one {keyword} line per pattern",
                    escape_for_display(word, 64)
                ),
            ));
        }
        i = skip_spaces(line, end);
    }
    if opts.lossless && opts.queue.is_some() {
        return Err(ProtocolError::new(
            ErrorCode::BadSyntax,
            format!("{keyword}: lossless and queue= cannot be combined (a queue group passes over a full member instead)"),
        ));
    }
    Ok((pattern, opts))
}

fn skip_spaces(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i] == b' ' {
        i += 1;
    }
    i
}

fn token_end(b: &[u8], i: usize) -> usize {
    memchr::memchr(b' ', &b[i..]).map_or(b.len(), |p| i + p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::strategies::{id, pattern, payload, queue_name, token, topic};
    use crate::protocol::{Line, LineSplitter};
    use bytes::BytesMut;
    use proptest::prelude::*;

    fn parse(s: &[u8]) -> Result<Option<Command>, ProtocolError> {
        Command::parse(Bytes::copy_from_slice(s))
    }

    fn code(s: &[u8]) -> ErrorCode {
        parse(s).unwrap_err().code
    }

    #[test]
    fn pub_payload_is_the_rest_of_the_line() {
        let Some(Command::Pub { topic, payload }) = parse(b"pub chat.room  hello  world ").unwrap()
        else {
            panic!("not a PUB")
        };
        assert_eq!(topic.as_str(), "chat.room");
        assert_eq!(&payload[..], b" hello  world ");
    }

    #[test]
    fn pub_without_payload_publishes_empty() {
        for line in [&b"PUB t"[..], b"PUB t "] {
            let Some(Command::Pub { payload, .. }) = parse(line).unwrap() else {
                panic!("not a PUB")
            };
            assert!(payload.is_empty());
        }
    }

    #[test]
    fn payload_may_hold_any_byte_but_newline() {
        let Some(Command::Pub { payload, .. }) = parse(b"PUB t \xff\x00\xfe").unwrap() else {
            panic!("not a PUB")
        };
        assert_eq!(&payload[..], b"\xff\x00\xfe");
    }

    #[test]
    fn keywords_are_case_insensitive() {
        assert!(matches!(parse(b"SuB a.*"), Ok(Some(Command::Sub(_)))));
        assert!(matches!(parse(b"unsub a.>"), Ok(Some(Command::Unsub(_)))));
        assert_eq!(parse(b"bye").unwrap(), Some(Command::Bye));
        assert_eq!(parse(b"Ping").unwrap(), Some(Command::Ping(None)));
        assert_eq!(
            parse(b"PING 42 x").unwrap(),
            Some(Command::Ping(Some(Bytes::from_static(b"42 x"))))
        );
    }

    #[test]
    fn pub_parts_agree_with_parse() {
        for line in [
            &b"PUB chat.room  hello  world "[..],
            b"pub t",
            b"PUB t ",
            b"  PUB a.b \xff",
        ] {
            let Some(Command::Pub { topic, payload }) = parse(line).unwrap() else {
                panic!("not a PUB")
            };
            assert_eq!(
                pub_parts(line),
                Some((topic.as_bytes(), &payload[..])),
                "{line:?}"
            );
        }
        for other in [&b"SUB t"[..], b"PUB", b"PUBX t x", b"MSG t x", b""] {
            assert_eq!(pub_parts(other), None, "{other:?}");
        }
    }

    #[test]
    fn blank_lines_are_ignored() {
        assert_eq!(parse(b"").unwrap(), None);
        assert_eq!(parse(b"   ").unwrap(), None);
    }

    #[test]
    fn errors_carry_stable_codes() {
        assert_eq!(code(b"FOO bar"), ErrorCode::UnknownCommand);
        assert_eq!(code(b"\xff\xfe"), ErrorCode::UnknownCommand);
        assert_eq!(code(b"PUB"), ErrorCode::BadSyntax);
        assert_eq!(code(b"PUB   "), ErrorCode::BadSyntax);
        assert_eq!(code(b"SUB"), ErrorCode::BadSyntax);
        assert_eq!(code(b"SUB a b"), ErrorCode::BadSyntax);
        assert_eq!(code(b"BYE now"), ErrorCode::BadSyntax);
        assert_eq!(code(b"PUB a..b x"), ErrorCode::BadTopic);
        assert_eq!(code(b"PUB a.* x"), ErrorCode::BadTopic);
        assert_eq!(code(b"PUB \xff x"), ErrorCode::BadTopic);
        assert_eq!(code(b"SUB a.>.b"), ErrorCode::BadPattern);
    }

    #[test]
    fn error_text_never_carries_raw_bytes() {
        let err = parse(b"\x1b[31mEVIL\r").unwrap_err();
        assert!(err.text.is_ascii());
        assert!(!err.text.contains('\x1b'));
    }

    /// What the broker makes of `bytes`: split into lines as a session
    /// splits them (dropping one `\r`), then parsed.
    fn over_the_wire(bytes: &[u8]) -> Vec<Command> {
        let mut splitter = LineSplitter::new(1 << 20);
        let mut buf = BytesMut::from(bytes);
        let mut commands = Vec::new();
        while let Some(line) = splitter.next_line(&mut buf) {
            let Line::Complete(line) = line else {
                panic!("line too long")
            };
            commands.extend(Command::parse(line).unwrap());
        }
        assert!(buf.is_empty(), "bytes after the last newline");
        commands
    }

    fn encoded(c: &Command) -> Vec<u8> {
        let mut out = Vec::new();
        c.encode(&mut out).unwrap();
        out
    }

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            pattern().prop_map(Command::Sub),
            pattern().prop_map(Command::Unsub),
            (topic(), payload()).prop_map(|(topic, p)| Command::Pub {
                topic,
                payload: Bytes::from(p)
            }),
            proptest::option::of(token()).prop_map(Command::Ping),
            Just(Command::Bye),
            (pattern(), queue_name()).prop_map(|(p, q)| Command::SubWith(p, queued(q))),
            (pattern(), queue_name()).prop_map(|(p, q)| Command::UnsubWith(p, queued(q))),
            pattern().prop_map(|p| Command::SubWith(p, lossless())),
            (topic(), payload()).prop_map(|(topic, p)| Command::Retain {
                topic,
                payload: Bytes::from(p)
            }),
            (id(), topic(), payload()).prop_map(|(id, topic, p)| Command::Req {
                id,
                topic,
                payload: Bytes::from(p)
            }),
            pattern().prop_map(Command::Serve),
            pattern().prop_map(Command::Unserve),
            (id(), payload()).prop_map(|(handle, p)| Command::Respond {
                handle,
                payload: Bytes::from(p)
            }),
        ]
    }

    fn queued(q: QueueName) -> SubOptions {
        SubOptions {
            queue: Some(q),
            lossless: false,
        }
    }

    fn lossless() -> SubOptions {
        SubOptions {
            queue: None,
            lossless: true,
        }
    }

    #[test]
    fn lossless_is_a_word_after_the_pattern() {
        let p = Pattern::parse(b"logs.>").unwrap();
        assert_eq!(
            parse(b"SUB logs.> lossless").unwrap(),
            Some(Command::SubWith(p.clone(), lossless()))
        );
        assert_eq!(
            parse(b"UNSUB logs.>  lossless").unwrap(),
            Some(Command::UnsubWith(p, lossless()))
        );
        for bad in [
            &b"SUB t lossless lossless"[..],
            b"SUB t lossless queue=w",
            b"SUB t queue=w lossless",
            b"SUB t LOSSLESS",
            b"SUB t lossless=1",
        ] {
            assert_eq!(code(bad), ErrorCode::BadSyntax, "{bad:?}");
        }
    }

    #[test]
    fn sub_options_follow_the_pattern() {
        let q = |s: &str| queued(QueueName::parse(s.as_bytes()).unwrap());
        let p = Pattern::parse(b"jobs.>").unwrap();
        assert_eq!(
            parse(b"SUB jobs.> queue=workers").unwrap(),
            Some(Command::SubWith(p.clone(), q("workers")))
        );
        assert_eq!(
            parse(b"unsub  jobs.>   queue=w-1.a:b ").unwrap(),
            Some(Command::UnsubWith(p.clone(), q("w-1.a:b")))
        );
        // No option: the plain command, as before.
        assert_eq!(parse(b"SUB jobs.> ").unwrap(), Some(Command::Sub(p)));
        for bad in [
            &b"SUB t queue="[..],
            b"SUB t queue=a queue=b",
            b"SUB t queue=a b",
            b"SUB t lossy",
            b"SUB t queue=\xff",
            b"SUB t queue=a/b",
        ] {
            assert_eq!(code(bad), ErrorCode::BadSyntax, "{bad:?}");
        }
        let long = format!("SUB t queue={}", "q".repeat(QueueName::MAX_LEN + 1));
        assert_eq!(code(long.as_bytes()), ErrorCode::BadSyntax);
        assert_eq!(code(b"SUB a.>.b queue=w"), ErrorCode::BadPattern);
    }

    #[test]
    fn retain_is_pub_with_another_keyword() {
        assert_eq!(
            parse(b"retain sensors.temp  21.5").unwrap(),
            Some(Command::Retain {
                topic: Topic::parse(b"sensors.temp").unwrap(),
                payload: Bytes::from_static(b" 21.5"),
            })
        );
        let Some(Command::Retain { payload, .. }) = parse(b"RETAIN t").unwrap() else {
            panic!("not a RETAIN")
        };
        assert!(payload.is_empty(), "an empty payload (it clears)");
        assert_eq!(code(b"RETAIN"), ErrorCode::BadSyntax);
        assert_eq!(code(b"RETAIN a.* x"), ErrorCode::BadTopic);
        let mut out = Vec::new();
        encode_retain(&mut out, &Topic::parse(b"t").unwrap(), b"x").unwrap();
        assert_eq!(out, b"RETAIN t x\n");
    }

    #[test]
    fn request_lines_are_the_documented_wire_format() {
        let t = Topic::parse(b"svc.echo").unwrap();
        let req = Command::Req {
            id: Bytes::from_static(b"r1"),
            topic: t,
            payload: Bytes::from_static(b" hi  there"),
        };
        assert_eq!(encoded(&req), b"REQ r1 svc.echo  hi  there\n");
        assert_eq!(parse(b"req r1 svc.echo  hi  there").unwrap(), Some(req));
        let answer = Command::Respond {
            handle: Bytes::from_static(b"17"),
            payload: Bytes::from_static(b"HI"),
        };
        assert_eq!(encoded(&answer), b"REPLY 17 HI\n");
        assert_eq!(parse(b"REPLY 17 HI").unwrap(), Some(answer));
        let p = Pattern::parse(b"svc.>").unwrap();
        assert_eq!(encoded(&Command::Serve(p.clone())), b"SERVE svc.>\n");
        assert_eq!(encoded(&Command::Unserve(p)), b"UNSERVE svc.>\n");
        // An empty payload, with or without its space, is empty.
        for line in [&b"REPLY 17"[..], b"REPLY 17 "] {
            let Some(Command::Respond { payload, .. }) = parse(line).unwrap() else {
                panic!("not a REPLY")
            };
            assert!(payload.is_empty());
        }
    }

    #[test]
    fn malformed_requests_are_refused_with_their_code() {
        assert_eq!(code(b"REQ"), ErrorCode::BadSyntax);
        assert_eq!(code(b"REQ r1"), ErrorCode::BadSyntax);
        assert_eq!(code(b"REQ r1   "), ErrorCode::BadSyntax);
        assert_eq!(code(b"REQ r\xff1 t x"), ErrorCode::BadSyntax);
        assert_eq!(
            code(&[&b"REQ "[..], &[b'i'; 65], b" t x"].concat()),
            ErrorCode::BadSyntax
        );
        assert_eq!(code(b"REQ r1 a..b x"), ErrorCode::BadTopic);
        assert_eq!(code(b"REQ r1 a.> x"), ErrorCode::BadTopic);
        assert_eq!(code(b"REPLY"), ErrorCode::BadSyntax);
        assert_eq!(code(b"REPLY \x01 x"), ErrorCode::BadSyntax);
        assert_eq!(code(b"SERVE"), ErrorCode::BadSyntax);
        assert_eq!(code(b"SERVE a b"), ErrorCode::BadSyntax);
        assert_eq!(code(b"UNSERVE a.>.b"), ErrorCode::BadPattern);
        let mut out = b"kept".to_vec();
        let t = Topic::parse(b"t").unwrap();
        assert_eq!(
            encode_req(&mut out, b"", &t, b"x"),
            Err(EncodeError::Empty {
                field: "request id"
            })
        );
        assert_eq!(
            encode_req(&mut out, b"a b", &t, b"x"),
            Err(EncodeError::Space {
                field: "request id"
            })
        );
        assert_eq!(
            encode_req(&mut out, "é".as_bytes(), &t, b"x"),
            Err(EncodeError::BadId {
                field: "request id"
            })
        );
        assert_eq!(
            encode_respond(&mut out, b"1", b"a\nBYE"),
            Err(EncodeError::Newline { field: "payload" })
        );
        assert_eq!(out, b"kept");
    }

    #[test]
    fn encoding_is_the_documented_wire_format() {
        let t = Topic::parse(b"chat.lobby").unwrap();
        let p = Pattern::parse(b"chat.>").unwrap();
        let pub_ = |payload: &'static [u8]| Command::Pub {
            topic: t.clone(),
            payload: Bytes::from_static(payload),
        };
        assert_eq!(
            encoded(&pub_(b"hello, world")),
            b"PUB chat.lobby hello, world\n"
        );
        assert_eq!(encoded(&pub_(b"")), b"PUB chat.lobby \n");
        assert_eq!(encoded(&Command::Sub(p.clone())), b"SUB chat.>\n");
        assert_eq!(encoded(&Command::Unsub(p)), b"UNSUB chat.>\n");
        assert_eq!(encoded(&Command::Ping(None)), b"PING\n");
        let token = Some(Bytes::from_static(b"42 x"));
        assert_eq!(encoded(&Command::Ping(token)), b"PING 42 x\n");
        assert_eq!(encoded(&Command::Bye), b"BYE\n");
    }

    #[test]
    fn a_trailing_cr_is_kept_by_doubling_it() {
        let mut out = Vec::new();
        encode_pub(&mut out, &Topic::parse(b"t").unwrap(), b"x\r").unwrap();
        assert_eq!(out, b"PUB t x\r\r\n");
    }

    #[test]
    fn tokens_pong_could_not_echo_are_refused() {
        let field = "PING token";
        let mut out = b"kept".to_vec();
        assert_eq!(
            encode_ping(&mut out, Some(b"")),
            Err(EncodeError::Empty { field })
        );
        assert_eq!(
            encode_ping(&mut out, Some(b" x")),
            Err(EncodeError::Space { field })
        );
        assert_eq!(
            encode_ping(&mut out, Some(b"a\nBYE")),
            Err(EncodeError::Newline { field })
        );
        assert_eq!(out, b"kept");
    }

    proptest! {
        #[test]
        fn every_command_round_trips(c in command()) {
            prop_assert_eq!(over_the_wire(&encoded(&c)), vec![c]);
        }

        #[test]
        fn commands_sent_together_are_read_in_order(cs in proptest::collection::vec(command(), 0..20)) {
            let mut out = Vec::new();
            for c in &cs {
                c.encode(&mut out).unwrap();
            }
            prop_assert_eq!(over_the_wire(&out), cs);
        }

        /// The bulk path writes the same bytes as the typed one.
        #[test]
        fn encode_pub_is_command_pub(topic in topic(), payload in payload()) {
            let mut fast = Vec::new();
            encode_pub(&mut fast, &topic, &payload).unwrap();
            let typed = encoded(&Command::Pub { topic, payload: Bytes::from(payload) });
            prop_assert_eq!(fast, typed);
        }

        #[test]
        fn a_newline_is_refused_and_nothing_is_written(
            topic in topic(),
            before in payload(),
            after in payload(),
        ) {
            let mut payload = before;
            payload.push(b'\n');
            payload.extend_from_slice(&after);
            let mut out = b"kept".to_vec();
            let refused = Err(EncodeError::Newline { field: "payload" });
            prop_assert_eq!(encode_pub(&mut out, &topic, &payload), refused);
            let c = Command::Pub { topic, payload: Bytes::from(payload.clone()) };
            prop_assert_eq!(c.encode(&mut out), refused);
            prop_assert!(Command::Ping(Some(Bytes::from(payload))).encode(&mut out).is_err());
            prop_assert_eq!(out, b"kept");
        }
    }

    proptest! {
        #[test]
        fn never_panics_and_errors_are_single_line(line in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Err(e) = parse(&line) {
                prop_assert!(!e.text.contains('\n'));
            }
        }

        #[test]
        fn well_formed_pub_round_trips(
            topic in "[a-z0-9_:-]{1,8}(\\.[a-z0-9_:-]{1,8}){0,4}",
            payload in proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..100),
        ) {
            let mut line = format!("PUB {topic} ").into_bytes();
            line.extend_from_slice(&payload);
            let parsed = parse(&line).unwrap().unwrap();
            let Command::Pub { topic: t, payload: p } = parsed else { panic!("not a PUB") };
            prop_assert_eq!(t.as_str(), topic.as_str());
            prop_assert_eq!(&p[..], &payload[..]);
        }
    }
}
