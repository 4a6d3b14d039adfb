//! The bearer token that guards `/metrics` (`--metrics-token-file`).
//!
//! Loopback is reachable by every local user, and `/metrics` names topics
//! and clients of a bus that is otherwise private (mode 0700). A token that
//! only the broker's user and Prometheus can read closes that side door
//! without a TLS stack: Prometheus sends it with `authorization:
//! credentials_file`, `fifobus stats` with its own `--metrics-token-file`.
//!
//! The token lives in a file, never in an environment variable or on the
//! command line: Prometheus reads secrets from files, and a file's owner and
//! mode say who else can read it, which the broker checks before trusting
//! it ([`BearerToken::load_private`]).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Longest token accepted: far more than any sensible secret, small enough
/// that a wrong `--metrics-token-file` (a log, a binary) is refused quickly.
const MAX_TOKEN_FILE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot open the metrics token file {path}: {source}{hint}", path = .path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("cannot read the metrics token file {path}: {source}", path = .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the metrics token file {path} is not a regular file; give a file holding only the token", path = .path.display())]
    NotAFile { path: PathBuf },
    #[error("the metrics token file {path} is owned by uid {owner}, not by the broker's uid {euid} or root: another user could have chosen the token; chown {euid} {path} (and chmod 600 {path})", path = .path.display())]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error("the metrics token file {path} is accessible to group or others (mode {mode:04o}): anyone who can read it can read /metrics; run chmod 600 {path}", path = .path.display())]
    Mode { path: PathBuf, mode: u32 },
    #[error("the metrics token file {path} is empty; put a random token in it, e.g. openssl rand -hex 32 > {path}", path = .path.display())]
    Empty { path: PathBuf },
    #[error("the metrics token file {path} is larger than {MAX_TOKEN_FILE} bytes; it should hold only the token", path = .path.display())]
    TooLong { path: PathBuf },
    #[error("the metrics token in {path} has a character that cannot be sent in an HTTP header (space, control or non-ASCII) inside it; use printable ASCII, e.g. openssl rand -hex 32 > {path}", path = .path.display())]
    BadCharacter { path: PathBuf },
}

/// A bearer token. Its `Debug` does not show it, so it cannot end up in a log.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    /// The broker's token: from a regular file that only the broker's
    /// effective uid (or root) owns and that group and others cannot access
    /// at all (a group- or world-writable file would let someone else choose
    /// the token; a readable one would let them read it). The last path
    /// component must not be a symlink (`O_NOFOLLOW`), so a link planted
    /// beside the expected name cannot redirect the broker to another file.
    ///
    /// # Errors
    /// Each check that fails says what to do (`chmod 600 FILE`, ...).
    pub fn load_private(path: &Path) -> Result<BearerToken, TokenError> {
        let file = open(path, true)?;
        let meta = file.metadata().map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(TokenError::NotAFile {
                path: path.to_owned(),
            });
        }
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != euid && meta.uid() != 0 {
            return Err(TokenError::Owner {
                path: path.to_owned(),
                owner: meta.uid(),
                euid,
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Mode {
                path: path.to_owned(),
                mode,
            });
        }
        read_token(file, path)
    }

    /// A client's copy of the token (`fifobus stats`). Its owner and mode
    /// are the client's business: it only sends the token.
    ///
    /// # Errors
    /// When the file cannot be read or does not hold a usable token.
    pub fn load(path: &Path) -> Result<BearerToken, TokenError> {
        let file = open(path, false)?;
        if !file.metadata().is_ok_and(|m| m.file_type().is_file()) {
            return Err(TokenError::NotAFile {
                path: path.to_owned(),
            });
        }
        read_token(file, path)
    }

    /// The token as sent after `Bearer `.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether an `Authorization` header value carries this token, compared
    /// in constant time (for tokens of equal length), so the time an answer
    /// takes does not tell an attacker how much of a guess was right. The
    /// scheme is case-insensitive (RFC 9110 §11.1).
    pub fn matches_header(&self, header: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let Some((scheme, rest)) = split_scheme(header) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return false;
        }
        // `ct_eq` on slices of different lengths is false at once: the
        // length of the token is not the secret, its bytes are.
        rest.ct_eq(self.0.as_bytes()).into()
    }
}

fn split_scheme(header: &[u8]) -> Option<(&[u8], &[u8])> {
    let header = header.trim_ascii();
    let space = header.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = header.split_at(space);
    Some((scheme, rest.trim_ascii_start()))
}

fn open(path: &Path, nofollow: bool) -> Result<File, TokenError> {
    let mut flags = libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
    if nofollow {
        flags |= libc::O_NOFOLLOW;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|source| {
            let hint = match source.raw_os_error() {
                Some(libc::ELOOP) if nofollow => {
                    " (it is a symbolic link: give the path of the file itself)"
                }
                Some(libc::EACCES) => " (the broker's user must be able to read it)",
                _ => "",
            };
            TokenError::Open {
                path: path.to_owned(),
                source,
                hint,
            }
        })
}

/// The file's content without surrounding whitespace, as Prometheus reads a
/// `credentials_file` (it trims spaces and newlines too): a token file
/// written with `echo` or an editor works the same for both sides.
fn read_token(file: File, path: &Path) -> Result<BearerToken, TokenError> {
    let mut raw = Vec::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
    if raw.len() as u64 > MAX_TOKEN_FILE {
        return Err(TokenError::TooLong {
            path: path.to_owned(),
        });
    }
    let token = raw.trim_ascii();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_owned(),
        });
    }
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::BadCharacter {
            path: path.to_owned(),
        });
    }
    let token = String::from_utf8(token.to_vec()).expect("ASCII is UTF-8");
    Ok(BearerToken(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_file_gives_its_trimmed_content() {
        let d = tempfile::tempdir().unwrap();
        let p = file(d.path(), "t", "s3cret-token\n", 0o600);
        assert_eq!(
            BearerToken::load_private(&p).unwrap().as_str(),
            "s3cret-token"
        );
        let p = file(d.path(), "r", "  s3cret\r\n", 0o400);
        assert_eq!(BearerToken::load_private(&p).unwrap().as_str(), "s3cret");
    }

    #[test]
    fn group_or_other_access_is_refused_with_chmod_600() {
        let d = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o604, 0o620, 0o602, 0o644] {
            let p = file(d.path(), &format!("t{mode:o}"), "tok", mode);
            let e = BearerToken::load_private(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
            // A client's copy is the client's business.
            assert_eq!(BearerToken::load(&p).unwrap().as_str(), "tok");
        }
    }

    #[test]
    fn a_symlink_is_refused_but_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let real = file(d.path(), "real", "tok", 0o600);
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = BearerToken::load_private(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(e.contains(&link.display().to_string()), "{e}");
    }

    #[test]
    fn empty_odd_or_non_file_tokens_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = file(d.path(), "e", "\n", 0o600);
        assert!(matches!(
            BearerToken::load_private(&p),
            Err(TokenError::Empty { .. })
        ));
        let p = file(d.path(), "s", "two words\n", 0o600);
        assert!(matches!(
            BearerToken::load_private(&p),
            Err(TokenError::BadCharacter { .. })
        ));
        let p = file(d.path(), "l", &"x".repeat(5000), 0o600);
        assert!(matches!(
            BearerToken::load_private(&p),
            Err(TokenError::TooLong { .. })
        ));
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(
            BearerToken::load_private(d.path()),
            Err(TokenError::NotAFile { .. })
        ));
    }

    #[test]
    fn headers_match_only_the_exact_token_with_the_bearer_scheme() {
        let t = BearerToken("abc123".into());
        assert!(t.matches_header(b"Bearer abc123"));
        assert!(t.matches_header(b"bearer  abc123 "));
        for wrong in [
            &b"Bearer abc12"[..],
            b"Bearer abc1234",
            b"Bearer ABC123",
            b"Basic abc123",
            b"abc123",
            b"Bearer",
            b"",
        ] {
            assert!(
                !t.matches_header(wrong),
                "{:?}",
                String::from_utf8_lossy(wrong)
            );
        }
        assert_eq!(format!("{t:?}"), "BearerToken(<redacted>)");
    }
}
