//! Generators for the round-trip property tests: valid values of every
//! field a protocol line carries, biased towards the bytes that break
//! encoders (spaces, `\r`, non-UTF-8, wildcards, the length limit).

use bytes::Bytes;
use proptest::prelude::*;

use super::command::QueueName;
use crate::topic::{Pattern, Topic, MAX_TOPIC_LEN};

/// One segment from the whole alphabet (letters, digits, `_ - :`).
fn segment() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_:-]{1,12}"
}

/// Valid topics: short ones of up to six segments, and single segments up
/// to the length limit.
pub fn topic() -> impl Strategy<Value = Topic> {
    prop_oneof![
        4 => prop::collection::vec(segment(), 1..7).prop_map(|s| s.join(".")),
        1 => prop::string::string_regex(&format!("[a-z]{{1,{MAX_TOPIC_LEN}}}")).unwrap(),
    ]
    .prop_map(|t| Topic::parse(t.as_bytes()).expect("generated topics are valid"))
}

/// Valid patterns: segments or `*`, optionally ending in `>`.
pub fn pattern() -> impl Strategy<Value = Pattern> {
    let seg = prop_oneof![3 => segment(), 1 => Just("*".to_owned())];
    (prop::collection::vec(seg, 0..6), any::<bool>()).prop_filter_map(
        "a pattern needs a segment",
        |(mut segs, tail)| {
            if tail {
                segs.push(">".to_owned());
            }
            (!segs.is_empty()).then(|| Pattern::parse(segs.join(".").as_bytes()).unwrap())
        },
    )
}

/// Any bytes but `\n`, often spaces and `\r` (which the line splitter treats
/// specially at the end of a line).
pub fn payload() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
        1 => prop::sample::select(b" \r".to_vec()),
    ];
    prop::collection::vec(byte, 0..120)
}

/// What `PING` can carry and `PONG` echo: non-empty, not starting with a
/// space, no newline.
pub fn token() -> impl Strategy<Value = Bytes> {
    payload()
        .prop_filter("a token is non-empty and starts with no space", |t| {
            t.first().is_some_and(|&b| b != b' ')
        })
        .prop_map(Bytes::from)
}

/// Any UTF-8 without `\n`: text fields such as `ERR`'s.
pub fn text() -> impl Strategy<Value = String> {
    "[^\n]{0,60}"
}

/// One non-empty word: no space, no newline.
pub fn word() -> impl Strategy<Value = String> {
    "[^ \n]{1,40}"
}

/// Valid queue-group names, up to the length limit.
pub fn queue_name() -> impl Strategy<Value = QueueName> {
    "[A-Za-z0-9_.:-]{1,64}".prop_map(|q| QueueName::parse(q.as_bytes()).expect("valid"))
}

/// Request ids and reply handles: printable ASCII words up to the limit.
pub fn id() -> impl Strategy<Value = Bytes> {
    "[!-~]{1,64}".prop_map(|s| Bytes::from(s.into_bytes()))
}
