//! The live clients: one table, filled and emptied by [`crate::session`]
//! alone, read by the watcher (which client does this inotify watch
//! belong to?), the metrics (backlog per client, at scrape time) and the
//! broker (how many are connected?).
//!
//! The connection limit is a semaphore: [`Registry::admit`] hands out a
//! permit that the session owns, so a client's place is given back when its
//! session is dropped, however it ends (mini-redis's `Listener`).
//!
//! Off the message path: the router keeps its own map of outboxes.
//!
//! Clients without `pid=` also get an [`Activity`] here: the broker cannot
//! see them leave (it holds both ends of their FIFOs), so when the table is
//! full it ends the one idle longest ([`Registry::longest_idle`]), and each
//! session ends its client after `--orphan-timeout` of idleness.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use nix::sys::inotify::WatchDescriptor;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::counters::{Counters, ALL, OTHER};
use crate::fifo::FileId;
use crate::router::{ClientKey, Outbox};

/// What the rest of the broker may know about a live client.
#[derive(Debug)]
pub struct ClientEntry {
    pub key: ClientKey,
    /// The client's `name=`, else its uuid: what logs call it.
    pub label: String,
    /// The label of its metric series: `label`, or `_other` once
    /// `--metrics-client-limit` labels are in use.
    pub series: String,
    pub dir: PathBuf,
    pub outbox: Arc<Outbox>,
    /// The inotify watch on `dir`, if one could be added.
    pub watch: Option<WatchDescriptor>,
    /// Its `send` and `recv` FIFOs: a handshake's `reply=` must be neither.
    pub fifos: [FileId; 2],
}

/// What shows that a client without `pid=` is still there: a command read
/// from its `send`, or bytes read by it from its `recv`. Updated at most
/// once per batch by its reader and writer (relaxed atomics); read when the
/// table is full and when its idle timer fires.
///
/// Reads from `recv` are not seen as they happen (that would cost a wake-up
/// per read): the writer adds what it writes to `unread`, the bytes `recv`
/// would hold had the client read nothing since the broker last looked, and
/// whoever looks compares that with `FIONREAD` (see `session::orphan`).
#[derive(Debug)]
pub struct Activity {
    pub key: ClientKey,
    origin: Instant,
    /// Nanoseconds from `origin` to the last sign of life.
    last: AtomicU64,
    /// Bytes `recv` would hold had the client read nothing since the broker
    /// last looked.
    pub unread: AtomicU64,
    /// The broker's descriptor of `recv` while it is open, and who gets the
    /// client's place when it ends. Looking at `recv` holds this lock, so
    /// the descriptor cannot be closed (and its number reused) meanwhile.
    recv: Mutex<Recv>,
    /// Chosen to be ended to make room: no second newcomer picks it.
    claimed: AtomicBool,
}

#[derive(Debug)]
struct Recv {
    /// `-1` once the session lets go of it.
    fd: RawFd,
    /// The newcomer this client is being ended for: its place goes there.
    heir: Option<oneshot::Sender<OwnedSemaphorePermit>>,
}

impl Activity {
    /// Runs `f` on the broker's descriptor of `recv`, if it is still open,
    /// and keeps it open meanwhile.
    pub fn look<R>(&self, f: impl FnOnce(RawFd) -> R) -> Option<R> {
        let recv = self.lock();
        (recv.fd >= 0).then(|| f(recv.fd))
    }

    /// Names the newcomer this client is being ended for: the place it
    /// gives back goes to the returned receiver, not to whoever asks first.
    /// `None` if the client is already gone (its place went back as usual).
    pub fn bequeath(&self) -> Option<oneshot::Receiver<OwnedSemaphorePermit>> {
        let mut recv = self.lock();
        if recv.fd < 0 {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        recv.heir = Some(tx);
        Some(rx)
    }

    /// The session is closing `recv` and giving back its place: nobody may
    /// look at `recv` any more, and the place goes to the heir, if named.
    pub fn release(&self, place: Option<OwnedSemaphorePermit>) {
        let heir = {
            let mut recv = self.lock();
            recv.fd = -1;
            recv.heir.take()
        };
        if let (Some(heir), Some(place)) = (heir, place) {
            // A heir that gave up waiting drops it: back to everyone.
            let _ = heir.send(place);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recv> {
        self.recv.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sign of life now.
    pub fn touch(&self) {
        let ns = Instant::now()
            .saturating_duration_since(self.origin)
            .as_nanos() as u64;
        self.last.fetch_max(ns, Ordering::Relaxed);
    }

    /// When the client last showed it is there (as far as the broker knows).
    pub fn last(&self) -> Instant {
        self.origin + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    /// Runs the writer's `write` to `recv` and counts what it wrote, both
    /// under the lock a look at `recv` holds: a look then never sees bytes
    /// the client already read but the writer had not yet counted (that
    /// read would go unnoticed, and an active client could be taken for
    /// the one idle longest).
    pub fn write(&self, write: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
        let _recv = self.lock();
        let n = write()?;
        self.unread.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    /// Takes this client as the one to end; `false` if another newcomer did.
    pub fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::Relaxed)
    }

    /// It turned out to be active: another may choose it later.
    pub fn unclaim(&self) {
        self.claimed.store(false, Ordering::Relaxed);
    }
}

pub struct Registry {
    clients: DashMap<ClientKey, Arc<ClientEntry>>,
    /// The clients without `pid=`, which may be ended for idleness.
    idle: DashMap<ClientKey, Arc<Activity>>,
    /// Common origin of every [`Activity`] time, so they compare.
    origin: Instant,
    /// Held while choosing a client to end (see [`Registry::longest_idle`]).
    choosing: Mutex<()>,
    by_watch: DashMap<WatchDescriptor, ClientKey>,
    /// Every live client's FIFOs, so a `reply=` naming one (even by a hard
    /// link outside the bus directory) is refused in one lookup.
    by_fifo: DashMap<FileId, ClientKey>,
    slots: Arc<Semaphore>,
    max: usize,
    /// Series labels in use, and how many live clients share each.
    series: Mutex<HashMap<String, usize>>,
    series_limit: usize,
    /// `false`: every client's series is [`ALL`], so `/metrics` names none.
    series_labels: bool,
    counters: Arc<Counters>,
    next_key: AtomicU64,
}

impl Registry {
    /// A table for at most `max` clients, of which the first
    /// `series_limit` distinct labels get metric series of their own.
    pub fn new(max: usize, series_limit: usize, counters: Arc<Counters>) -> Arc<Registry> {
        Arc::new(Registry {
            clients: DashMap::new(),
            idle: DashMap::new(),
            origin: Instant::now(),
            choosing: Mutex::default(),
            by_watch: DashMap::new(),
            by_fifo: DashMap::new(),
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
            series: Mutex::default(),
            series_limit,
            series_labels: true,
            counters,
            next_key: AtomicU64::new(1),
        })
    }

    /// A table whose clients' metric series name none of them: all are
    /// summed under [`ALL`] (`--metrics-client-labels off`).
    pub fn without_client_labels(max: usize, counters: Arc<Counters>) -> Arc<Registry> {
        let mut r = Registry::new(max, 0, counters);
        Arc::get_mut(&mut r).expect("just made").series_labels = false;
        r
    }

    /// A place for one more client, or `None` when `max` are connected.
    /// The place is given back when the permit is dropped.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Starts tracking the activity of client `key` (one without `pid=`),
    /// whose `recv` the broker holds as `recv`. Active from now.
    pub fn track_activity(&self, key: ClientKey, recv: RawFd) -> Arc<Activity> {
        let a = Arc::new(Activity {
            key,
            origin: self.origin,
            last: AtomicU64::new(0),
            unread: AtomicU64::new(0),
            recv: Mutex::new(Recv {
                fd: recv,
                heir: None,
            }),
            claimed: AtomicBool::new(false),
        });
        a.touch();
        self.idle.insert(key, a.clone());
        a
    }

    /// The unclaimed client without `pid=` idle longest (the earlier
    /// connected first among equals), claimed for the caller; `None` if
    /// there is none. One pass over the clients without `pid=`: it runs
    /// only when the table is full.
    pub fn longest_idle(&self) -> Option<Arc<Activity>> {
        // One newcomer chooses at a time: under a flood of HELLOs on a full
        // table, concurrent choosers would all find the same client and all
        // but one look again, a pass each.
        let _one = self.choosing.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = self
            .idle
            .iter()
            .filter(|e| !e.claimed.load(Ordering::Relaxed))
            .min_by_key(|e| (e.last.load(Ordering::Relaxed), e.key))
            .map(|e| e.value().clone())?;
        let claimed = oldest.claim();
        debug_assert!(claimed, "only claimed while choosing");
        Some(oldest)
    }

    /// Whether a client without `pid=` could be ended to make room. Cheap
    /// when every client has `pid=`: a full table of those refuses a
    /// newcomer before it costs anything.
    pub fn may_make_room(&self) -> bool {
        self.idle.iter().any(|e| !e.claimed.load(Ordering::Relaxed))
    }

    /// The outbox of client `key`, if it is live.
    pub fn outbox(&self, key: ClientKey) -> Option<Arc<Outbox>> {
        self.clients.get(&key).map(|e| e.outbox.clone())
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn next_key(&self) -> ClientKey {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a live client. `label` becomes its series label unless the
    /// limit of distinct labels is reached: then it is counted under `_other`.
    pub fn insert(
        &self,
        key: ClientKey,
        label: String,
        dir: PathBuf,
        outbox: Arc<Outbox>,
        watch: Option<WatchDescriptor>,
        fifos: [FileId; 2],
    ) -> Arc<ClientEntry> {
        let series = self.take_series(&label);
        let entry = Arc::new(ClientEntry {
            key,
            label,
            series,
            dir,
            outbox,
            watch,
            fifos,
        });
        for id in fifos {
            self.by_fifo.insert(id, key);
        }
        if let Some(wd) = watch {
            self.by_watch.insert(wd, key);
        }
        self.clients.insert(key, entry.clone());
        entry
    }

    /// Forgets a client. Returns its watch descriptor if it is still this
    /// client's (the kernel reuses descriptors once a watch is gone), so the
    /// caller removes the right inotify watch.
    pub fn remove(&self, key: ClientKey) -> Option<WatchDescriptor> {
        self.idle.remove(&key);
        let (_, entry) = self.clients.remove(&key)?;
        for id in entry.fifos {
            self.by_fifo.remove_if(&id, |_, k| *k == key);
        }
        self.give_back_series(&entry);
        let wd = entry.watch?;
        self.by_watch
            .remove_if(&wd, |_, k| *k == key)
            .map(|(wd, _)| wd)
    }

    /// The client watched through `wd`, if any.
    pub fn by_watch(&self, wd: WatchDescriptor) -> Option<Arc<ClientEntry>> {
        let key = *self.by_watch.get(&wd)?;
        self.clients.get(&key).map(|e| e.clone())
    }

    /// Whether `id` is the `send` or `recv` of a live client.
    pub fn holds(&self, id: FileId) -> bool {
        self.by_fifo.contains_key(&id)
    }

    /// The kernel dropped the watch `wd` (its directory is gone).
    pub fn forget_watch(&self, wd: WatchDescriptor) {
        self.by_watch.remove(&wd);
    }

    /// Calls `f` on every live client. Holds shard locks while it runs: keep
    /// `f` short and do not call back into the registry.
    pub fn for_each(&self, mut f: impl FnMut(&ClientEntry)) {
        for e in self.clients.iter() {
            f(e.value());
        }
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    fn labels(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_series(&self, label: &str) -> String {
        if !self.series_labels {
            return ALL.to_owned();
        }
        let mut labels = self.labels();
        if labels.contains_key(label) || labels.len() < self.series_limit {
            *labels.entry(label.to_owned()).or_default() += 1;
            label.to_owned()
        } else {
            self.counters.folded_clients.fetch_add(1, Ordering::Relaxed);
            OTHER.to_owned()
        }
    }

    fn give_back_series(&self, entry: &ClientEntry) {
        if !self.series_labels {
            return;
        }
        // A folded client never took a slot (a client may also be *named*
        // _other, and then it did).
        if entry.series == OTHER && entry.label != OTHER {
            return;
        }
        let mut labels = self.labels();
        if let Some(n) = labels.get_mut(&entry.series) {
            *n -= 1;
            if *n == 0 {
                labels.remove(&entry.series);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::BacklogLimits;

    fn fifos(n: u64) -> [FileId; 2] {
        [
            FileId { dev: 0, ino: 2 * n },
            FileId {
                dev: 0,
                ino: 2 * n + 1,
            },
        ]
    }

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(BacklogLimits::default()))
    }

    #[test]
    fn permits_bound_the_clients_and_come_back_on_drop() {
        let r = Registry::new(2, 10, Counters::new(1));
        let a = r.admit().expect("first");
        let _b = r.admit().expect("second");
        assert!(r.admit().is_none(), "the third waits for a place");
        drop(a);
        assert!(r.admit().is_some(), "a dropped permit is a free place");
    }

    #[test]
    fn a_client_named_other_keeps_its_slot_when_a_folded_client_leaves() {
        let c = Counters::new(1);
        let r = Registry::new(10, 1, c.clone());
        let dir = PathBuf::from("/nonexistent");
        r.insert(1, OTHER.into(), dir.clone(), outbox(), None, fifos(1));
        let bob = r.insert(2, "bob".into(), dir.clone(), outbox(), None, fifos(2));
        assert_eq!(bob.series, OTHER, "folded: the one slot is taken");
        r.remove(2);
        let carol = r.insert(3, "carol".into(), dir, outbox(), None, fifos(3));
        assert_eq!(carol.series, OTHER, "still folded: _other holds the slot");
        assert_eq!(c.folded_clients.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn without_client_labels_every_client_is_all_and_nothing_folds() {
        let c = Counters::new(1);
        let r = Registry::without_client_labels(10, c.clone());
        let dir = PathBuf::from("/nonexistent");
        let alice = r.insert(1, "alice".into(), dir.clone(), outbox(), None, fifos(1));
        let bob = r.insert(2, "bob".into(), dir, outbox(), None, fifos(2));
        assert_eq!((alice.series.as_str(), bob.series.as_str()), (ALL, ALL));
        assert_eq!(alice.label, "alice", "logs still know the name");
        r.remove(1);
        assert_eq!(c.folded_clients.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_longest_idle_is_claimed_once_and_removed_clients_are_not_candidates() {
        let r = Registry::new(10, 10, Counters::new(1));
        let a = r.track_activity(1, -1);
        let b = r.track_activity(2, -1);
        let _c = r.track_activity(3, -1);
        // Tracked in this order; a is then active again.
        a.touch();
        let first = r.longest_idle().expect("three candidates");
        assert_eq!(first.key, 2, "b: idle longest");
        assert_eq!(r.longest_idle().unwrap().key, 3, "b is claimed; c next");
        assert_eq!(r.longest_idle().unwrap().key, 1);
        assert!(r.longest_idle().is_none(), "all claimed");
        b.unclaim();
        assert_eq!(
            r.longest_idle().unwrap().key,
            2,
            "unclaimed: a candidate again"
        );
        b.unclaim();
        r.remove(2);
        assert!(r.longest_idle().is_none(), "removed: not a candidate");
    }

    #[test]
    fn an_ended_clients_place_goes_to_its_heir_not_to_the_first_comer() {
        let r = Registry::new(1, 10, Counters::new(1));
        let place = r.admit().expect("one place");
        // The descriptor is only stored here, never used.
        let a = r.track_activity(1, 7);
        assert_eq!(a.look(|fd| fd), Some(7));
        let mut heir = a.bequeath().expect("still open");
        a.release(Some(place));
        assert!(r.admit().is_none(), "the place was not given to everyone");
        let place = heir.try_recv().expect("handed over");
        assert_eq!(a.look(|fd| fd), None, "closed: nobody may look");
        assert!(a.bequeath().is_none(), "gone: no heir can be named");
        drop(place);
        assert!(r.admit().is_some());
    }

    #[test]
    fn held_fifos_are_known_while_their_client_lives() {
        let r = Registry::new(10, 10, Counters::new(1));
        r.insert(1, "a".into(), PathBuf::from("/x"), outbox(), None, fifos(1));
        assert!(r.holds(fifos(1)[0]) && r.holds(fifos(1)[1]));
        assert!(!r.holds(fifos(2)[0]));
        r.remove(1);
        assert!(!r.holds(fifos(1)[0]));
    }
}
