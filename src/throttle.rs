//! Logging refused input without letting a misbehaving client flood the log.
//!
//! Each kind of refusal is logged at most once per second; the next line that
//! gets through says how many were held back. Refusals are rare on a healthy
//! bus, so a plain mutex is fine here: this is never on the message path.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct LogThrottle {
    kinds: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LogThrottle {
    /// Returns `Some(held_back)` if a line of this kind may be logged now.
    pub fn allow(&self, kind: &'static str) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match kinds.get_mut(kind) {
            Some((last, held)) if now.duration_since(*last) < WINDOW => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                kinds.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

/// Logs a refused input once: at `warn` unless another of its kind was
/// logged at `warn` within the last second, else at `debug`.
#[macro_export]
macro_rules! warn_throttled {
    ($throttle:expr, $kind:expr, $($arg:tt)+) => {
        match $throttle.allow($kind) {
            Some(0) => tracing::warn!(kind = $kind, $($arg)+),
            Some(held) => tracing::warn!(kind = $kind, held_back = held, $($arg)+),
            None => tracing::debug!(kind = $kind, $($arg)+),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_line_within_the_window_is_held_back() {
        let t = LogThrottle::default();
        assert_eq!(t.allow("a"), Some(0));
        assert_eq!(t.allow("a"), None);
        assert_eq!(t.allow("b"), Some(0), "kinds are independent");
    }
}
