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
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
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
