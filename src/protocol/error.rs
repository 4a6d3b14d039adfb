//! Protocol errors with stable codes.
//!
//! The code string is public interface: it is the second word of an `ERR`
//! line, the `kind` in logs, and (later) a metric label. Add codes; never
//! rename one.

use std::fmt;

/// Why a line or a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    UnknownCommand,
    BadSyntax,
    BadTopic,
    BadPattern,
    LineTooLong,
    BadHello,
    BadReply,
    BadPid,
    TooManyClients,
    ShuttingDown,
    Internal,
    /// The bus's ACL (`--acl`) does not allow this `PUB` or `SUB`.
    Forbidden,
    /// The user's clients hold as many subscriptions as the ACL allows it.
    TooManySubscriptions,
    /// A `RETAIN` the retained-message limits (or the memory budget) cannot hold.
    RetainedFull,
    /// A `REQ` matched no `SERVE` pattern, or every responder it reached
    /// left without answering: the text is exactly the request's id.
    NoResponders,
    /// A `REQ` while the client already waits for its most answers: the
    /// oldest is forgotten; the text starts with that request's id.
    TooManyRequests,
    /// A `REPLY` to a handle this client was never given.
    UnknownRequest,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::UnknownCommand,
        ErrorCode::BadSyntax,
        ErrorCode::BadTopic,
        ErrorCode::BadPattern,
        ErrorCode::LineTooLong,
        ErrorCode::BadHello,
        ErrorCode::BadReply,
        ErrorCode::BadPid,
        ErrorCode::TooManyClients,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::Forbidden,
        ErrorCode::TooManySubscriptions,
        ErrorCode::RetainedFull,
        ErrorCode::NoResponders,
        ErrorCode::TooManyRequests,
        ErrorCode::UnknownRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnknownCommand => "unknown-command",
            ErrorCode::BadSyntax => "bad-syntax",
            ErrorCode::BadTopic => "bad-topic",
            ErrorCode::BadPattern => "bad-pattern",
            ErrorCode::LineTooLong => "line-too-long",
            ErrorCode::BadHello => "bad-hello",
            ErrorCode::BadReply => "bad-reply",
            ErrorCode::BadPid => "bad-pid",
            ErrorCode::TooManyClients => "too-many-clients",
            ErrorCode::ShuttingDown => "shutting-down",
            ErrorCode::Internal => "internal-error",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManySubscriptions => "too-many-subscriptions",
            ErrorCode::RetainedFull => "retained-full",
            ErrorCode::NoResponders => "no-responders",
            ErrorCode::TooManyRequests => "too-many-requests",
            ErrorCode::UnknownRequest => "unknown-request",
        }
    }

    /// Position in [`ErrorCode::ALL`], for per-code tables.
    pub fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|&c| c == self)
            .expect("ALL lists every code")
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused input: a stable code plus a one-line text for the person
/// reading the `ERR` line. The text never contains a newline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {text}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub text: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        let mut text = text.into();
        text.retain(|c| c != '\n' && c != '\r');
        ProtocolError { code, text }
    }
}

/// A value that cannot be written as one protocol line, refused before any
/// byte is written. Encoders refuse exactly what would not come back the same
/// from the reader's parser, so that what a client means is what the broker
/// (or a client) reads. The code string is stable, like [`ErrorCode`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A newline would end the line early and start a second one.
    #[error("the {field} contains a newline, which would end the line there; encode such data (JSON, base64, ...) or send one per line")]
    Newline { field: &'static str },
    /// A field the reader finds by position is missing.
    #[error("the {field} is empty")]
    Empty { field: &'static str },
    /// A space where the reader splits fields: it would cut this one short.
    #[error("the {field} has a space where the line separates fields")]
    Space { field: &'static str },
    /// A request id or reply handle with a byte outside printable ASCII,
    /// or longer than [`super::command::MAX_ID_LEN`].
    #[error("the {field} must be 1 to 64 printable ASCII characters without spaces")]
    BadId { field: &'static str },
    /// An [`Unknown`](super::Reply::Unknown) line this version reads as a known one.
    #[error("the line is not unknown: it reads as a known broker line")]
    NotUnknown,
}

impl EncodeError {
    pub fn code(self) -> &'static str {
        match self {
            EncodeError::Newline { .. } => "newline",
            EncodeError::Empty { .. } => "empty-field",
            EncodeError::Space { .. } => "misplaced-space",
            EncodeError::BadId { .. } => "bad-id",
            EncodeError::NotUnknown => "known-line",
        }
    }
}
