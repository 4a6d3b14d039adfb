//! Runs of `PUB` lines: the shape a streaming publisher sends, taken
//! whole.
//!
//! A publisher streaming to one topic writes `PUB <topic> <payload>` line
//! after line, and each subscriber gets `MSG <topic> <payload>`: the same
//! bytes with three letters changed. So the reader takes a run of such
//! lines (same topic, written canonically: `PUB`, one space, the topic, one
//! space, the payload, no `\r`) as one [`PubRun`], turning `PUB` into `MSG`
//! in its own read buffer, and the router routes the run once: one client
//! lookup, one route lookup, one policy decision and one copy per run
//! instead of per line. This was most of the broker's time per message in
//! a 1 -> 1 profile (parsing, a `Command` and three reference counts per
//! line, a route lookup and four atomic counters per line).
//!
//! Anything else (another keyword or case, other spacing, `\r\n`, an empty
//! payload without its space, a line over the limit) ends the run and is
//! parsed line by line as before, so a run means exactly what its lines
//! would have meant one by one (`tests::runs_mean_what_their_lines_mean`).

use bytes::{Bytes, BytesMut};

use super::Command;
use super::ProtocolError;
use crate::topic::Topic;

/// `count` consecutive `PUB` lines to `topic`, already encoded as the
/// `MSG` lines their subscribers get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubRun {
    pub topic: Topic,
    /// `count` whole lines `MSG <topic> <payload>\n`.
    pub lines: Bytes,
    pub count: usize,
    /// The payloads' bytes in all (what the topic's byte counters count).
    pub payload_bytes: usize,
}

impl PubRun {
    /// The bytes of one line that are not payload: `MSG `, the topic, a
    /// space, the newline.
    pub fn overhead(&self) -> usize {
        4 + self.topic.as_bytes().len() + 2
    }

    /// Each line, newline included.
    pub fn msg_lines(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        memchr::memchr_iter(b'\n', &self.lines).map(move |nl| {
            let line = &self.lines[start..=nl];
            start = nl + 1;
            line
        })
    }

    /// Each line as the `PUB` command it was, for the paths that deliver
    /// line by line (access control, queue groups, lossless subscribers).
    pub fn commands(&self) -> impl Iterator<Item = Command> + '_ {
        let skip = 4 + self.topic.as_bytes().len() + 1;
        let mut start = 0;
        memchr::memchr_iter(b'\n', &self.lines).map(move |nl| {
            let payload = self.lines.slice(start + skip..nl);
            start = nl + 1;
            Command::Pub {
                topic: self.topic.clone(),
                payload,
            }
        })
    }
}

/// What a reader passes the router for its lines, in order: one parsed
/// line, or a run of `PUB` lines taken whole.
#[derive(Debug)]
pub enum Input {
    Line(Result<Command, ProtocolError>),
    Pubs(PubRun),
}

impl Input {
    /// How many lines this stands for.
    pub fn lines(&self) -> usize {
        match self {
            Input::Line(_) => 1,
            Input::Pubs(run) => run.count,
        }
    }
}

impl From<Result<Command, ProtocolError>> for Input {
    fn from(line: Result<Command, ProtocolError>) -> Self {
        Input::Line(line)
    }
}

/// Where a run at the start of a buffer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scan {
    topic_len: usize,
    /// Bytes of the run, its last newline included.
    end: usize,
    count: usize,
    payload_bytes: usize,
}

/// The canonical `PUB` lines to one topic that `buf` starts with, at most
/// `max_lines` of them, each at most `max_line` bytes before its newline
/// (the line splitter's limit); `None` if the first line is not one. Each
/// line taken has its `PUB` turned into `MSG`.
fn scan(buf: &mut [u8], max_line: usize, max_lines: usize) -> Option<Scan> {
    let first = complete_line(buf, max_line)?;
    let line = &buf[..first];
    let topic = line.strip_prefix(b"PUB ")?;
    let topic_len = memchr::memchr(b' ', topic)?;
    if !Topic::is_valid(&topic[..topic_len]) {
        return None;
    }
    let head = 4 + topic_len + 1; // `PUB <topic> `
    let mut s = Scan {
        topic_len,
        end: 0,
        count: 0,
        payload_bytes: 0,
    };
    while s.count < max_lines {
        let rest = &buf[s.end..];
        let Some(nl) = complete_line(rest, max_line) else {
            break;
        };
        if nl < head
            || rest[..4] != *b"PUB "
            || rest[4..head] != buf[4..head]
            || (nl > head && rest[nl - 1] == b'\r')
        {
            break;
        }
        buf[s.end..s.end + 3].copy_from_slice(b"MSG");
        s.payload_bytes += nl - head;
        s.end += nl + 1;
        s.count += 1;
    }
    (s.count > 0).then_some(s)
}

/// The newline ending `buf`'s first line, if that line is complete and
/// within `max_line` bytes, its `\r` if any included (as the splitter
/// counts it).
fn complete_line(buf: &[u8], max_line: usize) -> Option<usize> {
    let limit = buf.len().min(max_line.saturating_add(1));
    memchr::memchr(b'\n', &buf[..limit])
}

/// Takes the run of `PUB` lines `buf` starts with, if any (see the module
/// documentation), at most `max_lines` lines of at most `max_line` bytes.
pub(super) fn take(buf: &mut BytesMut, max_line: usize, max_lines: usize) -> Option<PubRun> {
    let s = scan(buf, max_line, max_lines)?;
    let lines = buf.split_to(s.end).freeze();
    let topic = Topic::from_valid(lines.slice(4..4 + s.topic_len));
    Some(PubRun {
        topic,
        lines,
        count: s.count,
        payload_bytes: s.payload_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode, Line, LineSplitter};
    use proptest::prelude::*;

    /// What the reader makes of `input`, arriving `chunk` bytes per read:
    /// runs where it can, lines otherwise.
    fn read(input: &[u8], chunk: usize, max_line: usize, runs: bool) -> Vec<Input> {
        let mut buf = BytesMut::new();
        let mut s = LineSplitter::new(max_line);
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                if runs {
                    if let Some(run) = s.take_pub_run(&mut buf, 1000) {
                        out.push(Input::Pubs(run));
                        continue;
                    }
                }
                match s.next_line(&mut buf) {
                    Some(Line::Complete(l)) => match Command::parse(l) {
                        Ok(None) => {}
                        Ok(Some(c)) => out.push(Input::Line(Ok(c))),
                        Err(e) => out.push(Input::Line(Err(e))),
                    },
                    Some(Line::TooLong) => out.push(Input::Line(Err(ProtocolError::new(
                        crate::protocol::ErrorCode::LineTooLong,
                        "too long".to_owned(),
                    )))),
                    None => break,
                }
            }
        }
        out
    }

    /// Runs expanded back into the commands their lines were.
    fn commands(inputs: Vec<Input>) -> Vec<Result<Command, ProtocolError>> {
        inputs
            .into_iter()
            .flat_map(|i| match i {
                Input::Line(l) => vec![l],
                Input::Pubs(run) => run.commands().map(Ok).collect(),
            })
            .collect()
    }

    #[test]
    fn a_stream_to_one_topic_is_one_run_of_msg_lines() {
        let mut buf = BytesMut::from(&b"PUB a.b x\nPUB a.b  y z\nPUB a.b \nPUB a.c w\n"[..]);
        let run = take(&mut buf, 100, 100).expect("a run");
        assert_eq!(run.topic.as_str(), "a.b");
        assert_eq!(&run.lines[..], b"MSG a.b x\nMSG a.b  y z\nMSG a.b \n");
        assert_eq!((run.count, run.payload_bytes), (3, 1 + 4));
        assert_eq!(run.overhead(), 9);
        assert_eq!(run.msg_lines().count(), 3);
        assert_eq!(&buf[..], b"PUB a.c w\n", "another topic: another run");
    }

    #[test]
    fn what_is_not_canonical_is_left_to_the_line_parser() {
        for line in [
            &b"pub a x\n"[..],
            b" PUB a x\n",
            b"PUB  a x\n",
            b"PUB a\n",
            b"PUB a x\r\n",
            b"PUB a*b x\n",
            b"PUB a x", // no newline yet
            b"PING\n",
        ] {
            let mut buf = BytesMut::from(line);
            assert_eq!(take(&mut buf, 100, 100), None, "{line:?}");
            assert_eq!(&buf[..], line, "untouched");
        }
        // Over the line limit: the splitter reports it.
        let mut buf = BytesMut::from(&b"PUB a 123456\n"[..]);
        assert_eq!(take(&mut buf, 11, 100), None);
        assert!(take(&mut buf, 12, 100).is_some());
    }

    /// A `PUB` line arriving a byte at a time is searched for its newline
    /// only in the new bytes (the splitter's `scanned`), and still taken
    /// whole once complete; over the limit, it is the splitter's to refuse.
    #[test]
    fn a_line_arriving_piece_by_piece_is_taken_once_complete() {
        let mut s = LineSplitter::new(16);
        let mut buf = BytesMut::new();
        for &b in b"PUB a 0123456789" {
            buf.extend_from_slice(&[b]);
            assert_eq!(s.take_pub_run(&mut buf, 10), None);
            if buf.len() >= 4 {
                // Once it can be a `PUB` line: searched up to here.
                assert_eq!(s.scanned, buf.len(), "nothing searched twice");
            }
        }
        buf.extend_from_slice(b"\nPUB a x\n");
        let run = s.take_pub_run(&mut buf, 10).expect("complete now");
        assert_eq!(&run.lines[..], b"MSG a 0123456789\nMSG a x\n");
        buf.extend_from_slice(b"PUB a 01234567890123");
        assert_eq!(s.take_pub_run(&mut buf, 10), None);
        assert_eq!(s.next_line(&mut buf), Some(Line::TooLong));
    }

    #[test]
    fn a_run_stops_at_max_lines() {
        let mut buf = BytesMut::from(&b"PUB a 1\nPUB a 2\nPUB a 3\n"[..]);
        assert_eq!(take(&mut buf, 100, 2).map(|r| r.count), Some(2));
        assert_eq!(&buf[..], b"PUB a 3\n");
    }

    /// Lines a client might send: mostly a stream to a few topics, with
    /// everything that must end a run mixed in.
    fn line() -> impl Strategy<Value = Vec<u8>> {
        let topic = prop::sample::select(vec!["a", "a.b", "ab", "a.b.c", "x", "bad..t"]);
        let payload = "[ a-z\r]{0,12}";
        prop_oneof![
            6 => (topic.clone(), payload).prop_map(|(t, p)| format!("PUB {t} {p}\n").into_bytes()),
            1 => (topic.clone(), payload).prop_map(|(t, p)| format!("pub {t} {p}\n").into_bytes()),
            1 => (topic.clone(), payload).prop_map(|(t, p)| format!("PUB {t} {p}\r\n").into_bytes()),
            1 => topic.prop_map(|t| format!("PUB {t}\n").into_bytes()),
            1 => Just(b"PING x\n".to_vec()),
            1 => Just(b"PUB  a x\n".to_vec()),
            1 => Just(b"\n".to_vec()),
            1 => Just(b"PUB a 0123456789012345678901234567890123456789\n".to_vec()),
        ]
    }

    proptest! {
        /// Whatever the lines and wherever reads cut them, the reader's
        /// runs mean exactly the commands the lines parse to one by one,
        /// and a run's bytes are exactly the `MSG` lines of those commands.
        #[test]
        fn runs_mean_what_their_lines_mean(
            lines in prop::collection::vec(line(), 0..40),
            chunk in prop_oneof![Just(usize::MAX), 1..80usize],
        ) {
            let input = lines.concat();
            let with_runs = read(&input, chunk, 40, true);
            for i in &with_runs {
                if let Input::Pubs(run) = i {
                    let expect: Vec<u8> = run.commands().flat_map(|c| match c {
                        Command::Pub { topic, payload } => encode::msg(&topic, &payload).to_vec(),
                        _ => unreachable!("runs hold PUBs"),
                    }).collect();
                    prop_assert_eq!(&run.lines[..], &expect[..]);
                    let payloads: usize = run.commands().map(|c| match c {
                        Command::Pub { payload, .. } => payload.len(),
                        _ => 0,
                    }).sum();
                    prop_assert_eq!(run.payload_bytes, payloads);
                    prop_assert_eq!(run.msg_lines().count(), run.count);
                }
            }
            let a = commands(with_runs);
            let b = commands(read(&input, usize::MAX, 40, false));
            prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
        }
    }
}
