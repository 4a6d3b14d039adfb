//! Client commands: one line on `send` → one [`Command`].
//!
//! Keywords are case-insensitive and separated from their arguments by
//! spaces. `PUB`'s payload is everything after the single space that follows
//! the topic, so payloads keep their own leading spaces. Topics and patterns
//! are validated here, once, so nothing downstream re-checks them.

use bytes::Bytes;

use super::error::{ErrorCode, ProtocolError};
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
                    "unknown command '{}' (expected SUB, UNSUB, PUB, PING or BYE)",
                    escape_for_display(keyword, 32)
                ),
            ))
        }
    }
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
