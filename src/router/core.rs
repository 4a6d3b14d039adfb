//! [`RouterCore`]: every subscription and every client's outbox, owned by one
//! value and changed only through `&mut self`.
//!
//! One owner means no locks around the pattern index and a simple ordering
//! argument: each client's commands arrive in order, are applied in order,
//! and land in FIFO outboxes, so messages from one publisher reach each
//! subscriber in publish order, and `PONG` lands after everything its
//! client's earlier commands caused.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::outbox::{CloseReason, Entry, Outbox, Push};
use crate::counters::{Counters, DropReason, TopicCounters};
use crate::protocol::{encode, Command, ProtocolError};
use crate::topic::{Pattern, PatternIndex, Topic};

/// Identifies a connected client inside the router (cheaper than its uuid).
pub type ClientKey = u64;

/// Literal topics whose subscriber lists are kept ready. Cleared whenever
/// interest changes; bounded so that publishers on ever-new topics cannot
/// grow it without limit.
const MATCH_CACHE_MAX: usize = 4096;

struct Client {
    outbox: Arc<Outbox>,
    patterns: HashSet<Pattern>,
}

/// What one `PUB` did, for the caller's accounting.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub delivered: usize,
    /// Lines discarded under drop-oldest or drop-newest.
    pub dropped: usize,
    /// Lines discarded with clients that the disconnect policy ended.
    pub disconnected: usize,
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// What the router knows about a topic it has routed: who gets it (cleared
/// when interest changes) and its counters (resolved once).
#[derive(Clone)]
struct Route {
    subscribers: Arc<[Arc<Outbox>]>,
    counters: Arc<TopicCounters>,
}

pub struct RouterCore {
    index: PatternIndex<ClientKey>,
    clients: FastMap<ClientKey, Client>,
    /// Hashed with foldhash: one lookup per PUB, on the hot path.
    cache: FastMap<Topic, Route>,
    scratch: Vec<ClientKey>,
    /// Where `MSG` lines are encoded: many lines share one allocation,
    /// instead of a malloc and a free per message.
    arena: bytes::BytesMut,
    counters: Arc<Counters>,
    /// Per-topic counters outlive the match cache, so a topic is resolved
    /// once however often interest changes. Folded topics are not kept:
    /// ever-new topic names must not grow this map without bound.
    topics: FastMap<Topic, Arc<TopicCounters>>,
}

impl RouterCore {
    /// A router that counts into `counters`.
    pub fn new(counters: Arc<Counters>) -> Self {
        RouterCore {
            index: PatternIndex::default(),
            clients: FastMap::default(),
            cache: FastMap::default(),
            scratch: Vec::new(),
            arena: bytes::BytesMut::new(),
            counters,
            topics: FastMap::default(),
        }
    }

    /// Registers a client and its initial subscriptions (from `sub=`), which
    /// are in force before the client is told it is welcome.
    pub fn attach(&mut self, key: ClientKey, outbox: Arc<Outbox>, subs: Vec<Pattern>) {
        self.clients.insert(
            key,
            Client {
                outbox,
                patterns: HashSet::new(),
            },
        );
        for p in subs {
            self.subscribe(key, p);
        }
    }

    /// Forgets a client and all its subscriptions. Idempotent.
    pub fn detach(&mut self, key: ClientKey) {
        if let Some(client) = self.clients.remove(&key) {
            for p in &client.patterns {
                self.index.remove(p, key);
            }
            if !client.patterns.is_empty() {
                self.interest_changed();
            }
        }
    }

    /// Applies one item of a client's batch: a command, or the error its line
    /// produced (answered in place, so replies keep the order of requests).
    /// Items from a client that is no longer attached are ignored. `read_at`
    /// is when the broker read the line, for the latency histogram.
    pub fn apply(
        &mut self,
        key: ClientKey,
        item: Result<Command, ProtocolError>,
        read_at: Instant,
    ) -> Delivery {
        let Some(client) = self.clients.get(&key) else {
            return Delivery::default();
        };
        match item {
            Err(e) => {
                client.outbox.push(encode::err(&e));
            }
            Ok(Command::Pub { topic, payload }) => return self.publish(&topic, &payload, read_at),
            Ok(Command::Sub(p)) => self.subscribe(key, p),
            Ok(Command::Unsub(p)) => self.unsubscribe(key, &p),
            Ok(Command::Ping(token)) => {
                client.outbox.push(encode::pong(token.as_deref()));
            }
            Ok(Command::Bye) => {
                let outbox = client.outbox.clone();
                self.detach(key);
                outbox.close(CloseReason::Bye, Some(encode::bye()));
            }
        }
        Delivery::default()
    }

    /// Encodes the message once and queues the same buffer for every client
    /// with at least one matching pattern.
    pub fn publish(&mut self, topic: &Topic, payload: &Bytes, read_at: Instant) -> Delivery {
        // One hash lookup on a hit (the usual case); the route is borrowed,
        // not cloned: a per-message clone of the subscriber list and the
        // metric handles was a visible share of the 1 -> 1 profile.
        if let Some(route) = self.cache.get(topic) {
            return deliver(
                route,
                &mut self.arena,
                &self.counters,
                topic,
                payload,
                read_at,
            );
        }
        self.resolve(topic);
        let route = &self.cache[topic];
        deliver(
            route,
            &mut self.arena,
            &self.counters,
            topic,
            payload,
            read_at,
        )
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.index.len()
    }

    fn resolve(&mut self, topic: &Topic) {
        self.index.matches(topic, &mut self.scratch);
        let subscribers: Arc<[Arc<Outbox>]> = self
            .scratch
            .iter()
            .filter_map(|k| self.clients.get(k).map(|c| c.outbox.clone()))
            .collect();
        let counters = match self.topics.get(topic) {
            Some(c) => c.clone(),
            None => match self.counters.topic(topic.as_str()) {
                Some(c) => {
                    self.topics.insert(topic.detached(), c.clone());
                    c
                }
                None => self.counters.other_topic(),
            },
        };
        if self.cache.len() >= MATCH_CACHE_MAX {
            self.cache.clear();
        }
        let route = Route {
            subscribers,
            counters,
        };
        self.cache.insert(topic.detached(), route);
    }

    fn interest_changed(&mut self) {
        self.cache.clear();
        self.counters
            .subscriptions
            .store(self.index.len() as u64, Relaxed);
    }

    fn subscribe(&mut self, key: ClientKey, p: Pattern) {
        if let Some(client) = self.clients.get_mut(&key) {
            let p = p.detached();
            if client.patterns.insert(p.clone()) {
                self.index.insert(&p, key);
                self.interest_changed();
            }
        }
    }

    fn unsubscribe(&mut self, key: ClientKey, p: &Pattern) {
        if let Some(client) = self.clients.get_mut(&key) {
            if client.patterns.remove(p) {
                self.index.remove(p, key);
                self.interest_changed();
            }
        }
    }
}

/// Encodes the message once into `arena` and queues the same buffer for
/// every subscriber of `route`; counts it. A free function over the
/// router's fields so that the route can stay borrowed from the cache.
fn deliver(
    route: &Route,
    arena: &mut bytes::BytesMut,
    counters: &Counters,
    topic: &Topic,
    payload: &Bytes,
    read_at: Instant,
) -> Delivery {
    let mut d = Delivery::default();
    // Which policy dropped is told by the outcome, so the core needs no
    // knowledge of the configured policy to count it.
    let (mut oldest, mut newest) = (0, 0);
    if !route.subscribers.is_empty() {
        let line = encode::msg_into(arena, topic, payload);
        for outbox in route.subscribers.iter() {
            let entry = Entry {
                line: line.clone(),
                published: Some(read_at),
            };
            match outbox.push_entry(entry) {
                Push::Queued => d.delivered += 1,
                Push::QueuedDropping(n) => {
                    d.delivered += 1;
                    oldest += n;
                }
                Push::Dropped => newest += 1,
                Push::Disconnected(n) => d.disconnected += n + 1,
                Push::Closed => {}
            }
        }
    }
    d.dropped = oldest + newest;
    let len = payload.len() as u64;
    let tc = &route.counters;
    tc.published.fetch_add(1, Relaxed);
    tc.published_bytes.fetch_add(len, Relaxed);
    if route.subscribers.is_empty() {
        counters.unrouted.fetch_add(1, Relaxed);
    } else {
        tc.delivered.fetch_add(d.delivered as u64, Relaxed);
        tc.delivered_bytes
            .fetch_add(d.delivered as u64 * len, Relaxed);
    }
    counters.dropped(DropReason::BacklogOldest, oldest as u64);
    counters.dropped(DropReason::BacklogNewest, newest as u64);
    counters.dropped(DropReason::SlowConsumer, d.disconnected as u64);
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::outbox::BacklogLimits;
    use std::collections::VecDeque;

    fn lines(o: &Outbox) -> Vec<String> {
        let mut q = VecDeque::new();
        o.take(&mut q);
        q.iter()
            .map(|e| String::from_utf8_lossy(&e.line).trim_end().to_string())
            .collect()
    }

    /// `RouterCore::apply` with "now" as the read time.
    trait ApplyNow {
        fn now(&mut self, key: ClientKey, item: Result<Command, ProtocolError>) -> Delivery;
    }

    impl ApplyNow for RouterCore {
        fn now(&mut self, key: ClientKey, item: Result<Command, ProtocolError>) -> Delivery {
            self.apply(key, item, Instant::now())
        }
    }

    fn cmd(s: &str) -> Result<Command, ProtocolError> {
        Command::parse(Bytes::copy_from_slice(s.as_bytes())).map(|c| c.expect("not blank"))
    }

    fn client(core: &mut RouterCore, key: ClientKey, subs: &[&str]) -> Arc<Outbox> {
        let o = Arc::new(Outbox::new(BacklogLimits::default()));
        let subs = subs.iter().map(|s| s.parse().unwrap()).collect();
        core.attach(key, o.clone(), subs);
        o
    }

    #[test]
    fn overlapping_patterns_deliver_once() {
        let mut core = RouterCore::new(Counters::new(100));
        let a = client(&mut core, 1, &["chat.>", "chat.*", "chat.room"]);
        core.now(2, cmd("PUB chat.room hi"));
        client(&mut core, 2, &[]);
        let d = core.now(2, cmd("PUB chat.room hi"));
        assert_eq!(d.delivered, 1);
        assert_eq!(lines(&a), ["MSG chat.room hi"]);
    }

    #[test]
    fn publisher_receives_its_own_messages_then_pong() {
        let mut core = RouterCore::new(Counters::new(100));
        let a = client(&mut core, 1, &[]);
        core.now(1, cmd("SUB t"));
        core.now(1, cmd("PUB t 1"));
        core.now(1, cmd("PING x"));
        core.now(
            1,
            Err(ProtocolError::new(
                crate::protocol::ErrorCode::BadTopic,
                "nope",
            )),
        );
        assert_eq!(lines(&a), ["MSG t 1", "PONG x", "ERR bad-topic nope"]);
    }

    #[test]
    fn cache_follows_interest_changes() {
        let mut core = RouterCore::new(Counters::new(100));
        let a = client(&mut core, 1, &["t"]);
        let b = client(&mut core, 2, &[]);
        core.now(1, cmd("PUB t 1"));
        core.now(2, cmd("SUB t"));
        core.now(1, cmd("PUB t 2"));
        core.now(1, cmd("UNSUB t"));
        core.now(1, cmd("PUB t 3"));
        core.detach(2);
        core.now(1, cmd("PUB t 4"));
        assert_eq!(lines(&a), ["MSG t 1", "MSG t 2"]);
        assert_eq!(lines(&b), ["MSG t 2", "MSG t 3"]);
        assert_eq!(core.subscription_count(), 0);
    }

    #[test]
    fn bye_unsubscribes_and_closes_with_bye_last() {
        let mut core = RouterCore::new(Counters::new(100));
        let a = client(&mut core, 1, &["t"]);
        core.now(1, cmd("PUB t 1"));
        core.now(1, cmd("BYE"));
        core.now(1, cmd("PUB t 2"));
        assert_eq!(core.client_count(), 0);
        let mut q = VecDeque::new();
        assert_eq!(a.take(&mut q), Some(CloseReason::Bye));
        let got: Vec<&[u8]> = q.iter().map(|e| &e.line[..]).collect();
        assert_eq!(got, [&b"MSG t 1\n"[..], b"BYE\n"]);
    }
}
