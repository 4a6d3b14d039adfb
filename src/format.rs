//! `fifobus sub --format`: how a received message is printed, for scripts.
//!
//! `json` prints one object per line; anything else is a template in the
//! manner of `mosquitto_sub -F`: `%t` topic, `%p` payload, `%I` the time
//! received (RFC 3339, UTC, microseconds), `%U` Unix time with
//! microseconds, `%%` a percent sign, and `\n`, `\t`, `\\` escapes. Each
//! message's output ends with a newline. Pure: the caller gives the time.

use std::time::{SystemTime, UNIX_EPOCH};

/// A parsed `--format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Json,
    Template(Vec<Piece>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(Vec<u8>),
    Topic,
    Payload,
    Iso,
    Unix,
}

impl Format {
    /// # Errors
    /// A `%` or `\` followed by something this format does not know,
    /// named, so that a typo is not printed literally for every message.
    pub fn parse(s: &str) -> Result<Format, String> {
        if s == "json" {
            return Ok(Format::Json);
        }
        let mut pieces = Vec::new();
        let mut text = Vec::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            let piece = match c {
                '%' => match chars.next() {
                    Some('t') => Piece::Topic,
                    Some('p') => Piece::Payload,
                    Some('I') => Piece::Iso,
                    Some('U') => Piece::Unix,
                    Some('%') => {
                        text.push(b'%');
                        continue;
                    }
                    other => return Err(format!("--format '{s}': unknown '%{}' (use %t topic, %p payload, %I ISO time, %U Unix time, %% a percent sign, or 'json')", other.map(String::from).unwrap_or_default())),
                },
                '\\' => {
                    match chars.next() {
                        Some('n') => text.push(b'\n'),
                        Some('t') => text.push(b'\t'),
                        Some('\\') => text.push(b'\\'),
                        other => return Err(format!("--format '{s}': unknown escape '\\{}' (use \\n, \\t or \\\\)", other.map(String::from).unwrap_or_default())),
                    }
                    continue;
                }
                c => {
                    let mut b = [0; 4];
                    text.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                    continue;
                }
            };
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(piece);
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Format::Template(pieces))
    }

    /// Appends one message's output, newline included.
    pub fn render(&self, out: &mut Vec<u8>, topic: &str, payload: &[u8], at: SystemTime) {
        match self {
            Format::Json => {
                let v = serde_json::json!({
                    "topic": topic,
                    "payload": String::from_utf8_lossy(payload),
                    "time": iso(at),
                    "ts": unix(at),
                });
                out.extend_from_slice(v.to_string().as_bytes());
            }
            Format::Template(pieces) => {
                for p in pieces {
                    match p {
                        Piece::Text(t) => out.extend_from_slice(t),
                        Piece::Topic => out.extend_from_slice(topic.as_bytes()),
                        Piece::Payload => out.extend_from_slice(payload),
                        Piece::Iso => out.extend_from_slice(iso(at).as_bytes()),
                        Piece::Unix => out.extend_from_slice(format!("{:.6}", unix(at)).as_bytes()),
                    }
                }
            }
        }
        out.push(b'\n');
    }
}

fn iso(at: SystemTime) -> String {
    humantime::format_rfc3339_micros(at).to_string()
}

fn unix(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn render(f: &str, topic: &str, payload: &[u8]) -> String {
        let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let mut out = Vec::new();
        Format::parse(f)
            .unwrap()
            .render(&mut out, topic, payload, at);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn templates_substitute_like_mosquitto_sub() {
        assert_eq!(render("%t: %p", "a.b", b"hi"), "a.b: hi\n");
        assert_eq!(
            render("%I %U", "t", b""),
            "2023-11-14T22:13:20.123456Z 1700000000.123456\n"
        );
        assert_eq!(render("100%% %p\\t|\\\\", "t", b"x"), "100% x\t|\\\n");
        assert_eq!(render("é%p", "t", b"x"), "éx\n");
    }

    #[test]
    fn json_is_one_object_per_line() {
        let line = render("json", "a.b", b"say \"hi\"\n");
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["topic"], "a.b");
        assert_eq!(v["payload"], "say \"hi\"\n");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["ts"], 1_700_000_000.123_456);
    }

    #[test]
    fn unknown_placeholders_are_refused() {
        assert!(Format::parse("%x").unwrap_err().contains("'%x'"));
        assert!(Format::parse("%").is_err());
        assert!(Format::parse("\\q").unwrap_err().contains("\\q"));
    }
}
