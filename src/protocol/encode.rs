//! Broker → client lines, encoded once.
//!
//! Each line's format is written here and nowhere else: the router and the
//! rendezvous call these directly (the fast path), and [`super::Reply::encode`]
//! delegates to them after checking its fields, so the decoder in
//! [`super::reply`] is tested against the very bytes the broker writes.
//!
//! A fanned-out message is encoded once, into a buffer the router reuses
//! ([`msg_append`]), and copied into each subscriber's outbox: a `memcpy`
//! per delivery, no allocation and no shared reference count.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::ProtocolError;
use crate::topic::Topic;

pub fn msg(topic: &Topic, payload: &[u8]) -> Bytes {
    msg_raw(topic.as_bytes(), payload)
}

/// [`msg`] for a topic the caller has checked is one word; [`super::Reply`]
/// decodes topics without validating them, so it encodes them the same way.
pub(super) fn msg_raw(topic: &[u8], payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(msg_len(topic, payload));
    put_msg(&mut b, topic, payload);
    b.freeze()
}

/// Appends `MSG <topic> <payload>\n` to `out`: the router encodes each
/// message once into a buffer it reuses, and outboxes copy the line in, so
/// encoding allocates nothing in steady state.
pub fn msg_append(out: &mut Vec<u8>, topic: &Topic, payload: &[u8]) {
    let t = topic.as_bytes();
    out.reserve(msg_len(t, payload));
    put_msg(out, t, payload);
}

fn msg_len(topic: &[u8], payload: &[u8]) -> usize {
    4 + topic.len() + 1 + payload.len() + 1
}

#[inline]
fn put_msg(b: &mut impl BufMut, topic: &[u8], payload: &[u8]) {
    b.put_slice(b"MSG ");
    b.put_slice(topic);
    b.put_u8(b' ');
    b.put_slice(payload);
    b.put_u8(b'\n');
}

/// `REQUEST <handle> <topic> <payload>`: a request, to a client that said
/// `SERVE`. Encoded once and shared by every responder, like `MSG`.
pub fn request(handle: &[u8], topic: &[u8], payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(8 + handle.len() + 1 + topic.len() + 1 + payload.len() + 1);
    b.put_slice(b"REQUEST ");
    b.put_slice(handle);
    b.put_u8(b' ');
    b.put_slice(topic);
    b.put_u8(b' ');
    b.put_slice(payload);
    b.put_u8(b'\n');
    b.freeze()
}

/// `REPLY <id> <payload>`: the answer to the requester's `REQ <id> ...`.
pub fn answer(id: &[u8], payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(6 + id.len() + 1 + payload.len() + 1);
    b.put_slice(b"REPLY ");
    b.put_slice(id);
    b.put_u8(b' ');
    b.put_slice(payload);
    b.put_u8(b'\n');
    b.freeze()
}

pub fn pong(token: Option<&[u8]>) -> Bytes {
    match token {
        None => Bytes::from_static(b"PONG\n"),
        Some(t) => {
            let mut b = BytesMut::with_capacity(6 + t.len());
            b.put_slice(b"PONG ");
            b.put_slice(t);
            b.put_u8(b'\n');
            b.freeze()
        }
    }
}

pub fn err(e: &ProtocolError) -> Bytes {
    err_raw(e.code.as_str(), &e.text)
}

/// [`err`] with the code as text: a decoded `ERR` keeps codes this version
/// does not know, and must encode them the same way.
pub(super) fn err_raw(code: &str, text: &str) -> Bytes {
    Bytes::from(format!("ERR {code} {text}\n"))
}

pub fn dropped(n: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(DROPPED_MAX);
    put_dropped(&mut b, n);
    b.freeze()
}

/// The longest `DROPPED <n>\n` line: `DROPPED `, 20 digits, newline.
pub const DROPPED_MAX: usize = 8 + 20 + 1;

/// Appends `DROPPED <n>\n` to `out` without allocating (outboxes place
/// it where messages went missing, in their own buffers).
pub fn put_dropped(out: &mut impl BufMut, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.put_slice(b"DROPPED ");
    out.put_slice(&digits[i..]);
    out.put_u8(b'\n');
}

/// The first line an adopted client reads after a broker crash: lines
/// queued for it when the broker died may be lost, how many is unknown.
/// `DROPPED` followed by a non-number, so a decoder that only knows
/// `DROPPED <n>` sees a line it does not know and skips it.
pub fn restarted() -> Bytes {
    Bytes::from_static(b"DROPPED ? restart\n")
}

pub fn bye() -> Bytes {
    Bytes::from_static(b"BYE\n")
}

pub fn welcome(id: &str, client_dir: &std::path::Path) -> Bytes {
    use std::os::unix::ffi::OsStrExt;
    let mut b = BytesMut::with_capacity(64 + client_dir.as_os_str().len());
    b.put_slice(b"WELCOME ");
    b.put_slice(id.as_bytes());
    b.put_u8(b' ');
    b.put_slice(client_dir.as_os_str().as_bytes());
    b.put_u8(b'\n');
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn lines_are_newline_terminated() {
        let t = Topic::parse(b"a.b").unwrap();
        assert_eq!(&msg(&t, b"hi there")[..], b"MSG a.b hi there\n");
        assert_eq!(&msg(&t, b"")[..], b"MSG a.b \n");
        let mut buf = Vec::new();
        msg_append(&mut buf, &t, b"1");
        msg_append(&mut buf, &t, &[b'x'; 70_000]);
        msg_append(&mut buf, &t, b"3");
        assert_eq!(&buf[..10], b"MSG a.b 1\n");
        assert_eq!(buf.len(), 10 + 70_009 + 10);
        assert_eq!(&buf[10 + 70_009..], b"MSG a.b 3\n");
        assert_eq!(&pong(None)[..], b"PONG\n");
        assert_eq!(&pong(Some(b"7"))[..], b"PONG 7\n");
        assert_eq!(&dropped(3)[..], b"DROPPED 3\n");
        let e = ProtocolError::new(ErrorCode::BadTopic, "empty segment\nx");
        assert_eq!(&err(&e)[..], b"ERR bad-topic empty segmentx\n");
    }
}
