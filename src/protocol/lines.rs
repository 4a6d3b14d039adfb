//! Splitting a byte stream into lines, with a cap on line length.
//!
//! FIFOs deliver bytes, not lines: a read may end mid-line, and a client may
//! send a line longer than we are willing to buffer. [`LineSplitter`] keeps
//! the partial tail in the caller's buffer, remembers how far it has already
//! searched (so a slowly arriving long line costs O(n), not O(n²)), and when
//! a line passes the cap it reports [`Line::TooLong`] once and discards bytes
//! up to the next newline, so memory stays bounded and later lines still work.

use bytes::{Bytes, BytesMut};

use super::PubRun;

/// One item taken from the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line without its `\n` and without one trailing `\r`.
    Complete(Bytes),
    /// A line longer than the cap began here; its bytes are being discarded.
    TooLong,
}

#[derive(Debug, Clone)]
pub struct LineSplitter {
    max_line: usize,
    /// Bytes at the front of the buffer already searched for `\n`.
    pub(super) scanned: usize,
    /// Inside an overlong line: drop everything up to the next `\n`.
    discarding: bool,
}

impl LineSplitter {
    /// `max_line` is the longest line content accepted, excluding the newline.
    pub fn new(max_line: usize) -> Self {
        LineSplitter {
            max_line,
            scanned: 0,
            discarding: false,
        }
    }

    pub fn max_line(&self) -> usize {
        self.max_line
    }

    /// Changes the cap from the next call on (the reader lowers it while the
    /// broker's memory budget is exhausted). A line already buffered past
    /// the new cap is reported as [`Line::TooLong`] and discarded.
    pub fn set_max_line(&mut self, max_line: usize) {
        self.max_line = max_line;
    }

    /// Takes the run of `PUB` lines to one topic that `buf` starts with,
    /// at most `max_lines` lines, as [`super::run`] describes; `None` when
    /// the next line is anything else (or incomplete): then
    /// [`LineSplitter::next_line`] takes it.
    ///
    /// A line still arriving is searched for its newline only in the bytes
    /// that came since the last call (as `next_line` does), so a long line
    /// written a byte at a time costs its length, not its length squared.
    pub fn take_pub_run(&mut self, buf: &mut BytesMut, max_lines: usize) -> Option<PubRun> {
        if self.discarding || !buf.starts_with(b"PUB ") {
            return None;
        }
        let limit = buf.len().min(self.max_line.saturating_add(1));
        let start = self.scanned.min(limit);
        if memchr::memchr(b'\n', &buf[start..limit]).is_none() {
            self.scanned = limit;
            return None;
        }
        let run = super::run::take(buf, self.max_line, max_lines)?;
        self.scanned = 0;
        Some(run)
    }

    /// Takes the next line from the front of `buf`, or returns `None` when
    /// `buf` holds no complete line (read more and call again). The caller
    /// must only append to `buf` between calls.
    pub fn next_line(&mut self, buf: &mut BytesMut) -> Option<Line> {
        loop {
            if self.discarding {
                match memchr::memchr(b'\n', buf) {
                    Some(i) => {
                        let _ = buf.split_to(i + 1);
                        self.discarding = false;
                        self.scanned = 0;
                        continue;
                    }
                    None => {
                        buf.clear();
                        return None;
                    }
                }
            }
            // A line of max_line bytes plus its newline is still acceptable.
            let limit = buf.len().min(self.max_line.saturating_add(1));
            let start = self.scanned.min(limit);
            if let Some(pos) = memchr::memchr(b'\n', &buf[start..limit]) {
                let end = start + pos;
                let mut line = buf.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                self.scanned = 0;
                return Some(Line::Complete(line.freeze()));
            }
            if buf.len() > self.max_line {
                self.discarding = true;
                self.scanned = 0;
                let _ = buf.split_to(limit);
                return Some(Line::TooLong);
            }
            self.scanned = buf.len();
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn drain(s: &mut LineSplitter, buf: &mut BytesMut) -> Vec<Line> {
        std::iter::from_fn(|| s.next_line(buf)).collect()
    }

    fn complete(s: &str) -> Line {
        Line::Complete(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn splits_lines_and_keeps_the_partial_tail() {
        let mut s = LineSplitter::new(100);
        let mut buf = BytesMut::from(&b"PUB a x\r\nPING\nPU"[..]);
        assert_eq!(
            drain(&mut s, &mut buf),
            vec![complete("PUB a x"), complete("PING")]
        );
        assert_eq!(&buf[..], b"PU");
        buf.extend_from_slice(b"B b y\n");
        assert_eq!(drain(&mut s, &mut buf), vec![complete("PUB b y")]);
        assert!(buf.is_empty());
    }

    #[test]
    fn drops_only_one_trailing_cr() {
        let mut s = LineSplitter::new(100);
        let mut buf = BytesMut::from(&b"a\r\r\n\r\n"[..]);
        assert_eq!(drain(&mut s, &mut buf), vec![complete("a\r"), complete("")]);
    }

    #[test]
    fn line_at_the_cap_is_accepted_and_one_over_is_not() {
        let mut s = LineSplitter::new(4);
        let mut buf = BytesMut::from(&b"abcd\nabcde\nok\n"[..]);
        assert_eq!(
            drain(&mut s, &mut buf),
            vec![complete("abcd"), Line::TooLong, complete("ok")]
        );
    }

    #[test]
    fn overlong_line_arriving_in_pieces_is_reported_once_and_skipped() {
        let mut s = LineSplitter::new(8);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in [&b"0123456"[..], b"789abc", b"defghij", b"klm\nPING\n"] {
            buf.extend_from_slice(chunk);
            out.extend(drain(&mut s, &mut buf));
            assert!(buf.len() <= 9, "buffer must stay bounded");
        }
        assert_eq!(out, vec![Line::TooLong, complete("PING")]);
    }

    proptest! {
        /// However the stream is cut into reads, the same lines come out,
        /// and lines over the cap turn into exactly one TooLong each.
        #[test]
        fn chunking_does_not_change_the_result(
            lines in proptest::collection::vec(proptest::collection::vec(any::<u8>().prop_filter("no newline", |b| *b != b'\n'), 0..20), 0..20),
            cuts in proptest::collection::vec(1usize..16, 1..50),
            max_line in 1usize..16,
        ) {
            let mut stream = Vec::new();
            for l in &lines { stream.extend_from_slice(l); stream.push(b'\n'); }
            let expected: Vec<Line> = lines.iter().map(|l| {
                let mut l = l.clone();
                if l.len() > max_line { return Line::TooLong; }
                if l.last() == Some(&b'\r') { l.pop(); }
                Line::Complete(Bytes::from(l))
            }).collect();
            let mut s = LineSplitter::new(max_line);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut rest = &stream[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                i += 1;
                got.extend(drain(&mut s, &mut buf));
                prop_assert!(buf.len() <= max_line + 16);
            }
            prop_assert_eq!(got, expected);
        }
    }
}
