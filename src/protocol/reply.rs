//! Broker → client lines, decoded: the reading half of [`super::encode`].
//!
//! [`Reply::parse`] borrows from the line instead of copying it, because a
//! subscriber decodes every message it receives. It never fails:
//! docs/protocol.md asks clients to ignore lines whose keyword they do not
//! know, so that a newer broker can add lines without breaking older
//! clients. Such a line, and a known keyword in a shape this version cannot
//! read (as a newer broker might extend it), become [`Reply::Unknown`] for
//! the caller to skip.
//!
//! The decoder is only as strict as it must be to return typed fields: it
//! does not re-validate topics against this version's grammar, which a newer
//! broker may widen, since refusing a message would lose it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use bytes::Bytes;

use super::encode;
use super::error::{EncodeError, ErrorCode};

/// One line the broker writes: on the reply FIFO (`WELCOME`, `ERR`) or on
/// `recv` (all but `WELCOME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// The handshake succeeded; `dir` holds the client's `send` and `recv`.
    Welcome {
        id: &'a str,
        dir: &'a Path,
    },
    Msg {
        topic: &'a str,
        payload: &'a [u8],
    },
    /// The token of the `PING` it answers, as the client wrote it.
    Pong(Option<&'a [u8]>),
    /// `code` stays text: a newer broker may send a code this version does
    /// not know, and the line is still an error. [`Reply::error_code`] maps
    /// the known ones.
    Err {
        code: &'a str,
        text: &'a str,
    },
    /// This many lines for this client were discarded where this line stands.
    Dropped(u64),
    /// `DROPPED ? restart`: the broker crashed and a new one adopted this
    /// client; lines queued for it at the crash may be lost (how many is
    /// unknown). Its subscriptions and directory are as they were.
    Restarted,
    Bye,
    /// A request for a client that said `SERVE`: answer it with
    /// `REPLY <handle> <payload>`.
    Request {
        handle: &'a str,
        topic: &'a str,
        payload: &'a [u8],
    },
    /// The answer to this client's `REQ <id> ...`.
    Answer {
        id: &'a str,
        payload: &'a [u8],
    },
    /// A line this version cannot read; clients skip it.
    Unknown(&'a [u8]),
}

impl<'a> Reply<'a> {
    /// Decodes one line, without its newline.
    pub fn parse(line: &'a [u8]) -> Reply<'a> {
        parse_known(line).unwrap_or(Reply::Unknown(line))
    }

    /// The stable code of an `ERR` line, when this version knows it.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            Reply::Err { code, .. } => ErrorCode::parse(code),
            _ => None,
        }
    }

    /// Encodes this line, newline included, exactly as the broker writes it.
    ///
    /// # Errors
    /// [`EncodeError`] for a field that would not decode back as given: a
    /// newline anywhere, or an empty or spaced word where [`Reply::parse`]
    /// splits the line; or an [`Unknown`](Reply::Unknown) line that reads as
    /// a known one.
    pub fn encode(&self) -> Result<Bytes, EncodeError> {
        match *self {
            Reply::Welcome { id, dir } => {
                check_word(id.as_bytes(), "client id")?;
                check_rest(dir.as_os_str().as_bytes(), "client directory")?;
                if dir.as_os_str().is_empty() {
                    return Err(EncodeError::Empty {
                        field: "client directory",
                    });
                }
                Ok(encode::welcome(id, dir))
            }
            Reply::Msg { topic, payload } => {
                check_word(topic.as_bytes(), "topic")?;
                check_rest(payload, "payload")?;
                Ok(encode::msg_raw(topic.as_bytes(), payload))
            }
            Reply::Pong(token) => {
                check_rest(token.unwrap_or_default(), "PONG token")?;
                Ok(encode::pong(token))
            }
            Reply::Err { code, text } => {
                check_word(code.as_bytes(), "error code")?;
                check_rest(text.as_bytes(), "error text")?;
                Ok(encode::err_raw(code, text))
            }
            Reply::Dropped(n) => Ok(encode::dropped(n)),
            Reply::Restarted => Ok(encode::restarted()),
            Reply::Request {
                handle,
                topic,
                payload,
            } => {
                check_word(handle.as_bytes(), "reply handle")?;
                check_word(topic.as_bytes(), "topic")?;
                check_rest(payload, "payload")?;
                Ok(encode::request(
                    handle.as_bytes(),
                    topic.as_bytes(),
                    payload,
                ))
            }
            Reply::Answer { id, payload } => {
                check_word(id.as_bytes(), "request id")?;
                check_rest(payload, "payload")?;
                Ok(encode::answer(id.as_bytes(), payload))
            }
            Reply::Bye => Ok(encode::bye()),
            Reply::Unknown(line) => {
                check_rest(line, "line")?;
                if parse_known(line).is_some() {
                    return Err(EncodeError::NotUnknown);
                }
                let mut b = line.to_vec();
                b.push(b'\n');
                Ok(Bytes::from(b))
            }
        }
    }
}

fn parse_known(line: &[u8]) -> Option<Reply<'_>> {
    let (keyword, rest) = match split_once(line) {
        Some((k, rest)) => (k, Some(rest)),
        None => (line, None),
    };
    match (keyword, rest) {
        (b"MSG", Some(rest)) => {
            // A missing second space also means an empty payload (docs/protocol.md).
            let (topic, payload) = split_once(rest).unwrap_or((rest, b""));
            Some(Reply::Msg {
                topic: word(topic)?,
                payload,
            })
        }
        (b"PONG", token) => Some(Reply::Pong(token)),
        (b"REQUEST", Some(rest)) => {
            let (handle, rest) = split_once(rest)?;
            let (topic, payload) = split_once(rest).unwrap_or((rest, b""));
            Some(Reply::Request {
                handle: word(handle)?,
                topic: word(topic)?,
                payload,
            })
        }
        (b"REPLY", Some(rest)) => {
            let (id, payload) = split_once(rest).unwrap_or((rest, b""));
            Some(Reply::Answer {
                id: word(id)?,
                payload,
            })
        }
        (b"ERR", Some(rest)) => {
            let (code, text) = split_once(rest).unwrap_or((rest, b""));
            Some(Reply::Err {
                code: word(code)?,
                text: std::str::from_utf8(text).ok()?,
            })
        }
        (b"DROPPED", Some(b"? restart")) => Some(Reply::Restarted),
        (b"DROPPED", Some(n)) => Some(Reply::Dropped(std::str::from_utf8(n).ok()?.parse().ok()?)),
        (b"BYE", None) => Some(Reply::Bye),
        (b"WELCOME", Some(rest)) => {
            // The directory is everything after the second space, spaces included.
            let (id, dir) = split_once(rest)?;
            if dir.is_empty() {
                return None;
            }
            Some(Reply::Welcome {
                id: word(id)?,
                dir: Path::new(OsStr::from_bytes(dir)),
            })
        }
        _ => None,
    }
}

fn split_once(b: &[u8]) -> Option<(&[u8], &[u8])> {
    memchr::memchr(b' ', b).map(|i| (&b[..i], &b[i + 1..]))
}

/// A field found by position: non-empty and UTF-8 (it has no space, having
/// been split at one).
fn word(b: &[u8]) -> Option<&str> {
    if b.is_empty() {
        return None;
    }
    std::str::from_utf8(b).ok()
}

fn check_word(b: &[u8], field: &'static str) -> Result<(), EncodeError> {
    if b.is_empty() {
        return Err(EncodeError::Empty { field });
    }
    if memchr::memchr(b' ', b).is_some() {
        return Err(EncodeError::Space { field });
    }
    check_rest(b, field)
}

fn check_rest(b: &[u8], field: &'static str) -> Result<(), EncodeError> {
    match memchr::memchr(b'\n', b) {
        Some(_) => Err(EncodeError::Newline { field }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::strategies::{id, payload, text, token, topic, word as any_word};
    use crate::protocol::ProtocolError;
    use crate::topic::Topic;
    use proptest::prelude::*;

    /// What a client reads: the encoded line without its newline, decoded.
    fn round_trip<'a>(r: &Reply<'_>, buf: &'a mut Bytes) -> Reply<'a> {
        *buf = r.encode().unwrap();
        let buf: &'a Bytes = buf;
        let (line, newline) = buf.split_at(buf.len() - 1);
        assert_eq!(newline, b"\n");
        assert!(memchr::memchr(b'\n', line).is_none(), "one line");
        Reply::parse(line)
    }

    fn check(r: Reply<'_>) -> Result<(), TestCaseError> {
        let mut buf = Bytes::new();
        prop_assert_eq!(round_trip(&r, &mut buf), r);
        Ok(())
    }

    #[test]
    fn decodes_the_documented_lines() {
        let cases: [(&[u8], Reply<'_>); 13] = [
            (
                b"REQUEST 17 svc.echo hi there",
                Reply::Request {
                    handle: "17",
                    topic: "svc.echo",
                    payload: b"hi there",
                },
            ),
            (
                b"REPLY r1 HI THERE",
                Reply::Answer {
                    id: "r1",
                    payload: b"HI THERE",
                },
            ),
            (
                b"REPLY r1",
                Reply::Answer {
                    id: "r1",
                    payload: b"",
                },
            ),
            (
                b"MSG chat.lobby alice: hi all",
                Reply::Msg {
                    topic: "chat.lobby",
                    payload: b"alice: hi all",
                },
            ),
            (
                b"MSG chat.lobby ",
                Reply::Msg {
                    topic: "chat.lobby",
                    payload: b"",
                },
            ),
            (
                b"MSG chat.lobby",
                Reply::Msg {
                    topic: "chat.lobby",
                    payload: b"",
                },
            ),
            (b"PONG ready", Reply::Pong(Some(b"ready"))),
            (b"PONG", Reply::Pong(None)),
            (
                b"ERR bad-topic empty segment at byte 10",
                Reply::Err {
                    code: "bad-topic",
                    text: "empty segment at byte 10",
                },
            ),
            (b"DROPPED 1250", Reply::Dropped(1250)),
            (b"DROPPED ? restart", Reply::Restarted),
            (b"BYE", Reply::Bye),
            (
                b"WELCOME 1b4e28ba /run/fifobus/clients/with space",
                Reply::Welcome {
                    id: "1b4e28ba",
                    dir: Path::new("/run/fifobus/clients/with space"),
                },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(Reply::parse(line), want);
        }
    }

    /// Future lines, and known keywords in shapes this version cannot read,
    /// are skipped rather than misread.
    #[test]
    fn what_it_cannot_read_is_unknown() {
        for line in [
            &b""[..],
            b"HELLO there",
            b"msg a b",
            b"MSG",
            b"MSG  x",
            b"MSG \xff x",
            b"ERR",
            b"ERR ",
            b"ERR code \xff",
            b"DROPPED",
            b"DROPPED many",
            b"DROPPED -1",
            b"DROPPED ?",
            b"DROPPED ? restart later",
            b"BYE now",
            b"WELCOME id",
            b"WELCOME id ",
            b"WELCOME  /dir",
            b"REQUEST",
            b"REQUEST 17",
            b"REQUEST  t x",
            b"REPLY",
            b"REPLY  x",
        ] {
            assert_eq!(Reply::parse(line), Reply::Unknown(line), "{line:?}");
        }
    }

    #[test]
    fn error_codes_this_version_does_not_know_are_kept() {
        let r = Reply::parse(b"ERR rate-limited slow down");
        assert_eq!(
            r,
            Reply::Err {
                code: "rate-limited",
                text: "slow down"
            }
        );
        assert_eq!(r.error_code(), None);
        assert_eq!(
            Reply::parse(b"ERR bad-pid no such process").error_code(),
            Some(ErrorCode::BadPid)
        );
    }

    #[test]
    fn encodes_what_the_broker_writes() {
        let t = Topic::parse(b"a.b").unwrap();
        let msg = Reply::Msg {
            topic: "a.b",
            payload: b"hi there",
        };
        assert_eq!(msg.encode().unwrap(), encode::msg(&t, b"hi there"));
        let e = ProtocolError::new(ErrorCode::BadTopic, "empty segment");
        let err = Reply::Err {
            code: "bad-topic",
            text: "empty segment",
        };
        assert_eq!(err.encode().unwrap(), encode::err(&e));
        let dir = Path::new("/bus/clients/x");
        let welcome = Reply::Welcome { id: "x", dir };
        assert_eq!(welcome.encode().unwrap(), encode::welcome("x", dir));
    }

    #[test]
    fn fields_that_would_not_read_back_are_refused() {
        let refused = |r: Reply<'_>| r.encode().unwrap_err();
        let topic = "topic";
        assert_eq!(
            refused(Reply::Msg {
                topic: "a b",
                payload: b""
            }),
            EncodeError::Space { field: topic }
        );
        assert_eq!(
            refused(Reply::Msg {
                topic: "",
                payload: b""
            }),
            EncodeError::Empty { field: topic }
        );
        assert_eq!(
            refused(Reply::Msg {
                topic: "t",
                payload: b"1\nBYE"
            }),
            EncodeError::Newline { field: "payload" }
        );
        assert_eq!(
            refused(Reply::Welcome {
                id: "x",
                dir: Path::new("")
            }),
            EncodeError::Empty {
                field: "client directory"
            }
        );
        assert_eq!(refused(Reply::Unknown(b"BYE")), EncodeError::NotUnknown);
    }

    fn unknown_line() -> impl Strategy<Value = Vec<u8>> {
        let keyword = prop::sample::select(vec![
            &b"MSG"[..],
            b"PONG",
            b"ERR",
            b"DROPPED",
            b"BYE",
            b"WELCOME",
            b"REQUEST",
            b"REPLY",
            b"FUTURE",
        ]);
        (keyword, payload()).prop_map(|(k, rest)| [k, b" ", &rest].concat())
    }

    proptest! {
        #[test]
        fn msg_round_trips(topic in topic(), payload in payload()) {
            check(Reply::Msg { topic: topic.as_str(), payload: &payload })?;
        }

        /// Topics are not validated on the way in, so any word works.
        #[test]
        fn msg_with_any_topic_word_round_trips(topic in any_word(), payload in payload()) {
            check(Reply::Msg { topic: &topic, payload: &payload })?;
        }

        #[test]
        fn pong_round_trips(token in proptest::option::of(token())) {
            check(Reply::Pong(token.as_deref()))?;
        }

        #[test]
        fn err_round_trips(code in any_word(), text in text()) {
            check(Reply::Err { code: &code, text: &text })?;
        }

        #[test]
        fn every_known_error_code_round_trips(i in 0..ErrorCode::ALL.len(), text in text()) {
            let code = ErrorCode::ALL[i];
            let mut buf = Bytes::new();
            let r = Reply::Err { code: code.as_str(), text: &text };
            prop_assert_eq!(round_trip(&r, &mut buf).error_code(), Some(code));
        }

        #[test]
        fn request_round_trips(handle in id(), topic in topic(), payload in payload()) {
            let handle = std::str::from_utf8(&handle).unwrap();
            check(Reply::Request { handle, topic: topic.as_str(), payload: &payload })?;
        }

        #[test]
        fn answer_round_trips(id in id(), payload in payload()) {
            let id = std::str::from_utf8(&id).unwrap();
            check(Reply::Answer { id, payload: &payload })?;
        }

        #[test]
        fn dropped_round_trips(n in any::<u64>()) {
            check(Reply::Dropped(n))?;
        }

        #[test]
        fn restarted_round_trips(_n in 0..1u8) {
            check(Reply::Restarted)?;
        }

        #[test]
        fn welcome_round_trips(id in any_word(), dir in "/[^\n]{0,80}") {
            check(Reply::Welcome { id: &id, dir: Path::new(&dir) })?;
        }

        #[test]
        fn unknown_round_trips(line in unknown_line()) {
            if matches!(Reply::parse(&line), Reply::Unknown(_)) {
                check(Reply::Unknown(&line))?;
            }
        }

        #[test]
        fn parse_never_panics(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Reply::parse(&line);
        }
    }

    #[test]
    fn bye_round_trips() {
        check(Reply::Bye).unwrap();
    }
}
