//! The bench's only knowledge of the wire format: encoding `PUB` lines and
//! splitting `MSG` lines. Kept here, one function each, so that they can
//! become the protocol module's typed encoders (`fifobus::protocol`) in one
//! place.

/// Appends `PUB <topic> <payload>\n` to `out`.
pub fn encode_pub(out: &mut Vec<u8>, topic: &[u8], payload: &[u8]) {
    out.reserve(pub_line_len(topic.len(), payload.len()));
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(topic);
    out.push(b' ');
    out.extend_from_slice(payload);
    out.push(b'\n');
}

/// The length of the line [`encode_pub`] writes for these lengths.
pub fn pub_line_len(topic: usize, payload: usize) -> usize {
    4 + topic + 1 + payload + 1
}

/// Splits a line (without its newline) of the shape `MSG <topic> <payload>`
/// into topic and payload. The keyword is not checked: the bare-relay
/// ceilings deliver the `PUB` lines themselves, which have the same shape.
pub fn parse_msg(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut fields = line.splitn(3, |&b| b == b' ');
    let _keyword = fields.next()?;
    let topic = fields.next()?;
    Some((topic, fields.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pub_lines_and_msg_lines() {
        let mut out = Vec::new();
        encode_pub(&mut out, b"lat.out", b"7 xx");
        assert_eq!(out, b"PUB lat.out 7 xx\n");
        assert_eq!(out.len(), pub_line_len(7, 4));
        assert_eq!(
            parse_msg(b"MSG lat.out 7 xx"),
            Some((&b"lat.out"[..], &b"7 xx"[..]))
        );
        assert_eq!(parse_msg(b"MSG a "), Some((&b"a"[..], &b""[..])));
        assert_eq!(parse_msg(b"MSG a"), None);
    }
}
