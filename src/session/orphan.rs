//! Clients without `pid=`: the broker holds both ends of their FIFOs, so it
//! never sees them leave. They are ended when they stay idle (no command
//! read from `send`, nothing read from `recv`): the one idle longest when
//! the table is full ([`make_room`]), and any of them after
//! `--orphan-timeout` ([`idle_too_long`]). Clients with `pid=` are ended
//! by their process exiting instead, and never for idleness.
//!
//! Neither costs anything while nothing happens: [`make_room`] runs only
//! when the table is full, and each session's idle timer is one tokio timer
//! at its deadline, re-armed only when it fires on a client that was active
//! meanwhile (at most once per timeout), never a periodic tick.

use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::context::Context;
use crate::registry::Activity;
use crate::router::CloseReason;
use crate::{fifo, warn_throttled};

/// Whether the client read from its `recv` since the broker last looked;
/// if so, that counts as a sign of life now. One `FIONREAD`.
pub(super) fn read_since_last_look(a: &Activity) -> bool {
    // Both under the lock the writer writes and counts under: one snapshot.
    let Some((Ok(now), expected)) = a.look(|fd| (fifo::unread_bytes(fd), a.unread.load(Relaxed)))
    else {
        return false;
    };
    let now = now as u64;
    if now >= expected {
        return false; // nothing read
    }
    // Subtract rather than store, so a concurrent `wrote` is kept.
    a.unread.fetch_sub(expected - now, Relaxed);
    a.touch();
    true
}

/// The table is full: ends the client without `pid=` idle longest and
/// takes its place, handed over by its session (so no other newcomer can
/// take it first). `None` when no client without `pid=` is left to end,
/// when [`TRIES`] candidates in a row turned out active, or when no place
/// came back within the handshake timeout.
pub(super) async fn make_room(ctx: &Context) -> Option<OwnedSemaphorePermit> {
    for tried in 1..=TRIES {
        let victim = ctx.clients.longest_idle()?;
        if read_since_last_look(&victim) {
            // Active after all (it read its recv): now the youngest.
            victim.unclaim();
            continue;
        }
        let idle = Instant::now().saturating_duration_since(victim.last());
        let (Some(place), Some(outbox)) = (victim.bequeath(), ctx.clients.outbox(victim.key))
        else {
            // Gone meanwhile: its place went back to everyone.
            match ctx.clients.admit() {
                Some(p) => return Some(p),
                None => continue,
            }
        };
        if outbox.close(CloseReason::Evicted, None).is_some() {
            warn_throttled!(
                ctx.throttle,
                "evicted",
                "client table full ({} clients): ended the client without pid= idle longest ({}s) to admit a new one; clients that should stay give pid= (docs/protocol.md, Lifecycle)",
                ctx.clients.max(),
                idle.as_secs()
            );
        }
        tracing::trace!(tried, "made room");
        // Its session hands its place over once torn down, which takes no
        // waiting for a reason that does not flush.
        return tokio::time::timeout(ctx.config.handshake_timeout, place)
            .await
            .ok()?
            .ok();
    }
    None
}

/// Candidates found active in a row before a newcomer is refused: the
/// table is then full of clients in use.
const TRIES: usize = 64;

/// Resolves once the client has been idle for `--orphan-timeout`; never for
/// clients with `pid=` or with the timeout off.
pub(super) async fn idle_too_long(activity: Option<&Activity>, ctx: &Context) {
    let (Some(a), Some(limit)) = (activity, ctx.config.orphan_timeout) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep_until(a.last() + limit).await;
        if read_since_last_look(a) {
            continue;
        }
        if a.last() + limit <= Instant::now() {
            return;
        }
    }
}
