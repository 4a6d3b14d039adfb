//! The line protocol, as pure functions over bytes.
//!
//! Nothing here does I/O or knows about FIFOs: the session and rendezvous
//! modules feed bytes in and get typed values out. That keeps the parser
//! property-testable and lets the same code serve the broker and the client.
//!
//! Both directions live here, so that nothing else in the crate writes or
//! reads a protocol line by hand:
//!
//! - [`lines`]: chunks of bytes in, complete lines out, with the `--max-line` cap.
//! - [`command`]: client lines: [`Command::parse`] for the broker,
//!   [`Command::encode`] and [`encode_pub`] for clients.
//! - [`hello`]: the rendezvous line, [`Hello::parse`] and [`Hello::encode`].
//! - [`encode`]: the broker's lines, encoded once into shared [`bytes::Bytes`].
//! - [`reply`]: the broker's lines decoded, zero-copy, for clients: [`Reply`].
//! - [`error`]: [`ProtocolError`] and [`EncodeError`], with stable codes.

pub mod command;
pub mod encode;
pub mod error;
pub mod hello;
pub mod lines;
pub mod reply;
pub mod run;
#[cfg(test)]
mod strategies;

pub use command::{
    encode_ping, encode_pub, encode_req, encode_respond, encode_retain, valid_id, Command,
    QueueName, SubOptions,
};
pub use error::{EncodeError, ErrorCode, ProtocolError};
pub use hello::Hello;
pub use lines::{Line, LineSplitter};
pub use reply::Reply;
pub use run::{Input, PubRun};

/// Writes `raw` for a human (log line or `ERR` text): printable ASCII as is,
/// everything else escaped, cut at `max` bytes. Wire input must never reach a
/// log or an `ERR` line unescaped: it could carry a newline into the protocol.
pub fn escape_for_display(raw: &[u8], max: usize) -> String {
    let mut out = String::with_capacity(raw.len().min(max) + 8);
    for &b in raw.iter().take(max) {
        match b {
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if raw.len() > max {
        out.push('…');
    }
    out
}
