//! [`RouterCore`]: every subscription and every client's outbox, owned by one
//! value and changed only through `&mut self`.
//!
//! One owner means no locks around the pattern index and a simple ordering
//! argument: each client's commands arrive in order, are applied in order,
//! and land in FIFO outboxes, so messages from one publisher reach each
//! subscriber in publish order, and `PONG` lands after everything its
//! client's earlier commands caused.
//!
//! The access-control policy is a value held here ([`Policy`], swapped by
//! [`RouterCore::set_policy`]); its decisions are kept per topic beside the
//! route, so under an ACL a message costs one more small lookup, and
//! without one nothing at all.

mod bus;
mod requests;

pub use bus::{is_bus_topic, ClientInfo, BUS_PREFIX};
pub use requests::MAX_PENDING_REQUESTS;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::outbox::{CloseReason, Entry, Outbox, Push};
use crate::acl::{Identity, Policy, Sub};
use crate::counters::{Counters, DropReason, TopicCounters};
use crate::protocol::{encode, Command, ErrorCode, ProtocolError};
use crate::topic::{Pattern, PatternIndex, Topic};

/// Identifies a connected client inside the router (cheaper than its uuid).
pub type ClientKey = u64;

/// Literal topics whose subscriber lists are kept ready. Cleared whenever
/// interest changes; bounded so that publishers on ever-new topics cannot
/// grow it without limit.
const MATCH_CACHE_MAX: usize = 4096;
/// Publish decisions remembered per route (one per publishing client);
/// beyond this the policy is asked each time.
const PUBLISHERS_MAX: usize = 256;
/// `--max-subscriptions`' default: far more than any real client holds
/// (860 bytes each), few enough that one client cannot grow the index
/// without bound.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;
/// Reclaim rounds per budget check: each frees from the largest backlog,
/// so this only stops a pathological loop (every backlog in writers' hands).
const RECLAIM_ROUNDS: usize = 64;

struct Client {
    outbox: Arc<Outbox>,
    patterns: HashSet<Pattern>,
    who: Identity,
    /// Its requests and the ones it serves (`requests.rs`).
    req: requests::ClientRequests,
    /// Set once it is welcome (`bus.rs`): only then is it announced.
    info: Option<ClientInfo>,
}

/// What one uid holds, for the ACL's per-user limits.
#[derive(Default)]
struct PerUser {
    clients: usize,
    subscriptions: usize,
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
    /// Under an ACL: whether each client that published here may.
    publishers: FastMap<ClientKey, bool>,
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
    policy: Arc<Policy>,
    per_user: FastMap<u32, PerUser>,
    /// `--max-subscriptions`: per client, whatever the policy.
    max_subscriptions: usize,
    requests: requests::Requests,
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
            policy: Arc::new(Policy::open()),
            per_user: FastMap::default(),
            max_subscriptions: MAX_SUBSCRIPTIONS,
            requests: requests::Requests::default(),
        }
    }

    /// Sets `--max-subscriptions`, the most patterns one client may hold.
    pub fn set_max_subscriptions(&mut self, max: usize) {
        self.max_subscriptions = max;
    }

    /// Enforces the memory budget (`counters.memory`) if it is exceeded:
    /// the overflow policy is applied to the largest backlog, then the next
    /// largest, until what clients hold is back under the low-water mark.
    /// Each round takes from the largest down to the second largest (at
    /// least 1/64 of the budget), so equal backlogs lose about equally and a
    /// small one loses nothing while a larger one can pay. Returns the lines
    /// discarded, counted as `memory-budget` drops.
    ///
    /// Checked after every command: one relaxed load when under budget.
    pub fn reclaim(&mut self) -> usize {
        if !self.counters.memory.over() {
            return 0;
        }
        let budget = self.counters.memory.clone();
        let step = (budget.limit() / 64).max(1);
        let mut lost = 0;
        for _ in 0..RECLAIM_ROUNDS {
            let held = budget.held();
            let target = budget.low_water();
            if held <= target {
                break;
            }
            let (mut first, mut second) = ((0, None), 0);
            for c in self.clients.values() {
                let n = c.outbox.sheddable();
                if n > first.0 {
                    second = first.0;
                    first = (n, Some(&c.outbox));
                } else if n > second {
                    second = n;
                }
            }
            let (largest, Some(victim)) = first else {
                // Everything held is in writers' hands or partial lines:
                // nothing the policy can act on.
                break;
            };
            let want = (held - target).min((largest - second).max(step));
            let (lines, freed) = victim.shed(want);
            lost += lines;
            if freed == 0 {
                break;
            }
        }
        self.counters.dropped(DropReason::MemoryBudget, lost as u64);
        lost
    }

    /// Puts `policy` in force: for every command from now on, and for the
    /// subscriptions already made: deliveries are filtered by it at once,
    /// and a subscription it denies entirely is removed, its client told
    /// with `ERR forbidden <pattern>`. Limits apply to what comes next;
    /// what is already above them stays.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
        let mut dropped = Vec::new();
        for (&key, client) in &self.clients {
            for p in &client.patterns {
                if self.policy.may_subscribe(&client.who, p) == Sub::Denied {
                    dropped.push((key, p.clone()));
                }
            }
        }
        for (key, p) in dropped {
            self.unsubscribe(key, &p);
            if let Some(c) = self.clients.get(&key) {
                c.outbox.push(encode::err(&forbidden(&p)));
                self.counters.protocol_error(ErrorCode::Forbidden);
            }
        }
        // Routes hold the old policy's decisions.
        self.interest_changed();
    }

    /// [`RouterCore::attach_as`] for a router without an ACL (tests and
    /// benchmarks): the client is uid 0 with no groups.
    ///
    /// # Panics
    /// If the policy refuses the client.
    pub fn attach(&mut self, key: ClientKey, outbox: Arc<Outbox>, subs: Vec<Pattern>) {
        if let Err(e) = self.attach_as(key, outbox, Identity::default(), subs) {
            panic!("the policy refused the client: {e}; use attach_as");
        }
    }

    /// Registers a client and its initial subscriptions (from `sub=`), which
    /// are in force before the client is told it is welcome. `who` is whom
    /// the policy judges.
    ///
    /// # Errors
    /// Nothing is registered, and the error answers the HELLO, when the
    /// policy refuses: the user has its `clients` limit connected
    /// (`too-many-clients`), a `sub=` pattern is denied entirely
    /// (`forbidden`), or the patterns would pass the user's `subscriptions`
    /// limit (`too-many-subscriptions`).
    pub fn attach_as(
        &mut self,
        key: ClientKey,
        outbox: Arc<Outbox>,
        who: Identity,
        subs: Vec<Pattern>,
    ) -> Result<(), ProtocolError> {
        let distinct = subs.iter().collect::<HashSet<&Pattern>>().len();
        if distinct > self.max_subscriptions {
            return Err(too_many_for_client(self.max_subscriptions));
        }
        if !self.policy.is_open() {
            let limits = self.policy.limits(&who);
            let held = self.per_user.get(&who.uid);
            if let Some(max) = limits.clients {
                if held.map_or(0, |h| h.clients) >= max {
                    return Err(ProtocolError::new(
                        ErrorCode::TooManyClients,
                        format!("{who} may have at most {max} clients at once (per-user limit in the broker's ACL); close one and try again"),
                    ));
                }
            }
            for p in &subs {
                if self.policy.may_subscribe(&who, p) == Sub::Denied {
                    return Err(forbidden(p));
                }
            }
            if let Some(max) = limits.subscriptions {
                let distinct: HashSet<&Pattern> = subs.iter().collect();
                if held.map_or(0, |h| h.subscriptions) + distinct.len() > max {
                    return Err(too_many_subscriptions(&who, max));
                }
            }
        }
        self.per_user.entry(who.uid).or_default().clients += 1;
        self.clients.insert(
            key,
            Client {
                outbox,
                patterns: HashSet::new(),
                who,
                req: requests::ClientRequests::default(),
                info: None,
            },
        );
        for p in subs {
            // Checked above, all together.
            self.add_subscription(key, p);
        }
        Ok(())
    }

    /// Forgets a client and all its subscriptions. Idempotent.
    pub fn detach(&mut self, key: ClientKey) {
        if let Some(client) = self.clients.remove(&key) {
            for p in &client.patterns {
                self.index.remove(p, key);
            }
            if let Some(u) = self.per_user.get_mut(&client.who.uid) {
                u.clients -= 1;
                u.subscriptions -= client.patterns.len();
                if u.clients == 0 {
                    self.per_user.remove(&client.who.uid);
                }
            }
            if !client.patterns.is_empty() {
                self.interest_changed();
            }
            self.forget_requests(key, client.req);
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
        let d = self.apply_one(key, item, read_at);
        let lost = self.reclaim();
        Delivery {
            dropped: d.dropped + lost,
            ..d
        }
    }

    fn apply_one(
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
            Ok(Command::Pub { topic, payload }) => {
                if topic.as_bytes().starts_with(b"_bus") && is_bus_topic(&topic) {
                    self.refuse(key, forbidden(&topic));
                    return Delivery::default();
                }
                if self.policy.is_open() {
                    return self.publish(&topic, &payload, read_at);
                }
                return self.publish_as(key, &topic, &payload, read_at);
            }
            Ok(Command::Sub(p)) => {
                if let Err(e) = self.subscribe(key, p) {
                    self.counters.protocol_error(e.code);
                    if let Some(client) = self.clients.get(&key) {
                        client.outbox.push(encode::err(&e));
                    }
                }
            }
            Ok(Command::Unsub(p)) => self.unsubscribe(key, &p),
            Ok(Command::Ping(token)) => {
                client.outbox.push(encode::pong(token.as_deref()));
            }
            Ok(Command::Bye) => {
                let outbox = client.outbox.clone();
                self.leave(key, CloseReason::Bye.as_str());
                outbox.close(CloseReason::Bye, Some(encode::bye()));
            }
            Ok(Command::Req { id, topic, payload }) => self.request(key, id, &topic, &payload),
            Ok(Command::Respond { handle, payload }) => self.respond(key, &handle, &payload),
            Ok(Command::Serve(p)) => self.serve(key, p),
            Ok(Command::Unserve(p)) => self.unserve(key, &p),
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

    /// [`RouterCore::publish`] on behalf of client `key`, if the policy
    /// lets it publish to `topic`; otherwise `ERR forbidden <topic>` goes to
    /// that client and nothing is delivered or counted as published. The
    /// decision is kept with the topic's route, so it is made once per
    /// client and topic, not once per message.
    pub fn publish_as(
        &mut self,
        key: ClientKey,
        topic: &Topic,
        payload: &Bytes,
        read_at: Instant,
    ) -> Delivery {
        // As in `publish`: on a hit, one lookup for the route and one for
        // this publisher's decision kept in it.
        if let Some(route) = self.cache.get_mut(topic) {
            if !may_publish(
                route,
                key,
                &self.clients,
                &self.policy,
                &self.counters,
                topic,
            ) {
                return Delivery::default();
            }
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
        let route = self.cache.get_mut(topic).expect("just resolved");
        if !may_publish(
            route,
            key,
            &self.clients,
            &self.policy,
            &self.counters,
            topic,
        ) {
            return Delivery::default();
        }
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
        // A partial subscription matches topics its client may not receive:
        // they are left out here, once per topic.
        let open = self.policy.is_open();
        let subscribers: Arc<[Arc<Outbox>]> = self
            .scratch
            .iter()
            .filter_map(|k| self.clients.get(k))
            .filter(|c| open || self.policy.may_receive(&c.who, topic))
            .map(|c| c.outbox.clone())
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
            publishers: FastMap::default(),
        };
        self.cache.insert(topic.detached(), route);
    }

    fn interest_changed(&mut self) {
        self.cache.clear();
        self.counters
            .subscriptions
            .store(self.index.len() as u64, Relaxed);
    }

    /// `SUB`, as the policy allows: refused when it denies every topic of
    /// the pattern, or when the user holds its `subscriptions` limit.
    fn subscribe(&mut self, key: ClientKey, p: Pattern) -> Result<(), ProtocolError> {
        let Some(client) = self.clients.get(&key) else {
            return Ok(());
        };
        if client.patterns.contains(&p) {
            return Ok(());
        }
        if client.patterns.len() >= self.max_subscriptions {
            return Err(too_many_for_client(self.max_subscriptions));
        }
        if self.policy.is_open() {
            self.add_subscription(key, p);
            return Ok(());
        }
        if self.policy.may_subscribe(&client.who, &p) == Sub::Denied {
            return Err(forbidden(&p));
        }
        if let Some(max) = self.policy.limits(&client.who).subscriptions {
            let held = self
                .per_user
                .get(&client.who.uid)
                .map_or(0, |u| u.subscriptions);
            if held >= max {
                return Err(too_many_subscriptions(&client.who, max));
            }
        }
        self.add_subscription(key, p);
        Ok(())
    }

    fn add_subscription(&mut self, key: ClientKey, p: Pattern) {
        if let Some(client) = self.clients.get_mut(&key) {
            let p = p.detached();
            if client.patterns.insert(p.clone()) {
                self.index.insert(&p, key);
                self.per_user
                    .entry(client.who.uid)
                    .or_default()
                    .subscriptions += 1;
                self.interest_changed();
            }
        }
    }

    fn unsubscribe(&mut self, key: ClientKey, p: &Pattern) {
        if let Some(client) = self.clients.get_mut(&key) {
            if client.patterns.remove(p) {
                self.index.remove(p, key);
                if let Some(u) = self.per_user.get_mut(&client.who.uid) {
                    u.subscriptions -= 1;
                }
                self.interest_changed();
            }
        }
    }
}

/// Whether client `key` may publish on `route`'s topic: decided by the
/// policy once, then kept in the route. When it may not, the client gets
/// `ERR forbidden <topic>`.
fn may_publish(
    route: &mut Route,
    key: ClientKey,
    clients: &FastMap<ClientKey, Client>,
    policy: &Policy,
    counters: &Counters,
    topic: &Topic,
) -> bool {
    let ok = match route.publishers.get(&key) {
        Some(&ok) => ok,
        None => {
            let Some(client) = clients.get(&key) else {
                return false;
            };
            let ok = policy.may_publish(&client.who, topic);
            if route.publishers.len() < PUBLISHERS_MAX {
                route.publishers.insert(key, ok);
            }
            ok
        }
    };
    if !ok {
        if let Some(client) = clients.get(&key) {
            client.outbox.push(encode::err(&forbidden(topic)));
        }
        counters.protocol_error(ErrorCode::Forbidden);
    }
    ok
}

/// `ERR forbidden <topic or pattern>`: the text is exactly what was refused.
fn forbidden(what: &impl std::fmt::Display) -> ProtocolError {
    ProtocolError::new(ErrorCode::Forbidden, what.to_string())
}

/// The per-client limit (`--max-subscriptions`), beside the ACL's per-user one.
fn too_many_for_client(max: usize) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::TooManySubscriptions,
        format!("a client may hold at most {max} subscriptions (the broker's --max-subscriptions); UNSUB some first, or use a wildcard pattern"),
    )
}

fn too_many_subscriptions(who: &Identity, max: usize) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::TooManySubscriptions,
        format!("{who} may hold at most {max} subscriptions (per-user limit in the broker's ACL); UNSUB some first"),
    )
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
                Push::Skipped(n) => oldest += n,
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
    use crate::protocol::Reply;
    use crate::router::outbox::BacklogLimits;
    use std::collections::VecDeque;

    /// Everything queued for `o`, taken and reported written as its writer
    /// would.
    fn lines(o: &Outbox) -> Vec<String> {
        let mut all = Vec::new();
        loop {
            let mut q = VecDeque::new();
            o.take(&mut q);
            if q.is_empty() {
                return all;
            }
            o.written(q.iter().map(|e| e.line.len()).sum(), q.len());
            all.extend(
                q.iter()
                    .map(|e| String::from_utf8_lossy(&e.line).trim_end().to_string()),
            );
        }
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

    mod acl {
        use super::*;
        use crate::acl::{parse, Names};
        use crate::protocol::ErrorCode;

        const ALICE: u32 = 1001;
        const BOB: u32 = 1002;
        const CAROL: u32 = 1003;

        struct Table;
        impl Names for Table {
            fn uid(&self, user: &str) -> Option<u32> {
                match user {
                    "alice" => Some(ALICE),
                    "bob" => Some(BOB),
                    "carol" => Some(CAROL),
                    _ => None,
                }
            }
            fn gid(&self, _: &str) -> Option<u32> {
                None
            }
        }

        const CHAT: &str = "default deny
            allow pubsub chat.> user=alice
            allow sub chat.public.> user=bob
            limit user=bob clients=2 subscriptions=2
            limit user=alice backlog=1K";

        fn policy(text: &str) -> Arc<Policy> {
            Arc::new(parse(std::path::Path::new("t.acl"), text, &Table).unwrap())
        }

        fn core(text: &str) -> RouterCore {
            let mut core = RouterCore::new(Counters::new(100));
            core.set_policy(policy(text));
            core
        }

        fn join(
            core: &mut RouterCore,
            key: ClientKey,
            uid: u32,
            subs: &[&str],
        ) -> Result<Arc<Outbox>, ProtocolError> {
            let o = Arc::new(Outbox::new(BacklogLimits::default()));
            let subs = subs.iter().map(|s| s.parse().unwrap()).collect();
            core.attach_as(key, o.clone(), Identity::new(uid, vec![uid]), subs)
                .map(|()| o)
        }

        #[test]
        fn denied_pub_gets_err_forbidden_and_delivers_nothing() {
            let mut core = core(CHAT);
            let counters = core.counters.clone();
            let a = join(&mut core, 1, ALICE, &["chat.>"]).unwrap();
            let c = join(&mut core, 3, CAROL, &[]).unwrap();
            let d = core.now(3, cmd("PUB chat.x hi"));
            assert_eq!(d, Delivery::default());
            core.now(3, cmd("PUB chat.x again")); // the cached decision
            core.now(1, cmd("PUB _bus.x hi"));
            core.now(1, cmd("PUB chat.x ok"));
            assert_eq!(lines(&c), ["ERR forbidden chat.x", "ERR forbidden chat.x"]);
            assert_eq!(lines(&a), ["ERR forbidden _bus.x", "MSG chat.x ok"]);
            assert_eq!(counters.protocol_errors(ErrorCode::Forbidden), 3);
        }

        #[test]
        fn partial_sub_receives_only_what_is_allowed() {
            let mut core = core(CHAT);
            let a = join(&mut core, 1, ALICE, &[]).unwrap();
            let b = join(&mut core, 2, BOB, &[]).unwrap();
            core.now(2, cmd("SUB chat.>"));
            core.now(2, cmd("SUB chat.private.>"));
            for t in ["chat.public.x", "chat.private.y", "chat.public.x"] {
                core.now(1, cmd(&format!("PUB {t} m")));
            }
            assert_eq!(
                lines(&b),
                [
                    "ERR forbidden chat.private.>",
                    "MSG chat.public.x m",
                    "MSG chat.public.x m"
                ]
            );
            assert!(lines(&a).is_empty());
            assert_eq!(core.subscription_count(), 1);
        }

        #[test]
        fn hello_with_a_denied_sub_is_refused_and_attaches_nothing() {
            let mut core = core(CHAT);
            let e = join(&mut core, 2, BOB, &["chat.public.>", "secret.>"]).unwrap_err();
            assert_eq!(e.code, ErrorCode::Forbidden);
            assert_eq!(e.text, "secret.>");
            assert_eq!(core.client_count(), 0);
            assert_eq!(core.subscription_count(), 0);
            join(&mut core, 2, BOB, &["chat.>"]).expect("partial is accepted");
        }

        #[test]
        fn per_user_limits_on_clients_and_subscriptions() {
            let mut core = core(CHAT);
            let b1 = join(&mut core, 1, BOB, &["chat.public.a"]).unwrap();
            join(&mut core, 2, BOB, &[]).unwrap();
            let e = join(&mut core, 3, BOB, &[]).unwrap_err();
            assert_eq!(e.code, ErrorCode::TooManyClients);
            assert!(
                e.text.contains("uid 1002 may have at most 2 clients"),
                "{e}"
            );
            join(&mut core, 4, ALICE, &[]).expect("alice has no client limit");
            // Subscriptions count across bob's clients.
            core.now(2, cmd("SUB chat.public.b"));
            core.now(1, cmd("SUB chat.public.c"));
            core.now(1, cmd("SUB chat.public.a")); // already held: no change
            let got = lines(&b1);
            assert_eq!(got.len(), 1, "{got:?}");
            assert!(
                got[0].starts_with(
                    "ERR too-many-subscriptions uid 1002 may hold at most 2 subscriptions"
                ),
                "{got:?}"
            );
            // Room again after UNSUB; and after a client leaves.
            core.now(1, cmd("UNSUB chat.public.a"));
            core.now(1, cmd("SUB chat.public.c"));
            assert!(lines(&b1).is_empty());
            core.detach(2);
            join(&mut core, 5, BOB, &["chat.public.d"]).unwrap();
            let e = join(&mut core, 6, BOB, &[]).unwrap_err();
            assert_eq!(e.code, ErrorCode::TooManyClients);
            core.detach(1);
            let e = join(&mut core, 6, BOB, &["chat.public.x", "chat.public.y"]).unwrap_err();
            assert_eq!(e.code, ErrorCode::TooManySubscriptions);
            join(&mut core, 6, BOB, &["chat.public.x"]).unwrap();
        }

        #[test]
        fn a_new_policy_refilters_and_drops_what_it_denies() {
            let mut core = core(CHAT);
            let a = join(&mut core, 1, ALICE, &[]).unwrap();
            let b = join(&mut core, 2, BOB, &["chat.>", "chat.public.>"]).unwrap();
            core.now(2, cmd("PUB chat.public.x no"));
            core.now(1, cmd("PUB chat.public.x 1"));
            core.now(1, cmd("PUB chat.private.y 1"));
            // Now bob may publish and read chat.private too, but not chat.public.
            core.set_policy(policy(
                "allow pubsub chat.> user=alice\ndeny sub chat.public.> user=bob\nallow pubsub chat.> user=bob",
            ));
            core.now(2, cmd("PUB chat.public.x yes"));
            core.now(1, cmd("PUB chat.public.x 2"));
            core.now(1, cmd("PUB chat.private.y 2"));
            assert_eq!(
                lines(&b),
                [
                    "ERR forbidden chat.public.x",
                    "MSG chat.public.x 1",
                    "ERR forbidden chat.public.>",
                    "MSG chat.private.y 2"
                ]
            );
            assert!(lines(&a).is_empty(), "alice subscribed to nothing");
            assert_eq!(core.subscription_count(), 1);
            // Back to no ACL: everything flows again.
            core.set_policy(Arc::new(Policy::open()));
            core.now(1, cmd("PUB chat.public.x 3"));
            assert_eq!(lines(&b), ["MSG chat.public.x 3"]);
        }
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

    mod budget {
        use super::*;
        use crate::router::outbox::{OverflowPolicy, ENTRY_COST};

        /// A router whose clients share a budget of `limit` bytes.
        fn core(limit: usize) -> RouterCore {
            let counters = Counters::new(100);
            counters.memory.set_limit(limit);
            RouterCore::new(counters)
        }

        fn join(
            core: &mut RouterCore,
            key: ClientKey,
            subs: &[&str],
            policy: OverflowPolicy,
        ) -> Arc<Outbox> {
            let limits = BacklogLimits {
                policy,
                ..BacklogLimits::default()
            };
            let o = Arc::new(Outbox::with_budget(limits, core.counters.memory.clone()));
            core.attach(
                key,
                o.clone(),
                subs.iter().map(|s| s.parse().unwrap()).collect(),
            );
            o
        }

        /// "MSG <topic> <4-digit n>\n" costs this against the budget.
        fn cost(topic: &str) -> usize {
            "MSG  0000\n".len() + topic.len() + ENTRY_COST
        }

        fn pub_n(core: &mut RouterCore, key: ClientKey, topic: &str, range: std::ops::Range<u32>) {
            if !core.clients.contains_key(&key) {
                join(core, key, &[], OverflowPolicy::DropOldest);
            }
            for i in range {
                core.now(key, cmd(&format!("PUB {topic} {i:04}")));
            }
        }

        #[test]
        fn the_largest_backlog_pays_and_a_small_one_loses_nothing() {
            let mut core = core(100 * cost("big"));
            let big = join(&mut core, 1, &["big"], OverflowPolicy::DropOldest);
            let small = join(&mut core, 2, &["small"], OverflowPolicy::DropOldest);
            pub_n(&mut core, 3, "small", 0..20);
            pub_n(&mut core, 3, "big", 0..200);
            let held = core.counters.memory.held();
            assert!(held <= core.counters.memory.limit(), "{held}");
            let small_lines = lines(&small);
            assert_eq!(small_lines.len(), 20, "{small_lines:?}");
            assert_eq!(small_lines[0], "MSG small 0000");
            let got = lines(&big);
            // The newest survive, after one gap that says how many went.
            let Some(Reply::Dropped(n)) = got.first().map(|l| Reply::parse(l.as_bytes())) else {
                panic!("{got:?}")
            };
            assert_eq!(got.len() - 1 + n as usize, 200);
            assert_eq!(got.last().unwrap(), "MSG big 0199");
            assert_eq!(core.counters.dropped_total(DropReason::MemoryBudget), n);
            assert_eq!(core.counters.dropped_total(DropReason::BacklogOldest), 0);
        }

        #[test]
        fn equal_backlogs_lose_about_equally() {
            let mut core = core(128 * cost("t"));
            let a = join(&mut core, 1, &["t"], OverflowPolicy::DropOldest);
            let b = join(&mut core, 2, &["t"], OverflowPolicy::DropOldest);
            pub_n(&mut core, 3, "t", 0..1000);
            let (la, lb) = (lines(&a).len(), lines(&b).len());
            assert!(la.abs_diff(lb) <= 8, "{la} vs {lb}");
            assert!(la + lb <= 130, "{la} + {lb}");
        }

        /// Walks a client's lines: each `MSG <topic> n` is the next number
        /// and each `DROPPED k` skips exactly k. Returns (delivered, dropped).
        fn account(got: &[String], topic: &str, sent: u32) -> (u32, u64) {
            let (mut next, mut delivered, mut dropped) = (0u64, 0, 0);
            for l in got {
                match Reply::parse(l.as_bytes()) {
                    Reply::Msg { payload, .. } => {
                        let n: u64 = std::str::from_utf8(payload).unwrap().parse().unwrap();
                        assert_eq!(n, next, "a loss not reported where it happened: {got:?}");
                        next += 1;
                        delivered += 1;
                    }
                    Reply::Dropped(k) => {
                        next += k;
                        dropped += k;
                    }
                    _ => panic!("{topic}: unexpected {l:?}"),
                }
            }
            assert_eq!(next, u64::from(sent), "every message delivered or counted");
            (delivered, dropped)
        }

        #[test]
        fn drop_newest_refuses_the_new_lines_of_the_largest() {
            let mut core = core(50 * cost("t"));
            let a = join(&mut core, 1, &["t"], OverflowPolicy::DropNewest);
            pub_n(&mut core, 3, "t", 0..100);
            let got = lines(&a);
            assert_eq!(got[..2], ["MSG t 0000", "MSG t 0001"], "the oldest stay");
            let (delivered, dropped) = account(&got, "t", 100);
            assert!((45..=50).contains(&delivered), "{got:?}");
            assert_eq!(
                core.counters.dropped_total(DropReason::MemoryBudget),
                dropped
            );
        }

        #[test]
        fn disconnect_ends_the_largest() {
            let mut core = core(50 * cost("big"));
            let big = join(&mut core, 1, &["big"], OverflowPolicy::Disconnect);
            let small = join(&mut core, 2, &["small"], OverflowPolicy::Disconnect);
            pub_n(&mut core, 3, "small", 0..5);
            pub_n(&mut core, 3, "big", 0..60);
            assert_eq!(big.abandoned(), Some(CloseReason::SlowConsumer));
            assert_eq!(small.abandoned(), None);
            assert_eq!(lines(&small).len(), 5);
        }

        #[test]
        fn under_budget_nothing_is_dropped() {
            let mut core = core(1 << 20);
            let a = join(&mut core, 1, &["t"], OverflowPolicy::DropOldest);
            pub_n(&mut core, 3, "t", 0..1000);
            assert_eq!(lines(&a).len(), 1000);
            assert_eq!(
                core.counters.memory.held(),
                0,
                "taken and dropped: nothing held"
            );
        }
    }

    #[test]
    fn a_client_holds_at_most_max_subscriptions_and_stays_connected() {
        let mut core = RouterCore::new(Counters::new(100));
        core.set_max_subscriptions(2);
        let a = client(&mut core, 1, &["a"]);
        core.now(1, cmd("SUB b"));
        core.now(1, cmd("SUB a")); // held already: not a new one
        core.now(1, cmd("SUB c"));
        let got = lines(&a);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(
            got[0].starts_with("ERR too-many-subscriptions a client may hold at most 2"),
            "{got:?}"
        );
        core.now(1, cmd("PING x"));
        core.now(1, cmd("UNSUB a"));
        core.now(1, cmd("SUB c"));
        core.now(1, cmd("PUB c hi"));
        assert_eq!(lines(&a), ["PONG x", "MSG c hi"]);
        assert_eq!(
            core.counters
                .protocol_errors(ErrorCode::TooManySubscriptions),
            1
        );
        // At HELLO, too many sub= patterns refuse the client.
        let o = Arc::new(Outbox::new(BacklogLimits::default()));
        let subs = ["x", "y", "z"].iter().map(|s| s.parse().unwrap()).collect();
        let e = core.attach_as(2, o, Identity::default(), subs).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooManySubscriptions);
    }
}
