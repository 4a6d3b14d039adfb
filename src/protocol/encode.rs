//! Broker → client lines, encoded once.
//!
//! A fanned-out message is encoded into one [`Bytes`] and the same buffer is
//! shared by every subscriber's outbox: a refcount increment per delivery,
//! not a copy.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::ProtocolError;
use crate::topic::Topic;

pub fn msg(topic: &Topic, payload: &[u8]) -> Bytes {
    let t = topic.as_bytes();
    let mut b = BytesMut::with_capacity(4 + t.len() + 1 + payload.len() + 1);
    b.put_slice(b"MSG ");
    b.put_slice(t);
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
    Bytes::from(format!("ERR {} {}\n", e.code, e.text))
}

pub fn dropped(n: u64) -> Bytes {
    Bytes::from(format!("DROPPED {n}\n"))
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
        assert_eq!(&pong(None)[..], b"PONG\n");
        assert_eq!(&pong(Some(b"7"))[..], b"PONG 7\n");
        assert_eq!(&dropped(3)[..], b"DROPPED 3\n");
        let e = ProtocolError::new(ErrorCode::BadTopic, "empty segment\nx");
        assert_eq!(&err(&e)[..], b"ERR bad-topic empty segmentx\n");
    }
}
