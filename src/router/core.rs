//! [`RouterCore`]: every subscription and every client's outbox, owned by one
//! value and changed only through `&mut self`.
//!
//! One owner means no locks around the pattern index and a simple ordering
//! argument: each client's commands arrive in order, are applied in order,
//! and land in FIFO outboxes, so messages from one publisher reach each
//! subscriber in publish order, and `PONG` lands after everything its
//! client's earlier commands caused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use super::outbox::{CloseReason, Outbox, Push};
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
    pub dropped: usize,
}

#[derive(Default)]
pub struct RouterCore {
    index: PatternIndex<ClientKey>,
    clients: HashMap<ClientKey, Client>,
    /// Hashed with foldhash: one lookup per PUB, on the hot path.
    cache: HashMap<Topic, Arc<[Arc<Outbox>]>, foldhash::fast::RandomState>,
    scratch: Vec<ClientKey>,
}

impl RouterCore {
    pub fn new() -> Self {
        Self::default()
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
                self.cache.clear();
            }
        }
    }

    /// Applies one item of a client's batch: a command, or the error its line
    /// produced (answered in place, so replies keep the order of requests).
    /// Items from a client that is no longer attached are ignored.
    pub fn apply(&mut self, key: ClientKey, item: Result<Command, ProtocolError>) -> Delivery {
        let Some(client) = self.clients.get(&key) else {
            return Delivery::default();
        };
        match item {
            Err(e) => {
                client.outbox.push(encode::err(&e));
            }
            Ok(Command::Pub { topic, payload }) => return self.publish(&topic, &payload),
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
    pub fn publish(&mut self, topic: &Topic, payload: &Bytes) -> Delivery {
        let subscribers = match self.cache.get(topic) {
            Some(s) => s.clone(),
            None => self.resolve(topic),
        };
        let mut d = Delivery::default();
        if subscribers.is_empty() {
            return d;
        }
        let line = encode::msg(topic, payload);
        for outbox in subscribers.iter() {
            match outbox.push(line.clone()) {
                Push::Queued => d.delivered += 1,
                Push::QueuedDropping(n) => {
                    d.delivered += 1;
                    d.dropped += n;
                }
                Push::Dropped | Push::Disconnected => d.dropped += 1,
                Push::Closed => {}
            }
        }
        d
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.index.len()
    }

    fn resolve(&mut self, topic: &Topic) -> Arc<[Arc<Outbox>]> {
        self.index.matches(topic, &mut self.scratch);
        let subscribers: Arc<[Arc<Outbox>]> = self
            .scratch
            .iter()
            .filter_map(|k| self.clients.get(k).map(|c| c.outbox.clone()))
            .collect();
        if self.cache.len() >= MATCH_CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(topic.clone(), subscribers.clone());
        subscribers
    }

    fn subscribe(&mut self, key: ClientKey, p: Pattern) {
        if let Some(client) = self.clients.get_mut(&key) {
            if client.patterns.insert(p.clone()) {
                self.index.insert(&p, key);
                self.cache.clear();
            }
        }
    }

    fn unsubscribe(&mut self, key: ClientKey, p: &Pattern) {
        if let Some(client) = self.clients.get_mut(&key) {
            if client.patterns.remove(p) {
                self.index.remove(p, key);
                self.cache.clear();
            }
        }
    }
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
            .map(|b| String::from_utf8_lossy(b).trim_end().to_string())
            .collect()
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
        let mut core = RouterCore::new();
        let a = client(&mut core, 1, &["chat.>", "chat.*", "chat.room"]);
        core.apply(2, cmd("PUB chat.room hi"));
        client(&mut core, 2, &[]);
        let d = core.apply(2, cmd("PUB chat.room hi"));
        assert_eq!(d.delivered, 1);
        assert_eq!(lines(&a), ["MSG chat.room hi"]);
    }

    #[test]
    fn publisher_receives_its_own_messages_then_pong() {
        let mut core = RouterCore::new();
        let a = client(&mut core, 1, &[]);
        core.apply(1, cmd("SUB t"));
        core.apply(1, cmd("PUB t 1"));
        core.apply(1, cmd("PING x"));
        core.apply(
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
        let mut core = RouterCore::new();
        let a = client(&mut core, 1, &["t"]);
        let b = client(&mut core, 2, &[]);
        core.apply(1, cmd("PUB t 1"));
        core.apply(2, cmd("SUB t"));
        core.apply(1, cmd("PUB t 2"));
        core.apply(1, cmd("UNSUB t"));
        core.apply(1, cmd("PUB t 3"));
        core.detach(2);
        core.apply(1, cmd("PUB t 4"));
        assert_eq!(lines(&a), ["MSG t 1", "MSG t 2"]);
        assert_eq!(lines(&b), ["MSG t 2", "MSG t 3"]);
        assert_eq!(core.subscription_count(), 0);
    }

    #[test]
    fn bye_unsubscribes_and_closes_with_bye_last() {
        let mut core = RouterCore::new();
        let a = client(&mut core, 1, &["t"]);
        core.apply(1, cmd("PUB t 1"));
        core.apply(1, cmd("BYE"));
        core.apply(1, cmd("PUB t 2"));
        assert_eq!(core.client_count(), 0);
        let mut q = VecDeque::new();
        assert_eq!(a.take(&mut q), Some(CloseReason::Bye));
        assert_eq!(q, [Bytes::from("MSG t 1\n"), Bytes::from("BYE\n")]);
    }
}
