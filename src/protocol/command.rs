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
            one_pattern(&line, args, "SUB").map(|p| Some(Command::Sub(p)))
        } else if is("UNSUB") {
            one_pattern(&line, args, "UNSUB").map(|p| Some(Command::Unsub(p)))
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
                    "unknown command '{}' (expected SUB, UNSUB, PUB, PING, BYE, REQ, REPLY, SERVE or UNSERVE)",
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
    if memchr::memchr(b'\n', payload).is_some() {
        return Err(EncodeError::Newline { field: "payload" });
    }
    let topic = topic.as_bytes();
    out.reserve(4 + topic.len() + 1 + payload.len() + 2);
    out.extend_from_slice(b"PUB ");
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
    if args == line.len() {
        return Err(ProtocolError::new(
            ErrorCode::BadSyntax,
            "PUB needs a topic: PUB <topic> <payload>",
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
    Ok(Command::Pub { topic, payload })
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
    use crate::protocol::strategies::{id, pattern, payload, token, topic};
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
