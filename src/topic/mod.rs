//! Topic names, subscription patterns and the index that matches them.
//!
//! This module owns the NATS-style subject grammar (dot-separated segments,
//! `*` for exactly one segment, a trailing `>` for one or more) and the
//! subscription trie built on it. There is no I/O here: everything is pure
//! logic over bytes, so the rest of the broker can validate wire input once,
//! at the edge, and the hot path can trust a [`Topic`] without re-checking.
//!
//! Validation is total: any byte string (invalid UTF-8 included) yields either
//! a value or a [`TopicError`], never a panic.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

pub mod index;

pub use index::PatternIndex;

/// Longest topic or pattern accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;

/// Why a topic or pattern was rejected.
///
/// Positions (`at`) are 0-based byte offsets into the input. The `Display`
/// texts go straight into protocol lines (`ERR bad-topic <text>`), so they are
/// short, lowercase, single-line and never echo raw input bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Zero-length input.
    #[error("empty (at least one segment is required)")]
    Empty,
    /// Input longer than [`MAX_TOPIC_LEN`].
    #[error("{len} bytes long, the limit is {limit}")]
    TooLong { len: usize, limit: usize },
    /// `a..b`, `.a` or `a.`: `at` is where the missing segment should start.
    #[error("empty segment at byte {at}")]
    EmptySegment { at: usize },
    /// A byte outside `[A-Za-z0-9_:-]`, `.` and (for patterns) `*`, `>`.
    #[error("invalid byte {} at byte {at} (allowed: letters, digits, _ - :)", EscapedByte(*.byte))]
    InvalidByte { byte: u8, at: usize },
    /// `*` or `>` in a topic; wildcards only make sense in patterns.
    #[error("wildcard '{wildcard}' at byte {at} is not allowed in a topic")]
    WildcardInTopic { wildcard: char, at: usize },
    /// `>` followed by more segments, as in `a.>.b`.
    #[error("'>' must be the last segment (found at byte {at})")]
    TailWildcardNotLast { at: usize },
    /// `*` or `>` sharing a segment with other characters, as in `a*` or `>x`.
    #[error("'{wildcard}' must be a whole segment (found at byte {at})")]
    PartialWildcard { wildcard: char, at: usize },
}

/// Shows a byte as `'c' (0xNN)` when it is a harmless printable character and
/// as `0xNN` otherwise, so error lines stay single-line and ASCII.
struct EscapedByte(u8);

impl fmt::Display for EscapedByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b.is_ascii_graphic() && b != b'\'' && b != b'\\' {
            write!(f, "'{}' ({:#04x})", b as char, b)
        } else {
            write!(f, "{b:#04x}")
        }
    }
}

/// Lookup table for segment bytes; a table keeps validation branch-light on
/// the publish path.
const SEGMENT_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b':';
        i += 1;
    }
    t
};

/// Checks `raw` against the grammar; `wildcards` selects pattern rules.
fn validate(raw: &[u8], wildcards: bool) -> Result<(), TopicError> {
    if raw.is_empty() {
        return Err(TopicError::Empty);
    }
    if raw.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong {
            len: raw.len(),
            limit: MAX_TOPIC_LEN,
        });
    }
    let mut seg_start = 0;
    for (at, &byte) in raw.iter().enumerate() {
        if SEGMENT_BYTE[byte as usize] {
            continue;
        }
        match byte {
            b'.' => {
                if at == seg_start {
                    return Err(TopicError::EmptySegment { at });
                }
                seg_start = at + 1;
            }
            b'*' | b'>' => {
                let wildcard = byte as char;
                if !wildcards {
                    return Err(TopicError::WildcardInTopic { wildcard, at });
                }
                let seg_end = at + 1;
                if at != seg_start || (seg_end < raw.len() && raw[seg_end] != b'.') {
                    return Err(TopicError::PartialWildcard { wildcard, at });
                }
                if byte == b'>' && seg_end != raw.len() {
                    return Err(TopicError::TailWildcardNotLast { at });
                }
            }
            _ => return Err(TopicError::InvalidByte { byte, at }),
        }
    }
    if seg_start == raw.len() {
        return Err(TopicError::EmptySegment { at: seg_start });
    }
    Ok(())
}

/// Views validated bytes as `&str` without re-checking.
fn ascii_str(bytes: &[u8]) -> &str {
    debug_assert!(bytes.is_ascii());
    // SAFETY: only called on bytes that passed `validate`, which admits
    // nothing but ASCII, and ASCII is valid UTF-8.
    unsafe { std::str::from_utf8_unchecked(bytes) }
}

/// The surface `Topic` and `Pattern` share: both are validated byte strings
/// backed by [`Bytes`], so fan-out clones are a refcount bump and holders
/// never re-check them.
macro_rules! validated_name {
    ($name:ident, $patterns:expr, $what:literal) => {
        impl $name {
            /// Validates and copies `raw`.
            pub fn parse(raw: &[u8]) -> Result<$name, TopicError> {
                validate(raw, $patterns)?;
                Ok($name(Bytes::copy_from_slice(raw)))
            }

            /// Validates `raw` and keeps it without copying (e.g. a slice of
            /// a read buffer).
            pub fn from_bytes(raw: Bytes) -> Result<$name, TopicError> {
                validate(&raw, $patterns)?;
                Ok($name(raw))
            }

            #[doc = concat!("A copy in its own allocation. A parsed ", $what, " is a slice of the")]
            /// read buffer it came from; anything stored long-term
            /// (subscriptions, caches) keeps a detached copy so that it does
            /// not pin that whole buffer.
            pub fn detached(&self) -> $name {
                $name(Bytes::copy_from_slice(&self.0))
            }

            pub fn as_str(&self) -> &str {
                ascii_str(&self.0)
            }

            pub fn as_bytes(&self) -> &[u8] {
                &self.0
            }

            /// The dot-separated segments; never empty, each non-empty.
            pub fn segments(&self) -> impl Iterator<Item = &str> {
                self.as_str().split('.')
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.as_str(), f)
            }
        }

        impl FromStr for $name {
            type Err = TopicError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::parse(s.as_bytes())
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    };
}

/// A concrete topic a message is published to, e.g. `sensors.kitchen.temp`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Bytes);

validated_name!(Topic, false, "topic");

impl Topic {
    /// Whether `raw` is a valid topic, without making one.
    pub fn is_valid(raw: &[u8]) -> bool {
        validate(raw, false).is_ok()
    }

    /// Keeps `raw`, which the caller has just checked with
    /// [`Topic::is_valid`] (a run of `PUB` lines validates its topic once).
    pub(crate) fn from_valid(raw: Bytes) -> Topic {
        debug_assert!(Topic::is_valid(&raw));
        Topic(raw)
    }
}

/// A subscription pattern, e.g. `sensors.*.temp` or `sensors.>`: a topic
/// whose segments may also be exactly `*` (one segment) or, last, exactly
/// `>` (one or more segments).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern(Bytes);

validated_name!(Pattern, true, "pattern");

impl Pattern {
    /// True if the pattern has no wildcards, i.e. matches exactly one topic.
    pub fn is_literal(&self) -> bool {
        // Validation guarantees `*`/`>` bytes only occur as wildcards.
        memchr::memchr2(b'*', b'>', &self.0).is_none()
    }

    /// Direct segment-by-segment match. Linear and allocation-free, but the
    /// broker should use [`PatternIndex`] for many patterns; this is the
    /// reference the index is tested against.
    pub fn matches(&self, topic: &Topic) -> bool {
        let mut topic_segs = topic.segments();
        for p in self.segments() {
            match p {
                ">" => return topic_segs.next().is_some(),
                "*" => {
                    if topic_segs.next().is_none() {
                        return false;
                    }
                }
                lit => {
                    if topic_segs.next() != Some(lit) {
                        return false;
                    }
                }
            }
        }
        topic_segs.next().is_none()
    }
}

/// Every topic is also a valid literal pattern matching just itself.
impl From<Topic> for Pattern {
    fn from(topic: Topic) -> Pattern {
        Pattern(topic.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn long(n: usize) -> Vec<u8> {
        // "a.a.a..." trimmed to exactly n bytes, ending in a segment byte.
        let mut v: Vec<u8> = (0..n)
            .map(|i| if i % 2 == 0 { b'a' } else { b'.' })
            .collect();
        if v.last() == Some(&b'.') {
            *v.last_mut().unwrap() = b'b';
        }
        v
    }

    #[test]
    fn valid_topics() {
        for t in [
            "a",
            "a.b",
            "sensors.kitchen.temp",
            "A-Z_0:9",
            "x.y.z.w.v",
            "::",
            "-",
            "_._",
        ] {
            let topic = Topic::parse(t.as_bytes()).unwrap_or_else(|e| panic!("{t}: {e}"));
            assert_eq!(topic.as_str(), t);
            assert_eq!(topic.as_bytes(), t.as_bytes());
            assert_eq!(topic.to_string(), t);
            assert_eq!(format!("{topic:?}"), format!("{t:?}"));
            assert_eq!(topic.segments().collect::<Vec<_>>().join("."), t);
            assert_eq!(t.parse::<Topic>().unwrap(), topic);
            assert_eq!(Topic::from_bytes(Bytes::from(t)).unwrap(), topic);
            // Every topic is a literal pattern too.
            let p = Pattern::parse(t.as_bytes()).unwrap();
            assert!(p.is_literal());
            assert!(p.matches(&topic));
            assert_eq!(Pattern::from(topic), p);
        }
        assert!(Topic::parse(&long(MAX_TOPIC_LEN)).is_ok());
        assert!(Pattern::parse(&long(MAX_TOPIC_LEN)).is_ok());
    }

    #[test]
    fn invalid_topics() {
        use TopicError::*;
        let cases: &[(&[u8], TopicError)] = &[
            (b"", Empty),
            (b"a..b", EmptySegment { at: 2 }),
            (b".a", EmptySegment { at: 0 }),
            (b"a.", EmptySegment { at: 2 }),
            (b".", EmptySegment { at: 0 }),
            (b"a\x00b", InvalidByte { byte: 0, at: 1 }),
            (b"ab.\xff", InvalidByte { byte: 0xff, at: 3 }),
            (b"a\nb", InvalidByte { byte: b'\n', at: 1 }),
            (b"a b", InvalidByte { byte: b' ', at: 1 }),
            (b"a/b", InvalidByte { byte: b'/', at: 1 }),
            (b"caf\xc3\xa9", InvalidByte { byte: 0xc3, at: 3 }),
            (
                b"a.*",
                WildcardInTopic {
                    wildcard: '*',
                    at: 2,
                },
            ),
            (
                b">",
                WildcardInTopic {
                    wildcard: '>',
                    at: 0,
                },
            ),
            (
                b"a*",
                WildcardInTopic {
                    wildcard: '*',
                    at: 1,
                },
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(Topic::parse(raw).as_ref(), Err(want), "{raw:?}");
            assert_eq!(
                Topic::from_bytes(Bytes::copy_from_slice(raw)).as_ref(),
                Err(want)
            );
        }
        let too_long = long(MAX_TOPIC_LEN + 1);
        assert_eq!(
            Topic::parse(&too_long),
            Err(TooLong {
                len: 257,
                limit: 256
            })
        );
        assert_eq!("a..b".parse::<Topic>(), Err(EmptySegment { at: 2 }));
    }

    #[test]
    fn valid_patterns() {
        for (p, literal) in [
            ("a", true),
            ("a.b.c", true),
            ("*", false),
            (">", false),
            ("a.*", false),
            ("*.b", false),
            ("a.>", false),
            ("*.*.>", false),
            ("a.*.c.>", false),
        ] {
            let pat = Pattern::parse(p.as_bytes()).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(pat.as_str(), p);
            assert_eq!(pat.is_literal(), literal, "{p}");
            assert_eq!(pat.to_string(), p);
            assert_eq!(format!("{pat:?}"), format!("{p:?}"));
            assert_eq!(p.parse::<Pattern>().unwrap(), pat);
            assert_eq!(Pattern::from_bytes(Bytes::from(p)).unwrap(), pat);
        }
    }

    #[test]
    fn invalid_patterns() {
        use TopicError::*;
        let cases: &[(&[u8], TopicError)] = &[
            (b"", Empty),
            (b"a..b", EmptySegment { at: 2 }),
            (b".>", EmptySegment { at: 0 }),
            (b"*.", EmptySegment { at: 2 }),
            (b"a.>.b", TailWildcardNotLast { at: 2 }),
            (b">.>", TailWildcardNotLast { at: 0 }),
            (
                b"a*",
                PartialWildcard {
                    wildcard: '*',
                    at: 1,
                },
            ),
            (
                b"*a",
                PartialWildcard {
                    wildcard: '*',
                    at: 0,
                },
            ),
            (
                b"**",
                PartialWildcard {
                    wildcard: '*',
                    at: 0,
                },
            ),
            (
                b">x",
                PartialWildcard {
                    wildcard: '>',
                    at: 0,
                },
            ),
            (
                b"a.b>",
                PartialWildcard {
                    wildcard: '>',
                    at: 3,
                },
            ),
            (
                b"a.>>",
                PartialWildcard {
                    wildcard: '>',
                    at: 2,
                },
            ),
            (b"a.\xff", InvalidByte { byte: 0xff, at: 2 }),
            (b"*.\x00", InvalidByte { byte: 0, at: 2 }),
            (b"a\n", InvalidByte { byte: b'\n', at: 1 }),
            (b"a .>", InvalidByte { byte: b' ', at: 1 }),
        ];
        for (raw, want) in cases {
            assert_eq!(Pattern::parse(raw).as_ref(), Err(want), "{raw:?}");
        }
        assert_eq!(
            Pattern::parse(&long(MAX_TOPIC_LEN + 1)),
            Err(TooLong {
                len: 257,
                limit: 256
            })
        );
    }

    #[test]
    fn error_texts() {
        let text = |raw: &[u8]| Topic::parse(raw).unwrap_err().to_string();
        let ptext = |raw: &[u8]| Pattern::parse(raw).unwrap_err().to_string();
        assert_eq!(text(b"a..b"), "empty segment at byte 2");
        assert_eq!(
            text(b"abc\xff"),
            "invalid byte 0xff at byte 3 (allowed: letters, digits, _ - :)"
        );
        assert_eq!(
            text(b"a/b"),
            "invalid byte '/' (0x2f) at byte 1 (allowed: letters, digits, _ - :)"
        );
        assert_eq!(
            text(b"a\nb"),
            "invalid byte 0x0a at byte 1 (allowed: letters, digits, _ - :)"
        );
        assert_eq!(text(&long(300)), "300 bytes long, the limit is 256");
        assert_eq!(
            text(b"a.*"),
            "wildcard '*' at byte 2 is not allowed in a topic"
        );
        assert_eq!(
            ptext(b"a.>.b"),
            "'>' must be the last segment (found at byte 2)"
        );
        assert_eq!(
            ptext(b"a*"),
            "'*' must be a whole segment (found at byte 1)"
        );
    }

    #[test]
    fn pattern_matches() {
        let m = |p: &str, t: &str| p.parse::<Pattern>().unwrap().matches(&t.parse().unwrap());
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "a.c"));
        assert!(!m("a.b", "a.b.c"));
        assert!(!m("a.b.c", "a.b"));
        assert!(m("a.*", "a.b"));
        assert!(!m("a.*", "a"));
        assert!(!m("a.*", "a.b.c"));
        assert!(m("*", "x"));
        assert!(!m("*", "x.y"));
        assert!(m("a.>", "a.b"));
        assert!(m("a.>", "a.b.c"));
        assert!(!m("a.>", "a"));
        assert!(!m("a.>", "b.c"));
        assert!(m(">", "a"));
        assert!(m(">", "a.b.c.d"));
        assert!(m("*.b.>", "x.b.y"));
        assert!(!m("*.b.>", "x.b"));
        assert!(!m("ab", "a"));
        assert!(!m("a", "ab"));
    }

    /// Bytes mostly drawn from the grammar's interesting characters so that
    /// the structural checks, not just the byte check, get exercised.
    fn grammarish() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            4 => prop::sample::select(b"ab.*>".to_vec()),
            1 => any::<u8>(),
        ];
        prop::collection::vec(byte, 0..12)
    }

    fn check_result<T: AsRef<str>>(raw: &[u8], r: Result<T, TopicError>) {
        match r {
            Ok(v) => assert_eq!(v.as_ref().as_bytes(), raw),
            Err(e) => {
                let s = e.to_string();
                assert!(!s.is_empty());
                assert!(
                    s.bytes().all(|b| b.is_ascii_graphic() || b == b' '),
                    "{s:?}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(raw in prop_oneof![any::<Vec<u8>>(), grammarish()]) {
            check_result(&raw, Topic::parse(&raw));
            check_result(&raw, Pattern::parse(&raw));
            // A valid topic is always a valid pattern.
            if Topic::parse(&raw).is_ok() {
                prop_assert!(Pattern::parse(&raw).is_ok());
            }
        }

        #[test]
        fn long_inputs_never_panic(raw in prop::collection::vec(any::<u8>(), 250..300)) {
            check_result(&raw, Topic::parse(&raw));
            check_result(&raw, Pattern::parse(&raw));
        }
    }
}
