//! The bench's use of the wire format, all through the broker's own
//! protocol module (`fifobus::protocol`), so the bench cannot drift from
//! what the broker speaks.

use fifobus::protocol::{command, Reply};
use fifobus::topic::Topic;

/// Appends `PUB <topic> <payload>\n` to `out`.
///
/// # Panics
/// If `payload` holds a newline: the bench's payloads never do.
pub fn encode_pub(out: &mut Vec<u8>, topic: &Topic, payload: &[u8]) {
    fifobus::protocol::encode_pub(out, topic, payload).expect("bench payloads have no newline");
}

/// The length of the line [`encode_pub`] writes for this topic and a
/// payload of `payload` bytes.
pub fn pub_line_len(topic: &Topic, payload: usize) -> usize {
    let mut line = Vec::new();
    encode_pub(&mut line, topic, &vec![b'x'; payload]);
    line.len()
}

/// Topic and payload of a line (without its newline): a `MSG` line from the
/// broker, or a `PUB` line as the bare-relay ceilings deliver them.
pub fn parse_msg(line: &[u8]) -> Option<(&[u8], &[u8])> {
    match Reply::parse(line) {
        Reply::Msg { topic, payload } => Some((topic.as_bytes(), payload)),
        _ => command::pub_parts(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pub_lines_and_msg_lines() {
        let topic: Topic = "lat.out".parse().unwrap();
        let mut out = Vec::new();
        encode_pub(&mut out, &topic, b"7 xx");
        assert_eq!(out, b"PUB lat.out 7 xx\n");
        assert_eq!(out.len(), pub_line_len(&topic, 4));
        assert_eq!(
            parse_msg(b"MSG lat.out 7 xx"),
            Some((&b"lat.out"[..], &b"7 xx"[..]))
        );
        assert_eq!(
            parse_msg(b"PUB lat.out 7 xx"),
            Some((&b"lat.out"[..], &b"7 xx"[..]))
        );
        assert_eq!(parse_msg(b"MSG a "), Some((&b"a"[..], &b""[..])));
        assert_eq!(parse_msg(b"PONG x"), None);
    }
}
